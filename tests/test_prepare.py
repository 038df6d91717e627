"""prepare: exact round trip into the store, bad inputs reported by name and skipped, idempotent, atomic."""

from __future__ import annotations

import shutil
import warnings

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from sapwood.data import cubes
from sapwood.data.cubes import DEFAULT_VARIABLES, InputProblem, prepare
from sapwood.data.loader import CubeLoader
from sapwood.data.simulate import Grid, simulate_ensemble
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError

GRID = Grid(levels=3, nlat=8, nlon=16, times=6, spinup_days=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return simulate_ensemble(tmp_path_factory.mktemp("runs"), runs=3, grid=GRID, seed=1, progress=False)


def copy_inputs(runs, folder):
    folder.mkdir(parents=True, exist_ok=True)
    return [shutil.copy(p, folder / p.name) for p in runs]


def expected_frames(path) -> np.ndarray:
    ds = xr.open_dataset(path)
    parts = [ds[v].values[:, None] if v == "ps" else ds[v].values for v in DEFAULT_VARIABLES]
    return np.concatenate(parts, axis=1)


def test_prepare_then_load_gives_back_the_files_exactly(runs, tmp_path):
    report = prepare(runs, tmp_path / "store", progress=False)
    assert not report.problems and len(report.used) == 3
    store = CubeStore(tmp_path / "store")
    assert store.shape == (18, 5 * 3 + 1 + 3, 8, 16)
    loader = CubeLoader(store, batch_size=4, segments_per_batch=2, seed=0)
    seen = 0
    for batch in loader:
        for i in range(len(batch)):
            run, time = int(batch.run[i]), int(batch.time[i])
            truth = expected_frames(runs[run])
            np.testing.assert_array_equal(batch.state[i].numpy(), truth[time])
            np.testing.assert_array_equal(batch.next_state[i].numpy(), truth[time + 1])
            ds = xr.open_dataset(runs[run])
            assert batch.params[i, 1].item() == np.float32(float(ds.gravity))
            seen += 1
    assert seen == len(loader) * 4 > 0


def test_normalized_batches_denormalize_to_the_files(runs, tmp_path):
    prepare(runs, tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    batch = next(iter(CubeLoader(store, batch_size=2, segments_per_batch=1, normalize=True, shuffle=False)))
    truth = expected_frames(runs[0])
    np.testing.assert_allclose(store.denormalize(batch.state).numpy(), truth[0:2], rtol=2e-6, atol=1e-6 * 1e5)
    per_channel = np.abs(batch.state.numpy()).max(axis=(0, 2, 3))
    assert per_channel.max() < 10  # really normalized


def test_statistics_are_per_variable_and_level(runs, tmp_path):
    prepare(runs, tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    temperature = np.concatenate([xr.open_dataset(p).T.values for p in runs]).astype(np.float64)
    top = store.channel_slice("T").start
    np.testing.assert_allclose(store.mean[top], temperature[:, 0].mean(), rtol=1e-12)
    np.testing.assert_allclose(store.std[top + 2], temperature[:, 2].std(), rtol=1e-9)
    ps_channel = store.channel_slice("ps").start
    all_ps = np.concatenate([xr.open_dataset(p).ps.values for p in runs]).astype(np.float64)
    np.testing.assert_allclose(store.mean[ps_channel], all_ps.mean(), rtol=1e-12)


def write_variant(source, target, edit) -> None:
    shutil.copy(source, target)
    with netCDF4.Dataset(target, "a") as ds:
        edit(ds)


def test_bad_inputs_are_named_skipped_and_lose_nothing_else(runs, tmp_path):
    folder = tmp_path / "in"
    good = copy_inputs(runs[:2], folder)
    (folder / "corrupt.nc").write_bytes(b"this is not netcdf" * 100)
    data = runs[2].read_bytes()
    (folder / "truncated.nc").write_bytes(data[: len(data) // 2])
    write_variant(runs[2], folder / "inf.nc", lambda ds: ds["q"].__setitem__((2, 1, 3, 4), np.inf))
    write_variant(runs[2], folder / "units.nc", lambda ds: ds["T"].setncattr("units", "degC"))
    write_variant(
        runs[2], folder / "time_order.nc", lambda ds: ds["time"].__setitem__(slice(None), ds["time"][::-1])
    )
    simulate_ensemble(
        tmp_path / "other", runs=1, grid=Grid(levels=3, nlat=10, nlon=16, times=4, spinup_days=1),
        progress=False,
    )
    shutil.copy(tmp_path / "other" / "run_0000.nc", folder / "wrong_shape.nc")

    report = prepare([folder], tmp_path / "store", progress=False)
    kinds = {p.path.name: p.kind for p in report.problems}
    assert kinds == {
        "corrupt.nc": "corrupt", "truncated.nc": "truncated", "inf.nc": "non-finite", "units.nc": "units",
        "time_order.nc": "coordinates", "wrong_shape.nc": "shape",
    }
    assert sorted(p.name for p in report.used) == sorted(p.name for p in good)
    assert "q level 1 at time index 2" in next(str(p) for p in report.problems if p.kind == "non-finite")
    summary = report.summary()
    assert "6 skipped" in summary and "truncated.nc" in summary
    store = CubeStore(tmp_path / "store")
    assert store.rows == 12  # the two good runs, nothing from the bad ones
    whole = store.memmap()
    for run, path in enumerate(sorted(good)):
        first = store.run_rows[run]
        np.testing.assert_array_equal(whole[first : first + 6], expected_frames(path))


def test_nothing_usable_is_an_error_naming_the_files(tmp_path, capsys):
    bad = tmp_path / "junk.nc"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(SapwoodError, match="junk.nc"):
        prepare([bad], tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.glob("store.partial*"))
    from sapwood.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(bad), "--out", str(tmp_path / "store")])
    assert exit_info.value.code == 2 and "junk.nc" in capsys.readouterr().err


def test_rerun_is_idempotent_and_changed_inputs_rebuild(runs, tmp_path):
    inputs = copy_inputs(runs[:2], tmp_path / "in")
    first = prepare(inputs, tmp_path / "store", progress=False)
    index_stat = (tmp_path / "store" / "index.json").stat()
    again = prepare(inputs, tmp_path / "store", progress=False)
    assert again.up_to_date and not first.up_to_date
    assert (tmp_path / "store" / "index.json").stat().st_mtime_ns == index_stat.st_mtime_ns
    more = prepare(inputs + [runs[2]], tmp_path / "store", progress=False)
    assert not more.up_to_date and CubeStore(tmp_path / "store").runs == 3


def test_interrupted_prepare_never_leaves_a_complete_looking_store(runs, tmp_path, monkeypatch):
    real = cubes._Writer.write_part
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cubes._Writer, "write_part", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(runs, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(SapwoodError, match="not a complete"):
        CubeStore(tmp_path / "store")
    monkeypatch.setattr(cubes._Writer, "write_part", real)
    prepare(runs[:1], tmp_path / "store", progress=False)  # an old good store survives a failed rebuild
    calls["n"] = 0
    monkeypatch.setattr(cubes._Writer, "write_part", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(runs, tmp_path / "store", progress=False)
    assert CubeStore(tmp_path / "store").runs == 1
    assert not list(tmp_path.glob("store.partial*"))


def test_zarr_and_netcdf_inputs_mix(runs, tmp_path):
    zarr_path, zarr2_path = tmp_path / "run.zarr", tmp_path / "run2.zarr"
    xr.open_dataset(runs[1], decode_times=False).to_zarr(zarr_path, zarr_format=3, consolidated=False)
    xr.open_dataset(runs[2], decode_times=False).to_zarr(zarr2_path, zarr_format=2)
    assert (zarr_path / "zarr.json").exists() and (zarr2_path / ".zgroup").exists()
    report = prepare([runs[0], zarr_path, zarr2_path], tmp_path / "store", progress=False)
    assert not report.problems and report.runs == 3, report.summary()
    store = CubeStore(tmp_path / "store")
    np.testing.assert_array_equal(
        store.read_rows(int(store.run_rows[1]), 6).numpy(), expected_frames(runs[1])
    )
    np.testing.assert_array_equal(
        store.read_rows(int(store.run_rows[2]), 6).numpy(), expected_frames(runs[2])
    )


def test_store_damage_is_detected_and_rerunning_prepare_repairs_it(runs, tmp_path):
    prepare(runs[:1], tmp_path / "store", progress=False)
    with open(tmp_path / "store" / "frames.f32", "r+b") as f:
        f.truncate(100)
    with pytest.raises(SapwoodError, match="damaged, run `sapwood prepare` again"):
        CubeStore(tmp_path / "store")
    again = prepare(runs[:1], tmp_path / "store", progress=False)  # what the message says to do
    assert not again.up_to_date
    np.testing.assert_array_equal(CubeStore(tmp_path / "store").memmap(), expected_frames(runs[0]))
    (tmp_path / "store" / "grid.npz").unlink()
    assert not prepare(runs[:1], tmp_path / "store", progress=False).up_to_date
    assert prepare(runs[:1], tmp_path / "store", progress=False).up_to_date


DEAD_PID = 4_194_305  # above Linux's largest pid_max: never a running process


def damage_shard(store, kind: str) -> None:
    shard = sorted(p for p in (store / "T" / "c").rglob("*") if p.is_file())[-1]
    if kind == "delete":
        shard.unlink()
    elif kind == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 40)
    else:  # same size, other bytes
        shard.write_bytes(bytes(shard.stat().st_size))


@pytest.mark.parametrize("kind", ["delete", "truncate", "overwrite-grid"])
def test_damaged_zarr_store_is_refused_and_a_plain_rerun_repairs_it(runs, tmp_path, kind):
    store = tmp_path / "store"
    prepare(runs[:2], store, progress=False, layout="zarr")
    if kind == "overwrite-grid":
        grid = store / "sapwood" / "grid.npz"
        data = bytearray(grid.read_bytes())
        data[len(data) // 2] ^= 0xFF
        grid.write_bytes(bytes(data))
    else:
        damage_shard(store, kind)
    with pytest.raises(SapwoodError, match="damaged, run `sapwood prepare` again") as raised:
        CubeStore(store)
    assert "\n" not in str(raised.value)
    again = prepare(runs[:2], store, progress=False, layout="zarr")  # what the message says to do
    assert not again.up_to_date
    np.testing.assert_array_equal(CubeStore(store).read_rows(0, 6).numpy(), expected_frames(runs[0]))
    assert prepare(runs[:2], store, progress=False, layout="zarr").up_to_date


def test_raw_store_with_a_changed_grid_file_is_refused_and_rebuilt(runs, tmp_path):
    store = tmp_path / "store"
    prepare(runs[:1], store, progress=False)
    grid = store / "grid.npz"
    grid.write_bytes(bytes(grid.stat().st_size))  # same size, zeros: the crc32 in the index differs
    with pytest.raises(SapwoodError, match="grid.npz: contents changed.*run `sapwood prepare` again"):
        CubeStore(store)
    assert not prepare(runs[:1], store, progress=False).up_to_date
    np.testing.assert_array_equal(CubeStore(store).memmap(), expected_frames(runs[0]))


def test_a_reader_restores_a_store_left_between_the_two_renames(runs, tmp_path):
    store = tmp_path / "store"
    prepare(runs[:1], store, progress=False)
    store.rename(tmp_path / f"store.old-{DEAD_PID}")  # the writer died after moving the old store aside
    (tmp_path / f"store.partial-{DEAD_PID}").mkdir()  # and before publishing its new one
    reader = CubeStore(store)
    assert reader.rows == 6 and not (tmp_path / f"store.old-{DEAD_PID}").exists()
    assert (tmp_path / f"store.partial-{DEAD_PID}").exists()  # readers leave partial folders to writers
    shutil.copytree(store, tmp_path / f"store.old-{DEAD_PID}")  # died before deleting the old one
    assert CubeStore(store).rows == 6 and not (tmp_path / f"store.old-{DEAD_PID}").exists()
    prepare(runs[:1], store, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # the next prepare tidies the rest


def test_read_rows_into_checks_its_buffer(runs, tmp_path):
    prepare(runs[:1], tmp_path / "store", progress=False)
    store = CubeStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.read_rows_into(0, torch.empty((2, *store.row_shape), dtype=torch.float64))
    with pytest.raises(IndexError):
        store.read_rows(5, 2)


def test_input_problem_names_file_and_kind(tmp_path):
    problem = InputProblem(tmp_path / "x.nc", "units", "T has units 'degC', expected 'K'")
    assert str(problem).startswith(str(tmp_path / "x.nc")) and "units" in str(problem)


def test_zarr_layout_is_read_by_xarray_and_loads_like_the_raw_store(runs, tmp_path):
    prepare(runs, tmp_path / "raw", progress=False)
    prepare(runs, tmp_path / "zarr", progress=False, layout="zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xr.open_zarr(tmp_path / "zarr", consolidated=False)
    assert not caught, [str(w.message) for w in caught]  # only Zarr members in the group
    assert set(ds.data_vars) == set(DEFAULT_VARIABLES) and "run" in ds.coords
    source = xr.open_dataset(runs[1])
    np.testing.assert_array_equal(ds["T"].values[6:12], source["T"].values)
    np.testing.assert_array_equal(ds["ps"].values[6:12], source["ps"].values)
    np.testing.assert_allclose(ds["lat"].values, source["lat"].values)
    np.testing.assert_allclose(ds["lev"].values, source["lev"].values)
    assert ds["T"].attrs["standard_name"] == "air_temperature" and ds["T"].attrs["units"] == "K"
    assert ds["run"].values.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    raw, zarr_store = CubeStore(tmp_path / "raw"), CubeStore(tmp_path / "zarr")
    assert not (tmp_path / "zarr" / "frames.f32").exists()
    for a, b in zip(
        CubeLoader(raw, batch_size=4, seed=1), CubeLoader(zarr_store, batch_size=4, seed=1), strict=True
    ):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.run, b.run)
    assert prepare(runs, tmp_path / "zarr", progress=False, layout="zarr").up_to_date
    with pytest.raises(SapwoodError, match="format 'parquet': allowed are raw, zarr"):
        prepare(runs, tmp_path / "other", progress=False, layout="parquet")
