"""`sapwood fetch` end to end as a user runs it: exit codes, one-line errors, no credential in any output,
and a fetched exoplanet catalog driving `sapwood simulate --planets`."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
import xarray as xr
from fetch_servers import (
    EXOPLANET_COLUMNS,
    Fault,
    FixtureServer,
    eutils_app,
    exoplanet_rows,
    pubmed_records,
    tap_app,
    write_catalog,
)

NCBI_SECRET = "ncbi-SECRET-9f8e7d6c5b"
CDS_SECRET = "cds-SECRET-0a1b2c3d4e"


def sapwood(*args, env_extra=None, unset=()):
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update({"SAPWOOD_FETCH_BACKOFF": "0.01", "SAPWOOD_FETCH_ATTEMPTS": "3", "SAPWOOD_FETCH_TIMEOUT": "20",
                **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "sapwood.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


HELD_PORTS: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port that refuses connections for the rest of the session: bound here (so no other
    process's server or outgoing connection can take it) and never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    HELD_PORTS.append(sock)
    return sock.getsockname()[1]


def test_a_credential_in_the_environment_never_appears_in_logs_or_errors(tmp_path):
    eutils = FixtureServer(eutils_app(pubmed_records(6)))
    try:
        catalog = write_catalog(
            tmp_path / "sources.yaml",
            {
                "loop-pubmed": {
                    "protocol": "ncbi", "endpoint": f"{eutils.url}/entrez/eutils", "term": "exoplanet",
                    "retmax": 10, "batch_size": 3, "credentials": ["NCBI_API_KEY"],
                },
                "dead-pubmed": {
                    "protocol": "ncbi", "endpoint": f"http://127.0.0.1:{closed_port()}/entrez/eutils",
                    "term": "exoplanet", "credentials": ["NCBI_API_KEY"],
                },
            },
        )
        eutils.plan.add(Fault("status", "esearch", status=500), Fault("drop", "efetch", keep=0.5),
                        Fault("status", "efetch", status=429, headers={"Retry-After": "0"}))
        secrets = {"NCBI_API_KEY": NCBI_SECRET, "CDSAPI_KEY": CDS_SECRET}
        ok = sapwood("fetch", "loop-pubmed", "--out", str(tmp_path / "corpus"), "--catalog", str(catalog),
                     "--verbose", env_extra=secrets)
        assert ok.returncode == 0, ok.stderr
        assert "api_key=***" in ok.stderr and "attempt 1/3 failed" in ok.stderr  # the requests were logged
        assert (
            eutils.requests_to("esearch")[-1].query["api_key"] == NCBI_SECRET
        )  # and the key was really used
        failed = sapwood("fetch", "dead-pubmed", "--out", str(tmp_path / "c2"), "--catalog", str(catalog),
                         "--verbose", env_extra=secrets)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr
        error_line = failed.stderr.strip().splitlines()[-1]
        assert (
            error_line.startswith("error: source 'dead-pubmed'") and "api_key=***" in error_line
        )  # URL redacted
        for run in (ok, failed):
            assert NCBI_SECRET not in run.stdout + run.stderr and CDS_SECRET not in run.stdout + run.stderr
    finally:
        eutils.close()


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    from sapwood.cli import main

    with pytest.raises(SystemExit) as raised:
        main(list(args))
    captured = capsys.readouterr()
    return raised.value.code, captured.out, captured.err


@pytest.fixture
def fast_env(monkeypatch):
    for name, value in {"SAPWOOD_FETCH_BACKOFF": "0.01", "SAPWOOD_FETCH_ATTEMPTS": "3",
                        "SAPWOOD_FETCH_TIMEOUT": "20"}.items():
        monkeypatch.setenv(name, value)


def test_missing_credential_is_one_line_naming_the_variable(tmp_path, capsys, monkeypatch, fast_env):
    catalog = write_catalog(tmp_path / "sources.yaml", {
        "loop-era5": {"protocol": "cds", "endpoint": "http://127.0.0.1:9/api", "dataset": "x",
                      "request": {"variable": ["t"]}}})
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "none"))
    monkeypatch.delenv("CDSAPI_KEY", raising=False)
    monkeypatch.delenv("CDSAPI_URL", raising=False)
    code, _, err = run_in_process(
        capsys, "fetch", "loop-era5", "--out", str(tmp_path / "o"), "--catalog", str(catalog)
    )
    assert code == 2
    assert err.strip() == ("error: source 'loop-era5' needs a credential: set the environment variable "
                           "CDSAPI_KEY (or put 'key: TOKEN' in ~/.cdsapirc)")


def test_list_and_bad_field(tmp_path, capsys):
    code, out, _ = run_in_process(capsys, "fetch", "--list")
    assert code == 0 and "nasa-exoplanets" in out and "cds-era5-single-levels" in out
    code, _, err = run_in_process(capsys, "fetch", "nasa-exoplanets", "--out", str(tmp_path / "o"), "--set",
                                  "maxrec=-3")
    assert code == 2 and err.strip().startswith("error: source 'nasa-exoplanets': maxrec=-3")
    assert not (tmp_path / "o").exists()


def test_fetched_exoplanet_catalog_drives_a_simulated_ensemble(tmp_path, capsys, fast_env):
    tap = FixtureServer(tap_app({"pscomppars": (EXOPLANET_COLUMNS, exoplanet_rows())}))
    try:
        catalog = write_catalog(
            tmp_path / "sources.yaml", {"nasa-exoplanets": {"endpoint": f"{tap.url}/TAP"}}
        )
        code, out, err = run_in_process(capsys, "fetch", "nasa-exoplanets", "--out", str(tmp_path / "data"),
                                        "--catalog", str(catalog))
        assert code == 0, err
        assert "nasa-exoplanets: 1 file(s)" in out
    finally:
        tap.close()
    code, _, err = run_in_process(
        capsys, "simulate", "--planets", str(tmp_path / "data" / "nasa-exoplanets.csv"), "--runs", "3",
        "--out", str(tmp_path / "sim"), "--levels", "2", "--nlat", "8", "--nlon", "16", "--times", "2",
        "--seed", "1", "--spinup-days", "1",
    )
    assert code == 0, err
    with open(tmp_path / "sim" / "planets.csv", newline="") as handle:
        drawn = list(csv.DictReader(handle))
    assert len(drawn) == 3 and len({d["name"] for d in drawn}) == 3
    for run, planet in enumerate(drawn):
        with xr.open_dataset(tmp_path / "sim" / f"run_{run:04d}.nc") as ds:
            assert float(ds["planet_radius"]) == pytest.approx(float(planet["radius"]), rel=1e-5)
            assert float(ds["stellar_flux"]) == pytest.approx(float(planet["stellar_flux"]), rel=1e-5)
            assert float(ds["rotation_rate"]) == pytest.approx(float(planet["rotation_rate"]), rel=1e-5)
