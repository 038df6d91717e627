"""Leak-free evaluation: held-out data never reach normalization or climatology; masked metrics equal numpy;
planet groups; advective persistence is exact for pure advection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr

from sapwood.baselines import Climatology, advective_persistence
from sapwood.data.cubes import prepare
from sapwood.data.loader import split_store
from sapwood.data.simulate import Grid, simulate_ensemble
from sapwood.data.store import INDEX_FILE, CubeStore, store_files
from sapwood.evaluate import planet_groups
from sapwood.skill import acc, normalized_weights, rmse
from sapwood.train.cube_task import store_normalization
from tests.test_cf_ingest import cmip6_like


def cmip_store(tmp_path, name: str, held_out_offset: float) -> CubeStore:
    folder = tmp_path / name
    folder.mkdir()
    cmip6_like(folder, "r1i1p1f1", months=24)
    cmip6_like(folder, "r2i1p1f1", months=24, offset=1.0)
    cmip6_like(folder, "r3i1p1f1", months=24, offset=held_out_offset)  # the last run: held out
    prepare([folder], tmp_path / f"{name}-store", progress=False)
    return CubeStore(tmp_path / f"{name}-store")


def test_held_out_runs_change_neither_normalization_nor_climatology(tmp_path):
    first = cmip_store(tmp_path, "a", held_out_offset=2.0)
    second = cmip_store(tmp_path, "b", held_out_offset=40.0)
    assert not np.allclose(first.mean, second.mean)  # the all-runs statistics of the index do see run 3
    split_a, split_b = split_store(first, val_runs=1), split_store(second, val_runs=1)
    assert split_a == split_b and split_a.held_out_runs == [2]
    norm_a = store_normalization(first, split_a.train)
    norm_b = store_normalization(second, split_b.train)
    assert norm_a == norm_b
    clim_a, clim_b = Climatology(first, split_a.train), Climatology(second, split_b.train)
    assert clim_a.means.keys() == clim_b.means.keys() == set(range(1, 13))
    for key in clim_a.means:
        np.testing.assert_array_equal(clim_a.means[key], clim_b.means[key])


def test_time_holdout_changes_neither_normalization_nor_climatology(tmp_path):
    first = cmip_store(tmp_path, "a", held_out_offset=2.0)
    split = split_store(first, val_runs=0, holdout_time=0.25)
    assert split.train[0] == (0, 0, 18) and (0, 18, 24) in split.held_out
    norm = store_normalization(first, split.train)
    clim = Climatology(first, split.train)
    frames = np.array(first.memmap())
    frames[18:24] += 100.0  # rewrite the held-out months of run 0, and the index's record of the file
    frames.tofile(first.frames_path)
    index_path = first.path / INDEX_FILE
    index_path.write_text(json.dumps({**first.index, "files": store_files(first.path)}))
    changed = CubeStore(first.path)
    assert store_normalization(changed, split.train) == norm
    again = Climatology(changed, split.train)
    for key in clim.means:
        np.testing.assert_array_equal(again.means[key], clim.means[key])


def test_climatology_equals_training_month_means_from_the_files(tmp_path):
    store = cmip_store(tmp_path, "a", held_out_offset=2.0)
    split = split_store(store, val_runs=1)
    climatology = Climatology(store, split.train)
    files = sorted((tmp_path / "a").iterdir())[:2]  # the two training members
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    ta = xr.concat([xr.open_dataset(f, decode_times=coder).ta for f in files], "time")
    expected = ta.groupby("time.month").mean().values[:, ::-1]  # plev top-down in the store
    for month in range(1, 13):
        np.testing.assert_allclose(
            climatology.means[month][store.channel_slice("ta")], expected[month - 1], rtol=1e-6
        )


def test_masked_metrics_equal_numpy():
    rng = np.random.default_rng(3)
    forecast, truth, clim = (rng.standard_normal((5, 3, 6, 8)) for _ in range(3))
    area = rng.uniform(0.5, 1.5, (6, 8))
    valid = rng.uniform(size=(3, 6, 8)) > 0.3
    weights = normalized_weights(torch.as_tensor(area), torch.as_tensor(valid))
    got_rmse = rmse(torch.as_tensor(forecast), torch.as_tensor(truth), weights).numpy()
    got_acc = acc(torch.as_tensor(forecast), torch.as_tensor(truth), torch.as_tensor(clim), weights).numpy()
    for c in range(3):
        w = area * valid[c]
        mse = [(w * (forecast[t, c] - truth[t, c]) ** 2).sum() / w.sum() for t in range(5)]
        assert got_rmse[c] == pytest.approx(math.sqrt(np.mean(mse)), rel=1e-5)
        f, o = forecast[:, c] - clim[:, c], truth[:, c] - clim[:, c]
        per_time = [
            (w * f[t] * o[t]).sum() / math.sqrt((w * f[t] ** 2).sum() * (w * o[t] ** 2).sum())
            for t in range(5)
        ]
        assert got_acc[c] == pytest.approx(np.mean(per_time), rel=1e-5)


def test_planet_groups_inside_and_outside_the_training_range(tmp_path):
    runs = simulate_ensemble(
        tmp_path / "runs", runs=6, grid=Grid(levels=2, nlat=8, nlon=16, times=3, spinup_days=1), seed=5,
        progress=False,
    )
    prepare(runs, tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    split = split_store(store, val_runs=2)
    groups = planet_groups(store, split)
    low, high = store.params[:4].min(0), store.params[:4].max(0)
    for run in (4, 5):
        inside = bool(np.all((store.params[run] >= low) & (store.params[run] <= high)))
        assert (run in groups["inside_training_range"]) == inside
        assert (run in groups["outside_training_range"]) == (not inside)


def test_advective_persistence_is_exact_for_pure_advection(tmp_path):
    lat = np.asarray([-45.0, 0.0, 45.0])
    lon = np.arange(0, 360, 30.0)
    dt = 3600.0
    radius = 6.371e6
    u = radius * np.cos(np.deg2rad(lat)) * np.deg2rad(30.0) / dt  # one grid point east per step
    tracer0 = np.random.default_rng(1).standard_normal((3, 12))
    tracer = np.stack([np.roll(tracer0, t, axis=1) for t in range(4)])
    ds = xr.Dataset(
        {
            "ua": (
                ("time", "lev", "lat", "lon"),
                np.broadcast_to(u[None, None, :, None], (4, 1, 3, 12)).copy(),
                {"standard_name": "eastward_wind", "units": "m s-1"},
            ),
            "tr": (("time", "lev", "lat", "lon"), tracer[:, None], {"units": "1"}),
        },
        coords={
            "time": ("time", np.arange(4.0), {"units": "hours since 2000-01-01", "calendar": "standard"}),
            "lev": ("lev", [50000.0], {"units": "Pa", "positive": "down"}),
            "lat": ("lat", lat, {"units": "degrees_north"}), "lon": ("lon", lon, {"units": "degrees_east"}),
        },
    )
    ds.to_netcdf(tmp_path / "advect.nc")
    prepare([tmp_path / "advect.nc"], tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    frames = store.read_rows(0, 4)
    moved = advective_persistence(frames[:-1], store, dt, radius)
    torch.testing.assert_close(
        moved[:, store.channel_slice("tr")], frames[1:, store.channel_slice("tr")], rtol=0, atol=1e-5
    )


def test_normalization_is_the_masked_training_statistics_in_any_block_size(tmp_path, monkeypatch):
    from sapwood.train import cube_task
    from tests.test_cf_ingest import ocean_monthly_files

    (tmp_path / "ocean").mkdir()
    ocean_monthly_files(tmp_path / "ocean", months=12)
    prepare([tmp_path / "ocean"], tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    split = split_store(store, val_runs=0, holdout_time=0.25)
    frames = np.asarray(store.memmap()[0:9], dtype=np.float64)  # the 9 training months
    valid = store.valid
    for block in (2, 64):
        monkeypatch.setattr(cube_task, "STATS_BLOCK", block)
        norm = store_normalization(store, split.train)
        for c in range(store.shape[1]):
            values = frames[:, c][:, valid[c]]
            tendencies = np.diff(frames[:, c], axis=0)[:, valid[c]]
            assert norm.state_mean[c] == pytest.approx(values.mean(), rel=1e-9)
            assert norm.state_std[c] == pytest.approx(values.std(), rel=1e-7)
            assert norm.tendency_std[c] == pytest.approx(tendencies.std() + 1e-6 * values.std(), rel=1e-7)
