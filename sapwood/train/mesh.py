"""Process-group start-up and the device mesh of a :class:`~sapwood.config.ParallelConfig`.

``torchrun`` (single node, or ``--nnodes`` with c10d rendezvous) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` reads them and starts one process group, NCCL when CUDA is
there and gloo otherwise. :func:`build_parallel_dims` checks the config's degrees against the world
size and builds the 5-D mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` with a flattened ``dp`` dimension
(data loading and loss averaging), a flattened ``dp_shard_tp`` dimension (no sharding crosses it) and,
with context parallelism, a flattened ``dp_shard_cp`` dimension (what FSDP2 shards over: the cp ranks
of one data-parallel replica hold the same weights and average their gradients).
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sapwood.config import ParallelConfig
from sapwood.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands: its rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun or unset it") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistributedEnv:
    """Start the default process group from torchrun's environment (no-op for one process).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Each process takes the GPU
    ``LOCAL_RANK``. Calling it again returns the same answer.
    """
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def release_process_groups() -> None:
    """Drop the references this process keeps to device meshes (and through each mesh's registry, to
    its process groups) outside the objects the caller still holds: the mesh cache of
    :func:`parallel_dims_for` and DTensor's caches keyed by sharding specs (the redistribute planner
    cache, the sharding-propagation caches in Python and C++, and the ``functools`` caches of
    ``torch.distributed``), whose keys and values hold their ``DeviceMesh`` strongly. Then collect the
    reference cycles of FSDP / tensor-parallel / pipeline modules."""
    _DIMS_CACHE.clear()
    try:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
    except ImportError:  # a torch without the planner cache
        pass
    else:
        clear_redistribute_planner_cache()
    clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast_path is not None:
        clear_fast_path()
    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper and str(getattr(obj, "__module__", "")).startswith(
                "torch.distributed"):
            obj.cache_clear()
    gc.collect()


def shutdown_distributed() -> None:
    """Destroy every process group this process started, while the interpreter is fully alive.

    ``destroy_process_group`` only forgets the groups; each gloo group's C++ object (with its
    ``pt_gloo_runloop`` worker threads and ``gloo_tcp_loop`` thread) dies with its last Python
    reference. Any reference left in a module-level cache keeps those threads running into
    interpreter finalization, where tearing them down aborts the process by chance
    ("terminate called without an active exception", exit -6). So the caches are released first
    and the last references go here, not at exit. Call it once the models that used the meshes are
    no longer needed (after training), on success only (a failed rank must not wait on its peers).
    """
    release_process_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def check_world_size(parallel: ParallelConfig, world_size: int) -> None:
    """Raise a one-line :class:`ConfigError` unless the degrees multiply to ``world_size``."""
    if parallel.world_size == world_size:
        return
    dp = f"dp={parallel.dp}"
    if parallel.dp_replicate > 1:
        dp += f" (dp_replicate={parallel.dp_replicate} × dp_shard={parallel.dp_shard})"
    if parallel.cp > 1:
        dp += f" × cp={parallel.cp}"
    raise ConfigError(
        f"tp={parallel.tp} × pp={parallel.pp} × {dp} = {parallel.world_size} but WORLD_SIZE={world_size}; "
        "the parallel degrees must multiply to the number of processes"
    )


@dataclass
class ParallelDims:
    """The degrees of a run and, when distributed, its device mesh (``None`` for one process)."""

    parallel: ParallelConfig
    world_size: int
    mesh: DeviceMesh | None = field(default=None, repr=False)
    flattened: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @property
    def dp_replicate(self) -> int:
        return self.parallel.dp_replicate

    @property
    def dp_shard(self) -> int:
        return self.parallel.dp_shard

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def pp(self) -> int:
        return self.parallel.pp

    @property
    def dp(self) -> int:
        return self.parallel.dp

    @property
    def cp(self) -> int:
        return self.parallel.cp

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 wraps the model whenever there is data or context parallelism (HSDP when both dp degrees
        > 1; the cp ranks' gradients are averaged by FSDP's reduce-scatter)."""
        return self.dp > 1 or self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of ``name`` (one of MESH_DIMS, ``dp``, ``dp_shard_tp`` or, with cp,
        ``dp_shard_cp``)."""
        if self.mesh is None:
            raise RuntimeError("no device mesh: this is a single-process run")
        return self.flattened[name] if name in self.flattened else self.mesh[name]

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 2-D ``(dp_replicate, dp_shard)`` for HSDP, else ``dp_shard``;
        ``dp_shard`` is ``dp_shard_cp`` (flattened) under context parallelism."""
        if self.mesh is None:
            raise RuntimeError("no device mesh: this is a single-process run")
        shard = "dp_shard_cp" if self.cp_enabled else "dp_shard"
        if self.dp_replicate > 1:  # HSDP: replicate across dim 0, shard across dim 1 (size 1 = pure DDP)
            return self.mesh["dp_replicate", shard]
        return self.mesh[shard]

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (which slice of the batch it reads)."""
        return 0 if self.mesh is None else self.submesh("dp").get_local_rank()

    @property
    def pp_rank(self) -> int:
        return 0 if self.mesh is None else self.submesh("pp").get_local_rank()


def build_parallel_dims(
    parallel: ParallelConfig, world_size: int | None = None, device_type: str = "cpu"
) -> ParallelDims:
    """Validate ``parallel`` against the world size and build the device mesh.

    One process with all degrees 1 needs no process group and gets no mesh. Otherwise the default
    process group must be started (:func:`init_distributed`).
    """
    world_size = env_world_size() if world_size is None else world_size
    check_world_size(parallel, world_size)
    if world_size == 1:
        return ParallelDims(parallel=parallel, world_size=1)
    if not dist.is_initialized():
        raise ConfigError(
            f"WORLD_SIZE={world_size} but no process group; launch with torchrun --nproc-per-node N"
        )
    degrees = (parallel.pp, parallel.dp_replicate, parallel.dp_shard, parallel.cp, parallel.tp)
    mesh = init_device_mesh(device_type, degrees, mesh_dim_names=MESH_DIMS)
    flattened = {
        "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
        "dp_shard_tp": mesh["dp_shard", "tp"]._flatten("dp_shard_tp"),
    }
    if parallel.cp > 1:
        flattened["dp_shard_cp"] = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return ParallelDims(parallel=parallel, world_size=world_size, mesh=mesh, flattened=flattened)


_DIMS_CACHE: dict[tuple, ParallelDims] = {}


def parallel_dims_for(parallel: ParallelConfig, device_type: str = "cpu") -> ParallelDims:
    """:func:`build_parallel_dims` for the current world, built once per plan and reused (a model
    rebuilt after growth gets the same mesh and process groups)."""
    world_size = env_world_size()
    key = (tuple(sorted(parallel.model_dump().items())), world_size, device_type)
    if key not in _DIMS_CACHE:
        _DIMS_CACHE[key] = build_parallel_dims(parallel, world_size, device_type)
    return _DIMS_CACHE[key]
