"""What `sapwood train` tells a newcomer, with real processes: Ctrl-C prints the last checkpoint and the
resume command; --resume says where it resumed from (or that there was nothing); a finished run resumed
again prints no NaN and metrics.jsonl stays strict JSON; the cube pipeline runs on simulate's defaults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import interrupt_once_logged


def env() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        environment.pop(name, None)
    return environment


def sapwood(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sapwood.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=env(), cwd=cwd,
    )


def strict_records(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def text_config(folder: Path, steps: int) -> Path:
    config = folder / "run.yaml"
    config.write_text(
        "model: {vocab_size: 300, hidden: 32, layers: 2, heads: 4, ffn: 64, trained_context: 16}\n"
        f"train: {{steps: {steps}, batch_size: 2, micro_batch_size: 2, save_every: 2, eval_every: 1000000, "
        "eval_batches: 1, log_every: 1, progress: false, out_dir: run}\n"
        "data: {path: tokens}\n"
    )
    return config


def test_ctrl_c_then_resume_then_resume_a_finished_run(tmp_path):
    tokenized = sapwood(
        "tokenize", "--max-files", "6", "--vocab-size", "300", "--out", "tokens", cwd=tmp_path
    )
    assert tokenized.returncode == 0, tokenized.stderr
    text_config(tmp_path, steps=1_000_000)
    run = subprocess.Popen(
        [sys.executable, "-m", "sapwood.cli", "train", "run.yaml", "--resume"], cwd=tmp_path, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    stdout, stderr = interrupt_once_logged(run, metrics, "checkpoint", within=240, finish=120)
    assert stdout.startswith(
        "--resume: nothing to resume, no complete checkpoint in run/checkpoints; starting from step 0"
    )
    assert run.returncode == 130, stderr
    message = stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"training interrupted at step (\d+); last checkpoint: step (\d+) "
        r"\(run/checkpoints/step_(\d+)\); to continue: sapwood train run\.yaml --resume",
        message,
    )
    assert found, stderr
    assert "Traceback" not in stderr
    interrupted_at, saved = int(found[1]), int(found[2])
    assert saved >= 2 and saved % 2 == 0 and interrupted_at >= saved and int(found[3]) == saved

    text_config(tmp_path, steps=saved + 2)
    resumed = sapwood("train", "run.yaml", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        resumed.stdout.splitlines()[0]
        == f"resumed from step {saved} of {saved + 2} (run/checkpoints/step_{saved:08d})"
    )

    again = sapwood("train", "run.yaml", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"the run already finished at step {saved + 2}" in again.stdout
    assert "nan" not in again.stdout.lower()
    summary = dict(item.split("=", 1) for item in again.stdout.strip().splitlines()[-1].split())
    assert summary["step"] == str(saved + 2) and float(summary["loss"]) > 0
    records = strict_records(metrics)
    assert [r["event"] for r in records].count("interrupted") == 1
    done = [r for r in records if r["event"] == "done"]
    assert len(done) == 2 and all(isinstance(r["loss"], float) for r in done)


def test_cube_pipeline_on_simulate_defaults_and_the_cube_tiny_preset(tmp_path):
    """The README's walk-through: simulate -> prepare -> train cube-tiny -> eval, on simulate's default grid.

    Fewer planets, times and spin-up days than simulate's defaults keep it short; that the default planet
    count leaves cube-tiny training planets is checked on the defaults themselves."""
    import inspect

    from sapwood.cli import simulate
    from sapwood.config import load_config

    defaults = {name: p.default.default for name, p in inspect.signature(simulate).parameters.items()}
    cube = load_config("cube-tiny").cube
    assert (defaults["levels"], defaults["nlat"], defaults["nlon"]) == (cube.levels, cube.lat, cube.lon)
    assert defaults["runs"] > cube.val_runs
    simulated = sapwood(
        "simulate", "--out", "nc", "--runs", str(cube.val_runs + 2), "--times", "6", "--spinup-days", "1",
        cwd=tmp_path,
    )
    assert simulated.returncode == 0, simulated.stderr
    assert simulated.stdout.startswith(
        f"wrote {cube.val_runs + 2} runs, "
    )  # no blank line before it in a pipe
    prepared = sapwood("prepare", "nc", "--out", "store", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.startswith("store: ") and "\n\n" not in prepared.stdout
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("preset: cube-tiny\ndata: {path: store}\ntrain: {steps: 2}\n")
    proc = sapwood("train", "wrong.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: wrong.yaml: a datacube model reads its store from cube.data, not data:; "
        "write `cube: {data: store}` (a store from `sapwood prepare`) and remove data:"
    )
    (tmp_path / "surrogate.yaml").write_text(
        "preset: cube-tiny\ncube: {data: store}\n"
        "train: {steps: 2, batch_size: 4, micro_batch_size: 4, eval_every: 2, eval_batches: 1, "
        "out_dir: run}\n"
    )
    proc = sapwood("train", "surrogate.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "samples/s" in proc.stdout and "tok/s" not in proc.stdout
    assert "final=run/final" in proc.stdout
    strict_records(tmp_path / "run" / "metrics.jsonl")
    proc = sapwood("eval", "run/final", "--data", "store", "--rollout", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "final" / "eval" / "eval.json").read_text())["rmse"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_writes_console_output(tmp_path, rank):
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "solve", "--params", "1e8"], capture_output=True, text=True,
        timeout=120, env={**env(), "RANK": rank}, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("model:" in proc.stdout) == (rank == "0")


@pytest.mark.distributed
@pytest.mark.slow
def test_under_torchrun_only_rank_0_prints_and_torch_warnings_stay_quiet(tmp_path):
    tokenized = sapwood(
        "tokenize", "--max-files", "6", "--vocab-size", "300", "--out", "tokens", cwd=tmp_path
    )
    assert tokenized.returncode == 0, tokenized.stderr
    (tmp_path / "run.yaml").write_text(
        "model: {vocab_size: 320, hidden: 32, layers: 2, heads: 4, ffn: 64, trained_context: 16}\n"
        "train: {steps: 2, batch_size: 4, micro_batch_size: 2, eval_every: 2, eval_batches: 1, save_every: 2,"
        " progress: false, device: cpu, out_dir: run}\n"
        "data: {path: tokens}\nparallel: {dp_shard: 2}\n"
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "sapwood.cli", "train", "run.yaml",
        ],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("step=2 ")]
    assert len(summaries) == 1, proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-4000:]
