"""The pieces every source shares: catalog, retry policy, rate limiter, redaction, resumable download,
cache."""

from __future__ import annotations

import logging
import threading

import pytest
import requests
from fetch_servers import Fault, FixtureServer, Reply, write_catalog

from sapwood.data.sources.catalog import Catalog
from sapwood.data.sources.command import parse_overrides
from sapwood.data.sources.credentials import MissingCredentialError, Redactor, redacted_logging, require_env
from sapwood.data.sources.reliability import (
    HttpSession,
    RateLimiter,
    RetryPolicy,
    TransientError,
    is_transient,
    parse_retry_after,
    retry_after_seconds,
)
from sapwood.data.sources.storage import RequestCache, download, part_path
from sapwood.errors import ConfigError


def test_packaged_catalog_validates_and_names_its_credentials():
    catalog = Catalog.load()
    assert {"nasa-exoplanets", "gaia-dr3", "eso-obscore", "mast-jwst-trappist1", "cds-era5-single-levels",
            "ncbi-pubmed-exoplanets", "s3-era5-pds"} <= set(catalog.names)
    protocols = {catalog.get(n).protocol for n in catalog.names}
    assert protocols == {"tap", "mast", "cds", "ncbi", "s3"}
    assert catalog.get("cds-era5-single-levels").credentials == ["CDSAPI_KEY"]
    assert catalog.get("ncbi-pubmed-exoplanets").credentials == ["NCBI_API_KEY"]
    assert catalog.get("nasa-exoplanets").adql().startswith("SELECT pl_name")


def test_user_catalog_adds_and_overrides_field_by_field(tmp_path, monkeypatch):
    mine = write_catalog(
        tmp_path / "mine.yaml",
        {
            "nasa-exoplanets": {"endpoint": "http://127.0.0.1:9/TAP"},
            "my-bucket": {
                "protocol": "s3", "endpoint": "http://minio.local:9000", "bucket": "runs", "prefix": "a/",
            },
        },
    )
    monkeypatch.setenv("SAPWOOD_SOURCES", str(mine))
    catalog = Catalog.load()
    exoplanets = catalog.get("nasa-exoplanets")
    assert exoplanets.endpoint == "http://127.0.0.1:9/TAP" and exoplanets.query.startswith("SELECT")  # kept
    assert catalog.get("my-bucket").bucket == "runs"


@pytest.mark.parametrize("overrides, message", [
    ({"maxrec": -1}, "source 'nasa-exoplanets': maxrec=-1: Input should be greater than or equal to 1"),
    ({"format": "xlsx"}, "source 'nasa-exoplanets': format='xlsx'"),
    ({"protocol": "ftp"}, "protocol='ftp'; allowed: tap, mast, cds, ncbi, s3"),
    ({"colour": "red"}, "colour='red': Extra inputs are not permitted"),
])
def test_bad_fields_are_one_line_errors_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as raised:
        Catalog.load().get("nasa-exoplanets", overrides)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_unknown_source_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match="did you mean 'nasa-exoplanets'"):
        Catalog.load().get("nasa-exoplanet")


def test_set_and_request_overrides(tmp_path):
    request = tmp_path / "r.yaml"
    request.write_text("dataset: reanalysis-era5-pressure-levels\nrequest: {variable: [temperature]}\n")
    assert parse_overrides(request, ["maxrec=5", "query=SELECT 1"]) == {
        "dataset": "reanalysis-era5-pressure-levels", "request": {"variable": ["temperature"]}, "maxrec": 5,
        "query": "SELECT 1"}
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_overrides(None, ["maxrec"])


def test_retry_after_header_forms():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert parse_retry_after("soon") is None
    response = requests.Response()
    response.status_code, response.headers["Retry-After"] = 429, "9"
    wrapped = RuntimeError("client wrapper")
    wrapped.__cause__ = requests.HTTPError("429", response=response)
    assert retry_after_seconds(wrapped) == 9.0 and is_transient(wrapped)
    botocore_style = Exception("SlowDown")
    botocore_style.response = {
        "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": {"retry-after": "2"}}
    }
    assert retry_after_seconds(botocore_style) == 2.0 and is_transient(botocore_style)


def test_policy_waits_follow_retry_after_capped_or_jittered_backoff():
    policy = RetryPolicy(backoff=0.5, max_wait=10.0)
    assert policy.wait_seconds(1, TransientError("x", retry_after=3)) == 3
    assert policy.wait_seconds(1, TransientError("x", retry_after=3600)) == 10.0
    for attempt in range(1, 6):
        waits = [policy.wait_seconds(attempt, TransientError("x")) for _ in range(200)]
        assert all(0 <= w <= min(10.0, 0.5 * 2 ** (attempt - 1)) for w in waits)
        assert len(set(waits)) > 100  # jittered, not a fixed schedule


def test_policy_reraises_permanent_errors_at_once_and_transient_ones_after_the_last_attempt():
    calls, slept = [], []
    policy = RetryPolicy(attempts=3, backoff=0.0, sleep=slept.append)

    def permanent():
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(ValueError):
        policy.call("x", permanent)
    assert len(calls) == 1 and slept == []

    def transient():
        calls.append(1)
        raise TransientError("HTTP 503")

    with pytest.raises(TransientError):
        policy.call("x", transient)
    assert len(calls) == 4 and len(slept) == 2


def test_policy_from_environment(monkeypatch):
    monkeypatch.setenv("SAPWOOD_FETCH_ATTEMPTS", "2")
    monkeypatch.setenv("SAPWOOD_FETCH_BACKOFF", "0.05")
    policy = RetryPolicy.from_environment()
    assert (policy.attempts, policy.backoff) == (2, 0.05)
    monkeypatch.setenv("SAPWOOD_FETCH_BACKOFF", "fast")
    with pytest.raises(Exception, match="SAPWOOD_FETCH_BACKOFF='fast' is not a number"):
        RetryPolicy.from_environment()


def test_rate_limiter_spaces_requests_evenly():
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(3.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        limiter.acquire()
    assert slept == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    now[0] += 10  # idle time is not banked into a burst
    limiter.acquire()
    limiter.acquire()
    assert slept[-1] == pytest.approx(1 / 3) and len(slept) == 4


def test_rate_limiter_gives_concurrent_threads_distinct_slots():
    limiter = RateLimiter(10.0, clock=lambda: 0.0, sleep=lambda s: None)
    delays = []
    threads = [threading.Thread(target=lambda: delays.append(limiter.acquire())) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(delays) == pytest.approx([i / 10 for i in range(12)])


def test_redactor_and_log_records_of_any_logger(monkeypatch):
    monkeypatch.setenv("NCBI_API_KEY", "s3cr3t/value+1")
    redactor = Redactor.from_environment()
    assert (
        redactor("GET /efetch?api_key=s3cr3t%2Fvalue%2B1 and s3cr3t/value+1")
        == "GET /efetch?api_key=*** and ***"
    )
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    logger = logging.getLogger("some.client")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with redacted_logging(redactor):
            logger.debug("request %s", "https://x/?api_key=s3cr3t%2Fvalue%2B1")
            try:
                raise RuntimeError("token s3cr3t/value+1 rejected")
            except RuntimeError:
                logger.exception("failed")
        logger.debug("after: %s", "plain")
    finally:
        logger.removeHandler(handler)
    assert lines[0] == "request https://x/?api_key=***" and "s3cr3t" not in "\n".join(lines)
    assert "token *** rejected" in lines[1] and lines[2] == "after: plain"


def test_missing_variable_is_named():
    with pytest.raises(MissingCredentialError, match="set the environment variable SAPWOOD_TEST_UNSET_TOKEN"):
        require_env("SAPWOOD_TEST_UNSET_TOKEN", "somewhere")


@pytest.fixture
def blob_server():
    data = bytes(i % 253 for i in range(200_000))
    server = FixtureServer(lambda request: Reply(200, data, {"ETag": '"v1"'}, ranges=True))
    yield server, data
    server.close()


def dropped_download(server, path: str, dest, size: int) -> HttpSession:
    """Start downloading ``path`` to ``dest`` while the server drops the connection half-way through the body
    (a ``.part`` file is left); returns the session to continue with."""
    session = HttpSession(RateLimiter(0), timeout=10)
    server.plan.add(Fault("drop", path, keep=0.5))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        download(session, f"{server.url}{path}", dest, expected_size=size)
    return session


def test_download_resumes_a_part_file_and_verifies_the_checksum(tmp_path, blob_server):
    import hashlib

    server, data = blob_server
    dest = tmp_path / "blob.bin"
    session = dropped_download(server, "/blob", dest, len(data))
    on_disk = part_path(dest).stat().st_size
    assert not dest.exists() and 0 < on_disk <= 100_000  # a .part, never the final name
    download(session, f"{server.url}/blob", dest, expected_size=len(data),
             checksum=("sha256", hashlib.sha256(data).hexdigest()))
    assert dest.read_bytes() == data and not part_path(dest).exists()
    assert server.log[-1].headers["range"] == f"bytes={on_disk}-"  # only the missing bytes were asked for


def test_download_with_a_wrong_checksum_discards_the_bytes(tmp_path, blob_server):
    server, data = blob_server
    dest = tmp_path / "blob.bin"
    with pytest.raises(TransientError, match="does not match"):
        download(HttpSession(RateLimiter(0), 10), f"{server.url}/blob", dest, checksum=("md5", "0" * 32))
    assert not dest.exists() and not part_path(dest).exists()


def test_cache_records_are_written_after_the_files_and_never_serve_changed_files(tmp_path):
    cache = RequestCache(tmp_path)
    data = tmp_path / "a.csv"
    data.write_text("x\n1\n")
    assert cache.lookup({"q": 1}) is None
    cache.store({"q": 1}, [data])
    assert cache.lookup({"q": 1}) == [data] and cache.lookup({"q": 2}) is None
    data.write_text("y\n2\n")  # same size, rewritten
    assert cache.lookup({"q": 1}) is None
    data.unlink()
    assert cache.lookup({"q": 1}) is None


def test_a_part_from_another_origin_is_never_spliced(tmp_path, blob_server):
    server, data = blob_server
    dest = tmp_path / "blob.bin"
    session = dropped_download(server, "/job-a", dest, len(data))
    assert part_path(dest).stat().st_size > 0
    download(session, f"{server.url}/job-b", dest, expected_size=len(data))  # e.g. a resubmitted CDS job
    assert "range" not in server.log[-1].headers and dest.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_s3_keys_land_below_the_prefix_folder(tmp_path):
    from sapwood.data.sources.s3 import local_path

    assert local_path(tmp_path, "2020/01/data/air_pressure", "2020/01/data/air_pressure_at_msl.nc") == \
        tmp_path / "air_pressure_at_msl.nc"
    assert local_path(tmp_path, "era5/", "era5/2020/01/t2m.nc") == tmp_path / "2020" / "01" / "t2m.nc"
    assert local_path(tmp_path, "", "a/../../b.nc") == tmp_path / "a" / "b.nc"  # never outside the folder
