"""The datacube-surrogate task for the training loop (``train.task: cube``).

Data: a prepared cube store (``cube.data``, from ``sapwood prepare``). A cube section that names only
``data:`` takes variables, levels, grid, planet parameters and time step from the store
(:func:`fill_from_store`); one that names them is checked against the store, grid coordinates and cell
areas included (:func:`check_store_matches`). Held out and never trained on: the last ``cube.val_runs``
runs and the final ``cube.holdout_time`` of every other run (:func:`sapwood.data.loader.split_store`, the one
definition). Normalization statistics come from the training frames only (per-channel state mean/std over
valid cells, per-channel std of one-step tendencies, planet-parameter mean/std over the training runs) and
are written into ``config.cube.normalization`` so the checkpoint carries them.

Loss = data loss + physics loss. Data loss (:func:`data_loss`): per sample and channel, the area-weighted
mean squared error of the predicted next state over valid cells divided by the sample's own one-step change
(its persistence error, floored), through ``log(1 + r)``: each planet and level counts alike. Physics loss:
:func:`sapwood.physics.physics_loss` with the weights of ``cube.physics``, where the store supports the
constraints (:func:`physics_support`); otherwise skipped. Its energy and angular-momentum budgets use the
store's declared forcing of each pair (:class:`DeclaredForcing`) when every run carries it, else the forcing
estimated from the states. Training pairs are augmented as ``cube.augment`` says (:class:`PairAugment`).

Multi-step training (``cube.rollout``): from optimizer step ``start`` the samples are windows of K+1
consecutive training frames of one run (:class:`WindowBatches`, the same held-out split), the model is
unrolled K steps on its own predictions and the loss is the mean of every step's data and physics loss
(:meth:`CubeTask.unrolled_loss`); K follows the curriculum ``steps`` (:class:`CurriculumBatches`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapwood.config import (
    Config,
    CubeGrid,
    CubeModelConfig,
    CubeNormalization,
    CubeRolloutConfig,
    ModelConfig,
    PhysicsLossConfig,
    TrainConfig,
)
from sapwood.data import augment_cpu
from sapwood.data.augment import (
    ChannelRoles,
    Noise,
    NoiseDraw,
    PreparedPlanes,
    RollAndFlip,
    augment_planes,
)
from sapwood.data.loader import Batch, CubeLoader, Split, split_store
from sapwood.data.store import CubeStore
from sapwood.errors import ConfigError, SapwoodError
from sapwood.model import build_model
from sapwood.model.cube import encode_array, grid_area, grid_digest, grid_valid
from sapwood.physics import Geometry, physics_loss, violations

SIGMA_COORDINATE = "atmosphere_sigma_coordinate"
STATS_BLOCK = 64  # frames read at once for the normalization statistics
STAGE_SEED_STRIDE = 1_000_003  # cube.rollout: seed offset between curriculum stages
PERSISTENCE_FLOOR = 0.05  # data loss: a sample's own change below this many tendency stds counts as this
PHYSICS_NAMES = {  # CF standard_name -> the name sapwood.physics uses, and whether the variable has levels
    "air_temperature": ("T", True),
    "eastward_wind": ("u", True),
    "northward_wind": ("v", True),
    "specific_humidity": ("q", True),
    "air_density": ("rho", True),
    "geopotential_height": ("zg", True),
    "surface_air_pressure": ("ps", False),
}
CONSTRAINT_NEEDS = {
    "mass": ("ps",), "water": ("ps", "q"), "energy": ("ps", "T"), "momentum": ("ps", "u"),
    "thermo": ("ps", "T"),
}


# --- the store's grid in the config -------------------------------------------------------------------------
def store_grid(store: CubeStore) -> CubeGrid:
    """The grid of ``store`` as the config section a checkpoint carries."""
    vertical = store.index.get("vertical") or {}
    lat, lon = (np.asarray([]), np.asarray([])) if store.curvilinear else (store.lat, store.lon)
    return CubeGrid(
        description=store.describe_grid(), lat=lat.tolist(), lon=lon.tolist(), levels=store.levels.tolist(),
        vertical=vertical.get("standard_name", ""), curvilinear=store.curvilinear,
        global_grid=store.global_grid, area=encode_array(store.area),
        valid=encode_array(store.valid, bits=True),
        digest=grid_digest(store.lat, store.lon, store.levels, store.area),
        standard_names={v["name"]: v["standard_name"] for v in store.variables if v.get("standard_name")},
    )


def fill_from_store(cube: CubeModelConfig, store: CubeStore) -> None:
    """Set what the cube section leaves out (variables, levels, grid, planet parameters, time step) from the
    store."""
    given = cube.model_fields_set
    if "variables" not in given:
        cube.surface_variables = []  # assignments are validated: surface variables must stay in variables
        cube.variables = [v["name"] for v in store.variables]
        cube.surface_variables = [v["name"] for v in store.variables if not v["levels"]]
    if not cube.levels:
        cube.levels = max([v["levels"] for v in store.variables] + [1])
    if not cube.lat or not cube.lon:
        cube.lat, cube.lon = store.shape[2], store.shape[3]
    if "planet_params" not in given:
        cube.planet_params = list(store.param_names)
    if "dt_hours" not in given and store.step_hours > 0:
        cube.dt_hours = store.step_hours
    if cube.grid is None:
        cube.grid = store_grid(store)
    if not cube.units:
        cube.units = {v["name"]: v.get("units", "") for v in store.variables}


def check_store_matches(config: Config, store: CubeStore) -> None:
    """One-line :class:`ConfigError` when the store's variables, channels, grid or planet parameters differ
    from the config's (a checkpoint's or a training config's)."""
    cube = config.cube
    names = [v["name"] for v in store.variables]
    if names != cube.variables:
        raise ConfigError(f"cube.variables={cube.variables} do not match the store {store.path} ({names})")
    if store.row_shape != (cube.channels, cube.lat, cube.lon):
        raise ConfigError(
            f"cube grid {(cube.channels, cube.lat, cube.lon)} (channels, lat, lon) does not match "
            f"the store {store.path} {store.row_shape}"
        )
    if cube.grid is not None:
        digest = grid_digest(store.lat, store.lon, store.levels, store.area)
        if digest != cube.grid.digest:
            raise ConfigError(
                f"the store {store.path} has grid {store.describe_grid()}; the model was trained on "
                f"{cube.grid.description}"
            )
    elif not store.curvilinear:
        expected = np.rad2deg(Geometry.default(cube).lat.double().numpy())
        if store.lat.shape != expected.shape or not np.allclose(store.lat, expected, atol=1e-4):
            raise ConfigError(
                f"the store {store.path} has grid {store.describe_grid()}; the model assumes the "
                f"simulator's grid lat [{expected[0]:g} .. {expected[-1]:g}]"
            )
    if cube.planet_params and cube.planet_params != store.param_names:
        raise ConfigError(
            f"cube.planet_params={cube.planet_params} do not match the store's {store.param_names}"
        )


# --- statistics from training frames only -------------------------------------------------------------------
def store_normalization(store: CubeStore, windows: list[tuple[int, int, int]]) -> CubeNormalization:
    """State mean/std, anomaly std (states minus their own mean over the grid) and tendency std per channel
    over the valid cells of the training ``windows`` only, and planet-parameter mean/std over their runs
    (float64 accumulation)."""
    frames = store.memmap()
    valid = store.valid.astype(np.float64)
    cells = np.maximum(valid.sum(axis=(1, 2)), 1)
    total, total_sq, count = np.zeros(store.shape[1]), np.zeros(store.shape[1]), 0
    anomaly_sq = np.zeros(store.shape[1])
    diff_sum, diff_sq, pairs = np.zeros(store.shape[1]), np.zeros(store.shape[1]), 0
    for run, start, stop in windows:
        first = int(store.run_rows[run])
        for begin in range(start, stop - 1, STATS_BLOCK):
            end = min(stop, begin + STATS_BLOCK + 1)  # one frame of overlap for the tendency across blocks
            block = np.asarray(frames[first + begin : first + end], dtype=np.float64) * valid
            states = block if end == stop else block[:-1]  # each frame counted once
            total += states.sum(axis=(0, 2, 3))
            total_sq += (states**2).sum(axis=(0, 2, 3))
            own_mean = states.sum(axis=(2, 3), keepdims=True) / cells[:, None, None]
            anomaly_sq += (((states - own_mean) * valid) ** 2).sum(axis=(0, 2, 3))
            count += states.shape[0]
            diff = block[1:] - block[:-1]
            diff_sum += diff.sum(axis=(0, 2, 3))
            diff_sq += (diff**2).sum(axis=(0, 2, 3))
            pairs += diff.shape[0]
    mean = total / (count * cells)
    std = np.sqrt(np.maximum(total_sq / (count * cells) - mean**2, 0))
    std = np.where(std > 0, std, 1.0)
    anomaly_std = np.sqrt(anomaly_sq / (count * cells))
    anomaly_std = np.where(anomaly_std > 1e-6 * std, anomaly_std, std)
    tendency_mean = diff_sum / (max(pairs, 1) * cells)
    tendency_std = np.sqrt(np.maximum(diff_sq / (max(pairs, 1) * cells) - tendency_mean**2, 0)) + 1e-6 * std
    runs = sorted({run for run, _, _ in windows})
    params = store.params[runs] if store.param_names else np.zeros((0, 0))
    return CubeNormalization(
        state_mean=mean.tolist(), state_std=std.tolist(), tendency_std=tendency_std.tolist(),
        param_mean=params.mean(0).tolist() if params.size else [],
        param_std=np.maximum(params.std(0), 1e-6 * np.abs(params.mean(0))).tolist() if params.size else [],
        anomaly_std=anomaly_std.tolist(),
    )


# --- weights and physics on the store's grid ----------------------------------------------------------------
def cell_weights(cube: CubeModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[channels, lat, lon]``: cell-area weights times the mask, scaled so each channel's weights average 1
    over the grid (a weighted mean is ``(w * x).mean()``; fully masked channels weigh 0)."""
    weights = grid_area(cube)[None] * grid_valid(cube)
    mean = weights.mean(axis=(1, 2), keepdims=True)
    weights = np.divide(weights, mean, out=np.zeros_like(weights), where=mean > 0)
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def physics_view(cube: CubeModelConfig) -> CubeModelConfig:
    """The cube with its variables under the names :mod:`sapwood.physics` uses (``T``, ``u``, ``v``, ``q``,
    ``ps``, ``rho``, ``zg``), found by CF standard_name where the store's names differ (e.g. ``ta`` or
    ``sp``); the channel layout is unchanged. A name already taken, or a variable with the wrong
    dimensionality (a 2-D ``air_temperature`` at 2 m), is left as it is."""
    if cube.grid is None or not cube.grid.standard_names:
        return cube
    renamed = {}
    taken = set(cube.variables)
    for name in cube.variables:
        canonical, layered = PHYSICS_NAMES.get(cube.grid.standard_names.get(name, ""), (None, False))
        if canonical and canonical not in taken and layered == (name not in cube.surface_variables):
            renamed[name] = canonical
            taken.add(canonical)
    if not renamed:
        return cube
    return cube.model_copy(
        update={
            "variables": [renamed.get(n, n) for n in cube.variables],
            "surface_variables": [renamed.get(n, n) for n in cube.surface_variables],
        }
    )


def physics_support(cube: CubeModelConfig) -> dict[str, str]:
    """Each constraint of :mod:`sapwood.physics` -> ``"applied"`` or ``"skipped: <reason>"`` for this grid and
    these variables (the budgets need ``ps`` and sigma levels on an unmasked global grid; variables are
    matched by name or CF standard_name, :func:`physics_view`)."""
    cube = physics_view(cube)
    grid = cube.grid
    reason = None
    if grid is not None:
        if grid.curvilinear or not grid.global_grid:
            reason = "the budgets need a global latitude-longitude grid; this one is " + grid.description
        elif grid.vertical != SIGMA_COORDINATE and any(
            n not in cube.surface_variables for n in cube.variables
        ):
            levels = grid.vertical or "unnamed"
            reason = f"the budgets need sigma levels ({SIGMA_COORDINATE}); the levels are {levels}"
        elif not grid_valid(cube).all():
            reason = "the store has masked cells; global budgets need every cell"
    if reason is None and "ps" in cube.variables and "ps" not in cube.surface_variables:
        reason = "ps must be a 2-D variable"
    out = {}
    for name, needs in CONSTRAINT_NEEDS.items():
        missing = [v for v in needs if v not in cube.variables]
        if reason is not None:
            out[name] = f"skipped: {reason}"
        elif missing:
            out[name] = f"skipped: needs {', '.join(missing)} (not in the store's variables)"
        else:
            out[name] = "applied"
    return out


def store_geometry(cube: CubeModelConfig, device: torch.device | str = "cpu") -> Geometry | None:
    """The physics geometry of the cube's grid (None when no constraint applies): latitude, sigma levels and
    cell areas from the store's coordinates; the simulator's grid when the config carries none."""
    if not any(v == "applied" for v in physics_support(cube).values()):
        return None
    cube = physics_view(cube)
    if cube.grid is None:
        return Geometry.default(cube, device)
    sigma = np.asarray(cube.grid.levels, dtype=np.float64) if cube.grid.levels else np.asarray([0.5])
    edges = np.concatenate([[0.0], (sigma[1:] + sigma[:-1]) / 2, [1.0]])
    area = grid_area(cube)
    return Geometry.from_grid(
        cube, edges, np.deg2rad(cube.grid.lat), area * 4 * math.pi / area.size, device, sigma=sigma
    )


def augment_transforms(cube: CubeModelConfig) -> tuple[ChannelRoles, RollAndFlip, Noise | None]:
    """The channel roles, the roll/flip and the input noise (frame 0 only; None without) of
    ``cube.augment``, after checking that the grid can be rolled and flipped."""
    options = cube.augment
    view = physics_view(cube)
    check_augment_grid(cube)
    variables = [(name, 0 if name in view.surface_variables else view.levels) for name in view.variables]
    roll_flip = RollAndFlip(roll=options.roll, flip_p=0.5 if options.flip else 0.0)
    noise = Noise(scale=options.noise, frames_to_perturb=(0,)) if options.noise > 0 else None
    return ChannelRoles.from_variables(variables), roll_flip, noise


class PairAugment:
    """The augmentation of ``cube.augment`` on training pairs, over ``[state, next, state]`` with one roll
    and flip draw per sample shared by the three frames and noise on frame 0 only. Returns ``(input, target,
    clean)``: the noisy input the model sees, the target, and the same rolled/flipped state without noise,
    which the loss measures the persistence error and the budgets against (noise of one cell's size moves a
    global mean by more than the mass goal; the target stays exact so the model learns the truth's tendency
    and not the noise). Without noise the input is the clean state.

    The draws are those of :class:`sapwood.data.augment.Augment` (call ``n``: a CPU generator seeded
    ``seed + n``, roll/flip then noise), so a run is reproducible and resumes exactly: :class:`CubeBatches`
    passes the batch's number since the start of training as ``n``. On the CPU the transform is the fused
    one-pass kernel (:class:`sapwood.data.augment.PreparedPlanes`, equal to ``reference_augment`` to
    round-off) on the calling thread, without a thread pool; :class:`CubeBatches` calls it on the loader's
    prefetch thread, so it overlaps the training step."""

    def __init__(self, cube: CubeModelConfig, seed: int = 0):
        self.roles, self.roll_flip, self.noise = augment_transforms(cube)
        self.seed, self.calls = seed, 0
        self.coefficients = self.noise.coefficients(self.roles, 3) if self.noise is not None else None
        if self.coefficients is not None:
            self.planes = PreparedPlanes(self.roles, 3, *self.coefficients)
        else:
            self.planes = PreparedPlanes(self.roles, 2)
        augment_cpu.warm()

    def __call__(
        self, state: torch.Tensor, target: torch.Tensor, call: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment one pair with the draws of call ``call`` (default: the next of this object's calls)."""
        frames = torch.stack([state, target, state] if self.noise is not None else [state, target]).float()
        if call is None:
            call, self.calls = self.calls, self.calls + 1
        generator = torch.Generator().manual_seed(self.seed + call)
        shifts, flips = self.roll_flip.draw(frames, generator)
        noise_seed = self.noise.draw_seed(generator) if self.noise is not None else 0
        if frames.device.type == "cpu":
            frames = self.planes(frames, shifts, flips, noise_seed)
        else:  # the same draws, through the reference transform on the batch's device
            noise = NoiseDraw(noise_seed, *self.coefficients) if self.coefficients else None
            frames = augment_planes(frames, self.roles, shifts, flips, noise, in_place=True)
        return frames[0], frames[1], frames[-1] if self.noise is not None else frames[0]


def augment_enabled(cube: CubeModelConfig) -> bool:
    return cube.augment.roll or cube.augment.flip or cube.augment.noise > 0


def check_augment_grid(cube: CubeModelConfig) -> None:
    """One-line :class:`ConfigError` when ``cube.augment`` asks for a roll or flip the grid does not allow: a
    roll needs a global, periodic latitude-longitude grid, a flip latitudes symmetric about the equator;
    neither may move masked cells."""
    options, grid = cube.augment, cube.grid
    if grid is None or not (options.roll or options.flip):
        return
    where = f"the store's grid is {grid.description}"
    if grid.curvilinear or not grid.global_grid:
        raise ConfigError(f"cube.augment roll/flip need a global latitude-longitude grid; {where}")
    valid = grid_valid(cube)
    if options.roll and not (valid == valid[:, :, :1]).all():
        raise ConfigError(
            f"cube.augment.roll=true moves masked cells (the mask varies with longitude); {where}"
        )
    if options.flip:
        lat = np.asarray(grid.lat, dtype=np.float64)
        if not np.allclose(lat, -lat[::-1], atol=1e-4):
            raise ConfigError(f"cube.augment.flip=true needs latitudes symmetric about the equator; {where}")
        if not (valid == valid[:, ::-1]).all():
            raise ConfigError(
                f"cube.augment.flip=true moves masked cells (the mask is not north-south symmetric); {where}"
            )


class DeclaredForcing:
    """The store's ``declared_forcing {heating, torque}`` per run (written by ``sapwood prepare`` when the
    inputs carry them): the global-mean heating (W m-2) and friction torque (N m) of the transition into each
    frame."""

    def __init__(self, store: CubeStore):
        runs = store.index["runs"]
        self.present = all(run.get("declared_forcing") for run in runs)
        self.heating = self.torque = None
        if self.present:
            width = int(max(store.run_times))
            self.heating, self.torque = (
                torch.tensor(
                    np.stack(
                        [
                            np.pad(
                                np.asarray(run["declared_forcing"][key], dtype=np.float64),
                                (0, width - len(run["declared_forcing"][key])),
                            )
                            for run in runs
                        ]
                    )
                )
                for key in ("heating", "torque")
            )

    def of_pairs(self, run: torch.Tensor, time: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"heating", "torque"}`` ``[B]`` (float64) of the pairs ``(run, time) -> time + 1``; empty when
        the store has none."""
        if not self.present:
            return {}
        return {"heating": self.heating[run, time + 1], "torque": self.torque[run, time + 1]}


class CubeBatches:
    """Endless micro-batches ``{"state", "next", "params"}`` from a :class:`CubeLoader` (resumable), with the
    declared ``"heating"`` and ``"torque"`` of each pair when ``forcing`` has them; with an ``augment``, the
    pairs are augmented (:class:`PairAugment`) and ``"clean"`` holds the state without noise. The forcing
    and the augmentation run on the loader's prefetch thread (``loader.transform``)."""

    def __init__(
        self, loader: CubeLoader, augment: PairAugment | None = None, forcing: DeclaredForcing | None = None
    ):
        self.loader = loader
        self.augment = augment
        self.forcing = forcing
        self._iterator: Any = None
        loader.transform = self._pair

    def _pair(self, batch: Batch, number: int) -> dict[str, torch.Tensor]:
        declared = self.forcing.of_pairs(batch.run, batch.time) if self.forcing is not None else {}
        if self.augment is None:
            return {"state": batch.state, "next": batch.next_state, "params": batch.params, **declared}
        state, target, clean = self.augment(batch.state, batch.next_state, call=number)
        return {"state": state, "next": target, "params": batch.params, "clean": clean, **declared}

    def __iter__(self) -> CubeBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self._iterator = self.loader.batches(endless=True)  # prefetch runs across epoch ends
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None

    def close(self) -> None:
        """Stop the loader's prefetch (a later ``next`` starts it again from the current position)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.loader.state_dict())  # the augmentation is keyed by the batch's number in it

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._iterator = None
        self.loader.load_state_dict(state)


class WindowAugment:
    """The augmentation of ``cube.augment`` on windows of K+1 frames ``[K + 1, B, ...]``: one roll and flip
    draw per sample shared by every frame of its window, noise on frame 0 only. Returns ``(input, targets,
    clean)``: the (noisy) first frame the model sees, frames 1..K ``[K, B, ...]`` and the first frame without
    noise. Draws as in :class:`PairAugment` (call ``n``: a CPU generator seeded ``seed + n``, roll/flip then
    noise; :class:`WindowBatches` passes the window batch's number, so a resume draws the same); the
    transform is the fused one-pass kernel on the calling thread (the loader's prefetch thread)."""

    def __init__(self, cube: CubeModelConfig, seed: int = 0):
        self.roles, self.roll_flip, self.noise = augment_transforms(cube)
        self.seed = seed

    def __call__(self, frames: torch.Tensor, call: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps = frames.shape[0] - 1
        frames = torch.cat([frames, frames[:1]] if self.noise is not None else [frames]).float()
        generator = torch.Generator().manual_seed(self.seed + call)
        shifts, flips = self.roll_flip.draw(frames, generator)
        noise = self.noise.draw(frames, self.roles, generator) if self.noise is not None else None
        frames = augment_planes(frames, self.roles, shifts, flips, noise, in_place=True, threads=1)
        return frames[0], frames[1 : steps + 1], frames[-1] if self.noise is not None else frames[0]


class WindowBatches(CubeBatches):
    """Endless micro-batches of K-step windows from a :class:`CubeLoader` with ``window = K + 1``: ``{"state"
    [B, ...], "frames" [K, B, ...] (the true frames 1..K), "params"}``, ``"clean"`` with an ``augment``
    (:class:`WindowAugment`), and the declared ``"heating"`` / ``"torque"`` ``[K, B]`` of each step."""

    def _pair(self, batch: Batch, number: int) -> dict[str, torch.Tensor]:
        steps = batch.frames.shape[0] - 1
        declared: dict[str, torch.Tensor] = {}
        if self.forcing is not None and self.forcing.present:
            per_step = [self.forcing.of_pairs(batch.run, batch.time + k) for k in range(steps)]
            declared = {key: torch.stack([d[key] for d in per_step]) for key in ("heating", "torque")}
        if self.augment is None:
            return {"state": batch.state, "frames": batch.frames[1:], "params": batch.params, **declared}
        state, targets, clean = self.augment(batch.frames, call=number)
        return {"state": state, "frames": targets, "params": batch.params, "clean": clean, **declared}


class CurriculumBatches:
    """The micro-batches of a ``cube.rollout`` curriculum: micro-batch ``n`` belongs to optimizer step ``n //
    accumulation``, whose stage (:meth:`CubeRolloutConfig.stage_at`) picks one-step pairs (before ``start``,
    the same batches as a run without the curriculum) or K-step windows. Each stage reads from its own loader
    and augmentation, started fresh when the stage begins; the state is the micro-batches served, the stage
    and that stage's position, so a resume continues exactly."""

    def __init__(self, make: Any, rollout: CubeRolloutConfig, accumulation: int):
        self.make, self.rollout, self.accumulation = make, rollout, max(1, accumulation)
        self.served, self.stage = 0, -1
        self.current: CubeBatches | None = None

    def __iter__(self) -> CurriculumBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        stage = self.rollout.stage_at(self.served // self.accumulation)
        if self.current is None or stage != self.stage:
            if self.current is not None:
                self.current.close()
            self.current, self.stage = self.make(stage), stage
        batch = next(self.current)
        self.served += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = self.current.state_dict() if self.current is not None else {}
        return {"served": self.served, "stage": self.stage, "stage_state": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.current is not None:
            self.current.close()
        self.served, self.stage = int(state["served"]), int(state["stage"])
        self.current = None
        if state["stage_state"]:
            self.current = self.make(self.stage)
            self.current.load_state_dict(state["stage_state"])


def augment_seed(seed: int, rank: int) -> int:
    """The augmentation's base seed for data-parallel ``rank`` (independent streams per rank and seed)."""
    return int(np.random.SeedSequence([seed, rank, 0xA06]).generate_state(1)[0] >> 1)


def task_split(config: Config, store: CubeStore) -> Split:
    """The held-out split of a cube config (``cube.val_runs``, ``cube.holdout_time``)."""
    try:
        return split_store(store, config.cube.val_runs, config.cube.holdout_time)
    except Exception as exc:
        raise ConfigError(f"cube: {exc}") from None


class CubeTask:
    """Train a :class:`sapwood.model.cube.CubeSurrogate` to predict the next state of a cube store."""

    unit_name = "samples"  # what count_units counts, for the progress bar

    def __init__(self, config: Config):
        if config.cube is None or config.cube.data is None:
            raise ConfigError(
                "train.task='cube' needs a cube section with data: STORE (from `sapwood prepare`)"
            )
        self.config = config
        self.store = CubeStore(config.cube.data)
        fill_from_store(config.cube, self.store)
        check_store_matches(config, self.store)
        self.split = task_split(config, self.store)
        self.train_runs, self.val_runs = self.split.train_runs, self.split.held_out_runs
        if config.cube.normalization is None:
            config.cube.normalization = store_normalization(self.store, self.split.train)
        self.seed = config.train.seed if config.train else 0
        self.constraints = physics_support(config.cube)
        check_augment_grid(config.cube)
        self.forcing = DeclaredForcing(self.store)
        self._device: torch.device | None = None
        self._geometry: Geometry | None = None
        self._weights: torch.Tensor | None = None

    def _on(self, device: torch.device) -> None:
        if self._device != device:
            self._geometry = store_geometry(self.config.cube, device)
            self._weights = cell_weights(self.config.cube, device)
            self._device = device

    def geometry(self, device: torch.device) -> Geometry | None:
        self._on(device)
        return self._geometry

    def weights(self, device: torch.device) -> torch.Tensor:
        self._on(device)
        return self._weights

    def build_model(self, config: Config) -> nn.Module:
        return build_model(config, "meta")

    def train_batches(
        self, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> CubeBatches | CurriculumBatches:
        rollout = self.config.cube.rollout
        if not rollout.steps:
            return self.stage_batches(-1, micro_batch_size, rank)
        for stage in range(len(rollout.steps)):  # every window length fits the training runs
            self.stage_batches(stage, micro_batch_size, rank)
        train = self.config.train
        accumulation = train.batch_size // (micro_batch_size * world_size) if train is not None else 1
        return CurriculumBatches(
            lambda stage: self.stage_batches(stage, micro_batch_size, rank), rollout, accumulation
        )

    def stage_batches(self, stage: int, micro_batch_size: int, rank: int = 0) -> CubeBatches:
        """The batches of curriculum ``stage`` (-1: one-step pairs, as without ``cube.rollout``): pairs for
        an unroll length of 1, else :class:`WindowBatches` of ``K + 1`` frames inside the training windows,
        each stage with its own loader and augmentation seeds."""
        cube = self.config.cube
        steps = 1 if stage < 0 else cube.rollout.steps[stage]
        salt = (stage + 1) * STAGE_SEED_STRIDE  # 0 for the one-step stage: the plain run's seeds
        try:
            loader = CubeLoader(
                self.store, micro_batch_size, window=steps + 1, windows=self.split.train,
                seed=self.seed + rank + salt,
            )
        except SapwoodError as exc:
            longest = max(stop - start for _, start, stop in self.split.train)
            raise ConfigError(
                f"cube.rollout.steps={cube.rollout.steps}: unroll length {steps} needs windows of "
                f"{steps + 1} frames; the training windows have at most {longest} frames ({exc})"
            ) from None
        seed = augment_seed(self.seed, rank) + salt
        if steps == 1:
            augment = PairAugment(cube, seed=seed) if augment_enabled(cube) else None
            return CubeBatches(loader, augment, self.forcing)
        augment = WindowAugment(cube, seed=seed) if augment_enabled(cube) else None
        return WindowBatches(loader, augment, self.forcing)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "frames" in batch:
            return self.unrolled_loss(model, batch)
        state, target, params = batch["state"], batch["next"], batch["params"]
        prediction = model(state, params if params.numel() else None).float()
        state = batch.get(
            "clean", state
        )  # augmented: persistence error and budgets against the noise-free state
        data = data_loss(prediction, target, model.tendency_std, self.weights(state.device), state)
        geometry = self.geometry(state.device)
        if geometry is None:
            return data, {"data_loss": float(data.detach())}
        physics, metrics = physics_loss(
            state, prediction, geometry, self.config.cube.physics, params if params.numel() else None,
            batch.get("heating"), batch.get("torque"),
        )
        metrics["data_loss"] = float(data.detach())
        return data + physics, metrics

    def unrolled_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of a K-step window (:class:`WindowBatches`): the model is unrolled K steps from
        ``state`` on its own predictions; step k's data loss compares its prediction with the true frame k
        relative to the k-step persistence error (:func:`data_loss` with the window's first frame as
        ``state``), its physics loss the transition from its input to its prediction with the declared
        forcing of step k. The loss is the mean over the last ``cube.rollout.backprop`` steps (every step
        when 0), which are differentiated through each other; earlier steps run without a graph."""
        targets, params = batch["frames"], batch["params"]
        params = params if params.numel() else None
        steps = targets.shape[0]
        backprop = self.config.cube.rollout.backprop
        tracked = min(backprop, steps) if backprop else steps
        first = batch.get("clean", batch["state"])
        weights = self.weights(first.device)
        geometry = self.geometry(first.device)
        heating, torque = batch.get("heating"), batch.get("torque")
        state, source = batch["state"], first  # the model's input, and the state its budgets start from
        total = torch.zeros((), device=first.device)
        sums: dict[str, float] = {}
        for k in range(steps):
            scored = k >= steps - tracked
            with torch.set_grad_enabled(scored and torch.is_grad_enabled()):
                prediction = model(state, params).float()
            if scored:
                data = data_loss(prediction, targets[k], model.tendency_std, weights, first)
                total = total + data
                sums["data_loss"] = sums.get("data_loss", 0.0) + float(data.detach())
                if geometry is not None:
                    physics, metrics = physics_loss(
                        source, prediction, geometry, self.config.cube.physics, params,
                        None if heating is None else heating[k], None if torque is None else torque[k],
                    )
                    total = total + physics
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                last = float(data.detach())
            state = source = prediction
        out = {key: value / tracked for key, value in sums.items()}
        out["data_loss_last"] = last
        out["unroll_steps"] = float(steps)
        return total / tracked, out

    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int = 8) -> dict[str, float]:
        """On held-out frames: data loss, the per-channel MSE ratio against persistence (mean over channels
        and per variable), and mean violations where the constraints apply."""
        device = next(model.parameters()).device
        weights = self.weights(device)
        geometry = self.geometry(device)
        model_sq = torch.zeros(self.store.shape[1], dtype=torch.float64)
        persist_sq = torch.zeros_like(model_sq)
        totals: dict[str, float] = {}
        count = 0
        for state, target, params in held_out_chunks(
            self.store, self.split.held_out, micro_batch_size, batches
        ):
            state, target = state.to(device), target.to(device)
            params = params.to(device) if params is not None else None
            prediction = model(state, params).float()
            model_sq += ((prediction - target) ** 2 * weights).mean(dim=(0, 2, 3)).double().cpu()
            persist_sq += ((state - target) ** 2 * weights).mean(dim=(0, 2, 3)).double().cpu()
            values = {
                "val_loss": float(
                    data_loss(prediction, target, model.get_buffer("tendency_std"), weights, state)
                )
            }
            if geometry is not None:
                v = violations(state, prediction, geometry, params)
                values.update(
                    {
                        f"val_violation_{k}": float(v[k].mean())
                        for k in ("mass", "energy", "momentum", "thermo")
                        if k in v
                    }
                )
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
        out = {key: value / max(count, 1) for key, value in totals.items()}
        ratio = model_sq / persist_sq.clamp_min(1e-30)
        scored = persist_sq > 0
        out["val_mse_over_persistence"] = float(ratio[scored].mean()) if scored.any() else float("nan")
        cube = self.config.cube
        for name in cube.variables:
            sl = cube.channel_slice(name)
            part = scored[sl]
            if part.any():
                out[f"val_mse_over_persistence_{name}"] = float(ratio[sl][part].mean())
        return out

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["state"].shape[0])

    def tokenizer_file(self) -> Path | None:
        return None


def held_out_chunks(store: CubeStore, windows: list[tuple[int, int, int]], size: int, limit: int):
    """Up to ``limit`` chunks ``(state, next, params or None)`` of at most ``size`` consecutive pairs, in
    window order (deterministic; any window length works)."""
    produced = 0
    for run, start, stop in windows:
        for first in range(start, stop - 1, size):
            if produced >= limit:
                return
            count = min(size, stop - 1 - first)
            frames = store.read_rows(int(store.run_rows[run]) + first, count + 1)
            params = (
                torch.as_tensor(store.params[run], dtype=torch.float32).expand(count, -1).contiguous()
                if store.param_names
                else None
            )
            yield frames[:-1], frames[1:], params
            produced += 1


def data_loss(
    prediction: torch.Tensor, target: torch.Tensor, tendency_std: torch.Tensor, weights: torch.Tensor,
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Area- and mask-weighted MSE (float32); ``weights`` from :func:`cell_weights` (``[channels, lat,
    lon]``).

    Without ``state``: in units of the per-channel tendency std. With ``state``: per sample and channel the
    ratio r of the MSE to that sample's own one-step change of the channel (its persistence MSE) plus
    ``(PERSISTENCE_FLOOR * tendency std)^2``, and the mean of ``log(1 + r)``: quiet and vigorous planets and
    every level count alike (persistence scores log 2), and a sample far off early in training cannot swamp
    the step."""
    w = weights.to(prediction.device)
    scale = tendency_std.float()[:, None, None]
    error = ((prediction.float() - target.float()) / scale).pow(2)
    if state is None:
        return (error * w).mean()
    change = ((state.float() - target.float()) / scale).pow(2)
    return torch.log1p(
        (error * w).mean((-2, -1)) / ((change * w).mean((-2, -1)) + PERSISTENCE_FLOOR**2)
    ).mean()


def simulated_store(
    folder: str | Path, runs: int = 32, levels: int = 4, nlat: int = 16, nlon: int = 32, times: int = 12,
    seed: int = 0, spinup_days: float | None = None, dt_hours: float = 6.0,
) -> Path:
    """A cube store of a simulated ensemble at ``folder/store`` (built once; NetCDF in ``folder/nc``), one
    output every ``dt_hours``."""
    from sapwood.data.cubes import prepare
    from sapwood.data.simulate import Grid, simulate_ensemble

    folder = Path(folder)
    store = folder / "store"
    if not (store / "index.json").exists():
        grid = Grid(
            levels=levels, nlat=nlat, nlon=nlon, times=times, spinup_days=spinup_days, dt_hours=dt_hours
        )
        simulate_ensemble(folder / "nc", runs=runs, grid=grid, seed=seed, progress=False)
        prepare([folder / "nc"], store, progress=False)
    return store


def surrogate_config(
    store_path: str | Path, out_dir: str | Path, steps: int, hidden: int = 128, layers: int = 3,
    heads: int = 4, patch: int = 4, batch_size: int = 16, lr: float = 2e-3, val_runs: int = 4,
    physics: PhysicsLossConfig | None = None, seed: int = 0, holdout_time: float = 0.0,
) -> Config:
    """A training config for a small surrogate on a store (demo, bench physics, tests); variables, grid and
    planet parameters come from the store."""
    cube = CubeModelConfig(
        patch=patch, data=str(store_path), val_runs=val_runs, holdout_time=holdout_time,
        physics=physics or PhysicsLossConfig(),
    )
    train = TrainConfig(
        task="sapwood.train.cube_task:CubeTask", out_dir=str(out_dir), steps=steps, batch_size=batch_size,
        micro_batch_size=batch_size, lr=lr, min_lr=lr / 20, warmup_steps=min(20, steps // 10),
        weight_decay=0.0, eval_every=max(steps // 2, 1), eval_batches=2, save_every=steps, seed=seed,
        progress=False, log_every=max(steps // 10, 1),
    )
    model = ModelConfig(vocab_size=1, hidden=hidden, layers=layers, heads=heads, ffn=2 * hidden)
    return Config(name="cube-surrogate", model=model, cube=cube, train=train)
