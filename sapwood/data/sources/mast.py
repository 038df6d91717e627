"""NASA MAST (Mikulski Archive for Space Telescopes) through astroquery.mast.

``criteria`` (CAOM observation fields, e.g. ``obs_collection: JWST, target_name: TRAPPIST-1``) go to
``Observations.query_criteria``; the observations' products (``get_product_list``) are narrowed by
``product_filters`` / ``extension`` / ``mrp_only`` (``filter_products``) and downloaded from MAST's
``Download/file?uri=`` endpoint by sapwood's resumable, size-verified download, in parallel. Written:
``OUT/NAME/observations.csv``, ``OUT/NAME/products.csv`` and the product files. A token in ``MAST_API_TOKEN``
(optional; needed for exclusive-access data) logs the session in.
"""

from __future__ import annotations

import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sapwood.data.sources.base import FetchContext, SourceBase
from sapwood.data.sources.credentials import optional_env
from sapwood.data.sources.reliability import log
from sapwood.data.sources.storage import atomic_path, download
from sapwood.errors import SapwoodError

TOKEN_VARIABLE = "MAST_API_TOKEN"


class MastSource(SourceBase):
    protocol: Literal["mast"] = "mast"
    criteria: dict[str, Any] = Field(default_factory=dict, description="CAOM fields for query_criteria")
    product_filters: dict[str, Any] = Field(
        default_factory=dict, description="product fields for filter_products"
    )
    extension: list[str] = Field(default_factory=list, description="keep products whose file name ends so")
    mrp_only: bool = Field(False, description="only the 'Minimum Recommended Products'")
    max_products: int = Field(50, ge=1, description="refuse to download more products than this")


def observations_client(source: MastSource, ctx: FetchContext):
    """An astroquery ``Observations`` bound to the source's endpoint and to sapwood's rate-limited session."""
    from astroquery.mast import ObservationsClass

    client = ObservationsClass()
    base = source.endpoint.rstrip("/")
    portal = client._portal_api_connection
    client._session = portal._session = client._auth_obj.session = ctx.session
    portal.MAST_REQUEST_URL = f"{base}/api/v0/invoke"
    portal.COLUMNS_CONFIG_URL = f"{base}/portal/Mashup/Mashup.asmx/columnsconfig"
    portal.MAST_DOWNLOAD_URL = f"{base}/api/v0.1/Download/file"
    portal.TIMEOUT = ctx.policy.timeout * ctx.policy.attempts
    portal._column_configs = {}  # astroquery keeps them per class; they belong to this endpoint
    client._auth_obj.SESSION_INFO_URL = f"{base}/whoami"
    if token := optional_env(TOKEN_VARIABLE):
        ctx.redactor.add(token)
        ctx.policy.call(f"{source.name} (login)", lambda: client.login(token=token))
    return client


def fetch(source: MastSource, ctx: FetchContext) -> list[Path]:
    if not source.criteria:
        raise SapwoodError(
            f"source {source.name!r} has no criteria: give CAOM fields, e.g. obs_collection, target_name"
        )
    client = observations_client(source, ctx)
    def query():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Query returned no results")
            return client.query_criteria(**source.criteria)

    observations = ctx.policy.call(f"{source.name} (query_criteria)", query)
    if len(observations) == 0:
        raise SapwoodError(f"source {source.name!r}: no MAST observations match {source.criteria}")
    products = ctx.policy.call(
        f"{source.name} (get_product_list)", lambda: client.get_product_list(observations)
    )
    products = client.filter_products(products, mrp_only=source.mrp_only, extension=source.extension or None,
                                      **source.product_filters)
    if len(products) == 0:
        raise SapwoodError(
            f"source {source.name!r}: no products of the {len(observations)} observations pass "
            f"the filters {source.product_filters}"
        )
    if len(products) > source.max_products:
        raise SapwoodError(f"source {source.name!r}: {len(products)} products exceed max_products="
                           f"{source.max_products}; narrow product_filters or raise max_products")
    folder = ctx.out / source.name
    tables = []
    for name, table in (("observations.csv", observations), ("products.csv", products)):
        with atomic_path(folder / name) as tmp:
            table.write(tmp, format="ascii.csv", overwrite=True)
        tables.append(folder / name)
    download_url = client._portal_api_connection.MAST_DOWNLOAD_URL
    ctx.expect(len(products))

    def fetch_one(row: Any) -> Path:
        uri, filename = str(row["dataURI"]), Path(str(row["productFilename"])).name
        size = _known_int(row["size"]) if "size" in row.colnames else None
        dest = folder / filename
        record = {"mast": source.endpoint, "uri": uri, "size": size}
        if not ctx.cache.lookup(record):  # per-file records hold even under --refresh
            url = f"{download_url}?uri={urllib.parse.quote(uri, safe=':/')}"
            ctx.policy.call(f"{source.name} (download {filename})",
                            lambda: download(ctx.session, url, dest, expected_size=size, what=filename))
            ctx.cache.store(record, [dest])
        ctx.file_done()
        return dest

    with ThreadPoolExecutor(max_workers=source.concurrency) as pool:
        files = list(pool.map(fetch_one, list(products)))
    log.info("%s: %d observations, %d products", source.name, len(observations), len(files))
    return tables + files


def _known_int(value: Any) -> int | None:
    """An int from a table cell; ``None`` for a masked or empty one."""
    import numpy as np

    if value is None or value is np.ma.masked:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
