"""Reference forecasts a surrogate must beat, built without looking at the frames being scored.

- **Persistence**: the next state equals this one.
- **Climatology** (:class:`Climatology`): the mean of the *training* frames per grid cell and channel for the
  same calendar month (monthly series) or day of year (daily and finer), in each run's own calendar
  (cftime); a month or day the training frames never reach falls back to the mean of all training frames.
  Held-out frames never enter it.
- **Planet-parameter climatology** (:class:`ParameterClimatology`, stores whose runs carry planet parameters,
  e.g. the simulator's): per grid cell and channel a function of the planet parameters fitted on the
  training runs only, so each held-out planet is scored against what its parameters alone predict rather than
  against the mean of every training planet pooled. Candidates, each a linear smoother of the training runs'
  fields (the fitted field at parameters ``p`` is ``sum_i w_i(p) y_i``): the pooled mean; ridge regression
  on the standardized parameters, on their standardized logarithms, or on a full quadratic in the
  logarithms (intercept unpenalized, penalty ``lambda`` on a fixed grid); a Gaussian kernel average in the
  standardized logarithms (bandwidths on a fixed grid). Each target is either the run's mean over its
  training frames (one field per run) or, where every training run is scored from its first frame with the
  same length (a *lead-time* climatology), the run's frame at the same step index. Per channel the
  candidate and target with the smallest leave-one-run-out error over the training runs (area-weighted MSE
  against every training frame of the left-out run, each run counted once) are chosen: deterministic,
  closed form, no held-out frame or parameter involved.
- **Advective persistence** (:func:`advective_persistence`): each field shifted east by the zonal-mean
  eastward wind of its level and latitude over one step (linear interpolation, periodic in longitude);
  2-D fields move with the mean wind of the column; cells whose upstream neighbours are masked keep
  persistence. Needs ``u`` (or a variable with standard_name ``eastward_wind``) on a regular grid that spans
  every longitude, and steps of at most a day.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sapwood.data.cf import time_keys
from sapwood.data.store import CubeStore
from sapwood.skill import normalized_weights

EARTH_RADIUS = 6.371e6  # m, for advective persistence when a store carries no planet radius
MAX_ADVECTION_HOURS = 24
BLOCK_FRAMES = 64  # frames read at once while accumulating


class Climatology:
    """Per-key (month or day of year) means of training frames; :meth:`for_times` looks them up."""

    def __init__(self, store: CubeStore, windows: list[tuple[int, int, int]]) -> None:
        frames = store.memmap()
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        total = np.zeros(store.row_shape)
        rows = 0
        for run, start, stop in windows:
            run_keys = self.keys(store, run)
            for begin in range(start, stop, BLOCK_FRAMES):
                end = min(stop, begin + BLOCK_FRAMES)
                keys = run_keys[begin:end]
                first = int(store.run_rows[run]) + begin
                block = np.asarray(frames[first : first + end - begin], dtype=np.float64)
                for key in np.unique(keys):
                    chosen = block[keys == key]
                    sums[int(key)] = sums.get(int(key), 0) + chosen.sum(0)
                    counts[int(key)] = counts.get(int(key), 0) + chosen.shape[0]
                total += block.sum(0)
                rows += block.shape[0]
        self.store = store
        self.overall = (total / max(rows, 1)).astype(np.float32)
        self.means = {key: (sums[key] / counts[key]).astype(np.float32) for key in sums}
        self.training_frames = rows
        self.fallbacks = 0

    @staticmethod
    def keys(store: CubeStore, run: int) -> np.ndarray:
        entry = store.index["runs"][run]
        return time_keys(store.run_days(run), entry["calendar"], bool(entry["monthly"]))

    def for_times(self, run: int, times: np.ndarray) -> torch.Tensor:
        """Climatology ``[len(times), channels, lat, lon]`` for times (indices) of ``run``."""
        keys = self.keys(self.store, run)[np.asarray(times)]
        out = []
        for key in keys:
            mean = self.means.get(int(key))
            if mean is None:
                self.fallbacks += 1
                mean = self.overall
            out.append(mean)
        return torch.from_numpy(np.stack(out))


RIDGE_PENALTIES = (0.0, *np.logspace(-4, 3, 15).tolist())  # 0: least squares (when well posed)
KERNEL_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)  # times sqrt(number of parameters), in standardized log units
FEATURE_SETS = ("linear", "log", "log_quadratic")
MIN_PARAMETER_RUNS = 3  # leave-one-run-out needs at least two runs left to fit
LEAD_TIME_BYTES = 1 << 29  # the lead-time climatology keeps every training frame: at most this much


def parameter_climatology_support(store: CubeStore, windows: list[tuple[int, int, int]]) -> str:
    """``"applied"`` or ``"skipped: <reason>"`` for :class:`ParameterClimatology` on ``windows``."""
    if not store.param_names:
        return "skipped: the store's runs carry no planet parameters"
    runs = sorted({run for run, _, _ in windows})
    if len(runs) < MIN_PARAMETER_RUNS:
        return f"skipped: {len(runs)} training runs; a fit on parameters needs at least {MIN_PARAMETER_RUNS}"
    if not np.any(np.ptp(store.params[runs], axis=0) > 0):
        return "skipped: every training run has the same planet parameters"
    return "applied"


class ParameterClimatology:
    """Per cell and channel, a function of the planet parameters fitted on the training runs (module
    docstring); :meth:`for_times` gives it for any run's parameters and times. ``choice[c]`` names the
    candidate channel ``c`` uses, ``loo_rmse[c]`` its leave-one-run-out RMSE and ``loo_rmse_pooled[c]`` the
    pooled mean's."""

    def __init__(self, store: CubeStore, windows: list[tuple[int, int, int]]) -> None:
        support = parameter_climatology_support(store, windows)
        if support != "applied":
            raise ValueError(f"{store.path}: no planet-parameter climatology ({support})")
        frames = store.memmap()
        lengths: dict[int, int] = {}
        for run, start, stop in windows:
            lengths[run] = lengths.get(run, 0) + stop - start
        self.runs = sorted(lengths)
        starts = {run: [s for r, s, _ in windows if r == run] for run in self.runs}
        steps = lengths[self.runs[0]]
        self.lead_steps = (
            steps
            if all(lengths[r] == steps and starts[r] == [0] for r in self.runs)
            and len(self.runs) * steps * int(np.prod(store.row_shape)) * 8 <= LEAD_TIME_BYTES
            else 0
        )
        n, shape = len(self.runs), store.row_shape
        mean, square = np.zeros((n, *shape)), np.zeros((n, *shape))
        lead = np.zeros((n, self.lead_steps, *shape)) if self.lead_steps else None
        for i, run in enumerate(self.runs):
            for _, start, stop in (w for w in windows if w[0] == run):
                for begin in range(start, stop, BLOCK_FRAMES):
                    end = min(stop, begin + BLOCK_FRAMES)
                    first = int(store.run_rows[run]) + begin
                    block = np.asarray(frames[first : first + end - begin], dtype=np.float64)
                    mean[i] += block.sum(0)
                    square[i] += (block**2).sum(0)
                    if lead is not None:
                        lead[i, begin:end] = block
            mean[i] /= lengths[run]
            square[i] /= lengths[run]
        self.store = store
        self.training_frames = int(sum(lengths.values()))
        params = store.params[self.runs]
        self.param_mean = params.mean(0)
        self.param_std = np.maximum(params.std(0), 1e-6 * np.abs(self.param_mean))
        self.varying = np.ptp(params, axis=0) > 0
        positive = params > 0
        self.log_floor = np.where(positive.all(0), params.min(0) * 1e-3, 0.0)
        logs = self._logs(params)
        self.log_mean, self.log_std = logs.mean(0), np.maximum(logs.std(0), 1e-12)
        self.fields, self.lead = mean, lead
        valid = store.valid
        positive = np.array([bool(np.all(mean[:, c][:, valid[c]] > 0)) for c in range(shape[0])])
        # log target: the geometric fit exp(sum_i w_i log y_i), for channels positive in every training run
        self.log_fields = np.log(np.where(positive[None, :, None, None] & (mean > 0), mean, 1.0))
        self.log_channels = positive
        weights = normalized_weights(
            torch.as_tensor(store.area), torch.as_tensor(valid)
        ).double().numpy()  # [C, H, W], mean 1 per channel

        def mean_error(prediction: np.ndarray) -> np.ndarray:
            # per channel: mean over runs and cells (area-weighted) of the mean over the run's training
            # frames of (frame - prediction)^2
            err = square - 2 * mean * prediction + prediction**2
            return (err * weights).mean(axis=(0, 2, 3))

        def smooth(matrix: np.ndarray, values: np.ndarray) -> np.ndarray:
            return (matrix @ values.reshape(n, -1)).reshape(values.shape)

        self.candidates: list[tuple[str, Any, str]] = []  # (kind, setting, target: mean, log or lead)
        errors = []
        for kind, setting in self._smoothers():
            loo = self._loo_matrix(kind, setting, params)
            if loo is None:
                continue
            self.candidates.append((kind, setting, "mean"))
            errors.append(mean_error(smooth(loo, mean)))
            if positive.any():
                self.candidates.append((kind, setting, "log"))
                error = mean_error(np.exp(smooth(loo, self.log_fields)))
                errors.append(np.where(positive, error, np.inf))
            if lead is not None:
                self.candidates.append((kind, setting, "lead"))
                err = ((lead - smooth(loo, lead)) ** 2).mean(1)
                errors.append((err * weights).mean(axis=(0, 2, 3)))
        errors = np.maximum(np.stack(errors), 0)  # [candidates, C]
        self.loo_mse = errors
        self.choice_index = errors.argmin(0)  # ties: the earlier (simpler) candidate
        self.loo_rmse = np.sqrt(errors[self.choice_index, np.arange(errors.shape[1])])
        self.loo_rmse_pooled = np.sqrt(errors[0])
        self.choice = [self.name(self.candidates[i]) for i in self.choice_index]
        self.fallbacks = 0

    # --- features and smoothers ---------------------------------------------------------------------------
    def _logs(self, params: np.ndarray) -> np.ndarray:
        positive = self.log_floor > 0
        return np.where(positive, np.log(np.maximum(params, np.where(positive, self.log_floor, 1))), params)

    def _features(self, kind: str, params: np.ndarray) -> np.ndarray:
        params = np.atleast_2d(params)
        if kind == "linear":
            return ((params - self.param_mean) / self.param_std)[:, self.varying]
        logs = ((self._logs(params) - self.log_mean) / self.log_std)[:, self.varying]
        if kind == "log":
            return logs
        pairs = [logs[:, a] * logs[:, b] for a in range(logs.shape[1]) for b in range(a, logs.shape[1])]
        return np.column_stack([logs, *pairs])

    @staticmethod
    def _smoothers() -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [("pooled", None)]
        out += [("ridge", (features, penalty)) for features in FEATURE_SETS for penalty in RIDGE_PENALTIES]
        out += [("kernel", bandwidth) for bandwidth in KERNEL_BANDWIDTHS]
        return out

    @staticmethod
    def name(candidate: tuple[str, Any, str]) -> str:
        kind, setting, target = candidate
        target = {"mean": "", "log": ", log values", "lead": ", lead time"}[target]
        if kind == "ridge":
            return f"ridge on {setting[0]} parameters, lambda {setting[1]:.3g}{target}"
        if kind == "kernel":
            return f"kernel average, bandwidth {setting:g}{target}"
        return f"pooled mean{target}"

    def _weights(self, kind: str, setting: Any, query: np.ndarray) -> np.ndarray:
        """``[queries, runs]``: the fitted field at ``query`` parameters is ``weights @ fields``."""
        params = self.store.params[self.runs]
        query = np.atleast_2d(query)
        n = len(self.runs)
        if kind == "pooled":
            return np.full((query.shape[0], n), 1 / n)
        if kind == "kernel":
            train, at = self._features("log", params), self._features("log", query)
            distance = ((at[:, None] - train[None]) ** 2).sum(-1)
            scale = 2 * (setting**2) * train.shape[1]
            logits = -distance / scale
            w = np.exp(logits - logits.max(1, keepdims=True))
            return w / w.sum(1, keepdims=True)
        features, penalty = setting
        design = np.column_stack([np.ones(n), self._features(features, params)])
        at = np.column_stack([np.ones(query.shape[0]), self._features(features, query)])
        gram = design.T @ design + penalty * np.diag([0.0] + [1.0] * (design.shape[1] - 1))
        return at @ np.linalg.solve(gram, design.T)

    def _loo_matrix(self, kind: str, setting: Any, params: np.ndarray) -> np.ndarray | None:
        """``[runs, runs]``: row i gives run i's prediction from the other runs; None when ill-posed."""
        n = len(self.runs)
        if kind == "pooled":
            return (1 - np.eye(n)) / (n - 1)
        if kind == "kernel":
            train = self._features("log", params)
            distance = ((train[:, None] - train[None]) ** 2).sum(-1)
            logits = -distance / (2 * (setting**2) * train.shape[1])
            np.fill_diagonal(logits, -np.inf)
            w = np.exp(logits - logits.max(1, keepdims=True))
            return w / w.sum(1, keepdims=True)
        features, penalty = setting
        design = np.column_stack([np.ones(n), self._features(features, params)])
        if penalty == 0 and (
            design.shape[1] >= n - 1 or np.linalg.matrix_rank(design) < design.shape[1]
        ):
            return None
        hat = self._weights(kind, setting, params)
        leverage = np.diag(hat)
        if np.any(leverage > 1 - 1e-8):
            return None
        # leave-one-out residual of a linear smoother with an exact refit: (y_i - yhat_i) / (1 - h_ii)
        return np.eye(n) - (np.eye(n) - hat) / (1 - leverage)[:, None]

    # --- lookups ------------------------------------------------------------------------------------------
    def for_times(self, run: int, times: np.ndarray) -> torch.Tensor:
        """Climatology ``[len(times), channels, lat, lon]`` for times (indices) of ``run``: the fit at the
        run's planet parameters; channels with a lead-time target take the fit at each step index (steps
        past the training runs' length take the time-mean fit of the same smoother)."""
        times = np.asarray(times, dtype=np.int64)
        out = np.empty((len(times), *self.fields.shape[1:]))
        params = self.store.params[run]
        for index in np.unique(self.choice_index):
            kind, setting, target = self.candidates[index]
            channels = self.choice_index == index
            w = self._weights(kind, setting, params)[0]
            if target == "log":
                out[:, channels] = np.exp(np.tensordot(w, self.log_fields[:, channels], axes=1))
                continue
            out[:, channels] = np.tensordot(w, self.fields[:, channels], axes=1)
            if target == "lead":
                within = times < self.lead_steps
                self.fallbacks += int((~within).sum())
                for i in np.nonzero(within)[0]:
                    out[i, channels] = np.tensordot(w, self.lead[:, times[i]][:, channels], axes=1)
        return torch.from_numpy(out.astype(np.float32))

    def describe(self, variables: list[tuple[str, slice]]) -> dict[str, Any]:
        """Per variable: the candidates its channels chose, their leave-one-run-out RMSE and the pooled
        mean's (training runs only, in the variable's units, levels pooled by mean square)."""
        out: dict[str, Any] = {}
        for name, sl in variables:
            out[name] = {
                "chosen": sorted(set(self.choice[sl])),
                "loo_rmse": float(np.sqrt((self.loo_rmse[sl] ** 2).mean())),
                "loo_rmse_pooled": float(np.sqrt((self.loo_rmse_pooled[sl] ** 2).mean())),
            }
        return out


CALENDAR_DEFINITION = (
    "the mean of the training frames per grid cell and channel for the target's calendar month (monthly "
    "series) or day of year (finer series), pooled over the training runs; never held-out frames"
)
PARAMETER_DEFINITION = (
    "per grid cell and channel a function of the planet parameters fitted on the training runs only "
    "(sapwood.baselines.ParameterClimatology): the candidate smoother and target (pooled mean; ridge on "
    "standardized parameters, their logarithms or a quadratic in the logarithms; Gaussian kernel average; "
    "fitted to each run's time mean, its logarithm, or its frame at the same step index) with the smallest "
    "leave-one-run-out error over the training runs, per channel; evaluated at the scored run's parameters"
)


def fit_climatology(
    store: CubeStore, windows: list[tuple[int, int, int]]
) -> tuple[Climatology | ParameterClimatology, dict[str, Any]]:
    """The climatology evaluation scores against, and its description: the planet-parameter climatology
    where the training runs carry varying planet parameters, else the calendar-key climatology."""
    support = parameter_climatology_support(store, windows)
    names = [(v["name"], store.channel_slice(v["name"])) for v in store.variables]
    if support == "applied":
        fitted = ParameterClimatology(store, windows)
        return fitted, {
            "key": "planet parameters",
            "definition": PARAMETER_DEFINITION,
            "training_runs": fitted.runs,
            "training_frames": fitted.training_frames,
            "lead_steps": fitted.lead_steps,
            "variables": fitted.describe(names),
        }
    calendar = Climatology(store, windows)
    monthly = any(r["monthly"] for r in store.index["runs"])
    return calendar, {
        "key": "calendar month" if monthly else "day of year",
        "definition": CALENDAR_DEFINITION,
        "training_frames": calendar.training_frames,
        "planet_parameters": support,
    }


def advection_channel(store: CubeStore) -> slice | None:
    """The channels of the eastward wind in ``store`` (by name ``u`` or standard_name), or None."""
    for v in store.variables:
        if v["name"] == "u" or v.get("standard_name") == "eastward_wind":
            return store.channel_slice(v["name"])
    return None


def advective_persistence_support(store: CubeStore) -> str:
    """``"applied"`` or ``"skipped: <reason>"``."""
    if store.step_hours > MAX_ADVECTION_HOURS:
        return (
            f"skipped: the time step is {store.step_hours:g} h; advection by the mean wind over more "
            f"than {MAX_ADVECTION_HOURS} h is not a forecast"
        )
    if advection_channel(store) is None:
        return "skipped: needs an eastward wind (u or standard_name eastward_wind)"
    if store.curvilinear:
        return "skipped: needs a regular latitude-longitude grid"
    lon = store.lon
    span = float(lon[-1] - lon[0] + np.median(np.diff(lon))) if lon.size > 1 else 0.0
    if abs(span - 360) > 1e-3:
        return "skipped: needs a grid spanning every longitude (periodic)"
    return "applied"


def advective_persistence(
    state: torch.Tensor, store: CubeStore, dt_seconds: float, radius: torch.Tensor | float = EARTH_RADIUS
) -> torch.Tensor:
    """States ``[N, C, H, W]`` advected one step by their zonal-mean eastward wind (see the module docstring);
    ``radius`` per sample ``[N]`` or one value."""
    wind = advection_channel(store)
    valid = torch.as_tensor(store.valid, dtype=torch.float32)
    u = state[:, wind].float()
    u_valid = valid[wind]
    zonal = (u * u_valid).sum(-1) / u_valid.sum(-1).clamp_min(1)  # [N, L, H]
    lat = torch.deg2rad(torch.as_tensor(store.lat, dtype=torch.float32))
    dlon = 2 * math.pi / store.shape[3]
    radius = torch.as_tensor(radius, dtype=torch.float32).reshape(-1, 1, 1)
    shift = zonal * dt_seconds / (radius * torch.cos(lat).clamp_min(1e-3) * dlon)  # grid points east
    per_channel = []
    for v in store.variables:
        count = v["levels"] or 1
        if v["levels"] and count == shift.shape[1]:
            per_channel.append(shift)
        else:
            per_channel.append(shift.mean(1, keepdim=True).expand(-1, count, -1))
    shift = torch.cat(per_channel, dim=1)  # [N, C, H]
    width = state.shape[-1]
    source = torch.arange(width, dtype=torch.float32) - shift[..., None]  # where each cell's air came from
    left = torch.floor(source)
    frac = source - left
    left = left.long() % width
    right = (left + 1) % width
    x = state.float()
    moved = (1 - frac) * x.gather(-1, left) + frac * x.gather(-1, right)
    mask = valid.expand_as(x)
    from_valid = (1 - frac) * mask.gather(-1, left) + frac * mask.gather(-1, right)
    return torch.where(mask.bool() & (from_valid > 1 - 1e-6), moved, x)  # next to masked cells: persistence
