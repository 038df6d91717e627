"""``sapwood bench data``: seconds per training batch for the sapwood cube loader vs naive xarray loading,
and vs a raw sequential read of the same number of bytes (the physical limit of the disk / page cache).

The data are simulated (:mod:`sapwood.data.simulate`) and prepared once into ``WORK`` (re-used when the sizes
match). A *batch* is ``2 x batch_size`` frames (state and next state), each frame all variables and levels on the
grid; the batch size in bytes is what the model receives.

* naive (what a user writes first): for every batch, ``xarray.open_dataset(file).load()`` of each run file the batch
  needs (each file holds two segments' worth of times), then per sample ``numpy`` stacking of the variables.
* sapwood: :class:`sapwood.data.loader.CubeLoader` iterating the same plan (prefetch thread, ``preadv`` into tensors).
* raw: ``readinto`` of ``batch bytes`` from the store's frames file into a preallocated buffer, sequentially.

Reads are *warm*: the files were just written or read, and dropping the page cache needs root, so all three read
from memory; the figures compare software overhead against the memory-copy limit, not disk speed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from sapwood.bench.harness import Result, write_suite
from sapwood.data.cubes import DEFAULT_VARIABLES, prepare
from sapwood.data.loader import CubeLoader
from sapwood.data.simulate import Grid, simulate_ensemble
from sapwood.data.store import CubeStore


def ensure_data(work: Path, grid: Grid, runs: int, progress: bool = True) -> CubeStore:
    """Simulate and prepare the bench data in ``work`` unless a previous run left the same sizes there."""
    stamp = work / "sizes.json"
    wanted = {"grid": grid.__dict__, "runs": runs}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted and (work / "store" / "index.json").exists()):
        simulate_ensemble(work / "runs", runs=runs, grid=grid, seed=0, progress=progress)
        prepare([work / "runs"], work / "store", progress=progress, force=True)
        stamp.write_text(json.dumps(wanted))
    return CubeStore(work / "store")


def naive_batch(files: list[Path], runs: np.ndarray, first_times: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: ``xarray.open_dataset(file).load()`` of every file the batch needs, then numpy stacking
    of the variables per sample."""
    import xarray as xr

    loaded = {}
    for run in sorted(set(runs.tolist())):
        with xr.open_dataset(files[run]) as ds:
            loaded[run] = ds.load()
    states, next_states = [], []
    for run, first in zip(runs.tolist(), first_times.tolist(), strict=True):
        arrays = {name: loaded[run][name].values for name in DEFAULT_VARIABLES}
        for t in range(first, first + length):
            states.append(np.concatenate([arrays[n][t][None] if n == "ps" else arrays[n][t] for n in DEFAULT_VARIABLES]))
            next_states.append(np.concatenate([arrays[n][t + 1][None] if n == "ps" else arrays[n][t + 1]
                                               for n in DEFAULT_VARIABLES]))
    return np.stack(states), np.stack(next_states)


def raw_read(path: Path, nbytes: int, buffer: bytearray, offset: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            got = f.readinto(view[done:nbytes])
            if not got:
                f.seek(0)
                continue
            done += got


def run_data_bench(out: Path, work: Path | None = None, batch_gb: float = 0.05, levels: int = 8, nlat: int = 32,
                   nlon: int = 64, batches: int = 4, progress: bool = True) -> list[Result]:
    work = work or out / "data-bench-work"
    channels = 6 * levels + 1
    row_bytes = 4 * channels * nlat * nlon
    batch_size = max(4, 4 * round(batch_gb * 1e9 / (2 * row_bytes) / 4))
    length = batch_size // 4
    segments_needed = 4 * (batches + 1)
    runs = max(2, math.ceil(segments_needed / 2))
    grid = Grid(levels=levels, nlat=nlat, nlon=nlon, times=2 * length + 1, spinup_days=0)  # bytes, not climate
    store = ensure_data(work, grid, runs, progress)
    files = sorted((work / "runs").glob("run_*.nc"))
    loader = CubeLoader(store, batch_size=batch_size, segments_per_batch=4, seed=0)
    batch_bytes = loader.batch_bytes
    plan_runs, plan_first = loader.epoch_plan(0)
    timed = min(batches, len(loader) - 1)

    # warm everything once (page cache, imports), then time
    naive_batch(files, plan_runs[:4], plan_first[:4], length)
    loader.read_batch(0, 0)

    start = time.perf_counter()
    for index in range(1, timed + 1):
        chosen = slice(4 * index, 4 * index + 4)
        naive_batch(files, plan_runs[chosen], plan_first[chosen], length)
    naive_s = (time.perf_counter() - start) / timed

    for _ in loader:  # epoch 0 warms the buffer pool and the page cache
        pass
    start, count = time.perf_counter(), 0
    for _ in loader:  # epoch 1, timed
        count += 1
        if count == timed:
            break
    loader_s = (time.perf_counter() - start) / timed

    start = time.perf_counter()
    for index in range(timed):
        loader.read_batch(1, index)
    direct_s = (time.perf_counter() - start) / timed

    buffer = bytearray(batch_bytes)
    raw_read(store.frames_path, batch_bytes, buffer, 0)
    start = time.perf_counter()
    total_bytes = store.rows * store.row_bytes
    for index in range(timed):
        raw_read(store.frames_path, batch_bytes, buffer, (index * batch_bytes) % max(1, total_bytes - batch_bytes))
    raw_s = (time.perf_counter() - start) / timed

    params: dict[str, Any] = {"batch_bytes": batch_bytes, "batch_gb": batch_bytes / 1e9, "batch_size": batch_size,
                              "grid": f"{channels}x{nlat}x{nlon}", "timed_batches": timed, "cache": "warm",
                              "store_gb": total_bytes / 1e9}
    gbps = {"naive_GBps": batch_bytes / naive_s / 1e9, "loader_GBps": batch_bytes / loader_s / 1e9,
            "raw_GBps": batch_bytes / raw_s / 1e9, "loader_no_prefetch_s": direct_s}
    results = [
        Result("loader vs naive xarray", loader_s, "s/batch", naive_s, {**params, **gbps},
               baseline="xarray open_dataset().load() of needed files per batch, numpy stacking"),
        Result("loader vs raw sequential read", loader_s, "s/batch", raw_s, {**params, **gbps},
               baseline="raw readinto of the same number of bytes"),
        Result("loader.read_batch (no prefetch thread) vs raw read", direct_s, "s/batch", raw_s, {**params, **gbps},
               baseline="raw readinto of the same number of bytes"),
    ]
    write_suite("data", results, out, extra={"cache": "warm (page cache; dropping it needs root)",
                                             "batch_gb": batch_bytes / 1e9})
    return results
