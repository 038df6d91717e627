"""`sapwood eval DIR --data STORE`: skill and physics of a datacube surrogate on held-out data.

Every number in ``eval.json`` is named in its ``definitions``; in short (metrics in :mod:`sapwood.skill`,
WeatherBench 2, area-weighted over valid cells; baselines in :mod:`sapwood.baselines`):

- Held-out frames: :func:`sapwood.data.loader.split_store` with the checkpoint's ``cube.val_runs`` and
  ``cube.holdout_time`` (the one definition training uses); ``--holdout-time F`` scores the final ``F`` of
  every training run instead (allowed up to the fraction the model held out).
- ``acc``: anomaly correlation of one-step predictions against a climatology computed from training frames
  only: for stores whose runs carry planet parameters a per-cell function of the parameters fitted on the
  training runs (:class:`sapwood.baselines.ParameterClimatology`), else per calendar month or day of year
  (``climatology`` in ``eval.json`` names which); ``rmse`` per variable in physical units; the same for
  persistence, climatology and advective persistence (and, next to a parameter climatology, the
  calendar-key climatology pooled over the training planets); ``skill_vs_*`` = 1 - sqrt(mean over
  held-out runs and the variable's channels of MSE_model / MSE_baseline), so each planet and level counts in
  its own units.
- ``groups``: the same per-variable figures for held-out runs whose planet parameters lie inside the training
  runs' range, outside it, and for the held-out final parts of training runs.
- ``constraints``: each physics constraint applied or skipped (with the reason); ``violations*`` only where
  applied.
- ``rollout``: from the first state of each held-out window, autoregressive steps; per step the RMSE in units
  of the per-channel state std (mean over channels) against persistence of the first state and climatology.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.baselines import (
    CALENDAR_DEFINITION,
    Climatology,
    ParameterClimatology,
    advective_persistence,
    advective_persistence_support,
    fit_climatology,
)
from sapwood.config import Config, CubeModelConfig, load_config
from sapwood.data.loader import Split, split_store
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError
from sapwood.model import load
from sapwood.physics import UNITS, Geometry, project, violations
from sapwood.skill import acc, per_variable, rmse, weighted_mse
from sapwood.train.cube_task import cell_weights, check_store_matches, physics_support, store_geometry

VIOLATION_KEYS = (
    "mass", "water", "energy", "energy_wm2", "momentum", "thermo", "ideal_gas", "hydrostatic", "negative_q",
)
DEFINITIONS = {
    "held_out": "frames never trained on: the last cube.val_runs runs entirely and the final holdout_time of "
    "every other run (sapwood.data.loader.split_store, as in training); windows are (run, start, stop)",
    "held_out_runs": "runs held out entirely (planets / scenarios)",
    "samples": "one-step (state, next state) pairs scored, all inside held-out windows",
    "acc": "WB2 anomaly correlation of one-step predictions per variable (mean over its levels), anomalies "
    "against the climatology named in 'climatology' (training runs only), area-weighted over valid cells",
    "acc_persistence": "ACC of persistence (next state = this state) against the same climatology",
    "acc_advective_persistence": "ACC of advective persistence against the same climatology",
    "acc_projected": "ACC of predictions after sapwood.physics.project (where constraints apply)",
    "rmse": "WB2 RMSE per variable in the variable's units: sqrt of the time mean of the area-weighted MSE "
    "over valid cells, levels pooled by mean square",
    "rmse_persistence": "RMSE of persistence",
    "rmse_climatology": "RMSE of the climatology named in 'climatology' (its 'definition' says how it is "
    "built from training runs only)",
    "rmse_calendar_climatology": "next to a planet-parameter climatology only: RMSE of the calendar-key "
    "climatology, " + CALENDAR_DEFINITION,
    "rmse_advective_persistence": "RMSE of the state shifted east by its zonal-mean eastward wind over one "
    "step",
    "rmse_projected": "RMSE of predictions after sapwood.physics.project (declared forcing when stored; "
    "T, zg, rho weighed by 'projection_error_std')",
    "projection_error_std": "the per-channel error scale the projection's least squares weighs T, zg and "
    "rho by",
    "skill_vs_persistence": "per variable 1 - sqrt(mean over held-out runs and the variable's channels of "
    "MSE_model / MSE_persistence), each run and channel (level) in its own units, so no "
    "planet or level outweighs the others (> 0: the model is better; 1 is perfect)",
    "skill_vs_climatology": "the same against the climatology",
    "skill_vs_calendar_climatology": "the same against the calendar-key climatology (next to a "
    "planet-parameter climatology only)",
    "skill_vs_advective_persistence": "the same against advective persistence",
    "mse_over_persistence": "per variable: mean over held-out runs and its channels of MSE_model / "
    "MSE_persistence (each run and channel in its own units)",
    "beats_persistence_every_variable": "skill_vs_persistence > 0 for every variable",
    "groups": "the same figures for subsets: held-out runs with planet parameters inside / outside the "
    "training runs' range (every parameter within [min, max] of the training runs), and the final "
    "parts of training runs",
    "constraints": "each physics constraint: applied, or skipped with the reason",
    "baselines": "each baseline: applied, or skipped with the reason",
    "climatology": "the climatology every 'climatology' number and every ACC uses: key ('planet "
    "parameters', or the calendar key 'calendar month' / 'day of year'), definition, training frames; for "
    "planet parameters per variable the smoothers its channels chose and their leave-one-run-out RMSE on "
    "the training runs next to the pooled mean's; fallback_lookups: calendar keys no training frame had "
    "(the all-training mean is used) or lead-time steps past the training runs' length (the time-mean fit)",
    "violations": "mean violation of predictions (sapwood.physics.violations, in sapwood.physics.UNITS); "
    "energy and momentum against the forcing named in 'forcing'",
    "forcing": "the heating and torque the energy and angular-momentum budgets are held to: declared (the "
    "simulator's, stored with each run by sapwood prepare) or estimated from the states",
    "violations_projected": "the same after projection",
    "violations_truth": "the same for the true next states (the data's own residuals)",
    "rollout": "from the first state of each held-out window: per-step RMSE in units of the per-channel "
    "state std (mean over channels, area-weighted, valid cells) of the surrogate, persistence of the first "
    "state and the climatology; blow_up_step: first step non-finite or above 10x the climatology's; steps: "
    "the rollout length every window allows (at most requested_steps); max_over_climatology: the "
    "largest ratio of the surrogate's curve to the climatology's (bounded error stays near or below 1)",
}


@torch.no_grad()
def predict_all(
    model: torch.nn.Module, states: torch.Tensor, params: torch.Tensor | None, chunk: int = 32
) -> torch.Tensor:
    device = next(model.parameters()).device
    out = [
        model(states[i : i + chunk].to(device), None if params is None else params[i : i + chunk].to(device))
        .float()
        .cpu()
        for i in range(0, states.shape[0], chunk)
    ]
    return torch.cat(out)


def _mean_violations(
    state: torch.Tensor, prediction: torch.Tensor, geometry: Geometry, params: torch.Tensor | None,
    heating: torch.Tensor | None = None, torque: torch.Tensor | None = None,
) -> dict[str, float]:
    v = violations(state, prediction, geometry, params, heating, torque)
    return {k: float(v[k].mean()) for k in VIOLATION_KEYS if k in v}


def eval_split(config: Config, store: CubeStore, holdout_time: float | None) -> Split:
    """The checkpoint's split, or with ``holdout_time`` the final fraction of every training run (up to the
    fraction the model held out)."""
    cube = config.cube
    trained = cube.holdout_time
    if holdout_time is not None and not 0 <= holdout_time <= trained + 1e-12:
        raise SapwoodError(
            f"--holdout-time {holdout_time} would score frames the model trained on: it held out "
            f"cube.holdout_time={trained} of each run; allowed 0 .. {trained} (retrain with "
            "cube.holdout_time to hold out more)"
        )
    split = split_store(store, cube.val_runs, trained)
    if holdout_time is None or holdout_time == trained:
        return split
    finer = split_store(store, cube.val_runs, holdout_time) if holdout_time else None
    held = [w for w in split.held_out if w[0] in split.held_out_runs] + (
        [w for w in finer.held_out if w[0] not in split.held_out_runs] if finer else []
    )
    return Split(
        train=split.train, held_out=sorted(held), held_out_runs=split.held_out_runs, holdout_time=holdout_time
    )


def planet_groups(store: CubeStore, split: Split) -> dict[str, list[int]]:
    """Held-out runs inside / outside the training runs' planet-parameter range (empty without parameters)."""
    if not store.param_names or not split.held_out_runs:
        return {}
    train = store.params[split.train_runs]
    low, high = train.min(0), train.max(0)
    inside = [r for r in split.held_out_runs if np.all((store.params[r] >= low) & (store.params[r] <= high))]
    return {
        "inside_training_range": inside,
        "outside_training_range": [r for r in split.held_out_runs if r not in inside],
    }


@dataclass
class Scored:
    """One-step cases of the held-out windows, appended per window."""

    state: list[torch.Tensor] = field(default_factory=list)
    truth: list[torch.Tensor] = field(default_factory=list)
    pred: list[torch.Tensor] = field(default_factory=list)
    clim: list[torch.Tensor] = field(default_factory=list)
    calendar: list[torch.Tensor] = field(default_factory=list)
    advected: list[torch.Tensor] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    heating: list[torch.Tensor] = field(default_factory=list)
    torque: list[torch.Tensor] = field(default_factory=list)
    run: list[int] = field(default_factory=list)

    def cat(self, name: str, mask: np.ndarray | None = None) -> torch.Tensor | None:
        parts = getattr(self, name)
        if not parts:
            return None
        whole = torch.cat(parts)
        return whole if mask is None else whole[torch.from_numpy(mask)]


@torch.no_grad()
def evaluate_surrogate(
    folder: str | Path, store_path: str | Path, out_dir: str | Path | None = None, rollout_steps: int = 20,
    runs: list[int] | None = None, device: str = "cpu", plots: bool = True, holdout_time: float | None = None,
) -> dict[str, Any]:
    """Evaluate the surrogate in ``folder`` on the store's held-out frames; write ``eval.json`` (+ PNGs) into
    ``out_dir``. ``runs`` restricts scoring to those held-out runs (runs the model trained on are refused)."""
    folder = Path(folder)
    config: Config = load_config(folder / "config.yaml")
    if config.cube is None:
        raise SapwoodError(f"{folder}: not a datacube surrogate (config.yaml has no 'cube:' section)")
    cube = config.cube
    store = CubeStore(store_path)
    check_store_matches(config, store)
    split = eval_split(config, store, holdout_time)
    windows = split.held_out
    if runs is not None:
        held = {w[0] for w in windows}
        if set(runs) - held:
            raise SapwoodError(
                f"--runs {sorted(set(runs) - held)}: not held out (the model trained on them); "
                f"held-out frames are in runs {sorted(held)}"
            )
        windows = [w for w in windows if w[0] in runs]
    if not windows:
        raise SapwoodError(
            f"{store_path}: no held-out frames to score (cube.val_runs={cube.val_runs}, "
            f"holdout_time={split.holdout_time}); train with cube.val_runs or cube.holdout_time"
        )
    model = load(folder, device=device)
    weights = cell_weights(cube)
    geometry = store_geometry(cube)
    climatology, climatology_info = fit_climatology(store, split.train)
    calendar = Climatology(store, split.train) if isinstance(climatology, ParameterClimatology) else None
    baselines = {
        "persistence": "applied",
        "climatology": f"applied ({climatology_info['key']})",
        "advective_persistence": advective_persistence_support(store),
    }
    advect = baselines["advective_persistence"] == "applied"
    radius_index = store.param_names.index("planet_radius") if "planet_radius" in store.param_names else None
    scored = Scored()
    rollouts: dict[str, list[torch.Tensor]] = {"model": [], "persistence": [], "climatology": []}
    state_std = model.state_std.float().cpu()[:, None, None]
    for run, start, stop in windows:
        frames = store.read_rows(int(store.run_rows[run]) + start, stop - start)
        pairs = frames.shape[0] - 1
        params = (
            torch.as_tensor(store.params[run], dtype=torch.float32).expand(pairs, -1)
            if store.param_names
            else None
        )
        scored.state.append(frames[:-1])
        scored.truth.append(frames[1:])
        scored.pred.append(predict_all(model, frames[:-1], params))
        scored.clim.append(climatology.for_times(run, np.arange(start + 1, stop)))
        if calendar is not None:
            scored.calendar.append(calendar.for_times(run, np.arange(start + 1, stop)))
        if params is not None:
            scored.params.append(params)
        scored.run.extend([run] * pairs)
        forcing = store.index["runs"][run].get("declared_forcing")
        if forcing:
            scored.heating.append(torch.tensor(forcing["heating"][start + 1 : stop], dtype=torch.float64))
            scored.torque.append(torch.tensor(forcing["torque"][start + 1 : stop], dtype=torch.float64))
        if advect:
            radius = float(store.params[run][radius_index]) if radius_index is not None else 6.371e6
            scored.advected.append(advective_persistence(frames[:-1], store, cube.dt_hours * 3600, radius))
        steps = min(rollout_steps, pairs)
        if steps:
            rolled = (
                model.rollout(frames[:1].to(device), None if params is None else params[:1].to(device), steps)
                .float()
                .cpu()[0]
            )
            truth = frames[1 : steps + 1] / state_std
            clim_steps = climatology.for_times(run, np.arange(start + 1, start + steps + 1))
            for key, forecast in (
                ("model", rolled),
                ("persistence", frames[:1].expand(steps, -1, -1, -1)),
                ("climatology", clim_steps),
            ):
                rollouts[key].append(weighted_mse(forecast / state_std, truth, weights).mean(1).sqrt())
    result: dict[str, Any] = {
        "checkpoint": str(folder),
        "store": str(store_path),
        "grid": store.describe_grid(),
        "held_out_runs": split.held_out_runs,
        "held_out": {
            "val_runs": cube.val_runs,
            "holdout_time": split.holdout_time,
            "windows": [list(w) for w in windows],
        },
        "definitions": DEFINITIONS,
        "constraints": physics_support(cube),
        "baselines": baselines,
    }
    result.update(_skill(cube, weights, scored, None))
    result["climatology"] = {**climatology_info, "fallback_lookups": climatology.fallbacks}
    run_index = np.asarray(scored.run)
    groups = {name: np.isin(run_index, members) for name, members in planet_groups(store, split).items()}
    time_held = [w[0] for w in windows if w[0] not in split.held_out_runs]
    if time_held:
        groups["final_part_of_training_runs"] = np.isin(run_index, time_held)
    result["groups"] = {
        name: {"runs": sorted({int(r) for r in run_index[mask]}), **_skill(cube, weights, scored, mask)}
        for name, mask in groups.items()
        if mask.any()
    }
    result["violations"] = result["violations_projected"] = result["violations_truth"] = {}
    if geometry is not None:
        state, truth, pred, clim = (scored.cat(k) for k in ("state", "truth", "pred", "clim"))
        params = scored.cat("params")
        declared = len(scored.heating) == len(windows)
        heating, torque = (scored.cat("heating"), scored.cat("torque")) if declared else (None, None)
        result["forcing"] = "declared (stored with the runs)" if declared else "estimated from the states"
        # T, zg and rho weighed by the predicted tendencies (physics.tendency_scale): the model's one-step
        # errors on training pairs underestimate its held-out errors unevenly and made projected T and zg
        # worse
        projected = project(pred, state, geometry, params, heating=heating, torque=torque)
        result["projection_error_std"] = "per-channel RMS of the predicted one-step change (tendency_scale)"
        result["rmse_projected"] = _by_variable(cube, rmse(projected, truth, weights), True)
        result["acc_projected"] = _by_variable(cube, acc(projected, truth, clim, weights))
        for key, forecast in (
            ("violations", pred),
            ("violations_projected", projected),
            ("violations_truth", truth),
        ):
            result[key] = _mean_violations(state, forecast, geometry, params, heating, torque)
    if rollouts["model"]:
        steps = min(len(e) for e in rollouts["model"])
        curves = {k: torch.stack([e[:steps] for e in v]).mean(0) for k, v in rollouts.items()}
        bad = (~torch.isfinite(curves["model"])) | (curves["model"] > 10 * curves["climatology"])
        result["rollout"] = {
            "steps": steps,
            "requested_steps": rollout_steps,
            "runs": len(rollouts["model"]),
            "rmse_std_units": curves["model"].tolist(),
            "persistence": curves["persistence"].tolist(),
            "climatology": curves["climatology"].tolist(),
            "blow_up_step": int(bad.nonzero()[0, 0]) + 1 if bad.any() else None,
            "beats_persistence_until_step": int(
                (curves["model"] < curves["persistence"]).long().cumprod(0).sum()
            ),
            "steps_beating_persistence": int((curves["model"] < curves["persistence"]).sum()),
            "max_over_climatology": float((curves["model"] / curves["climatology"].clamp_min(1e-30)).max()),
        }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        if plots and "rollout" in result:
            _plots(
                out, scored.cat("pred"), scored.cat("truth"), scored.cat("state"), cube, store,
                result["rollout"],
            )
    return result


def _by_variable(cube: CubeModelConfig, values: torch.Tensor, root: bool = False) -> dict[str, float]:
    layered = [v for v in cube.variables if v not in cube.surface_variables]
    return per_variable(values, cube.variables, cube.levels, layered, reduce_sqrt=root)


def _skill(
    cube: CubeModelConfig, weights: torch.Tensor, scored: Scored, mask: np.ndarray | None
) -> dict[str, Any]:
    """Per-variable RMSE / ACC of the model and every applied baseline, skill against them, and the
    per-channel MSE ratio against persistence."""
    state, truth, pred, clim = (scored.cat(k, mask) for k in ("state", "truth", "pred", "clim"))
    forecasts = {"": pred, "persistence": state, "climatology": clim}
    calendar = scored.cat("calendar", mask)
    if calendar is not None:
        forecasts["calendar_climatology"] = calendar
    advected = scored.cat("advected", mask)
    if advected is not None:
        forecasts["advective_persistence"] = advected
    out: dict[str, Any] = {"samples": int(state.shape[0])}
    for name, forecast in forecasts.items():
        suffix = f"_{name}" if name else ""
        out[f"rmse{suffix}"] = _by_variable(cube, rmse(forecast, truth, weights), True)
        if not name.endswith("climatology"):
            out[f"acc{suffix}"] = _by_variable(cube, acc(forecast, truth, clim, weights))
    runs = np.asarray(scored.run) if mask is None else np.asarray(scored.run)[mask]
    model_mse = run_mse(weighted_mse(pred, truth, weights), runs)
    for name, forecast in forecasts.items():
        if name:
            ratios = channel_mse_ratios(
                cube, model_mse, run_mse(weighted_mse(forecast, truth, weights), runs)
            )
            out[f"skill_vs_{name}"] = {k: None if r is None else 1 - r**0.5 for k, r in ratios.items()}
            if name == "persistence":
                out["mse_over_persistence"] = ratios
    skill = out["skill_vs_persistence"]
    out["beats_persistence_every_variable"] = all(v is not None and v > 0 for v in skill.values())
    return out


def run_mse(case_mse: torch.Tensor, runs: np.ndarray) -> torch.Tensor:
    """``[cases, channels]`` -> the time mean per run ``[runs, channels]`` (runs in sorted order)."""
    return torch.stack([case_mse[torch.from_numpy(runs == r)].double().mean(0) for r in np.unique(runs)])


def channel_mse_ratios(
    cube: CubeModelConfig, model_mse: torch.Tensor, baseline_mse: torch.Tensor
) -> dict[str, float | None]:
    """Per variable: the mean over runs and over its channels of MSE_model / MSE_baseline (``[runs,
    channels]`` each), every run and channel in its own units (a planet with large changes, or a level with
    large values, does not outweigh the others); None when the baseline is exact everywhere on the
    variable."""
    ratio = model_mse / baseline_mse.clamp_min(1e-30)
    out: dict[str, float | None] = {}
    for name in cube.variables:
        sl = cube.channel_slice(name)
        scored = baseline_mse[:, sl] > 0
        out[name] = float(ratio[:, sl][scored].mean()) if scored.any() else None
    return out


def _plots(
    out: Path, pred: torch.Tensor, truth: torch.Tensor, state: torch.Tensor, cube: CubeModelConfig,
    store: CubeStore, rollout: dict[str, Any],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variable = cube.variables[0]
    sl = cube.channel_slice(variable)
    level = sl.start + (sl.stop - sl.start) // 2
    valid = torch.as_tensor(store.valid[level])
    extent = (
        None
        if store.curvilinear
        else (float(store.lon.min()), float(store.lon.max()), float(store.lat.min()), float(store.lat.max()))
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (title, values) in zip(axes, (("surrogate", pred), ("persistence", state)), strict=True):
        error = (values[:, level] - truth[:, level]).pow(2).mean(0).sqrt()
        error = torch.where(valid, error, torch.full_like(error, float("nan"))).numpy()
        image = ax.imshow(error, origin="lower", aspect="auto", extent=extent, cmap="magma")
        ax.set_title(f"{title}: RMSE of {variable} (channel {level}) over time")
        ax.set_xlabel("lon" if extent else "x")
        ax.set_ylabel("lat" if extent else "y")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "error_map.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(1, rollout["steps"] + 1)
    for key, label in (
        ("rmse_std_units", "surrogate rollout"),
        ("persistence", "persistence"),
        ("climatology", "climatology"),
    ):
        ax.plot(steps, rollout[key], label=label)
    ax.set_xlabel("autoregressive step")
    ax.set_ylabel("RMSE (state-std units, mean over channels)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rollout.png", dpi=100)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    advect = "rmse_advective_persistence" in result
    calendar = "rmse_calendar_climatology" in result
    columns = (
        ["var", "ACC", "ACC\npers.", "RMSE", "RMSE\npers.", "RMSE\nclim."]
        + (["RMSE\nadvect."] if advect else [])
        + ["skill\npers.", "skill\nclim."]
    )
    kind = (result.get("climatology") or {}).get("key", "calendar")
    clim_caption = (
        "clim. = planet-parameter climatology fitted on the training runs"
        if kind == "planet parameters"
        else f"clim. = climatology of the training frames per {kind}"
    )
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
        caption=f"pers. = persistence, {clim_caption}"
        + (", advect. = advective persistence" if advect else ""),
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "var" else "right", no_wrap=True)
    for name, value in result["acc"].items():
        row = [
            name, f"{value:.4f}", f"{result['acc_persistence'][name]:.4f}", f"{result['rmse'][name]:.3g}",
            f"{result['rmse_persistence'][name]:.3g}", f"{result['rmse_climatology'][name]:.3g}",
        ]
        if advect:
            row.append(f"{result['rmse_advective_persistence'][name]:.3g}")
        row += [_signed(result["skill_vs_persistence"][name]), _signed(result["skill_vs_climatology"][name])]
        table.add_row(*row)
    console = Console()
    console.print(
        f"{result['samples']} held-out cases on {result['grid']}; held-out runs {result['held_out_runs']}, "
        f"holdout_time {result['held_out']['holdout_time']}",
        highlight=False,
    )
    console.print(table)
    if calendar:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in result["rmse_calendar_climatology"].items())
        console.print(
            f"RMSE of the calendar-key climatology pooled over the training planets: {shown}", highlight=False
        )
    for name, group in result["groups"].items():
        skill = ", ".join(f"{k} {_signed(v)}" for k, v in group["skill_vs_persistence"].items())
        console.print(f"{name} (runs {group['runs']}): skill vs persistence {skill}", highlight=False)
    for kind in ("constraints", "baselines"):
        statuses: dict[str, list[str]] = {}
        for name, status in result[kind].items():
            statuses.setdefault(status, []).append(name)
        for status, names in statuses.items():
            console.print(f"{kind} {', '.join(names)}: {status}", highlight=False)
    for key in ("violations", "violations_projected"):
        if result[key]:
            shown = ", ".join(f"{k} {v:.3g} {UNITS.get(k, '')}".rstrip() for k, v in result[key].items())
            console.print(f"{key}: {shown}")
    if result.get("forcing"):
        console.print(
            f"energy and angular momentum held to the heating and torque {result['forcing']}", highlight=False
        )
    console.print(skill_sentence(result), highlight=False)
    r = result.get("rollout")
    if r:
        console.print(rollout_sentence(r), highlight=False)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def skill_sentence(result: dict[str, Any]) -> str:
    """What the skill table says, in one sentence: which variables beat persistence, and what that means."""
    return _persistence_sentence(result) + _climatology_sentence(result)


def _climatology_sentence(result: dict[str, Any]) -> str:
    skill = {k: v for k, v in (result.get("skill_vs_climatology") or {}).items() if v is not None}
    ahead = [name for name, value in skill.items() if value > 0]
    if not skill:
        return ""
    kind = (result.get("climatology") or {}).get("key")
    which = (
        "the planet-parameter climatology (fitted on the training planets)"
        if kind == "planet parameters"
        else "the climatology of the training frames"
    )
    if len(ahead) == len(skill):
        return (
            f" It beats {which} on every variable (skill {min(skill.values()):+.2f} to "
            f"{max(skill.values()):+.2f})."
        )
    behind = [name for name in skill if name not in ahead]
    return f" It beats {which} on {len(ahead)} of {len(skill)} variables (not on {', '.join(behind)})."


def _persistence_sentence(result: dict[str, Any]) -> str:
    skill = {k: v for k, v in result["skill_vs_persistence"].items() if v is not None}
    ahead = [name for name, value in skill.items() if value > 0]
    behind = [name for name, value in skill.items() if value <= 0]
    definition = (
        "skill = 1 - RMSE / RMSE of the baseline, per held-out run and level: above 0 beats it, 1 is perfect"
    )
    if not behind:
        return (
            f"The surrogate beats persistence on every variable (skill {min(skill.values()):+.2f} to "
            f"{max(skill.values()):+.2f}; {definition})."
        )
    if not ahead:
        return (
            "The surrogate does not beat persistence on any variable yet "
            f"(skill {min(skill.values()):+.2f} to {max(skill.values()):+.2f}; {definition}): "
            "it needs more training steps, runs or width."
        )
    return (
        f"The surrogate beats persistence on {', '.join(ahead)} but not yet on {', '.join(behind)} "
        f"({definition}); the variables behind need more training steps, runs or width."
    )


def rollout_sentence(rollout: dict[str, Any]) -> str:
    """The autoregressive rollout in words: final error against persistence, blow-up, steps ahead."""
    steps, ahead = rollout["steps"], rollout["beats_persistence_until_step"]
    requested = rollout.get("requested_steps", steps)
    cut = f" (of {requested} requested: the held-out windows are shorter)" if requested > steps else ""
    text = (
        f"Rollout of {steps} steps{cut}: final error {rollout['rmse_std_units'][-1]:.3g} state-std units "
        f"(persistence {rollout['persistence'][-1]:.3g}); "
    )
    blow_up = rollout["blow_up_step"]
    text += "no blow-up" if blow_up is None else f"blows up at step {blow_up}"
    if ahead == 0:
        return text + "; behind persistence from the first step."
    if ahead >= steps:
        return text + "; ahead of persistence at every step."
    return text + f"; ahead of persistence for the first {ahead} of {steps} steps."
