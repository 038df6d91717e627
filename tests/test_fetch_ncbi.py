"""NCBI E-utilities (esearch + efetch) against a loopback server: a text corpus that tokenize reads."""

from __future__ import annotations

import pytest
from fetch_servers import (
    Fault,
    FixtureServer,
    assert_clean,
    eutils_app,
    fast_policy,
    fetch_through_fault,
    pubmed_records,
    write_catalog,
)

from sapwood.data.sources import fetch_sources
from sapwood.data.sources.ncbi import RATE_WITH_KEY, RATE_WITHOUT_KEY, allowed_rate
from sapwood.errors import SapwoodError

RECORDS = pubmed_records(9)  # 9 with abstracts + 1 without


@pytest.fixture
def eutils():
    server = FixtureServer(eutils_app(RECORDS))
    yield server
    server.close()


@pytest.fixture
def catalog(tmp_path, eutils, monkeypatch):
    monkeypatch.setenv("NCBI_API_KEY", "loopback-ncbi-key-0123")  # 10 requests/s instead of 3: a shorter test
    return write_catalog(tmp_path / "sources.yaml", {
        "loop-pubmed": {"protocol": "ncbi", "endpoint": f"{eutils.url}/entrez/eutils", "db": "pubmed",
                        "term": "exoplanet atmosphere", "retmax": 50, "batch_size": 4, "rate_limit": 0,
                        "concurrency": 2, "credentials": ["NCBI_API_KEY"]},
    })


def test_abstracts_become_one_text_file_per_article(tmp_path, eutils, catalog, monkeypatch):
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    out = tmp_path / "corpus"
    reports = []
    [result] = fetch_sources(["loop-pubmed"], out, [catalog], policy=fast_policy(),
                             report=lambda *progress: reports.append(progress))
    assert reports[0] == ("loop-pubmed", 0, 10) and reports[-1] == (
        "loop-pubmed",
        10,
        10,
    )  # records, for a bar
    files = sorted(p.name for p in (out / "loop-pubmed").iterdir())
    assert files == sorted(f"{pmid}.txt" for pmid, (_, abstract) in RECORDS.items() if abstract)
    text = (out / "loop-pubmed" / "38000001.txt").read_text()
    assert text.startswith("Atmosphere of planet 1: a JWST view\n\n")  # inline markup flattened
    assert "BACKGROUND: Transmission spectra of exoplanet 1" in text and "RESULTS: We detect water" in text
    search = eutils.requests_to("esearch.fcgi")[0].query
    assert (search["db"], search["term"], search["retmode"], search["tool"]) == (
        "pubmed", "exoplanet atmosphere", "json", "sapwood") and "api_key" not in search
    batches = [r.form()["id"].split(",") for r in eutils.requests_to("efetch.fcgi")]
    assert sorted(i for b in batches for i in b) == sorted(RECORDS) and max(len(b) for b in batches) == 4
    assert_clean(out)


def test_fetched_corpus_goes_through_tokenize(tmp_path, eutils, catalog):
    from sapwood.data.text import collect_files, tokenize_corpus

    out = tmp_path / "corpus"
    fetch_sources(["loop-pubmed"], out, [catalog], policy=fast_policy())
    files = collect_files([out])
    assert len(files) == 9
    meta = tokenize_corpus(files, tmp_path / "tokens", vocab_size=300, val_fraction=0.2)
    assert meta["train_documents"] + meta["val_documents"] == 9 and meta["train_tokens"] > 0


def test_api_key_is_sent_and_raises_the_rate_to_ncbis_published_limit(tmp_path, eutils, catalog):
    fetch_sources(["loop-pubmed"], tmp_path / "corpus", [catalog], policy=fast_policy())
    assert eutils.requests_to("esearch.fcgi")[0].query["api_key"] == "loopback-ncbi-key-0123"
    assert all(r.form()["api_key"] == "loopback-ncbi-key-0123" for r in eutils.requests_to("efetch.fcgi"))
    assert allowed_rate(10, has_key=True) == RATE_WITH_KEY == 10
    assert allowed_rate(10, has_key=False) == RATE_WITHOUT_KEY == 3
    assert allowed_rate(0, has_key=False) == 3 and allowed_rate(2, has_key=True) == 2


@pytest.mark.parametrize("fault", [
    Fault("status", "esearch", status=500), Fault("status", "efetch", status=502),
    Fault("status", "efetch", status=429, headers={"Retry-After": "2"}), Fault("hang", "efetch", seconds=2.5),
    Fault("drop", "efetch", keep=0.5), Fault("short", "efetch", keep=0.7),
    Fault("short", "esearch", keep=0.5),
], ids=["esearch-500", "efetch-502", "efetch-429", "efetch-timeout", "efetch-dropped", "efetch-truncated-xml",
        "esearch-truncated-json"])
def test_faults_are_retried_and_the_corpus_is_complete(tmp_path, eutils, catalog, fault):
    out = tmp_path / "corpus"
    fetch_through_fault(eutils, fault, "loop-pubmed", out, catalog)
    assert len(list((out / "loop-pubmed").glob("*.txt"))) == 9
    assert_clean(out)


def test_exhausted_retries_report_one_line_and_cache_nothing(tmp_path, eutils, catalog):
    out = tmp_path / "corpus"
    eutils.plan.add(*[Fault("status", "efetch", status=503)] * 8)
    with pytest.raises(SapwoodError, match="loop-pubmed.*503") as raised:
        fetch_sources(["loop-pubmed"], out, [catalog], policy=fast_policy(attempts=2))
    assert "\n" not in str(raised.value)
    assert not list((out / ".sapwood-fetch").glob("*.json"))
    assert_clean(out)
    fetch_sources(["loop-pubmed"], out, [catalog], policy=fast_policy(attempts=8))  # then a rerun completes
    assert len(list((out / "loop-pubmed").glob("*.txt"))) == 9


def test_empty_search_and_bad_db_are_one_line_errors(tmp_path, eutils, catalog):
    with pytest.raises(SapwoodError, match="esearch refused"):
        fetch_sources(["loop-pubmed"], tmp_path / "c", [catalog], {"db": "nucleotidez"}, policy=fast_policy())
    with pytest.raises(SapwoodError, match="no term"):
        fetch_sources(["loop-pubmed"], tmp_path / "c", [catalog], {"term": ""}, policy=fast_policy())


def test_every_request_waits_for_the_rate_limiter_at_ncbis_rate(tmp_path, eutils, catalog, monkeypatch):
    from sapwood.data.sources.reliability import RateLimiter

    rates = []
    original = RateLimiter.acquire

    def counting(self):
        rates.append(self.rate)
        return original(self)

    monkeypatch.setattr(RateLimiter, "acquire", counting)
    monkeypatch.delenv("NCBI_API_KEY")
    fetch_sources(["loop-pubmed"], tmp_path / "corpus", [catalog], policy=fast_policy())
    assert len(rates) == len(eutils.log) == 4 and set(rates) == {RATE_WITHOUT_KEY}
