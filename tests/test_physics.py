"""The constraint module against the simulator's documented budgets (simulated truth satisfies them)."""

import numpy as np
import pytest
import torch

from sapwood.config import CubeModelConfig, PhysicsLossConfig
from sapwood.data.simulate import Grid, run_states, sample_planets
from sapwood.physics import Geometry, budgets, physics_loss, project, violations

PARAMS = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]


def simulated_truth(dtype=torch.float32, levels=4, nlat=16, nlon=32, times=6, planet_index=1):
    """States ``[times, C, lat, lon]``, planet params ``[times - 1, 5]`` and declared heating ``[times - 1]``."""
    cube = CubeModelConfig(levels=levels, lat=nlat, lon=nlon, planet_params=PARAMS)
    planet = sample_planets(3, seed=0)[planet_index]
    frames, heating = [], []
    for state, heat in run_states(planet, Grid(levels=levels, nlat=nlat, nlon=nlon, times=times), phase=0.3):
        frames.append(np.concatenate([state[v][None] if v == "ps" else state[v] for v in cube.variables]))
        heating.append(heat)
    values = [planet.radius, planet.gravity, planet.rotation_rate, planet.stellar_flux, planet.surface_pressure]
    params = torch.tensor([values] * (times - 1), dtype=torch.float64)
    return cube, torch.tensor(np.stack(frames), dtype=dtype), params, torch.tensor(heating[1:])


@pytest.fixture(scope="module")
def truth():
    return simulated_truth()


def test_truth_satisfies_documented_budgets_float32(truth):
    cube, x, params, heating = truth
    v = violations(x[:-1], x[1:], Geometry.default(cube), params, heating)
    # simulate.py: mass, water, enthalpy < 1e-6 relative from float32 files (= 1e-4 %); energy < 1e-5 (1e-3 %);
    # the per-layer u cos(phi) integral is exact; ideal gas / hydrostatic < 1e-6 relative.
    assert v["mass"].max() < 1e-4 and v["water"].max() < 1e-4
    assert v["energy"].max() < 1e-3
    assert v["momentum"].max() < 1e-4
    assert v["ideal_gas"].max() < 1e-4 and v["hydrostatic"].max() < 1e-3
    assert torch.equal(v["negative_q"], torch.zeros(5))
    assert v["energy_wm2"].abs().max() < 0.1  # W m-2, the residual as a global-mean flux


def test_truth_budgets_to_round_off_in_float64():
    cube, x, params, heating = simulated_truth(torch.float64)
    geometry = Geometry.default(cube)
    b = budgets(x.double(), geometry, params[:1].expand(x.shape[0], -1))
    mass = b["mass"].double()
    assert ((mass - mass[0]).abs() / mass[0]).max() < 1e-6  # budgets reduce in float32 by design


def test_violation_grows_monotonically_with_noise(truth):
    cube, x, params, heating = truth
    geometry = Geometry.default(cube)
    noise = torch.randn(x[1:].shape, generator=torch.Generator().manual_seed(0))
    scale = x[1:].abs().flatten(-2).mean(-1)[..., None, None]  # per-channel magnitude
    previous = None
    for amplitude in (1e-5, 1e-4, 1e-3, 1e-2):
        noisy = x[1:] * (1 + amplitude * noise) + 0.1 * amplitude * scale * noise.roll(1, -1)
        v = {k: float(t.mean()) for k, t in violations(x[:-1], noisy, geometry, params, heating).items()}
        if previous is not None:
            for key in ("mass", "water", "energy", "momentum", "ideal_gas", "hydrostatic", "thermo"):
                assert v[key] > previous[key], (key, amplitude, v[key], previous[key])
        previous = v
    assert previous["mass"] > 1e-3 and previous["thermo"] > 0.5


def test_projection_is_exact(truth):
    cube, x, params, heating = truth
    geometry = Geometry.default(cube)
    noise = torch.randn(x[1:].shape, generator=torch.Generator().manual_seed(1))
    noisy = x[1:] * (1 + 0.01 * noise)
    before = violations(x[:-1], noisy, geometry, params, heating)
    fixed = project(noisy, x[:-1], geometry, params, heating)
    after = violations(x[:-1], fixed, geometry, params, heating)
    assert before["mass"].min() > 1e-3 and before["energy"].min() > 1e-3
    assert after["mass"].max() < 5e-5 and after["water"].max() < 5e-5  # a few float32 ulps (6e-8), in %
    assert after["energy"].max() < 5e-5
    assert after["ideal_gas"].max() < 5e-5 and after["hydrostatic"].max() < 1e-3
    # the projection moves the state only a little: T by a uniform shift, ps and q by a scale near 1
    assert (fixed - noisy).abs().max() / noisy.abs().max() < 0.05


def test_bf16_and_fp16_are_reduced_in_float32(truth):
    cube, x, params, heating = truth
    geometry = Geometry.default(cube)
    rounded = x[1:].to(torch.bfloat16)
    low = violations(x[:-1], rounded, geometry, params, heating)
    ref = violations(x[:-1], rounded.float(), geometry, params, heating)
    for key, value in low.items():
        assert torch.isfinite(value).all() and torch.equal(value, ref[key]), key
    weights = PhysicsLossConfig()
    prediction = (x[1:] * 1.001).requires_grad_()
    loss32, _ = physics_loss(x[:-1], prediction, geometry, weights, params, heating)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            loss, metrics = physics_loss(x[:-1], prediction, geometry, weights, params, heating)
        assert loss.dtype == torch.float32 and torch.allclose(loss, loss32, rtol=1e-6)
        (grad,) = torch.autograd.grad(loss, prediction)
        assert torch.isfinite(grad).all()
