"""The Zarr v3 store layout, checked against the Zarr v3 specification (core metadata, the
``sharding_indexed`` codec's binary shard format) and read back by xarray with CF decoding; direct shard reads
equal zarr-python's."""

from __future__ import annotations

import json

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from sapwood.bench.data import write_synthetic_runs
from sapwood.data.cubes import prepare
from sapwood.data.loader import CubeLoader
from sapwood.data.store import CubeStore
from sapwood.data.zarr_store import ZarrRows

LEVELS, NLAT, NLON, TIMES = 3, 6, 8, 70  # 70 frames per run: a full shard of 64 and a partial one


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("zarr-layout")
    runs = write_synthetic_runs(root / "runs", 2, LEVELS, NLAT, NLON, TIMES)
    for run in runs:  # land: two cells of q missing in every frame
        with netCDF4.Dataset(run, "a") as ds:
            q = ds["q"][:]
            q[:, :, 0, :2] = np.nan
            ds["q"][:] = q
    prepare(runs, root / "raw", progress=False)
    prepare(runs, root / "zarr", progress=False, layout="zarr")
    return runs, CubeStore(root / "raw"), CubeStore(root / "zarr")


def test_group_and_arrays_follow_the_zarr_v3_spec(stores):
    runs, raw, zarr_store = stores
    group = json.loads((zarr_store.path / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    assert group["attributes"]["Conventions"].startswith("CF-")
    meta = json.loads((zarr_store.path / "T" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array" and meta["data_type"] == "float32"
    assert meta["shape"] == [2 * TIMES, LEVELS, NLAT, NLON]
    assert meta["dimension_names"] == ["time", "lev", "lat", "lon"]
    assert meta["fill_value"] == "NaN"  # the spec's spelling of a float NaN fill value
    assert meta["attributes"]["standard_name"] == "air_temperature" and meta["attributes"]["units"] == "K"
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed"
    assert codec["configuration"]["chunk_shape"] == [1, LEVELS, NLAT, NLON]  # one chunk per frame
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] > 1  # several frames per shard


def test_shards_decode_by_the_spec_to_the_raw_frames(stores):
    """Shard ``c/0/0/0/0`` decoded by hand from the spec: the index (offset, nbytes per inner chunk, uint64
    little-endian) ends the file, followed by its crc32c; each chunk is the frame's little-endian float32."""
    runs, raw, zarr_store = stores
    meta = json.loads((zarr_store.path / "T" / "zarr.json").read_text())
    per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    data = (zarr_store.path / "T" / "c" / "0" / "0" / "0" / "0").read_bytes()
    index_bytes = data[-(16 * per_shard + 4) : -4]
    crc32c = pytest.importorskip("google_crc32c")
    assert int.from_bytes(data[-4:], "little") == crc32c.value(index_bytes)
    index = np.frombuffer(index_bytes, "<u8").reshape(per_shard, 2)
    channels = raw.channel_slice("T")
    for frame in (0, 1, per_shard - 1):
        offset, nbytes = (int(v) for v in index[frame])
        chunk = np.frombuffer(data[offset : offset + nbytes], "<f4").reshape(LEVELS, NLAT, NLON)
        np.testing.assert_array_equal(chunk, raw.read_rows(frame, 1)[0, channels].numpy())


def test_xarray_reads_cf_coordinates_and_masked_cells(stores):
    runs, raw, zarr_store = stores
    ds = xr.open_zarr(zarr_store.path, consolidated=False)
    source = xr.open_dataset(runs[1])
    second = slice(TIMES, 2 * TIMES)
    assert (
        ds["time"].values[second].tolist() == source["time"].values.tolist()
    )  # decoded by CF units/calendar
    np.testing.assert_allclose(ds["lat"].values, source["lat"].values)
    np.testing.assert_allclose(ds["lon"].values, source["lon"].values)
    np.testing.assert_allclose(ds["lev"].values, source["lev"].values)
    np.testing.assert_array_equal(ds["T"].values[second], source["T"].values)
    q = ds["q"].values[second]
    assert np.isnan(q[:, :, 0, :2]).all() and not np.isnan(q[:, :, 1:]).any()


@pytest.mark.parametrize("read_threads", [1, 3])
def test_direct_shard_reads_equal_zarr_python_and_the_raw_store(stores, read_threads):
    runs, raw, zarr_store = stores
    rows = ZarrRows(zarr_store.path, zarr_store.variables, zarr_store.shape)
    assert all(direct is not None for direct in rows.direct)
    fallback = ZarrRows(zarr_store.path, zarr_store.variables, zarr_store.shape, direct=False)
    for first, count in ((0, 3), (60, 10), (63, 70), (130, 10)):  # inside, across and after shard boundaries
        expected = raw.read_rows(first, count).numpy()
        np.testing.assert_array_equal(rows[first : first + count], expected)
        np.testing.assert_array_equal(fallback[first : first + count], expected)
    loaders = [CubeLoader(s, batch_size=8, seed=3, read_threads=read_threads) for s in (raw, zarr_store)]
    for a, b in zip(*loaders, strict=True):
        assert torch.equal(a.frames, b.frames)
