"""`sapwood bench physics`: the unified constraint module against a naive per-constraint loop, and the
violations of trained predictions without physics loss, with it, and with the projection.

1. Speed: :func:`sapwood.physics.violations` (one reduction pass per field, shared sums for every budget)
   against five separate constraint functions as the replaced platform wrote them (mass, water, energy,
   angular momentum, thermodynamics), each vectorized over the batch but recomputing its own layer masses,
   virtual temperature and forcing terms. Both give the same numbers (checked before timing). The two are
   timed alternately, ``repeats`` times; the figure is the median of the per-repeat ratios with their
   spread (min, max, interquartile range).
2. Violations (units of :mod:`sapwood.physics`: Pa, W m-2, m s-1, %): two small surrogates trained the same
   way on the same simulated store, one with all physics-loss weights 0 (baseline), one with the default
   weights; violations of their one-step predictions on held-out planets, raw and after the projection.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sapwood.bench.harness import Result, print_results, synchronize, write_suite
from sapwood.config import CubeModelConfig, PhysicsLossConfig
from sapwood.constants import GAS_CONSTANT, SPECIFIC_HEAT, VIRTUAL_FACTOR
from sapwood.physics import Geometry, violations

PARAMS = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]

# --- the naive baseline: one function per constraint, each recomputing what it needs -----------------------


def _fields(x: torch.Tensor, cube: CubeModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name in cube.variables:
        values = x[:, cube.channel_slice(name)].float()
        out[name] = values[:, 0] if name in cube.surface_variables else values
    return out


def _param(params: torch.Tensor, name: str) -> torch.Tensor:
    return params[:, PARAMS.index(name)].float()


def _layer_mass(ps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    return geometry.dsigma[:, None, None] * ps[:, None] * geometry.cell_weight  # [B, L, H, W]


def _global(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def naive_mass(state, nxt, cube, geometry, params):
    weight = geometry.cell_weight
    total = weight.sum() * cube.lon
    before = _global(_fields(state, cube)["ps"] * weight) / total
    after = _global(_fields(nxt, cube)["ps"] * weight) / total
    return (after - before).abs()


def naive_water(state, nxt, cube, geometry, params):
    g, total = _param(params, "gravity"), geometry.cell_weight.sum() * cube.lon
    totals = []
    for x in (state, nxt):
        f = _fields(x, cube)
        totals.append(_global(f["q"] * _layer_mass(f["ps"], geometry)) / (g * total))
    return (totals[1] - totals[0]).abs()


def naive_energy(state, nxt, cube, geometry, params):
    from sapwood.data.simulate import radiative_time_factor, temperature_scale

    g, total = _param(params, "gravity"), geometry.cell_weight.sum() * cube.lon
    scale = temperature_scale(_param(params, "stellar_flux"))
    slow = radiative_time_factor(_param(params, "mean_surface_pressure"), g, _param(params, "stellar_flux"))
    energies, heating = [], []
    for x in (state, nxt):
        f = _fields(x, cube)
        mass = _layer_mass(f["ps"], geometry)
        energies.append(
            _global((SPECIFIC_HEAT * f["T"] + 0.5 * (f["u"] ** 2 + f["v"] ** 2)) * mass) / (g * total)
        )
        t_eq = scale[:, None, None, None] * geometry.t_eq[:, :, None]
        rate = geometry.k_t[:, :, None] / slow[:, None, None, None]
        heating.append(SPECIFIC_HEAT * _global(rate * (t_eq - f["T"]) * mass) / (g * total))
    declared = 0.5 * (heating[0] + heating[1])
    return ((energies[1] - energies[0]) / geometry.dt_seconds - declared).abs()


def naive_momentum(state, nxt, cube, geometry, params):
    g, total = _param(params, "gravity"), geometry.cell_weight.sum() * cube.lon
    a, omega = _param(params, "planet_radius"), _param(params, "rotation_rate")
    arm = a[:, None, None, None] * geometry.coslat[:, None]
    momenta, torques, arms = [], [], []
    for x in (state, nxt):
        f = _fields(x, cube)
        mass = _layer_mass(f["ps"], geometry)
        momenta.append(_global((f["u"] + omega[:, None, None, None] * arm) * arm * mass) / (g * total))
        torques.append(-_global(geometry.k_v[:, None, None] * f["u"] * arm * mass) / (g * total))
        arms.append(_global(geometry.coslat[:, None] ** 2 * mass) / (g * total))
    imbalance = momenta[1] - momenta[0] - 0.5 * (torques[0] + torques[1]) * geometry.dt_seconds
    return (imbalance / (a * 0.5 * (arms[0] + arms[1]))).abs()


def naive_thermo(state, nxt, cube, geometry, params):
    f = _fields(nxt, cube)
    g = _param(params, "gravity")[:, None, None, None]
    mass = _layer_mass(f["ps"], geometry)
    total = _global(mass)
    virtual = f["T"] * (1 + VIRTUAL_FACTOR * f["q"])
    pressure = geometry.sigma[:, None, None] * f["ps"][:, None]
    ideal = 100 * _global((f["rho"] * GAS_CONSTANT * virtual / pressure - 1).abs() * mass) / total
    edges = geometry.sigma_edges
    layer_depth = torch.log(edges[1:] / edges[:-1].clamp_min(1e-30))[:, None, None]
    half_depth = torch.log(edges[1:] / geometry.sigma)[:, None, None]
    thickness = GAS_CONSTANT * virtual / g
    below = (
        torch.flip(torch.cumsum(torch.flip(thickness * layer_depth, (-3,)), -3), (-3,))
        - thickness * layer_depth
    )
    zg = below + thickness * half_depth
    hydro = 100 * _global((f["zg"] - zg).abs() / thickness * mass) / total
    negative = 100 * _global(torch.relu(-f["q"]) * mass) / _global(f["q"].abs() * mass)
    return ideal + hydro + negative


NAIVE = {"mass": naive_mass, "water": naive_water, "energy": naive_energy, "momentum": naive_momentum,
         "thermo": naive_thermo}


def naive_violations(state, nxt, cube, geometry, params) -> dict[str, torch.Tensor]:
    return {name: function(state, nxt, cube, geometry, params) for name, function in NAIVE.items()}


# --- the suite ----------------------------------------------------------------------------------------------


def simulated_batch(
    batch: int, levels: int, nlat: int, nlon: int
) -> tuple[CubeModelConfig, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cube, state, next, params)``: consecutive pairs of a short simulated run, rolled in longitude
    (a symmetry of the equations) to fill ``batch`` samples."""
    from sapwood.data.simulate import PLANET_VARIABLES, Grid, run_states, sample_planets

    cube = CubeModelConfig(levels=levels, lat=nlat, lon=nlon, planet_params=PARAMS)
    planet = sample_planets(4, seed=3)[1]
    frames = [
        np.concatenate([state[v][None] if v == "ps" else state[v] for v in cube.variables])
        for state, _ in run_states(planet, Grid(levels=levels, nlat=nlat, nlon=nlon, times=5, spinup_days=2))
    ]
    x = torch.from_numpy(np.stack(frames)).float()
    pairs = [(x[i % 4], x[i % 4 + 1], (i // 4) * 3 % nlon) for i in range(batch)]
    state = torch.stack([torch.roll(s, shift, -1) for s, _, shift in pairs])
    nxt = torch.stack([torch.roll(n, shift, -1) for _, n, shift in pairs])
    values = {name: getattr(planet, field) for name, (field, _, _) in PLANET_VARIABLES.items()}
    params = torch.tensor([[values[n] for n in PARAMS]] * batch)
    return cube, state, nxt, params


def _quartiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]


def speed_results(
    batch: int, levels: int, nlat: int, nlon: int, device: str, repeats: int = 21
) -> list[Result]:
    cube, state, nxt, params = simulated_batch(batch, levels, nlat, nlon)
    geometry = Geometry.default(cube, device)
    s, n, p = state.to(device), nxt.to(device), params.to(device)
    ours = violations(s, n, geometry, p)
    naive = naive_violations(s, n, cube, geometry, p)
    round_off = {"mass": 0.1, "water": 1e-4, "energy": 0.1, "momentum": 1e-3, "thermo": 1e-4}  # float32 sums
    for key, values in naive.items():
        torch.testing.assert_close(
            ours[key], values, rtol=2e-3, atol=round_off[key], msg=lambda m, k=key: f"{k}: {m}"
        )

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    fused, loop = (lambda: violations(s, n, geometry, p)), (lambda: naive_violations(s, n, cube, geometry, p))
    with torch.inference_mode():
        for _ in range(3):
            fused(), loop()
        ours_s, naive_s, ratios = [], [], []
        for index in range(repeats):
            order = (fused, loop) if index % 2 == 0 else (loop, fused)
            first, second = timed(order[0]), timed(order[1])
            ours_t, naive_t = (first, second) if index % 2 == 0 else (second, first)
            ours_s.append(ours_t)
            naive_s.append(naive_t)
            ratios.append(naive_t / ours_t)
    low, high = _quartiles(ratios)
    params_out = {
        "batch": batch, "levels": levels, "grid": f"{nlat}x{nlon}", "device": device, "repeats": repeats,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_iqr": [low, high], "ours_s_iqr": list(_quartiles(ours_s)),
        "naive_s_iqr": list(_quartiles(naive_s)),
        "constraints": "mass, water, energy, angular momentum, thermo (ideal gas + hydrostatic + q >= 0)",
    }
    result = Result("all constraints, one batch", statistics.median(ours_s), "s", statistics.median(naive_s),
                    params=params_out, baseline="5 separate constraint functions (batched torch)")
    result.ratio = statistics.median(ratios)  # the median of paired ratios: robust to machine load drifting
    return [result]


def violation_results(work: Path, steps: int, runs: int, device: str) -> tuple[list[Result], dict]:
    from sapwood.evaluate import evaluate_surrogate
    from sapwood.train.cube_task import simulated_store, surrogate_config
    from sapwood.train.loop import train

    store = simulated_store(work / "data", runs=runs, times=12)
    reports = {}
    for label, weights in (("no_physics_loss", PhysicsLossConfig(mass=0, energy=0, momentum=0, thermo=0)),
                           ("physics_loss", PhysicsLossConfig())):
        config = surrogate_config(store, work / label, steps=steps, physics=weights)
        config.train.device = "cuda" if device.startswith("cuda") else "cpu"
        summary = train(config)
        reports[label] = evaluate_surrogate(summary["final"], store, work / f"eval-{label}", rollout_steps=5,
                                            plots=False, device=config.train.device)
    results: list[Result] = []
    params = {"train_steps": steps, "runs": runs, "held_out_runs": reports["physics_loss"]["held_out_runs"]}
    units = {"mass": "Pa", "energy": "W m-2", "momentum": "m s-1", "thermo": "%"}
    for key, unit in units.items():
        base = reports["no_physics_loss"]["violations"][key]
        for name, value in ((f"{key} violation, physics loss", reports["physics_loss"]["violations"][key]),
                            (f"{key} violation, physics loss + projection",
                             reports["physics_loss"]["violations_projected"][key])):
            result = Result(name, value, unit, base, params=params, baseline="no physics loss")
            result.ratio = base / value if value else float("inf")  # lower is better in every unit here
            results.append(result)
    extra = {
        label: {
            k: r[k]
            for k in (
                "violations", "violations_projected", "violations_truth", "skill_vs_persistence", "acc",
                "rmse", "rmse_projected",
            )
            if k in r
        }
        for label, r in reports.items()
    }
    return results, extra


def run_physics_bench(out_dir: Path, batch: int = 64, levels: int = 8, nlat: int = 32, nlon: int = 64,
                      train_steps: int = 300, runs: int = 24, skip_training: bool = False,
                      device: str = "auto", repeats: int = 21) -> list[Result]:
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = speed_results(batch, levels, nlat, nlon, dev, repeats)
    extra = {}
    if not skip_training:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            trained, extra = violation_results(Path(out_dir) / "physics-work", train_steps, runs, dev)
        finally:
            torch.set_num_threads(threads)
        results += trained
    write_suite("physics", results, out_dir, extra=extra)
    print_results(results)
    return results


