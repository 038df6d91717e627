"""The demo's surrogate stage: train a tiny surrogate on the cube stage's store through the training loop,
then print its skill on held-out planets and its physics violations (``out/surrogate``)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from sapwood.config import CubeAugmentConfig, CubeRolloutConfig
from sapwood.demo.cubes import HELD_OUT_RUNS
from sapwood.errors import SapwoodError
from sapwood.evaluate import evaluate_surrogate, print_summary
from sapwood.train.cube_task import surrogate_config
from sapwood.train.loop import train

ROLLOUT_STEPS = 60  # multi-step optimizer steps after the 300 one-step ones


def surrogate_stage(out: Path) -> None:
    store = Path(out) / "cubes" / "store"
    if not (store / "index.json").exists():
        raise SapwoodError(f"{store}: no cube store; the cubes demo stage writes it first")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a small, shared CPU
    try:
        config = surrogate_config(
            store, Path(out) / "surrogate" / "run", steps=300 + ROLLOUT_STEPS, hidden=64, layers=2, patch=4,
            val_runs=HELD_OUT_RUNS,
        )
        # then a short multi-step stage: unrolled 8 steps on its own predictions, the last one scored (the
        # pushforward trick), which keeps its long rollouts closer to the truth (README, Datacubes)
        config.cube.rollout = CubeRolloutConfig(steps=[8], start=300, every=ROLLOUT_STEPS, backprop=1)
        # the simulator's planets have no geography: a longitude roll and a north-south flip of a pair are
        # pairs of the same equations, and training on them lifts held-out skill (README, Datacubes)
        config.cube.augment = CubeAugmentConfig(roll=True, flip=True)
        summary = train(config)
        result = evaluate_surrogate(
            summary["final"], store, Path(out) / "surrogate" / "eval", rollout_steps=10
        )
    finally:
        torch.set_num_threads(threads)
    Console().print(f"surrogate {summary['final']}: held-out planets {result['held_out_runs']}")
    print_summary(result)
