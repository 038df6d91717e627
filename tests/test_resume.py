"""Exact resume after SIGKILL: between steps, in the middle of a checkpoint write, and past a corrupt
latest checkpoint. Each run is a real ``sapwood train`` process; losses must match bitwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from sapwood.train.checkpoint import list_checkpoints
from sapwood.train.metrics import read_events

STEPS = 12
SAVE_EVERY = 4

# Runs `sapwood train` in-process after installing one fault: SIGKILL after a given optimizer step
# (between steps), or SIGKILL inside the checkpoint write of a given step, after the tensor files
# are on disk and before the manifest and rename.
RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from sapwood.train import checkpoint, loop
    from sapwood.train.callbacks import Callback

    config, fault, fault_step, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"

    class KillAfterStep(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = []
    if fault == "kill-after-step":
        callbacks.append(KillAfterStep())
    elif fault == "kill-in-save":
        real_save = checkpoint.dcp.save

        def save_then_die(state, checkpoint_id):
            real_save(state, checkpoint_id=checkpoint_id)
            if f"step_{fault_step:08d}.partial-" in checkpoint_id:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.dcp.save = save_then_die
    from sapwood.config import load_config
    loop.train(load_config(config), callbacks, resume=resume)
    """
)


def write_config(tokens_dir, out_dir) -> str:
    config = {
        "model": {"vocab_size": 320, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64,
                  "trained_context": 16, "tied_embeddings": True},
        "train": {"steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 3,
                  "save_every": SAVE_EVERY, "keep_checkpoints": 3, "eval_every": 6, "eval_batches": 1,
                  "log_every": 1, "out_dir": str(out_dir), "progress": False},
        "data": {"path": str(tokens_dir)},
    }
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run(tmp_path, config: str, fault: str = "none", fault_step: int = 0, resume: bool = False):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), config, fault, str(fault_step), "resume" if resume else "fresh"],
        capture_output=True, text=True, env=env, timeout=300,
    )


def step_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_events(out_dir / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokens_dir):
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    done = run(root, write_config(tokens_dir, out))
    assert done.returncode == 0, done.stderr
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, {r["step"]: r["val_loss"] for r in read_events(out / "metrics.jsonl", "eval")}


def resume_and_compare(tmp_path, config, out, reference, expect_warning: str | None = None):
    done = run(tmp_path, config, resume=True)
    assert done.returncode == 0, done.stderr
    if expect_warning:
        assert expect_warning in done.stderr
    resumed = read_events(out / "metrics.jsonl", "resume")
    assert len(resumed) == 1
    losses, evals = reference
    assert step_losses(out) == losses  # bitwise: floats compared exactly
    assert {r["step"]: r["val_loss"] for r in read_events(out / "metrics.jsonl", "eval")} == evals
    assert (out / "final" / "model.safetensors").exists()
    return resumed[0]


def test_sigkill_between_steps_resumes_bitwise(tmp_path, tokens_dir, reference):
    out = tmp_path / "run"
    config = write_config(tokens_dir, out)
    killed = run(tmp_path, config, "kill-after-step", 6)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004"]
    event = resume_and_compare(tmp_path, config, out, reference)
    assert event["path"].endswith("step_00000004") and event["step"] == 4


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, tokens_dir, reference):
    out = tmp_path / "run"
    config = write_config(tokens_dir, out)
    killed = run(tmp_path, config, "kill-in-save", 8)
    assert killed.returncode == -signal.SIGKILL
    assert len(list((out / "checkpoints").glob("step_00000008.partial-*"))) == 1  # the half-written one
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    event = resume_and_compare(tmp_path, config, out, reference)
    assert event["step"] == 4
    assert not list((out / "checkpoints").glob("step_00000008.*"))  # the killed writer's leftover is gone


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, tokens_dir, reference):
    out = tmp_path / "run"
    config = write_config(tokens_dir, out)
    killed = run(tmp_path, config, "kill-after-step", 10)
    assert killed.returncode == -signal.SIGKILL
    latest = out / "checkpoints" / "step_00000008"
    assert (out / "checkpoints" / "latest").read_text() == latest.name
    tensor_file = next(latest.glob("*.distcp"))
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])  # truncated
    event = resume_and_compare(tmp_path, config, out, reference, expect_warning="truncated or corrupt")
    assert event["step"] == 4
