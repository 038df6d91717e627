"""The planet-parameter climatology: fitted on training runs only (held-out frames and parameters change
nothing), exact for a field that is a linear function of the parameters, used by the evaluation for ACC and
the climatology baseline, and replaced by the calendar climatology where runs carry no parameters."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sapwood.baselines import Climatology, ParameterClimatology, fit_climatology
from sapwood.data.loader import split_store
from sapwood.data.store import INDEX_FILE, CubeStore, store_files
from sapwood.evaluate import evaluate_surrogate, skill_sentence
from sapwood.model import build_model, save_folder
from sapwood.skill import normalized_weights, rmse
from sapwood.train.cube_task import CubeTask, simulated_store, store_normalization, surrogate_config


@pytest.fixture(scope="module")
def planets(tmp_path_factory):
    """9 simulated planets, 8 outputs each, started from rest (no spin-up: bytes, not climate)."""
    folder = tmp_path_factory.mktemp("planets")
    return simulated_store(folder, runs=9, levels=2, nlat=8, nlon=16, times=8, spinup_days=0)


def rewritten(source, target, frames=None, params=None) -> CubeStore:
    """A copy of the store at ``target`` with new frame values and/or planet parameters (index updated)."""
    shutil.copytree(source, target)
    store = CubeStore(target)
    if frames is not None:
        np.asarray(frames, dtype=np.float32).tofile(store.frames_path)
    index = dict(store.index)
    if params is not None:
        index["params"] = {**index["params"], "values": np.asarray(params).tolist()}
        runs = zip(index["runs"], params, strict=True)
        index["runs"] = [{**r, "params": list(map(float, p))} for r, p in runs]
    store.close()
    (target / INDEX_FILE).write_text(json.dumps({**index, "files": store_files(target)}))
    return CubeStore(target)


def assert_same_fit(a: ParameterClimatology, b: ParameterClimatology) -> None:
    assert a.runs == b.runs and a.choice == b.choice
    np.testing.assert_array_equal(a.loo_mse, b.loo_mse)
    np.testing.assert_array_equal(a.fields, b.fields)
    np.testing.assert_array_equal(a.param_mean, b.param_mean)


def test_held_out_runs_change_neither_the_parameter_climatology_nor_the_normalization(planets, tmp_path):
    store = CubeStore(planets)
    split = split_store(store, val_runs=2)
    assert split.held_out_runs == [7, 8]
    frames = np.array(store.memmap())
    held = slice(int(store.run_rows[7]), None)
    frames[held] += 100.0
    params = store.params.copy()
    params[7:] *= 1.5
    changed_values = rewritten(planets, tmp_path / "values", frames=frames)
    changed_both = rewritten(planets, tmp_path / "both", frames=frames, params=params)
    fit = ParameterClimatology(store, split.train)
    norm = store_normalization(store, split.train)
    for other in (changed_values, changed_both):
        assert store_normalization(other, split.train) == norm
        again = ParameterClimatology(other, split.train)
        assert_same_fit(fit, again)
        for run in (0, 6):
            torch.testing.assert_close(again.for_times(run, np.arange(8)), fit.for_times(run, np.arange(8)))
    # the held-out planet's climatology depends on its parameters, never on its frames
    torch.testing.assert_close(
        ParameterClimatology(changed_values, split.train).for_times(7, np.arange(1, 8)),
        fit.for_times(7, np.arange(1, 8)), rtol=0, atol=0,
    )


def test_held_out_final_times_change_nothing(planets, tmp_path):
    store = CubeStore(planets)
    split = split_store(store, val_runs=0, holdout_time=0.25)
    assert split.train[0] == (0, 0, 6)
    frames = np.array(store.memmap())
    for run in range(store.runs):
        first = int(store.run_rows[run])
        frames[first + 6 : first + 8] -= 50.0
    changed = rewritten(planets, tmp_path / "late", frames=frames)
    fit, again = ParameterClimatology(store, split.train), ParameterClimatology(changed, split.train)
    assert fit.lead_steps == 6
    assert_same_fit(fit, again)
    np.testing.assert_array_equal(fit.lead, again.lead)
    assert store_normalization(changed, split.train) == store_normalization(store, split.train)
    torch.testing.assert_close(
        again.for_times(3, np.arange(8)), fit.for_times(3, np.arange(8)), rtol=0, atol=0
    )


def test_a_field_linear_in_the_parameters_is_reproduced_exactly(planets, tmp_path):
    store = CubeStore(planets)
    rng = np.random.default_rng(0)
    scale = np.asarray([6e6, 10.0, 7e-5, 1300.0, 1e5])
    params = scale * rng.uniform(0.5, 2.0, (store.runs, 5))
    shape = store.row_shape
    base = rng.standard_normal(shape)
    slopes = rng.standard_normal((5, *shape))
    drift = rng.standard_normal(shape)  # the same change with time since start on every planet
    steps = int(store.run_times[0])

    def truth(p: np.ndarray, t: int) -> np.ndarray:
        return base + np.tensordot(p / scale, slopes, axes=1) + (t - (steps - 1) / 2) * drift

    frames = np.stack([truth(params[r], t) for r in range(store.runs) for t in range(steps)])
    synthetic = rewritten(planets, tmp_path / "linear", frames=frames, params=params)
    split = split_store(synthetic, val_runs=1)
    fit = ParameterClimatology(synthetic, split.train)
    # leave-one-run-out finds the exact model: least squares on the parameters, per step since start
    assert set(fit.choice) == {"ridge on linear parameters, lambda 0, lead time"}
    got = fit.for_times(8, np.arange(steps)).double().numpy()
    expected = np.stack([truth(params[8], t) for t in range(steps)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # the pooled (calendar) climatology is far from it: the planets differ
    pooled = Climatology(synthetic, split.train).for_times(8, np.arange(steps)).double().numpy()
    assert np.abs(pooled - expected).max() > 100 * np.abs(got - expected).max()


def test_stores_without_planet_parameters_keep_the_calendar_climatology(planets, tmp_path):
    from tests.test_eval_leaks import cmip_store

    cmip = cmip_store(tmp_path, "cmip", held_out_offset=2.0)
    climatology, info = fit_climatology(cmip, split_store(cmip, val_runs=1).train)
    assert isinstance(climatology, Climatology)
    assert info["key"] == "calendar month"
    assert info["planet_parameters"] == "skipped: the store's runs carry no planet parameters"
    store = CubeStore(planets)
    few = [(r, 0, 8) for r in (0, 1)]
    climatology, info = fit_climatology(store, few)
    assert isinstance(climatology, Climatology) and info["key"] == "day of year"
    assert info["planet_parameters"].startswith("skipped: 2 training runs")
    with pytest.raises(ValueError, match="2 training runs"):
        ParameterClimatology(store, few)
    climatology, info = fit_climatology(store, split_store(store, val_runs=2).train)
    assert isinstance(climatology, ParameterClimatology) and info["key"] == "planet parameters"
    assert set(info["variables"]) == {v["name"] for v in store.variables}


def test_evaluation_scores_against_the_parameter_climatology(planets, tmp_path):
    config = surrogate_config(planets, tmp_path / "run", steps=1, hidden=32, layers=1, heads=2, val_runs=2)
    CubeTask(config)
    torch.manual_seed(0)
    save_folder(build_model(config), config, tmp_path / "ckpt")  # zero head: exactly persistence
    result = evaluate_surrogate(tmp_path / "ckpt", planets, None, rollout_steps=2, plots=False)
    assert result["climatology"]["key"] == "planet parameters"
    assert result["baselines"]["climatology"] == "applied (planet parameters)"
    for key in ("rmse_climatology", "rmse_calendar_climatology", "skill_vs_calendar_climatology"):
        assert key in result and key in result["definitions"]
    store = CubeStore(planets)
    split = split_store(store, val_runs=2)
    fit = ParameterClimatology(store, split.train)
    truth = torch.cat([store.read_rows(int(store.run_rows[r]) + 1, 7) for r in (7, 8)])
    clim = torch.cat([fit.for_times(r, np.arange(1, 8)) for r in (7, 8)])
    calendar = Climatology(store, split.train)
    pooled = torch.cat([calendar.for_times(r, np.arange(1, 8)) for r in (7, 8)])
    weights = normalized_weights(torch.as_tensor(store.area), torch.as_tensor(store.valid))
    for name in config.cube.variables:
        sl = store.channel_slice(name)
        for key, forecast in (("rmse_climatology", clim), ("rmse_calendar_climatology", pooled)):
            expected = rmse(forecast, truth, weights)[sl].double().pow(2).mean().sqrt().item()
            assert result[key][name] == pytest.approx(expected, rel=1e-4)
    assert "planet-parameter climatology" in skill_sentence(result)
