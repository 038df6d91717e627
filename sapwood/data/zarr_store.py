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

from pathlib import Path
from typing import Any

import numpy as np

FRAMES_PER_SHARD = 64


def write_zarr(folder: Path, frames: np.ndarray, index: dict[str, Any], area: np.ndarray, valid: np.ndarray,
               lat: np.ndarray, lon: np.ndarray) -> Path:
    """Write ``frames [rows, channels, y, x]`` (masked cells 0, ``valid [channels, y, x]``) as a Zarr v3
    group; returns the folder of its ``sapwood`` subgroup, where index.json and grid.npz go."""
    import zarr

    from sapwood.data.store import ZARR_META

    rows = frames.shape[0]
    curvilinear = bool(index["grid"]["curvilinear"])
    horizontal = ("y", "x") if curvilinear else ("lat", "lon")
    root = zarr.open_group(folder, mode="a", zarr_format=3,
                           attributes={"Conventions": "CF-1.10", "sapwood_format": index["format"]})
    runs = index["runs"]
    days = np.concatenate([np.asarray(r["days"], dtype=np.float64) for r in runs])
    run_of_row = np.concatenate([np.full(r["times"], i, dtype=np.int32) for i, r in enumerate(runs)])
    _coordinate(root, "time", days, ("time",), {"standard_name": "time", "units": index["time"]["units"],
                                                 "calendar": runs[0]["calendar"], "axis": "T"})
    _coordinate(root, "run", run_of_row, ("time",), {"long_name": "run (index in index.json) of each frame"})
    lat_dims = horizontal if curvilinear else ("lat",)
    lon_dims = horizontal if curvilinear else ("lon",)
    _coordinate(root, "lat", lat, lat_dims, {"standard_name": "latitude", "units": "degrees_north"})
    _coordinate(root, "lon", lon, lon_dims, {"standard_name": "longitude", "units": "degrees_east"})
    vertical = index.get("vertical")
    if vertical:
        _coordinate(root, "lev", np.asarray(index["coords"]["lev"]), ("lev",),
                    {"units": vertical["units"], "axis": "Z",
                     "standard_name": vertical["standard_name"] or "model_level_number"})
    _coordinate(root, "cell_area_weight", area, horizontal, {"long_name": "cell area weight (mean 1)"})
    start = 0
    for variable in index["variables"]:
        count = variable["levels"] or 1
        dims = ("time", "lev", *horizontal) if variable["levels"] else ("time", *horizontal)
        shape = (rows, count, *frames.shape[2:]) if variable["levels"] else (rows, *frames.shape[2:])
        chunk = (1, *shape[1:])
        attrs = {k: variable[k] for k in ("units", "standard_name", "long_name") if variable.get(k)}
        attrs["coordinates"] = "run cell_area_weight" + (" lat lon" if curvilinear else "")
        array = root.create_array(variable["name"], shape=shape, dtype="float32", chunks=chunk,
                                  shards=(min(FRAMES_PER_SHARD, rows), *shape[1:]),
                                  fill_value=np.float32("nan"),
                                  dimension_names=dims, attributes={k: v for k, v in attrs.items() if v},
                                  compressors=None)
        mask = valid[start:start + count]
        for first in range(0, rows, FRAMES_PER_SHARD):
            block = np.where(mask, frames[first:first + FRAMES_PER_SHARD, start:start + count], np.nan)
            array[first:first + block.shape[0]] = block if variable["levels"] else block[:, 0]
        start += count
    root.create_group(ZARR_META, attributes={"description": "sapwood store index (index.json, grid.npz)"})
    return folder / ZARR_META


def _coordinate(root: Any, name: str, values: np.ndarray, dims: tuple[str, ...],
                attrs: dict[str, Any]) -> None:
    values = np.asarray(values)
    root.create_array(name, data=values, chunks=values.shape, dimension_names=dims, attributes=attrs)


class ZarrRows:
    """Row access to a Zarr-layout store with the raw layout's shape ``[rows, channels, y, x]`` (masked cells
    0)."""

    def __init__(self, folder: Path, variables: list[dict[str, Any]],
                 shape: tuple[int, int, int, int]) -> None:
        import zarr

        group = zarr.open_group(folder, mode="r")
        self.arrays = [(group[v["name"]], bool(v["levels"]), v["levels"] or 1) for v in variables]
        self.shape = shape
        self.dtype = np.dtype("float32")

    def read_into(self, first: int, out: np.ndarray) -> None:
        n = out.shape[0]
        start = 0
        for array, layered, count in self.arrays:
            block = array[first:first + n]
            out[:, start:start + count] = block if layered else block[:, None]
            start += count
        np.nan_to_num(out, copy=False, nan=0.0)

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
