"""``sapwood bench data``: seconds per training batch for the sapwood cube loader vs naive xarray loading,
and vs a raw sequential read of the same number of bytes (the physical limit of the disk / page cache).

The data are synthetic CF-convention NetCDF runs (:func:`write_synthetic_runs`, the simulator's variables and
attributes) prepared once into ``WORK`` (re-used when the sizes match). A *batch* is ``2 x batch_size`` frames
(state and next state), each frame all variables and levels on the grid; the batch size in bytes is what the
model receives.

* naive (what a user writes first): for every batch, ``xarray.open_dataset(file).load()`` of each run file the
  batch needs (each file holds two segments' worth of times), then per sample ``numpy`` stacking of the
  variables.
* sapwood: :class:`sapwood.data.loader.CubeLoader` iterating the same plan (prefetch thread, ``preadv`` into
  tensors), in the steady state: the clock starts once the first batch has arrived (``first_batch_s``: thread
  start and first read, paid once per training run) and stops at the last timed batch.
* raw: ``readinto`` of ``batch bytes`` from the store's frames file into a preallocated buffer, sequentially.
* memcpy: ``copy_`` of the batch's bytes between two preallocated tensors, in copies of 512 MB (the memory
  limit of this machine).
* zarr (unless ``zarr=False``): the same data prepared with ``--format zarr``, read by the loader (direct
  shard reads) and through zarr-python, against the raw layout's ``read_batch``.
* training (unless ``train_steps=0``): the data-wait fraction of short cube training runs, with and without
  ``cube.augment`` (:func:`training_wait_results`).

The loader, ``read_batch`` alone, the raw read and memcpy are timed in ``rounds`` interleaved rounds (medians
reported, and the loader/raw ratio of every round), so a change in a shared machine's load falls on all of
them; process CPU seconds per batch (all threads) are reported too, as they hardly depend on the load.

Reads are *warm*: the files were just written or read, and dropping the page cache needs root, so all three
read from memory; the figures compare software overhead against the memory-copy limit, not disk speed.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.bench.harness import Result, write_suite
from sapwood.data.cubes import DEFAULT_VARIABLES, prepare
from sapwood.data.loader import CubeLoader
from sapwood.data.store import CubeStore

MEMCPY_CHUNK_BYTES = 512 << 20  # the memcpy limit is measured in copies of this size (far past any cache)


def write_synthetic_runs(
    folder: Path, runs: int, levels: int, nlat: int, nlon: int, times: int
) -> list[Path]:
    """``runs`` CF-convention NetCDF files ``run_NNNN.nc`` of smooth random fields for the 7 cube variables
    (the bytes of a batch matter here, not the climate: simulating GBs would take hours)."""
    import xarray as xr

    from sapwood.data.simulate import VARIABLE_ATTRS

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scales = {"T": 250.0, "u": 20.0, "v": 10.0, "q": 0.01, "ps": 1e5, "rho": 1.0, "zg": 5000.0}
    coords = {
        "time": (
            "time",
            np.arange(times) * 6.0,
            {
                "standard_name": "time", "units": "hours since 2000-01-01", "calendar": "proleptic_gregorian",
                "axis": "T",
            },
        ),
        "lev": (
            "lev",
            (np.arange(levels) + 0.5) / levels,
            {"standard_name": "atmosphere_sigma_coordinate", "units": "1", "positive": "down", "axis": "Z"},
        ),
        "lat": (
            "lat",
            np.linspace(-90 + 90 / nlat, 90 - 90 / nlat, nlat),
            {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"},
        ),
        "lon": (
            "lon",
            np.arange(nlon) * 360 / nlon,
            {"standard_name": "longitude", "units": "degrees_east", "axis": "X"},
        ),
    }
    paths = []
    for run in range(runs):
        data = {}
        for name, attrs in VARIABLE_ATTRS.items():
            dims = ("time", "lat", "lon") if name == "ps" else ("time", "lev", "lat", "lon")
            shape = tuple(len(coords[d][1]) for d in dims)
            values = rng.random(shape, dtype=np.float32)
            values += np.float32(0.5)
            values *= np.float32(scales[name])
            data[name] = (dims, values, attrs)
        path = folder / f"run_{run:04d}.nc"
        xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.10"}).to_netcdf(path, engine="netcdf4")
        paths.append(path)
    return paths


def ensure_data(
    work: Path, levels: int, nlat: int, nlon: int, times: int, runs: int, progress: bool = True
) -> CubeStore:
    """Write and prepare the bench data in ``work`` unless a previous run left the same sizes there."""
    stamp = work / "sizes.json"
    wanted = {"levels": levels, "nlat": nlat, "nlon": nlon, "times": times, "runs": runs, "kind": "synthetic"}
    if not (
        stamp.exists()
        and json.loads(stamp.read_text()) == wanted
        and (work / "store" / "index.json").exists()
    ):
        for old in (work / "runs").glob("run_*.nc"):
            old.unlink()
        write_synthetic_runs(work / "runs", runs, levels, nlat, nlon, times)
        prepare([work / "runs"], work / "store", progress=progress, force=True)
        stamp.write_text(json.dumps(wanted))
    return CubeStore(work / "store")


def naive_batch(
    files: list[Path], runs: np.ndarray, first_times: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
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
            states.append(
                np.concatenate([arrays[n][t][None] if n == "ps" else arrays[n][t] for n in DEFAULT_VARIABLES])
            )
            next_states.append(
                np.concatenate(
                    [arrays[n][t + 1][None] if n == "ps" else arrays[n][t + 1] for n in DEFAULT_VARIABLES]
                )
            )
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


def timed_epoch(loader: CubeLoader, epoch: int, batches: int) -> tuple[float, float]:
    """``(seconds per batch, seconds to the first batch)`` through the prefetching iterator from the start of
    ``epoch``. Per batch is the steady state a training run sees: the clock starts when the first batch has
    arrived and stops when ``batches`` more have (the thread start and the first read, paid once per run, are
    the second figure; stopping the thread afterwards is in neither)."""
    loader.load_state_dict({"epoch": epoch, "batch": 0, "seed": loader.seed})
    iterator = loader.batches(endless=True)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - first
    iterator.close()
    return elapsed / batches, first - start


def zarr_results(
    work: Path, loader: CubeLoader, timed: int, direct_s: float, params: dict[str, Any], progress: bool
) -> list[Result]:
    """The Zarr v3 layout of the same data: the loader's batch reads (direct shard reads) and the same rows
    through zarr-python, against the raw layout's ``read_batch``."""
    from sapwood.data.zarr_store import ZarrRows

    folder = work / "store-zarr"
    if not (folder / "sapwood" / "index.json").exists():
        prepare([work / "runs"], folder, progress=progress, force=True, layout="zarr")
    store = CubeStore(folder)
    zarr_loader = CubeLoader(
        store, batch_size=loader.batch_size, segments_per_batch=loader.segments_per_batch, seed=loader.seed,
        pin_memory=False,
    )
    zarr_loader.read_batch(1, 0)
    start = time.perf_counter()
    for index in range(timed):
        zarr_loader.read_batch(1, index)
    zarr_s = (time.perf_counter() - start) / timed
    runs, first_times = loader.epoch_plan(1)
    rows = ZarrRows(folder, store.variables, store.shape, direct=False)
    frames = torch.empty((loader.window, loader.batch_size, *store.row_shape), dtype=torch.float32).numpy()
    length = loader.segment_length
    start = time.perf_counter()
    for segment in range(timed * loader.segments_per_batch):
        first_row = int(store.run_rows[runs[segment]] + first_times[segment])
        s = segment % loader.segments_per_batch
        for k in range(loader.window):
            rows.read_into(first_row + k, frames[k, s * length : (s + 1) * length])
    zarr_python_s = (time.perf_counter() - start) / timed
    gigabytes = params["batch_gb"]
    rates = {
        "zarr_s": zarr_s, "zarr_python_s": zarr_python_s, "raw_layout_s": direct_s,
        "zarr_GBps": gigabytes / zarr_s, "zarr_python_GBps": gigabytes / zarr_python_s,
    }
    baseline = "loader.read_batch on the raw frames layout"
    return [
        Result(
            "zarr layout read_batch (direct shard reads) vs raw layout", zarr_s, "s/batch", direct_s,
            {**params, **rates}, baseline=baseline,
        ),
        Result(
            "zarr layout through zarr-python vs raw layout", zarr_python_s, "s/batch", direct_s,
            {**params, **rates}, baseline=baseline,
        ),
    ]


TRAINING_AUGMENTS = {  # cube.augment of the timed training runs
    "no augmentation": {},
    "roll+flip": {"roll": True, "flip": True},
    "roll+flip+noise": {"roll": True, "flip": True, "noise": 1.0},
}


def training_wait_results(work: Path, steps: int) -> list[Result]:
    """The data-wait fraction of short cube training runs: the demo's surrogate (hidden 64, 2 layers, batch
    16, one torch thread) on a simulated store (8 planets, 4 layers on 16 x 32, built once in
    ``work/train-store``), without augmentation and with ``cube.augment`` roll+flip and roll+flip+noise. Per
    run: the seconds its steps waited for their batches against the seconds the steps took, from the run's
    ``metrics.jsonl`` (every step logged; the first step, which waits for the thread start and the first
    read, is reported apart)."""
    from sapwood.config import CubeAugmentConfig
    from sapwood.train.cube_task import simulated_store, surrogate_config
    from sapwood.train.loop import train
    from sapwood.train.metrics import read_events

    store = simulated_store(work / "train-store", runs=8, levels=4, nlat=16, nlon=32, times=12, spinup_days=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo trains: tiny matmuls, the second core left to the prefetch thread
    results = []
    try:
        for name, augment in TRAINING_AUGMENTS.items():
            out = work / "train-runs" / name.replace("+", "-").replace(" ", "-")
            if out.exists():
                import shutil

                shutil.rmtree(out)
            config = surrogate_config(store, out, steps=steps, hidden=64, layers=2, patch=4, val_runs=2)
            config.train.log_every, config.train.eval_every, config.train.save_every = 1, steps, steps
            config.cube.augment = CubeAugmentConfig(**augment)
            summary = train(config)
            records = read_events(out / "metrics.jsonl", "train")
            waits, steps_s = [r["data_wait_s"] for r in records], [r["step_s"] for r in records]
            wait, step = sum(waits[1:]) / len(waits[1:]), sum(steps_s[1:]) / len(steps_s[1:])
            results.append(
                Result(
                    f"cube training data wait vs step time, per step ({name})", wait, "s", step,
                    {
                        "augment": name, "steps": len(records), "data_wait_fraction": wait / step,
                        "data_wait_fraction_with_first_step": summary["data_wait_fraction"],
                        "first_step_wait_s": waits[0], "median_wait_s": statistics.median(waits[1:]),
                        "max_wait_s": max(waits[1:]), "median_step_s": statistics.median(steps_s[1:]),
                        "torch_threads": 1, "batch_size": config.train.micro_batch_size,
                    },
                    baseline="the training step (ratio: step time over data wait; 20x = a 5% wait)",
                )
            )
    finally:
        torch.set_num_threads(threads)
    return results


def run_data_bench(
    out: Path, work: Path | None = None, batch_gb: float = 0.05, levels: int = 8, nlat: int = 32,
    nlon: int = 64, batches: int = 4, progress: bool = True, zarr: bool = True, rounds: int = 5,
    train_steps: int = 60,
) -> list[Result]:
    work = work or out / "data-bench-work"
    channels = 6 * levels + 1
    row_bytes = 4 * channels * nlat * nlon
    batch_size = max(4, 4 * round(batch_gb * 1e9 / (2 * row_bytes) / 4))
    length = batch_size // 4
    segments_needed = 4 * (batches + 1)
    runs = max(2, math.ceil(segments_needed / 2))
    store = ensure_data(work, levels, nlat, nlon, 2 * length + 1, runs, progress)
    files = sorted((work / "runs").glob("run_*.nc"))
    loader = CubeLoader(store, batch_size=batch_size, segments_per_batch=4, seed=0, pin_memory=False)
    batch_bytes = loader.batch_bytes
    gigabytes = batch_bytes / 1e9
    plan_runs, plan_first = loader.epoch_plan(0)
    timed = min(batches, len(loader) - 1)

    # warm everything once (page cache, imports, buffer pool), then time
    naive_batch(files, plan_runs[:4], plan_first[:4], length)
    timed_epoch(loader, 0, len(loader) - 1)

    start = time.perf_counter()
    for index in range(1, timed + 1):
        chosen = slice(4 * index, 4 * index + 4)
        naive_batch(files, plan_runs[chosen], plan_first[chosen], length)
    naive_s = (time.perf_counter() - start) / timed

    buffer = bytearray(batch_bytes)
    raw_read(store.frames_path, batch_bytes, buffer, 0)
    total_bytes = store.rows * store.row_bytes
    chunk = min(batch_bytes // 4, MEMCPY_CHUNK_BYTES // 4)
    copies = torch.empty((2, chunk), dtype=torch.float32).fill_(
        1.0
    )  # the memory limit, in chunks past LLC size

    def direct_reads() -> None:
        for index in range(timed):
            loader.read_batch(1, index)

    def raw_reads() -> None:
        for index in range(timed):
            raw_read(
                store.frames_path, batch_bytes, buffer,
                (index * batch_bytes) % max(1, total_bytes - batch_bytes),
            )

    def memcpys() -> None:
        for _ in range(timed * math.ceil(batch_bytes / (4 * chunk))):
            copies[1].copy_(copies[0])

    walls: dict[str, list[float]] = {
        name: [] for name in ("loader", "first_batch", "read_batch", "raw", "memcpy")
    }
    cpus: dict[str, list[float]] = {name: [] for name in ("loader", "read_batch", "raw")}
    for _ in range(rounds):  # interleaved, so a change in the machine's load falls on every method alike
        cpu = time.process_time()
        per_batch, first = timed_epoch(loader, 1, timed)
        cpus["loader"].append((time.process_time() - cpu) / (timed + 1))
        walls["loader"].append(per_batch)
        walls["first_batch"].append(first)
        for name, fn in (("read_batch", direct_reads), ("raw", raw_reads), ("memcpy", memcpys)):
            cpu, start = time.process_time(), time.perf_counter()
            fn()
            walls[name].append((time.perf_counter() - start) / timed)
            if name in cpus:
                cpus[name].append((time.process_time() - cpu) / timed)
    loader_s, first_batch_s, direct_s, raw_s, memcpy_s = (statistics.median(walls[name]) for name in walls)
    per_round = [a / b for a, b in zip(walls["raw"], walls["loader"], strict=True)]

    params: dict[str, Any] = {
        "batch_bytes": batch_bytes, "batch_gb": gigabytes, "batch_size": batch_size,
        "grid": f"{channels}x{nlat}x{nlon}", "timed_batches": timed, "cache": "warm",
        "store_gb": total_bytes / 1e9, "threads": torch.get_num_threads(),
    }
    rates = {
        "naive_GBps": gigabytes / naive_s, "loader_GBps": gigabytes / loader_s,
        "read_batch_GBps": gigabytes / direct_s, "raw_GBps": gigabytes / raw_s,
        "memcpy_GBps": gigabytes / memcpy_s, "loader_s": loader_s, "read_batch_s": direct_s, "raw_s": raw_s,
        "memcpy_s": memcpy_s, "naive_s": naive_s, "first_batch_s": first_batch_s, "rounds": rounds,
        "loader_over_raw_GBps_per_round": per_round,
        "loader_over_raw_GBps_range": [min(per_round), max(per_round)],
        "cpu_s_per_batch": {name: statistics.median(values) for name, values in cpus.items()},
        "wall_s_per_round": walls,
    }
    raw_baseline = "raw readinto of the same number of bytes (the read limit)"
    results = [
        Result(
            "loader vs naive xarray", loader_s, "s/batch", naive_s, {**params, **rates},
            baseline="xarray open_dataset().load() of needed files per batch, numpy stacking",
        ),
        Result(
            "loader with prefetch thread vs raw read", loader_s, "s/batch", raw_s, {**params, **rates},
            baseline=raw_baseline,
        ),
        Result(
            "loader.read_batch (no prefetch thread) vs raw read", direct_s, "s/batch", raw_s,
            {**params, **rates}, baseline=raw_baseline,
        ),
        Result(
            "loader GB/s vs memcpy GB/s", gigabytes / loader_s, "GB/s", gigabytes / memcpy_s,
            {**params, **rates},
            baseline="copy_ between two preallocated tensors of the batch size (the memory limit)",
        ),
        Result(
            "raw read GB/s vs memcpy GB/s", gigabytes / raw_s, "GB/s", gigabytes / memcpy_s,
            {**params, **rates},
            baseline="copy_ between two preallocated tensors of the batch size (the memory limit)",
        ),
    ]
    if zarr:
        results += zarr_results(work, loader, timed, direct_s, params, progress)
    if train_steps > 1:
        results += training_wait_results(work, train_steps)
    write_suite(
        "data", results, out,
        extra={"cache": "warm (page cache; dropping it needs root)", "batch_gb": gigabytes},
    )
    return results
