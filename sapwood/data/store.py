"""The prepared cube store: one raw float32 file of frames plus a JSON index (read side).

Layout of a store folder (written by :func:`sapwood.data.cubes.prepare`)::

    STORE/
      frames.f32    # little-endian float32, shape [rows, channels, lat, lon], C order; masked cells hold 0
      grid.npz      # area [lat, lon] (cell-area weights, mean 1), valid [channels, lat, lon] (the mask),
                    # and lat/lon [y, x] for curvilinear grids
      index.json    # written last; "complete": true marks a finished store

(The Zarr layout, :mod:`sapwood.data.zarr_store`, keeps ``index.json`` and ``grid.npz`` in
``STORE/sapwood/``.)

A *row* is one time of one run with every variable stacked along channels: each 3-D variable
contributes one channel per level (top-down order), each 2-D variable one channel. The rows of a
run are consecutive and in time order, so a state and its successor are neighbouring rows and a batch of
``L`` consecutive samples is one contiguous read of ``L`` rows. ``index.json`` holds the variables (name,
levels, units, standard_name), the coordinates, the runs (first row, times as days since 0001-01-01 in
their calendar, planet parameters when the inputs carry them), per-channel statistics over every valid
value, the variables left out and the notes of prepare (flips, gaps, overlaps), and ``files``: the size of
every file of the store and a crc32 of the small ones. A store whose files differ from that list is damaged:
:class:`CubeStore` refuses it and ``sapwood prepare`` (the same check, :func:`store_damage`) rebuilds it.
Opening a store also restores ``STORE.old-PID``, the previous store a writer killed between its two renames
left aside (:func:`sapwood.fsutil.recover_stale`; ``STORE.partial-PID`` folders are left to writers).

Raw memory-mapped/``pread`` arrays were chosen over Zarr because a batch is then a handful of
``preadv`` calls straight into the destination tensor, with no chunk decoding or per-chunk Python work.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood import fsutil
from sapwood.errors import SapwoodError

STORE_FORMAT = "sapwood-cubes-2"
FRAMES_FILE = "frames.f32"
GRID_FILE = "grid.npz"
INDEX_FILE = "index.json"
MAX_READ = 1 << 30  # bytes per preadv call


ZARR_META = "sapwood"  # in a Zarr-layout store, the subgroup holding index.json and grid.npz


def meta_folder(path: Path) -> Path:
    """Where ``index.json`` and ``grid.npz`` of the store ``path`` live: the store folder itself (raw layout)
    or its ``sapwood/`` subgroup (Zarr layout, so Zarr readers see only Zarr members)."""
    return path / ZARR_META if (path / ZARR_META / INDEX_FILE).exists() else path


# files up to this size get a crc32 in the index; larger ones (frames, shards) only their size
CHECKSUM_LIMIT = 4 << 20


def store_files(folder: Path) -> dict[str, dict[str, int]]:
    """What the index records of every file below ``folder`` (``index.json`` aside): ``{relative path:
    {"size", and "crc32" for files up to CHECKSUM_LIMIT bytes}}``."""
    files: dict[str, dict[str, int]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INDEX_FILE):
        entry = {"size": file.stat().st_size}
        if entry["size"] <= CHECKSUM_LIMIT:
            entry["crc32"] = zlib.crc32(file.read_bytes())
        files[file.relative_to(folder).as_posix()] = entry
    return files


def _file_damage(path: Path, files: dict[str, dict[str, int]]) -> str | None:
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if size != entry["size"]:
            return f"{file}: size {size} bytes, index expects {entry['size']}"
        if "crc32" in entry and zlib.crc32(file.read_bytes()) != entry["crc32"]:
            return f"{file}: contents changed (crc32 differs from the index)"
    return None


def store_damage(path: Path, index: dict[str, Any]) -> str | None:
    """Why the complete-looking store at ``path`` is damaged (None when its files match the index): every file
    the index lists must have its recorded size (and crc32, for the small ones); stores written before the
    index listed its files are checked by the frames file's size and the presence of the grid and Zarr
    arrays."""
    if "files" in index:
        return _file_damage(path, index["files"])
    grid_file = meta_folder(path) / GRID_FILE
    if not grid_file.exists():
        return f"{grid_file} is missing"
    try:
        with np.load(grid_file) as grid:
            _ = (grid["area"], grid["valid"])  # reading the members checks their zip CRC
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        return f"{grid_file} cannot be read ({type(exc).__name__})"
    if index.get("storage") == "zarr":
        missing = [
            v["name"] for v in index.get("variables", []) if not (path / v["name"] / "zarr.json").exists()
        ]
        return f"{path}: Zarr arrays {missing} are missing" if missing else None
    frames = path / FRAMES_FILE
    expected = int(np.prod(index.get("shape", [0]))) * 4
    actual = frames.stat().st_size if frames.exists() else -1
    if actual != expected:
        return f"{frames}: size {actual} bytes, index expects {expected}"
    return None


@dataclass(frozen=True)
class Channel:
    """One channel of a frame: ``variable`` at ``level`` (level index; -1 for 2-D variables)."""

    variable: str
    level: int


class CubeStore:
    """Read access to a complete prepared store: index, normalization statistics, and row reads.

    ``mean``/``std`` are per channel (per variable and level) in float64; ``params`` is
    ``[runs, len(param_names)]`` float64; ``run_rows[r]`` / ``run_times[r]`` locate run ``r`` in the frames
    file.
    """

    def __init__(self, path: str | Path) -> None:
        self._fd: int | None = None
        self.path = Path(path)
        try:  # a writer killed between its two renames left the previous store as STORE.old-PID: restore it
            fsutil.recover_stale(self.path.parent, re.escape(self.path.name), remove_partials=False)
        except OSError:
            pass  # a read-only folder: nothing to tidy here
        index_path = meta_folder(self.path) / INDEX_FILE
        if not index_path.exists():
            raise SapwoodError(
                f"{self.path} is not a complete sapwood cube store (no {INDEX_FILE}; "
                "was prepare interrupted? run `sapwood prepare` again)"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != STORE_FORMAT or not index.get("complete"):
            raise SapwoodError(
                f"{self.path}: index format {index.get('format')!r} is not {STORE_FORMAT!r} "
                "or the store is incomplete; run `sapwood prepare` again (it rebuilds the store)"
            )
        self.index: dict[str, Any] = index
        self.shape: tuple[int, int, int, int] = tuple(index["shape"])  # rows, channels, lat, lon
        self.frames_path = self.path / FRAMES_FILE
        damage = store_damage(self.path, index)
        if damage is not None:
            raise SapwoodError(
                f"{damage}; the store is damaged, run `sapwood prepare` again (it rebuilds a damaged store)"
            )
        try:
            with np.load(meta_folder(self.path) / GRID_FILE) as grid:
                self.area: np.ndarray = grid["area"].astype(np.float64)  # [lat, lon], mean 1
                self.valid: np.ndarray = grid["valid"].astype(bool)  # [channels, lat, lon]
                self.lat = (
                    grid["lat"] if "lat" in grid else np.asarray(index["coords"]["lat"], dtype=np.float64)
                )
                self.lon = (
                    grid["lon"] if "lon" in grid else np.asarray(index["coords"]["lon"], dtype=np.float64)
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise SapwoodError(
                f"{meta_folder(self.path) / GRID_FILE} cannot be read ({type(exc).__name__}); the "
                "store is damaged, run `sapwood prepare` again (it rebuilds a damaged store)"
            ) from None
        self.variables: list[dict[str, Any]] = index["variables"]
        self._zarr = None
        if index.get("storage") == "zarr":
            from sapwood.data.zarr_store import ZarrRows

            self._zarr = ZarrRows(self.path, self.variables, self.shape)
        self.channels = [
            Channel(v["name"], level)
            for v in self.variables
            for level in (range(v["levels"]) if v["levels"] else [-1])
        ]
        self.mean = np.asarray(index["stats"]["mean"], dtype=np.float64)
        self.std = np.asarray(index["stats"]["std"], dtype=np.float64)
        self.param_names: list[str] = index["params"]["names"]
        self.run_rows = np.asarray([r["first_row"] for r in index["runs"]], dtype=np.int64)
        self.run_times = np.asarray([r["times"] for r in index["runs"]], dtype=np.int64)
        self.params = np.asarray(index["params"]["values"], dtype=np.float64).reshape(
            len(self.run_rows), len(self.param_names)
        )
        self.coords: dict[str, list[float]] = index["coords"]
        self.levels = np.asarray(index["coords"]["lev"], dtype=np.float64)
        self.curvilinear: bool = bool(index["grid"]["curvilinear"])
        self.global_grid: bool = bool(index["grid"]["global"])
        self.step_hours: float = float(index["time"]["step_hours"])

    @property
    def masked(self) -> bool:
        """Whether any cell of any channel is masked."""
        return not bool(self.valid.all())

    def run_days(self, run: int) -> np.ndarray:
        """Times of run ``run`` in days since 0001-01-01 of its calendar
        (``index["runs"][run]["calendar"]``)."""
        return np.asarray(self.index["runs"][run]["days"], dtype=np.float64)

    def describe_grid(self) -> str:
        """One line naming the grid: kind, size, latitude/longitude span and levels."""
        kind = "curvilinear" if self.curvilinear else ("global" if self.global_grid else "regional")
        levels = (
            f", {self.levels.size} levels [{self.levels[0]:g} .. {self.levels[-1]:g}]"
            if self.levels.size
            else ", no levels"
        )
        return (
            f"{kind} {self.shape[2]}x{self.shape[3]} lat [{self.lat.min():g} .. {self.lat.max():g}] "
            f"lon [{self.lon.min():g} .. {self.lon.max():g}]{levels}"
        )

    # --- geometry ------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.shape[1], self.shape[2], self.shape[3]

    @property
    def row_bytes(self) -> int:
        return 4 * self.shape[1] * self.shape[2] * self.shape[3]

    @property
    def runs(self) -> int:
        return len(self.run_rows)

    def channel_slice(self, variable: str) -> slice:
        """The channels of ``variable`` (all its levels)."""
        start = 0
        for v in self.variables:
            count = v["levels"] or 1
            if v["name"] == variable:
                return slice(start, start + count)
            start += count
        raise SapwoodError(
            f"variable {variable!r} is not in the store; it has {[v['name'] for v in self.variables]}"
        )

    # --- reads ---------------------------------------------------------------------------------------------
    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.frames_path, os.O_RDONLY)
        return self._fd

    def read_rows_into(self, first_row: int, out: torch.Tensor) -> None:
        """Fill the contiguous float32 tensor ``out`` ([n, channels, lat, lon]) with rows ``first_row..+n``
        by positional reads straight into its memory (thread-safe; no intermediate copy)."""
        if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("out must be a contiguous float32 CPU tensor")
        n = out.shape[0]
        if first_row < 0 or first_row + n > self.rows:
            raise IndexError(f"rows {first_row}..{first_row + n} outside 0..{self.rows}")
        if self._zarr is not None:
            self._zarr.read_into(first_row, out.numpy())
            return
        view = memoryview(out.numpy()).cast("B")
        offset, done, total, fd = first_row * self.row_bytes, 0, n * self.row_bytes, self._descriptor()
        while done < total:
            got = os.preadv(fd, [view[done : min(total, done + MAX_READ)]], offset + done)
            if got <= 0:
                raise SapwoodError(f"{self.frames_path}: short read at byte {offset + done}")
            done += got

    def read_rows(self, first_row: int, count: int) -> torch.Tensor:
        out = torch.empty((count, *self.row_shape), dtype=torch.float32)
        self.read_rows_into(first_row, out)
        return out

    def memmap(self) -> np.memmap:
        """The whole frames file as a read-only ``[rows, channels, lat, lon]`` memory map (for a Zarr-layout
        store, an object that reads contiguous row slices the same way)."""
        if self._zarr is not None:
            return self._zarr  # type: ignore[return-value]
        return np.memmap(self.frames_path, dtype="<f4", mode="r", shape=self.shape)

    # --- normalization -------------------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * like.dim()
        shape[channel_dim] = -1
        mean = torch.as_tensor(self.mean, dtype=like.dtype, device=like.device).reshape(shape)
        std = torch.as_tensor(self.std, dtype=like.dtype, device=like.device).reshape(shape)
        return mean, std

    def normalize(self, frames: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        """``(x - mean) / std`` per channel, in place; returns ``frames``."""
        mean, std = self._stats(frames, channel_dim)
        return frames.sub_(mean).div_(std)

    def denormalize(self, frames: torch.Tensor, channel_dim: int = -3) -> torch.Tensor:
        """``x * std + mean`` per channel (a new tensor)."""
        mean, std = self._stats(frames, channel_dim)
        return frames * std + mean

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CubeStore({str(self.path)!r}, runs={self.runs}, rows={self.rows}, channels={self.shape[1]}, "
            f"grid={self.shape[2]}x{self.shape[3]}, {self.rows * self.row_bytes / 1e9:.3f} GB)"
        )
