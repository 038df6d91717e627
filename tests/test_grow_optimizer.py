"""Optimizer-state surgery: the same AdamW goes on after growth with matching state shapes, kept steps,
zero moments for new entries, new parameters in their sibling's group; the LR schedule and the fp16 grad
scaler continue."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sapwood.config import ModelConfig
from sapwood.grow.optimizer import check_optimizer_matches
from sapwood.grow.plan import GrowthRequest, grow_model
from sapwood.model.transformer import Decoder


def setup(tied: bool = True):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, trained_context=16,
        tied_embeddings=tied,
    )
    model = Decoder(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    data = torch.randint(0, 64, (4, 13), generator=torch.Generator().manual_seed(3))
    return model, optimizer, scheduler, data


def lm_loss(model, data):
    return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())


def train_steps(model, optimizer, scheduler, data, steps, scaler=None):
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, data)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_state_is_carried_over_in_place() -> None:
    model, optimizer, scheduler, data = setup()
    train_steps(model, optimizer, scheduler, data, 3)
    old_w1 = model.layers["0"].feed_forward.w1.weight
    old_moment = optimizer.state[old_w1]["exp_avg"].clone()
    old_norm_sq = optimizer.state[model.layers["1"].ffn_norm.weight]["exp_avg_sq"].clone()
    groups_before = [len(g["params"]) for g in optimizer.param_groups]
    with torch.no_grad():
        loss_before = lm_loss(model, data).item()
    grow_model(model, GrowthRequest(layers=3, hidden=40, ffn=64, heads=8, kv_heads=2), optimizer)
    with torch.no_grad():
        assert abs(lm_loss(model, data).item() - loss_before) < 1e-6
    assert check_optimizer_matches(optimizer, model) == []
    assert sorted(map(id, model.parameters())) == sorted(
        id(p) for g in optimizer.param_groups for p in g["params"]
    )
    # one new block: 7 matrices into the decay group, 2 norms into the no-decay group
    assert [len(g["params"]) for g in optimizer.param_groups] == [groups_before[0] + 7, groups_before[1] + 2]
    # groups list parameters in model order, as an optimizer built on the grown model would
    order = [id(p) for p in model.parameters()]
    for group in optimizer.param_groups:
        ids = [id(p) for p in group["params"]]
        assert ids == sorted(ids, key=order.index)
    new_w1 = model.layers["0"].feed_forward.w1.weight
    state = optimizer.state[new_w1]
    assert state["exp_avg"].shape == (64, 40) and float(state["step"]) == 3.0
    assert torch.equal(state["exp_avg"][:48, :32], old_moment)
    assert state["exp_avg"][48:].abs().sum() == 0 and state["exp_avg"][:, 32:].abs().sum() == 0
    assert torch.equal(optimizer.state[model.layers["1"].ffn_norm.weight]["exp_avg_sq"][:32], old_norm_sq)
    new_block_state = optimizer.state[model.layers["2"].attention.wq.weight]
    assert float(new_block_state["step"]) == 0.0 and new_block_state["exp_avg"].abs().sum() == 0
    # the schedule continues from where it was, on the same optimizer
    assert scheduler.optimizer is optimizer and scheduler.last_epoch == 3
    losses = train_steps(model, optimizer, scheduler, data, 3)
    assert optimizer.param_groups[0]["lr"] == 1e-2 / 7
    assert losses[-1] < losses[0]
    assert float(optimizer.state[new_w1]["step"]) == 6.0


def test_fp16_grad_scaler_continues_after_growth() -> None:
    model, optimizer, scheduler, data = setup(tied=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_steps(model, optimizer, scheduler, data, 2, scaler)
    grow_model(model, GrowthRequest(layers=4, ffn=64, hidden=48), optimizer)
    losses = train_steps(model, optimizer, scheduler, data, 3, scaler)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    assert check_optimizer_matches(optimizer, model) == []


def test_optimizer_state_dict_round_trips_onto_a_rebuilt_grown_model() -> None:
    """Saving after growth and loading into an optimizer built fresh on the grown shape continues
    identically."""
    model, optimizer, scheduler, data = setup()
    train_steps(model, optimizer, scheduler, data, 2)
    grow_model(model, GrowthRequest(layers=3, ffn=64), optimizer)
    # deep copies, as a checkpoint on disk would be (load_state_dict shares 'step' tensors otherwise)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    rebuilt_model = Decoder(model.cfg)
    decay = [p for p in rebuilt_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in rebuilt_model.parameters() if p.dim() < 2]
    rebuilt_optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    rebuilt_model.load_state_dict(saved_model)
    rebuilt_optimizer.load_state_dict(saved_optimizer)
    for opt in (optimizer, rebuilt_optimizer):
        for group in opt.param_groups:
            group["lr"] = 1e-2
    a = train_steps(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), data, 2)
    b = train_steps(
        rebuilt_model, rebuilt_optimizer, torch.optim.lr_scheduler.LambdaLR(rebuilt_optimizer, lambda s: 1.0),
        data, 2,
    )
    assert a == b
