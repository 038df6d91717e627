"""Copernicus CDS through cdsapi's client against a loopback data store: submit, poll, results, download."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import yaml
from fetch_servers import (
    Fault,
    FixtureServer,
    assert_clean,
    cds_app,
    fast_policy,
    fetch_through_fault,
    write_catalog,
)

from sapwood.data.sources import fetch_sources
from sapwood.data.sources.command import parse_overrides
from sapwood.data.sources.credentials import MissingCredentialError
from sapwood.errors import SapwoodError

TOKEN = "loopback-cds-token-4f1e"
REQUEST = {
    "dataset": "reanalysis-era5-single-levels",
    "request": {
        "product_type": ["reanalysis"], "variable": ["2m_temperature", "surface_pressure"], "year": ["2020"],
        "month": ["01"], "day": ["01"], "time": ["00:00", "06:00", "12:00", "18:00"], "data_format": "netcdf",
        "download_format": "unarchived",
    },
}


def era5_like_netcdf(path) -> bytes:
    """A CF-convention NetCDF laid out as the new CDS writes ERA5 single levels (valid_time, latitude,
    longitude)."""
    rng = np.random.default_rng(0)
    times = np.array(
        ["2020-01-01T00", "2020-01-01T06", "2020-01-01T12", "2020-01-01T18"], dtype="datetime64[ns]"
    )
    lat, lon = np.linspace(90, -90, 33), np.arange(0, 360, 5.625)
    ds = xr.Dataset(
        {
            "t2m": (
                ("valid_time", "latitude", "longitude"),
                250 + 40 * rng.random((4, 33, 64)).astype("float32"),
                {"standard_name": "air_temperature", "units": "K", "long_name": "2 metre temperature"},
            ),
            "sp": (
                ("valid_time", "latitude", "longitude"),
                1e5 + 2e3 * rng.random((4, 33, 64)).astype("float32"),
                {"standard_name": "surface_air_pressure", "units": "Pa", "long_name": "Surface pressure"},
            ),
        },
        coords={
            "valid_time": ("valid_time", times, {"standard_name": "time"}),
            "latitude": ("latitude", lat, {"standard_name": "latitude", "units": "degrees_north"}),
            "longitude": ("longitude", lon, {"standard_name": "longitude", "units": "degrees_east"}),
        },
        attrs={"Conventions": "CF-1.7", "institution": "European Centre for Medium-Range Weather Forecasts"},
    )
    ds.to_netcdf(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    return era5_like_netcdf(tmp_path_factory.mktemp("era5") / "era5.nc")


@pytest.fixture
def store(era5):
    server = FixtureServer(cds_app({"reanalysis-era5-single-levels": era5}, TOKEN))
    yield server
    server.close()


@pytest.fixture
def catalog(tmp_path, store, monkeypatch):
    monkeypatch.setenv("CDSAPI_KEY", TOKEN)
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "no-cdsapirc"))
    request_file = tmp_path / "era5-request.yaml"
    request_file.write_text(yaml.safe_dump(REQUEST))
    catalog = write_catalog(tmp_path / "sources.yaml", {
        "loop-era5": {"protocol": "cds", "endpoint": f"{store.url}/api", "rate_limit": 0,
                      "credentials": ["CDSAPI_KEY"]}})
    return catalog, parse_overrides(request_file, [])


def test_request_yaml_is_submitted_polled_and_the_netcdf_lands_in_the_prepare_folder(
    tmp_path, store, catalog, era5
):
    catalog, overrides = catalog
    out = tmp_path / "cubes"
    store.app.polls_before_success = 1  # "running" once: the client waits (1 s, its fixed first interval)
    [result] = fetch_sources(["loop-era5"], out, [catalog], overrides, policy=fast_policy())
    assert result.files == [out / "loop-era5.nc"]
    assert (out / "loop-era5.nc").read_bytes() == era5
    with xr.open_dataset(out / "loop-era5.nc") as ds:
        assert ds["t2m"].attrs["standard_name"] == "air_temperature" and ds["sp"].shape == (4, 33, 64)
    [job] = store.app.jobs.values()
    assert job["inputs"] == REQUEST["request"] and job["polls"] >= 2  # polled while "running"
    submit = store.requests_to("/execution")[0]
    assert submit.headers["private-token"] == TOKEN
    assert_clean(out)
    before = len(store.log)
    [again] = fetch_sources(["loop-era5"], out, [catalog], overrides, policy=fast_policy())
    assert again.cached and len(store.log) == before


def test_connection_dropped_mid_download_is_resumed_with_a_range_request(tmp_path, store, catalog, era5):
    catalog, overrides = catalog
    out = tmp_path / "cubes"
    store.plan.add(Fault("drop", "/download/", keep=0.6))
    fetch_sources(["loop-era5"], out, [catalog], overrides, policy=fast_policy())
    first, second = store.requests_to("/download/")
    assert "range" not in first.headers
    start = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= int(0.6 * len(era5))  # only the bytes not yet on disk are asked for again
    assert (out / "loop-era5.nc").read_bytes() == era5
    assert_clean(out)


@pytest.mark.parametrize("fault", [
    Fault("status", "/execution", status=500),
    Fault("status", "/execution", status=429, headers={"Retry-After": "3"}),
    Fault("status", "/jobs/", status=503), Fault("hang", "/results", seconds=2.5),
    Fault("short", "/results", keep=0.5), Fault("status", "/download/", status=502),
    Fault("short", "/download/", keep=0.3),
], ids=["submit-500", "submit-429", "poll-503", "results-timeout", "results-truncated-json", "download-502",
        "download-truncated"])
def test_faults_in_every_step_are_retried(tmp_path, store, catalog, era5, fault):
    catalog, overrides = catalog
    out = tmp_path / "cubes"
    fetch_through_fault(store, fault, "loop-era5", out, catalog, overrides)
    assert len(store.app.jobs) == 1 or fault.path == "/execution"  # a poll failure never resubmits the job
    assert (out / "loop-era5.nc").read_bytes() == era5
    assert_clean(out)


def test_missing_token_names_the_variable(tmp_path, store, catalog, monkeypatch):
    catalog, overrides = catalog
    monkeypatch.delenv("CDSAPI_KEY")
    with pytest.raises(MissingCredentialError) as raised:
        fetch_sources(["loop-era5"], tmp_path / "cubes", [catalog], overrides, policy=fast_policy())
    assert "CDSAPI_KEY" in str(raised.value) and "\n" not in str(raised.value)
    assert store.log == []


def test_wrong_token_and_unknown_dataset_are_reported_not_retried(tmp_path, store, catalog, monkeypatch):
    catalog, overrides = catalog
    monkeypatch.setenv("CDSAPI_KEY", "not-the-right-token")
    with pytest.raises(SapwoodError, match="401") as raised:
        fetch_sources(["loop-era5"], tmp_path / "cubes", [catalog], overrides, policy=fast_policy())
    assert "not-the-right-token" not in str(raised.value)
    monkeypatch.setenv("CDSAPI_KEY", TOKEN)
    with pytest.raises(SapwoodError, match="404"):
        fetch_sources(["loop-era5"], tmp_path / "cubes", [catalog], {**overrides, "dataset": "era6"},
                      policy=fast_policy())
    assert len(store.requests_to("/execution")) == 0
    assert not (tmp_path / "cubes" / "loop-era5.nc").exists()
