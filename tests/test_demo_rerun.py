"""`sapwood demo` reruns into its own folder (saying what it replaces and what it keeps), refuses a folder it
did not write, reads as a report (full section titles, sentences instead of raw values, 80 columns), times
every stage, and answers Ctrl-C with the command that continues it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import interrupt_once_logged


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="80")


def demo(out, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "demo", "--out", str(out), *args], capture_output=True,
        text=True, timeout=timeout, env=env(),
    )


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    proc = demo(tmp_path, "--only", "sizing")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --out {tmp_path} is not empty and was not written by sapwood demo; choose another folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_an_unknown_stage_names_the_stages(tmp_path):
    proc = demo(tmp_path / "out", "--only", "sizing,trian")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: --only trian: unknown stage; stages: sizing, lm, serving, sft, cubes, surrogate"
    )


def test_a_second_demo_into_the_same_folder_replaces_the_first(tmp_path):
    out = tmp_path / "demo-out"
    first = demo(out, "--only", "sizing")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == f"writing the demo into {out}"
    assert "1/1 sizing" in first.stdout and "…" not in first.stdout
    lines = first.stdout.splitlines()
    assert max(len(line) for line in lines if str(out) not in line) <= 80, (
        first.stdout
    )  # paths are not wrapped
    assert any(line.split()[:2] == ["tiny", "3,950,848"] for line in lines), first.stdout
    assert re.fullmatch(r"sizing: \d+ s \(CPU \d+ s\)", lines[-3]), first.stdout
    assert re.fullmatch(
        rf"demo finished in \d+ s \(CPU \d+ s\); everything it wrote is in {re.escape(str(out))}", lines[-1]
    ), first.stdout
    (out / "tiny" / "stale.txt").write_text("from the first run")
    second = demo(out, "--only", "sizing")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0] == f"{out} holds an earlier demo: reusing the folder, replacing tiny"
    assert not (out / "tiny" / "stale.txt").exists() and (out / "tiny" / "config.yaml").exists()


def test_ctrl_c_during_the_demo_names_the_command_that_continues_it(tmp_path):
    """SIGINT once the language-model stage is training: the run stops at its next step, exit 130."""
    out = tmp_path / "demo-out"
    run = subprocess.Popen(
        [sys.executable, "-m", "sapwood.cli", "demo", "--out", str(out), "--only", "lm,serving"], env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = interrupt_once_logged(run, out / "lm" / "metrics.jsonl", "start", within=600, finish=300)
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr and "error:" not in stderr
    assert re.fullmatch(
        rf"demo interrupted in stage 1/2 \(language model\) at training step \d+; to continue: "
        rf"sapwood demo --out {re.escape(str(out))} --only lm,serving \(the lm stage starts over\)",
        stderr.strip().splitlines()[-1],
    ), stderr
    assert "2/2" not in stdout


@pytest.mark.slow
def test_the_surrogate_stages_explain_their_tables(tmp_path):
    """One run of the cube stages (the rerun itself is covered by the sizing-stage test above)."""
    first = demo(tmp_path / "demo-out", "--only", "cubes,surrogate")
    assert first.returncode == 0, first.stderr
    text = first.stdout
    assert "None" not in text and "until step 0" not in text and "…" not in text
    assert "The surrogate " in text and "persistence" in text
    assert "Rollout of 10 steps" in text
    assert "\n\n" not in text
