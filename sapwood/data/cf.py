"""Reading one CF-convention input: axes by metadata, the horizontal grid, masks, calendars, and runs
split over many files.

Axes are found from CF metadata only (``axis``, ``standard_name``, ``units``, ``positive``; through
cf-xarray, plus CF 4.3's rule that pressure units mark a vertical coordinate), never from dimension
names. Everything here works on an open :class:`xarray.Dataset` (opened with ``mask_and_scale`` so
``_FillValue`` / ``missing_value`` become NaN and ``scale_factor`` / ``add_offset`` are decoded) and
returns plain numpy arrays in one canonical order:

- latitude ascending (south first), longitude ascending in the convention of the first input
  (``0..360`` or ``-180..180``, rolled so it increases), levels ordered top-down: increasing along the
  downward direction (pressure, depth and sigma ascending; height descending). Every flip or roll is
  recorded in :class:`HorizontalGrid` / :class:`VerticalAxis` so it can be reported.
- times as numbers in days since a reference date of the run's calendar (any cftime calendar);
  :func:`time_keys` gives calendar months and days of year for climatologies.
- cell area weights (mean 1 over the grid): from the ``cell_measures`` area variable when present,
  else from cell bounds, else ``cos(lat) dlon`` (1-D grids) or the Jacobian of ``(lon, sin lat)``
  over the index space (curvilinear grids).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PRESSURE_UNITS = {
    "Pa": 1.0, "pa": 1.0, "hPa": 100.0, "hpa": 100.0, "mbar": 100.0, "millibar": 100.0, "millibars": 100.0,
    "mb": 100.0, "bar": 1e5, "kPa": 1e3, "atm": 101325.0,
}
LATITUDE_UNITS = {"degrees_north", "degree_north", "degree_N", "degrees_N", "degreeN", "degreesN"}
LONGITUDE_UNITS = {"degrees_east", "degree_east", "degree_E", "degrees_E", "degreeE", "degreesE"}
DOWNWARD_STANDARD_NAMES = {
    "air_pressure", "depth", "atmosphere_sigma_coordinate", "ocean_sigma_coordinate",
    "atmosphere_hybrid_sigma_pressure_coordinate", "ocean_s_coordinate", "sea_water_pressure",
    "lagrangian_tendency_of_air_pressure",
}
TIME_REFERENCE_UNITS = "days since 0001-01-01 00:00:00"
IDENTITY_ATTRIBUTES = (
    "source_id", "experiment_id", "variant_label", "member_id", "realization", "run_id", "ensemble_member",
    "parent_experiment_id",
)
DATE_TOKEN = re.compile(r"\d{6,14}(-\d{6,14})?|\d{4}-\d{2}(-\d{2})?(T\d{2}(:?\d{2})*)?")


class GridError(ValueError):
    """The grid of an input cannot be used; the message says which variable or axis and why."""


@dataclass
class VerticalAxis:
    """The vertical coordinate chosen for the store's 3-D variables."""

    name: str  # coordinate variable
    dim: str
    values: np.ndarray  # top-down order
    units: str
    standard_name: str
    flipped: bool  # the file's order was reversed to make it top-down
    bounds: np.ndarray | None = None  # [levels, 2] in the same order


@dataclass
class HorizontalGrid:
    """The horizontal grid in canonical order: ``lat``/``lon`` 1-D (regular) or 2-D (curvilinear)."""

    y_dim: str
    x_dim: str
    lat: np.ndarray
    lon: np.ndarray
    area: np.ndarray  # [y, x] cell-area weights, mean 1
    area_source: str  # "cell_measures", "bounds", "cos(lat)", "jacobian"
    curvilinear: bool
    lat_flipped: bool = False
    lon_order: np.ndarray | None = None  # index order applied along x (None: unchanged)
    lon_convention: str = "0..360"
    global_grid: bool = False

    def shape(self) -> tuple[int, int]:
        return int(self.area.shape[0]), int(self.area.shape[1])

    def describe(self) -> str:
        kind = "curvilinear" if self.curvilinear else ("global" if self.global_grid else "regional")
        lat, lon = np.asarray(self.lat), np.asarray(self.lon)
        return (
            f"{kind} {self.shape()[0]}x{self.shape()[1]} lat [{lat.min():g} .. {lat.max():g}] "
            f"lon [{lon.min():g} .. {lon.max():g}]"
        )


@dataclass
class Axes:
    """Names of the axes of one dataset (found by CF metadata)."""

    time: str
    time_dim: str
    lat: str
    lon: str
    verticals: list[str] = field(default_factory=list)


# --- axis detection -----------------------------------------------------------------------------------------
def _units(var: Any) -> str:
    return str(var.attrs.get("units", "")).strip()


def _is_time(var: Any) -> bool:
    attrs = var.attrs
    return attrs.get("axis") == "T" or attrs.get("standard_name") == "time" or " since " in _units(var)


def _is_vertical(var: Any) -> bool:
    attrs = var.attrs
    return (
        attrs.get("axis") == "Z"
        or str(attrs.get("positive", "")).lower() in ("up", "down")
        or _units(var) in PRESSURE_UNITS
        or attrs.get("standard_name") in DOWNWARD_STANDARD_NAMES
        or attrs.get("standard_name") in ("height", "altitude", "model_level_number")
    )


def find_axes(ds: Any) -> Axes:
    """Time, latitude, longitude and vertical coordinates of ``ds`` by CF metadata (cf-xarray)."""
    import cf_xarray  # noqa: F401 - registers the .cf accessor

    coords = ds.cf.coordinates
    candidates = {
        key: [n for n in coords.get(key, []) if n in ds.variables]
        for key in ("time", "latitude", "longitude")
    }
    # cf-xarray accepts any variable with the units; a CF coordinate must also span a dimension of the data
    time = [n for n in candidates["time"] if ds[n].ndim == 1 and _is_time(ds[n])]
    if not time:
        time = [n for n in ds.variables if ds[n].ndim == 1 and _is_time(ds[n]) and n not in ds.data_vars]
    if not time:
        raise GridError(
            "no time coordinate (a variable with axis 'T', standard_name 'time' or units "
            "'<unit> since <date>')"
        )
    lat = _pick_horizontal(ds, candidates["latitude"], LATITUDE_UNITS, "latitude", "Y")
    lon = _pick_horizontal(ds, candidates["longitude"], LONGITUDE_UNITS, "longitude", "X")
    verticals = [
        n
        for n in ds.variables
        if ds[n].ndim == 1
        and n not in (time[0], lat, lon)
        and ds[n].dims[0] in ds.dims
        and not ds[n].dims[0].startswith("bnds")
        and n not in ds.data_vars
        and _is_vertical(ds[n])
    ]
    verticals += [
        n for n in ds.cf.axes.get("Z", []) if n not in verticals and n in ds.variables and ds[n].ndim == 1
    ]
    return Axes(time=time[0], time_dim=ds[time[0]].dims[0], lat=lat, lon=lon, verticals=verticals)


def _pick_horizontal(ds: Any, found: list[str], units: set[str], standard_name: str, axis: str) -> str:
    chosen = [n for n in found if ds[n].ndim in (1, 2)]
    if not chosen:
        chosen = [
            n
            for n in ds.variables
            if ds[n].ndim in (1, 2)
            and (
                _units(ds[n]) in units
                or ds[n].attrs.get("standard_name") == standard_name
                or ds[n].attrs.get("axis") == axis
            )
        ]
    chosen = [
        n for n in chosen if "bounds" not in ds[n].attrs.get("long_name", "") and n not in _bounds_names(ds)
    ]
    if not chosen:
        raise GridError(
            f"no {standard_name} coordinate (standard_name {standard_name!r}, units "
            f"{sorted(units)[0]!r} or axis {axis!r})"
        )
    chosen.sort(key=lambda n: (ds[n].ndim, n not in ds.coords))
    return chosen[0]


def _bounds_names(ds: Any) -> set[str]:
    return {str(ds[n].attrs["bounds"]) for n in ds.variables if "bounds" in ds[n].attrs}


def cell_measure_names(ds: Any) -> set[str]:
    out = set()
    for name in ds.variables:
        measures = str(ds[name].attrs.get("cell_measures", ""))
        out.update(re.findall(r"(?:area|volume):\s*(\S+)", measures))
    return out


# --- horizontal grid ----------------------------------------------------------------------------------------
def horizontal_grid(ds: Any, axes: Axes, lon_convention: str | None = None) -> HorizontalGrid:
    """The horizontal grid of ``ds`` in canonical order, with area weights (see the module docstring)."""
    lat_var, lon_var = ds[axes.lat], ds[axes.lon]
    lat = np.asarray(lat_var.values, dtype=np.float64)
    lon = np.asarray(lon_var.values, dtype=np.float64)
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise GridError(f"{axes.lat}/{axes.lon} contain NaN or inf")
    if np.abs(lat).max() > 90 + 1e-6:
        raise GridError(f"{axes.lat} has values outside -90..90 ({lat.min():g} .. {lat.max():g})")
    convention = lon_convention or _lon_convention(lon)
    lon = _wrap(lon, convention)
    if lat.ndim == 2 or lon.ndim == 2:
        return _curvilinear_grid(ds, axes, lat, lon, convention)
    if lat_var.dims[0] == lon_var.dims[0]:
        raise GridError(
            f"{axes.lat} and {axes.lon} share the dimension {lat_var.dims[0]!r} (an unstructured "
            "grid); only regular and curvilinear grids are supported"
        )
    lat_flipped = lat.size > 1 and lat[0] > lat[-1]
    if lat_flipped:
        lat = lat[::-1]
    if lat.size > 1 and not np.all(np.diff(lat) > 0):
        raise GridError(f"{axes.lat} is not monotonic")
    order = np.argsort(lon, kind="stable")
    lon_sorted = lon[order]
    if lon.size > 1 and not np.all(np.diff(lon_sorted) > 0):
        raise GridError(f"{axes.lon} has repeated values")
    lon_order = None if np.array_equal(order, np.arange(lon.size)) else order
    area, source = _regular_area(ds, axes, lat, lon_sorted, lat_flipped, order)
    span = (lon_sorted[-1] - lon_sorted[0]) + (np.median(np.diff(lon_sorted)) if lon.size > 1 else 0)
    is_global = bool(
        lon.size > 1
        and abs(span - 360) < 1e-3
        and lat.size > 1
        and lat[0] - (lat[1] - lat[0]) / 2 <= -89
        and lat[-1] + (lat[-1] - lat[-2]) / 2 >= 89
    )
    return HorizontalGrid(
        y_dim=lat_var.dims[0], x_dim=lon_var.dims[0], lat=lat, lon=lon_sorted, area=area, area_source=source,
        curvilinear=False, lat_flipped=bool(lat_flipped), lon_order=lon_order, lon_convention=convention,
        global_grid=is_global,
    )


def _wrap(lon: np.ndarray, convention: str) -> np.ndarray:
    return ((lon + 180) % 360) - 180 if convention == "-180..180" else lon % 360


def _lon_convention(lon: np.ndarray) -> str:
    """The longitude convention of the first input: the one its values use, unless the other one keeps a grid
    that crosses the seam in one increasing piece (e.g. 340, 350, 0, 10 -> -20 .. 10)."""
    given = "-180..180" if lon.min() < 0 else "0..360"
    other = "0..360" if given == "-180..180" else "-180..180"
    if lon.ndim == 1 and lon.size > 1:
        increasing = lambda values: bool(np.all(np.diff(values) > 0))  # noqa: E731
        if not increasing(_wrap(lon, given)) and increasing(_wrap(lon, other)):
            return other
    return given


def _bounds_of(ds: Any, name: str) -> np.ndarray | None:
    bounds = ds[name].attrs.get("bounds")
    if bounds and bounds in ds.variables:
        values = np.asarray(ds[bounds].values, dtype=np.float64)
        return values if np.all(np.isfinite(values)) else None
    return None


def _measure_area(ds: Any, y_dim: str, x_dim: str) -> np.ndarray | None:
    for name in cell_measure_names(ds):
        if name in ds.variables and set(ds[name].dims) == {y_dim, x_dim}:
            area = np.asarray(ds[name].transpose(y_dim, x_dim).values, dtype=np.float64)
            if np.all(np.isfinite(area)) and np.all(area > 0):
                return area
    return None


def _regular_area(
    ds: Any, axes: Axes, lat: np.ndarray, lon: np.ndarray, lat_flipped: bool, lon_order: np.ndarray
) -> tuple[np.ndarray, str]:
    y_dim, x_dim = ds[axes.lat].dims[0], ds[axes.lon].dims[0]
    measured = _measure_area(ds, y_dim, x_dim)
    if measured is not None:
        area = measured[::-1] if lat_flipped else measured
        return _unit_mean(area[:, lon_order]), "cell_measures"
    lat_bounds, lon_bounds = _bounds_of(ds, axes.lat), _bounds_of(ds, axes.lon)
    if lat_bounds is not None and lat_bounds.shape == (lat.size, 2):
        lat_bounds = lat_bounds[::-1] if lat_flipped else lat_bounds
        band = np.abs(np.diff(np.sin(np.deg2rad(np.clip(lat_bounds, -90, 90))), axis=1))[:, 0]
        if lon_bounds is not None and lon_bounds.shape == (lon.size, 2):
            width = np.abs(np.diff(lon_bounds, axis=1))[:, 0][lon_order]
            width = np.where(width > 180, 360 - width, width)
        else:
            width = _spacing(lon)
        return _unit_mean(band[:, None] * width[None, :]), "bounds"
    band = np.cos(np.deg2rad(lat)).clip(min=0)
    if band.sum() == 0:
        raise GridError(f"{axes.lat} lies only at the poles; cell areas would be zero")
    return _unit_mean(band[:, None] * _spacing(lon)[None, :]), "cos(lat)"


def _spacing(lon: np.ndarray) -> np.ndarray:
    if lon.size < 2:
        return np.ones(lon.size)
    edges = np.concatenate(
        [[lon[0] - (lon[1] - lon[0]) / 2], (lon[1:] + lon[:-1]) / 2, [lon[-1] + (lon[-1] - lon[-2]) / 2]]
    )
    return np.diff(edges)


def _unit_mean(area: np.ndarray) -> np.ndarray:
    area = np.asarray(area, dtype=np.float64)
    if not (np.all(np.isfinite(area)) and area.sum() > 0):
        raise GridError("cell areas are not finite and positive")
    return area / area.mean()


def _curvilinear_grid(
    ds: Any, axes: Axes, lat: np.ndarray, lon: np.ndarray, convention: str
) -> HorizontalGrid:
    lat_var = ds[axes.lat]
    if lat.ndim != 2 or lon.shape != lat.shape or ds[axes.lon].dims != lat_var.dims:
        raise GridError(
            f"curvilinear grid: {axes.lat} {lat.shape} and {axes.lon} {lon.shape} must be 2-D on "
            "the same dimensions"
        )
    y_dim, x_dim = lat_var.dims
    measured = _measure_area(ds, y_dim, x_dim)
    if measured is not None:
        return HorizontalGrid(
            y_dim, x_dim, lat, lon, _unit_mean(measured), "cell_measures", True, lon_convention=convention
        )
    lat_bounds, lon_bounds = _bounds_of(ds, axes.lat), _bounds_of(ds, axes.lon)
    if lat_bounds is not None and lon_bounds is not None and lat_bounds.shape == lat.shape + (4,):
        area = _vertex_area(lat_bounds, lon_bounds)
        return HorizontalGrid(
            y_dim, x_dim, lat, lon, _unit_mean(area), "bounds", True, lon_convention=convention
        )
    if min(lat.shape) < 2:
        raise GridError(
            f"curvilinear grid {lat.shape} without cell areas or bounds is too small to estimate areas"
        )
    lon_rad = np.unwrap(np.unwrap(np.deg2rad(lon), axis=1), axis=0)
    sin_lat = np.sin(np.deg2rad(lat))
    dlon_dy, dlon_dx = np.gradient(lon_rad)
    dsin_dy, dsin_dx = np.gradient(sin_lat)
    area = np.abs(dlon_dx * dsin_dy - dlon_dy * dsin_dx)
    if not np.all(area > 0):
        raise GridError(
            f"curvilinear grid: {axes.lat}/{axes.lon} fold or repeat (zero cell area at "
            f"{int((area <= 0).sum())} points) and there are no cell_measures or bounds"
        )
    return HorizontalGrid(
        y_dim, x_dim, lat, lon, _unit_mean(area), "jacobian", True, lon_convention=convention
    )


def _vertex_area(lat_bounds: np.ndarray, lon_bounds: np.ndarray) -> np.ndarray:
    """Cell areas from 4 vertices per cell: the shoelace formula in the equal-area (lon, sin lat) plane."""
    x = np.unwrap(np.deg2rad(lon_bounds), axis=-1)
    y = np.sin(np.deg2rad(lat_bounds))
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y, axis=-1))


# --- vertical axis ------------------------------------------------------------------------------------------
def vertical_axis(ds: Any, name: str) -> VerticalAxis:
    """``name`` as a vertical axis in top-down order (increasing along the downward direction)."""
    var = ds[name]
    values = np.asarray(var.values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise GridError(f"vertical coordinate {name} has NaN or inf")
    positive = str(var.attrs.get("positive", "")).lower()
    units = _units(var)
    downward_name = var.attrs.get("standard_name") in DOWNWARD_STANDARD_NAMES
    down = positive == "down" or (positive != "up" and (units in PRESSURE_UNITS or downward_name))
    ordered = values if down else -values
    flipped = values.size > 1 and ordered[0] > ordered[-1]
    if flipped:
        values = values[::-1]
        ordered = ordered[::-1]
    if values.size > 1 and not np.all(np.diff(ordered) > 0):
        raise GridError(f"vertical coordinate {name} is not monotonic")
    bounds = _bounds_of(ds, name)
    if bounds is not None and bounds.shape == (values.size, 2):
        bounds = bounds[::-1] if flipped else bounds
    else:
        bounds = None
    return VerticalAxis(
        name=name, dim=var.dims[0], values=values, units=units,
        standard_name=str(var.attrs.get("standard_name", "")), flipped=bool(flipped), bounds=bounds,
    )


# --- variables ----------------------------------------------------------------------------------------------
@dataclass
class VariableChoice:
    """The variables of one dataset the store takes, and the ones it leaves out with the reason."""

    taken: list[str]
    vertical: str | None
    left_out: dict[str, str]


def choose_variables(
    ds: Any, axes: Axes, grid: HorizontalGrid, wanted: tuple[str, ...] | None
) -> VariableChoice:
    """The data variables on the grid ``(time, [vertical,] y, x)``: ``wanted`` (names or standard names) or,
    when None, every such variable; the others are listed with why they were left out."""
    horizontal = {grid.y_dim, grid.x_dim}
    skip = _bounds_names(ds) | cell_measure_names(ds)
    left_out: dict[str, str] = {}
    on_grid: dict[str, str | None] = {}
    for name in ds.data_vars:
        dims = set(ds[name].dims)
        if name in skip:
            left_out[name] = "cell bounds or cell measure"
        elif axes.time_dim not in dims:
            left_out[name] = "no time axis (static field or scalar)"
        elif not horizontal <= dims:
            left_out[name] = f"not on the horizontal grid (dims {tuple(ds[name].dims)})"
        else:
            extra = dims - horizontal - {axes.time_dim}
            verticals = [v for v in axes.verticals if ds[v].dims[0] in extra]
            if not extra:
                on_grid[name] = None
            elif len(extra) == 1 and len(verticals) == 1:
                on_grid[name] = verticals[0]
            else:
                left_out[name] = f"other grid: extra dims {sorted(extra)} are not one vertical axis"
    if wanted is not None:
        taken = []
        for token in wanted:
            match = [n for n in ds.data_vars if n == token] or [
                n for n in ds.data_vars if ds[n].attrs.get("standard_name") == token
            ]
            if not match:
                raise KeyError(
                    f"variable {token!r} not found by name or standard_name (has "
                    f"{sorted(map(str, ds.data_vars))[:12]})"
                )
            if match[0] not in on_grid:
                raise GridError(f"variable {match[0]!r}: {left_out.get(match[0], 'not on the grid')}")
            taken.append(match[0])
    else:
        taken = list(on_grid)
    used_verticals = [on_grid[n] for n in taken if on_grid[n] is not None]
    vertical = max(set(used_verticals), key=used_verticals.count) if used_verticals else None
    if wanted is not None and any(on_grid[n] not in (None, vertical) for n in taken):
        other = next(n for n in taken if on_grid[n] not in (None, vertical))
        raise GridError(
            f"variable {other!r} is on vertical axis {on_grid[other]!r}; the others on {vertical!r}"
        )
    for name in list(taken):
        if on_grid[name] not in (None, vertical):
            taken.remove(name)
            left_out[name] = f"other grid: vertical axis {on_grid[name]!r} (the store uses {vertical!r})"
    if not taken:
        raise GridError(
            "no data variable on the (time, [level,] lat, lon) grid"
            + (f"; left out: {_reasons(left_out)}" if left_out else "")
        )
    return VariableChoice(taken=[str(n) for n in taken], vertical=vertical, left_out=left_out)


def _reasons(left_out: dict[str, str]) -> str:
    return "; ".join(f"{k} ({v})" for k, v in list(left_out.items())[:6])


def read_block(
    ds: Any, name: str, axes: Axes, grid: HorizontalGrid, vertical: VerticalAxis | None, start: int, stop: int
) -> np.ndarray:
    """Times ``start..stop`` of ``name`` as float32 ``[t, levels, y, x]`` (2-D variables: ``[t, 1, y, x]``) in
    canonical order; missing values are NaN."""
    var = ds[name]
    has_level = vertical is not None and vertical.dim in var.dims
    order = [axes.time_dim] + ([vertical.dim] if has_level else []) + [grid.y_dim, grid.x_dim]
    block = np.asarray(var.isel({axes.time_dim: slice(start, stop)}).transpose(*order).values)
    block = block.astype(np.float32, copy=False) if block.dtype.kind == "f" else block.astype(np.float32)
    if not has_level:
        block = block[:, None]
    elif vertical.flipped:
        block = block[:, ::-1]
    if grid.lat_flipped:
        block = block[:, :, ::-1]
    if grid.lon_order is not None:
        block = block[..., grid.lon_order]
    return np.ascontiguousarray(block)


# --- time ---------------------------------------------------------------------------------------------------
@dataclass
class TimeAxis:
    """Times of one input: ``days`` since 0001-01-01 in ``calendar``; ``monthly`` for 28-31-day steps."""

    days: np.ndarray
    calendar: str
    monthly: bool


def time_axis(ds: Any, axes: Axes) -> TimeAxis:
    import cftime

    var = ds[axes.time]
    units = _units(var)
    calendar = str(var.attrs.get("calendar", "standard")).lower()
    if calendar == "gregorian":
        calendar = "standard"
    raw = np.asarray(var.values, dtype=np.float64)
    if " since " not in units:
        raise GridError(f"time coordinate {axes.time} has units {units!r}; expected '<unit> since <date>'")
    if not np.all(np.isfinite(raw)):
        raise GridError(f"time coordinate {axes.time} has NaN or inf")
    dates = cftime.num2date(raw, units, calendar=calendar)
    days = np.asarray(cftime.date2num(dates, TIME_REFERENCE_UNITS, calendar=calendar), dtype=np.float64)
    if days.size > 1 and not np.all(np.diff(days) > 0):
        raise GridError(f"time coordinate {axes.time} is not strictly increasing")
    steps = np.diff(days)
    monthly = bool(steps.size and np.all((steps >= 27.5) & (steps <= 31.5)))
    return TimeAxis(days=days, calendar=calendar, monthly=monthly)


def time_keys(days: np.ndarray, calendar: str, monthly: bool) -> np.ndarray:
    """Climatology keys: calendar month (1..12) for monthly series, day of year (1..366) otherwise."""
    import cftime

    dates = cftime.num2date(np.asarray(days, dtype=np.float64), TIME_REFERENCE_UNITS, calendar=calendar)
    return np.asarray([d.month if monthly else d.dayofyr for d in np.atleast_1d(dates)], dtype=np.int64)


def month_index(days: np.ndarray, calendar: str) -> np.ndarray:
    import cftime

    dates = cftime.num2date(np.asarray(days, dtype=np.float64), TIME_REFERENCE_UNITS, calendar=calendar)
    return np.asarray([d.year * 12 + d.month - 1 for d in np.atleast_1d(dates)], dtype=np.int64)


def date_text(days: float, calendar: str) -> str:
    import cftime

    return cftime.num2date(float(days), TIME_REFERENCE_UNITS, calendar=calendar).strftime("%Y-%m-%d %H:%M")


# --- runs over many files -----------------------------------------------------------------------------------
def run_key(path: Path, attrs: dict[str, Any]) -> str:
    """Files with the same key belong to one run: the file name without date tokens, plus identity attributes
    (``source_id``, ``experiment_id``, ``variant_label``, ``run_id``, ...)."""
    stem = DATE_TOKEN.sub("#", path.name.split(".")[0])
    identity = [f"{k}={attrs[k]}" for k in IDENTITY_ATTRIBUTES if k in attrs]
    return f"{path.parent}/{stem}|" + "|".join(identity)
