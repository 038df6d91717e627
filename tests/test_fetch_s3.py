"""S3-compatible stores through boto3 against moto's server (behind a fault-injecting proxy) on loopback."""

from __future__ import annotations

import hashlib

import pytest
from fetch_servers import (
    Fault,
    FixtureServer,
    assert_clean,
    fast_policy,
    fetch_through_fault,
    proxy_app,
    write_catalog,
)

from sapwood.data.sources import fetch_sources
from sapwood.data.sources.credentials import MissingCredentialError
from sapwood.errors import SapwoodError

BUCKET = "climate-runs"
OBJECTS = {
    "era5/2020/01/t2m.nc": bytes(hashlib.sha256(str(i).encode()).digest()[0] for i in range(120_000)),
    "era5/2020/01/sp.nc": bytes((i * 31) % 251 for i in range(70_000)),
    "era5/2020/01/readme.txt": b"not a cube",
    "era5/store.zarr/zarr.json": b'{"zarr_format": 3, "node_type": "group", "attributes": {}}',
    "era5/store.zarr/t2m/c/0/0": bytes(range(256)) * 40, "other/skip.nc": b"outside the prefix",
}


@pytest.fixture(scope="module")
def moto_port():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "loopback-test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "loopback/secret/key/for/moto/0123456789")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture
def s3(moto_port, aws_env):
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1")
    bucket = f"{BUCKET}-{hashlib.md5(str(id(client)).encode()).hexdigest()[:8]}"
    client.create_bucket(Bucket=bucket)
    for key, data in OBJECTS.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    proxy = FixtureServer(proxy_app(moto_port))
    yield proxy, client, bucket
    proxy.close()


@pytest.fixture
def catalog(tmp_path, s3):
    proxy, _, bucket = s3
    return write_catalog(tmp_path / "sources.yaml", {
        "loop-s3": {"protocol": "s3", "endpoint": proxy.url, "bucket": bucket, "prefix": "era5/",
                    "suffixes": [".nc", ".zarr"], "rate_limit": 0, "concurrency": 3}})


def object_gets(proxy, bucket):
    return [r for r in proxy.log if r.method == "GET" and r.path.startswith(f"/{bucket}/")]


def expected_files(out):
    return {out / "loop-s3" / key.removeprefix("era5/"): data for key, data in OBJECTS.items()
            if key.startswith("era5/") and not key.endswith(".txt")}


def test_prefix_is_mirrored_with_zarr_stores_whole_and_verified(tmp_path, s3, catalog, monkeypatch):
    from sapwood.data.sources.reliability import RateLimiter

    proxy, _, bucket = s3
    out = tmp_path / "mirror"
    acquisitions = []
    original = RateLimiter.acquire
    monkeypatch.setattr(RateLimiter, "acquire", lambda self: acquisitions.append(1) or original(self))
    [result] = fetch_sources(["loop-s3"], out, [catalog], policy=fast_policy())
    assert len(acquisitions) == len(proxy.log) == 5  # a listing and four objects, each through the limiter
    expected = expected_files(out)
    assert sorted(result.files) == sorted(expected)
    for path, data in expected.items():
        assert path.read_bytes() == data
    assert not (out / "loop-s3" / "2020" / "01" / "readme.txt").exists()
    assert_clean(out)
    before = len(proxy.log)
    [again] = fetch_sources(["loop-s3"], out, [catalog], policy=fast_policy())
    assert again.cached and len(proxy.log) == before  # a rerun sends no request at all


def test_refresh_downloads_only_new_or_changed_objects(tmp_path, s3, catalog):
    proxy, client, bucket = s3
    out = tmp_path / "mirror"
    fetch_sources(["loop-s3"], out, [catalog], policy=fast_policy())
    client.put_object(Bucket=bucket, Key="era5/2020/01/sp.nc", Body=b"a new version of sp")
    client.put_object(Bucket=bucket, Key="era5/2020/02/t2m.nc", Body=b"february")
    gets = len(object_gets(proxy, bucket))
    fetch_sources(["loop-s3"], out, [catalog], refresh=True, policy=fast_policy())
    assert len(object_gets(proxy, bucket)) == gets + 2
    assert (out / "loop-s3" / "2020" / "01" / "sp.nc").read_bytes() == b"a new version of sp"
    assert (out / "loop-s3" / "2020" / "02" / "t2m.nc").read_bytes() == b"february"
    assert_clean(out)


def test_object_dropped_mid_transfer_resumes_with_a_range(tmp_path, s3, catalog):
    proxy, _, bucket = s3
    out = tmp_path / "mirror"
    proxy.plan.add(Fault("drop", "/t2m.nc", keep=0.5))
    fetch_sources(["loop-s3"], out, [catalog], {"concurrency": 1}, policy=fast_policy())
    first, second = [r for r in object_gets(proxy, bucket) if r.path.endswith("01/t2m.nc")]
    assert "range" not in first.headers and second.headers["range"].startswith("bytes=")
    start = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 60_000 and second.headers["if-match"].strip('"')
    assert (out / "loop-s3" / "2020" / "01" / "t2m.nc").read_bytes() == OBJECTS["era5/2020/01/t2m.nc"]
    assert_clean(out)


@pytest.mark.parametrize("fault", [
    Fault("status", f"/{BUCKET}", status=500), Fault("status", "/sp.nc", status=503),
    Fault("status", "/sp.nc", status=429, headers={"Retry-After": "5"}), Fault("hang", "/sp.nc", seconds=2.5),
    Fault("short", "/t2m.nc", keep=0.25),
], ids=["list-500", "get-503", "get-429", "get-timeout", "get-truncated-body"])
def test_faults_are_retried_and_nothing_corrupt_is_left(tmp_path, s3, catalog, fault):
    proxy, _, bucket = s3
    out = tmp_path / "mirror"
    fetch_through_fault(proxy, fault, "loop-s3", out, catalog)
    for path, data in expected_files(out).items():
        assert path.read_bytes() == data
    assert_clean(out)


def test_failed_object_leaves_no_file_and_no_record_then_a_rerun_completes(tmp_path, s3, catalog):
    proxy, _, bucket = s3
    out = tmp_path / "mirror"
    proxy.plan.add(*[Fault("status", "/sp.nc", status=500)] * 2)
    with pytest.raises(SapwoodError, match="500"):
        fetch_sources(["loop-s3"], out, [catalog], policy=fast_policy(attempts=2))
    assert not (out / "loop-s3" / "2020" / "01" / "sp.nc").exists()
    assert_clean(out, after_failure=True)
    fetch_sources(["loop-s3"], out, [catalog], policy=fast_policy())
    gets_for = [r.path for r in object_gets(proxy, bucket)]
    assert gets_for.count(f"/{bucket}/era5/2020/01/t2m.nc") == 1  # completed objects are not fetched again
    assert (out / "loop-s3" / "2020" / "01" / "sp.nc").read_bytes() == OBJECTS["era5/2020/01/sp.nc"]


def test_missing_credentials_name_the_variables(tmp_path, s3, catalog, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(MissingCredentialError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as raised:
        fetch_sources(["loop-s3"], tmp_path / "mirror", [catalog], policy=fast_policy())
    assert "\n" not in str(raised.value)


def test_anonymous_access_sends_unsigned_requests(tmp_path, s3, catalog, monkeypatch):
    proxy, client, bucket = s3
    client.put_bucket_acl(Bucket=bucket, ACL="public-read")
    for key in OBJECTS:
        if key.startswith("era5/2020/"):
            client.put_object_acl(Bucket=bucket, Key=key, ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fetch_sources(["loop-s3"], tmp_path / "mirror", [catalog], {"anonymous": True, "prefix": "era5/2020/"},
                  policy=fast_policy())
    assert all("authorization" not in r.headers for r in proxy.log)
    assert (tmp_path / "mirror" / "loop-s3" / "01" / "sp.nc").read_bytes() == OBJECTS["era5/2020/01/sp.nc"]


def test_fetched_netcdf_runs_go_through_prepare(tmp_path, s3, catalog):
    from sapwood.data.cubes import prepare
    from sapwood.data.simulate import Grid, simulate_ensemble

    proxy, client, bucket = s3
    runs = simulate_ensemble(
        tmp_path / "sim", runs=2, grid=Grid(levels=2, nlat=8, nlon=16, times=3, spinup_days=1), seed=2,
        progress=False,
    )
    for path in runs:
        client.upload_file(str(path), bucket, f"ensembles/e1/{path.name}")
    out = tmp_path / "cubes"
    fetch_sources(["loop-s3"], out, [catalog], {"prefix": "ensembles/e1/"}, policy=fast_policy())
    assert sorted(p.name for p in (out / "loop-s3").iterdir()) == ["run_0000.nc", "run_0001.nc"]
    report = prepare([out / "loop-s3"], tmp_path / "store", progress=False)
    assert len(report.used) == 2 and report.rows == 2 * 3 and not report.problems
