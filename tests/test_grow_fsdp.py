"""Growth under FSDP2 with 2 gloo ranks: gather, grow, re-shard. The sharded model computes the same
logits after growth, its optimizer (the same object) holds sharded state of the grown shapes, and the
next steps match a single-process run that grows the same way; for zero-initialized and for masked
growth (the masks ramp on the sharded model, and folding them mid-ramp keeps its logits)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from sapwood.config import ModelConfig

CFG = dict(
    vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, trained_context=16, tied_embeddings=True
)
REQUEST = dict(layers=3, hidden=48, ffn=64, heads=8, kv_heads=2)


def lm_loss(model, data):
    import torch.nn.functional as F

    return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())


def make_optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        foreach=False,
    )


def train(model, optimizer, scheduler, data, steps, masks=None):
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if masks is not None:
            masks.step()
        losses.append(loss.item())
    return losses


def run(growing_sharded: bool, method: str = "zero") -> dict:
    from sapwood.grow.masked import grow_model_masked
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
    request, masks = GrowthRequest(**REQUEST), None
    if growing_sharded:
        from torch.distributed.tensor import DTensor

        from sapwood.grow.sharded import grow_sharded, grow_sharded_masked

        if method == "masked":
            model, masks = grow_sharded_masked(model, optimizer, request, MASK_RAMP, generator)
        else:
            model = grow_sharded(model, optimizer, request, generator)
        out["all_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        out["state_sharded"] = all(
            isinstance(s["exp_avg"], DTensor) and s["exp_avg"].shape == p.shape
            for p, s in optimizer.state.items()
        )
        out["local_rows"] = model.layers["0"].feed_forward.w1.weight.to_local().shape[0]
    elif method == "masked":
        masks = grow_model_masked(model, request, MASK_RAMP, optimizer, generator)[0]
    else:
        grow_model(model, request, optimizer, generator=generator)
    with torch.no_grad():
        out["logit_diff"] = float((model(probe) - logits_before).abs().max())
    out["params"] = sum(p.numel() for p in model.parameters())
    out["after"] = train(model, optimizer, scheduler, data, 2, masks)
    out["lr"] = optimizer.param_groups[0]["lr"]
    if masks is not None:  # mid-ramp (2 of 3 steps): folding the mask into the weights keeps the logits
        out["mask"] = masks.value
        with torch.no_grad():
            masked_logits = model(probe)
            masks.fold(model)
            out["fold_diff"] = float((model(probe) - masked_logits).abs().max())
        out["hooks_left"] = len(masks.handles)
    return out


MASK_RAMP = 3


def _worker(rank: int, store: str, path: str) -> None:
    """One rank; the ranks meet through a file store (no port to pick and bind later)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = {method: run(True, method) for method in ("zero", "masked")}
        if rank == 0:
            with open(path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    """Both methods on 2 ranks (one spawn): rank 0's results by method."""
    tmp = tmp_path_factory.mktemp("fsdp_growth")
    path = tmp / "rank0.json"
    mp.spawn(_worker, args=(str(tmp / "store"), str(path)), nprocs=2, join=True)
    return json.loads(path.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["zero", "masked"])
def test_growth_under_fsdp2_matches_single_process(sharded_runs, method):
    sharded, single = sharded_runs[method], run(False, method)
    assert sharded["all_sharded"] and sharded["state_sharded"]
    assert sharded["local_rows"] == 32  # w1 grown to 64 rows, half on each rank
    assert sharded["logit_diff"] < 1e-5 and single["logit_diff"] < 1e-5
    assert sharded["params"] == single["params"]
    assert sharded["lr"] == single["lr"] == 1e-2 / 5  # the same scheduler went on
    for got, want in zip(
        sharded["before"] + sharded["after"], single["before"] + single["after"], strict=True
    ):
        assert abs(got - want) <= 1e-5 * abs(want), (sharded, single)
    if method == "masked":
        assert sharded["mask"] == single["mask"] == pytest.approx(2 / 3)
        assert sharded["fold_diff"] < 1e-5 and single["fold_diff"] < 1e-5
        assert sharded["hooks_left"] == single["hooks_left"] == 0


@pytest.mark.distributed
@pytest.mark.slow
def test_masked_growth_in_sapwood_train_under_fsdp2(tokens_dir, tmp_path):
    """``sapwood train`` on 2 ranks with ``parallel: {dp_shard: 2}`` and ``growth.method: masked``: the loss
    is unchanged at the event, the run ends mid-ramp, so the masks are folded into the sharded weights, and
    ``final/`` holds the grown model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sapwood.model import load
    from sapwood.train.metrics import read_events
    from tests.test_grow_training import MODEL

    config = {
        "model": MODEL,
        "parallel": {"dp_shard": 2},
        "data": {"path": str(tokens_dir)},
        "train": {
            "steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
            "eval_every": 2, "eval_batches": 2, "save_every": 1000, "progress": False, "device": "cpu",
            "out_dir": str(tmp_path / "run"),
        },
        "growth": {
            "at_steps": [2], "method": "masked", "mask_ramp_steps": 3,
            "add": {"layers": 1, "hidden": 16, "ffn": 32, "heads": 4},
        },
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "sapwood.cli", "train", str(tmp_path / "run.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = tmp_path / "run" / "metrics.jsonl"
    (event,) = read_events(metrics, "growth")
    assert event["step"] == 2 and abs(event["loss_after"] - event["loss_before"]) < 1e-5
    (folded,) = read_events(metrics, "growth_masks_folded")
    assert folded["mask"] == pytest.approx(2 / 3)  # steps 3 and 4 of a 3-step ramp
    final = load(tmp_path / "run" / "final")
    assert (final.cfg.layers, final.cfg.hidden, final.cfg.ffn, final.cfg.heads) == (3, 48, 96, 8)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in final.modules())
