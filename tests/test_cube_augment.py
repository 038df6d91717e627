"""Augmented surrogate training (``cube.augment``): the training pairs are the reference roll/flip/noise of
the loader's pairs (same roll and flip on input and target, noise on the input only; the fused kernel that
training runs on the prefetch thread agrees to round-off), the budgets of the pair and its declared forcing
are unchanged, and an augmented run is reproducible and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sapwood.config import CubeAugmentConfig
from sapwood.data.augment import ChannelRoles, Noise, RollAndFlip, reference_augment
from sapwood.data.loader import CubeLoader
from sapwood.errors import ConfigError
from sapwood.model import build_model
from sapwood.physics import physics_loss, transition_residuals
from sapwood.train.cube_task import CubeTask, augment_seed, simulated_store, surrogate_config
from sapwood.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return simulated_store(tmp_path_factory.mktemp("augment") / "data", runs=4, times=6, spinup_days=1)


def augmented_config(store, out, steps=1, noise=1.0, seed=3):
    config = surrogate_config(
        store, out, steps=steps, hidden=32, layers=1, heads=2, batch_size=4, val_runs=1, seed=seed
    )
    config.train.save_every, config.train.eval_every = 2, 100
    config.cube.augment = CubeAugmentConfig(roll=True, flip=True, noise=noise)
    return config


def test_augmented_batches_are_the_reference_transform_of_the_loader_batches(store, tmp_path):
    config = augmented_config(store, tmp_path)
    task = CubeTask(config)
    batches = task.train_batches(4)
    raw = CubeLoader(task.store, 4, windows=task.split.train, seed=task.seed).batches(endless=True)
    roles = ChannelRoles.from_variables(
        [(n, 0 if n in config.cube.surface_variables else config.cube.levels) for n in config.cube.variables]
    )
    flipped_any = False
    for call in range(3):
        batch, plain = next(batches), next(raw)
        frames = torch.stack([plain.state, plain.next_state, plain.state])
        generator = torch.Generator().manual_seed(augment_seed(task.seed, 0) + call)
        shifts, flips = RollAndFlip(roll=True, flip_p=0.5).draw(frames, generator)
        noise = Noise(scale=1.0, frames_to_perturb=(0,)).draw(frames, roles, generator)
        expected = reference_augment(frames.clone(), roles, shifts, flips, noise)
        # the fused kernel: roll and flip exact, the noise to float32 round-off
        torch.testing.assert_close(batch["state"], expected[0], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(batch["next"], expected[1], rtol=0, atol=0)  # the target gets no noise
        torch.testing.assert_close(batch["clean"], expected[2], rtol=0, atol=0)
        clean = reference_augment(frames.clone(), roles, shifts, flips, None)
        torch.testing.assert_close(batch["clean"], clean[0], rtol=0, atol=0)
        assert not torch.equal(batch["state"], batch["clean"])  # the input is perturbed
        assert shifts.unique().numel() > 1  # the samples are rolled differently
        flipped_any |= bool(flips.any())
        # the declared physics of the pair: the budgets and their forcing are those of the raw pair
        geometry = task.geometry(torch.device("cpu"))
        forcing = {"heating": batch["heating"], "torque": batch["torque"]}
        before = transition_residuals(
            plain.state.double(), plain.next_state.double(), geometry, plain.params, **forcing
        )
        after = transition_residuals(
            batch["clean"].double(), batch["next"].double(), geometry, batch["params"], **forcing
        )
        for key, tolerance in (
            ("mass_pa", 0.05),
            ("energy_wm2", 0.05),
            ("momentum_ms", 1e-4),
        ):  # float32 sums
            torch.testing.assert_close(after[key].double(), before[key].double(), rtol=0, atol=tolerance)
    assert flipped_any


def test_declared_forcing_of_each_training_pair_comes_from_the_store(store, tmp_path):
    task = CubeTask(augmented_config(store, tmp_path, noise=0.0))
    batches = task.train_batches(4)
    raw = CubeLoader(task.store, 4, windows=task.split.train, seed=task.seed).batches(endless=True)
    batch, plain = next(batches), next(raw)
    runs = task.store.index["runs"]
    pairs = zip(plain.run.tolist(), plain.time.tolist(), strict=True)
    expected = [runs[r]["declared_forcing"]["heating"][t + 1] for r, t in pairs]
    assert batch["heating"].tolist() == pytest.approx(expected)
    assert "clean" in batch and torch.equal(
        batch["state"], batch["clean"]
    )  # no noise: the input is the clean state
    # the loss holds the energy and momentum terms to that declared forcing, not to an estimate from the
    # states
    torch.manual_seed(0)
    model = build_model(task.config)
    with torch.no_grad():
        prediction = model(batch["state"], batch["params"]).float()
        _, expected = physics_loss(
            batch["clean"], prediction, task.geometry(torch.device("cpu")), task.config.cube.physics,
            batch["params"], batch["heating"], batch["torque"],
        )
        _, metrics = task.loss(model, batch)
        _, estimated = task.loss(model, {k: v for k, v in batch.items() if k not in ("heating", "torque")})
    assert metrics["physics_energy"] == pytest.approx(expected["physics_energy"], rel=1e-5)
    assert metrics["physics_momentum"] == pytest.approx(expected["physics_momentum"], rel=1e-5)
    assert metrics["physics_energy"] != pytest.approx(estimated["physics_energy"], rel=1e-3)


def test_an_augmented_run_is_reproducible_and_resumes_exactly(store, tmp_path, resumes_exactly):
    # crash at step 3: the checkpoint at step 2 holds the augmentation's position
    weights = resumes_exactly(lambda name: augmented_config(store, tmp_path / name, steps=5), 3, 2)
    plain = augmented_config(store, tmp_path / "d", steps=5)
    plain.cube.augment = CubeAugmentConfig()
    Trainer(plain).fit()
    other = load_file(tmp_path / "d" / "final" / "model.safetensors")
    assert any(not torch.equal(other[key], value) for key, value in weights["a"].items())


def test_augmentation_the_grid_does_not_allow_is_refused(store, tmp_path):
    config = augmented_config(store, tmp_path)
    task = CubeTask(config)
    grid = config.cube.grid
    config.cube.grid = grid.model_copy(update={"global_grid": False, "description": "regional 4x8"})
    with pytest.raises(ConfigError, match="cube.augment roll/flip need a global latitude-longitude grid"):
        task.train_batches(4)
    config.cube.grid = grid.model_copy(update={"lat": [lat + 1.0 for lat in grid.lat]})
    with pytest.raises(ConfigError, match="flip=true needs latitudes symmetric"):
        task.train_batches(4)
    with pytest.raises(ValueError, match="noise"):
        CubeAugmentConfig(noise=-1)
