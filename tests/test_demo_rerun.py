"""`sapwood demo` reruns into its own folder (saying what it replaces and what it keeps), refuses a folder it
did not write, and reads as a report (full section titles, sentences instead of raw values)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def demo(out, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "sapwood.cli", "demo", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    proc = demo(tmp_path, "--only", "sizing")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --out {tmp_path} is not empty and was not written by sapwood demo; "
                                   "choose another folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_an_unknown_stage_names_the_stages(tmp_path):
    proc = demo(tmp_path / "out", "--only", "sizing,trian")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --only trian: unknown stage; stages: sizing, lm, serving, sft, cubes, surrogate"


def test_a_second_demo_into_the_same_folder_replaces_the_first(tmp_path):
    out = tmp_path / "demo-out"
    first = demo(out, "--only", "sizing")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == f"writing the demo into {out}"
    assert "1/1 sizing" in first.stdout and "…" not in first.stdout
    (out / "tiny" / "stale.txt").write_text("from the first run")
    second = demo(out, "--only", "sizing")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0] == f"{out} holds an earlier demo: reusing the folder, replacing tiny"
    assert not (out / "tiny" / "stale.txt").exists() and (out / "tiny" / "config.yaml").exists()


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
