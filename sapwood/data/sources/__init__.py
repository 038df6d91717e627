"""Archive connectors for ``sapwood fetch``: TAP (pyvo), MAST (astroquery), CDS (cdsapi), NCBI E-utilities,
S3-compatible stores (boto3), named in a source catalog (``catalog.yaml`` + the user's files).

Every source goes through the same reliability kit: retries with backoff and jitter honouring ``Retry-After``,
a per-source rate limit, bounded concurrency, resumable verified downloads, atomic outputs and a request cache
(``OUT/.sapwood-fetch``), with credentials taken from the environment and redacted from logs and errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapwood.errors import SapwoodError

__all__ = ["FetchResult", "fetch_sources"]


@dataclass
class FetchResult:
    source: str
    files: list[Path]
    cached: bool

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.is_file())


def _fetchers() -> dict[str, Callable]:
    from sapwood.data.sources import cds, mast, ncbi, s3, tap

    return {"tap": tap.fetch, "mast": mast.fetch, "cds": cds.fetch, "ncbi": ncbi.fetch, "s3": s3.fetch}


def fetch_sources(names: Iterable[str], out: Path, catalogs: Iterable[Path] = (),
                  overrides: dict[str, Any] | None = None, refresh: bool = False, policy=None,
                  report: Callable[[str, int, int | None], None] | None = None) -> list[FetchResult]:
    """Fetch each named source into ``out``; a request already completed there is not fetched again.

    ``overrides`` replace catalog fields of every named source (e.g. ``{"query": "SELECT ..."}``);
    ``refresh`` ignores the request cache (per-object records of S3 and MAST still skip unchanged files);
    ``report(source, done, expected)`` is called as items complete (for a progress bar).
    """
    from sapwood.data.sources.base import FetchContext
    from sapwood.data.sources.catalog import Catalog
    from sapwood.data.sources.credentials import Redactor, one_line, redacted_logging
    from sapwood.data.sources.reliability import RetryPolicy, describe

    catalog = Catalog.load(catalogs)
    sources = [
        catalog.get(name, overrides) for name in names
    ]  # every name checked before anything is fetched
    if not sources:
        raise SapwoodError(f"no source named; known: {', '.join(catalog.names)}")
    policy = policy or RetryPolicy.from_environment()
    redactor = Redactor.from_environment(v for s in sources for v in s.credentials)
    if out.exists() and not out.is_dir():
        raise SapwoodError(f"--out {str(out)!r} is a file; give a folder to fetch into")
    out.mkdir(parents=True, exist_ok=True)
    fetchers = _fetchers()
    results = []
    with redacted_logging(redactor):
        for source in sources:
            per_source = (lambda done, total, name=source.name: report(name, done, total)) if report else None
            ctx = FetchContext.create(source, out, policy, redactor, refresh, per_source)
            request = {"source": source.name, **source.identity()}
            cached = None if refresh else ctx.cache.lookup(request)
            if cached is not None:
                results.append(FetchResult(source.name, cached, cached=True))
                continue
            try:
                files = fetchers[source.protocol](source, ctx)
            except SapwoodError as exc:
                raise type(exc)(redactor(one_line(str(exc)))) from None
            except Exception as exc:  # a client's error after retries: one redacted line
                raise SapwoodError(redactor(one_line(f"source {source.name!r}: {describe(exc)}"))) from None
            finally:
                ctx.session.close()
            ctx.cache.store(request, files)
            results.append(FetchResult(source.name, files, cached=False))
    return results
