"""Run under ``torchrun --nproc-per-node N``: train the tiny model with each named parallel layout and
write what the tests compare to ``OUT/<name>.json`` (rank 0): the losses, and every rank's bytes of
weights, gradients and optimizer state next to ``sapwood.sizing``'s prediction for that rank.

    torchrun --standalone --nproc-per-node 2 tests/distributed/worker.py --out DIR fsdp2 tp2
    ... --save-after 3     write a training checkpoint after step 3 to OUT/<name>.ckpt, then go on
    ... --load NAME=CKPT   start layout NAME from training checkpoint CKPT (any world size), not step 0
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))

import scenarios  # noqa: E402

from sapwood.config import Config  # noqa: E402
from sapwood.sizing import rank_state_bytes  # noqa: E402
from sapwood.train import checkpoint as ckpt  # noqa: E402
from sapwood.train.mesh import (  # noqa: E402
    ParallelDims,
    build_parallel_dims,
    init_distributed,
    release_process_groups,
    shutdown_distributed,
)
from sapwood.train.parallel import ParallelModel, batch_slice, full_model_state, parallelize  # noqa: E402


def train_step(pm: ParallelModel, optimizer: torch.optim.Optimizer, step: int) -> float:
    inputs, targets = scenarios.batch(step)
    rows = batch_slice(inputs.shape[0], pm.dims)
    loss = pm.forward_backward(inputs[rows], targets[rows])
    pm.clip_grad_norm_(scenarios.GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad()
    if pm.dims.dp > 1:  # each replica's loss is over its rows: average for the global mean
        dist.all_reduce(loss, group=pm.dims.submesh("dp").get_group())
        loss = loss / pm.dims.dp
    return loss.item()


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def measured_state_bytes(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank really holds: local parameter shards, gradients (after one more backward) and
    optimizer state tensors (AdamW moments and step counters)."""
    inputs, targets = scenarios.batch(999)
    rows = batch_slice(inputs.shape[0], pm.dims)
    pm.forward_backward(inputs[rows], targets[rows])
    params = list({id(p): p for p in pm.parameters()}.values())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    sizes = {
        "weights": _local_bytes(params),
        "grads": _local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": _local_bytes(state),
    }
    optimizer.zero_grad()
    return sizes


def rank_coordinates(dims: ParallelDims) -> dict[str, int]:
    if dims.mesh is None:
        return {"pp_rank": 0, "tp_rank": 0, "dp_shard_rank": 0}
    return {"pp_rank": dims.pp_rank, "tp_rank": dims.submesh("tp").get_local_rank(),
            "dp_shard_rank": dims.submesh("dp_shard").get_local_rank()}


def predicted_state_bytes(dims: ParallelDims, tied: bool) -> dict[str, int]:
    predicted = rank_state_bytes(scenarios.tiny_model_config(tied), dims.parallel, "fp32", "adamw",
                                 **rank_coordinates(dims))
    return {"weights": predicted.weights, "grads": predicted.grads, "optimizer": predicted.optimizer}


def gather(obj: object, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def run_scenario(name: str, steps: int, out: Path, save_after: int | None,
                 load: Path | None) -> tuple[dict, list[dist.ProcessGroup]]:
    world_size, parallel, tied = scenarios.SCENARIOS[name]
    dims = build_parallel_dims(parallel, world_size)
    pm = parallelize(scenarios.build_model(tied), dims, scenarios.loss_fn)
    optimizer = scenarios.make_optimizer(pm.parameters())
    config = Config(model=scenarios.tiny_model_config(tied), parallel=parallel)
    first = 0
    result: dict = {}
    if load is not None:
        first = int(ckpt.load_checkpoint(load, pm.model, optimizer)["step"])
        result["loaded_weights"] = _save_full_weights(pm, out / f"{name}.loaded.pt")
    losses = []
    for step in range(first, first + steps):
        losses.append(train_step(pm, optimizer, step))
        if save_after is not None and step + 1 == save_after:
            ckpt.save_checkpoint(
                out / f"{name}.ckpt", step + 1, pm.model, optimizer, {"step": step + 1}, config, 1
            )
            result["saved_weights"] = _save_full_weights(pm, out / f"{name}.saved.pt")
    result["first_step"] = first
    result["losses"] = losses
    result["measured"] = gather(measured_state_bytes(pm, optimizer), world_size)
    result["predicted"] = gather(predicted_state_bytes(dims, tied), world_size)
    result["coordinates"] = gather(rank_coordinates(dims), world_size)
    return result, mesh_groups(dims)


def mesh_groups(dims: ParallelDims) -> list[dist.ProcessGroup]:
    """The process groups of this rank's mesh dimensions and flattened dimensions."""
    if dims.mesh is None:
        return []
    groups = dims.mesh.get_all_groups() + [mesh.get_group() for mesh in dims.flattened.values()]
    return list({id(group): group for group in groups}.values())


def end_scenario(groups: list[dist.ProcessGroup]) -> None:
    """Tear a finished scenario's process groups down at the same point on every rank, as one
    ``sapwood train`` process does at its end: the scenario's model, optimizer and DTensor caches go
    first (:func:`release_process_groups` collects their reference cycles), then, once every rank is
    past its last collective, each group (its gloo threads and sockets) is destroyed. Without this,
    each scenario's gloo groups stay alive beside the next one's and the previous scenario's
    distributed objects are freed by the cyclic collector at random points of the next scenario."""
    release_process_groups()
    if not dist.is_initialized():
        return
    dist.barrier()
    world = dist.distributed_c10d._get_default_group()
    for group in groups:
        if group is not world:
            dist.destroy_process_group(group)
    groups.clear()
    gc.collect()  # the last references (the scenario's cycles) go here, not in the next scenario


def _save_full_weights(pm: ParallelModel, path: Path) -> str:
    state = full_model_state(pm)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(state, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-after", type=int)
    parser.add_argument("--load", action="append", default=[], help="NAME=CHECKPOINT_FOLDER")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    loads = {name: Path(path) for name, path in (item.split("=", 1) for item in args.load)}
    for name in args.names:
        threads_before = native_thread_names()
        result, groups = run_scenario(name, args.steps, args.out, args.save_after, loads.get(name))
        result["threads_before"] = gather(threads_before, env.world_size)
        if env.is_main:
            (args.out / f"{name}.json").write_text(json.dumps(result))
        end_scenario(groups)
    shutdown_distributed()
    # What is still running once the process groups are gone: nothing of gloo may outlive them into
    # interpreter exit (its threads torn down there abort the process by chance).
    (args.out / f"threads_rank{env.rank}.json").write_text(json.dumps(native_thread_names()))


def native_thread_names() -> list[str]:
    """Names of this process's native threads (Linux), e.g. ``pt_gloo_runloop`` for gloo workers."""
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir()) if tasks.exists() else []


if __name__ == "__main__":
    main()
