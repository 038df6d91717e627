"""The built-in simulator: CF NetCDF output, the budgets its docstring promises (computed here from the
files with NumPy), dynamics that respond to the mass field, hemispheric asymmetry and a relaxed spin-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from sapwood.constants import GAS_CONSTANT, SPECIFIC_HEAT, VIRTUAL_FACTOR
from sapwood.data.simulate import Grid, PlanetParams, Simulation, sample_planets, simulate_ensemble
from sapwood.errors import SapwoodError

GRID = Grid(levels=3, nlat=8, nlon=16, times=9, spinup_days=3)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return simulate_ensemble(out, runs=3, grid=GRID, seed=3, progress=False)


def budgets(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Global integrals per output time in float64 from a run's file (the formulas of the simulate
    docstring)."""
    g, a, omega = float(ds.gravity), float(ds.planet_radius), float(ds.rotation_rate)
    area = ds.cell_area.values
    dsigma = np.diff(ds.lev_bnds.values, axis=1)[:, 0]
    ps = ds.ps.values.astype(np.float64)
    dp = dsigma[None, :, None, None] * ps[:, None]
    coslat = np.cos(np.radians(ds.lat.values))[None, None, :, None]
    u, v = ds.u.values.astype(np.float64), ds.v.values.astype(np.float64)

    def integral(x: np.ndarray) -> np.ndarray:
        return (x * dp * area).sum(axis=(1, 2, 3)) / g

    return {
        "mass": (ps * area).sum(axis=(1, 2)) / g,
        "water": integral(ds.q.values.astype(np.float64)),
        "energy": integral(SPECIFIC_HEAT * ds.T.values.astype(np.float64) + 0.5 * (u**2 + v**2)),
        "angular_momentum": integral((u + omega * a * coslat) * a * coslat),
        "arm": integral(a * coslat**2),  # d(angular momentum) per m/s of solid-body wind
    }


def relative_steps(series: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(series)) / np.abs(series[1:])


def test_files_are_cf_netcdf_with_planet_parameters(ensemble):
    ds = xr.open_dataset(ensemble[0])
    assert ds.attrs["Conventions"].startswith("CF-")
    for name, units in {
        "T": "K", "u": "m s-1", "v": "m s-1", "q": "kg kg-1", "ps": "Pa", "rho": "kg m-3", "zg": "m",
    }.items():
        assert ds[name].attrs["units"] == units
        assert "standard_name" in ds[name].attrs
    assert ds.T.dims == ("time", "lev", "lat", "lon") and ds.ps.dims == ("time", "lat", "lon")
    assert ds.T.shape == (9, 3, 8, 16)
    assert ds.lev.attrs["standard_name"] == "atmosphere_sigma_coordinate"
    assert ds.heating.attrs["units"] == "W m-2" and ds.torque.attrs["units"] == "N m"
    assert np.all(np.diff(ds.lat.values) > 0) and np.all(np.diff(ds.lon.values) > 0)
    planets = sample_planets(3, seed=3)
    assert float(ds.planet_radius) == planets[0].radius and float(ds.gravity) == planets[0].gravity
    assert all(np.isfinite(ds[v].values).all() for v in ("T", "u", "v", "q", "ps", "rho", "zg"))
    assert float(ds.q.min()) > 0 and float(ds.T.min()) > 50


def test_stored_budgets_hold_to_the_documented_tolerances(ensemble):
    for path in ensemble:
        ds = xr.open_dataset(path)
        b = budgets(ds)
        assert relative_steps(b["mass"]).max() < 1e-6
        assert relative_steps(b["water"]).max() < 1e-6
        area_total = 4 * math.pi * float(ds.planet_radius) ** 2
        dt_out = float((ds.time[1] - ds.time[0]).values / np.timedelta64(1, "s"))
        imbalance = (np.diff(b["energy"]) / dt_out - ds.heating.values[1:] * area_total) / area_total  # W m-2
        assert np.abs(imbalance).max() < 0.05
        assert np.abs(ds.heating.values[1:]).max() > 0.05  # the forcing acts (and dominates the residual)
        momentum = (np.diff(b["angular_momentum"]) - ds.torque.values[1:] * dt_out) / b["arm"][1:]  # m s-1
        assert np.abs(momentum).max() < 1e-3
        assert np.abs(ds.torque.values[1:] * dt_out / b["arm"][1:]).max() > 1e-3  # friction acts


def test_ideal_gas_and_hydrostatic_relations_use_the_virtual_temperature(ensemble):
    ds = xr.open_dataset(ensemble[1])
    temperature, ps, q = (ds[v].values.astype(np.float64) for v in ("T", "ps", "q"))
    virtual = temperature * (1 + VIRTUAL_FACTOR * q)
    sigma, edges = ds.lev.values, ds.lev_bnds.values
    pressure = sigma[None, :, None, None] * ps[:, None]
    assert np.abs(ds.rho.values * GAS_CONSTANT * virtual / pressure - 1).max() < 1e-6
    assert np.abs(ds.rho.values * GAS_CONSTANT * temperature / pressure - 1).max() > 1e-3  # q matters
    thickness = GAS_CONSTANT * virtual / float(ds.gravity)
    zg = ds.zg.values.astype(np.float64)
    # zg_k - zg_{k+1} = (R T_v,k+1/g) ln(sigma_{k+1}/sigma_{k+1/2}) + (R T_v,k/g) ln(sigma_{k+1/2}/sigma_k)
    lower = thickness[:, 1:] * np.log(sigma[1:] / edges[:-1, 1])[None, :, None, None]
    upper = thickness[:, :-1] * np.log(edges[:-1, 1] / sigma[:-1])[None, :, None, None]
    assert np.abs((zg[:, :-1] - zg[:, 1:]) - (lower + upper)).max() / zg.max() < 1e-6
    bottom = thickness[:, -1] * np.log(1.0 / sigma[-1])
    assert np.abs(zg[:, -1] - bottom).max() / zg.max() < 1e-6


def test_float64_integration_closes_budgets_to_round_off():
    sim = Simulation(PlanetParams(), Grid(levels=3, nlat=8, nlon=16, times=3, spinup_days=1), phase=0.2)
    sim.spin_up()
    mass0, water0 = (sim.ps * sim.area).sum(), (sim.humidity * sim.layer_mass()).sum()
    energy0, momentum0 = sim.energy(), sim.angular_momentum()
    heating, torque = sim.advance()
    seconds = GRID.dt_hours * 3600
    area_total = 4 * math.pi * sim.planet.radius**2
    assert abs((sim.ps * sim.area).sum() - mass0) / mass0 < 1e-12
    assert abs((sim.humidity * sim.layer_mass()).sum() - water0) / water0 < 1e-12
    assert abs(sim.energy() - energy0 - heating * seconds * area_total) / energy0 < 1e-12
    assert abs(sim.angular_momentum() - momentum0 - torque * seconds) / momentum0 < 1e-12
    # the fixers are corrections, not the budget: smaller than the declared terms they close
    assert abs(sim.energy_fixes[-1]) < 5 and abs(sim.momentum_fixes[-1]) < 0.05


def test_winds_respond_to_the_mass_field():
    """From rest, a pole-to-equator temperature contrast builds westerly jets in thermal-wind balance: the
    zonal-mean wind increases with height in midlatitudes of both hemispheres."""
    sim = Simulation(PlanetParams(), Grid(levels=3, nlat=8, nlon=16, times=2, spinup_days=4), phase=0.0)
    assert np.abs(sim.u).max() == 0
    sim.spin_up()
    u, _ = sim.centred_winds()
    zonal = u.mean(axis=2)  # [lev, lat]
    mid = [1, 2, 5, 6]  # ~ +-34..56 deg
    assert (zonal[0, mid] > 5).all(), zonal[0]  # top layer westerlies
    assert (zonal[0, mid] > zonal[-1, mid] + 5).all()


def test_season_makes_the_hemispheres_differ(ensemble):
    """Each run starts at a random season: the summer hemisphere is warmer than the winter one."""
    contrasts = []
    for path in ensemble:
        ds = xr.open_dataset(path)
        t = ds.T.values[0].mean(axis=-1)  # [lev, lat]
        contrasts.append(float(np.abs(t - t[:, ::-1]).max()))
        declination = math.sin(float(ds.attrs["season_phase"]))
        north_minus_south = float((t[-1, -2:] - t[-1, :2]).mean())
        if abs(declination) > 0.5:
            assert np.sign(north_minus_south) == np.sign(declination), (declination, north_minus_south)
    assert max(contrasts) > 2.0, contrasts


@pytest.mark.slow
def test_default_spin_up_reaches_the_relaxed_state():
    """The default spin-up (four free-atmosphere relaxation times) leaves the global-mean temperature drifting
    far slower than during the first days after the start from rest."""
    planet = PlanetParams()
    sim = Simulation(planet, Grid(levels=3, nlat=8, nlon=16, times=2), phase=1.0)

    def mean_temperature() -> float:
        mass = sim.layer_mass()
        return float((sim.temperature * mass).sum() / mass.sum())

    start = mean_temperature()
    sim.advance(2 * 86400.0)
    early_drift = abs(mean_temperature() - start) / 2
    sim.spin_up()
    relaxed = mean_temperature()
    sim.advance(2 * 86400.0)
    late_drift = abs(mean_temperature() - relaxed) / 2
    assert sim.spinup_days == pytest.approx(24.0)
    assert late_drift < 0.1 * early_drift, (early_drift, late_drift)


def test_planets_cover_each_parameter_range_evenly():
    planets = sample_planets(20, seed=7)
    radius = np.array([p.radius for p in planets])
    strata = np.floor(20 * np.log(radius / (0.5 * 6.371e6)) / math.log(4)).astype(int)
    assert sorted(strata) == list(
        range(20)
    )  # a Latin hypercube: one planet in each twentieth of the log range
    gravity = np.array([p.gravity for p in planets])
    assert gravity.min() >= 5 and gravity.max() <= 25 and np.ptp(np.log(gravity)) > 0.9 * math.log(5)


def test_same_seed_same_data_and_different_planets(tmp_path):
    grid = Grid(levels=2, nlat=8, nlon=16, times=3, spinup_days=0.5)
    first = simulate_ensemble(tmp_path / "a", runs=2, grid=grid, seed=5, progress=False)
    second = simulate_ensemble(tmp_path / "b", runs=2, grid=grid, seed=5, progress=False)
    a0, b0, a1 = (xr.open_dataset(p) for p in (first[0], second[0], first[1]))
    np.testing.assert_array_equal(a0.T.values, b0.T.values)
    assert float(a0.gravity) != float(a1.gravity)
    assert not (tmp_path / "a" / "run_0000.nc.tmp").exists()


@pytest.mark.parametrize(
    "bad", [{"nlat": 7}, {"nlon": 8}, {"levels": 1}, {"times": 1}, {"dt_hours": 0}, {"spinup_days": -1}]
)
def test_bad_grids_are_refused_with_the_value(bad):
    with pytest.raises(SapwoodError, match=next(iter(bad))):
        Grid(**bad).validate()


def test_cli_simulate_writes_files_and_rejects_bad_sizes(tmp_path, capsys):
    from sapwood.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "simulate", "--out", str(tmp_path), "--runs", "1", "--times", "2", "--levels", "2", "--nlat",
                "8", "--nlon", "16", "--spinup-days", "0.5",
            ]
        )
    assert exit_info.value.code in (0, None)
    assert (tmp_path / "run_0000.nc").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--out", str(tmp_path), "--nlat", "9"])
    assert exit_info.value.code == 2
    assert "nlat=9" in capsys.readouterr().err


def test_truth_passes_sapwood_physics_checks(ensemble):
    import torch

    from sapwood import physics
    from sapwood.config import CubeModelConfig

    ds = xr.open_dataset(ensemble[2])
    variables = ["T", "u", "v", "q", "ps", "rho", "zg"]
    frames = torch.from_numpy(
        np.concatenate([ds[v].values[:, None] if v == "ps" else ds[v].values for v in variables], axis=1)
    )
    names = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]
    params = torch.tensor([[float(ds[n]) for n in names]] * (frames.shape[0] - 1))
    cube = CubeModelConfig(
        levels=GRID.levels, lat=GRID.nlat, lon=GRID.nlon, planet_params=names, dt_hours=GRID.dt_hours
    )
    geometry = physics.Geometry.default(cube)
    heating, torque = torch.from_numpy(ds.heating.values[1:]), torch.from_numpy(ds.torque.values[1:])
    v = physics.violations(frames[:-1], frames[1:], geometry, params, heating, torque)
    assert float(v["mass"].max()) < 0.05  # Pa (float32 ps)
    assert float(v["water"].max()) < 1e-5  # kg m-2
    assert float(v["energy"].max()) < 0.1  # W m-2
    assert float(v["momentum"].max()) < 1e-3  # m s-1
    assert float(v["thermo"].max()) < 1e-3  # %
    # the forcing estimated from the two states alone (no heating/torque data) stays within the goals' range
    estimated = physics.declared_forcing(frames[:-1], frames[1:], geometry, params)
    assert (estimated["heating"] - heating).abs().max() < 1.0  # W m-2
    free = physics.violations(frames[:-1], frames[1:], geometry, params)
    assert float(free["energy"].max()) < 1.0


def test_extreme_catalog_planets_stay_stable():
    """A planet at the far corner of the exoplanet-catalog ranges (4x radius, 4x rotation, 0.1x flux): the
    step resolves the inertial period (f dt < 1), so the run stays finite and positive."""
    earth = PlanetParams()
    planet = PlanetParams(4 * earth.radius, 25.0, 4 * earth.rotation_rate, 0.1 * earth.stellar_flux, 0.5e5)
    sim = Simulation(planet, Grid(levels=3, nlat=8, nlon=16, times=2, spinup_days=3), phase=0.3)
    sim.spin_up()
    assert np.isfinite(sim.u).all() and sim.temperature.min() > 50 and sim.humidity.min() >= 0
    assert sim._stable_step() * 2 * planet.rotation_rate <= 1.0


def test_an_earth_catalog_row_is_the_simulators_earth():
    """The catalog mapping and the simulator take Earth from sapwood.constants: an Earth-like row (1 Earth
    radius, mass and insolation, no rotation period or pressure) gives the simulator's default planet."""
    from dataclasses import asdict

    from sapwood import constants
    from sapwood.data.sources import planets

    row = {"pl_name": "Earth", "pl_rade": "1", "pl_bmasse": "1", "pl_insol": "1"}
    assert planets.planet_from_row(row).values == pytest.approx(asdict(PlanetParams()), rel=1e-12)
    names = {
        "EARTH_RADIUS": "planet_radius", "EARTH_GRAVITY": "gravity", "EARTH_ROTATION": "rotation_rate",
        "EARTH_FLUX": "stellar_flux", "EARTH_PRESSURE": "mean_surface_pressure",
    }
    assert {name: getattr(planets, name) for name in names} == {
        n: constants.EARTH[k] for n, k in names.items()
    }
    assert planets.STEFAN_BOLTZMANN is constants.STEFAN_BOLTZMANN
