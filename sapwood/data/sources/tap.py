"""IVOA Table Access Protocol services (NASA Exoplanet Archive, ESA Gaia, ESO, ...) through pyvo.

A synchronous ADQL query (``POST {endpoint}/sync`` with ``REQUEST=doQuery, LANG=ADQL, QUERY=...``, as the
TAP 1.1 recommendation defines it) returns a VOTable, which is written as ``OUT/NAME.csv`` or
``OUT/NAME.parquet``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from sapwood.data.sources.base import FetchContext, SourceBase
from sapwood.data.sources.reliability import log
from sapwood.data.sources.storage import atomic_path
from sapwood.errors import SapwoodError


class TapSource(SourceBase):
    protocol: Literal["tap"] = "tap"
    query: str = Field("", description="ADQL text, or the name of one of named_queries")
    named_queries: dict[str, str] = Field(default_factory=dict)
    language: str = "ADQL"
    maxrec: int | None = Field(None, ge=1, description="most rows to return (the service's default if unset)")
    format: Literal["csv", "parquet"] = "csv"

    def adql(self) -> str:
        text = self.named_queries.get(self.query, self.query).strip()
        if not text:
            names = ", ".join(sorted(self.named_queries)) or "none defined"
            raise SapwoodError(
                f"source {self.name!r} has no query: set query to ADQL text or a named query ({names})"
            )
        return text


def fetch(source: TapSource, ctx: FetchContext) -> list[Path]:
    import pyvo

    query = source.adql()
    dest = ctx.out / f"{source.name}.{source.format}"

    def run_query():
        service = pyvo.dal.TAPService(source.endpoint, session=ctx.session)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyvo.dal.DALOverflowWarning)
            results = service.run_sync(query, language=source.language, maxrec=source.maxrec)
        table = results.to_table()
        if str(results.query_status).upper() == "OVERFLOW":  # the service says QUERY_STATUS=OVERFLOW
            log.warning("%s: the result was truncated at the row limit (%d rows); raise maxrec", source.name,
                        len(table))
        return table

    try:
        table = ctx.policy.call(f"{source.name} (TAP sync query)", run_query)
    except pyvo.dal.DALQueryError as exc:
        raise SapwoodError(f"source {source.name!r}: the TAP service rejected the query: {exc}") from None
    with atomic_path(dest) as tmp:
        if source.format == "csv":
            table.write(tmp, format="ascii.csv", overwrite=True)
        else:
            write_parquet(table, tmp)
    return [dest]


def write_parquet(table, path: Path) -> None:
    """An astropy table as Parquet; masked cells become nulls, units go to the field metadata."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields, arrays = [], []
    for name in table.colnames:
        column = table[name]
        array = pa.array(np.ma.asarray(column).tolist())
        unit = str(column.unit) if getattr(column, "unit", None) is not None else None
        fields.append(pa.field(name, array.type, metadata={"unit": unit} if unit else None))
        arrays.append(array)
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
