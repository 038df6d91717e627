"""CF-convention ingest of the common file families, each written here from the CF conventions with xarray
(not by sapwood's writer): prepare -> read back exactly -> train a few steps -> eval without a traceback."""

from __future__ import annotations

import json

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from sapwood.cli import main
from sapwood.data.cubes import prepare
from sapwood.data.store import CubeStore
from sapwood.evaluate import evaluate_surrogate
from sapwood.train.cube_task import physics_support, surrogate_config
from sapwood.train.loop import train


def smooth_field(times: int, *shape: int, base: float = 0.0, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """A field that moves slowly in time (so one-step prediction is meaningful), with seeded noise."""
    rng = np.random.default_rng([seed, times, *shape])
    phase = np.linspace(0, 2 * np.pi, shape[-1], endpoint=False)
    rows = np.linspace(0, np.pi, shape[-2])
    out = np.empty((times, *shape))
    for t in range(times):
        wave = np.sin(phase[None, :] - 0.3 * t) * np.cos(rows[:, None])
        out[t] = base + scale * (wave + 0.05 * rng.standard_normal(shape))
    return out


# --- the families -------------------------------------------------------------------------------------------
def era5_like(path, times: int = 12) -> xr.Dataset:
    """ERA5-like: descending latitude including the poles, pressure levels 1000 -> 250 (millibars, no
    standard_name), int16 packing with scale_factor/add_offset and a _FillValue, hourly-based time units."""
    lat = np.linspace(90, -90, 9)
    lon = np.arange(0, 360, 22.5)
    level = np.asarray([1000, 850, 500, 250], dtype=np.int32)
    ds = xr.Dataset(
        {
            "t": (
                ("time", "level", "latitude", "longitude"),
                smooth_field(times, 4, 9, 16, base=260, scale=15),
                {"units": "K", "long_name": "Temperature", "standard_name": "air_temperature"},
            ),
            "u": (
                ("time", "level", "latitude", "longitude"),
                smooth_field(times, 4, 9, 16, base=5, scale=10),
                {"units": "m s**-1", "standard_name": "eastward_wind"},
            ),
            "sp": (
                ("time", "latitude", "longitude"),
                smooth_field(times, 9, 16, base=98000, scale=900),
                {"units": "Pa", "standard_name": "surface_air_pressure", "long_name": "Surface pressure"},
            ),
        },
        coords={
            "time": (
                "time",
                1_000_000 + 6 * np.arange(times),
                {"units": "hours since 1900-01-01 00:00:00.0", "calendar": "gregorian", "long_name": "time"},
            ),
            "level": ("level", level, {"units": "millibars", "long_name": "pressure_level"}),
            "latitude": ("latitude", lat, {"units": "degrees_north", "long_name": "latitude"}),
            "longitude": ("longitude", lon, {"units": "degrees_east", "long_name": "longitude"}),
        },
        attrs={"Conventions": "CF-1.6"},
    )
    encoding = {
        name: {
            "dtype": "int16", "scale_factor": float(np.ptp(ds[name].values) / 60000),
            "add_offset": float(ds[name].values.mean()), "_FillValue": np.int16(-32767),
        }
        for name in ("t", "u", "sp")
    }
    encoding["time"] = {"dtype": "int32"}
    ds.to_netcdf(path, encoding=encoding)
    return ds


def cmip6_like(folder, member: str = "r1i1p1f1", months: int = 24, offset: float = 0.0) -> xr.Dataset:
    """CMIP6-like Amon output: plev in Pa descending with bounds, lat/lon bounds, a cell_measures area,
    noleap monthly times with time bounds, identity attributes."""
    lat_edges = np.linspace(-90, 90, 9)
    lon_edges = np.linspace(0, 360, 17)
    lat = (lat_edges[1:] + lat_edges[:-1]) / 2
    lon = (lon_edges[1:] + lon_edges[:-1]) / 2
    plev = np.asarray([100000.0, 85000.0, 50000.0, 25000.0])
    days = np.cumsum([0] + [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] * (months // 12 + 1))[
        : months + 1
    ]
    mid = (days[1:] + days[:-1]) / 2
    band = np.abs(np.diff(np.sin(np.deg2rad(lat_edges))))
    area = 6.371e6**2 * np.deg2rad(22.5) * band[:, None] * np.ones(16)[None]
    season = np.sin(2 * np.pi * np.arange(months) / 12)[:, None, None, None]
    seed = int(member[1])
    ta = smooth_field(months, 4, 8, 16, base=250, scale=8, seed=seed) + 10 * season + offset
    ds = xr.Dataset(
        {
            "ta": (
                ("time", "plev", "lat", "lon"),
                ta,
                {"standard_name": "air_temperature", "units": "K", "cell_measures": "area: areacella"},
            ),
            "ua": (
                ("time", "plev", "lat", "lon"),
                smooth_field(months, 4, 8, 16, base=3, scale=6, seed=seed) + offset,
                {"standard_name": "eastward_wind", "units": "m s-1"},
            ),
            "ps": (
                ("time", "lat", "lon"),
                smooth_field(months, 8, 16, base=100000, scale=500, seed=seed) + 100 * season[:, 0] + offset,
                {"standard_name": "surface_air_pressure", "units": "Pa"},
            ),
            "areacella": (("lat", "lon"), area, {"standard_name": "cell_area", "units": "m2"}),
            "time_bnds": (("time", "bnds"), np.stack([days[:-1], days[1:]], 1)),
            "lat_bnds": (("lat", "bnds"), np.stack([lat_edges[:-1], lat_edges[1:]], 1)),
            "lon_bnds": (("lon", "bnds"), np.stack([lon_edges[:-1], lon_edges[1:]], 1)),
            "plev_bnds": (("plev", "bnds"), np.stack([plev + 5000, plev - 5000], 1)),
        },
        coords={
            "time": (
                "time",
                mid,
                {
                    "units": "days since 1850-01-01", "calendar": "noleap", "axis": "T",
                    "standard_name": "time", "bounds": "time_bnds",
                },
            ),
            "plev": (
                "plev",
                plev,
                {
                    "units": "Pa", "axis": "Z", "positive": "down", "standard_name": "air_pressure",
                    "bounds": "plev_bnds",
                },
            ),
            "lat": (
                "lat",
                lat,
                {"units": "degrees_north", "axis": "Y", "standard_name": "latitude", "bounds": "lat_bnds"},
            ),
            "lon": (
                "lon",
                lon,
                {"units": "degrees_east", "axis": "X", "standard_name": "longitude", "bounds": "lon_bnds"},
            ),
        },
        attrs={
            "Conventions": "CF-1.7 CMIP-6.2", "source_id": "TOY", "experiment_id": "historical",
            "variant_label": member,
        },
    )
    ds.to_netcdf(
        folder / f"Amon_TOY_historical_{member}_gn_185001-{1850 + months // 12 - 1}12.nc",
        encoding={"time": {"dtype": "float64"}},
    )
    return ds


def regional_360_day(path, days: int = 12) -> xr.Dataset:
    """Regional model output: 360_day calendar, coordinates named latitude/longitude on dims y/x, longitudes
    in -180..180, 2-D variables only, no bounds."""
    lat = np.linspace(30, 60, 7)
    lon = np.linspace(-20, 40, 10)
    ds = xr.Dataset(
        {
            "tas": (
                ("time", "y", "x"),
                smooth_field(days, 7, 10, base=285, scale=5),
                {"standard_name": "air_temperature", "units": "K"},
            ),
            "pr": (
                ("time", "y", "x"),
                np.abs(smooth_field(days, 7, 10, base=0, scale=3e-5)),
                {"standard_name": "precipitation_flux", "units": "kg m-2 s-1"},
            ),
        },
        coords={
            "time": (
                "time",
                np.arange(days) + 0.5,
                {"units": "days since 1981-01-01", "calendar": "360_day", "standard_name": "time"},
            ),
            "latitude": ("y", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "longitude": ("x", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )
    ds.to_netcdf(path)
    return ds


def ocean_monthly_files(folder, months: int = 12, skip: int | None = None) -> xr.Dataset:
    """Ocean output split one file per month (singleton time_counter), NaN over land in thetao/tos and a
    missing_value of 1e20 in so, depth levels positive down."""
    lat = np.linspace(-60, 60, 6)
    lon = np.arange(0, 360, 30.0)
    depth = np.asarray([5.0, 50.0, 200.0])
    land = np.zeros((3, 6, 12), dtype=bool)
    land[:, 2:4, 3:6] = True  # a continent
    land[2, :, 8] = True  # a ridge reaching up to the deepest level only
    thetao = np.where(land[None], np.nan, smooth_field(months, 3, 6, 12, base=12, scale=4))
    tos = np.where(land[0][None], np.nan, smooth_field(months, 6, 12, base=18, scale=5))
    so = np.where(land[None], 1e20, smooth_field(months, 3, 6, 12, base=35, scale=0.5))
    whole = xr.Dataset(
        {
            "thetao": (
                ("time_counter", "deptht", "y", "x"),
                thetao,
                {"standard_name": "sea_water_potential_temperature", "units": "degC"},
            ),
            "tos": (
                ("time_counter", "y", "x"),
                tos,
                {"standard_name": "sea_surface_temperature", "units": "degC"},
            ),
            "so": (
                ("time_counter", "deptht", "y", "x"),
                so,
                {"standard_name": "sea_water_salinity", "units": "0.001"},
            ),
        },
        coords={
            "time_counter": (
                "time_counter",
                15.0 + 30.4 * np.arange(months),
                {"units": "days since 2000-01-01 00:00:00", "calendar": "gregorian", "axis": "T"},
            ),
            "deptht": ("deptht", depth, {"units": "m", "positive": "down", "axis": "Z"}),
            "nav_lat": ("y", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "nav_lon": ("x", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )
    for month in range(months):
        if month == skip:
            continue
        one = whole.isel(time_counter=[month])
        encoding = {"so": {"_FillValue": None, "missing_value": 1e20}, "time_counter": {"dtype": "float64"}}
        one.to_netcdf(folder / f"ocean_1m_2000{month + 1:02d}.nc", encoding=encoding)
    return whole


def curvilinear(path, times: int = 10) -> xr.Dataset:
    """A curvilinear (rotated) grid: 2-D latitude/longitude on dims (j, i), height levels positive up given
    bottom-up, no bounds or cell measures."""
    j, i = np.meshgrid(np.arange(6), np.arange(9), indexing="ij")
    lat = 40 + 3 * j + 0.8 * i
    lon = -10 + 4 * i - 1.2 * j
    height = np.asarray([10.0, 1000.0, 3000.0])
    ds = xr.Dataset(
        {
            "tas": (
                ("time", "j", "i"),
                smooth_field(times, 6, 9, base=280, scale=3),
                {"standard_name": "air_temperature", "units": "K", "coordinates": "lat lon"},
            ),
            "ta": (
                ("time", "height", "j", "i"),
                smooth_field(times, 3, 6, 9, base=270, scale=3),
                {"standard_name": "air_temperature", "units": "K", "coordinates": "lat lon"},
            ),
        },
        coords={
            "time": (
                "time",
                np.arange(times) * 3.0,
                {"units": "hours since 2020-06-01", "calendar": "standard"},
            ),
            "height": ("height", height, {"units": "m", "positive": "up", "axis": "Z"}),
            "lat": (("j", "i"), lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": (("j", "i"), lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )
    ds.to_netcdf(path)
    return ds


def train_and_eval(store, tmp_path, val_runs: int = 0, holdout_time: float = 0.25) -> dict:
    config = surrogate_config(
        store, tmp_path / "run", steps=4, hidden=32, layers=1, heads=2, patch=4, batch_size=2,
        val_runs=val_runs, holdout_time=holdout_time,
    )
    summary = train(config)
    assert np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])
    result = evaluate_surrogate(summary["final"], store, tmp_path / "eval", rollout_steps=2)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("rmse", "acc", "rmse_persistence", "rmse_climatology", "constraints", "definitions"):
        assert key in saved
    assert all(np.isfinite(v) for v in result["rmse"].values())
    assert set(result["definitions"]) >= {
        k for k in result if k not in ("checkpoint", "store", "grid", "definitions")
    }
    return result


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the tests ----------------------------------------------------------------------------------------------
def test_era5_like_packed_descending(tmp_path):
    path = tmp_path / "era5.nc"
    era5_like(path)
    report = prepare([path], tmp_path / "store", progress=False)
    assert report.variables == ["t", "u", "sp"] and not report.problems, report.summary()
    assert any("latitude was descending" in n for n in report.notes)
    assert any("reversed to top-down" in n for n in report.notes)
    store = CubeStore(tmp_path / "store")
    assert store.levels.tolist() == [250, 500, 850, 1000] and store.lat[0] == -90
    with netCDF4.Dataset(path) as nc:  # the packed integers, decoded here by hand
        nc.set_auto_maskandscale(False)
        raw = nc["t"][:].astype(np.float64)
        decoded = raw * nc["t"].scale_factor + nc["t"].add_offset
        raw_sp = nc["sp"][:].astype(np.float64) * nc["sp"].scale_factor + nc["sp"].add_offset
    frames = store.memmap()
    np.testing.assert_allclose(
        frames[:, store.channel_slice("t")], decoded[:, ::-1, ::-1].astype(np.float32), rtol=1e-6
    )
    np.testing.assert_allclose(
        frames[:, store.channel_slice("sp")][:, 0], raw_sp[:, ::-1].astype(np.float32), rtol=1e-6
    )
    by_standard_name = prepare([path], tmp_path / "store2", ("air_temperature", "sp"), progress=False)
    assert by_standard_name.variables == ["t", "sp"]
    result = train_and_eval(tmp_path / "store", tmp_path)
    assert result["held_out"]["windows"] == [[0, 9, 12]]
    assert result["constraints"]["mass"].startswith(
        "skipped: the budgets need sigma levels"
    )  # pressure levels
    assert result["baselines"]["advective_persistence"] == "applied"


def test_cmip6_like_noleap_bounds_and_cell_measures(tmp_path):
    folder = tmp_path / "cmip"
    folder.mkdir()
    for member in ("r1i1p1f1", "r2i1p1f1", "r3i1p1f1"):
        cmip6_like(folder, member)
    report = prepare([folder], tmp_path / "store", progress=False)
    assert report.variables == ["ta", "ua", "ps"] and report.runs == 3, report.summary()
    assert {"areacella", "time_bnds", "lat_bnds"} <= set(report.left_out)
    store = CubeStore(tmp_path / "store")
    assert store.levels.tolist() == [25000, 50000, 85000, 100000]
    assert store.index["grid"]["area_source"] == "cell_measures" and store.global_grid
    assert store.index["runs"][0]["calendar"] == "noleap" and store.index["runs"][0]["monthly"]
    ds = xr.open_dataset(sorted(folder.iterdir())[1])
    np.testing.assert_allclose(store.area, ds.areacella.values / ds.areacella.values.mean(), rtol=1e-12)
    first = int(store.run_rows[1])
    np.testing.assert_array_equal(
        store.read_rows(first, 24)[:, store.channel_slice("ta")].numpy(),
        ds.ta.values[:, ::-1].astype(np.float32),
    )
    result = train_and_eval(tmp_path / "store", tmp_path, val_runs=1, holdout_time=0.25)
    assert result["held_out_runs"] == [2] and result["climatology"]["key"] == "calendar month"
    assert result["climatology"]["fallback_lookups"] == 0  # 18 training months cover every month
    assert "final_part_of_training_runs" in result["groups"]


def test_regional_360_day_two_dimensional(tmp_path):
    regional_360_day(tmp_path / "regional.nc")
    report = prepare([tmp_path / "regional.nc"], tmp_path / "store", progress=False)
    assert report.variables == ["tas", "pr"], report.summary()
    store = CubeStore(tmp_path / "store")
    assert not store.global_grid and store.index["grid"]["area_source"] == "cos(lat)"
    assert store.index["grid"]["lon_convention"] == "-180..180" and store.lon[0] == -20
    assert store.index["runs"][0]["calendar"] == "360_day" and store.levels.size == 0
    expected = np.cos(np.deg2rad(np.linspace(30, 60, 7)))
    np.testing.assert_allclose(store.area[:, 0], expected / expected.mean(), rtol=1e-12)
    xr.open_dataset(tmp_path / "regional.nc").to_netcdf(tmp_path / "classic.nc", format="NETCDF3_CLASSIC")
    prepare([tmp_path / "classic.nc"], tmp_path / "classic-store", progress=False)  # NetCDF3 reads the same
    np.testing.assert_array_equal(CubeStore(tmp_path / "classic-store").memmap(), store.memmap())
    result = train_and_eval(tmp_path / "store", tmp_path)  # 7x10 grid padded to 8x12 inside the model
    assert all(v.startswith("skipped") for v in result["constraints"].values())
    assert result["baselines"]["advective_persistence"].startswith("skipped")


def test_ocean_mask_monthly_files_gap_and_overlap(tmp_path):
    folder = tmp_path / "ocean"
    folder.mkdir()
    whole = ocean_monthly_files(folder, months=12)
    report = prepare([folder], tmp_path / "store", progress=False)
    assert report.runs == 1 and report.rows == 12 and not report.problems, report.summary()
    store = CubeStore(tmp_path / "store")
    valid = store.valid
    thetao = store.channel_slice("thetao")
    np.testing.assert_array_equal(valid[thetao], ~np.isnan(whole.thetao.values[0]))
    np.testing.assert_array_equal(valid[store.channel_slice("so")], whole.so.values[0] < 1e19)
    frames = store.memmap()
    truth = whole.tos.values.astype(np.float32)
    ok = ~np.isnan(truth)
    np.testing.assert_array_equal(frames[:, store.channel_slice("tos")][:, 0][ok], truth[ok])
    assert np.all(frames[:, store.channel_slice("tos")][:, 0][~ok] == 0)
    assert store.index["mask"]["thetao"]["masked_cells"] == int(np.isnan(whole.thetao.values[0]).sum())
    prepare(
        [folder], tmp_path / "zarr-store", progress=False, layout="zarr"
    )  # masked cells are NaN for xarray
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "zarr-store", consolidated=False).tos.values, truth)
    np.testing.assert_array_equal(CubeStore(tmp_path / "zarr-store").read_rows(0, 12).numpy(), frames)
    result = train_and_eval(tmp_path / "store", tmp_path, holdout_time=0.34)
    # persistence RMSE of tos over the held-out months, computed here with numpy straight from the files
    lat = np.deg2rad(np.linspace(-60, 60, 6))
    area = np.cos(lat)[:, None] * np.ones(12)[None]
    start, stop = result["held_out"]["windows"][0][1:]
    errors = []
    for t in range(start, stop - 1):
        weight = area * ok[0]
        diff = np.nan_to_num(truth[t] - truth[t + 1])
        errors.append((weight * diff**2).sum() / weight.sum())
    assert result["rmse_persistence"]["tos"] == pytest.approx(np.sqrt(np.mean(errors)), rel=1e-5)

    gap = tmp_path / "gap"
    gap.mkdir()
    ocean_monthly_files(gap, months=12, skip=6)
    report = prepare([gap], tmp_path / "gap-store", progress=False)
    assert report.runs == 2 and any("gap: 1 missing steps" in n and "200008" in n for n in report.notes)

    overlap = tmp_path / "overlap"
    overlap.mkdir()
    for name, months in (
        ("ocean_1m_200001-200006.nc", slice(0, 6)),
        ("ocean_1m_200005-200012.nc", slice(4, 12)),
    ):
        whole.isel(time_counter=months).to_netcdf(overlap / name)
    report = prepare([overlap], tmp_path / "overlap-store", progress=False)
    assert report.runs == 1 and report.rows == 12
    assert any("overlap: first 2 times already in ocean_1m_200001-200006.nc" in n for n in report.notes)


def test_curvilinear_grid_carried_or_refused(tmp_path):
    curvilinear(tmp_path / "curv.nc")
    report = prepare([tmp_path / "curv.nc"], tmp_path / "store", progress=False)
    assert report.variables == ["tas", "ta"] and not report.problems, report.summary()
    store = CubeStore(tmp_path / "store")
    assert store.curvilinear and store.index["grid"]["area_source"] == "jacobian"
    assert store.levels.tolist() == [3000, 1000, 10]  # height positive up: top-down is descending
    np.testing.assert_array_equal(
        store.memmap()[:, store.channel_slice("ta")],
        xr.open_dataset(tmp_path / "curv.nc").ta.values[:, ::-1].astype(np.float32),
    )
    assert store.area.shape == (6, 9) and abs(store.area.mean() - 1) < 1e-12
    train_and_eval(tmp_path / "store", tmp_path)

    folded = xr.open_dataset(tmp_path / "curv.nc").load()
    folded["lat"][:] = 45.0
    folded.to_netcdf(tmp_path / "folded.nc")
    report = prepare([tmp_path / "folded.nc", tmp_path / "curv.nc"], tmp_path / "store2", progress=False)
    (problem,) = report.problems
    assert problem.path.name == "folded.nc" and problem.kind == "coordinates"
    assert "curvilinear grid" in problem.detail and "\n" not in str(problem)


def test_odd_attributes_are_named_problems_not_tracebacks(tmp_path, capsys):
    regional_360_day(tmp_path / "good.nc")
    edits = {
        "calendar.nc": lambda ds: ds["time"].setncattr("calendar", "martian"),
        "units.nc": lambda ds: ds["time"].setncattr("units", "days since the beginning"),
        "scale.nc": lambda ds: ds["tas"].setncattr("scale_factor", "large"),
    }
    for name, edit in edits.items():
        regional_360_day(tmp_path / name)
        with netCDF4.Dataset(tmp_path / name, "a") as ds:
            edit(ds)
    report = prepare(sorted(tmp_path.glob("*.nc")), tmp_path / "store", progress=False)
    assert sorted(p.path.name for p in report.problems) == sorted(edits)
    assert [p.name for p in report.used] == ["good.nc"]
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "calendar.nc"), "--out", str(tmp_path / "store3")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "calendar.nc" in err and "Traceback" not in err


def test_store_grid_checked_against_checkpoint(tmp_path, capsys):
    folder = tmp_path / "cmip"
    folder.mkdir()
    cmip6_like(folder, months=12)
    prepare([folder], tmp_path / "store", progress=False)
    config = surrogate_config(
        tmp_path / "store", tmp_path / "run", steps=1, hidden=32, layers=1, heads=2, batch_size=2, val_runs=0,
        holdout_time=0.25,
    )
    final = train(config)["final"]
    other = xr.open_dataset(next(folder.iterdir())).load()
    other = other.assign_coords(lat=other.lat + 1.0)
    other.to_netcdf(tmp_path / "shifted.nc")
    prepare([tmp_path / "shifted.nc"], tmp_path / "shifted-store", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(final), "--data", str(tmp_path / "shifted-store")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "lat [-78.75 .. 78.75]" in err and "lat [-77.75 .. 79.75]" in err  # both grids named
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(final), "--data", str(tmp_path / "store"), "--holdout-time", "0.5"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--holdout-time 0.5 would score frames the model trained on" in err


def test_physics_support_names_what_is_missing(tmp_path):
    folder = tmp_path / "cmip"
    folder.mkdir()
    cmip6_like(folder, months=12)
    prepare([folder], tmp_path / "store", progress=False)
    config = surrogate_config(tmp_path / "store", tmp_path / "run", steps=1)
    from sapwood.train.cube_task import fill_from_store

    fill_from_store(config.cube, CubeStore(tmp_path / "store"))
    support = physics_support(config.cube)
    assert (
        support["mass"]
        == "skipped: the budgets need sigma levels (atmosphere_sigma_coordinate); the levels are air_pressure"
    )


def test_physics_finds_its_variables_by_standard_name(tmp_path):
    from sapwood.config import CubeModelConfig
    from sapwood.data.simulate import Grid, simulate_ensemble
    from sapwood.physics import violations
    from sapwood.train.cube_task import fill_from_store, store_geometry

    (run,) = simulate_ensemble(
        tmp_path / "sim", runs=1, grid=Grid(levels=3, nlat=8, nlon=16, times=3, spinup_days=1), seed=2,
        progress=False,
    )
    names = {"T": "ta", "u": "ua", "v": "va", "q": "hus", "ps": "sp", "rho": "rhoa", "zg": "geoh"}
    xr.open_dataset(run, decode_times=False).rename(names).to_netcdf(tmp_path / "renamed.nc")
    reports = {}
    for label, path in (("simulator", run), ("renamed", tmp_path / "renamed.nc")):
        prepare([path], tmp_path / label, progress=False)
        cube = CubeModelConfig(data=str(tmp_path / label))
        store = CubeStore(tmp_path / label)
        fill_from_store(cube, store)
        assert set(physics_support(cube).values()) == {"applied"}, physics_support(cube)
        frames = store.read_rows(0, 3)
        reports[label] = violations(
            frames[:-1], frames[1:], store_geometry(cube),
            torch.as_tensor(store.params[:1], dtype=torch.float32).expand(2, -1),
        )
    assert CubeStore(tmp_path / "renamed").index["variables"][0]["name"] == "ta"
    for key, value in reports["simulator"].items():
        torch.testing.assert_close(reports["renamed"][key], value)
