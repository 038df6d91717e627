"""``sapwood prepare``: ingest CF-convention NetCDF and Zarr datacubes into a store
(:mod:`sapwood.data.store`).

Each input is opened with xarray (``_FillValue`` / ``missing_value`` -> NaN, packed integers decoded) and read
through :mod:`sapwood.data.cf`: axes by CF metadata, 2-D and 3-D variables on one grid, canonical order
(latitude ascending, longitude ascending, levels top-down), any cftime calendar. Inputs are checked against
the first usable one (variables, units, grid, levels, planet parameters); a bad input is reported with an
:class:`InputProblem` naming the file and the kind of problem and skipped, the others continue. Only when no
input is usable does :func:`prepare` raise.

Files of one run (same name apart from date tokens and the same identity attributes, see
:func:`sapwood.data.cf.run_key`) are joined in time order; an overlap drops the repeated times, a gap starts a
new run (a state and its successor are never taken across a gap); both are reported per file.

Missing values become the store's mask (a cell missing in any frame is masked for the whole channel) and are
written as 0; the statistics, the loss and every metric use valid cells only.

Writes go to ``STORE.partial-PID`` and are renamed into place after ``index.json`` (the completion marker) is
written, so an interrupted prepare never leaves a store that looks complete. The index records a fingerprint
of the inputs (path, size, mtime) and options; re-running on the same inputs does nothing while the store is
intact, and rebuilds a damaged one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sapwood import fsutil
from sapwood.data import cf, remote
from sapwood.data.inputs import InputLayout, InputProblem, hdf5_truncation, inspect_input, open_input
from sapwood.data.simulate import CUBE_VARIABLES, PLANET_VARIABLES
from sapwood.data.sources.credentials import Redactor, redacted_logging
from sapwood.data.store import (
    FRAMES_FILE,
    GRID_FILE,
    INDEX_FILE,
    STORE_FORMAT,
    CubeStore,
    meta_folder,
    store_damage,
    store_files,
)
from sapwood.errors import SapwoodError

DECLARED_FORCING = {"heating": "W m-2", "torque": "N m"}  # per-time scalars a run may carry (the simulator's)
DEFAULT_VARIABLES = (
    CUBE_VARIABLES  # the simulator's variables (prepare takes every variable when none are named)
)
BLOCK_BYTES = 64 << 20  # bytes converted per block


@dataclass
class PrepareReport:
    """What a prepare run did: the store, the inputs used and skipped, the variables taken and left out, notes
    on runs joined over files (gaps, overlaps, flips), and whether it was already up to date."""

    store: Path
    used: list[Path] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)
    up_to_date: bool = False
    rows: int = 0
    bytes: int = 0
    variables: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: int = 0

    def summary(self) -> str:
        head = (
            f"{self.store}: up to date ({len(self.used)} inputs)"
            if self.up_to_date
            else f"{self.store}: {len(self.used)} inputs used, {len(self.problems)} skipped, "
            f"{self.runs} runs, {self.rows} frames, {self.bytes / 1e6:.1f} MB"
        )
        lines = [head]
        if self.variables:
            lines.append(f"  variables: {', '.join(self.variables)}")
        reasons: dict[str, list[str]] = {}
        for name, reason in self.left_out.items():
            reasons.setdefault(reason, []).append(name)
        lines += [f"  left out ({reason}): {', '.join(names)}" for reason, names in reasons.items()]
        lines += [f"  note {note}" for note in self.notes]
        lines += [f"  skipped {p}" for p in self.problems]
        return "\n".join(lines)


# --- runs over files ----------------------------------------------------------------------------------------
@dataclass
class RunPart:
    """Times ``[start, stop)`` of one input, part of a run."""

    layout: InputLayout
    start: int
    stop: int


def plan_runs(layouts: list[InputLayout], report: PrepareReport) -> list[list[RunPart]]:
    """Group inputs into runs (same :func:`sapwood.data.cf.run_key`), join each group in time order, drop
    overlapping times, split at gaps; every overlap and gap is a note naming the file."""
    groups: dict[str, list[InputLayout]] = {}
    for layout in layouts:
        groups.setdefault(layout.key, []).append(layout)
    runs: list[list[RunPart]] = []
    for members in groups.values():
        members.sort(key=lambda item: (item.time.days[0], str(item.path)))
        if len(members) > 1 and len({round(float(m.time.days[0]), 6) for m in members}) == 1:
            runs.extend([RunPart(m, 0, m.times)] for m in members)  # an ensemble: same times, separate runs
            continue
        monthly = all(m.time.monthly or m.times == 1 for m in members) and _between_monthly(members)
        step = _typical_step(members)
        current: list[RunPart] = []
        last: float | None = None
        for member in members:
            days = member.time.days
            start = 0
            if last is not None:
                start = int(np.searchsorted(days, last, side="right"))
                if start == member.times:
                    report.problems.append(
                        InputProblem(
                            member.path,
                            "overlap",
                            f"all {member.times} times are already in {current[-1].layout.path.name}",
                        )
                    )
                    continue
                if start:
                    report.notes.append(
                        f"{member.path}: overlap: first {start} times already in "
                        f"{current[-1].layout.path.name}; dropped"
                    )
                missing = _missing_steps(last, days[start], member.time.calendar, monthly, step)
                if missing > 0:
                    report.notes.append(
                        f"{member.path}: gap: {missing} missing steps after "
                        f"{cf.date_text(last, member.time.calendar)}; a new run starts here"
                    )
                    runs.append(current)
                    current = []
            current.append(RunPart(member, start, member.times))
            last = float(days[-1])
        runs.append(current)
    kept = []
    for run in runs:
        times = sum(part.stop - part.start for part in run)
        if times < 2:
            for part in run:
                report.problems.append(
                    InputProblem(
                        part.layout.path,
                        "too-short",
                        f"{times} time(s) in its run; need at least 2 for state pairs",
                    )
                )
        else:
            kept.append(run)
    return kept


def _between_monthly(members: list[InputLayout]) -> bool:
    firsts = np.asarray([m.time.days[0] for m in members])
    steps = np.diff(firsts)
    return bool(steps.size == 0 or np.all(steps >= 27.5))


def _typical_step(members: list[InputLayout]) -> float:
    within = [np.diff(m.time.days) for m in members if m.times > 1]
    steps = np.concatenate(within) if within else np.diff(np.asarray([m.time.days[0] for m in members]))
    return float(np.median(steps)) if steps.size else 1.0


def _missing_steps(last: float, first: float, calendar: str, monthly: bool, step: float) -> int:
    if monthly:
        return (
            int(
                cf.month_index(np.asarray([first]), calendar)[0]
                - cf.month_index(np.asarray([last]), calendar)[0]
            )
            - 1
        )
    return int(round((first - last) / step)) - 1 if first - last > 1.5 * step else 0


# --- the store ----------------------------------------------------------------------------------------------
def _fingerprint(inputs: list[Any], variables: tuple[str, ...] | None, layout: str) -> str:
    h = hashlib.sha256(f"{STORE_FORMAT}|{layout}".encode())
    for path in inputs:
        if isinstance(path, remote.RemoteZarr):
            h.update(f"{path.url}|{remote.fingerprint(path)}\n".encode())
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    h.update(("<all>" if variables is None else ",".join(variables)).encode())
    return h.hexdigest()


def _existing_fingerprint(store: Path) -> str | None:
    """The fingerprint of a complete, intact store at ``store`` (None when absent, incomplete or damaged, so
    that running prepare again rebuilds it)."""
    try:
        index = json.loads((meta_folder(store) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not index.get("complete") or store_damage(store, index) is not None:
        return None
    return index.get("fingerprint")


class _Stats:
    """Per-channel mean and variance over valid (finite) values, merged across blocks (Chan et al.),
    float64."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    @staticmethod
    def block(frames: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = frames.astype(np.float64).transpose(1, 0, 2, 3).reshape(frames.shape[1], -1)
        if valid.all():
            mean = values.mean(axis=1)
            return (
                np.full(values.shape[0], float(values.shape[1])),
                mean,
                ((values - mean[:, None]) ** 2).sum(axis=1),
            )
        ok = valid.transpose(1, 0, 2, 3).reshape(frames.shape[1], -1)
        count = ok.sum(axis=1).astype(np.float64)
        mean = np.where(ok, values, 0).sum(axis=1) / np.maximum(count, 1)
        m2 = np.where(ok, (values - mean[:, None]) ** 2, 0).sum(axis=1)
        return count, mean, m2

    def merge(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        safe = np.maximum(total, 1)
        delta = mean - self.mean
        self.mean = self.mean + delta * count / safe
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / safe
        self.count = total

    @property
    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        return np.where(std > 0, std, 1.0)


class _Writer:
    """Appends frames to the store's frames file and accumulates statistics and the mask."""

    def __init__(self, frames_file: Any, reference: InputLayout) -> None:
        self.file = frames_file
        self.reference = reference
        self.channels = reference.channels()
        count = sum(levels or 1 for _, levels in self.channels)
        shape = (count, *reference.grid.shape())
        self.stats = _Stats(count)
        self.valid_always = np.ones(shape, dtype=bool)
        self.valid_ever = np.zeros(shape, dtype=bool)

    def rows(self) -> int:
        return self.file.tell() // (4 * self.valid_always.size)

    def truncate_rows(self, rows: int) -> None:
        self.file.seek(rows * 4 * self.valid_always.size)
        self.file.truncate()

    def write_part(self, part: RunPart) -> int:
        """Append the times of ``part``; on any problem the file is cut back and nothing is merged."""
        layout = part.layout
        path = layout.path
        start_offset = self.file.tell()
        merged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        always, ever = self.valid_always.copy(), self.valid_ever.copy()
        row_bytes = 4 * always.size
        per_block = max(1, BLOCK_BYTES // row_bytes)
        try:
            ds = open_input(path)
            try:
                for begin in range(part.start, part.stop, per_block):
                    end = min(part.stop, begin + per_block)
                    frames = self._read(ds, layout, begin, end)
                    if np.isinf(frames).any():
                        bad = np.argwhere(np.isinf(frames))[0]
                        raise InputProblem(
                            path,
                            "non-finite",
                            f"{int(np.isinf(frames).sum())} inf values, first in "
                            f"{_channel_name(self.channels, int(bad[1]))} at time index "
                            f"{begin + int(bad[0])}",
                        )
                    valid = np.isfinite(frames)
                    always &= valid.all(axis=0)
                    ever |= valid.any(axis=0)
                    merged.append(_Stats.block(frames, valid))
                    self.file.write(
                        (frames if valid.all() else np.where(valid, frames, 0))
                        .astype("<f4", copy=False)
                        .tobytes()
                    )
            finally:
                ds.close()
        except BaseException:
            self.file.seek(start_offset)
            self.file.truncate(start_offset)
            raise
        for block in merged:
            self.stats.merge(*block)
        self.valid_always, self.valid_ever = always, ever
        return part.stop - part.start

    def _read(self, ds: Any, layout: InputLayout, begin: int, end: int) -> np.ndarray:
        try:
            parts = [
                cf.read_block(ds, name, layout.axes, layout.grid, layout.vertical, begin, end)
                for name in layout.variables
            ]
        except (ValueError, TypeError) as exc:
            raise InputProblem(layout.path, "attributes", f"{type(exc).__name__}: {str(exc)[:160]}") from None
        except Exception as exc:  # noqa: BLE001 - a read failure means a damaged file
            truncation = hdf5_truncation(layout.path) if layout.path.is_file() else None
            kind, detail = (
                ("truncated", truncation)
                if truncation
                else ("corrupt", f"data unreadable ({type(exc).__name__}: {str(exc)[:120]})")
            )
            raise InputProblem(layout.path, kind, detail) from None
        return np.concatenate(parts, axis=1)


def _channel_name(channels: list[tuple[str, int]], index: int) -> str:
    for name, levels in channels:
        count = levels or 1
        if index < count:
            return f"{name}" + (f" level {index}" if levels else "")
        index -= count
    return f"channel {index}"


STORE_LAYOUTS = ("raw", "zarr")


def prepare(
    inputs: list[Path | str], out: Path, variables: tuple[str, ...] | None = None, progress: bool = True,
    force: bool = False, layout: str = "raw",
) -> PrepareReport:
    """Validate ``inputs`` (NetCDF files, Zarr stores, or folders of them; Zarr stores on S3 as ``s3://``
    URLs,
    :mod:`sapwood.data.remote`) and write the store ``out``.

    ``variables``: names or CF standard names to store; None takes every data variable on the grid of the
    first usable input (the report says which were taken and which left out, and why). ``layout``: ``raw``
    (one float32 frames file, the fastest to load) or ``zarr`` (a Zarr v3 group others can read,
    :mod:`sapwood.data.zarr_store`). Returns a
    :class:`PrepareReport`; raises :class:`SapwoodError` only if no input is usable.
    """
    if layout not in STORE_LAYOUTS:
        raise SapwoodError(f"format {layout!r}: allowed are {', '.join(STORE_LAYOUTS)}")
    out = Path(out)
    with (
        redacted_logging(Redactor.from_environment())
        if any(remote.is_remote(p) for p in inputs)
        else contextlib.nullcontext()
    ):
        return _prepare(inputs, out, variables, progress, force, layout)


def _prepare(
    inputs: list[Path | str], out: Path, variables: tuple[str, ...] | None, progress: bool, force: bool,
    layout: str,
) -> PrepareReport:
    files = expand_inputs(inputs)
    report = PrepareReport(store=out)
    wanted = tuple(variables) if variables else None
    fingerprint = _fingerprint(files, wanted, layout)
    fsutil.recover_stale(out.parent, re.escape(out.name))  # a killed run's leftovers
    if not force and _existing_fingerprint(out) == fingerprint:
        store = CubeStore(out)
        report.up_to_date, report.rows, report.bytes = True, store.rows, store.rows * store.row_bytes
        report.used = sorted({remote.as_input(s) for r in store.index["runs"] for s in r["sources"]}, key=str)
        report.problems = [
            InputProblem(remote.as_input(p["path"]), p["kind"], p["detail"]) for p in store.index["skipped"]
        ]
        report.variables = [v["name"] for v in store.variables]
        report.runs = store.runs
        return report

    from rich.progress import Progress

    layouts: list[InputLayout] = []
    reference: InputLayout | None = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("inspecting", total=len(files))
        for path in files:
            try:
                found = inspect_input(path, wanted, reference)
            except InputProblem as problem:
                report.problems.append(problem)
            else:
                reference = reference or found
                layouts.append(found)
            bar.advance(task)
    if reference is None:
        raise SapwoodError(
            "no usable inputs: " + "; ".join(str(p) for p in report.problems)
            if report.problems
            else "no inputs given"
        )
    report.variables, report.left_out = list(reference.variables), dict(reference.left_out)
    _note_orientation(reference, report)
    runs = plan_runs(layouts, report)

    partial = fsutil.partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rows = 0
    run_entries: list[dict[str, Any]] = []
    try:
        with (
            open(partial / FRAMES_FILE, "wb") as frames_file,
            Progress(disable=not progress, transient=True) as bar,
        ):
            writer = _Writer(frames_file, reference)
            task = bar.add_task("preparing", total=sum(len(run) for run in runs))
            for run in runs:
                _write_run(writer, run, run_entries, report, bar, task)
            rows = writer.rows()
        if not run_entries:
            raise SapwoodError("no usable inputs: " + "; ".join(str(p) for p in report.problems))
        report.used = [remote.as_input(s) for entry in run_entries for s in entry["sources"]]
        index = _index(reference, writer, run_entries, rows, fingerprint, report)
        index["storage"] = layout
        meta = partial
        if layout == "zarr":
            meta = _frames_to_zarr(partial, index, reference, writer)
        _write_grid(meta, reference, writer)
        index["files"] = store_files(partial)  # sizes (and crc32 of the small files): the integrity check
        (meta / INDEX_FILE).write_text(json.dumps(index))
        fsutil.publish_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report.rows, report.runs = rows, len(run_entries)
    report.bytes = rows * 4 * int(np.prod(index["shape"][1:]))
    return report


def _write_run(
    writer: _Writer, run: list[RunPart], entries: list[dict[str, Any]], report: PrepareReport, bar: Any,
    task: Any,
) -> None:
    """Write one planned run; a file that fails on reading is skipped and its run continues as a new run."""
    segment: list[RunPart] = []
    first_row = writer.rows()
    for part in run:
        try:
            writer.write_part(part)
        except InputProblem as problem:
            report.problems.append(problem)
            _close_segment(writer, segment, first_row, entries, report)
            segment, first_row = [], writer.rows()
        else:
            segment.append(part)
        bar.advance(task)
    _close_segment(writer, segment, first_row, entries, report)


def _close_segment(
    writer: _Writer, segment: list[RunPart], first_row: int, entries: list[dict[str, Any]],
    report: PrepareReport,
) -> None:
    times = sum(p.stop - p.start for p in segment)
    if times >= 2:
        entries.append(_run_entry(segment, first_row, times))
    elif segment:
        writer.truncate_rows(first_row)
        report.problems.extend(
            InputProblem(
                p.layout.path,
                "too-short",
                f"{times} time(s) left in its run after a damaged file; need at least 2",
            )
            for p in segment
        )


def _run_entry(segment: list[RunPart], first_row: int, times: int) -> dict[str, Any]:
    days = np.concatenate([p.layout.time.days[p.start : p.stop] for p in segment])
    first = segment[0].layout
    entry = {
        "source": str(first.path), "sources": [str(p.layout.path) for p in segment], "first_row": first_row,
        "times": times, "days": days.tolist(), "calendar": first.time.calendar,
        "monthly": bool(first.time.monthly or (days.size > 1 and np.all(np.diff(days) >= 27.5))),
        "params": first.params.tolist(),
    }
    forcing = _declared_forcing(segment)
    if forcing:
        entry["declared_forcing"] = forcing
    return entry


def _declared_forcing(segment: list[RunPart]) -> dict[str, list[float]]:
    """The declared forcing of every stored time (over the interval before it; the simulator's ``heating`` in
    W m-2 and ``torque`` in N m, 1-D along time), when every input of the run carries it; else empty."""
    out: dict[str, list[float]] = {name: [] for name in DECLARED_FORCING}
    for part in segment:
        ds = open_input(part.layout.path)
        try:
            for name, units in DECLARED_FORCING.items():
                variable = ds.variables.get(name)
                if (
                    variable is None
                    or variable.ndim != 1
                    or variable.attrs.get("units") != units
                    or variable.shape[0] != part.layout.time.days.size
                ):
                    return {}
                out[name].extend(
                    np.asarray(variable.values[part.start : part.stop], dtype=np.float64).tolist()
                )
        finally:
            ds.close()
    return out


def _note_orientation(reference: InputLayout, report: PrepareReport) -> None:
    grid = reference.grid
    if grid.lat_flipped:
        report.notes.append("latitude was descending; stored south to north")
    if grid.lon_order is not None:
        report.notes.append(f"longitude reordered to increase ({grid.lon_convention})")
    if reference.vertical is not None and reference.vertical.flipped:
        report.notes.append(f"levels of {reference.vertical.name} reversed to top-down order")
    if grid.curvilinear:
        report.notes.append(
            f"curvilinear grid {grid.shape()} carried with 2-D area weights from {grid.area_source}"
        )


def _index(
    reference: InputLayout, writer: _Writer, runs: list[dict[str, Any]], rows: int, fingerprint: str,
    report: PrepareReport,
) -> dict[str, Any]:
    grid, vertical = reference.grid, reference.vertical
    masked = {}
    start = 0
    for name, levels in reference.channels():
        width = levels or 1
        always, ever = writer.valid_always[start : start + width], writer.valid_ever[start : start + width]
        if not always.all():
            masked[name] = {
                "masked_cells": int((~always).sum()),
                "sometimes_missing": int((ever & ~always).sum()),
            }
        start += width
    steps = np.concatenate([np.diff(r["days"]) for r in runs])
    coords: dict[str, Any] = {"lev": vertical.values.tolist() if vertical else []}
    if not grid.curvilinear:
        coords.update(lat=grid.lat.tolist(), lon=grid.lon.tolist())
    return {
        "format": STORE_FORMAT,
        "complete": True,
        "fingerprint": fingerprint,
        "shape": [rows, writer.valid_always.shape[0], *grid.shape()],
        "dtype": "float32",
        "variables": [
            {"name": n, "levels": lv, "units": reference.units[n], **_variable_attrs(reference, n)}
            for n, lv in reference.channels()
        ],
        "stats": {
            "mean": writer.stats.mean.tolist(),
            "std": writer.stats.std.tolist(),
            "count": writer.stats.count.tolist(),
        },
        "params": {
            "names": list(PLANET_VARIABLES) if reference.params.size else [],
            "units": [u for _, u, _ in PLANET_VARIABLES.values()] if reference.params.size else [],
            "values": [r["params"] for r in runs],
        },
        "runs": runs,
        "coords": coords,
        "grid": {
            "curvilinear": grid.curvilinear, "global": grid.global_grid, "area_source": grid.area_source,
            "lat_flipped": grid.lat_flipped, "lon_reordered": grid.lon_order is not None,
            "lon_convention": grid.lon_convention, "dims": [grid.y_dim, grid.x_dim],
        },
        "vertical": None
        if vertical is None
        else {
            "name": vertical.name, "units": vertical.units, "standard_name": vertical.standard_name,
            "flipped": vertical.flipped, "order": "top-down",
            "bounds": vertical.bounds.tolist() if vertical.bounds is not None else None,
        },
        "time": {
            "units": cf.TIME_REFERENCE_UNITS,
            "step_hours": float(np.median(steps) * 24) if steps.size else 0.0,
        },
        "mask": masked,
        "left_out": reference.left_out,
        "notes": report.notes,
        "skipped": [{"path": str(p.path), "kind": p.kind, "detail": p.detail} for p in report.problems],
    }


def _variable_attrs(layout: InputLayout, name: str) -> dict[str, str]:
    return {
        key: layout.attributes[name][key]
        for key in ("standard_name", "long_name")
        if key in layout.attributes.get(name, {})
    }


def _frames_to_zarr(folder: Path, index: dict[str, Any], reference: InputLayout, writer: _Writer) -> Path:
    """Rewrite the frames file as the Zarr layout; returns the subgroup folder for index.json and grid.npz."""
    from sapwood.data.zarr_store import write_zarr

    frames = np.memmap(folder / FRAMES_FILE, dtype="<f4", mode="r", shape=tuple(index["shape"]))
    meta = write_zarr(
        folder, frames, index, reference.grid.area, writer.valid_always, reference.grid.lat,
        reference.grid.lon,
    )
    del frames
    (folder / FRAMES_FILE).unlink()
    return meta


def _write_grid(folder: Path, reference: InputLayout, writer: _Writer) -> None:
    grid = reference.grid
    arrays = {"area": grid.area, "valid": writer.valid_always}
    if grid.curvilinear:
        arrays.update(lat=grid.lat, lon=grid.lon)
    with open(folder / GRID_FILE, "wb") as f:
        np.savez(f, **arrays)


def expand_inputs(inputs: list[Path | str]) -> list[Any]:
    """Files and Zarr stores named directly, plus ``*.nc``/``*.nc4``/``*.zarr`` inside named folders, sorted;
    ``s3://`` URLs become :class:`~sapwood.data.remote.RemoteZarr` stores
    (:func:`sapwood.data.remote.resolve`)."""
    files: list[Any] = []
    for path in inputs:
        if remote.is_remote(path):
            files.extend(remote.resolve(str(path)))
            continue
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
    return path.is_dir() and (
        path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()
    )
