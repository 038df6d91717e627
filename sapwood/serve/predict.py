"""``POST /v1/predict`` for a datacube-surrogate checkpoint (mounted by :mod:`sapwood.serve.app`).

Request bodies (physical units; the checkpoint's ``cube`` section defines variables, levels and grid):

- JSON (``application/json``)::

      {"state": {"T": [[[...]]] (lev, lat, lon), ..., "ps": [[...]] (lat, lon)},
       "planet": {"gravity": 9.81, ...},   # every name of cube.planet_params
       "units": {"T": "K", ...},           # optional; checked against the expected units
       "steps": 1,                         # autoregressive steps, 1..MAX_STEPS
       "project": true}                    # optional; default cube.physics.project_mass

  Unknown fields are refused (a misnamed ``params`` is a 422 naming it), the schema is in /openapi.json
  (built per checkpoint: its variables, their nesting, its planet parameters).
- NumPy (``application/x-npy``): one ``.npy`` array ``[channels, lat, lon]`` in the store's channel
  layout; planet parameters, ``steps`` and ``project`` as query parameters. The header (dtype, shape)
  is checked before the data is read; ``.npz`` archives, pickles, complex and object arrays are refused.
- NetCDF (``application/x-netcdf``): a file like ``sapwood simulate`` writes; the last time is used,
  units are read from the variables' attributes, planet parameters from variables or attributes. The file
  is opened lazily: declared shapes, sizes and dtypes are checked before any data is read, and only the
  last time of the model's variables is read.

The work (parsing, the model steps, the response's JSON) runs in a bounded pool of worker threads, off
the event loop, with a timeout (504; the steps stop at the next step boundary); more than
``predict_queue`` requests at once get 429. A prediction that is not finite is a 422.

Response: ``{"steps", "variables", "units", "states": [{var: nested lists}, ...] (one per step),
"violations": [{name: percent}, ...] (one per step, see sapwood.physics), "projected"}``.
Bad shapes, unknown or missing variables, wrong units, non-finite values and missing planet parameters
are 422 with one line naming the value and what is allowed; an unreadable body is 400; a declared array
larger than the model could take is 413; a content type not listed is 415.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from sapwood.config import Config, load_config
from sapwood.data.simulate import VARIABLE_ATTRS
from sapwood.model import load
from sapwood.model.cube import CubePredictor
from sapwood.physics import Geometry, project, violations
from sapwood.serve.errors import APIError, validation_message
from sapwood.serve.settings import ServeSettings

MAX_STEPS = 100
MAX_NETCDF_FRAMES = 64  # a NetCDF variable may declare at most this many frames of the model's grid
NUMERIC_KINDS = "fiu"  # float, signed and unsigned integer; never complex, object, string or void
UNIT_ALIASES = {
    "m/s": "m s-1", "kg/kg": "kg kg-1", "kg/m3": "kg m-3", "kg m^-3": "kg m-3", "m s^-1": "m s-1",
    "1": "kg kg-1",
}


def _canonical(unit: str) -> str:
    unit = unit.strip()
    return UNIT_ALIASES.get(unit, unit)


StrictInput = ConfigDict(extra="forbid", allow_inf_nan=False)


def request_model(cube) -> type[BaseModel]:
    """The JSON body of ``POST /v1/predict`` for this checkpoint's cube section (documented in OpenAPI)."""
    grid = f"{cube.lat} x {cube.lon}"
    state_fields: dict[str, Any] = {
        name: (
            list[list[float]] if name in cube.surface_variables else list[list[list[float]]],
            Field(
                description=f"{name}: [lat][lon] = {grid}"
                if name in cube.surface_variables
                else f"{name}: [lev][lat][lon] = {cube.levels} x {grid}"
            ),
        )
        for name in cube.variables
    }
    state = create_model("PredictState", __config__=StrictInput, **state_fields)
    planet = create_model(
        "PlanetParameters",
        __config__=StrictInput,
        **{name: (float, Field(gt=0, description="positive, finite")) for name in cube.planet_params},
    )
    units = create_model(
        "PredictUnits",
        __config__=StrictInput,
        **{name: (str | None, Field(None, max_length=64)) for name in cube.variables},
    )
    return create_model(
        "PredictRequest",
        __config__=StrictInput,
        state=(state, Field(description="the current state, one array per variable (physical units)")),
        planet=(planet, Field(description="the planet's parameters")),
        units=(units | None, Field(None, description="optional; checked against the model's units")),
        steps=(int, Field(1, ge=1, le=MAX_STEPS, description="autoregressive steps")),
        project=(
            bool | None,
            Field(None, description="project onto conserved mass (default: the checkpoint's)"),
        ),
    )


class Cancelled(Exception):
    """The request's deadline passed while it was being worked on."""


class CubeService:
    """Validation, prediction and physics for one surrogate checkpoint (thread-safe)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.folder = Path(folder)
        self.config: Config = load_config(self.folder / "config.yaml")
        self.cube = self.config.cube
        self.device = torch.device(device)
        self.model = load(self.folder, device=device)
        self.predictor = CubePredictor(self.model)
        self.geometry = Geometry.default(self.cube, device=device)
        self.lock = threading.Lock()
        self.units = {
            name: self.cube.units.get(name, VARIABLE_ATTRS.get(name, {}).get("units", ""))
            for name in self.cube.variables
        }
        self.request_model = request_model(self.cube)

    # --- validation ----------------------------------------------------------------------------------------
    def expected_shape(self, name: str) -> tuple[int, ...]:
        grid = (self.cube.lat, self.cube.lon)
        return grid if name in self.cube.surface_variables else (self.cube.levels, *grid)

    def check_units(self, units: dict[str, str | None]) -> None:
        for name, unit in units.items():
            if unit is None:
                continue
            if name not in self.units:
                raise APIError(
                    422,
                    f"units given for unknown variable {name!r}; variables are {self.cube.variables}",
                    "units",
                )
            if _canonical(str(unit)) != _canonical(self.units[name]):
                raise APIError(
                    422,
                    f"units of {name} are {str(unit)[:32]!r}; this model expects {self.units[name]!r}",
                    f"units.{name}",
                )

    def state_from_fields(self, fields: dict[str, Any]) -> torch.Tensor:
        """``[1, channels, lat, lon]`` float32 from per-variable arrays, validated."""
        parts = []
        for name in self.cube.variables:
            try:
                array = np.asarray(fields[name], dtype=np.float32)
            except (ValueError, TypeError, OverflowError):
                raise APIError(
                    422, f"state.{name} is not a rectangular array of numbers", f"state.{name}"
                ) from None
            expected = self.expected_shape(name)
            if array.shape != expected:
                dims = "(lev, lat, lon)" if len(expected) == 3 else "(lat, lon)"
                raise APIError(
                    422,
                    f"state.{name} has shape {list(array.shape)}; expected {list(expected)} {dims}",
                    f"state.{name}",
                )
            parts.append(array.reshape(-1, *expected[-2:]))
        return self.check_finite(torch.from_numpy(np.concatenate(parts))[None])

    def state_from_npy(self, body: bytes) -> torch.Tensor:
        """The ``.npy`` body, its header checked before the data is read."""
        expected = (self.cube.channels, self.cube.lat, self.cube.lon)
        buffer = io.BytesIO(body)
        try:
            version = np.lib.format.read_magic(buffer)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(buffer)
        except Exception:  # noqa: BLE001 - any header failure is the client's
            hint = " (an .npz archive? send one .npy array)" if body[:2] == b"PK" else ""
            raise APIError(400, f"the body is not a readable .npy array{hint}", "body") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
            raise APIError(
                422, f"npy array has dtype {dtype}; expected a real numeric array (float or int)", "body"
            )
        if tuple(shape) not in (expected, (1, *expected)):
            raise APIError(
                422,
                f"npy array has shape {list(shape)}; expected {list(expected)} (channels, lat, lon)",
                "body",
            )
        if len(body) - buffer.tell() != math.prod(shape) * dtype.itemsize:
            raise APIError(
                400,
                f"the .npy body holds {len(body) - buffer.tell()} data bytes; its header declares "
                f"{math.prod(shape) * dtype.itemsize}",
                "body",
            )
        array = np.frombuffer(body, dtype=dtype, offset=buffer.tell()).reshape(
            shape, order="F" if fortran_order else "C"
        )
        state = torch.from_numpy(array.reshape(expected).astype(np.float32, order="C", copy=True))[None]
        return self.check_finite(state)

    @staticmethod
    def check_finite(state: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(state).all():
            raise APIError(
                422,
                "state contains NaN or inf values (or numbers beyond float32); all values must be finite",
                "state",
            )
        return state

    def planet_params(self, planet: dict[str, Any]) -> torch.Tensor:
        names = self.cube.planet_params
        missing = [n for n in names if n not in planet]
        if missing:
            raise APIError(422, f"missing planet parameters {missing}; this model needs {names}", "planet")
        unknown = sorted(set(planet) - set(names))
        if unknown:
            raise APIError(
                422,
                f"unknown planet parameters {[u[:32] for u in unknown[:5]]}; allowed are {names}",
                "planet",
            )
        values = []
        for name in names:
            try:
                value = float(planet[name])
            except (TypeError, ValueError, OverflowError):
                shown = str(planet[name])[:32]
                raise APIError(422, f"planet.{name}={shown!r} is not a number", f"planet.{name}") from None
            if not math.isfinite(value) or value <= 0:
                raise APIError(
                    422, f"planet.{name}={value} must be a positive finite number", f"planet.{name}"
                )
            values.append(value)
        return torch.tensor([values], dtype=torch.float32)

    @staticmethod
    def steps(value: Any) -> int:
        try:
            steps = int(value)
        except (TypeError, ValueError, OverflowError):
            raise APIError(
                422, f"steps={str(value)[:32]!r} is not an integer; allowed 1..{MAX_STEPS}", "steps"
            ) from None
        if not 1 <= steps <= MAX_STEPS or steps != float(value):
            raise APIError(422, f"steps={str(value)[:32]!r} is out of range; allowed 1..{MAX_STEPS}", "steps")
        return steps

    # --- the three body kinds -------------------------------------------------------------------------------
    def parse_json(self, body: bytes) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        try:
            payload = self.request_model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors()
            if errors and errors[0].get("type") == "json_invalid":
                raise APIError(400, "the request body is not valid JSON") from None
            if errors and tuple(errors[0].get("loc", ())) == ():
                raise APIError(422, "the body must be a JSON object with 'state' and 'planet'") from None
            raise APIError(422, *validation_message(exc)) from None
        if payload.units is not None:
            self.check_units(payload.units.model_dump())
        state = self.state_from_fields(payload.state.model_dump())
        params = self.planet_params(payload.planet.model_dump())
        projection = self.cube.physics.project_mass if payload.project is None else payload.project
        return state, params, payload.steps, projection

    def parse_npy(self, body: bytes, query: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        state = self.state_from_npy(body)
        steps = self.steps(query.pop("steps", 1))
        projection = query.pop("project", str(self.cube.physics.project_mass)).lower() in ("1", "true", "yes")
        return state, self.planet_params(query), steps, projection

    def parse_netcdf(
        self, body: bytes, query: dict[str, str]
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        state, params = _netcdf_request(self, body)
        return state, params, self.steps(query.get("steps", 1)), self.cube.physics.project_mass

    # --- prediction ----------------------------------------------------------------------------------------
    def predict(
        self, state: torch.Tensor, params: torch.Tensor, steps: int, projection: bool,
        cancelled: threading.Event | None = None,
    ) -> dict[str, Any]:
        states, reports = [], []
        with self.lock, torch.inference_mode():
            current = state.to(self.device)
            params = params.to(self.device)
            for step in range(steps):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled
                prediction = self.predictor(current, params).clone()
                if projection:
                    prediction = project(prediction, current, self.geometry, params)
                if not torch.isfinite(prediction).all():
                    raise APIError(
                        422,
                        f"the prediction is not finite at step {step + 1} (the state or planet is "
                        "far outside what the model was trained on)",
                        "state",
                        code="non_finite_output",
                    )
                v = violations(current, prediction, self.geometry, params)
                reports.append({k: _finite_or_none(float(t[0])) for k, t in v.items()})
                states.append(prediction)
                current = prediction
        out_states = []
        for prediction in states:
            fields = {}
            for name in self.cube.variables:
                values = prediction[0, self.cube.channel_slice(name)].cpu().numpy()
                fields[name] = (values[0] if name in self.cube.surface_variables else values).tolist()
            out_states.append(fields)
        return {
            "steps": steps, "variables": self.cube.variables, "units": self.units, "states": out_states,
            "violations": reports, "projected": projection,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _netcdf_request(service: CubeService, body: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """State and planet parameters from a NetCDF body: opened lazily, every declared size and dtype checked
    before data is read, then only the last time of the model's variables read."""
    import xarray as xr

    cube = service.cube
    largest = max(math.prod(service.expected_shape(name)) for name in cube.variables)
    limit = largest * MAX_NETCDF_FRAMES
    with tempfile.NamedTemporaryFile(suffix=".nc") as tmp:
        tmp.write(body)
        tmp.flush()
        try:
            ds = xr.open_dataset(
                tmp.name, engine="netcdf4", cache=False, decode_times=False, mask_and_scale=False
            )
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            raise APIError(
                400, f"the body is not a readable NetCDF4 file ({type(exc).__name__})", "body"
            ) from None
        with ds:
            for name, var in ds.variables.items():
                if var.size > limit:
                    raise APIError(
                        413,
                        f"NetCDF variable {str(name)[:32]!r} declares {var.size} values "
                        f"{list(var.shape)}; at most {limit} ({MAX_NETCDF_FRAMES} frames of the model's "
                        "grid) are accepted",
                        "body",
                    )
            fields, units = {}, {}
            for name in cube.variables:
                if name not in ds.variables:
                    raise APIError(
                        422, f"NetCDF file lacks variable {name!r}; this model needs {cube.variables}", "body"
                    )
                var = ds.variables[name]
                if var.dtype.kind not in NUMERIC_KINDS:
                    raise APIError(
                        422, f"NetCDF variable {name!r} has dtype {var.dtype}; expected real numbers", "body"
                    )
                if "time" in var.dims:
                    var = var.isel(time=-1)
                if var.shape != service.expected_shape(name):
                    raise APIError(
                        422,
                        f"NetCDF variable {name!r} has shape {list(var.shape)}; expected "
                        f"{list(service.expected_shape(name))}",
                        "body",
                    )
                fields[name] = np.asarray(var.values, dtype=np.float32)
                if "units" in var.attrs:
                    units[name] = str(var.attrs["units"])
            service.check_units(units)
            planet = {}
            for name in cube.planet_params:
                if (
                    name in ds.variables
                    and ds.variables[name].size == 1
                    and ds.variables[name].dtype.kind in NUMERIC_KINDS
                ):
                    planet[name] = float(ds.variables[name].values)
                elif name in ds.attrs:
                    planet[name] = ds.attrs[name]
            return service.state_from_fields(fields), service.planet_params(planet)


class PredictPool:
    """At most ``queue`` predict requests at once (429 beyond), run on ``workers`` threads, each with a
    deadline (504; the work stops at its next step)."""

    def __init__(self, workers: int, queue: int, timeout_s: float):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sapwood-predict")
        self.queue, self.timeout_s = queue, timeout_s
        self.pending = 0
        self._lock = threading.Lock()

    async def run(self, work) -> Any:
        with self._lock:
            if self.pending >= self.queue:
                raise APIError(
                    429, f"{self.queue} predictions are already running or waiting; retry later",
                    code="queue_full", headers={"Retry-After": "1"},
                )
            self.pending += 1
        cancelled = threading.Event()

        def guarded() -> Any:
            try:
                if cancelled.is_set():
                    raise Cancelled
                return work(cancelled)
            finally:
                with self._lock:
                    self.pending -= 1

        future = asyncio.get_running_loop().run_in_executor(self.executor, guarded)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            cancelled.set()
            raise APIError(
                504, f"the prediction did not finish within {self.timeout_s:g} s", code="timeout"
            ) from None
        except Cancelled:
            raise APIError(504, "the prediction was cancelled", code="timeout") from None


CONTENT_TYPES = {
    "application/json": "json", "application/x-npy": "npy", "application/octet-stream": "npy",
    "application/x-netcdf": "netcdf", "application/netcdf": "netcdf",
}


def create_router(
    folder: str | Path, settings: ServeSettings | None = None, device: str = "cpu"
) -> tuple[APIRouter, dict[str, Any]]:
    """The ``POST /v1/predict`` router for the surrogate checkpoint in ``folder``, and the schemas its
    OpenAPI operation references (for ``components.schemas``)."""
    settings = settings or ServeSettings()
    service = CubeService(folder, device)
    pool = PredictPool(settings.predict_workers, settings.predict_queue, settings.predict_timeout_s)
    schema = service.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    components["PredictRequest"] = schema
    binary = {"schema": {"type": "string", "format": "binary"}}
    planet_query = [
        {"name": name, "in": "query", "required": False, "schema": {"type": "number"}}
        for name in service.cube.planet_params
    ]
    openapi_extra = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
                "application/x-npy": binary,
                "application/x-netcdf": binary,
            },
        },
        "parameters": planet_query
        + [
            {
                "name": "steps", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
            },
            {"name": "project", "in": "query", "required": False, "schema": {"type": "boolean"}},
        ],
    }
    router = APIRouter()

    @router.post("/v1/predict", openapi_extra=openapi_extra)
    async def predict(request: Request) -> Response:
        """One or more autoregressive steps of the surrogate from a state in physical units (JSON, .npy or
        NetCDF; planet parameters, ``steps`` and ``project`` as query parameters for the binary kinds)."""
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        kind = CONTENT_TYPES.get(content_type)
        if kind is None:
            raise APIError(
                415,
                f"content type {content_type[:64]!r} is not supported; use application/json, "
                "application/x-npy or application/x-netcdf",
            )
        body = await request.body()
        query = dict(request.query_params)

        def work(cancelled: threading.Event) -> bytes:
            if kind == "json":
                parsed = service.parse_json(body)
            elif kind == "npy":
                parsed = service.parse_npy(body, query)
            else:
                parsed = service.parse_netcdf(body, query)
            return json.dumps(service.predict(*parsed, cancelled=cancelled), allow_nan=False).encode()

        return Response(await pool.run(work), media_type="application/json")

    return router, components
