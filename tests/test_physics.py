"""sapwood.physics against direct NumPy computations of the documented budgets on known states: every metric
reports exactly the violation put in, in its physical unit."""

import math

import numpy as np
import pytest
import torch

from sapwood.config import CubeModelConfig, PhysicsLossConfig
from sapwood.constants import GAS_CONSTANT, SPECIFIC_HEAT, VIRTUAL_FACTOR
from sapwood.physics import (
    LOSS_GOALS,
    Geometry,
    budgets,
    declared_forcing,
    physics_loss,
    project,
    thermo_residuals,
    violations,
)

PARAMS = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]
PLANET = [4.1e6, 7.3, 1.1e-4, 1200.0, 1.4e5]
LEVELS, NLAT, NLON = 4, 12, 24
ZERO = torch.zeros(3, dtype=torch.float64)


def grid() -> dict[str, np.ndarray]:
    """The simulator's grid, written out from its definition (uniform sigma layers and latitude cells)."""
    edges = np.linspace(-np.pi / 2, np.pi / 2, NLAT + 1)
    sigma_edges = np.arange(LEVELS + 1) / LEVELS
    return {
        "lat": 0.5 * (edges[1:] + edges[:-1]), "weight": (2 * np.pi / NLON) * np.diff(np.sin(edges)),
        "sigma": 0.5 * (sigma_edges[1:] + sigma_edges[:-1]), "sigma_edges": sigma_edges,
        "dsigma": np.diff(sigma_edges), "lon": np.arange(NLON) * 2 * np.pi / NLON,
    }


def hydrostatic_numpy(temperature_v: np.ndarray, g: float) -> np.ndarray:
    """zg_k = sum_{m>k} (R T_v,m / g) ln(s_{m+1/2}/s_{m-1/2}) + (R T_v,k / g) ln(s_{k+1/2}/s_k), flat
    surface."""
    geo = grid()
    s, e = geo["sigma"], geo["sigma_edges"]
    zg = np.zeros_like(temperature_v)
    for k in range(LEVELS):
        zg[:, k] = GAS_CONSTANT * temperature_v[:, k] / g * np.log(e[k + 1] / s[k])
        for m in range(k + 1, LEVELS):
            zg[:, k] += GAS_CONSTANT * temperature_v[:, m] / g * np.log(e[m + 1] / e[m])
    return zg


def known_states(samples: int = 3, seed: int = 0) -> np.ndarray:
    """Consistent moist states ``[samples, C, lat, lon]`` (float64): smooth T, q, u, v, ps with noise, rho and
    zg from the ideal gas and hydrostatics with the virtual temperature."""
    rng = np.random.default_rng(seed)
    geo = grid()
    lat, lon, sigma = (
        geo["lat"][None, None, :, None],
        geo["lon"][None, None, None, :],
        geo["sigma"][None, :, None, None],
    )
    shape = (samples, LEVELS, NLAT, NLON)
    temperature = (220 + 70 * np.cos(lat) ** 2) * sigma**0.2 + rng.normal(0, 2, shape)
    q = 0.014 * sigma**3 * np.cos(lat) ** 2 * np.exp(rng.normal(0, 0.1, shape))
    u = 25 * np.cos(lat) * np.sin(2 * lat) ** 2 + rng.normal(0, 3, shape) + 0 * lon
    v = rng.normal(0, 2, shape)
    ps = PLANET[4] * (1 + 0.01 * np.cos(2 * lat[:, 0]) + rng.normal(0, 0.002, (samples, NLAT, NLON)))
    temperature_v = temperature * (1 + VIRTUAL_FACTOR * q)
    rho = sigma * ps[:, None] / (GAS_CONSTANT * temperature_v)
    zg = hydrostatic_numpy(temperature_v, PLANET[1])
    return np.concatenate([temperature, u, v, q, ps[:, None], rho, zg], axis=1)


@pytest.fixture(scope="module")
def setup():
    cube = CubeModelConfig(levels=LEVELS, lat=NLAT, lon=NLON, planet_params=PARAMS)
    params = torch.tensor([PLANET] * 3, dtype=torch.float64)
    return cube, Geometry.default(cube), params


def channels(cube: CubeModelConfig, name: str) -> slice:
    return cube.channel_slice(name)


def test_global_mean_ps_drift_is_reported_in_pa_exactly(setup):
    cube, geometry, params = setup
    x = torch.from_numpy(known_states())
    for drift in (7.5, -40.0, 0.5):
        y = x.clone()
        y[:, channels(cube, "ps")] += drift
        v = violations(x, y, geometry, params, ZERO, ZERO)
        torch.testing.assert_close(
            v["mass_pa"], torch.full((3,), drift, dtype=torch.float32), atol=0.02, rtol=0
        )
        torch.testing.assert_close(
            v["mass"], torch.full((3,), abs(drift), dtype=torch.float32), atol=0.02, rtol=0
        )
        torch.testing.assert_close(
            v["ps_change"], torch.full((3,), abs(drift), dtype=torch.float32), atol=0.02, rtol=0
        )
    # a drift that redistributes mass without changing the mean is no mass violation, but a large ps change
    y = x.clone()
    y[:, channels(cube, "ps"), : NLAT // 2] += 100.0
    y[:, channels(cube, "ps"), NLAT // 2 :] -= 100.0
    v = violations(x, y, geometry, params, ZERO, ZERO)
    assert float(v["mass"].max()) < 0.02 and float(v["ps_change"].min()) > 99


def test_angular_momentum_equals_a_direct_numpy_computation(setup):
    cube, geometry, params = setup
    x = known_states()
    geo = grid()
    a, g, omega = PLANET[0], PLANET[1], PLANET[2]
    u, ps = x[:, channels(cube, "u")], x[:, channels(cube, "ps")][:, 0]
    area = a * a * geo["weight"][:, None]  # per cell, m2
    dp = geo["dsigma"][None, :, None, None] * ps[:, None]
    arm = a * np.cos(geo["lat"])[None, None, :, None]
    total = ((u + omega * arm) * arm * dp * area).sum(axis=(1, 2, 3)) / g  # kg m2 s-1
    got = budgets(torch.from_numpy(x), geometry, params)["momentum"].double() * 4 * math.pi * a * a
    np.testing.assert_allclose(got.numpy(), total, rtol=2e-6)
    # the relative part alone is ~1e-2 of the total here: check it separately so Omega a cos(phi) cannot hide
    # it
    relative = (u * arm * dp * area).sum(axis=(1, 2, 3)) / g
    planetary = ((omega * arm) * arm * dp * area).sum(axis=(1, 2, 3)) / g
    np.testing.assert_allclose(got.numpy() - planetary, relative, rtol=5e-3)


def test_solid_body_wind_change_is_reported_in_m_per_s(setup):
    cube, geometry, params = setup
    x = torch.from_numpy(known_states())
    y = x.clone()
    y[:, channels(cube, "u")] += 0.3 * geometry.coslat.double()[:, None]
    v = violations(x, y, geometry, params, ZERO, ZERO)
    torch.testing.assert_close(v["momentum_ms"], torch.full((3,), 0.3), rtol=1e-3, atol=0)


def test_energy_imbalance_is_a_global_mean_flux_against_the_declared_heating(setup):
    cube, geometry, params = setup
    x = torch.from_numpy(known_states())
    y = x.clone()
    y[:, channels(cube, "T")] += 0.01  # K
    ps = x[:, channels(cube, "ps")][:, 0]
    mean_ps = (ps * torch.from_numpy(grid()["weight"])[:, None]).sum((-2, -1)) / (4 * math.pi)
    expected = SPECIFIC_HEAT * 0.01 * mean_ps / PLANET[1] / geometry.dt_seconds  # W m-2
    declared = torch.full((3,), 2.0, dtype=torch.float64)
    v = violations(x, y, geometry, params, declared, ZERO)
    torch.testing.assert_close(v["energy_wm2"].double(), expected - 2.0, rtol=0, atol=0.03)  # float32 floor
    assert 5 < float(v["energy"].min()) < 15  # 0.01 K of global-mean warming per 6 h is ~9 W m-2


def test_virtual_temperature_in_the_ideal_gas_and_hydrostatic_checks(setup):
    cube, geometry, params = setup
    x = known_states()
    clean = thermo_residuals(torch.from_numpy(x), geometry, params)
    assert float(clean["ideal_gas"].max()) < 1e-4 and float(clean["hydrostatic"].max()) < 1e-4
    assert float(clean["hydrostatic_m"].max()) < 1e-2  # m
    # a dry-air density on a state with q = 0.01 everywhere misses the 0.6078 % virtual correction exactly
    dry = x.copy()
    dry[:, channels(cube, "q")] = 0.01
    geo = grid()
    pressure = geo["sigma"][None, :, None, None] * dry[:, channels(cube, "ps")]
    dry[:, channels(cube, "rho")] = pressure / (GAS_CONSTANT * dry[:, channels(cube, "T")])
    dry[:, channels(cube, "zg")] = hydrostatic_numpy(
        dry[:, channels(cube, "T")] * (1 + VIRTUAL_FACTOR * 0.01), PLANET[1]
    )
    residual = thermo_residuals(torch.from_numpy(dry), geometry, params)
    torch.testing.assert_close(
        residual["ideal_gas"].double(), torch.full((3,), 100 * VIRTUAL_FACTOR * 0.01, dtype=torch.float64),
        rtol=1e-4, atol=0,
    )
    assert float(residual["hydrostatic"].max()) < 1e-4


def test_loss_terms_are_the_violations_over_their_goals(setup):
    cube, geometry, params = setup
    x = torch.from_numpy(known_states()).float()
    y = x.clone()
    y[:, channels(cube, "ps")] += 3.0
    y[:, channels(cube, "u")] += 0.02 * geometry.coslat[:, None]
    weights = PhysicsLossConfig(mass=1.0, energy=0.0, momentum=2.0, thermo=0.0)
    loss, metrics = physics_loss(x, y, geometry, weights, params, ZERO.float(), ZERO.float())
    v = violations(x, y, geometry, params, ZERO.float(), ZERO.float())
    expected_mass = float((v["mass_pa"] / LOSS_GOALS["mass"]).pow(2).mean())
    expected_momentum = float((v["momentum_ms"] / LOSS_GOALS["momentum"]).pow(2).mean())
    assert metrics["physics_mass"] == pytest.approx(expected_mass, rel=1e-6)
    assert metrics["physics_momentum"] == pytest.approx(expected_momentum, rel=1e-6)
    assert float(loss) == pytest.approx(expected_mass + 2 * expected_momentum, rel=1e-6)
    assert 8 < expected_mass < 10  # 3 Pa against a 1 Pa goal: the term matters


def test_projection_closes_every_budget_and_never_degrades_zg(setup):
    cube, geometry, params = setup
    truth = torch.from_numpy(known_states(seed=1))
    state = torch.from_numpy(known_states(seed=2))
    rng = torch.Generator().manual_seed(3)
    noise_std = torch.zeros(cube.channels, dtype=torch.float64)
    for name, std in (("T", 1.0), ("zg", 8.0), ("rho", 2e-3), ("u", 0.5), ("v", 0.5), ("ps", 20.0)):
        noise_std[channels(cube, name)] = std
    noisy = truth + noise_std[:, None, None] * torch.randn(truth.shape, generator=rng, dtype=torch.float64)
    heating, torque = torch.full((3,), 1.5, dtype=torch.float64), torch.full((3,), 2e18, dtype=torch.float64)
    before = violations(state, noisy, geometry, params, heating, torque)
    assert float(before["mass"].min()) > 0.1 and float(before["thermo"].min()) > 0.5
    error_std = noise_std.clone()
    error_std[channels(cube, "q")] = 1.0
    fixed = project(noisy, state, geometry, params, heating, error_std=error_std, torque=torque)
    after = violations(state, fixed, geometry, params, heating, torque)
    assert float(after["mass"].max()) < 0.05  # Pa: a few float32 ulps of ps ~ 1.4e5 (0.0156 Pa)
    assert float(after["energy"].max()) < 0.1 and float(after["momentum"].max()) < 1e-3
    assert float(after["ideal_gas"].max()) < 1e-3 and float(after["hydrostatic"].max()) < 1e-3

    def rmse(a: torch.Tensor, name: str) -> float:
        return float((a[:, channels(cube, name)] - truth[:, channels(cube, name)]).pow(2).mean().sqrt())

    for name in ("T", "zg", "rho"):  # the least-squares T is better than each prediction it combines
        assert rmse(fixed, name) < rmse(noisy, name), name
    # diagnose=False keeps the predicted zg and rho; the default weights by the predicted tendencies' size
    kept = project(noisy, state, geometry, params, heating, torque=torque, diagnose=False)
    torch.testing.assert_close(kept[:, channels(cube, "zg")], noisy[:, channels(cube, "zg")].float())
    torch.testing.assert_close(kept[:, channels(cube, "rho")], noisy[:, channels(cube, "rho")].float())
    default = violations(
        state, project(noisy, state, geometry, params, heating, torque=torque), geometry, params, heating,
        torque,
    )
    assert float(default["thermo"].max()) < 1e-3 and float(default["energy"].max()) < 0.1
    # the old diagnosis (zg from the predicted T) integrates T errors up the column and is worse than the
    # prediction
    temperature_v = noisy[:, channels(cube, "T")] * (1 + VIRTUAL_FACTOR * noisy[:, channels(cube, "q")])
    diagnosed = torch.from_numpy(hydrostatic_numpy(temperature_v.numpy(), PLANET[1]))
    assert float((diagnosed - truth[:, channels(cube, "zg")]).pow(2).mean().sqrt()) > rmse(noisy, "zg")


def test_declared_forcing_estimate_is_the_trapezoid_of_the_simulator_formulas(setup):
    cube, geometry, params = setup
    from sapwood.data.simulate import forcing_profiles, radiative_time_factor, temperature_scale

    x = known_states()
    geo = grid()
    profiles = forcing_profiles(geo["lat"], geo["sigma"])
    a, g = PLANET[0], PLANET[1]
    s = temperature_scale(PLANET[3])
    r = radiative_time_factor(PLANET[4], g, PLANET[3])
    area = a * a * geo["weight"][:, None]
    rates = []
    for frame in x[:2]:
        temperature, ps, u = (
            frame[channels(cube, "T")],
            frame[channels(cube, "ps")][0],
            frame[channels(cube, "u")],
        )
        dp = geo["dsigma"][:, None, None] * ps[None]
        heat = (
            (
                SPECIFIC_HEAT
                * profiles["k_t"][:, :, None]
                / r
                * (s * profiles["t_eq"][:, :, None] - temperature)
                * dp
                * area
            ).sum()
            / g
            / (4 * np.pi * a * a)
        )
        torque = (
            -(profiles["k_v"][:, None, None] * u * a * np.cos(geo["lat"])[None, :, None] * dp * area).sum()
            / g
        )
        rates.append((heat, torque))
    got = declared_forcing(torch.from_numpy(x[:1]), torch.from_numpy(x[1:2]), geometry, params[:1])
    assert float(got["heating"][0]) == pytest.approx(0.5 * (rates[0][0] + rates[1][0]), rel=1e-4)
    assert float(got["torque"][0]) == pytest.approx(0.5 * (rates[0][1] + rates[1][1]), rel=1e-4)


def test_bf16_and_fp16_are_reduced_in_float32(setup):
    cube, geometry, params = setup
    x = torch.from_numpy(known_states()).float()
    rounded = x.to(torch.bfloat16)
    low = violations(x, rounded, geometry, params)
    ref = violations(x, rounded.float(), geometry, params)
    for key, value in low.items():
        assert torch.isfinite(value).all() and torch.equal(value, ref[key]), key
    prediction = (x * 1.0001).requires_grad_()
    graph, scratch = (
        thermo_residuals(prediction, geometry, params),
        thermo_residuals(prediction.detach(), geometry, params),
    )
    for key, value in scratch.items():  # the differentiable path and the in-place one are the same numbers
        torch.testing.assert_close(graph[key].detach(), value, rtol=1e-4, atol=1e-3)  # float32 round-off
    loss32, _ = physics_loss(x, prediction, geometry, PhysicsLossConfig(), params)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            loss, _ = physics_loss(x, prediction, geometry, PhysicsLossConfig(), params)
        assert loss.dtype == torch.float32 and torch.allclose(loss, loss32, rtol=1e-6)
        (grad,) = torch.autograd.grad(loss, prediction)
        assert torch.isfinite(grad).all()


def test_bench_baseline_computes_the_same_violations(setup):
    """`sapwood bench physics` times the fused module against five separate constraint functions: both must
    give the same numbers, or the ratio means nothing."""
    from sapwood.bench.physics import naive_violations

    cube, geometry, params = setup
    x = torch.from_numpy(known_states()).float()
    y = x.clone()
    y[:, channels(cube, "ps")] += 5.0
    y[:, channels(cube, "T")] += 0.02
    y[:, channels(cube, "u")] += 0.1
    ours = violations(x, y, geometry, params)
    naive = naive_violations(x, y, cube, geometry, params.float())
    round_off = {
        "mass": 0.05, "water": 1e-4, "energy": 0.05, "momentum": 1e-3, "thermo": 1e-3,
    }  # float32 sums
    for key, value in naive.items():
        torch.testing.assert_close(ours[key], value, rtol=2e-3, atol=round_off[key], msg=key)
    assert float(ours["mass"].min()) > 4.9 and float(ours["energy"].min()) > 1
