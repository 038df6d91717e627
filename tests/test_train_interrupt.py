"""Ctrl-C at the moments that used to go wrong, in process with real SIGINTs (``signal.raise_signal`` runs
the handler before it returns, so each press lands exactly where the test puts it): inside a checkpoint
write, inside the read of a resume, after the last step; the CLI-level flow is in test_cli_train_messages."""

from __future__ import annotations

import json
import signal
import warnings

import pytest
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from sapwood.config import Config, validate
from sapwood.train import checkpoint as ckpt
from sapwood.train.callbacks import Callback
from sapwood.train.interrupt import HELD_NOTICE, protected, stop_on_ctrl_c
from sapwood.train.loop import Trainer, TrainingInterrupted, train
from sapwood.train.metrics import read_events

MODEL = {
    "vocab_size": 320, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64, "trained_context": 16,
}

pytestmark = pytest.mark.usefixtures("one_thread", "python_default_sigint")


@pytest.fixture
def python_default_sigint():
    """Python's own Ctrl-C handler for the test, as in an interactive ``sapwood train``. A process started
    with SIGINT ignored (a background job of a non-interactive shell, ``nohup``) keeps it ignored, and
    sapwood rightly leaves that alone; these tests press Ctrl-C, so they set the interactive disposition
    whatever the test runner inherited, and restore it afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_config(tokens_dir, out_dir, steps: int) -> Config:
    train_settings = {
        "steps": steps, "batch_size": 2, "micro_batch_size": 2, "save_every": 2, "eval_every": 1000,
        "eval_batches": 1, "log_every": 1, "out_dir": str(out_dir), "progress": False,
    }
    return validate(
        Config, {"model": dict(MODEL), "train": train_settings, "data": {"path": str(tokens_dir)}}
    )


def ctrl_c(times: int) -> None:
    for _ in range(times):
        signal.raise_signal(signal.SIGINT)


class CtrlCInsideCheckpointWrite(Callback):
    """Presses Ctrl-C twice while the checkpoint of ``step`` is being written (its state is collected
    inside the write)."""

    def __init__(self, step: int):
        self.step, self.trainer = step, None

    def on_train_start(self, trainer):
        self.trainer = trainer

    def state_dict(self):
        if self.trainer is not None and self.trainer.step == self.step:
            ctrl_c(2)
        return {}


def test_a_second_ctrl_c_inside_a_checkpoint_write_lets_the_write_finish(tokens_dir, tmp_path, capfd):
    trainer = Trainer(make_config(tokens_dir, tmp_path, steps=100), [CtrlCInsideCheckpointWrite(4)])
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert stopped.value.step == 4
    assert stopped.value.checkpoint == tmp_path / "checkpoints" / "step_00000004"
    assert ckpt.resume_candidates(tmp_path / "checkpoints")[0] == stopped.value.checkpoint  # complete
    assert HELD_NOTICE.decode() in capfd.readouterr().err
    events = [r["event"] for r in read_events(tmp_path / "metrics.jsonl")]
    assert events[-2:] == ["checkpoint", "interrupted"]


def ctrl_c_while_reading(times: int):
    """torch.distributed.checkpoint's file read (the real one), with Ctrl-C pressed ``times`` times inside
    it."""
    read = dcp_filesystem.FileSystemReader.read_data

    def read_data(reader, plan, planner):
        ctrl_c(times)
        return read(reader, plan, planner)

    return read_data


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_a_resume_reads_its_checkpoint_keeps_that_checkpoint(tokens_dir, tmp_path, monkeypatch,
                                                                          presses):
    train(make_config(tokens_dir, tmp_path, steps=2))
    saved = tmp_path / "checkpoints" / "step_00000002"
    monkeypatch.setattr(dcp_filesystem.FileSystemReader, "read_data", ctrl_c_while_reading(presses))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingInterrupted) as stopped:
        warnings.simplefilter("always")
        train(make_config(tokens_dir, tmp_path, steps=4), resume=True)
    assert not [w for w in caught if "skipping checkpoint" in str(w.message)]  # not taken for damaged
    assert stopped.value.checkpoint == saved
    # one press: the resume finishes and the run stops before its next step; two: it stops at once
    assert str(stopped.value).startswith("training interrupted at step 2" if presses == 1 else
                                         "training interrupted before its first step")
    assert [f.name for f in ckpt.resume_candidates(tmp_path / "checkpoints")] == [saved.name]
    monkeypatch.undo()
    summary = train(make_config(tokens_dir, tmp_path, steps=4), resume=True)
    assert summary["step"] == 4
    assert [r["path"] for r in read_events(tmp_path / "metrics.jsonl", "resume")][-1] == str(saved)


class CtrlCAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            ctrl_c(1)


def test_a_ctrl_c_during_the_last_step_lets_the_run_finish(tokens_dir, tmp_path):
    summary = train(make_config(tokens_dir, tmp_path, steps=2), [CtrlCAtStep(2)])
    assert summary["step"] == 2 and (tmp_path / "final" / "config.yaml").exists()
    assert read_events(tmp_path / "metrics.jsonl")[-1]["event"] == "done"


def test_a_ctrl_c_before_the_first_step_stops_there(tokens_dir, tmp_path):
    with stop_on_ctrl_c(), pytest.raises(TrainingInterrupted) as stopped:
        ctrl_c(1)  # as when it lands while sapwood train imports torch or builds the model
        train(make_config(tokens_dir, tmp_path, steps=4))
    assert str(stopped.value) == ("training interrupted at step 0; no checkpoint written yet "
                                  "(one every train.save_every=2 steps)")
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "interrupted"


def test_protected_holds_a_ctrl_c_for_a_caller_with_the_default_handler():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with protected():
            ctrl_c(1)
            finished = True
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
