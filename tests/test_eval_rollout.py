"""A long autoregressive rollout of a trained surrogate stays finite and bounded on held-out planets, and the
evaluation reports the whole requested length when the held-out runs allow it."""

from __future__ import annotations

import math

import pytest

from sapwood.evaluate import evaluate_surrogate, rollout_sentence
from sapwood.train.cube_task import simulated_store, surrogate_config
from sapwood.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def long_store(tmp_path_factory):
    return simulated_store(
        tmp_path_factory.mktemp("rollout") / "data", runs=3, levels=2, nlat=8, nlon=16, times=101,
        spinup_days=1, dt_hours=1.0,
    )


def test_a_100_step_rollout_stays_finite_and_bounded(long_store, tmp_path):
    config = surrogate_config(
        long_store, tmp_path / "run", steps=40, hidden=32, layers=1, heads=2, patch=4, val_runs=1,
        batch_size=8,
    )
    summary = train(config)
    result = evaluate_surrogate(summary["final"], long_store, None, rollout_steps=100, plots=False)
    rollout = result["rollout"]
    assert rollout["steps"] == rollout["requested_steps"] == 100
    curve = rollout["rmse_std_units"]
    assert all(math.isfinite(x) for x in curve)
    assert rollout["blow_up_step"] is None
    # bounded: never far above the error of the climatology (which does not grow with lead time)
    assert rollout["max_over_climatology"] < 3
    assert "Rollout of 100 steps:" in rollout_sentence(rollout)
    short = evaluate_surrogate(summary["final"], long_store, None, rollout_steps=200, plots=False)["rollout"]
    assert short["steps"] == 100 and "of 200 requested" in rollout_sentence(short)
