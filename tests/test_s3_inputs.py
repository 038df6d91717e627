"""``sapwood prepare s3://...``: Zarr v3 and v2 stores written by xarray, served by moto's S3 server on
loopback and read through s3fs, give the same store as their local copies; failures are one line without
credentials."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from sapwood.cli import main
from sapwood.data.cubes import prepare
from sapwood.data.store import FRAMES_FILE, GRID_FILE, INDEX_FILE, CubeStore

KEY_ID = "loopback-test-key-id"
SECRET = "loopback/secret/key/for/moto/0123456789"
BUCKET = "cf-cubes"


def cf_dataset(member: int, months: int = 14) -> xr.Dataset:
    """CF conventions as climate models write them: noleap monthly times, pressure levels bottom-up in Pa,
    latitude north to south, a land mask as _FillValue in one variable, int16 packing in another."""
    rng = np.random.default_rng([member, months])
    lat = np.linspace(80, -80, 6)
    lon = np.arange(0, 360, 30.0)
    plev = np.asarray([100000.0, 70000.0, 30000.0])
    days = np.cumsum([15] + [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] * 2)[:months].astype(float)
    ta = 250 + 20 * rng.standard_normal((months, 3, 6, 12))
    tos = 290 + rng.standard_normal((months, 6, 12))
    tos[:, 2:4, 3:7] = np.nan  # land
    ps = 100000 + 500 * rng.standard_normal((months, 6, 12))
    ds = xr.Dataset(
        {
            "ta": (("time", "plev", "lat", "lon"), ta, {"standard_name": "air_temperature", "units": "K"}),
            "tos": (("time", "lat", "lon"), tos, {"standard_name": "sea_surface_temperature", "units": "K"}),
            "ps": (("time", "lat", "lon"), ps, {"standard_name": "surface_air_pressure", "units": "Pa"}),
        },
        coords={
            "time": (
                "time",
                days,
                {
                    "units": "days since 1850-01-01", "calendar": "noleap", "axis": "T",
                    "standard_name": "time",
                },
            ),
            "plev": (
                "plev",
                plev,
                {"units": "Pa", "axis": "Z", "positive": "down", "standard_name": "air_pressure"},
            ),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "axis": "X"}),
        },
        attrs={"Conventions": "CF-1.7", "source_id": "TOY", "variant_label": f"r{member}i1p1f1"},
    )
    ds["tos"].encoding = {"_FillValue": np.float32(1e20), "dtype": "float32"}
    ds["ps"].encoding = {
        "dtype": "int16", "scale_factor": 0.5, "add_offset": 100000.0, "_FillValue": np.int16(-32767),
    }
    return ds


@pytest.fixture(scope="module")
def local_stores(tmp_path_factory) -> dict[str, Path]:
    """One Zarr v3 store (not consolidated) and one Zarr v2 store (consolidated), written by xarray."""
    folder = tmp_path_factory.mktemp("zarr-inputs")
    v3, v2 = folder / "member1.zarr", folder / "member2.zarr"
    cf_dataset(1).to_zarr(v3, zarr_format=3, consolidated=False)
    cf_dataset(2).to_zarr(v2, zarr_format=2, consolidated=True)
    assert (v3 / "zarr.json").exists() and (v2 / ".zmetadata").exists()
    return {"v3": v3, "v2": v2}


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path, moto_endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_NO_SIGN_REQUEST"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(aws_env, moto_endpoint, local_stores, request):
    """A fresh bucket holding both stores under ``cubes/``; returns (client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"{BUCKET}-{request.node.name.lower().replace('_', '-')[-30:].strip('-')}"
    client.create_bucket(Bucket=name)
    for path in local_stores.values():
        upload(client, name, path, f"cubes/{path.name}")
    return client, name


def upload(client, bucket: str, folder: Path, prefix: str) -> None:
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(folder).as_posix()}")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), " ".join(captured.out.split()), captured.err


def comparable_index(store: Path) -> dict:
    """The index without what names the inputs (paths, URLs and their fingerprint) or the files' checksums."""
    index = json.loads((store / INDEX_FILE).read_text())
    for key in ("fingerprint", "files", "skipped"):
        index.pop(key)
    for run in index["runs"]:
        run.pop("source"), run.pop("sources")
    return index


def test_zarr_v3_and_v2_on_s3_prepare_like_their_local_copies(tmp_path, bucket, local_stores, capsys):
    client, name = bucket
    urls = [f"s3://{name}/cubes/member1.zarr", f"s3://{name}/cubes/member2.zarr"]
    code, out, err = run_cli(["prepare", *urls, "--out", str(tmp_path / "from-s3")], capsys)
    assert code == 0, err
    assert "2 inputs used, 0 skipped, 2 runs, 28 frames" in out, out
    local = prepare([local_stores["v3"], local_stores["v2"]], tmp_path / "from-disk", progress=False)
    assert local.runs == 2 and not local.problems
    assert (tmp_path / "from-s3" / FRAMES_FILE).read_bytes() == (
        tmp_path / "from-disk" / FRAMES_FILE
    ).read_bytes()
    assert comparable_index(tmp_path / "from-s3") == comparable_index(tmp_path / "from-disk")
    with np.load(tmp_path / "from-s3" / GRID_FILE) as a, np.load(tmp_path / "from-disk" / GRID_FILE) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    store = CubeStore(tmp_path / "from-s3")
    assert [r["sources"] for r in store.index["runs"]] == [[urls[0]], [urls[1]]]
    assert store.index["mask"]["tos"]["masked_cells"] == 8
    truth = cf_dataset(2)
    np.testing.assert_allclose(
        store.read_rows(int(store.run_rows[1]), 14)[:, store.channel_slice("ta")].numpy(),
        truth.ta.values[:, ::-1, ::-1].astype(np.float32),
        rtol=1e-6,
    )

    code, out, _ = run_cli(["prepare", *urls, "--out", str(tmp_path / "from-s3")], capsys)
    assert code == 0 and "up to date (2 inputs)" in out  # the listing (keys, sizes, ETags) is unchanged
    cf_dataset(3).to_zarr(tmp_path / "new.zarr", zarr_format=3, consolidated=False)
    upload(client, name, tmp_path / "new.zarr", "cubes/member1.zarr")  # new contents under the same keys
    code, out, _ = run_cli(["prepare", *urls, "--out", str(tmp_path / "from-s3")], capsys)
    assert code == 0 and "up to date" not in out and "2 inputs used" in out
    rebuilt = CubeStore(tmp_path / "from-s3")
    np.testing.assert_allclose(
        rebuilt.read_rows(0, 14)[:, rebuilt.channel_slice("ta")].numpy(),
        cf_dataset(3).ta.values[:, ::-1, ::-1].astype(np.float32),
        rtol=1e-6,
    )


def test_a_prefix_takes_every_zarr_store_under_it(tmp_path, bucket):
    _, name = bucket
    report = prepare([f"s3://{name}/cubes/"], tmp_path / "store", progress=False)
    assert [str(p) for p in report.used] == [
        f"s3://{name}/cubes/member1.zarr",
        f"s3://{name}/cubes/member2.zarr",
    ]
    assert report.runs == 2 and report.rows == 28


def one_line_without_secrets(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert SECRET not in err and KEY_ID not in err
    return err


def test_missing_credentials_name_the_variables(tmp_path, bucket, capsys, monkeypatch):
    _, name = bucket
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _, err = run_cli(
        ["prepare", f"s3://{name}/cubes/member1.zarr", "--out", str(tmp_path / "s")], capsys
    )
    assert code == 2 and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in one_line_without_secrets(err)
    assert not (tmp_path / "s").exists()


def test_unreachable_endpoint_is_one_line(tmp_path, aws_env, capsys, monkeypatch):
    with socket.socket() as bound:  # bound but not listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{bound.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        code, _, err = run_cli(["prepare", "s3://anything/x.zarr", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and f"endpoint {endpoint} unreachable" in one_line_without_secrets(err)


def test_missing_bucket_and_missing_store_are_one_line(tmp_path, bucket, capsys):
    _, name = bucket
    code, _, err = run_cli(["prepare", "s3://no-such-bucket/x.zarr", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "bucket 'no-such-bucket' does not exist" in one_line_without_secrets(err)
    code, _, err = run_cli(
        ["prepare", f"s3://{name}/cubes/absent.zarr", "--out", str(tmp_path / "s")], capsys
    )
    assert code == 2 and "nothing stored under this key" in one_line_without_secrets(err)
    code, _, err = run_cli(
        ["prepare", f"s3://{name}/cubes/member1.zarr/ta", "--out", str(tmp_path / "s")], capsys
    )
    assert code == 2  # an array, not a dataset: no usable input
    assert f"s3://{name}/cubes/member1.zarr/ta" in one_line_without_secrets(err)


def test_public_bucket_without_credentials_sends_unsigned_requests(
    tmp_path, bucket, moto_endpoint, monkeypatch
):
    from fetch_servers import FixtureServer, proxy_app

    client, name = bucket
    client.put_bucket_acl(Bucket=name, ACL="public-read")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page["Contents"]:
            client.put_object_acl(Bucket=name, Key=item["Key"], ACL="public-read")
    proxy = FixtureServer(proxy_app(int(moto_endpoint.rsplit(":", 1)[1])))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
        report = prepare([f"s3://{name}/cubes/member2.zarr"], tmp_path / "store", progress=False)
    finally:
        proxy.close()
    assert report.runs == 1 and report.rows == 14 and proxy.log
    assert all("authorization" not in request.headers for request in proxy.log)
