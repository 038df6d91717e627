"""Reference forecasts a surrogate must beat, built without looking at the frames being scored.

- **Persistence**: the next state equals this one.
- **Climatology** (:class:`Climatology`): the mean of the *training* frames per grid cell and channel for the
  same calendar month (monthly series) or day of year (daily and finer), in each run's own calendar
  (cftime); a month or day the training frames never reach falls back to the mean of all training frames.
  Held-out frames never enter it.
- **Advective persistence** (:func:`advective_persistence`): each field shifted east by the zonal-mean
  eastward wind of its level and latitude over one step (linear interpolation, periodic in longitude);
  2-D fields move with the mean wind of the column; cells whose upstream neighbours are masked keep
  persistence. Needs ``u`` (or a variable with standard_name ``eastward_wind``) on a regular grid that spans
  every longitude, and steps of at most a day.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sapwood.data.cf import time_keys
from sapwood.data.store import CubeStore

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
