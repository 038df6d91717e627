"""``sapwood bench augment``: fused sapwood augmentation vs a per-sample, per-variable numpy loop, and vs the
memory-copy limit measured in the same run.

Both do the same work on the same batch of synthetic frames ``[2, B, C, lat, lon]`` (state and next state):
a random periodic longitude roll and a hemispheric flip (``v -> -v``) per sample on both frames, and bounded
per-variable noise (multiplicative for positive variables) on the state. The baseline
(:func:`sapwood.data.augment.numpy_loop_augment`) loops over samples and variables in numpy; sapwood
(:class:`sapwood.data.augment.Augment`) is one fused pass that reads and writes each element once (in place,
as in training, and into a recycled buffer). The limit: ``copy_`` of the batch into a preallocated buffer (one
read and one write of every element, all threads). On a GPU, when present: the host-to-device copy of the
batch from pinned memory and the augmentation on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from sapwood.bench.harness import Result, Timing, time_fn, write_suite
from sapwood.data.augment import Augment, ChannelRoles, numpy_loop_augment


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Process CPU seconds per call (all threads): less sensitive than wall time to other load on the
    machine."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def synthetic_frames(batch_size: int, levels: int, nlat: int, nlon: int, seed: int = 0) -> torch.Tensor:
    """Positive, smooth-ish frames in physical ranges for the 7 cube variables (T, u, v, q, ps, rho, zg)."""
    generator = torch.Generator().manual_seed(seed)
    channels = 6 * levels + 1
    frames = torch.rand((2, batch_size, channels, nlat, nlon), generator=generator)
    scale = torch.tensor(
        [250.0] * levels
        + [20.0] * levels
        + [10.0] * levels
        + [0.01] * levels
        + [1e5]
        + [1.0] * levels
        + [5000.0] * levels
    )
    return (frames + 0.5) * scale.reshape(-1, 1, 1)


def run_augment_bench(
    out: Path, batch_gb: float = 0.05, levels: int = 8, nlat: int = 32, nlon: int = 64, repeats: int = 5,
    frames: torch.Tensor | None = None,
) -> list[Result]:
    variables = [
        ("T", levels), ("u", levels), ("v", levels), ("q", levels), ("ps", 0), ("rho", levels),
        ("zg", levels),
    ]
    row_bytes = 4 * (6 * levels + 1) * nlat * nlon
    batch_size = max(1, round(batch_gb * 1e9 / (2 * row_bytes)))
    frames = synthetic_frames(batch_size, levels, nlat, nlon) if frames is None else frames
    roles = ChannelRoles.from_variables(variables)
    batch_bytes = frames.numel() * frames.element_size()
    gigabytes = batch_bytes / 1e9
    array = frames.numpy()
    threads = torch.get_num_threads()
    params = {
        "batch_gb": gigabytes, "batch_size": frames.shape[1], "grid": "x".join(map(str, frames.shape[2:])),
        "threads": threads, "repeats": repeats,
    }

    def spread(timing: Timing) -> dict[str, float]:
        return {"min_s": timing.minimum, "max_s": timing.maximum, "GBps": gigabytes / timing.median}

    baseline = time_fn(lambda: numpy_loop_augment(array, variables, seed=0), warmup=1, repeats=repeats)
    work = torch.empty_like(frames)  # the copy target of the limit, then the batch augmented in place
    memcpy = time_fn(lambda: work.copy_(frames), warmup=1, repeats=repeats)
    in_place = Augment(roles, seed=0, in_place=True)
    fused_in_place = time_fn(lambda: in_place(work), warmup=1, repeats=repeats)
    cpu_in_place = cpu_seconds(lambda: in_place(work), repeats)
    cpu_numpy = cpu_seconds(lambda: numpy_loop_augment(array, variables, seed=0), max(1, repeats // 2))
    new_buffer = Augment(roles, seed=0)
    fused_new = time_fn(lambda: new_buffer(frames), warmup=1, repeats=repeats)
    torch.set_num_threads(1)
    try:
        one_thread = time_fn(lambda: in_place(work), warmup=1, repeats=repeats)
        memcpy_one = time_fn(lambda: work.copy_(frames), warmup=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    loop = "per-sample per-variable numpy loop"
    results = [
        Result(
            "fused augment in place vs numpy loop (cpu)",
            fused_in_place.median,
            "s/batch",
            baseline.median,
            {
                **params, **spread(fused_in_place), "cpu_seconds": cpu_in_place,
                "numpy_GBps": gigabytes / baseline.median, "device": "cpu",
            },
            baseline=loop,
        ),
        Result(
            "fused augment into a new buffer vs numpy loop (cpu)", fused_new.median, "s/batch",
            baseline.median, {**params, **spread(fused_new), "device": "cpu"}, baseline=loop,
        ),
        Result(
            "fused augment, 1 thread, vs numpy loop", one_thread.median, "s/batch", baseline.median,
            {**params, **spread(one_thread), "threads": 1, "device": "cpu"}, baseline=loop,
        ),
        Result(
            "fused augment CPU seconds vs numpy loop CPU seconds", cpu_in_place, "s/batch", cpu_numpy,
            {**params, "device": "cpu", "measure": "process CPU time, all threads (robust to other load)"},
            baseline=loop,
        ),
        Result(
            "fused augment GB/s vs memcpy GB/s (cpu)", gigabytes / fused_in_place.median, "GB/s",
            gigabytes / memcpy.median,
            {**params, "memcpy_s": memcpy.median, "augment_s": fused_in_place.median, "device": "cpu"},
            baseline="copy_ of the batch into a preallocated buffer (read + write once)",
        ),
        Result(
            "fused augment GB/s vs memcpy GB/s, 1 thread", gigabytes / one_thread.median, "GB/s",
            gigabytes / memcpy_one.median,
            {**params, "threads": 1, "memcpy_s": memcpy_one.median, "device": "cpu"},
            baseline="copy_ of the batch into a preallocated buffer, 1 thread",
        ),
    ]
    if torch.cuda.is_available():
        results += gpu_results(frames, roles, params, gigabytes, repeats, baseline.median)
    write_suite("augment", results, out)
    return results


def gpu_results(
    frames: torch.Tensor, roles: ChannelRoles, params: dict, gigabytes: float, repeats: int, numpy_s: float
) -> list[Result]:  # pragma: no cover - needs CUDA
    """Host-to-device copy from pinned memory and augmentation on the device, per batch."""
    device = torch.device("cuda")
    pinned = frames.pin_memory()
    on_gpu = torch.empty_like(frames, device=device)
    copy = time_fn(lambda: on_gpu.copy_(pinned, non_blocking=True), warmup=2, repeats=repeats, device="cuda")
    pageable = time_fn(lambda: on_gpu.copy_(frames), warmup=1, repeats=repeats, device="cuda")
    augment = Augment(roles, seed=0, in_place=True)
    gpu = time_fn(lambda: augment(on_gpu), warmup=2, repeats=repeats, device="cuda")
    name = {**params, "device": torch.cuda.get_device_name(0)}
    return [
        Result(
            "augment on gpu vs numpy loop (cpu)", gpu.median, "s/batch", numpy_s,
            {**name, "GBps": gigabytes / gpu.median}, baseline="per-sample per-variable numpy loop",
        ),
        Result(
            "host-to-device copy, pinned vs pageable", gigabytes / copy.median, "GB/s",
            gigabytes / pageable.median, {**name, "pinned_s": copy.median, "pageable_s": pageable.median},
            baseline="pageable copy",
        ),
    ]
