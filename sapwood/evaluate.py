"""`sapwood eval DIR --data STORE`: skill and physics of a datacube surrogate on held-out planets.

Definitions (metrics in :mod:`sapwood.skill`, WeatherBench 2; violations in :mod:`sapwood.physics`):

- Held-out planets: the runs of the store the surrogate never trained on (the last ``cube.val_runs``
  runs, as :mod:`sapwood.train.cube_task` splits them), unless ``runs`` is given.
- **Accuracy** = the anomaly correlation coefficient (ACC) of one-step predictions on held-out planets,
  per variable; the climatology is each run's own time mean per grid point and channel.
- RMSE: latitude-weighted, per variable, in physical units; ``skill_vs_persistence`` =
  1 - RMSE_model / RMSE_persistence (persistence: the next state equals this one), likewise against
  climatology (the prediction is the run's time mean).
- Physics: mean violation percentages of the predictions, raw and after :func:`sapwood.physics.project`.
- Rollout: from each held-out run's first state, ``steps`` autoregressive predictions; per step the
  RMSE in units of the per-channel state std (mean over channels), against persistence of the first
  state. "Blow-up" is the first step where that error is non-finite or above 10x the climatology's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.config import Config, load_config
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError
from sapwood.model import load
from sapwood.physics import UNITS, Geometry, project, violations
from sapwood.skill import acc, per_variable, rmse, weighted_mse
from sapwood.train.cube_task import check_store_matches, held_out_runs

VIOLATION_KEYS = ("mass", "water", "energy", "energy_wm2", "momentum", "thermo", "ideal_gas", "hydrostatic",
                  "negative_q")


def _run_frames(store: CubeStore, run: int) -> torch.Tensor:
    first, times = int(store.run_rows[run]), int(store.run_times[run])
    return store.read_rows(first, times)


@torch.no_grad()
def predict_all(model: torch.nn.Module, states: torch.Tensor, params: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    device = next(model.parameters()).device
    out = [model(states[i:i + chunk].to(device), params[i:i + chunk].to(device)).float().cpu()
           for i in range(0, states.shape[0], chunk)]
    return torch.cat(out)


def _mean_violations(state: torch.Tensor, prediction: torch.Tensor, geometry: Geometry,
                     params: torch.Tensor) -> dict[str, float]:
    v = violations(state, prediction, geometry, params)
    return {k: float(v[k].mean()) for k in VIOLATION_KEYS if k in v}


@torch.no_grad()
def evaluate_surrogate(folder: str | Path, store_path: str | Path, out_dir: str | Path | None = None,
                       rollout_steps: int = 20, runs: list[int] | None = None, device: str = "cpu",
                       plots: bool = True) -> dict[str, Any]:
    """Evaluate the surrogate in ``folder`` on the store; write ``eval.json`` (+ PNGs) into ``out_dir``."""
    folder = Path(folder)
    config: Config = load_config(folder / "config.yaml")
    if config.cube is None:
        raise SapwoodError(f"{folder}: not a datacube surrogate (config.yaml has no 'cube:' section)")
    cube = config.cube
    store = CubeStore(store_path)
    check_store_matches(config, store)
    model = load(folder, device=device)
    geometry = Geometry.default(cube)
    if runs is None:
        runs = held_out_runs(store, cube.val_runs)[1] if cube.val_runs else list(range(store.runs))
    lat_deg = torch.rad2deg(geometry.lat)
    states, truths, preds, clims, params_all = [], [], [], [], []
    rollout_errors, rollout_persistence, rollout_climatology = [], [], []
    state_std = model.state_std.float().cpu()[:, None, None]
    for run in runs:
        frames = _run_frames(store, run)
        params = torch.as_tensor(store.params[run], dtype=torch.float32).expand(frames.shape[0] - 1, -1)
        states.append(frames[:-1])
        truths.append(frames[1:])
        preds.append(predict_all(model, frames[:-1], params))
        clims.append(frames.mean(0, keepdim=True).expand(frames.shape[0] - 1, -1, -1, -1))
        params_all.append(params)
        steps = min(rollout_steps, frames.shape[0] - 1)
        rolled = model.rollout(frames[:1].to(device), params[:1].to(device), steps).float().cpu()[0]
        norm = lambda f: f / state_std  # noqa: E731
        rollout_errors.append(weighted_mse(norm(rolled), norm(frames[1:steps + 1]), lat_deg).mean(1).sqrt())
        rollout_persistence.append(weighted_mse(norm(frames[:1].expand(steps, -1, -1, -1)), norm(frames[1:steps + 1]),
                                                lat_deg).mean(1).sqrt())
        rollout_climatology.append(weighted_mse(norm(frames.mean(0, keepdim=True).expand(steps, -1, -1, -1)),
                                                norm(frames[1:steps + 1]), lat_deg).mean(1).sqrt())
    state, truth, pred = torch.cat(states), torch.cat(truths), torch.cat(preds)
    clim, params = torch.cat(clims), torch.cat(params_all)
    projected = project(pred, state, geometry, params)
    names, levels = cube.variables, cube.levels
    layered = [v for v in names if v not in cube.surface_variables]

    def by_variable(values: torch.Tensor, root: bool = False) -> dict[str, float]:
        return per_variable(values, names, levels, layered, reduce_sqrt=root)

    rmse_model, rmse_persist, rmse_clim = (rmse(f, truth, lat_deg) for f in (pred, state, clim))
    rmse_projected = rmse(projected, truth, lat_deg)
    result: dict[str, Any] = {
        "checkpoint": str(folder), "store": str(store_path), "held_out_runs": runs, "samples": int(state.shape[0]),
        "definitions": "accuracy = ACC (WB2) of one-step predictions on held-out planets; see sapwood.evaluate",
        "acc": by_variable(acc(pred, truth, clim, lat_deg)),
        "acc_persistence": by_variable(acc(state, truth, clim, lat_deg)),
        "acc_projected": by_variable(acc(projected, truth, clim, lat_deg)),
        "rmse": by_variable(rmse_model, True),
        "rmse_projected": by_variable(rmse_projected, True),
        "rmse_persistence": by_variable(rmse_persist, True),
        "rmse_climatology": by_variable(rmse_clim, True),
        "violations": _mean_violations(state, pred, geometry, params),
        "violations_projected": _mean_violations(state, projected, geometry, params),
        "violations_truth": _mean_violations(state, truth, geometry, params),
    }
    result["skill_vs_persistence"] = {k: 1 - result["rmse"][k] / max(result["rmse_persistence"][k], 1e-30)
                                      for k in names}
    result["skill_vs_climatology"] = {k: 1 - result["rmse"][k] / max(result["rmse_climatology"][k], 1e-30)
                                      for k in names}
    result["beats_persistence_every_variable"] = all(v > 0 for v in result["skill_vs_persistence"].values())
    steps = min(len(e) for e in rollout_errors)
    curve = torch.stack([e[:steps] for e in rollout_errors]).mean(0)
    curve_persist = torch.stack([e[:steps] for e in rollout_persistence]).mean(0)
    curve_clim = torch.stack([e[:steps] for e in rollout_climatology]).mean(0)
    bad = (~torch.isfinite(curve)) | (curve > 10 * curve_clim)
    result["rollout"] = {
        "steps": steps, "rmse_std_units": curve.tolist(), "persistence": curve_persist.tolist(),
        "climatology": curve_clim.tolist(),
        "blow_up_step": int(bad.nonzero()[0, 0]) + 1 if bad.any() else None,
        "beats_persistence_until_step": int((curve < curve_persist).long().cumprod(0).sum()),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        if plots:
            _plots(out, pred, truth, state, geometry, cube.variables[0], result["rollout"])
    return result


def _plots(out: Path, pred: torch.Tensor, truth: torch.Tensor, state: torch.Tensor, geometry: Geometry,
           variable: str, rollout: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sl = geometry.cube.channel_slice(variable)
    level = sl.start + (sl.stop - sl.start) // 2
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (title, field) in zip(axes, (("surrogate", pred), ("persistence", state)), strict=True):
        error = (field[:, level] - truth[:, level]).pow(2).mean(0).sqrt().numpy()
        image = ax.imshow(error, origin="lower", aspect="auto", extent=(0, 360, -90, 90), cmap="magma")
        ax.set_title(f"{title}: RMSE of {variable} (channel {level}) over time")
        ax.set_xlabel("lon")
        ax.set_ylabel("lat")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "error_map.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(1, rollout["steps"] + 1)
    for key, label in (("rmse_std_units", "surrogate rollout"), ("persistence", "persistence"),
                       ("climatology", "climatology")):
        ax.plot(steps, rollout[key], label=label)
    ax.set_xlabel("autoregressive step")
    ax.set_ylabel("RMSE (state-std units, mean over channels)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rollout.png", dpi=100)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("variable", "ACC", "ACC persist", "RMSE", "RMSE persist", "RMSE clim", "skill vs persist")
    for name, value in result["acc"].items():
        table.add_row(name, f"{value:.4f}", f"{result['acc_persistence'][name]:.4f}", f"{result['rmse'][name]:.4g}",
                      f"{result['rmse_persistence'][name]:.4g}", f"{result['rmse_climatology'][name]:.4g}",
                      f"{result['skill_vs_persistence'][name]:+.3f}")
    console = Console()
    console.print(table)
    for key in ("violations", "violations_projected"):
        shown = ", ".join(f"{k} {v:.3g} {UNITS.get(k, '')}".rstrip() for k, v in result[key].items())
        console.print(f"{key}: {shown}")
    r = result["rollout"]
    console.print(f"rollout {r['steps']} steps: final error {r['rmse_std_units'][-1]:.3g} (persistence "
                  f"{r['persistence'][-1]:.3g}), blow-up step {r['blow_up_step']}, beats persistence until step "
                  f"{r['beats_persistence_until_step']}")


def demo_stage(out: Path) -> None:
    """Demo: train a tiny surrogate on the cube stage's store (``out/cubes/store``) through the training
    loop, then print its skill on held-out planets and its physics violations (``out/surrogate``)."""
    from rich.console import Console

    from sapwood.train.cube_task import surrogate_config
    from sapwood.train.loop import train

    store = Path(out) / "cubes" / "store"
    if not (store / "index.json").exists():
        raise SapwoodError(f"{store}: no cube store; the cubes demo stage writes it first")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a small, shared CPU
    try:
        config = surrogate_config(store, Path(out) / "surrogate" / "run", steps=200, hidden=64, layers=2,
                                  patch=8, val_runs=2)
        summary = train(config)
        result = evaluate_surrogate(summary["final"], store, Path(out) / "surrogate" / "eval", rollout_steps=10)
    finally:
        torch.set_num_threads(threads)
    Console().print(f"surrogate {summary['final']}: held-out planets {result['held_out_runs']}")
    print_summary(result)
