"""Run under ``torchrun --nproc-per-node N``: context parallelism checks, written to ``OUT/<name>.json``
(rank 0).

``ring``: exact ring attention against SDPA on the full sequence (GQA, causal, with and without a
sliding window): the largest absolute difference of the outputs and of the q/k/v gradients, every rank.
A layout name from :data:`LAYOUTS` (``cp2``, ``cp2_fsdp2``, ``cp2_tp2``): the tiny model of
``scenarios.py`` trained with that plan; its losses, and every rank's bytes next to ``sapwood.sizing``.

    torchrun --standalone --nproc-per-node 2 tests/distributed/cp_worker.py --out DIR ring cp2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import scenarios  # noqa: E402
from worker import gather, measured_state_bytes, native_thread_names, train_step  # noqa: E402

from sapwood.config import ParallelConfig  # noqa: E402
from sapwood.sizing import rank_state_bytes  # noqa: E402
from sapwood.train.context_parallel import Ring, ring_attention, shard_positions, shard_sequence  # noqa: E402
from sapwood.train.mesh import ParallelDims, build_parallel_dims, init_distributed, shutdown_distributed  # noqa: E402
from sapwood.train.parallel import parallelize  # noqa: E402

# name -> (world size, parallel config, tied embeddings, activation checkpointing)
LAYOUTS: dict[str, tuple[int, ParallelConfig, bool, str]] = {
    "cp2": (2, ParallelConfig(cp=2), False, "none"),
    "cp2_checkpointed": (2, ParallelConfig(cp=2), True, "every_layer"),
    "cp2_fsdp2": (4, ParallelConfig(cp=2, dp_shard=2), True, "none"),
    "cp2_tp2": (4, ParallelConfig(cp=2, tp=2), False, "none"),
}


def ring_check(window: int | None) -> dict[str, float]:
    """Max |ring - SDPA| of the output and of each input's gradient, on this rank's positions."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 24, 8
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64).float()
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64).float()
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64).float()

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    if window is not None:
        mask &= ~torch.ones(seq, seq, dtype=torch.bool).tril(-window)
    want = F.scaled_dot_product_attention(*full, attn_mask=mask, enable_gqa=True)
    (want * weight).sum().backward()

    local = [shard_sequence(t, cp, rank, dim=2).detach().requires_grad_() for t in (q, k, v)]
    positions = torch.stack([shard_positions(seq, cp, r) for r in range(cp)])
    got = ring_attention(*local, positions, Ring(dist.group.WORLD), window)
    (got * shard_sequence(weight, cp, rank, dim=2)).sum().backward()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - shard_sequence(b, cp, rank, dim=2)).abs().max())

    return {"out": diff(got.detach(), want.detach()),
            **{f"grad_{n}": diff(lo.grad, fu.grad) for n, lo, fu in zip("qkv", local, full, strict=True)}}


def rank_coordinates(dims: ParallelDims) -> dict[str, int]:
    """Pipeline / tensor rank and the index among the dp_shard x cp ranks FSDP shards over."""
    return {"pp_rank": dims.pp_rank, "tp_rank": dims.submesh("tp").get_local_rank(),
            "dp_shard_rank": dims.submesh("dp_shard_cp").get_local_rank()}


def run_layout(name: str, steps: int) -> dict:
    world_size, parallel, tied, checkpointing = LAYOUTS[name]
    dims = build_parallel_dims(parallel, world_size)
    pm = parallelize(
        scenarios.build_model(tied), dims, scenarios.loss_fn, activation_checkpointing=checkpointing
    )
    optimizer = scenarios.make_optimizer(pm.parameters())
    losses = [train_step(pm, optimizer, step) for step in range(steps)]
    with torch.no_grad():  # the model returns the full sequence's logits on every cp rank
        logits = pm.model(scenarios.batch(0)[0])
    coordinates = rank_coordinates(dims)
    predicted = rank_state_bytes(scenarios.tiny_model_config(tied), parallel, "fp32", "adamw", **coordinates)
    ring_layers = sum(block.attention.context_parallel is not None for block in pm.model.layers.values())
    return {"losses": losses, "logits_shape": list(logits.shape), "ring_layers": ring_layers,
            "measured": gather(measured_state_bytes(pm, optimizer), world_size),
            "predicted": gather({"weights": predicted.weights, "grads": predicted.grads,
                                 "optimizer": predicted.optimizer}, world_size),
            "coordinates": gather(coordinates, world_size)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if name == "ring":
            result = {"causal": gather(ring_check(None), env.world_size),
                      "window5": gather(ring_check(5), env.world_size)}
        else:
            result = run_layout(name, args.steps)
        if env.is_main:
            (args.out / f"{name}.json").write_text(json.dumps(result))
    shutdown_distributed()
    (args.out / f"threads_rank{env.rank}.json").write_text(json.dumps(native_thread_names()))


if __name__ == "__main__":
    main()
