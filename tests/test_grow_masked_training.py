"""Masked growth (``growth.method: masked``) inside the real training loop: the function is unchanged at the
growth step, the masks ramp and go, training continues, a run resumed mid-ramp (masks and LR re-warm-up
restored from the checkpoint) equals an uninterrupted one, and a run ending mid-ramp writes a ``final/``
model (masks folded into the weights) computing what the masked model computed."""

from __future__ import annotations

import pytest
import torch

from sapwood.config import ModelConfig
from sapwood.grow.masked import GrowthMasks, grow_model_masked
from sapwood.grow.optimizer import check_optimizer_matches
from sapwood.grow.plan import GrowthRequest
from sapwood.model import load
from sapwood.model.transformer import Decoder
from sapwood.train.callbacks import Callback, callbacks_from_config
from sapwood.train.loop import Trainer
from sapwood.train.metrics import read_events
from sapwood.train.schedule import lr_at
from tests.test_grow_training import make_config, train_losses

MASKED = {
    "at_steps": [3],
    "mask_ramp_steps": 3,  # method: masked is the default
    "add": {"layers": 1, "hidden": 16, "ffn": 32, "heads": 4},
}


def grown_masked(**extra) -> dict:
    return MASKED | extra


def test_masked_growth_event_preserves_function_and_training_continues(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path, growth=grown_masked(), steps=8)
    assert config.growth.method == "masked"
    states = {}

    class Watch(Callback):
        def on_step_end(self, trainer, step, metrics):
            growth = trainer.callbacks[0]
            states[step] = (
                growth.masks.value if growth.masks is not None else None,
                {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            )

    trainer = Trainer(config, [*callbacks_from_config(config), Watch()])
    summary = trainer.fit()
    (event,) = read_events(tmp_path / "metrics.jsonl", "growth")
    assert event["step"] == 3 and event["shape_after"]["hidden"] == 48 and event["shape_after"]["layers"] == 3
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-5
    # the ramp: mask 0 right after growth, then 1/3, 2/3 after steps 4 and 5, and gone (1) after step 6
    assert [states[s][0] for s in (3, 4, 5, 6, 7)] == [
        0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), None, None,
    ]
    assert all(
        not module._forward_hooks and not module._forward_pre_hooks for module in trainer.model.modules()
    )
    assert check_optimizer_matches(trainer.optimizer, trainer.model) == []
    # new parts are random (not zero) and train after growth: the new block changes from step 4 to 8
    new_block = {n: p for n, p in states[8][1].items() if n.startswith("layers.1.")}
    assert new_block["layers.1.feed_forward.w2.weight"].std() > 1e-3
    for name, param in new_block.items():
        assert not torch.equal(param, states[4][1][name]), name
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9)) and all(
        torch.isfinite(torch.tensor(v)) for v in losses.values()
    )
    assert not read_events(tmp_path / "metrics.jsonl", "growth_masks_folded")  # the ramp ended before the run
    final = load(summary["final"])
    assert final.cfg.hidden == 48 and final.cfg.layers == 3


def test_resume_mid_ramp_matches_uninterrupted(tokens_dir, tmp_path, crash_at):
    growth = grown_masked(mask_ramp_steps=4, rewarm_steps=3)
    uninterrupted = make_config(tokens_dir, tmp_path / "a", growth=growth, steps=9)
    Trainer(uninterrupted, callbacks_from_config(uninterrupted)).fit()
    # the checkpoint at step 4 is one step into both the mask ramp and the LR re-warm-up
    config = make_config(tokens_dir, tmp_path / "b", growth=growth, steps=9, save_every=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(config, [*callbacks_from_config(config), crash_at(6)]).fit()
    resumed = Trainer(config, callbacks_from_config(config), resume=True)
    assert resumed.step == 4 and resumed.config.model.hidden == 48
    resumed.fit()
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    # re-warm-up: the k-th step after the event at step 3 runs at (k + 1) / 3 of the schedule's LR
    t = config.train
    logged = {r["step"]: r["lr"] for r in read_events(tmp_path / "b" / "metrics.jsonl", "train")}
    for step, factor in ((3, 1.0), (4, 1 / 3), (5, 2 / 3), (6, 1.0), (7, 1.0)):
        assert logged[step] == pytest.approx(
            factor * lr_at(step - 1, t.lr, t.min_lr, t.warmup_steps, t.steps)
        )


def test_run_ending_mid_ramp_writes_the_masked_function(tokens_dir, tmp_path):
    config = make_config(tokens_dir, tmp_path, growth=grown_masked(mask_ramp_steps=10), steps=5)
    probe = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}

    class Probe(Callback):  # runs before the growth callback folds the masks
        def on_train_end(self, trainer):
            trainer.model.eval()
            with torch.no_grad():
                seen["logits"] = trainer.model(probe)
            seen["mask"] = trainer.callbacks[1].masks.value

    trainer = Trainer(config, [Probe(), *callbacks_from_config(config)])
    summary = trainer.fit()
    assert seen["mask"] == pytest.approx(0.2)  # steps 4 and 5 of a 10-step ramp
    (folded,) = read_events(tmp_path / "metrics.jsonl", "growth_masks_folded")
    assert folded["mask"] == pytest.approx(0.2)
    final = load(summary["final"]).eval()
    with torch.no_grad():
        assert (final(probe) - seen["logits"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_restored_and_folded_masks_compute_the_masked_function(tied):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden=32, layers=2, heads=2, kv_heads=1, ffn=48, head_dim=16, trained_context=16,
        tied_embeddings=tied,
    )
    model, data = Decoder(cfg), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    masks, _ = grow_model_masked(
        model, GrowthRequest(layers=4, hidden=64, ffn=96, heads=4, kv_heads=2), 5,
        generator=torch.Generator().manual_seed(2),
    )
    masks.step(), masks.step()
    with torch.no_grad():
        masked = model(data)
    state = masks.state_dict(model)
    # a fresh model of the grown shape with the same weights, masks reinstalled from the state
    twin = Decoder(model.cfg)
    twin.load_state_dict(model.state_dict())
    restored = GrowthMasks.restore(twin, state)
    assert restored.value == pytest.approx(0.4) and len(restored.places) == len(masks.places)
    with torch.no_grad():
        assert (twin(data) - masked).abs().max().item() < 1e-6
        restored.fold(twin)
        assert not restored.active
        assert (twin(data) - masked).abs().max().item() < 1e-5
        masks.remove()  # plain removal (mask 1) is a different function mid-ramp
        assert (model(data) - masked).abs().max().item() > 1e-4
