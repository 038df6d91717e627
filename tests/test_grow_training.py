"""Growth inside the real training loop: the ``growth:`` config section, the logged event with identical
loss before / after, optimizer state following, and kill + resume after growth equal to an uninterrupted
run."""

from __future__ import annotations

import pytest
import torch

from sapwood.config import Config, validate
from sapwood.grow.optimizer import check_optimizer_matches
from sapwood.model import load
from sapwood.train.callbacks import Callback, callbacks_from_config
from sapwood.train.loop import Trainer
from sapwood.train.metrics import read_events

MODEL = {
    "vocab_size": 320, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64, "trained_context": 32,
    "tied_embeddings": True,
}
GROWTH = {"at_steps": [3], "add": {"layers": 1, "hidden": 16, "ffn": 32, "heads": 4}}


def make_config(tokens_dir, out_dir, growth=None, **train) -> Config:
    settings = {
        "steps": 7, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "eval_every": 1000,
        "eval_batches": 2, "save_every": 1000, "log_every": 1, "out_dir": str(out_dir), "progress": False,
    }
    settings.update(train)
    return validate(
        Config,
        {
            "model": dict(MODEL), "train": settings, "data": {"path": str(tokens_dir)},
            "growth": growth if growth is not None else GROWTH,
        },
    )


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_events(out_dir / "metrics.jsonl", "train")}


def test_growth_event_mid_training(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path)
    trainer = Trainer(config, callbacks_from_config(config))
    summary = trainer.fit()
    events = read_events(tmp_path / "metrics.jsonl", "growth")
    assert len(events) == 1
    event = events[0]
    assert event["step"] == 3 and event["trigger"] == "schedule_steps"
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-5
    assert event["shape_before"] == {
        "layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2, "head_dim": 8,
    }
    assert event["shape_after"] == {
        "layers": 3, "hidden": 48, "ffn": 96, "heads": 8, "kv_heads": 2, "head_dim": 8,
    }
    assert event["params_after"] == sum(p.numel() for p in trainer.model.parameters())
    assert event["params_before"] < event["params_after"]
    assert (tmp_path / "growth.jsonl").read_text().count('"event": "growth"') == 1
    assert trainer.config.model.layers == 3 and trainer.config.model.hidden == 48
    assert check_optimizer_matches(trainer.optimizer, trainer.model) == []
    assert trainer.model.output.weight is trainer.model.tok_embeddings.weight
    final = load(summary["final"])
    assert final.cfg.hidden == 48 and final.cfg.heads == 8 and final.cfg.layers == 3
    assert max(train_losses(tmp_path)) == 7


def test_save_and_resume_after_growth_matches_uninterrupted(tokens_dir, tmp_path, crash_at):
    uninterrupted = make_config(tokens_dir, tmp_path / "a")
    Trainer(uninterrupted, callbacks_from_config(uninterrupted)).fit()
    # the checkpoint at step 3 is written right after the growth event, before any step of the grown model
    config = make_config(tokens_dir, tmp_path / "b", save_every=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(config, [*callbacks_from_config(config), crash_at(5)]).fit()
    resumed = Trainer(config, callbacks_from_config(config), resume=True)
    assert resumed.step == 3 and resumed.config.model.hidden == 48
    assert resumed.callbacks[0].triggers.events == 1
    resumed.fit()
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert len(read_events(tmp_path / "b" / "metrics.jsonl", "growth")) == 1


def test_plateau_trigger_and_caps_in_training(tokens_dir, tmp_path):
    # method zero: with masked growth (the default) no event fires while the last one's masks ramp
    growth = {
        "plateau": {"window": 2, "min_rel_improvement": 10.0}, "max_events": 5, "cooldown_steps": 2,
        "add": {"layers": 1}, "caps": {"max_layers": 4}, "method": "zero",
    }
    config = make_config(tokens_dir, tmp_path, growth=growth, steps=12)
    trainer = Trainer(config, callbacks_from_config(config))
    trainer.fit()
    events = read_events(tmp_path / "metrics.jsonl", "growth")
    # a plateau needs 2 windows of 2 steps after each event: steps 4 and 8; then the layer cap stops growth
    assert [e["step"] for e in events] == [4, 8]
    assert [e["trigger"] for e in events] == ["plateau", "plateau"]
    assert trainer.config.model.layers == 4
    skipped = read_events(tmp_path / "metrics.jsonl", "growth_skipped")
    assert [e["step"] for e in skipped] == [12] and "caps reached" in skipped[0]["reason"]
    for e in events:
        assert abs(e["loss_after"] - e["loss_before"]) < 1e-5


def test_trainer_never_imports_grow():
    import subprocess
    import sys

    code = "import sys, sapwood.train.loop; print(any(m.startswith('sapwood.grow') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_new_parameters_train_inside_the_loop(tokens_dir, tmp_path):
    config = make_config(
        tokens_dir, tmp_path, growth={"at_steps": [2], "add": {"layers": 1, "layer_position": "middle"}},
        steps=5,
    )
    snapshot = {}

    class Snapshot(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                snapshot.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer = Trainer(config, [*callbacks_from_config(config), Snapshot()])
    trainer.fit()
    new_block = trainer.model.layers["1"]  # middle: the new block follows old block 0
    for name, param in new_block.named_parameters():
        assert not torch.equal(param, snapshot[f"layers.1.{name}"]), name
