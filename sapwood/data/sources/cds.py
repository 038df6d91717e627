"""Copernicus Climate Data Store (and the other ECMWF data stores) through cdsapi's client library.

The request is YAML (``dataset:`` and ``request:``, as on the dataset's download form). The token and URL are
found as cdsapi finds them (``CDSAPI_KEY`` / ``CDSAPI_URL`` or ``~/.cdsapirc``, never arguments); the job goes
through ``ecmwf-datastores-client``, the engine cdsapi >= 0.7 runs on (OGC API - Processes:
``POST {endpoint}/retrieve/v1/processes/{dataset}/execution``, poll ``jobs/{id}``, read ``jobs/{id}/results``:
``href``, ``file:size``). Each step is retried by sapwood's policy; the result is fetched by sapwood's
resumable, size-verified download straight into ``OUT/NAME.nc`` (or ``.grib``/``.zip``), which is
``sapwood prepare``'s input folder.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sapwood.data.sources.base import FetchContext, SourceBase
from sapwood.data.sources.credentials import MissingCredentialError
from sapwood.data.sources.reliability import describe, is_transient
from sapwood.data.sources.storage import download
from sapwood.errors import SapwoodError

EXTENSIONS = {"application/netcdf": ".nc", "application/x-netcdf": ".nc", "application/x-grib": ".grib",
              "application/grib": ".grib", "application/zip": ".zip"}


class CdsSource(SourceBase):
    protocol: Literal["cds"] = "cds"
    dataset: str = Field("", description="the dataset id, e.g. reanalysis-era5-single-levels")
    request: dict[str, Any] = Field(default_factory=dict, description="the request, as on the download form")


def credentials(source: CdsSource) -> tuple[str, str]:
    """The endpoint and token, from the catalog / ``CDSAPI_URL`` and ``CDSAPI_KEY`` / ``~/.cdsapirc``."""
    from cdsapi.api import get_url_key_verify

    try:
        url, key, _ = get_url_key_verify(source.endpoint or None, None, None)
    except Exception:
        raise MissingCredentialError(
            f"source {source.name!r} needs a credential: set the environment variable CDSAPI_KEY "
            "(or put 'key: TOKEN' in ~/.cdsapirc)") from None
    if ":" in key:
        raise SapwoodError(
            f"source {source.name!r}: CDSAPI_KEY has the retired 'UID:KEY' form; use the personal "
            "access token from your CDS profile page"
        )
    return url, key


def fetch(source: CdsSource, ctx: FetchContext) -> list[Path]:
    from ecmwf.datastores import Client

    if not source.dataset or not source.request:
        raise SapwoodError(
            f"source {source.name!r} needs dataset: and request: (give them with --request FILE.yaml)"
        )
    url, key = credentials(source)
    ctx.redactor.add(key)
    # One try per HTTP request inside the client: sapwood's policy retries each step (Retry-After honoured).
    client = Client(url=url, key=key, session=ctx.session, timeout=ctx.policy.timeout, progress=False,
                    maximum_tries=1, retry_after=0, sleep_max=max(min(ctx.policy.max_wait, 120.0), 1.0))
    try:
        remote = ctx.policy.call(
            f"{source.name} (submit)", lambda: client.submit(source.dataset, dict(source.request))
        )
        results = ctx.policy.call(f"{source.name} (wait for job {remote.request_id})", remote.get_results)
        href, size, content_type = results.location, results.content_length, results.content_type
    except SapwoodError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        raise SapwoodError(f"source {source.name!r}: the data store refused or failed the request: "
                           f"{describe(exc)}") from None
    dest = ctx.out / f"{source.name}{_extension(href, content_type)}"
    ctx.policy.call(
        f"{source.name} (download result)",
        lambda: download(ctx.session, href, dest, expected_size=size, what=f"{source.name} result"),
    )
    return [dest]


def _extension(href: str, content_type: str) -> str:
    suffix = posixpath.splitext(urllib.parse.urlparse(href).path)[1]
    if suffix in (".nc", ".grib", ".grib2", ".zip", ".nc4"):
        return suffix
    return EXTENSIONS.get(content_type.split(";")[0].strip(), ".nc")
