"""The Zarr v3 layout of a cube store (``sapwood prepare --format zarr``): readable by ``xarray.open_zarr``.

The store folder is a Zarr v3 group holding one array per variable, ``(time, [lev,] lat, lon)`` (curvilinear
grids: ``(time, [lev,] y, x)``) in float32, one chunk per frame grouped into shards of up to
``FRAMES_PER_SHARD`` frames, masked cells as NaN, CF attributes kept (``units``, ``standard_name``,
``long_name``); coordinates ``time`` (days since 0001-01-01 in the first run's calendar), ``lat``, ``lon``,
``lev`` and ``run`` (the run of each frame), and ``cell_area_weight``. The rows of all runs follow each other
along ``time`` exactly as in the raw layout; ``index.json`` and ``grid.npz`` sit in the ``sapwood``
subgroup, so Zarr readers meet only Zarr members.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

FRAMES_PER_SHARD = 64


def write_zarr(
    folder: Path, frames: np.ndarray, index: dict[str, Any], area: np.ndarray, valid: np.ndarray,
    lat: np.ndarray, lon: np.ndarray,
) -> Path:
    """Write ``frames [rows, channels, y, x]`` (masked cells 0, ``valid [channels, y, x]``) as a Zarr v3
    group; returns the folder of its ``sapwood`` subgroup, where index.json and grid.npz go."""
    import zarr

    from sapwood.data.store import ZARR_META

    rows = frames.shape[0]
    curvilinear = bool(index["grid"]["curvilinear"])
    horizontal = ("y", "x") if curvilinear else ("lat", "lon")
    root = zarr.open_group(
        folder, mode="a", zarr_format=3,
        attributes={"Conventions": "CF-1.10", "sapwood_format": index["format"]},
    )
    runs = index["runs"]
    days = np.concatenate([np.asarray(r["days"], dtype=np.float64) for r in runs])
    run_of_row = np.concatenate([np.full(r["times"], i, dtype=np.int32) for i, r in enumerate(runs)])
    _coordinate(
        root,
        "time",
        days,
        ("time",),
        {
            "standard_name": "time", "units": index["time"]["units"], "calendar": runs[0]["calendar"],
            "axis": "T",
        },
    )
    _coordinate(root, "run", run_of_row, ("time",), {"long_name": "run (index in index.json) of each frame"})
    lat_dims = horizontal if curvilinear else ("lat",)
    lon_dims = horizontal if curvilinear else ("lon",)
    _coordinate(root, "lat", lat, lat_dims, {"standard_name": "latitude", "units": "degrees_north"})
    _coordinate(root, "lon", lon, lon_dims, {"standard_name": "longitude", "units": "degrees_east"})
    vertical = index.get("vertical")
    if vertical:
        _coordinate(
            root,
            "lev",
            np.asarray(index["coords"]["lev"]),
            ("lev",),
            {
                "units": vertical["units"],
                "axis": "Z",
                "standard_name": vertical["standard_name"] or "model_level_number",
            },
        )
    _coordinate(root, "cell_area_weight", area, horizontal, {"long_name": "cell area weight (mean 1)"})
    start = 0
    for variable in index["variables"]:
        count = variable["levels"] or 1
        dims = ("time", "lev", *horizontal) if variable["levels"] else ("time", *horizontal)
        shape = (rows, count, *frames.shape[2:]) if variable["levels"] else (rows, *frames.shape[2:])
        chunk = (1, *shape[1:])
        attrs = {k: variable[k] for k in ("units", "standard_name", "long_name") if variable.get(k)}
        attrs["coordinates"] = "run cell_area_weight" + (" lat lon" if curvilinear else "")
        array = root.create_array(
            variable["name"], shape=shape, dtype="float32", chunks=chunk,
            shards=(min(FRAMES_PER_SHARD, rows), *shape[1:]), fill_value=np.float32("nan"),
            dimension_names=dims, attributes={k: v for k, v in attrs.items() if v}, compressors=None,
        )
        mask = valid[start : start + count]
        for first in range(0, rows, FRAMES_PER_SHARD):
            block = np.where(mask, frames[first : first + FRAMES_PER_SHARD, start : start + count], np.nan)
            array[first : first + block.shape[0]] = block if variable["levels"] else block[:, 0]
        start += count
    root.create_group(ZARR_META, attributes={"description": "sapwood store index (index.json, grid.npz)"})
    return folder / ZARR_META


def _coordinate(
    root: Any, name: str, values: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any]
) -> None:
    values = np.asarray(values)
    root.create_array(name, data=values, chunks=values.shape, dimension_names=dims, attributes=attrs)


MISSING = np.uint64(0xFFFFFFFFFFFFFFFF)  # a shard-index entry of a chunk that was never written


class ShardedFrames:
    """Direct reads of one array written by :func:`write_zarr`, following the Zarr v3 sharding codec
    (``sharding_indexed``): uncompressed little-endian float32 inner chunks of one frame, the shard index
    (``[frames_per_shard, 2]`` uint64 offset/nbytes, then a crc32c) at the end of each shard file. Frames that
    follow each other in a shard are read with one ``preadv`` straight into the destination rows.
    :meth:`from_metadata` returns None for any other layout (the reader then falls back to zarr-python)."""

    def __init__(
        self, folder: Path, shape: tuple[int, ...], frames_per_shard: int, index_bytes: int,
        index_at_end: bool,
    ) -> None:
        self.folder, self.shape, self.frames_per_shard = folder, shape, frames_per_shard
        self.index_bytes, self.index_at_end = index_bytes, index_at_end
        self.chunk_bytes = 4 * int(np.prod(shape[1:]))
        self._files: dict[int, tuple[int, np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, folder: Path) -> ShardedFrames | None:
        meta = json.loads((folder / "zarr.json").read_text())
        shape = tuple(meta.get("shape", ()))
        codecs = meta.get("codecs", [])
        if (
            meta.get("zarr_format") != 3
            or meta.get("data_type") != "float32"
            or len(codecs) != 1
            or codecs[0].get("name") != "sharding_indexed"
            or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
        ):
            return None
        config = codecs[0]["configuration"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        little = [{"name": "bytes", "configuration": {"endian": "little"}}]
        index_codecs = config.get("index_codecs", little)
        if (
            list(config["chunk_shape"]) != [1, *shape[1:]]
            or list(outer[1:]) != list(shape[1:])
            or config.get("codecs") != little
            or index_codecs not in (little, [*little, {"name": "crc32c"}])
            or meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/"
        ):
            return None
        checksum = 4 if len(index_codecs) == 2 else 0
        return cls(
            folder, shape, int(outer[0]), 16 * int(outer[0]) + checksum,
            config.get("index_location", "end") == "end",
        )

    def _shard(self, number: int) -> tuple[int, np.ndarray] | None:
        with self._lock:
            return self._files[number] if number in self._files else self._open(number)

    def _open(self, number: int) -> tuple[int, np.ndarray] | None:
        if number not in self._files:
            path = self.folder / "c" / "/".join([str(number)] + ["0"] * (len(self.shape) - 1))
            if not path.exists():
                return None
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            raw = os.pread(fd, self.index_bytes, size - self.index_bytes if self.index_at_end else 0)
            self._files[number] = (fd, np.frombuffer(raw[: 16 * self.frames_per_shard], "<u8").reshape(-1, 2))
        return self._files[number]

    def read_into(self, first: int, rows: list[np.ndarray]) -> None:
        """Frames ``first .. first + len(rows)`` into ``rows`` (contiguous float32 buffers of one frame each;
        frames never written hold the fill value, NaN)."""
        done = 0
        while done < len(rows):
            frame = first + done
            number, inner = divmod(frame, self.frames_per_shard)
            count = min(len(rows) - done, self.frames_per_shard - inner)
            shard = self._shard(number)
            if shard is None:
                for row in rows[done : done + count]:
                    row.fill(np.nan)
                done += count
                continue
            fd, index = shard
            start = 0
            while start < count:  # runs of chunks stored back to back: one preadv each
                offset, nbytes = index[inner + start]
                if offset == MISSING:
                    rows[done + start].fill(np.nan)
                    start += 1
                    continue
                if nbytes != self.chunk_bytes:
                    raise OSError(
                        f"{self.folder}: chunk of frame {frame + start} has {nbytes} bytes, "
                        f"expected {self.chunk_bytes}"
                    )
                stop = start + 1
                while (
                    stop < count
                    and stop - start < 512
                    and index[inner + stop, 0] == index[inner + stop - 1, 0] + nbytes
                    and index[inner + stop, 1] == nbytes
                ):
                    stop += 1
                views = [memoryview(row).cast("B") for row in rows[done + start : done + stop]]
                wanted, got = (stop - start) * self.chunk_bytes, os.preadv(fd, views, int(offset))
                if got != wanted:
                    raise OSError(f"{self.folder}: short read of frames {frame + start}..{frame + stop}")
                start = stop
            done += count

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


class ZarrRows:
    """Row access to a Zarr-layout store with the raw layout's shape ``[rows, channels, y, x]`` (masked cells
    0): direct shard reads (:class:`ShardedFrames`) where the arrays have the layout :func:`write_zarr`
    writes, zarr-python otherwise (``direct=False`` forces it)."""

    def __init__(
        self, folder: Path, variables: list[dict[str, Any]], shape: tuple[int, int, int, int],
        direct: bool = True,
    ) -> None:
        import zarr

        from sapwood.data.store import GRID_FILE, ZARR_META

        group = zarr.open_group(folder, mode="r")
        self.arrays = [(group[v["name"]], bool(v["levels"]), v["levels"] or 1) for v in variables]
        self.direct = [ShardedFrames.from_metadata(folder / v["name"]) if direct else None for v in variables]
        self.shape = shape
        self.dtype = np.dtype("float32")
        with np.load(folder / ZARR_META / GRID_FILE) as grid:
            self.masked = not bool(grid["valid"].all())

    def read_into(self, first: int, out: np.ndarray) -> None:
        n = out.shape[0]
        start = 0
        for (array, layered, count), direct in zip(self.arrays, self.direct, strict=True):
            if direct is not None:
                direct.read_into(first, [out[r, start : start + count] for r in range(n)])
            else:
                block = array[first : first + n]
                out[:, start : start + count] = block if layered else block[:, None]
            start += count
        if self.masked or any(d is None for d in self.direct):
            np.nan_to_num(out, copy=False, nan=0.0)

    def close(self) -> None:
        for direct in self.direct:
            if direct is not None:
                direct.close()

    def __del__(self) -> None:
        if hasattr(self, "direct"):
            self.close()

    def __getitem__(self, rows: slice) -> np.ndarray:
        first, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("only contiguous row slices are supported")
        out = np.empty((max(stop - first, 0), *self.shape[1:]), dtype=np.float32)
        if out.shape[0]:
            self.read_into(first, out)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
