"""One input of ``sapwood prepare``: opening it, reading its structure through :mod:`sapwood.data.cf`, and
checking it against the first usable input. Every failure is an :class:`InputProblem` naming the file."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sapwood.data import cf, remote
from sapwood.data.simulate import PLANET_VARIABLES
from sapwood.errors import SapwoodError


class InputProblem(SapwoodError):
    """One unusable input: ``kind`` is one of corrupt, truncated, missing, dims, units, coordinates, grid,
    shape, attributes, non-finite, too-short, overlap."""

    def __init__(self, path: Path | remote.RemoteZarr, kind: str, detail: str) -> None:
        self.path = path if isinstance(path, remote.RemoteZarr) else Path(path)
        self.kind, self.detail = kind, detail
        super().__init__(f"{path}: {kind}: {detail}")


# --- opening one input --------------------------------------------------------------------------------------
def hdf5_truncation(path: Path) -> str | None:
    """If ``path`` is an HDF5 (NetCDF4) file shorter than the end-of-file address in its superblock, say
    so."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if not head.startswith(b"\x89HDF\r\n\x1a\n") or len(head) < 40:
        return None
    version = head[8]
    if version in (0, 1):
        offset_size = head[13]
        eof_at = 24 + (4 if version == 1 else 0) + 2 * offset_size
    else:
        offset_size = head[9]
        eof_at = 12 + 2 * offset_size
    if offset_size not in (4, 8) or eof_at + offset_size > len(head):
        return None
    eof = struct.unpack("<Q" if offset_size == 8 else "<I", head[eof_at : eof_at + offset_size])[0]
    size = path.stat().st_size
    return f"file is {size} bytes, its header says {eof}" if size < eof else None


def _has_netcdf_signature(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith((b"\x89HDF\r\n\x1a\n", b"CDF\x01", b"CDF\x02", b"CDF\x05"))


def _has_consolidated_v3(path: Path) -> bool:
    try:
        return json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is not None
    except (OSError, ValueError):
        return False


def open_input(path: Path | remote.RemoteZarr) -> Any:
    """Open a NetCDF file or a Zarr store (local, or on S3: :mod:`sapwood.data.remote`) with xarray (times
    left undecoded, masks and packing decoded)."""
    import xarray as xr

    try:
        if isinstance(path, remote.RemoteZarr):
            return _by_name(remote.open_zarr(path))
        if path.is_dir() or path.suffix == ".zarr":
            consolidated = (path / ".zmetadata").exists() or _has_consolidated_v3(path)
            return _by_name(xr.open_zarr(path, decode_times=False, consolidated=consolidated))
        return xr.open_dataset(path, decode_times=False, cache=False)
    except remote.RemoteInputError:
        raise
    except (ValueError, TypeError) as exc:
        if path.is_file() and _has_netcdf_signature(path) and not hdf5_truncation(path):
            detail = f"cannot be decoded ({type(exc).__name__}: {str(exc)[:160]})"
            raise InputProblem(path, "attributes", detail) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - every other reader failure is a corrupt input
        raise _unreadable(path, exc) from None


def _by_name(ds: Any) -> Any:
    """``ds`` with its data variables in name order: a Zarr group's members have no order of their own (a
    listing of a folder or a bucket gives them in any order), and the store's channel order must not depend on
    it."""
    ordered = ds[sorted(ds.data_vars)]
    ordered.set_close(ds.close)
    return ordered


def _unreadable(path: Path | remote.RemoteZarr, exc: BaseException) -> InputProblem:
    if isinstance(path, remote.RemoteZarr):
        return InputProblem(
            path, "corrupt", f"cannot be opened ({remote.redact(f'{type(exc).__name__}: {exc}')[:160]})"
        )
    truncation = hdf5_truncation(path) if path.is_file() else None
    if truncation:
        return InputProblem(path, "truncated", truncation)
    if path.is_file() and not _has_netcdf_signature(path):
        return InputProblem(path, "corrupt", "not a NetCDF file (no NetCDF/HDF5 signature)")
    return InputProblem(path, "corrupt", f"cannot be opened ({type(exc).__name__}: {str(exc)[:120]})")


# --- the structure of one input -----------------------------------------------------------------------------
@dataclass
class InputLayout:
    """The structure of one validated input (no data values)."""

    path: Path
    variables: list[str]
    levels: int  # 0 when no variable has levels
    grid: cf.HorizontalGrid
    vertical: cf.VerticalAxis | None
    time: cf.TimeAxis
    params: np.ndarray
    units: dict[str, str]
    key: str
    axes: cf.Axes
    surface: set[str]  # the 2-D variables
    left_out: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)  # standard_name, long_name

    @property
    def times(self) -> int:
        return int(self.time.days.size)

    def channels(self) -> list[tuple[str, int]]:
        return [(name, 0 if name in self.surface else self.levels) for name in self.variables]


def _planet_params(ds: Any, names: list[str]) -> np.ndarray:
    values = []
    for nc_name in names:
        attr_name = PLANET_VARIABLES[nc_name][0]
        if nc_name in ds.variables:
            values.append(float(np.asarray(ds[nc_name].values).reshape(-1)[0]))
        elif attr_name in ds.attrs:
            values.append(float(ds.attrs[attr_name]))
        else:
            raise KeyError(nc_name)
    return np.asarray(values, dtype=np.float64)


def planet_names(ds: Any) -> list[str]:
    """The planet parameters ``ds`` carries (all of :data:`PLANET_VARIABLES` or none)."""
    try:
        _planet_params(ds, list(PLANET_VARIABLES))
    except (KeyError, ValueError, TypeError, IndexError):
        return []
    return list(PLANET_VARIABLES)


def read_layout(
    path: Path, ds: Any, wanted: tuple[str, ...] | None, reference: InputLayout | None
) -> InputLayout:
    """Axes, grid, variables, units, times and planet parameters of ``ds``, checked against ``reference``."""
    try:
        axes = cf.find_axes(ds)
        grid = cf.horizontal_grid(ds, axes, reference.grid.lon_convention if reference else None)
    except cf.GridError as exc:
        raise InputProblem(path, "coordinates", str(exc)) from None
    try:
        chosen = wanted if reference is None else tuple(reference.variables)
        choice = cf.choose_variables(ds, axes, grid, chosen)
    except KeyError as exc:
        raise InputProblem(path, "missing", str(exc.args[0])) from None
    except cf.GridError as exc:
        raise InputProblem(path, "dims", str(exc)) from None
    try:
        vertical = cf.vertical_axis(ds, choice.vertical) if choice.vertical else None
        time = cf.time_axis(ds, axes)
    except cf.GridError as exc:
        raise InputProblem(path, "coordinates", str(exc)) from None
    surface = {n for n in choice.taken if vertical is None or vertical.dim not in ds[n].dims}
    units = {n: str(ds[n].attrs.get("units", "")).strip() for n in choice.taken}
    param_names = (
        planet_names(ds) if reference is None else list(PLANET_VARIABLES) if reference.params.size else []
    )
    try:
        params = _planet_params(ds, param_names)
    except KeyError as exc:
        raise InputProblem(
            path,
            "missing",
            f"planet parameter {exc.args[0]!r} (variable or attribute "
            f"{PLANET_VARIABLES[exc.args[0]][0]!r}); the first input has all of them",
        ) from None
    if not np.all(np.isfinite(params)):
        raise InputProblem(path, "non-finite", "planet parameters contain NaN or inf")
    layout = InputLayout(
        path=path,
        variables=choice.taken,
        levels=vertical.values.size if vertical else 0,
        grid=grid,
        vertical=vertical,
        time=time,
        params=params,
        units=units,
        key=cf.run_key(path, dict(ds.attrs)),
        axes=axes,
        surface=surface,
        left_out=choice.left_out,
        attributes={
            n: {k: str(ds[n].attrs[k]) for k in ("standard_name", "long_name") if k in ds[n].attrs}
            for n in choice.taken
        },
    )
    if reference is not None:
        _check_against(layout, reference)
    return layout


def _check_against(layout: InputLayout, reference: InputLayout) -> None:
    path = layout.path
    for name in reference.variables:
        if (name in reference.surface) != (name in layout.surface):
            raise InputProblem(
                path,
                "dims",
                f"{name} is {'2-D' if name in layout.surface else '3-D'} here, "
                f"{'2-D' if name in reference.surface else '3-D'} in the first input",
            )
        if layout.units[name] != reference.units[name]:
            raise InputProblem(
                path,
                "units",
                f"{name} has units {layout.units[name]!r}, the first input {reference.units[name]!r}",
            )
    if layout.time.calendar != reference.time.calendar:
        raise InputProblem(
            path,
            "coordinates",
            f"calendar {layout.time.calendar!r}, the first input {reference.time.calendar!r}",
        )
    mine, theirs = layout.grid, reference.grid
    if (
        mine.curvilinear != theirs.curvilinear
        or mine.lat.shape != theirs.lat.shape
        or mine.lon.shape != theirs.lon.shape
        or not np.allclose(mine.lat, theirs.lat, atol=1e-6)
        or not np.allclose(mine.lon, theirs.lon, atol=1e-6)
    ):
        raise InputProblem(path, "shape", f"grid {mine.describe()}; the first input has {theirs.describe()}")
    a, b = layout.vertical, reference.vertical
    if (a is None) != (b is None) or (
        a is not None
        and (
            a.values.shape != b.values.shape
            or not np.allclose(a.values, b.values, rtol=1e-9, atol=1e-9)
            or a.units != b.units
        )
    ):
        raise InputProblem(path, "shape", f"levels {_levels_text(a)}; the first input has {_levels_text(b)}")


def _levels_text(axis: cf.VerticalAxis | None) -> str:
    if axis is None:
        return "none"
    return f"{axis.values.size} values [{axis.values[0]:g} .. {axis.values[-1]:g}] {axis.units}"


def inspect_input(path: Path, wanted: tuple[str, ...] | None, reference: InputLayout | None) -> InputLayout:
    """Open ``path`` and read its layout; every failure (odd attributes included) is an
    :class:`InputProblem`."""
    ds = open_input(path)
    try:
        return read_layout(path, ds, wanted, reference)
    except InputProblem:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        raise InputProblem(path, "attributes", f"{type(exc).__name__}: {str(exc)[:160]}") from None
    finally:
        ds.close()
