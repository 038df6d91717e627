"""MAST through astroquery.mast against a loopback portal API: criteria query, products, downloads, token."""

from __future__ import annotations

import csv

import pytest
from fetch_servers import (
    Fault,
    FixtureServer,
    assert_clean,
    fast_policy,
    fetch_through_fault,
    mast_app,
    write_catalog,
)

from sapwood.data.sources import fetch_sources
from sapwood.errors import SapwoodError

OBSERVATIONS = [
    {
        "obsid": "87600001", "obs_id": "jw02589-o001_t001_nirspec", "obs_collection": "JWST",
        "target_name": "TRAPPIST-1", "dataproduct_type": "spectrum", "instrument_name": "NIRSPEC/SLIT",
        "t_min": 60000.1,
    },
    {
        "obsid": "87600002", "obs_id": "jw02589-o002_t001_niriss", "obs_collection": "JWST",
        "target_name": "TRAPPIST-1", "dataproduct_type": "spectrum", "instrument_name": "NIRISS/SOSS",
        "t_min": 60001.2,
    },
    {
        "obsid": "87600003", "obs_id": "hst_15304_01", "obs_collection": "HST", "target_name": "TRAPPIST-1",
        "dataproduct_type": "image", "instrument_name": "WFC3/IR", "t_min": 58000.0,
    },
]


def product(obsid: str, name: str, subgroup: str, size: int) -> dict:
    return {
        "obsID": obsid, "obs_collection": "JWST", "dataproduct_type": "spectrum", "productType": "SCIENCE",
        "productGroupDescription": "Minimum Recommended Products", "productSubGroupDescription": subgroup,
        "dataURI": f"mast:JWST/product/{name}", "productFilename": name, "size": size, "calib_level": 3,
    }


FILES = {
    f"mast:JWST/product/{n}": bytes((i * 7 + len(n)) % 256 for i in range(size))
    for n, size in [
        ("jw02589-o001_x1d.fits", 40_000),
        ("jw02589-o001_cal.fits", 90_000),
        ("jw02589-o002_x1d.fits", 55_000),
    ]
}
PRODUCTS = [product("87600001", "jw02589-o001_x1d.fits", "X1D", 40_000),
            product("87600001", "jw02589-o001_cal.fits", "CAL", 90_000),
            product("87600002", "jw02589-o002_x1d.fits", "X1D", 55_000)]
TOKEN = "loopback-mast-token-77aa"


@pytest.fixture
def mast():
    server = FixtureServer(mast_app(OBSERVATIONS, PRODUCTS, FILES, token=TOKEN))
    yield server
    server.close()


@pytest.fixture
def catalog(tmp_path, mast, monkeypatch):
    monkeypatch.delenv("MAST_API_TOKEN", raising=False)
    return write_catalog(tmp_path / "sources.yaml", {
        "loop-mast": {"protocol": "mast", "endpoint": mast.url, "rate_limit": 0, "concurrency": 3,
                      "credentials": ["MAST_API_TOKEN"],
                      "criteria": {"obs_collection": "JWST", "target_name": "TRAPPIST-1"},
                      "product_filters": {"productSubGroupDescription": "X1D"}}})


def test_criteria_products_and_downloads(tmp_path, mast, catalog):
    out = tmp_path / "mast"
    [result] = fetch_sources(["loop-mast"], out, [catalog], policy=fast_policy())
    folder = out / "loop-mast"
    for name in ("jw02589-o001_x1d.fits", "jw02589-o002_x1d.fits"):
        assert (folder / name).read_bytes() == FILES[f"mast:JWST/product/{name}"]
    assert not (folder / "jw02589-o001_cal.fits").exists()  # filtered out
    with open(folder / "observations.csv", newline="") as handle:
        assert sorted(r["obs_id"] for r in csv.DictReader(handle)) == ["jw02589-o001_t001_nirspec",
                                                                         "jw02589-o002_t001_niriss"]
    invoke = [r.form()["request"] for r in mast.requests_to("/api/v0/invoke")]
    assert any('"Mast.Caom.Filtered"' in r for r in invoke) and any(
        '"Mast.Caom.Products"' in r for r in invoke
    )
    assert len(result.files) == 4 and mast.requests_to("/whoami") == []  # no token: anonymous
    assert_clean(out)
    before = len(mast.log)
    assert (
        fetch_sources(["loop-mast"], out, [catalog], policy=fast_policy())[0].cached
        and len(mast.log) == before
    )


def test_refresh_requeries_but_downloads_only_what_is_missing(tmp_path, mast, catalog):
    out = tmp_path / "mast"
    fetch_sources(["loop-mast"], out, [catalog], policy=fast_policy())
    (out / "loop-mast" / "jw02589-o002_x1d.fits").unlink()
    downloads = len(mast.requests_to("/Download/file"))
    fetch_sources(["loop-mast"], out, [catalog], refresh=True, policy=fast_policy())
    assert len(mast.requests_to("/Download/file")) == downloads + 1
    assert (out / "loop-mast" / "jw02589-o002_x1d.fits").read_bytes() == FILES[
        "mast:JWST/product/jw02589-o002_x1d.fits"
    ]


def test_token_from_the_environment_logs_the_session_in(tmp_path, mast, catalog, monkeypatch):
    monkeypatch.setenv("MAST_API_TOKEN", TOKEN)
    fetch_sources(["loop-mast"], tmp_path / "mast", [catalog], policy=fast_policy())
    [whoami] = mast.requests_to("/whoami")
    assert f"mast_token={TOKEN}" in whoami.headers["cookie"]
    assert all(
        f"mast_token={TOKEN}" in r.headers.get("cookie", "") for r in mast.requests_to("/Download/file")
    )
    monkeypatch.setenv("MAST_API_TOKEN", "an-invalid-token-123")
    with pytest.raises(SapwoodError, match="invalid") as raised:
        fetch_sources(["loop-mast"], tmp_path / "mast2", [catalog], policy=fast_policy())
    assert "an-invalid-token-123" not in str(raised.value)


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", "/columnsconfig", status=500),
        Fault("status", "/api/v0/invoke", status=429, headers={"Retry-After": "4"}),
        Fault("short", "/api/v0/invoke", keep=0.5), Fault("hang", "/api/v0/invoke", seconds=2.5),
        Fault("drop", "/Download/file", keep=0.5), Fault("status", "/Download/file", status=503),
    ],
    ids=[
        "colconfig-500", "invoke-429", "invoke-truncated-json", "invoke-timeout", "download-dropped",
        "download-503",
    ],
)
def test_faults_are_retried(tmp_path, mast, catalog, fault):
    out = tmp_path / "mast"
    fetch_through_fault(mast, fault, "loop-mast", out, catalog)
    for name in ("jw02589-o001_x1d.fits", "jw02589-o002_x1d.fits"):
        assert (out / "loop-mast" / name).read_bytes() == FILES[f"mast:JWST/product/{name}"]
    assert_clean(out)


def test_no_match_and_too_many_products_are_one_line_errors(tmp_path, mast, catalog):
    with pytest.raises(SapwoodError, match="no MAST observations"):
        fetch_sources(["loop-mast"], tmp_path / "m", [catalog], {"criteria": {"target_name": "WASP-39"}},
                      policy=fast_policy())
    with pytest.raises(SapwoodError, match="max_products=1"):
        fetch_sources(["loop-mast"], tmp_path / "m", [catalog], {"max_products": 1}, policy=fast_policy())


def test_downloads_run_at_most_concurrency_at_a_time_and_each_waits_for_the_rate_limiter(tmp_path, catalog,
                                                                                           monkeypatch):
    import threading
    import time

    from sapwood.data.sources.reliability import RateLimiter

    files = {f"mast:JWST/product/f{i}_x1d.fits": bytes([i]) * 5000 for i in range(8)}
    products = [product("87600001", f"f{i}_x1d.fits", "X1D", 5000) for i in range(8)]
    inner = mast_app(OBSERVATIONS, products, files)
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def app(request):
        if "Download" not in request.path:
            return inner(request)
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return inner(request)

    acquisitions = []
    original = RateLimiter.acquire
    monkeypatch.setattr(RateLimiter, "acquire", lambda self: acquisitions.append(1) or original(self))
    server = FixtureServer(app)
    try:
        fetch_sources(["loop-mast"], tmp_path / "m", [catalog], {"endpoint": server.url, "concurrency": 3},
                      policy=fast_policy())
    finally:
        server.close()
    assert len(server.requests_to("/Download/file")) == 8 and 1 <= peak[0] <= 3
    assert len(acquisitions) == len(server.log)
