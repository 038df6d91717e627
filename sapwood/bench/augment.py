"""``sapwood bench augment``: batched sapwood augmentation vs a per-sample, per-variable numpy loop.

Both do the same work on the same batch of simulated frames ``[2, B, C, lat, lon]`` (state and next state):
a random periodic longitude roll and a hemispheric flip (``v -> -v``) per sample on both frames, and bounded
per-variable noise (multiplicative for positive variables) on the state. The baseline
(:func:`sapwood.data.augment.numpy_loop_augment`) loops over samples and variables in numpy; sapwood
(:class:`sapwood.data.augment.Augment`) is one gather plus a few fused elementwise passes over the whole batch,
on the CPU, and on the GPU too when one is present.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from sapwood.bench.harness import Result, time_fn, write_suite
from sapwood.data.augment import Augment, ChannelRoles, numpy_loop_augment


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Process CPU seconds per call (all threads): less sensitive than wall time to other load on the machine."""
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
    scale = torch.tensor([250.0] * levels + [20.0] * levels + [10.0] * levels + [0.01] * levels + [1e5]
                         + [1.0] * levels + [5000.0] * levels)
    return (frames + 0.5) * scale.reshape(-1, 1, 1)


def run_augment_bench(out: Path, batch_gb: float = 0.05, levels: int = 8, nlat: int = 32, nlon: int = 64,
                      repeats: int = 5, frames: torch.Tensor | None = None) -> list[Result]:
    variables = [("T", levels), ("u", levels), ("v", levels), ("q", levels), ("ps", 0), ("rho", levels),
                 ("zg", levels)]
    row_bytes = 4 * (6 * levels + 1) * nlat * nlon
    batch_size = max(1, round(batch_gb * 1e9 / (2 * row_bytes)))
    frames = synthetic_frames(batch_size, levels, nlat, nlon) if frames is None else frames
    roles = ChannelRoles.from_variables(variables)
    batch_bytes = frames.numel() * frames.element_size()
    array = frames.numpy()
    params = {"batch_gb": batch_bytes / 1e9, "batch_size": frames.shape[1], "grid": "x".join(map(str, frames.shape[2:])),
              "threads": torch.get_num_threads()}
    baseline = time_fn(lambda: numpy_loop_augment(array, variables, seed=0), warmup=1, repeats=repeats)
    augment = Augment(roles, seed=0)
    ours = time_fn(lambda: augment(frames), warmup=1, repeats=repeats)
    cpu_baseline, cpu_ours = cpu_seconds(lambda: numpy_loop_augment(array, variables, seed=0), repeats), \
        cpu_seconds(lambda: augment(frames), repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = time_fn(lambda: augment(frames), warmup=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    cpu = {"cpu_seconds_sapwood": cpu_ours, "cpu_seconds_numpy": cpu_baseline}
    results = [Result("batched augment vs numpy loop (cpu)", ours.median, "s/batch", baseline.median,
                      {**params, **cpu, "device": "cpu"}, baseline="per-sample per-variable numpy loop"),
               Result("batched augment, 1 thread, vs numpy loop", one_thread.median, "s/batch", baseline.median,
                      {**params, "threads": 1, "device": "cpu"}, baseline="per-sample per-variable numpy loop")]
    if torch.cuda.is_available():
        on_gpu = frames.cuda()
        gpu = time_fn(lambda: augment(on_gpu), warmup=2, repeats=repeats, device="cuda")
        results.append(Result("batched augment on gpu vs numpy loop (cpu)", gpu.median, "s/batch",
                              baseline.median, {**params, "device": torch.cuda.get_device_name(0)},
                              baseline="per-sample per-variable numpy loop"))
    write_suite("augment", results, out)
    return results
