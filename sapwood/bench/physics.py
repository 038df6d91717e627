"""`sapwood bench physics`: the unified constraint module against a naive loop, and the violations of
trained predictions without physics loss, with it, and with the projection.

1. Speed: :func:`sapwood.physics.violations` on a batch of simulated states vs the way the replaced
   platform did it: five separate constraint functions (mass, water, energy, momentum, thermodynamics),
   each looping over samples in Python with NumPy and recomputing the layer masses itself. Both give the
   same numbers (checked before timing).
2. Violations: two small surrogates trained the same way on the same simulated store, one with all
   physics-loss weights 0 (baseline), one with the default weights; violations of their one-step
   predictions on held-out planets, raw and after :func:`sapwood.physics.project`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sapwood.bench.harness import Result, print_results, time_fn, write_suite
from sapwood.config import CubeModelConfig, PhysicsLossConfig
from sapwood.physics import GAS_CONSTANT, SPECIFIC_HEAT, Geometry, hydrostatic_height, violations

# --- the naive baseline: separate functions, per-sample loops, NumPy ------------------------------------


def _split(frame: np.ndarray, cube: CubeModelConfig) -> dict[str, np.ndarray]:
    out = {}
    for name in cube.variables:
        values = frame[cube.channel_slice(name)]
        out[name] = values[0] if name in cube.surface_variables else values
    return out


def _naive_layer_mass(ps: np.ndarray, geo: dict[str, np.ndarray]) -> np.ndarray:
    return geo["dsigma"][:, None, None] * ps[None] * geo["weight"]


def naive_mass(state, nxt, cube, geo, gravity):
    out = []
    for s, n, g in zip(state, nxt, gravity, strict=True):
        before = (_split(s, cube)["ps"] * geo["weight"]).sum() / g
        after = (_split(n, cube)["ps"] * geo["weight"]).sum() / g
        out.append(100 * abs(after - before) / before)
    return np.asarray(out)


def naive_water(state, nxt, cube, geo, gravity):
    out = []
    for s, n, g in zip(state, nxt, gravity, strict=True):
        fs, fn = _split(s, cube), _split(n, cube)
        before = (fs["q"] * _naive_layer_mass(fs["ps"], geo)).sum() / g
        after = (fn["q"] * _naive_layer_mass(fn["ps"], geo)).sum() / g
        out.append(100 * abs(after - before) / before)
    return np.asarray(out)


def naive_energy(state, nxt, cube, geo, gravity, heating, dt):
    out = []
    for s, n, g, h in zip(state, nxt, gravity, heating, strict=True):
        totals = []
        for f in (_split(s, cube), _split(n, cube)):
            specific = SPECIFIC_HEAT * f["T"] + 0.5 * (f["u"] ** 2 + f["v"] ** 2)
            totals.append((specific * _naive_layer_mass(f["ps"], geo)).sum() / g)
        out.append(100 * abs(totals[1] - totals[0] - 4 * np.pi * dt * h) / totals[0])
    return np.asarray(out)


def naive_momentum(state, nxt, cube, geo):
    out = []
    for s, n in zip(state, nxt, strict=True):
        per_layer = [(_split(f, cube)["u"] * np.cos(geo["lat"])[:, None] * geo["weight"]).sum(axis=(1, 2))
                     for f in (s, n)]
        out.append(100 * np.abs(per_layer[1] - per_layer[0]).sum() / np.abs(per_layer[0]).sum())
    return np.asarray(out)


def naive_thermo(nxt, cube, geo, gravity):
    out = []
    for n, g in zip(nxt, gravity, strict=True):
        f = _split(n, cube)
        dpw = _naive_layer_mass(f["ps"], geo)
        pressure = geo["sigma"][:, None, None] * f["ps"][None]
        ideal = 100 * (np.abs(f["rho"] * GAS_CONSTANT * f["T"] / pressure - 1) * dpw).sum() / dpw.sum()
        zg = hydrostatic_height(torch.from_numpy(f["T"]), geo["geometry"], torch.tensor(g)).numpy()
        hydro = 100 * (np.abs(f["zg"] - zg) / (GAS_CONSTANT * f["T"] / g) * dpw).sum() / dpw.sum()
        negative = 100 * (np.maximum(-f["q"], 0) * dpw).sum() / (np.abs(f["q"]) * dpw).sum()
        out.append(ideal + hydro + negative)
    return np.asarray(out)


def naive_violations(state, nxt, cube, geometry, gravity, heating) -> dict[str, np.ndarray]:
    geo = {"dsigma": geometry.dsigma.numpy(), "sigma": geometry.sigma.numpy(), "lat": geometry.lat.numpy(),
           "weight": geometry.cell_weight.numpy(), "geometry": geometry}
    return {"mass": naive_mass(state, nxt, cube, geo, gravity),
            "water": naive_water(state, nxt, cube, geo, gravity),
            "energy": naive_energy(state, nxt, cube, geo, gravity, heating, geometry.dt_seconds),
            "momentum": naive_momentum(state, nxt, cube, geo),
            "thermo": naive_thermo(nxt, cube, geo, gravity)}


# --- the suite ------------------------------------------------------------------------------------------------


def _simulated_batch(batch: int, levels: int, nlat: int, nlon: int):
    from sapwood.data.simulate import Grid, run_states, sample_planets

    cube = CubeModelConfig(levels=levels, lat=nlat, lon=nlon, planet_params=["gravity"])
    planet = sample_planets(1, seed=3)[0]
    frames, heating = [], []
    for state, heat in run_states(planet, Grid(levels=levels, nlat=nlat, nlon=nlon, times=batch + 1)):
        frames.append(np.concatenate([state[v][None] if v == "ps" else state[v] for v in cube.variables]))
        heating.append(heat)
    x = np.stack(frames).astype(np.float32)
    gravity = np.full(batch, planet.gravity, dtype=np.float32)
    return cube, x[:-1], x[1:], gravity, np.asarray(heating[1:], dtype=np.float32)


def speed_results(batch: int, levels: int, nlat: int, nlon: int, device: str) -> list[Result]:
    cube, state, nxt, gravity, heating = _simulated_batch(batch, levels, nlat, nlon)
    geometry_cpu = Geometry.default(cube)
    geometry = Geometry.default(cube, device)
    s, n = torch.from_numpy(state).to(device), torch.from_numpy(nxt).to(device)
    g, h = torch.from_numpy(gravity)[:, None].to(device), torch.from_numpy(heating).to(device)
    ours = violations(s, n, geometry, g, h)
    naive = naive_violations(state, nxt, cube, geometry_cpu, gravity, heating)
    for key, values in naive.items():
        np.testing.assert_allclose(ours[key].cpu().numpy(), values, rtol=2e-2, atol=1e-4, err_msg=key)
    fast = time_fn(lambda: violations(s, n, geometry, g, h), warmup=2, repeats=10, device=device)
    slow = time_fn(lambda: naive_violations(state, nxt, cube, geometry_cpu, gravity, heating), warmup=1, repeats=3)
    params = {"batch": batch, "levels": levels, "grid": f"{nlat}x{nlon}", "device": device,
              "constraints": "mass, water, energy, momentum, thermo (ideal gas + hydrostatic + q >= 0)"}
    return [Result("all constraints, one batch", fast.median, "s", slow.median, params=params,
                   baseline="5 separate per-sample numpy functions")]


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
    results = []
    params = {"train_steps": steps, "runs": runs, "held_out_runs": reports["physics_loss"]["held_out_runs"]}
    for key in ("mass", "energy", "momentum", "thermo"):
        base = reports["no_physics_loss"]["violations"][key]
        results.append(Result(f"{key} violation, physics loss", reports["physics_loss"]["violations"][key], "%",
                              base, params=params, baseline="no physics loss"))
        results.append(Result(f"{key} violation, physics loss + projection",
                              reports["physics_loss"]["violations_projected"][key], "%", base, params=params,
                              baseline="no physics loss"))
    extra = {label: {k: r[k] for k in ("violations", "violations_projected", "skill_vs_persistence", "acc")}
             for label, r in reports.items()}
    return results, extra


def run_physics_bench(out_dir: Path, batch: int = 64, levels: int = 8, nlat: int = 32, nlon: int = 64,
                      train_steps: int = 300, runs: int = 24, skip_training: bool = False,
                      device: str = "auto") -> list[Result]:
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = speed_results(batch, levels, nlat, nlon, dev)
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
