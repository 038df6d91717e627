"""TAP through pyvo against a loopback TAP 1.1 sync service: CSV/Parquet out, faults retried or reported."""

from __future__ import annotations

import csv
import math

import pytest
from fetch_servers import (
    EXOPLANET_COLUMNS,
    Fault,
    FixtureServer,
    assert_clean,
    exoplanet_rows,
    fast_policy,
    fetch_through_fault,
    tap_app,
    write_catalog,
)

from sapwood.data.sources import fetch_sources
from sapwood.errors import SapwoodError

QUERY = "SELECT pl_name, pl_rade, pl_bmasse, pl_insol FROM pscomppars WHERE pl_rade IS NOT NULL"


@pytest.fixture
def tap():
    server = FixtureServer(tap_app({"pscomppars": (EXOPLANET_COLUMNS, exoplanet_rows())}))
    yield server
    server.close()


@pytest.fixture
def catalog(tmp_path, tap):
    return write_catalog(
        tmp_path / "sources.yaml",
        {
            "loop-exoplanets": {
                "protocol": "tap", "endpoint": f"{tap.url}/TAP", "query": QUERY, "rate_limit": 0,
                "named_queries": {"small": "SELECT pl_name, pl_rade FROM pscomppars WHERE pl_rade < 1.2"},
            },
        },
    )


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sync_query_writes_csv_with_the_rows_and_columns_asked_for(tmp_path, tap, catalog):
    out = tmp_path / "out"
    [result] = fetch_sources(["loop-exoplanets"], out, [catalog], policy=fast_policy())
    assert result.files == [out / "loop-exoplanets.csv"] and not result.cached
    rows = read_csv(out / "loop-exoplanets.csv")
    assert list(rows[0]) == ["pl_name", "pl_rade", "pl_bmasse", "pl_insol"]
    expected = [r for r in exoplanet_rows() if r["pl_rade"] is not None]
    assert [r["pl_name"] for r in rows] == [r["pl_name"] for r in expected]
    assert float(rows[0]["pl_rade"]) == pytest.approx(1.116)
    assert rows[3]["pl_bmasse"] == ""  # Proxima Cen b has no mass: a null cell stays empty
    [request] = tap.requests_to("/sync")
    form = request.form()
    assert (form["REQUEST"], form["LANG"], form["QUERY"]) == ("doQuery", "ADQL", QUERY)
    assert_clean(out)


def test_named_query_and_parquet(tmp_path, tap, catalog):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    fetch_sources(
        ["loop-exoplanets"], out, [catalog], {"query": "small", "format": "parquet"}, policy=fast_policy()
    )
    table = pq.read_table(out / "loop-exoplanets.parquet").to_pylist()
    assert sorted(r["pl_name"] for r in table) == [
        "Proxima Cen b", "TRAPPIST-1 b", "TRAPPIST-1 e", "TRAPPIST-1 f",
    ]
    assert all(isinstance(r["pl_rade"], float) and math.isfinite(r["pl_rade"]) for r in table)


def test_rerun_is_served_by_the_cache_without_any_request(tmp_path, tap, catalog):
    out = tmp_path / "out"
    fetch_sources(["loop-exoplanets"], out, [catalog], policy=fast_policy())
    before = len(tap.log)
    [again] = fetch_sources(["loop-exoplanets"], out, [catalog], policy=fast_policy())
    assert again.cached and len(tap.log) == before
    # a different query is a different request
    fetch_sources(["loop-exoplanets"], out, [catalog], {"query": "small"}, policy=fast_policy())
    assert len(tap.log) == before + 1
    # a damaged output is not trusted: the request is fetched again
    (out / "loop-exoplanets.csv").write_text("pl_name\n")
    [repaired] = fetch_sources(["loop-exoplanets"], out, [catalog], {"query": "small"}, policy=fast_policy())
    [repaired] = fetch_sources(["loop-exoplanets"], out, [catalog], policy=fast_policy())
    assert not repaired.cached and len(read_csv(out / "loop-exoplanets.csv")) == 10
    assert_clean(out)


@pytest.mark.parametrize("fault", [
    Fault("status", "/sync", status=500), Fault("status", "/sync", status=503),
    Fault("hang", "/sync", seconds=2.5), Fault("drop", "/sync", keep=0.4), Fault("short", "/sync", keep=0.6),
], ids=["500", "503", "timeout", "dropped-mid-body", "truncated-votable"])
def test_transient_faults_are_retried_and_the_output_is_complete(tmp_path, tap, catalog, fault):
    out = tmp_path / "out"
    fetch_through_fault(tap, fault, "loop-exoplanets", out, catalog)
    if fault.kind != "hang":  # a stall may time out more than one request on a busy machine
        assert len(tap.requests_to("/sync")) == 2
    assert len(read_csv(out / "loop-exoplanets.csv")) == 10
    assert_clean(out)


def test_429_retry_after_is_honoured(tmp_path, tap, catalog):
    policy = fast_policy()
    tap.plan.add(Fault("status", "/sync", status=429, headers={"Retry-After": "7"}))
    fetch_sources(["loop-exoplanets"], tmp_path / "out", [catalog], policy=policy)
    assert policy.sleep.waits == [7.0]


def test_persistent_failure_is_reported_in_one_line_and_leaves_nothing(tmp_path, tap, catalog):
    out = tmp_path / "out"
    policy = fast_policy(attempts=3)
    tap.plan.add(*[Fault("status", "/sync", status=500)] * 3)
    with pytest.raises(SapwoodError) as raised:
        fetch_sources(["loop-exoplanets"], out, [catalog], policy=policy)
    message = str(raised.value)
    assert "loop-exoplanets" in message and "500" in message and "\n" not in message
    assert len(tap.requests_to("/sync")) == 3 and len(policy.sleep.waits) == 2
    assert not (out / "loop-exoplanets.csv").exists()
    assert not list(out.rglob("*.json"))  # no cache record for a request that failed
    assert_clean(out)


def test_backoff_grows_exponentially_with_jitter(tmp_path, tap, catalog):
    policy = fast_policy(attempts=4)
    policy.backoff = 1.0
    tap.plan.add(*[Fault("status", "/sync", status=502)] * 3)
    fetch_sources(["loop-exoplanets"], tmp_path / "out", [catalog], policy=policy)
    waits = policy.sleep.waits
    assert len(waits) == 3 and all(0 <= w <= 2 ** i for i, w in enumerate(waits))


def test_query_rejected_by_the_service_is_one_line_and_not_retried(tmp_path, tap, catalog):
    with pytest.raises(SapwoodError, match="rejected the query") as raised:
        fetch_sources(["loop-exoplanets"], tmp_path / "out", [catalog], {"query": "SELECT x FROM nowhere"},
                      policy=fast_policy())
    assert "\n" not in str(raised.value) and len(tap.requests_to("/sync")) == 1


def test_maxrec_truncation_is_reported_as_overflow(tmp_path, tap, catalog, caplog):
    out = tmp_path / "out"
    fetch_sources(["loop-exoplanets"], out, [catalog], {"maxrec": 3}, policy=fast_policy())
    assert tap.requests_to("/sync")[0].form()["MAXREC"] == "3"
    assert len(read_csv(out / "loop-exoplanets.csv")) == 3
    assert "truncated at the row limit (3 rows)" in caplog.text
