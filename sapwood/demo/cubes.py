"""The demo's cube stage: simulate a small ensemble -> prepare a store -> load and augment batches."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from sapwood.data.augment import Augment, ChannelRoles
from sapwood.data.cubes import prepare
from sapwood.data.loader import CubeLoader, split_store
from sapwood.data.simulate import Grid, simulate_ensemble
from sapwood.data.store import CubeStore

HELD_OUT_RUNS = 4  # the surrogate stage holds out the same runs (sapwood.data.loader.split_store)
PLANETS = 24  # 20 training planets: enough for the surrogate to forecast planets it never saw


def cube_stage(out: Path) -> None:
    """Leaves ``out/cubes/runs/*.nc`` and the store ``out/cubes/store`` for the surrogate stage."""
    console = Console()
    start = time.perf_counter()
    grid = Grid(levels=4, nlat=16, nlon=32, times=12)  # relaxed primitive-equation runs: ~5-20 s per planet
    runs = simulate_ensemble(out / "cubes" / "runs", runs=PLANETS, grid=grid, seed=0, progress=False)
    size = sum(p.stat().st_size for p in runs)
    shape = f"{grid.levels}x{grid.nlat}x{grid.nlon}"
    console.print(
        f"simulated {len(runs)} planets x {grid.times} times on {shape}: "
        f"{size / 1e6:.1f} MB NetCDF in {time.perf_counter() - start:.1f} s"
    )
    start = time.perf_counter()
    report = prepare(runs, out / "cubes" / "store", progress=False)
    console.print(f"prepared in {time.perf_counter() - start:.1f} s: {report.summary()}", highlight=False)
    store = CubeStore(out / "cubes" / "store")
    split = split_store(store, val_runs=HELD_OUT_RUNS)
    loader = CubeLoader(store, batch_size=16, windows=split.train, seed=0, normalize=True)
    augment = Augment(ChannelRoles.from_store(store, normalized=True), seed=0)
    console.print(
        f"loader: {len(loader)} batches/epoch over training planets {split.train_runs} (held out "
        f"{split.held_out_runs}), {loader.batch_bytes / 1e6:.1f} MB per batch"
    )
    load_s, augment_s = 0.0, []
    tick = time.perf_counter()
    for index, batch in enumerate(loader):
        load_s += time.perf_counter() - tick
        tick = time.perf_counter()
        frames = augment(batch.frames)
        augment_s.append(time.perf_counter() - tick)
        if index == 2:
            break
        tick = time.perf_counter()
    console.print(
        f"3 batches: state {tuple(batch.state.shape)}, params {tuple(batch.params.shape)}; "
        f"load {load_s / 3 * 1e3:.1f} ms/batch, augment {sum(augment_s[1:]) / 2 * 1e3:.1f} ms/batch "
        f"(the first {augment_s[0] * 1e3:.0f} ms: compiling or loading the kernel; keeps "
        f"{', '.join(sorted(augment.preserves))}; roll/flip keep all budgets)"
    )
    means = ", ".join(f"{value:+.3f}" for value in frames[0].mean(dim=(0, 2, 3))[:4].tolist())
    console.print(
        f"augmented batch, first 4 channel means: {means} (in units of each channel's std over the "
        "store, 0 = the store's mean)",
        highlight=False,
    )
