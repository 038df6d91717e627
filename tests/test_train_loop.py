"""The training loop: learning, precision, fp16 overflow handling, NaN skipping, divergence, callbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sapwood.config import Config, validate
from sapwood.train import checkpoint as ckpt
from sapwood.train.callbacks import Callback
from sapwood.train.loop import DivergenceError, Trainer
from sapwood.train.metrics import read_events
from sapwood.train.schedule import lr_at

MODEL = {
    "vocab_size": 320, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64, "trained_context": 32,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tokens_dir, out_dir, **train) -> Config:
    settings = {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
                "eval_every": 1000, "eval_batches": 2, "save_every": 1000, "log_every": 1,
                "out_dir": str(out_dir), "progress": False}
    settings.update(train)
    return validate(Config, {"model": dict(MODEL), "train": settings, "data": {"path": str(tokens_dir)}})


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_events(out_dir / "metrics.jsonl", "train")}


def test_schedule_warmup_then_cosine_to_min_lr():
    assert lr_at(0, 1.0, 0.1, 4, 104) == 0.25
    assert lr_at(3, 1.0, 0.1, 4, 104) == 1.0
    assert lr_at(4, 1.0, 0.1, 4, 104) == 1.0
    assert lr_at(54, 1.0, 0.1, 4, 104) == pytest.approx(0.55, abs=1e-12)
    assert lr_at(104, 1.0, 0.1, 4, 104) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.slow
def test_few_hundred_steps_beat_the_unigram_baseline(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path, steps=300, batch_size=16, micro_batch_size=16, lr=2e-2,
                         warmup_steps=20, min_lr=2e-3, eval_every=150, eval_batches=8)
    summary = Trainer(config).fit()
    baseline = json.loads((tokens_dir / "meta.json").read_text())["val_unigram_entropy"]
    evals = read_events(tmp_path / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [150, 300]
    assert summary["val_loss"] < baseline - 0.6, (summary["val_loss"], baseline)
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert 0.1 < summary["val_accuracy"] < 1.0  # chance is 1/320
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "final" / "tokenizer.json").exists()


def test_final_folder_loads_with_the_trained_weights(tokens_dir, tmp_path):
    import sapwood

    trainer = Trainer(make_config(tokens_dir, tmp_path, steps=3))
    summary = trainer.fit()
    model = sapwood.load(summary["final"])
    tokens = torch.randint(0, 320, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), trainer.model(tokens))


def test_precisions_keep_fp32_master_weights(tokens_dir, tmp_path):
    for precision in ("bf16", "fp16"):
        trainer = Trainer(make_config(tokens_dir, tmp_path / precision, steps=3, precision=precision))
        summary = trainer.fit()
        assert math.isfinite(summary["loss"])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        state = trainer.optimizer.state[trainer.optimizer.param_groups[0]["params"][0]]
        assert state["exp_avg"].dtype == torch.float32
    assert trainer.scaler.is_enabled()


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tokens_dir, tmp_path):
    trainer = Trainer(make_config(tokens_dir, tmp_path, steps=6, precision="fp16"))
    weight = trainer.model.layers["0"].feed_forward.w1.weight
    inject_at = 3  # the 3rd optimizer step (1-based) gets an infinite gradient

    def overflow(grad):
        return torch.full_like(grad, math.inf) if trainer.step == inject_at - 1 else grad

    weight.register_hook(overflow)
    seen = []

    class Watch(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen.append((step, trainer.scaler.get_scale(), weight.detach().clone()))

    trainer.callbacks.append(Watch())
    trainer.fit()
    scales = [s for _, s, _ in seen]
    assert scales[inject_at - 1] == scales[inject_at - 2] / 2  # the scale halves on the overflow
    assert torch.equal(seen[inject_at - 1][2], seen[inject_at - 2][2])  # the step changed nothing
    assert not torch.equal(seen[inject_at][2], seen[inject_at - 1][2])  # training continues after
    assert trainer.overflow_steps == 1 and trainer.step == 6
    overflows = read_events(tmp_path / "metrics.jsonl", "overflow")
    assert [e["step"] for e in overflows] == [inject_at] and overflows[0]["overflow_steps"] == 1


def poison_logits(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the model's output NaN while the trainer runs optimizer step ``s + 1`` for s in bad_steps."""

    def hook(module, args, output):
        return output * math.nan if trainer.model.training and trainer.step in bad_steps else output

    trainer.model.output.register_forward_hook(hook)


def test_nan_loss_is_skipped_and_logged(tokens_dir, tmp_path):
    trainer = Trainer(make_config(tokens_dir, tmp_path, steps=5))
    poison_logits(trainer, {2})
    before = {}

    class Snapshot(Callback):
        def on_step_end(self, trainer, step, metrics):
            before[step] = trainer.model.tok_embeddings.weight.detach().clone()

    trainer.callbacks.append(Snapshot())
    summary = trainer.fit()
    assert torch.equal(before[3], before[2])  # the NaN step did not touch the weights
    assert summary["skipped_steps"] == 1 and summary["step"] == 5 and math.isfinite(summary["loss"])
    skips = read_events(tmp_path / "metrics.jsonl", "skip")
    assert [(s["step"], s["loss"]) for s in skips] == [(3, "nan")]


def test_repeated_divergence_stops_with_the_last_good_checkpoint(tokens_dir, tmp_path):
    trainer = Trainer(make_config(tokens_dir, tmp_path, steps=20, save_every=2, max_bad_steps=3))
    poison_logits(trainer, set(range(5, 20)))
    with pytest.raises(DivergenceError, match=r"NaN/inf for 3 consecutive steps .*step_00000004"):
        trainer.fit()
    good = ckpt.resume_candidates(tmp_path / "checkpoints")
    assert good[0].name == "step_00000004"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"


class WidenFeedForward(Callback):
    """Growth-style surgery at one step: ffn 64 -> 128 (new units zero), optimizer state moved."""

    def __init__(self, at_step: int):
        self.at_step = at_step
        self.grown = False

    def on_step_end(self, trainer, step, metrics):
        if step != self.at_step or self.grown:
            return
        optimizer = trainer.optimizer
        for block in trainer.model.layers.values():
            ff = block.feed_forward
            for name, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
                old = getattr(ff, name).weight
                new = torch.nn.Parameter(torch.cat([old.detach(), torch.zeros_like(old)], dim=dim))
                for group in optimizer.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]
                state = optimizer.state.pop(old)
                optimizer.state[new] = {k: (torch.cat([v, torch.zeros_like(v)], dim=dim) if v.dim() else v)
                                        for k, v in state.items()}
                getattr(ff, name).weight = new
        trainer.config.model = trainer.config.model.model_copy(update={"ffn": 128})
        trainer.model_changed()
        trainer.log_event("growth", ffn=128)
        self.grown = True

    def state_dict(self):
        return {"grown": self.grown}

    def load_state_dict(self, state):
        self.grown = state["grown"]


def test_callback_surgery_is_checkpointed_and_resumed_with_the_grown_shape(tokens_dir, tmp_path, crash_at):
    Trainer(make_config(tokens_dir, tmp_path / "a", steps=8), [WidenFeedForward(3)]).fit()
    config = make_config(tokens_dir, tmp_path / "b", steps=8, save_every=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(config, [WidenFeedForward(3), crash_at(6)]).fit()  # checkpoint at 4 has the grown shape
    resumed = Trainer(config, [WidenFeedForward(3)], resume=True)
    assert resumed.step == 4 and resumed.config.model.ffn == 128
    assert resumed.model.layers["1"].feed_forward.w2.weight.shape == (32, 128)
    assert resumed.callbacks[0].grown
    resumed.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert (tmp_path / "b" / "final" / "config.yaml").read_text().count("ffn: 128") == 1


@pytest.mark.slow
def test_compiled_model_trains_identically_and_saves(tokens_dir, tmp_path):
    eager = Trainer(make_config(tokens_dir, tmp_path / "eager", steps=3, save_every=2)).fit()
    compiled = Trainer(
        make_config(tokens_dir, tmp_path / "compiled", steps=3, save_every=2, compile=True)
    ).fit()
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)
    assert (tmp_path / "compiled" / "final" / "model.safetensors").exists()
