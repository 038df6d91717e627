"""Growth under FSDP2 with 2 gloo ranks: gather, grow, re-shard. The sharded model computes the same
logits after growth, its optimizer (the same object) holds sharded state of the grown shapes, and the
next steps match a single-process run that grows the same way."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sapwood.config import ModelConfig

CFG = dict(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, trained_context=16, tied_embeddings=True)
REQUEST = dict(layers=3, hidden=48, ffn=64, heads=8, kv_heads=2)


def lm_loss(model, data):
    import torch.nn.functional as F

    return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())


def make_optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, foreach=False)


def train(model, optimizer, scheduler, data, steps):
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def run(growing_sharded: bool, rank: int = 0) -> dict:
    from sapwood.grow.plan import GrowthRequest, grow_model
    from sapwood.model.transformer import Decoder

    torch.manual_seed(0)
    model = Decoder(ModelConfig(**CFG))
    data = torch.randint(0, 64, (4, 13), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    if growing_sharded:
        from torch.distributed.device_mesh import init_device_mesh

        from sapwood.grow.sharded import default_shard_fn

        default_shard_fn(init_device_mesh("cpu", (2,)))(model)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    out = {"before": train(model, optimizer, scheduler, data, 2)}
    with torch.no_grad():
        logits_before = model(probe)
    generator = torch.Generator().manual_seed(5)
    if growing_sharded:
        from torch.distributed.tensor import DTensor

        from sapwood.grow.sharded import grow_sharded

        model = grow_sharded(model, optimizer, GrowthRequest(**REQUEST), generator)
        out["all_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        out["state_sharded"] = all(isinstance(s["exp_avg"], DTensor) and s["exp_avg"].shape == p.shape
                                   for p, s in optimizer.state.items())
        out["local_rows"] = model.layers["0"].feed_forward.w1.weight.to_local().shape[0]
    else:
        grow_model(model, GrowthRequest(**REQUEST), optimizer, generator=generator)
    with torch.no_grad():
        out["logit_diff"] = float((model(probe) - logits_before).abs().max())
    out["params"] = sum(p.numel() for p in model.parameters())
    out["after"] = train(model, optimizer, scheduler, data, 2)
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


def _worker(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = run(True, rank)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_growth_under_fsdp2_matches_single_process(tmp_path):
    path = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(free_port(), str(path)), nprocs=2, join=True)
    sharded = json.loads(path.read_text())
    single = run(False)
    assert sharded["all_sharded"] and sharded["state_sharded"]
    assert sharded["local_rows"] == 32  # w1 grown to 64 rows, half on each rank
    assert sharded["logit_diff"] < 1e-5 and single["logit_diff"] < 1e-5
    assert sharded["params"] == single["params"]
    assert sharded["lr"] == single["lr"] == 1e-2 / 5  # the same scheduler went on
    for got, want in zip(sharded["before"] + sharded["after"], single["before"] + single["after"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (sharded, single)
