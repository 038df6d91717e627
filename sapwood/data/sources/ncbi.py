"""NCBI E-utilities (esearch, efetch): records as a text corpus for ``sapwood tokenize``.

``esearch.fcgi`` (``retmode=json``) gives the ids of a term's records, ``efetch.fcgi`` fetches them in
batches. PubMed records (``rettype=abstract, retmode=xml``) become one ``PMID.txt`` per article (title, blank
line, abstract); other databases are written as one text file per batch in the ``rettype`` asked for. The API
key comes from ``NCBI_API_KEY`` (optional); NCBI's published limits are 3 requests/s without a key and 10 with
one, and the source's ``rate_limit`` is capped accordingly.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from sapwood.data.sources.base import FetchContext, SourceBase
from sapwood.data.sources.credentials import optional_env
from sapwood.data.sources.reliability import TransientError, check_response, log
from sapwood.data.sources.storage import write_bytes_atomic
from sapwood.errors import SapwoodError

API_KEY_VARIABLE = "NCBI_API_KEY"
EMAIL_VARIABLE = "NCBI_EMAIL"
RATE_WITHOUT_KEY = 3.0
RATE_WITH_KEY = 10.0


class NcbiSource(SourceBase):
    protocol: Literal["ncbi"] = "ncbi"
    db: str = "pubmed"
    term: str = Field("", description="an Entrez query, e.g. 'exoplanet atmosphere[Title/Abstract]'")
    retmax: int = Field(
        100, ge=1, le=10_000, description="most records to fetch (esearch returns at most 10,000 ids)"
    )
    batch_size: int = Field(100, ge=1, le=500, description="ids per efetch request")
    rettype: str = "abstract"
    retmode: Literal["xml", "text"] = "xml"


def allowed_rate(requested: float, has_key: bool) -> float:
    """NCBI's published ceiling (3/s, or 10/s with an API key) applied to the catalog's rate."""
    ceiling = RATE_WITH_KEY if has_key else RATE_WITHOUT_KEY
    return ceiling if requested <= 0 else min(requested, ceiling)


def fetch(source: NcbiSource, ctx: FetchContext) -> list[Path]:
    if not source.term.strip():
        raise SapwoodError(f"source {source.name!r} has no term: set term to an Entrez query")
    api_key = optional_env(API_KEY_VARIABLE)
    ctx.limiter.rate = allowed_rate(source.rate_limit, api_key is not None)
    common = {"db": source.db, "tool": "sapwood"}
    if api_key:
        common["api_key"] = api_key
    if email := optional_env(EMAIL_VARIABLE):
        common["email"] = email
    base = source.endpoint.rstrip("/")

    def search() -> list[str]:
        params = {**common, "term": source.term, "retmax": source.retmax, "retmode": "json"}
        response = check_response(ctx.session.get(f"{base}/esearch.fcgi", params=params), "esearch")
        try:
            result = response.json()["esearchresult"]
        except (ValueError, KeyError) as exc:
            raise TransientError(f"esearch: unreadable reply ({type(exc).__name__})") from None
        if "ERROR" in result:
            raise SapwoodError(f"source {source.name!r}: esearch refused the term: {result['ERROR']}")
        return [str(i) for i in result.get("idlist", [])]

    ids = ctx.policy.call(f"{source.name} (esearch)", search)
    if not ids:
        raise SapwoodError(f"source {source.name!r}: no {source.db} records match term {source.term!r}")
    folder = ctx.out / source.name
    batches = [ids[i:i + source.batch_size] for i in range(0, len(ids), source.batch_size)]

    ctx.expect(len(ids))

    def fetch_batch(index: int) -> list[Path]:
        batch = batches[index]

        def efetch() -> bytes:
            data = {**common, "id": ",".join(batch), "rettype": source.rettype, "retmode": source.retmode}
            response = check_response(ctx.session.post(f"{base}/efetch.fcgi", data=data), "efetch")
            return response.content

        body = ctx.policy.call(f"{source.name} (efetch batch {index})", lambda: _parsed(efetch, source))
        for _ in batch:
            ctx.file_done()  # progress counts records
        if isinstance(body, dict):
            return [write_bytes_atomic(folder / f"{pmid}.txt", text.encode()) for pmid, text in body.items()]
        return [write_bytes_atomic(folder / f"batch_{index:05d}.txt", body)]

    with ThreadPoolExecutor(max_workers=source.concurrency) as pool:
        files = [path for paths in pool.map(fetch_batch, range(len(batches))) for path in paths]
    if not files:
        raise SapwoodError(f"source {source.name!r}: the {len(ids)} records had no abstract text")
    log.info("%s: %d records, %d files", source.name, len(ids), len(files))
    return files


def _parsed(efetch, source: NcbiSource) -> dict[str, str] | bytes:
    """The batch as ``{pmid: text}`` for PubMed XML, else the raw bytes; a cut-off XML body is transient."""
    body = efetch()
    if source.retmode != "xml" or source.db != "pubmed":
        return body
    try:
        return pubmed_abstracts(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"efetch: incomplete XML ({exc})") from None


def pubmed_abstracts(xml: bytes) -> dict[str, str]:
    """``{PMID: "title\\n\\nabstract"}`` from a ``PubmedArticleSet`` (articles without an abstract
    skipped)."""
    root = ElementTree.fromstring(xml)
    texts = {}
    for article in root.iter("PubmedArticle"):
        pmid = (article.findtext("MedlineCitation/PMID") or "").strip()
        title_node = article.find("MedlineCitation/Article/ArticleTitle")
        title = "".join(title_node.itertext()).strip() if title_node is not None else ""
        parts = []
        for node in article.findall("MedlineCitation/Article/Abstract/AbstractText"):
            text = "".join(node.itertext()).strip()
            label = node.get("Label")
            parts.append(f"{label}: {text}" if label else text)
        if pmid and parts:
            texts[pmid] = f"{title}\n\n" + "\n".join(parts) + "\n"
    return texts
