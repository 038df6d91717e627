"""The built-in simulator: CF NetCDF output and the budgets its docstring promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sapwood.data.simulate import (
    GAS_CONSTANT,
    SPECIFIC_HEAT,
    Grid,
    PlanetParams,
    Simulation,
    sample_planets,
    simulate_ensemble,
)
from sapwood.errors import SapwoodError

GRID = Grid(levels=4, nlat=16, nlon=32, times=10)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return simulate_ensemble(out, runs=3, grid=GRID, seed=3, progress=False)


def budgets(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Global integrals per output time, in float64, from a run's file (the formulas of the simulate docstring)."""
    g, a, omega = float(ds.gravity), float(ds.planet_radius), float(ds.rotation_rate)
    area = ds.cell_area.values
    dsigma = np.diff(ds.lev_bnds.values, axis=1)[:, 0]
    ps = ds.ps.values.astype(np.float64)
    dp = dsigma[None, :, None, None] * ps[:, None]
    coslat = np.cos(np.radians(ds.lat.values))[None, None, :, None]
    u, v = ds.u.values.astype(np.float64), ds.v.values.astype(np.float64)

    def integral(x: np.ndarray) -> np.ndarray:
        return (x * dp * area).sum(axis=(1, 2, 3)) / g

    enthalpy = SPECIFIC_HEAT * integral(ds.T.values.astype(np.float64))
    return {
        "mass": (ps * area).sum(axis=(1, 2)) / g,
        "water": integral(ds.q.values.astype(np.float64)),
        "enthalpy": enthalpy,
        "energy": enthalpy + integral(0.5 * (u**2 + v**2)),
        "angular_momentum": integral((u + omega * a * coslat) * a * coslat),
    }


def relative_steps(series: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(series)) / np.abs(series[1:])


def test_files_are_cf_netcdf_with_planet_parameters(ensemble):
    ds = xr.open_dataset(ensemble[0])
    assert ds.attrs["Conventions"].startswith("CF-")
    for name, units in {"T": "K", "u": "m s-1", "v": "m s-1", "q": "kg kg-1", "ps": "Pa"}.items():
        assert ds[name].attrs["units"] == units
        assert "standard_name" in ds[name].attrs
    assert ds.T.dims == ("time", "lev", "lat", "lon") and ds.ps.dims == ("time", "lat", "lon")
    assert ds.T.shape == (10, 4, 16, 32)
    assert ds.lev.attrs["standard_name"] == "atmosphere_sigma_coordinate"
    assert np.all(np.diff(ds.lat.values) > 0) and np.all(np.diff(ds.lon.values) > 0)
    planets = sample_planets(3, seed=3)
    assert float(ds.planet_radius) == planets[0].radius and float(ds.gravity) == planets[0].gravity
    assert all(np.isfinite(ds[v].values).all() for v in ("T", "u", "v", "q", "ps", "rho", "zg"))
    assert float(ds.q.min()) > 0 and float(ds.T.min()) > 50


def test_stored_budgets_close_to_documented_tolerances(ensemble):
    for path in ensemble:
        ds = xr.open_dataset(path)
        b = budgets(ds)
        assert relative_steps(b["mass"]).max() < 1e-6
        assert relative_steps(b["water"]).max() < 1e-6
        area_total = 4 * math.pi * float(ds.planet_radius) ** 2
        dt_out = float((ds.time[1] - ds.time[0]).values / np.timedelta64(1, "s"))
        heat_added = ds.heating.values[1:] * dt_out * area_total
        assert (np.abs(np.diff(b["enthalpy"]) - heat_added) / b["enthalpy"][1:]).max() < 1e-6
        assert np.abs(heat_added).max() / b["enthalpy"].max() > 1e-7  # the forcing is really acting
        assert (np.abs(np.diff(b["energy"]) - heat_added) / b["energy"][1:]).max() < 1e-5
        assert relative_steps(b["angular_momentum"]).max() < 1e-3


def test_ideal_gas_and_hydrostatic_relations_hold_in_the_files(ensemble):
    ds = xr.open_dataset(ensemble[1])
    temperature, ps = ds.T.values.astype(np.float64), ds.ps.values.astype(np.float64)
    sigma, edges = ds.lev.values, ds.lev_bnds.values
    pressure = sigma[None, :, None, None] * ps[:, None]
    assert np.abs(ds.rho.values * GAS_CONSTANT * temperature / pressure - 1).max() < 1e-6
    thickness = GAS_CONSTANT * temperature / float(ds.gravity)
    zg = ds.zg.values.astype(np.float64)
    # zg_k - zg_{k+1} = (R T_{k+1}/g) ln(sigma_{k+1}/sigma_{k+1/2}) + (R T_k/g) ln(sigma_{k+1/2}/sigma_k)
    lower = thickness[:, 1:] * np.log(sigma[1:] / edges[:-1, 1])[None, :, None, None]
    upper = thickness[:, :-1] * np.log(edges[:-1, 1] / sigma[:-1])[None, :, None, None]
    assert np.abs((zg[:, :-1] - zg[:, 1:]) - (lower + upper)).max() / zg.max() < 1e-6
    bottom = thickness[:, -1] * np.log(1.0 / sigma[-1])
    assert np.abs(zg[:, -1] - bottom).max() / zg.max() < 1e-6


def test_float64_integration_conserves_to_round_off():
    sim = Simulation(PlanetParams(), Grid(levels=4, nlat=16, nlon=32, times=3), phase=0.2)

    def totals() -> tuple[float, float, np.ndarray]:
        dp = sim.dsigma[:, None, None] * sim.ps[None]
        u, v = sim.winds(sim.time)
        kinetic_by_layer = (0.5 * (u**2 + v**2) * sim.area[None]).sum(axis=(1, 2))
        return (sim.ps * sim.area).sum(), (sim.humidity * dp * sim.area).sum(), kinetic_by_layer

    mass0, water0, kinetic0 = totals()
    for _ in range(3):
        sim.advance()
    mass1, water1, kinetic1 = totals()
    assert abs(mass1 - mass0) / mass0 < 1e-12
    assert abs(water1 - water0) / water0 < 1e-12
    np.testing.assert_allclose(kinetic1, kinetic0, rtol=1e-12)  # Rossby-Haurwitz invariant per layer
    east, north = sim.face_fluxes(sim.time)
    divergence = east - np.roll(east, 1, axis=2) + north[:, 1:] - north[:, :-1]
    assert np.abs(divergence).max() < 1e-9 * np.abs(east).max()


def test_same_seed_same_data_and_different_planets(tmp_path):
    grid = Grid(levels=2, nlat=8, nlon=16, times=3)
    first = simulate_ensemble(tmp_path / "a", runs=2, grid=grid, seed=5, progress=False)
    second = simulate_ensemble(tmp_path / "b", runs=2, grid=grid, seed=5, progress=False)
    a0, b0, a1 = (xr.open_dataset(p) for p in (first[0], second[0], first[1]))
    np.testing.assert_array_equal(a0.T.values, b0.T.values)
    assert float(a0.gravity) != float(a1.gravity)
    assert not (tmp_path / "a" / "run_0000.nc.tmp").exists()


@pytest.mark.parametrize("bad", [{"nlat": 7}, {"nlon": 8}, {"levels": 1}, {"times": 1}, {"dt_hours": 0}])
def test_bad_grids_are_refused_with_the_value(bad):
    with pytest.raises(SapwoodError, match=next(iter(bad))):
        Grid(**bad).validate()


def test_cli_simulate_writes_files_and_rejects_bad_sizes(tmp_path, capsys):
    from sapwood.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--out", str(tmp_path), "--runs", "1", "--times", "2", "--levels", "2",
              "--nlat", "8", "--nlon", "16"])
    assert exit_info.value.code in (0, None)
    assert (tmp_path / "run_0000.nc").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--out", str(tmp_path), "--nlat", "9"])
    assert exit_info.value.code == 2
    assert "nlat=9" in capsys.readouterr().err


def test_truth_passes_sapwood_physics_checks(ensemble):
    physics = pytest.importorskip("sapwood.physics")
    import torch

    from sapwood.config import CubeModelConfig

    ds = xr.open_dataset(ensemble[2])
    variables = ["T", "u", "v", "q", "ps", "rho", "zg"]
    frames = torch.from_numpy(np.concatenate(
        [ds[v].values[:, None] if v == "ps" else ds[v].values for v in variables], axis=1))
    names = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]
    params = torch.tensor([[float(ds[n]) for n in names]] * (frames.shape[0] - 1))
    cube = CubeModelConfig(levels=GRID.levels, lat=GRID.nlat, lon=GRID.nlon, planet_params=names,
                           dt_hours=GRID.dt_hours)
    geometry = physics.Geometry.default(cube)
    heating = torch.from_numpy(ds.heating.values[1:])
    v = physics.violations(frames[:-1], frames[1:], geometry, params, heating)
    assert float(v["mass"].max()) < 1e-4  # percent
    assert float(v["water"].max()) < 1e-4
    assert float(v["energy"].max()) < 1e-3
    assert float(v["momentum"].max()) < 1e-3
    assert float(v["thermo"].max()) < 1e-3
