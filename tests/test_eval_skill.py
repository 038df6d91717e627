"""The skill the evaluation reports flags a surrogate that does not beat the baselines: a surrogate that is
persistence scores exactly 0, one worse on a variable scores below 0 on that variable only, and every held-out
run and level counts in its own units (a loss on a quiet planet is not hidden by a win on a vigorous one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapwood.config import CubeModelConfig
from sapwood.evaluate import channel_mse_ratios, evaluate_surrogate, run_mse
from sapwood.model import build_model, save_folder
from sapwood.train.cube_task import CubeTask, simulated_store, surrogate_config


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("skill")
    return simulated_store(folder / "data", runs=4, times=6, spinup_days=1)


def checkpoint(store, folder, corrupt: str | None = None):
    """A fresh surrogate (zero head: exactly persistence), or one whose tendency of ``corrupt`` is a
    constant."""
    config = surrogate_config(store, folder / "run", steps=1, hidden=32, layers=1, heads=2, val_runs=2)
    CubeTask(config)  # fills variables, grid and the training-only normalization into the config
    torch.manual_seed(0)
    model = build_model(config)
    if corrupt is not None:
        sl = config.cube.channel_slice(corrupt)
        patch = config.cube.patch
        with torch.no_grad():  # head output per tile is channels x patch x patch, channel-major
            model.head.bias.view(config.cube.channels, patch * patch)[sl] = 3.0
    save_folder(model, config, folder / "ckpt")
    return folder / "ckpt", config


def test_persistence_scores_zero_and_is_not_called_a_win(small_store, tmp_path):
    folder, config = checkpoint(small_store, tmp_path)
    result = evaluate_surrogate(folder, small_store, None, rollout_steps=2, plots=False)
    for name in config.cube.variables:
        assert result["skill_vs_persistence"][name] == pytest.approx(0.0, abs=1e-6)
        assert result["mse_over_persistence"][name] == pytest.approx(1.0, abs=1e-6)
    assert result["beats_persistence_every_variable"] is False
    assert "does not beat persistence" in result_sentence(result)
    # the budgets are held to the simulator's declared forcing, which prepare keeps with each run
    assert result["forcing"].startswith("declared")
    assert result["violations_truth"]["energy"] < 0.1  # W m-2; float32 files (simulate.py documents < 0.05)
    assert result["violations_truth"]["momentum"] < 1e-3  # m s-1
    # the projection closes the energy and angular-momentum budgets to the same declared forcing
    assert result["violations_projected"]["energy"] < 0.1
    assert result["violations_projected"]["momentum"] < 1e-3


def test_prepare_keeps_the_declared_forcing_of_each_run(small_store):
    import xarray as xr

    from sapwood.data.store import CubeStore

    store = CubeStore(small_store)
    for entry in store.index["runs"]:
        with xr.open_dataset(entry["source"]) as ds:
            assert entry["declared_forcing"]["heating"] == pytest.approx(ds["heating"].values.tolist())
            assert entry["declared_forcing"]["torque"] == pytest.approx(ds["torque"].values.tolist())


def test_a_surrogate_worse_on_one_variable_is_flagged_on_that_variable(small_store, tmp_path):
    folder, config = checkpoint(small_store, tmp_path, corrupt="T")
    result = evaluate_surrogate(folder, small_store, None, rollout_steps=2, plots=False)
    skill = result["skill_vs_persistence"]
    assert skill["T"] < -0.5
    for name in config.cube.variables:
        if name != "T":
            assert skill[name] == pytest.approx(0.0, abs=1e-6)
    assert result["beats_persistence_every_variable"] is False
    assert result["skill_vs_climatology"]["T"] < result["skill_vs_climatology"]["u"]


def result_sentence(result):
    from sapwood.evaluate import skill_sentence

    return skill_sentence(result)


def test_every_run_and_level_counts_in_its_own_units():
    cube = CubeModelConfig(variables=["T", "ps"], surface_variables=["ps"], levels=2, lat=2, lon=2)
    runs = np.array([0, 0, 1, 1])  # run 0 quiet, run 1 vigorous
    persistence = torch.tensor([[1e-4, 1e-2, 1.0]] * 2 + [[1.0, 100.0, 1e4]] * 2)  # [cases, channels]
    model = persistence.clone()
    model[:2] *= 4.0  # four times persistence's error on the quiet run
    model[2:] *= 0.5  # half of it on the vigorous run
    ratios = channel_mse_ratios(cube, run_mse(model, runs), run_mse(persistence, runs))
    assert ratios == {"T": pytest.approx((4.0 + 0.5) / 2), "ps": pytest.approx((4.0 + 0.5) / 2)}
    pooled = model.sum(0) / persistence.sum(0)  # pooling the runs would call this a win on every channel
    assert bool((pooled < 1).all())
    zero = torch.zeros(2, 3)
    assert channel_mse_ratios(cube, run_mse(model, runs), zero) == {"T": None, "ps": None}
