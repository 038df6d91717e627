"""Multi-step surrogate training (``cube.rollout``): K-step windows stay inside one training run and the
training split, the unrolled loss is the hand-unrolled one (with gradients through the unroll or, with
``backprop``, only through the last steps), augmentation draws once per window, a curriculum run is
reproducible and resumes exactly, and bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sapwood.config import CubeAugmentConfig, CubeModelConfig, CubeRolloutConfig, validate
from sapwood.data.augment import ChannelRoles, Noise, RollAndFlip, reference_augment
from sapwood.errors import ConfigError
from sapwood.model import build_model
from sapwood.physics import physics_loss
from sapwood.train.cube_task import (
    STAGE_SEED_STRIDE,
    CubeTask,
    CurriculumBatches,
    WindowBatches,
    augment_seed,
    data_loss,
    simulated_store,
    surrogate_config,
)
from sapwood.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return simulated_store(tmp_path_factory.mktemp("rollout") / "data", runs=4, times=8, spinup_days=1)


def rollout_config(store, out, steps=1, unroll=(2, 3), start=0, every=2, backprop=0, augment=None, seed=5,
                   holdout_time=0.0, batch_size=4, micro=4):
    config = surrogate_config(
        store, out, steps=steps, hidden=32, layers=1, heads=2, batch_size=batch_size, val_runs=1, seed=seed,
        holdout_time=holdout_time,
    )
    config.train.micro_batch_size = micro
    config.train.save_every, config.train.eval_every, config.train.log_every = 2, 100, 1
    config.cube.rollout = CubeRolloutConfig(steps=list(unroll), start=start, every=every, backprop=backprop)
    if augment is not None:
        config.cube.augment = augment
    return config


def test_windows_are_consecutive_frames_of_one_training_run_inside_the_split(store, tmp_path):
    config = rollout_config(store, tmp_path, unroll=(3,), holdout_time=0.25, batch_size=2, micro=2)
    task = CubeTask(config)
    train = {run: (start, stop) for run, start, stop in task.split.train}
    assert set(train) == {0, 1, 2} and all(stop == 6 for _, stop in train.values())  # 2 of 8 frames held out
    rows = torch.cat([task.store.read_rows(int(task.store.run_rows[r]), int(task.store.run_times[r]))
                      for r in range(task.store.runs)])
    owner = [(r, t) for r in range(task.store.runs) for t in range(int(task.store.run_times[r]))]
    batches = task.stage_batches(0, 2)
    assert isinstance(batches, WindowBatches)
    seen = set()
    for _ in range(2 * len(batches.loader)):  # two epochs
        batch = next(batches)
        assert batch["frames"].shape[0] == 3
        for sample in range(batch["state"].shape[0]):
            match = [i for i in range(rows.shape[0]) if torch.equal(rows[i], batch["state"][sample])]
            assert len(match) == 1
            run, time = owner[match[0]]
            start, stop = train[run]  # a training run, and the whole window inside its training frames
            assert start <= time and time + 3 < stop
            for k in range(3):
                assert torch.equal(batch["frames"][k, sample], rows[match[0] + k + 1])
            seen.add((run, time))
    assert seen == {(run, time) for run in train for time in range(3)}  # every window of the split is used
    with pytest.raises(ConfigError, match=r"cube.rollout.steps=\[6\]: unroll length 6 needs windows of 7 "):
        CubeTask(rollout_config(store, tmp_path, unroll=(6,), holdout_time=0.25)).train_batches(4)


def test_unrolled_loss_is_the_hand_unrolled_loss_with_gradients_through_the_unroll(store, tmp_path):
    config = rollout_config(store, tmp_path, unroll=(3,))
    task = CubeTask(config)
    batch = next(task.stage_batches(0, 4))
    assert batch["heating"].shape == (3, 4)
    torch.manual_seed(0)
    model = build_model(config)
    geometry, weights = task.geometry(torch.device("cpu")), task.weights(torch.device("cpu"))

    def by_hand(detach_before: int) -> torch.Tensor:
        state = source = batch["state"]
        total = []
        for k in range(3):
            if k < detach_before:
                with torch.no_grad():
                    state = source = model(state, batch["params"]).float()
                continue
            prediction = model(state, batch["params"]).float()
            data = data_loss(prediction, batch["frames"][k], model.tendency_std, weights, batch["state"])
            physics, _ = physics_loss(source, prediction, geometry, config.cube.physics, batch["params"],
                                      batch["heating"][k], batch["torque"][k])
            total.append(data + physics)
            state = source = prediction
        return torch.stack(total).mean()

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, metrics = task.loss(model, batch)
    assert metrics["unroll_steps"] == 3 and metrics["data_loss_last"] > 0
    expected = by_hand(0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    full = grads(loss)
    for got, want in zip(full, grads(by_hand(0)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # backprop: 1 (pushforward): the loss and the gradient of the last step alone, from a detached input
    config.cube.rollout.backprop = 1
    last, _ = task.loss(model, batch)
    torch.testing.assert_close(last, by_hand(2), rtol=1e-6, atol=0)
    pushforward = grads(last)
    for got, want in zip(pushforward, grads(by_hand(2)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # a one-step window is the pair loss: K-step data loss is relative to the k-step persistence error
    pair = {"state": batch["state"], "next": batch["frames"][0], "params": batch["params"],
            "heating": batch["heating"][0], "torque": batch["torque"][0]}
    window = {**pair, "frames": batch["frames"][:1], "heating": batch["heating"][:1],
              "torque": batch["torque"][:1]}
    with torch.no_grad():
        torch.testing.assert_close(task.loss(model, window)[0], task.loss(model, pair)[0], rtol=1e-6, atol=0)


def test_one_roll_and_flip_per_window_for_every_frame(store, tmp_path):
    augment = CubeAugmentConfig(roll=True, flip=True, noise=1.0)
    config = rollout_config(store, tmp_path, unroll=(3,), augment=augment)
    task = CubeTask(config)
    batches = task.stage_batches(0, 4)
    raw = task.stage_batches(0, 4)
    raw.augment = None  # the same loader position without augmentation
    roles = ChannelRoles.from_variables(
        [(n, 0 if n in config.cube.surface_variables else config.cube.levels) for n in config.cube.variables]
    )
    for call in range(2):
        batch, plain = next(batches), next(raw)
        frames = torch.cat([plain["state"][None], plain["frames"], plain["state"][None]])
        generator = torch.Generator().manual_seed(augment_seed(task.seed, 0) + STAGE_SEED_STRIDE + call)
        shifts, flips = RollAndFlip(roll=True, flip_p=0.5).draw(frames, generator)
        noise = Noise(scale=1.0, frames_to_perturb=(0,)).draw(frames, roles, generator)
        expected = reference_augment(frames.clone(), roles, shifts, flips, noise)
        clean = reference_augment(frames.clone(), roles, shifts, flips, None)
        # noise: the fused kernel equals the reference to round-off
        torch.testing.assert_close(batch["state"], expected[0], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(batch["frames"], clean[1:4], rtol=0, atol=0)  # targets: no noise
        torch.testing.assert_close(batch["clean"], clean[0], rtol=0, atol=0)
        assert not torch.equal(batch["state"], batch["clean"])
        assert torch.equal(batch["heating"], plain["heating"])  # global budgets: unchanged by roll/flip
        assert shifts.unique().numel() > 1


def metrics_losses(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if e["event"] == "train"}


def test_a_curriculum_run_is_reproducible_and_resumes_exactly(store, tmp_path, resumes_exactly):
    augment = CubeAugmentConfig(roll=True, flip=True)

    def config(name):  # micro-batches of 2, two per step: K = 1, 1, 2, 2, 3, 3, 3 at steps 0..6
        out = rollout_config(store, tmp_path / name, steps=7, unroll=(2, 3), start=2, every=2,
                             augment=augment, batch_size=4, micro=2)
        out.train.save_every = 3
        return out

    weights = resumes_exactly(config, 5, 3)  # the checkpoint at step 3 is inside the K=2 stage
    plain = config("d")
    plain.cube.rollout = CubeRolloutConfig()
    Trainer(plain).fit()
    other = load_file(tmp_path / "d" / "final" / "model.safetensors")
    assert any(not torch.equal(other[key], value) for key, value in weights["a"].items())
    a, d = metrics_losses(tmp_path / "a"), metrics_losses(tmp_path / "d")
    assert [a[s] for s in (1, 2)] == [d[s] for s in (1, 2)]  # before start: the plain run's batches
    assert a[3] != d[3]


def test_curriculum_stages_follow_optimizer_steps(store, tmp_path):
    config = rollout_config(store, tmp_path, unroll=(2, 3), start=1, every=2, batch_size=4, micro=2)
    batches = CubeTask(config).train_batches(2)
    assert isinstance(batches, CurriculumBatches)
    shapes = []
    for _ in range(12):  # 6 optimizer steps of 2 micro-batches
        batch = next(batches)
        shapes.append(batch["frames"].shape[0] if "frames" in batch else 1)
    assert shapes == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    assert [config.cube.rollout.unroll_at(s) for s in range(6)] == [1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    "block, message",
    [
        ({"steps": [0, 2]}, r"rollout.steps=\[0, 2\]: unroll length 0 is outside the allowed 1..64"),
        ({"steps": [2, 65]}, r"rollout.steps=\[2, 65\]: unroll length 65 is outside the allowed 1..64"),
        ({"every": 0}, r"rollout.every=0: Input should be greater than or equal to 1"),
        ({"backprop": -1}, r"rollout.backprop=-1: Input should be greater than or equal to 0"),
        ({"stepz": [2]}, r"unknown key 'rollout.stepz'; did you mean 'rollout.steps'"),
    ],
)
def test_bad_rollout_settings_are_one_line_errors(block, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(CubeModelConfig, {"rollout": block}, "cube: ")
    assert "\n" not in str(info.value)
