"""Run under ``torchrun --nproc-per-node N``: train the tiny model with each named parallel layout and
write the losses (rank 0) to ``OUT/losses.json``.

    torchrun --standalone --nproc-per-node 2 tests/distributed/worker.py --out DIR fsdp2 tp2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import scenarios  # noqa: E402

from sapwood.train.mesh import build_parallel_dims, init_distributed, shutdown_distributed  # noqa: E402
from sapwood.train.parallel import ParallelModel, batch_slice, parallelize  # noqa: E402


def train_steps(pm: ParallelModel, optimizer: torch.optim.Optimizer, first: int, steps: int) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        inputs, targets = scenarios.batch(step)
        rows = batch_slice(inputs.shape[0], pm.dims)
        loss = pm.forward_backward(inputs[rows], targets[rows])
        pm.clip_grad_norm_(scenarios.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        if pm.dims.dp > 1:  # each replica's loss is over its rows: average for the global mean
            torch.distributed.all_reduce(loss, group=pm.dims.submesh("dp").get_group())
            loss = loss / pm.dims.dp
        losses.append(loss.item())
    return losses


def run_scenario(name: str, steps: int) -> list[float]:
    world_size, parallel, tied = scenarios.SCENARIOS[name]
    dims = build_parallel_dims(parallel, world_size)
    pm = parallelize(scenarios.build_model(tied), dims, scenarios.loss_fn)
    optimizer = scenarios.make_optimizer(pm.parameters())
    return train_steps(pm, optimizer, 0, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    results = {}
    for name in args.names:
        results[name] = run_scenario(name, args.steps)
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main()
