"""POST /v1/predict against a real server (uvicorn on loopback, httpx), good and bad inputs."""

import io

import httpx
import numpy as np
import pytest
import torch

from sapwood.config import Config, CubeModelConfig, ModelConfig
from sapwood.data.simulate import Grid, run_states, sample_planets, write_run
from sapwood.model import build_model, save_folder
from sapwood.serve.app import create_app
from sapwood.serve.server import BackgroundServer

PARAMS = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]
GRID = Grid(levels=4, nlat=16, nlon=32, times=3, spinup_days=1)
PLANET = sample_planets(2, seed=0)[0]
PLANET_JSON = dict(
    zip(
        PARAMS,
        [PLANET.radius, PLANET.gravity, PLANET.rotation_rate, PLANET.stellar_flux, PLANET.surface_pressure],
        strict=True,
    )
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict") / "surrogate"
    config = Config(
        model=ModelConfig(vocab_size=1, hidden=32, layers=1, heads=2, ffn=64),
        cube=CubeModelConfig(levels=4, lat=16, lon=32, patch=4, planet_params=PARAMS),
    )
    torch.manual_seed(0)
    save_folder(build_model(config), config, folder)
    with BackgroundServer(create_app(folder)) as running:
        yield running, folder


@pytest.fixture(scope="module")
def state():
    fields, _ = next(iter(run_states(PLANET, GRID)))
    return {name: values.astype(np.float32) for name, values in fields.items()}


def post(server, **kwargs):
    running, _ = server
    return httpx.post(f"{running.url}/v1/predict", timeout=60, **kwargs)


def json_body(state, **extra):
    return {"state": {k: v.tolist() for k, v in state.items()}, "planet": PLANET_JSON, **extra}


def test_json_prediction_with_projection_conserves_mass(server, state):
    reply = post(server, json=json_body(state, steps=2, units={"T": "K", "ps": "Pa", "u": "m/s"}))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["steps"] == 2 and len(body["states"]) == 2 and body["projected"] is True
    predicted = np.asarray(body["states"][0]["T"])
    assert predicted.shape == (4, 16, 32) and np.isfinite(predicted).all()
    assert np.asarray(body["states"][1]["ps"]).shape == (16, 32)
    for report in body["violations"]:
        assert report["mass"] < 0.05 and report["water"] < 1e-4 and report["ideal_gas"] < 1e-4
        assert {"energy", "momentum", "thermo", "hydrostatic"} <= set(report)
    ps_in = state["ps"].astype(np.float64)
    ps_out = np.asarray(body["states"][0]["ps"])
    weights = np.cos(np.deg2rad(np.linspace(-90 + 180 / 32, 90 - 180 / 32, 16)))[:, None]
    assert abs((ps_out * weights).sum() / (ps_in * weights).sum() - 1) < 1e-4  # same global mass


def test_npy_and_netcdf_uploads_give_the_same_prediction(server, state, tmp_path):
    running, folder = server
    frame = np.concatenate(
        [state[v][None] if v == "ps" else state[v] for v in ["T", "u", "v", "q", "ps", "rho", "zg"]]
    )
    buffer = io.BytesIO()
    np.save(buffer, frame)
    npy = post(
        server, content=buffer.getvalue(), headers={"content-type": "application/x-npy"}, params=PLANET_JSON
    )
    assert npy.status_code == 200, npy.text
    path = write_run(tmp_path / "one.nc", PLANET, Grid(levels=4, nlat=16, nlon=32, times=2, spinup_days=1))
    import xarray as xr

    with xr.open_dataset(path) as ds:
        last = {name: ds[name].isel(time=-1).values.astype(np.float32) for name in state}
    via_json = post(server, json=json_body(last))
    nc = post(server, content=path.read_bytes(), headers={"content-type": "application/x-netcdf"})
    assert nc.status_code == 200, nc.text
    np.testing.assert_allclose(nc.json()["states"][0]["T"], via_json.json()["states"][0]["T"], rtol=1e-6)
    reference = post(server, json=json_body(state))
    np.testing.assert_allclose(npy.json()["states"][0]["zg"], reference.json()["states"][0]["zg"], rtol=1e-6)


@pytest.mark.parametrize(
    "mutate, status, words",
    [
        (
            lambda b: b["state"].update(T=np.zeros((3, 16, 32)).tolist()),
            422,
            ["state.T", "[3, 16, 32]", "[4, 16, 32]"],
        ),
        (lambda b: b["state"].pop("q"), 422, ["missing required field 'state.q'"]),
        (lambda b: b["state"].update(w=[[0.0]]), 422, ["unknown field 'state.w'"]),
        (lambda b: b.update(units={"T": "degC"}), 422, ["units of T", "degC", "K"]),
        (lambda b: b["planet"].pop("gravity"), 422, ["gravity"]),
        (lambda b: b.update(steps=0), 422, ["steps=0", "greater than or equal to 1"]),
        (lambda b: b["state"]["ps"][0].__setitem__(0, float("nan")), 400, ["NaN", "finite"]),
        (lambda b: b.update(params=b.pop("planet")), 422, ["unknown field 'params'"]),
    ],
)
def test_bad_json_inputs_are_clear_4xx(server, state, mutate, status, words):
    body = json_body(state)
    body["planet"] = dict(body["planet"])
    mutate(body)
    import json

    reply = post(
        server, content=json.dumps(body).replace("NaN", "NaN"), headers={"content-type": "application/json"}
    )
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]["message"]
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_unreadable_bodies(server):
    assert post(server, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert post(server, content=b"garbage", headers={"content-type": "application/x-npy"}).status_code == 400
    assert (
        post(server, content=b"garbage", headers={"content-type": "application/x-netcdf"}).status_code == 400
    )
    reply = post(server, content=b"x", headers={"content-type": "text/plain"})
    assert reply.status_code == 415 and "application/json" in reply.json()["error"]["message"]
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((25, 16, 31), dtype=np.float32))
    bad = post(
        server, content=buffer.getvalue(), headers={"content-type": "application/x-npy"}, params=PLANET_JSON
    )
    assert bad.status_code == 422 and "[25, 16, 32]" in bad.json()["error"]["message"]


def hostile_netcdf(path) -> bytes:
    """A few KB of compressed NetCDF that declares a 4000 x 4000 float32 variable (64 MB when read)."""
    import netCDF4

    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("y", 4000)
        ds.createDimension("x", 4000)
        ds.createVariable("T", "f4", ("y", "x"), zlib=True, complevel=9, fill_value=0.0)
    return path.read_bytes()


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, make_body, content_type, query, status, words",
    [
        (
            "NetCDF declaring 4000 x 4000", lambda tmp: hostile_netcdf(tmp / "big.nc"),
            "application/x-netcdf", {}, 413, "declares 16000000 values",
        ),
        (
            "steps: Infinity", lambda tmp: b'{"state": {}, "planet": {}, "steps": Infinity}',
            "application/json", {}, 400, "Infinity is not a JSON number",
        ),
        ("an .npz archive", lambda tmp: _npz(), "application/x-npy", PLANET_JSON, 400, "an .npz archive?"),
        (
            "a complex array", lambda tmp: npy_bytes(np.zeros((25, 16, 32), np.complex64)),
            "application/x-npy", PLANET_JSON, 422, "dtype complex64",
        ),
        (
            "an object array", lambda tmp: npy_bytes(np.array([None] * 4, dtype=object)), "application/x-npy",
            PLANET_JSON, 422, "dtype object",
        ),
        (
            "a header declaring more than the body",
            lambda tmp: npy_bytes(np.zeros((25, 16, 32), np.float32))[:-100], "application/x-npy",
            PLANET_JSON, 400, "its header declares",
        ),
    ],
)
def test_hostile_predict_bodies_get_a_4xx_and_the_server_keeps_serving(
    server, state, tmp_path, name, make_body, content_type, query, status, words
):
    reply = post(server, content=make_body(tmp_path), headers={"content-type": content_type}, params=query)
    assert reply.status_code == status, reply.text[:300]
    assert words in reply.json()["error"]["message"]
    assert post(server, json=json_body(state)).status_code == 200
    running, _ = server
    assert httpx.get(f"{running.url}/health").status_code == 200


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, state=np.zeros((25, 16, 32), np.float32))
    return buffer.getvalue()


def test_a_prediction_that_is_not_finite_is_a_422(server, state):
    huge = {name: np.full_like(values, 3e38) for name, values in state.items()}
    reply = post(server, json=json_body(huge, steps=3))
    assert reply.status_code == 422, reply.text[:300]
    assert "the prediction is not finite at step 1" in reply.json()["error"]["message"]
