"""``POST /v1/predict`` for a datacube-surrogate checkpoint (mounted by :mod:`sapwood.serve.app`).

Request bodies (physical units; the checkpoint's ``cube`` section defines variables, levels and grid):

- JSON (``application/json``)::

      {"state": {"T": [[[...]]] (lev, lat, lon), ..., "ps": [[...]] (lat, lon)},
       "planet": {"gravity": 9.81, ...},   # every name of cube.planet_params
       "units": {"T": "K", ...},           # optional; checked against the expected units
       "steps": 1,                         # autoregressive steps, 1..MAX_STEPS
       "project": true}                    # optional; default cube.physics.project_mass

- NumPy (``application/x-npy``): one ``.npy`` array ``[channels, lat, lon]`` in the store's channel
  layout; planet parameters, ``steps`` and ``project`` as query parameters.
- NetCDF (``application/x-netcdf``): a file like ``sapwood simulate`` writes; the last time is used,
  units are read from the variables' attributes, planet parameters from variables or attributes.

Response: ``{"steps", "variables", "units", "states": [{var: nested lists}, ...] (one per step),
"violations": [{name: percent}, ...] (one per step, see sapwood.physics), "projected"}``.
Bad shapes, unknown or missing variables, wrong units, non-finite values and missing planet parameters
are 422 with one line naming the value and what is allowed; an unreadable body is 400; a content
type not listed is 415.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sapwood.config import Config, load_config
from sapwood.data.simulate import VARIABLE_ATTRS
from sapwood.model import load
from sapwood.model.cube import CubePredictor
from sapwood.physics import Geometry, project, violations
from sapwood.serve.errors import APIError

MAX_STEPS = 100
UNIT_ALIASES = {"m/s": "m s-1", "kg/kg": "kg kg-1", "kg/m3": "kg m-3", "kg m^-3": "kg m-3", "m s^-1": "m s-1",
                "1": "kg kg-1"}


def _canonical(unit: str) -> str:
    unit = unit.strip()
    return UNIT_ALIASES.get(unit, unit)


class CubeService:
    """Validation, prediction and physics for one surrogate checkpoint (thread-safe)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.folder = Path(folder)
        self.config: Config = load_config(self.folder / "config.yaml")
        self.cube = self.config.cube
        self.model = load(self.folder, device=device)
        self.predictor = CubePredictor(self.model)
        self.geometry = Geometry.default(self.cube, device=device)
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self.units = {name: self.cube.units.get(name, VARIABLE_ATTRS.get(name, {}).get("units", ""))
                      for name in self.cube.variables}

    # --- validation ----------------------------------------------------------------------------------------
    def expected_shape(self, name: str) -> tuple[int, ...]:
        grid = (self.cube.lat, self.cube.lon)
        return grid if name in self.cube.surface_variables else (self.cube.levels, *grid)

    def check_units(self, units: dict[str, str]) -> None:
        for name, unit in units.items():
            if name not in self.units:
                raise APIError(422, f"units given for unknown variable {name!r}; variables are {self.cube.variables}",
                               "units")
            if _canonical(str(unit)) != _canonical(self.units[name]):
                raise APIError(422, f"units of {name} are {unit!r}; this model expects {self.units[name]!r}",
                               f"units.{name}")

    def state_from_fields(self, fields: dict[str, Any]) -> torch.Tensor:
        """``[1, channels, lat, lon]`` float32 from per-variable arrays, validated."""
        if not isinstance(fields, dict):
            raise APIError(422, "state must be an object mapping variable names to arrays", "state")
        unknown = sorted(set(fields) - set(self.cube.variables))
        if unknown:
            raise APIError(422, f"unknown variables {unknown}; this model takes {self.cube.variables}", "state")
        missing = [v for v in self.cube.variables if v not in fields]
        if missing:
            raise APIError(422, f"missing variables {missing}; this model needs {self.cube.variables}", "state")
        parts = []
        for name in self.cube.variables:
            try:
                array = np.asarray(fields[name], dtype=np.float32)
            except (ValueError, TypeError):
                raise APIError(422, f"state.{name} is not a rectangular array of numbers", f"state.{name}") from None
            expected = self.expected_shape(name)
            if array.shape != expected:
                dims = "(lev, lat, lon)" if len(expected) == 3 else "(lat, lon)"
                raise APIError(422, f"state.{name} has shape {list(array.shape)}; expected {list(expected)} {dims}",
                               f"state.{name}")
            parts.append(array.reshape(-1, *expected[-2:]))
        return self.check_finite(torch.from_numpy(np.concatenate(parts))[None])

    def state_from_array(self, array: np.ndarray) -> torch.Tensor:
        expected = (self.cube.channels, self.cube.lat, self.cube.lon)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != expected or array.shape[0] != 1:
            raise APIError(422, f"npy array has shape {list(array.shape)}; expected {list(expected)} "
                           "(channels, lat, lon)", "body")
        if not np.issubdtype(array.dtype, np.number):
            raise APIError(422, f"npy array has dtype {array.dtype}; expected a float array", "body")
        return self.check_finite(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))

    @staticmethod
    def check_finite(state: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(state).all():
            raise APIError(422, "state contains NaN or inf values; all values must be finite", "state")
        return state

    def planet_params(self, planet: dict[str, Any]) -> torch.Tensor:
        names = self.cube.planet_params
        if not isinstance(planet, dict):
            raise APIError(422, "planet must be an object of planet parameters", "planet")
        missing = [n for n in names if n not in planet]
        if missing:
            raise APIError(422, f"missing planet parameters {missing}; this model needs {names}", "planet")
        unknown = sorted(set(planet) - set(names))
        if unknown:
            raise APIError(422, f"unknown planet parameters {unknown}; allowed are {names}", "planet")
        values = []
        for name in names:
            try:
                value = float(planet[name])
            except (TypeError, ValueError):
                raise APIError(422, f"planet.{name}={planet[name]!r} is not a number", f"planet.{name}") from None
            if not math.isfinite(value) or value <= 0:
                raise APIError(422, f"planet.{name}={value} must be a positive finite number", f"planet.{name}")
            values.append(value)
        return torch.tensor([values], dtype=torch.float32)

    @staticmethod
    def steps(value: Any) -> int:
        try:
            steps = int(value)
        except (TypeError, ValueError):
            raise APIError(422, f"steps={value!r} is not an integer; allowed 1..{MAX_STEPS}", "steps") from None
        if not 1 <= steps <= MAX_STEPS or steps != float(value):
            raise APIError(422, f"steps={value!r} is out of range; allowed 1..{MAX_STEPS}", "steps")
        return steps

    # --- prediction ----------------------------------------------------------------------------------------
    def predict(self, state: torch.Tensor, params: torch.Tensor, steps: int, projection: bool) -> dict[str, Any]:
        states, reports = [], []
        with self.lock, torch.inference_mode():
            current = state.to(self.device)
            params = params.to(self.device)
            for _ in range(steps):
                prediction = self.predictor(current, params).clone()
                if projection:
                    prediction = project(prediction, current, self.geometry, params)
                v = violations(current, prediction, self.geometry, params)
                reports.append({k: float(t[0]) for k, t in v.items()})
                states.append(prediction)
                current = prediction
        out_states = []
        for prediction in states:
            fields = {}
            for name in self.cube.variables:
                values = prediction[0, self.cube.channel_slice(name)].cpu().numpy()
                fields[name] = (values[0] if name in self.cube.surface_variables else values).tolist()
            out_states.append(fields)
        return {"steps": steps, "variables": self.cube.variables, "units": self.units, "states": out_states,
                "violations": reports, "projected": projection}


def _netcdf_request(service: CubeService, body: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    import tempfile

    import xarray as xr

    with tempfile.NamedTemporaryFile(suffix=".nc") as tmp:
        tmp.write(body)
        tmp.flush()
        try:
            ds = xr.open_dataset(tmp.name, engine="netcdf4").load()
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            raise APIError(400, f"the body is not a readable NetCDF4 file ({type(exc).__name__})", "body") from None
    with ds:
        fields, units = {}, {}
        for name in service.cube.variables:
            if name not in ds:
                raise APIError(422, f"NetCDF file lacks variable {name!r}; this model needs {service.cube.variables}",
                               "body")
            var = ds[name]
            if "time" in var.dims:
                var = var.isel(time=-1)
            fields[name] = var.values
            if "units" in var.attrs:
                units[name] = var.attrs["units"]
        service.check_units(units)
        planet = {}
        for name in service.cube.planet_params:
            if name in ds:
                planet[name] = float(ds[name].values)
        return service.state_from_fields(fields), service.planet_params(planet)


def create_router(folder: str | Path, device: str = "cpu") -> APIRouter:
    """The ``POST /v1/predict`` router for the surrogate checkpoint in ``folder``."""
    service = CubeService(folder, device)
    router = APIRouter()

    @router.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
        body = await request.body()
        query = dict(request.query_params)
        projection = service.cube.physics.project_mass
        if content_type == "application/json":
            import json

            try:
                payload = json.loads(body)
            except ValueError:
                raise APIError(400, "the request body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise APIError(422, "the body must be a JSON object with 'state' and 'planet'")
            if "state" not in payload:
                raise APIError(422, "missing required field 'state'", "state")
            service.check_units(payload.get("units") or {})
            state = service.state_from_fields(payload["state"])
            params = service.planet_params(payload.get("planet", {}))
            steps = service.steps(payload.get("steps", 1))
            projection = bool(payload.get("project", projection))
        elif content_type in ("application/x-npy", "application/octet-stream"):
            try:
                array = np.load(io.BytesIO(body), allow_pickle=False)
            except Exception:  # noqa: BLE001
                raise APIError(400, "the body is not a readable .npy array", "body") from None
            state = service.state_from_array(array)
            steps = service.steps(query.pop("steps", 1))
            projection = query.pop("project", str(projection)).lower() in ("1", "true", "yes")
            params = service.planet_params(query)
        elif content_type in ("application/x-netcdf", "application/netcdf"):
            state, params = _netcdf_request(service, body)
            steps = service.steps(query.get("steps", 1))
        else:
            raise APIError(415, f"content type {content_type!r} is not supported; use application/json, "
                           "application/x-npy or application/x-netcdf")
        return JSONResponse(service.predict(state, params, steps, projection))

    return router

