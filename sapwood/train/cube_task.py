"""The datacube-surrogate task for the training loop (``train.task: cube``).

Data: a prepared cube store (``cube.data``, from ``sapwood prepare``); the last ``cube.val_runs`` runs
(planets) are held out for evaluation and never trained on. Normalization statistics (per-channel state
mean/std from the store, per-channel std of one-step tendencies and planet-parameter mean/std over the
training runs) are written into ``config.cube.normalization`` so the checkpoint carries them.

Loss = data loss + physics loss. Data loss: the latitude-weighted mean squared error of the predicted
next state in units of the per-channel tendency std. Physics loss: :func:`sapwood.physics.physics_loss`
with the weights of ``cube.physics``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapwood.config import (
    Config,
    CubeModelConfig,
    CubeNormalization,
    ModelConfig,
    PhysicsLossConfig,
    TrainConfig,
)
from sapwood.data.loader import CubeLoader
from sapwood.data.store import CubeStore
from sapwood.errors import ConfigError
from sapwood.model import build_model
from sapwood.physics import Geometry, physics_loss, violations
from sapwood.skill import latitude_weights


def held_out_runs(store: CubeStore, val_runs: int) -> tuple[list[int], list[int]]:
    """(training runs, held-out runs): the last ``val_runs`` runs of the store are held out."""
    if val_runs >= store.runs:
        raise ConfigError(f"cube.val_runs={val_runs} leaves no training run; the store has {store.runs} runs")
    return list(range(store.runs - val_runs)), list(range(store.runs - val_runs, store.runs))


def store_normalization(store: CubeStore, runs: list[int]) -> CubeNormalization:
    """State statistics from the store index; tendency and parameter statistics over ``runs``."""
    frames = store.memmap()
    total = np.zeros(store.shape[1])
    total_sq = np.zeros(store.shape[1])
    count = 0
    for run in runs:
        first, times = int(store.run_rows[run]), int(store.run_times[run])
        block = np.asarray(frames[first:first + times], dtype=np.float64)
        diff = block[1:] - block[:-1]
        total += diff.sum(axis=(0, 2, 3))
        total_sq += (diff**2).sum(axis=(0, 2, 3))
        count += diff.shape[0] * diff.shape[2] * diff.shape[3]
    mean = total / count
    tendency_std = np.sqrt(np.maximum(total_sq / count - mean**2, 0)) + 1e-6 * store.std
    params = store.params[runs]
    return CubeNormalization(
        state_mean=store.mean.tolist(), state_std=store.std.tolist(), tendency_std=tendency_std.tolist(),
        param_mean=params.mean(0).tolist(), param_std=np.maximum(params.std(0), 1e-6 * np.abs(params.mean(0))).tolist(),
    )


def check_store_matches(config: Config, store: CubeStore) -> None:
    cube = config.cube
    names = [v["name"] for v in store.variables]
    if names != cube.variables:
        raise ConfigError(f"cube.variables={cube.variables} do not match the store {store.path} ({names})")
    if store.row_shape != (cube.channels, cube.lat, cube.lon):
        raise ConfigError(f"cube grid {(cube.channels, cube.lat, cube.lon)} (channels, lat, lon) does not match "
                          f"the store {store.path} {store.row_shape}")
    if cube.planet_params and cube.planet_params != store.param_names:
        raise ConfigError(f"cube.planet_params={cube.planet_params} do not match the store's {store.param_names}")


class CubeBatches:
    """Endless micro-batches ``{"state", "next", "params"}`` from a :class:`CubeLoader` (resumable)."""

    def __init__(self, loader: CubeLoader):
        self.loader = loader
        self._iterator: Any = None

    def __iter__(self) -> CubeBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                return {"state": batch.state, "next": batch.next_state, "params": batch.params}
            except StopIteration:
                self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._iterator = None
        self.loader.load_state_dict(state)


def segments_for(batch_size: int) -> int:
    return max(s for s in (1, 2, 4) if batch_size % s == 0)


class CubeTask:
    """Train a :class:`sapwood.model.cube.CubeSurrogate` to predict the next state of a cube store."""

    unit_name = "samples"  # what count_units counts, for the progress bar

    def __init__(self, config: Config):
        if config.cube is None or config.cube.data is None:
            raise ConfigError("train.task='cube' needs a cube section with data: STORE (from `sapwood prepare`)")
        self.config = config
        self.store = CubeStore(config.cube.data)
        check_store_matches(config, self.store)
        self.train_runs, self.val_runs = held_out_runs(self.store, config.cube.val_runs)
        if config.cube.normalization is None:
            config.cube.normalization = store_normalization(self.store, self.train_runs)
        if not config.cube.planet_params:
            config.cube.planet_params = list(self.store.param_names)
        self.seed = config.train.seed if config.train else 0
        self._geometry: Geometry | None = None

    def geometry(self, device: torch.device) -> Geometry:
        if self._geometry is None or self._geometry.sigma.device != device:
            self._geometry = Geometry.default(self.config.cube, device)
        return self._geometry

    def build_model(self, config: Config) -> nn.Module:
        return build_model(config, "meta")

    def train_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> CubeBatches:
        loader = CubeLoader(self.store, micro_batch_size, segments_per_batch=segments_for(micro_batch_size),
                            runs=self.train_runs, seed=self.seed + rank)
        return CubeBatches(loader)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        state, target, params = batch["state"], batch["next"], batch["params"]
        prediction = model(state, params).float()
        geometry = self.geometry(state.device)
        data = data_loss(prediction, target, model.tendency_std, geometry)
        physics, metrics = physics_loss(state, prediction, geometry, self.config.cube.physics, params)
        metrics["data_loss"] = float(data.detach())
        return data + physics, metrics

    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int = 8) -> dict[str, float]:
        """On held-out planets: data loss, RMSE skill against persistence, mean violations."""
        device = next(model.parameters()).device
        loader = CubeLoader(self.store, micro_batch_size, segments_per_batch=segments_for(micro_batch_size),
                            runs=self.val_runs, shuffle=False, seed=0, prefetch=1)
        geometry = self.geometry(device)
        totals: dict[str, float] = {}
        count = 0
        for index in range(min(batches, len(loader))):
            batch = loader.read_batch(0, index).to(device)
            prediction = model(batch.state, batch.params).float()
            weights = latitude_weights(torch.rad2deg(geometry.lat))[:, None]
            model_mse = ((prediction - batch.next_state) ** 2 * weights).mean()
            persistence_mse = ((batch.state - batch.next_state) ** 2 * weights).mean()
            v = violations(batch.state, prediction, geometry, batch.params)
            values = {"val_loss": float(data_loss(prediction, batch.next_state, model.tendency_std, geometry)),
                      "val_mse_over_persistence": float(model_mse / persistence_mse),
                      **{f"val_violation_{k}": float(v[k].mean()) for k in ("mass", "energy", "momentum", "thermo")}}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
        return {key: value / max(count, 1) for key, value in totals.items()}

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["state"].shape[0])

    def tokenizer_file(self) -> Path | None:
        return None


def data_loss(prediction: torch.Tensor, target: torch.Tensor, tendency_std: torch.Tensor,
              geometry: Geometry) -> torch.Tensor:
    """Latitude-weighted MSE in units of the per-channel tendency std (float32)."""
    weights = latitude_weights(torch.rad2deg(geometry.lat))[:, None].to(prediction.device)
    error = (prediction.float() - target.float()) / tendency_std.float()[:, None, None]
    return (error.pow(2) * weights).mean()


def simulated_store(folder: str | Path, runs: int = 32, levels: int = 4, nlat: int = 16, nlon: int = 32,
                    times: int = 12, seed: int = 0) -> Path:
    """A cube store of a simulated ensemble at ``folder/store`` (built once; NetCDF in ``folder/nc``)."""
    from sapwood.data.cubes import prepare
    from sapwood.data.simulate import Grid, simulate_ensemble

    folder = Path(folder)
    store = folder / "store"
    if not (store / "index.json").exists():
        grid = Grid(levels=levels, nlat=nlat, nlon=nlon, times=times)
        simulate_ensemble(folder / "nc", runs=runs, grid=grid, seed=seed, progress=False)
        prepare([folder / "nc"], store, progress=False)
    return store


def surrogate_config(store_path: str | Path, out_dir: str | Path, steps: int, hidden: int = 128, layers: int = 3,
                     heads: int = 4, patch: int = 4, batch_size: int = 16, lr: float = 2e-3, val_runs: int = 4,
                     physics: PhysicsLossConfig | None = None, seed: int = 0) -> Config:
    """A training config for a small surrogate on a store (demo, bench physics, tests)."""
    store = CubeStore(store_path)
    levels = max(v["levels"] for v in store.variables)
    cube = CubeModelConfig(variables=[v["name"] for v in store.variables],
                           surface_variables=[v["name"] for v in store.variables if not v["levels"]],
                           levels=levels, lat=store.shape[2], lon=store.shape[3], patch=patch,
                           data=str(store_path), val_runs=val_runs, physics=physics or PhysicsLossConfig())
    train = TrainConfig(task="sapwood.train.cube_task:CubeTask", out_dir=str(out_dir), steps=steps,
                        batch_size=batch_size, micro_batch_size=batch_size, lr=lr, min_lr=lr / 20,
                        warmup_steps=min(20, steps // 10), weight_decay=0.0, eval_every=max(steps // 2, 1),
                        eval_batches=2, save_every=steps, seed=seed, progress=False, log_every=max(steps // 10, 1))
    model = ModelConfig(vocab_size=1, hidden=hidden, layers=layers, heads=heads, ffn=2 * hidden)
    return Config(name="cube-surrogate", model=model, cube=cube, train=train)
