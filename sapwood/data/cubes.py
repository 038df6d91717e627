"""``sapwood prepare``: ingest NetCDF and Zarr datacubes into a chunked store (:mod:`sapwood.data.store`).

Every input is opened with xarray and validated on its own: readable, required variables present with the
expected dims ``(time, lev, lat, lon)`` (``ps``: ``(time, lat, lon)``), CF units, strictly increasing
``time``/``lat``/``lon``/``lev``, the same ``lev``/``lat``/``lon`` as the first usable input, at least two
times, all values finite, and the planet parameters present. A bad input is reported with a
:class:`InputProblem` naming the file and the kind of problem and skipped; the others continue. Only when no
input is usable does :func:`prepare` raise.

Writes go to ``STORE.partial-PID`` and are renamed into place after ``index.json`` (the completion marker) is
written, so an interrupted prepare never leaves a store that looks complete. The index records a fingerprint of
the inputs (path, size, mtime) and options; re-running on the same inputs does nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sapwood import fsutil
from sapwood.data.simulate import PLANET_VARIABLES
from sapwood.data.store import FRAMES_FILE, INDEX_FILE, STORE_FORMAT, CubeStore
from sapwood.errors import SapwoodError

DEFAULT_VARIABLES = ("T", "u", "v", "q", "ps", "rho", "zg")
SURFACE_VARIABLES = {"ps"}
UNIT_ALIASES = {  # canonical unit -> spellings accepted
    "K": {"K", "kelvin", "degK"},
    "m s-1": {"m s-1", "m/s", "m s**-1", "m.s-1", "m s^-1"},
    "kg kg-1": {"kg kg-1", "kg/kg", "1", "kg kg**-1", "kg.kg-1"},
    "Pa": {"Pa", "pascal"},
    "kg m-3": {"kg m-3", "kg/m3", "kg/m^3", "kg m**-3"},
    "m": {"m", "meter", "metre", "gpm"},
}
EXPECTED_UNITS = {"T": "K", "u": "m s-1", "v": "m s-1", "q": "kg kg-1", "ps": "Pa", "rho": "kg m-3", "zg": "m"}
BLOCK_BYTES = 64 << 20  # rows converted per block


class InputProblem(SapwoodError):
    """One unusable input: ``kind`` is one of corrupt, truncated, missing, dims, units, coordinates,
    shape, non-finite, too-short."""

    def __init__(self, path: Path, kind: str, detail: str) -> None:
        self.path, self.kind, self.detail = Path(path), kind, detail
        super().__init__(f"{path}: {kind}: {detail}")


@dataclass
class PrepareReport:
    """What a prepare run did: the store, the inputs used and skipped, and whether it was already up to date."""

    store: Path
    used: list[Path] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)
    up_to_date: bool = False
    rows: int = 0
    bytes: int = 0

    def summary(self) -> str:
        head = (f"{self.store}: up to date ({len(self.used)} inputs)" if self.up_to_date else
                f"{self.store}: {len(self.used)} inputs used, {len(self.problems)} skipped, "
                f"{self.rows} frames, {self.bytes / 1e6:.1f} MB")
        return "\n".join([head] + [f"  skipped {p}" for p in self.problems])


# --- opening and validating one input -------------------------------------------------------------------------
def _hdf5_truncation(path: Path) -> str | None:
    """If ``path`` is an HDF5 (NetCDF4) file shorter than the end-of-file address in its superblock, say so."""
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
    eof = struct.unpack("<Q" if offset_size == 8 else "<I", head[eof_at:eof_at + offset_size])[0]
    size = path.stat().st_size
    return f"file is {size} bytes, its header says {eof}" if size < eof else None


def _has_netcdf_signature(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith((b"\x89HDF\r\n\x1a\n", b"CDF\x01", b"CDF\x02", b"CDF\x05"))


def open_input(path: Path) -> Any:
    """Open a NetCDF file or a Zarr store with xarray (times left undecoded)."""
    import xarray as xr

    try:
        if path.is_dir() or path.suffix == ".zarr":
            return xr.open_zarr(path, decode_times=False, consolidated=None)
        return xr.open_dataset(path, decode_times=False, cache=False)
    except Exception as exc:  # noqa: BLE001 - every reader failure is a corrupt input
        truncation = _hdf5_truncation(path) if path.is_file() else None
        if truncation:
            raise InputProblem(path, "truncated", truncation) from None
        if path.is_file() and not _has_netcdf_signature(path):
            raise InputProblem(path, "corrupt", "not a NetCDF file (no NetCDF/HDF5 signature)") from None
        raise InputProblem(path, "corrupt", f"cannot be opened ({type(exc).__name__}: {str(exc)[:120]})") from None


def _canonical_units(units: str) -> str | None:
    for canonical, spellings in UNIT_ALIASES.items():
        if units.strip() in spellings:
            return canonical
    return None


@dataclass
class InputLayout:
    """The shape facts of one validated input."""

    times: int
    levels: int
    lat: np.ndarray
    lon: np.ndarray
    lev: np.ndarray
    params: np.ndarray


def validate_structure(path: Path, ds: Any, variables: tuple[str, ...], reference: InputLayout | None) -> InputLayout:
    """Check variables, dims, units, coordinates, shapes and planet parameters (not values)."""
    for name in variables:
        if name not in ds.variables:
            raise InputProblem(path, "missing", f"variable {name!r} not found (has {sorted(ds.data_vars)[:12]})")
        dims = ("time", "lat", "lon") if name in SURFACE_VARIABLES else ("time", "lev", "lat", "lon")
        if tuple(ds[name].dims) != dims:
            raise InputProblem(path, "dims", f"{name} has dims {tuple(ds[name].dims)}, expected {dims}")
        units = str(ds[name].attrs.get("units", ""))
        expected = EXPECTED_UNITS.get(name)
        if expected and _canonical_units(units) != expected:
            raise InputProblem(path, "units", f"{name} has units {units!r}, expected {expected!r}")
    coords = {}
    for axis in ("time", "lev", "lat", "lon"):
        if axis not in ds.variables:
            raise InputProblem(path, "coordinates", f"coordinate {axis!r} missing")
        values = np.asarray(ds[axis].values, dtype=np.float64)
        if values.size > 1 and not np.all(np.diff(values) > 0):
            raise InputProblem(path, "coordinates", f"{axis} is not strictly increasing")
        if not np.all(np.isfinite(values)):
            raise InputProblem(path, "coordinates", f"{axis} has NaN or inf")
        coords[axis] = values
    if coords["time"].size < 2:
        raise InputProblem(path, "too-short", f"{coords['time'].size} time(s); need at least 2 for state pairs")
    params = []
    for nc_name, (attr_name, _, _) in PLANET_VARIABLES.items():
        if nc_name in ds.variables:
            params.append(float(ds[nc_name].values))
        elif attr_name in ds.attrs:
            params.append(float(ds.attrs[attr_name]))
        else:
            raise InputProblem(path, "missing", f"planet parameter {nc_name!r} (variable or attribute {attr_name!r})")
    layout = InputLayout(coords["time"].size, coords["lev"].size, coords["lat"], coords["lon"], coords["lev"],
                         np.asarray(params))
    if not np.all(np.isfinite(layout.params)):
        raise InputProblem(path, "non-finite", "planet parameters contain NaN or inf")
    if reference is not None:
        for axis in ("lev", "lat", "lon"):
            mine, theirs = getattr(layout, axis), getattr(reference, axis)
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=0, atol=1e-9):
                raise InputProblem(path, "shape", f"{axis} has {mine.size} values {_span(mine)}; the first input "
                                   f"has {theirs.size} {_span(theirs)}")
    return layout


def _span(values: np.ndarray) -> str:
    return f"[{values[0]:g} .. {values[-1]:g}]" if values.size else "[]"


def _variable_channels(variables: tuple[str, ...], levels: int) -> list[tuple[str, int]]:
    return [(name, 0 if name in SURFACE_VARIABLES else levels) for name in variables]


def read_frames(ds: Any, variables: tuple[str, ...], levels: int, start: int, stop: int) -> np.ndarray:
    """Times ``start..stop`` of ``ds`` as float32 ``[times, channels, lat, lon]``."""
    parts = []
    for name in variables:
        block = np.asarray(ds[name].isel(time=slice(start, stop)).values, dtype=np.float32)
        parts.append(block[:, None] if name in SURFACE_VARIABLES else block)
    return np.concatenate(parts, axis=1)


# --- the store --------------------------------------------------------------------------------------------------
def _fingerprint(inputs: list[Path], variables: tuple[str, ...]) -> str:
    h = hashlib.sha256(STORE_FORMAT.encode())
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    h.update(",".join(variables).encode())
    return h.hexdigest()


def _existing_fingerprint(store: Path) -> str | None:
    try:
        index = json.loads((store / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    return index.get("fingerprint") if index.get("complete") else None


class _Stats:
    """Per-channel mean and variance merged across inputs (Chan et al.), in float64."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def block(self, frames: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        values = frames.astype(np.float64).transpose(1, 0, 2, 3).reshape(frames.shape[1], -1)
        mean = values.mean(axis=1)
        return values.shape[1], mean, ((values - mean[:, None]) ** 2).sum(axis=1)

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std > 0, std, 1.0)


def _ingest_one(path: Path, variables: tuple[str, ...], reference: InputLayout | None, frames_file: Any,
                stats: _Stats) -> InputLayout:
    """Validate one input and append its frames; on any problem the frames file is cut back and stats untouched."""
    start_offset = frames_file.tell()
    blocks: list[tuple[int, np.ndarray, np.ndarray]] = []
    try:
        ds = open_input(path)
        try:
            layout = validate_structure(path, ds, variables, reference)
            row_bytes = 4 * (layout.levels * (len(variables) - len(SURFACE_VARIABLES & set(variables)))
                             + len(SURFACE_VARIABLES & set(variables))) * layout.lat.size * layout.lon.size
            per_block = max(1, BLOCK_BYTES // row_bytes)
            for begin in range(0, layout.times, per_block):
                try:
                    frames = read_frames(ds, variables, layout.levels, begin, min(layout.times, begin + per_block))
                except Exception as exc:  # noqa: BLE001 - a read failure means a damaged file
                    truncation = _hdf5_truncation(path) if path.is_file() else None
                    kind, detail = ("truncated", truncation) if truncation else (
                        "corrupt", f"data unreadable ({type(exc).__name__}: {str(exc)[:120]})")
                    raise InputProblem(path, kind, detail) from None
                finite = np.isfinite(frames)
                if not finite.all():
                    bad = np.argwhere(~finite)[0]
                    channel = _variable_channels(variables, layout.levels)
                    raise InputProblem(path, "non-finite", f"{int((~finite).sum())} NaN/inf values, first in "
                                       f"{_channel_name(channel, int(bad[1]))} at time index {begin + int(bad[0])}")
                blocks.append(stats.block(frames))
                frames_file.write(frames.tobytes())
        finally:
            ds.close()
    except BaseException:
        frames_file.seek(start_offset)
        frames_file.truncate(start_offset)
        raise
    for block in blocks:
        stats.merge(*block)
    return layout


def _channel_name(channels: list[tuple[str, int]], index: int) -> str:
    for name, levels in channels:
        count = levels or 1
        if index < count:
            return f"{name}" + (f" level {index}" if levels else "")
        index -= count
    return f"channel {index}"


def prepare(inputs: list[Path], out: Path, variables: tuple[str, ...] = DEFAULT_VARIABLES,
            progress: bool = True, force: bool = False) -> PrepareReport:
    """Validate ``inputs`` (NetCDF files, Zarr stores, or folders of them) and write the store ``out``.

    Returns a :class:`PrepareReport`; raises :class:`SapwoodError` only if no input is usable.
    """
    files = expand_inputs(inputs)
    report = PrepareReport(store=out)
    fingerprint = _fingerprint(files, variables)
    fsutil.recover_stale(out.parent, re.escape(out.name))  # a killed run's leftovers
    if not force and _existing_fingerprint(out) == fingerprint:
        store = CubeStore(out)
        report.up_to_date, report.rows, report.bytes = True, store.rows, store.rows * store.row_bytes
        report.used = [Path(r["source"]) for r in store.index["runs"]]
        report.problems = [InputProblem(Path(p["path"]), p["kind"], p["detail"]) for p in store.index["skipped"]]
        return report

    partial = fsutil.partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    stats = _Stats(0)
    reference: InputLayout | None = None
    runs: list[dict[str, Any]] = []
    params: list[list[float]] = []
    rows = 0
    from rich.progress import Progress

    try:
        with open(partial / FRAMES_FILE, "wb") as frames_file, Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("preparing", total=len(files))
            for path in files:
                try:
                    if reference is None:
                        stats = _Stats(_count_channels(path, variables))
                    layout = _ingest_one(path, variables, reference, frames_file, stats)
                except InputProblem as problem:
                    report.problems.append(problem)
                else:
                    reference = reference or layout
                    runs.append({"source": str(path), "first_row": rows, "times": layout.times})
                    params.append(layout.params.tolist())
                    report.used.append(path)
                    rows += layout.times
                bar.advance(task)
        if reference is None:
            raise SapwoodError("no usable inputs: " + "; ".join(str(p) for p in report.problems) if report.problems
                               else "no inputs given")
        index = {
            "format": STORE_FORMAT,
            "complete": True,
            "fingerprint": fingerprint,
            "shape": [rows, stats.mean.size, reference.lat.size, reference.lon.size],
            "dtype": "float32",
            "variables": [{"name": n, "levels": lv, "units": EXPECTED_UNITS.get(n, "")}
                          for n, lv in _variable_channels(variables, reference.levels)],
            "stats": {"mean": stats.mean.tolist(), "std": stats.std.tolist(), "count": stats.count},
            "params": {"names": list(PLANET_VARIABLES), "units": [u for _, u, _ in PLANET_VARIABLES.values()],
                       "values": params},
            "runs": runs,
            "coords": {"lat": reference.lat.tolist(), "lon": reference.lon.tolist(), "lev": reference.lev.tolist()},
            "skipped": [{"path": str(p.path), "kind": p.kind, "detail": p.detail} for p in report.problems],
        }
        (partial / INDEX_FILE).write_text(json.dumps(index))
        fsutil.publish_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report.rows, report.bytes = rows, rows * 4 * int(np.prod(index["shape"][1:]))
    return report


def _count_channels(path: Path, variables: tuple[str, ...]) -> int:
    try:
        ds = open_input(path)
    except InputProblem:
        return 0
    try:
        levels = int(ds.sizes.get("lev", 0))
    finally:
        ds.close()
    return sum(1 if name in SURFACE_VARIABLES else levels for name in variables)


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files and Zarr stores named directly, plus ``*.nc``/``*.nc4``/``*.zarr`` inside named folders, sorted."""
    files: list[Path] = []
    for path in inputs:
        path = Path(path)
        if path.is_dir() and not _is_zarr(path):
            found = sorted(p for p in path.iterdir() if p.suffix in (".nc", ".nc4", ".cdf") or _is_zarr(p))
            if not found:
                raise SapwoodError(f"{path}: folder has no .nc or .zarr inputs")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise SapwoodError(f"input {path} does not exist")
    return files


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists())


def demo_stage(out: Path) -> None:
    """The demo's cube stage: simulate a small ensemble -> prepare -> load batches -> augment them.

    Leaves ``out/cubes/runs/*.nc`` and the store ``out/cubes/store`` for later stages (the surrogate).
    """
    import time

    from rich.console import Console

    from sapwood.data.augment import Augment, ChannelRoles
    from sapwood.data.loader import CubeLoader, split_runs
    from sapwood.data.simulate import Grid, simulate_ensemble

    console = Console()
    start = time.perf_counter()
    grid = Grid(levels=8, nlat=32, nlon=64, times=33)
    runs = simulate_ensemble(out / "cubes" / "runs", runs=6, grid=grid, seed=0)
    size = sum(p.stat().st_size for p in runs)
    console.print(f"simulated {len(runs)} planets x {grid.times} times on {grid.levels}x{grid.nlat}x{grid.nlon}: "
                  f"{size / 1e6:.1f} MB NetCDF in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    report = prepare(runs, out / "cubes" / "store", progress=False)
    console.print(f"{report.summary()} in {time.perf_counter() - start:.2f} s", highlight=False)
    store = CubeStore(out / "cubes" / "store")
    train, held_out = split_runs(store.runs, test_fraction=0.34, seed=0)
    loader = CubeLoader(store, batch_size=16, runs=train, seed=0, normalize=True)
    augment = Augment(ChannelRoles.from_store(store, normalized=True), seed=0)
    console.print(f"loader: {len(loader)} batches/epoch over training planets {train} (held out {held_out}), "
                  f"{loader.batch_bytes / 1e6:.1f} MB per batch")
    load_s = augment_s = 0.0
    tick = time.perf_counter()
    for index, batch in enumerate(loader):
        load_s += time.perf_counter() - tick
        tick = time.perf_counter()
        frames = augment(batch.frames)
        augment_s += time.perf_counter() - tick
        if index == 2:
            break
        tick = time.perf_counter()
    console.print(f"3 batches: state {tuple(batch.state.shape)}, params {tuple(batch.params.shape)}; "
                  f"load {load_s / 3 * 1e3:.1f} ms/batch, augment {augment_s / 3 * 1e3:.1f} ms/batch "
                  f"(keeps {', '.join(sorted(augment.preserves))}; roll/flip keep all budgets)")
    console.print(f"augmented state channel means (normalized): {frames[0].mean(dim=(0, 2, 3))[:4].tolist()}")
