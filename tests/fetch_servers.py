"""Loopback servers that speak the archives' protocols, with fault injection, for the fetch tests.

Each protocol is a small WSGI-free "app" ``(Request) -> Reply`` written from the published protocol documents
(IVOA TAP 1.1 + VOTable 1.4, NCBI E-utilities, the ECMWF data stores' OGC API - Processes flow, the MAST
portal API); :class:`FixtureServer` serves an app on 127.0.0.1 over HTTP/1.1 (Range requests included) and
applies the faults queued in its :class:`FaultPlan`. S3 is moto's real server behind :func:`proxy_app`, so the
same faults reach boto3.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        fields = dict(self.query)
        if self.body and "x-www-form-urlencoded" in self.headers.get("content-type", ""):
            fields.update(
                {
                    k: v[-1]
                    for k, v in urllib.parse.parse_qs(self.body.decode(), keep_blank_values=True).items()
                }
            )
        return fields


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = False  # serve Range requests (206) from this body


def json_reply(data, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


@dataclass
class Fault:
    """One injected failure for the next request whose path contains ``path``.

    kind: ``status`` (reply ``status`` with ``headers``), ``hang`` (stall ``seconds`` before answering),
    ``drop`` (send the headers and ``keep`` bytes of the body, then close: a connection lost mid-transfer),
    ``short`` (a body cut to ``keep`` bytes with a matching Content-Length: a truncated document).
    """

    kind: str
    path: str = ""
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    keep: int | float = 0.5


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.injected: list[Fault] = []

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.path in path:
                    self.injected.append(fault)
                    return self._faults.pop(index)
        return None

    @property
    def pending(self) -> int:
        return len(self._faults)


class FixtureServer:
    """Serves ``app`` on 127.0.0.1 (a free port) in a thread; ``log`` records every request."""

    def __init__(self, app: Callable[[Request], Reply]) -> None:
        self.app = app
        self.plan = FaultPlan()
        self.log: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parsed = urllib.parse.urlsplit(self.path)
                query = {
                    k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()
                }
                request = Request(
                    self.command, parsed.path, query, {k.lower(): v for k, v in self.headers.items()}, body
                )
                request.raw_path = self.path
                server.log.append(request)
                fault = server.plan.take(parsed.path)
                if fault is not None and fault.kind == "status":
                    reply = Reply(fault.status, f"injected {fault.status}".encode(), dict(fault.headers))
                    return self._send(reply, request)
                if fault is not None and fault.kind == "hang":
                    time.sleep(fault.seconds)
                reply = server.app(request)
                if fault is not None and fault.kind in ("drop", "short"):
                    return self._send(reply, request, fault)
                return self._send(reply, request)

            def _send(self, reply: Reply, request: Request, fault: Fault | None = None) -> None:
                body, status, headers = reply.body, reply.status, dict(reply.headers)
                match = re.match(r"bytes=(\d+)-(\d*)$", request.headers.get("range", ""))
                if reply.ranges and status == 200:
                    headers["Accept-Ranges"] = "bytes"
                    if match:
                        start = int(match.group(1))
                        end = int(match.group(2)) if match.group(2) else len(body) - 1
                        if start >= len(body):
                            status, body = 416, b""
                            headers["Content-Range"] = f"bytes */{len(reply.body)}"
                        else:
                            status, body = 206, body[start:end + 1]
                            headers["Content-Range"] = (
                                f"bytes {start}-{start + len(body) - 1}/{len(reply.body)}"
                            )
                keep = len(body)
                if fault is not None:
                    keep = int(fault.keep * len(body)) if isinstance(fault.keep, float) else int(fault.keep)
                    if fault.kind == "short":
                        body = body[:keep]
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if fault is not None and fault.kind == "drop":
                        self.wfile.write(body[:keep])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if self.command != "HEAD":
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.log if path in r.path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- TAP (IVOA TAP 1.1 sync, VOTable 1.4 TABLEDATA) ---------------------------------------------------------

VOTABLE_TYPES = {float: "double", int: "long", str: "char"}


def votable(
    columns: list[tuple[str, type, str]], rows: list[dict], status: str = "OK", message: str = ""
) -> bytes:
    """A VOTable 1.4 document as TAP 1.1 returns it: RESOURCE type="results", INFO name="QUERY_STATUS"."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3" '
           'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">',
           '<RESOURCE type="results">']
    if status == "ERROR":
        out.append(f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>')
        out += ["</RESOURCE>", "</VOTABLE>"]
        return "\n".join(out).encode()
    out.append('<INFO name="QUERY_STATUS" value="OK"/>')
    out.append("<TABLE>")
    for name, kind, unit in columns:
        size = ' arraysize="*"' if kind is str else ""
        unit_attr = f' unit="{unit}"' if unit else ""
        out.append(f'<FIELD name="{name}" datatype="{VOTABLE_TYPES[kind]}"{size}{unit_attr}/>')
    out.append("<DATA><TABLEDATA>")
    for row in rows:
        cells = "".join(
            f"<TD>{'' if row.get(n) is None else escape(str(row[n]))}</TD>" for n, _, _ in columns
        )
        out.append(f"<TR>{cells}</TR>")
    out.append("</TABLEDATA></DATA></TABLE>")
    if status == "OVERFLOW":
        out.append('<INFO name="QUERY_STATUS" value="OVERFLOW"/>')
    out += ["</RESOURCE>", "</VOTABLE>"]
    return "\n".join(out).encode()


SELECT = re.compile(r"^\s*SELECT\s+(?:TOP\s+(\d+)\s+)?(.+?)\s+FROM\s+([\w.]+)(?:\s+WHERE\s+(.+?))?\s*$",
                    re.IGNORECASE | re.DOTALL)
CONDITION = re.compile(r"^(\w+)\s*(IS NOT NULL|<|>|=)\s*(.*)$", re.IGNORECASE)


def tap_app(tables: dict[str, tuple[list[tuple[str, type, str]], list[dict]]]) -> Callable[[Request], Reply]:
    """``POST|GET /sync`` (REQUEST=doQuery, LANG=ADQL, QUERY, MAXREC) over in-memory tables; ADQL subset:
    ``SELECT [TOP n] cols|* FROM table [WHERE c IS NOT NULL | c < x | c > x | c = 'x' [AND ...]]``."""

    def app(request: Request) -> Reply:
        xml = {"Content-Type": "application/x-votable+xml"}
        if not request.path.endswith("/sync"):
            return Reply(404, b"not found")
        form = request.form()
        if form.get("REQUEST", "doQuery") != "doQuery" or form.get("LANG", "").upper() != "ADQL":
            return Reply(200, votable([], [], "ERROR", "REQUEST=doQuery and LANG=ADQL are required"), xml)
        match = SELECT.match(form.get("QUERY", ""))
        if not match or match.group(3).lower() not in tables:
            return Reply(
                200, votable([], [], "ERROR", f"cannot parse or unknown table: {form.get('QUERY')!r}"), xml
            )
        top, columns_text, table, where = match.groups()
        columns, rows = tables[table.lower()]
        if columns_text.strip() != "*":
            wanted = [c.strip() for c in columns_text.split(",")]
            by_name = {c[0]: c for c in columns}
            if any(w not in by_name for w in wanted):
                return Reply(200, votable([], [], "ERROR", f"unknown column in {wanted}"), xml)
            columns = [by_name[w] for w in wanted]
        for condition in re.split(r"\s+AND\s+", where or "", flags=re.IGNORECASE):
            if not condition.strip():
                continue
            name, op, value = CONDITION.match(condition.strip()).groups()
            if op.upper() == "IS NOT NULL":
                rows = [r for r in rows if r.get(name) is not None]
            elif op == "=":
                rows = [r for r in rows if str(r.get(name)) == value.strip().strip("'")]
            else:
                limit = float(value)
                rows = [
                    r
                    for r in rows
                    if r.get(name) is not None and (r[name] < limit if op == "<" else r[name] > limit)
                ]
        limit = min(int(top) if top else 10**9, int(form["MAXREC"]) if form.get("MAXREC") else 10**9)
        status = "OVERFLOW" if len(rows) > limit and not top else "OK"
        return Reply(200, votable(columns, rows[:limit], status), xml)

    return app


EXOPLANET_COLUMNS = [
    ("pl_name", str, ""), ("hostname", str, ""), ("pl_rade", float, "earthRad"),
    ("pl_bmasse", float, "earthMass"), ("pl_orbper", float, "d"), ("pl_orbsmax", float, "AU"),
    ("pl_insol", float, ""), ("pl_eqt", float, "K"), ("st_teff", float, "K"), ("st_rad", float, "solRad"),
    ("st_mass", float, "solMass"), ("sy_dist", float, "pc"),
]


def exoplanet_rows() -> list[dict]:
    """A few planets with the archive's columns (approximate published values; some left unknown on
    purpose)."""
    rows = [
        ("TRAPPIST-1 b", "TRAPPIST-1", 1.116, 1.374, 1.5109, None, 4.15, 400.0, 2566.0, 0.119, 0.0898, 12.43),
        (
            "TRAPPIST-1 e", "TRAPPIST-1", 0.920, 0.692, 6.1010, 0.02925, 0.646, 250.0, 2566.0, 0.119, 0.0898,
            12.43,
        ),
        ("TRAPPIST-1 f", "TRAPPIST-1", 1.045, 1.039, 9.2075, None, None, 218.0, 2566.0, 0.119, 0.0898, 12.43),
        ("Proxima Cen b", "Proxima Cen", 1.07, None, 11.1868, None, 0.65, 234.0, 3050.0, 0.141, 0.122, 1.30),
        ("Kepler-452 b", "Kepler-452", 1.63, None, 384.843, None, None, 265.0, 5757.0, 1.11, 1.037, 551.7),
        ("K2-18 b", "K2-18", 2.61, 8.63, 32.94, 0.1429, 1.005, 255.0, 3457.0, 0.41, 0.36, 38.0),
        ("GJ 1214 b", "GJ 1214", 2.74, 8.17, 1.5804, None, 17.0, 596.0, 3250.0, 0.215, 0.178, 14.6),
        ("LHS 1140 b", "LHS 1140", 1.73, 5.60, 24.737, None, 0.43, 226.0, 3096.0, 0.2139, 0.1844, 15.0),
        ("HD 209458 b", "HD 209458", 15.6, 219.0, 3.5247, 0.04707, None, None, 6071.0, 1.19, 1.23, 48.3),
        ("Kepler-62 f", "Kepler-62", 1.41, None, 267.29, None, 0.41, 208.0, 4925.0, 0.64, 0.69, 300.9),
        ("no radius", "nowhere", None, 1.0, 10.0, None, 1.0, 255.0, 5772.0, 1.0, 1.0, 10.0),
    ]
    names = [c[0] for c in EXOPLANET_COLUMNS]
    return [dict(zip(names, row, strict=True)) for row in rows]


# --- NCBI E-utilities (esearch JSON, efetch PubMed XML) -----------------------------------------------------

def pubmed_records(count: int) -> dict[str, tuple[str, list[tuple[str | None, str]]]]:
    records = {}
    for i in range(count):
        pmid = str(38000000 + i)
        abstract = (
            [
                ("BACKGROUND", f"Transmission spectra of exoplanet {i} probe its atmosphere."),
                ("RESULTS", f"We detect water vapour at {3 + i % 5} sigma in planet {i}."),
            ]
            if i % 4
            else [(None, f"A single-paragraph abstract about hot Jupiter {i} and its clouds.")]
        )
        records[pmid] = (f"Atmosphere of planet {i}: a <i>JWST</i> view", abstract)
    records["39999999"] = ("A letter without an abstract", [])
    return records


def pubmed_xml(records: dict, ids: list[str]) -> bytes:
    """A PubmedArticleSet as NCBI's PubMed DTD (pubmed_240101.dtd) describes it."""
    out = ['<?xml version="1.0" ?>',
           '<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2024//EN" '
           '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_240101.dtd">',
           "<PubmedArticleSet>"]
    for pmid in ids:
        if pmid not in records:
            continue
        title, abstract = records[pmid]
        title_xml = escape(title).replace("&lt;i&gt;", "<i>").replace("&lt;/i&gt;", "</i>")
        parts = "".join(
            f'<AbstractText Label="{label}" NlmCategory="{label}">{escape(text)}</AbstractText>'
            if label
            else f"<AbstractText>{escape(text)}</AbstractText>"
            for label, text in abstract
        )
        abstract_xml = f"<Abstract>{parts}</Abstract>" if abstract else ""
        out.append(
            f'<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">{pmid}</PMID>'
            f'<Article PubModel="Print"><ArticleTitle>{title_xml}</ArticleTitle>{abstract_xml}</Article>'
            f"</MedlineCitation><PubmedData><PublicationStatus>ppublish</PublicationStatus></PubmedData>"
            f"</PubmedArticle>"
        )
    out.append("</PubmedArticleSet>")
    return "\n".join(out).encode()


def eutils_app(records: dict) -> Callable[[Request], Reply]:
    def app(request: Request) -> Reply:
        form = request.form()
        if request.path.endswith("/esearch.fcgi"):
            if form.get("db") != "pubmed":
                return json_reply(
                    {"esearchresult": {"ERROR": f"Invalid db name specified: {form.get('db')}"}}
                )
            retmax = int(form.get("retmax", 20))
            ids = sorted(records)[:retmax]
            return json_reply(
                {
                    "header": {"type": "esearch", "version": "0.3"},
                    "esearchresult": {
                        "count": str(len(records)), "retmax": str(len(ids)), "retstart": "0", "idlist": ids,
                        "translationset": [], "querytranslation": form.get("term", ""),
                    },
                }
            )
        if request.path.endswith("/efetch.fcgi"):
            ids = [i for i in form.get("id", "").split(",") if i]
            return Reply(200, pubmed_xml(records, ids), {"Content-Type": "text/xml; charset=UTF-8"})
        return Reply(404, b"unknown utility")

    return app


# --- ECMWF data stores (CDS): OGC API - Processes submit / poll / results, then the asset download ----------

def cds_app(
    datasets: dict[str, bytes], token: str, polls_before_success: int = 0
) -> Callable[[Request], Reply]:
    jobs: dict[str, dict] = {}

    def error(status: int, title: str, detail: str = "") -> Reply:
        return json_reply({"type": "about:blank", "title": title, "status": status, "detail": detail}, status)

    def app(request: Request) -> Reply:
        base = f"http://{request.headers['host']}"
        path = request.path
        if path == "/api/catalogue/v1/messages":
            return json_reply({"messages": []})
        if path.startswith("/download/"):
            job = jobs.get(path.rsplit("/", 1)[1].split(".")[0])
            return Reply(200, job["data"], {"Content-Type": "application/netcdf"}, ranges=True) if job else \
                error(404, "no such file")
        if not path.startswith("/api/retrieve/v1/"):
            return error(404, "not found")
        if request.headers.get("private-token") != token:
            return error(401, "Authentication failed", "the API token is not valid")
        rest = path[len("/api/retrieve/v1/"):].split("/")
        if rest[0] == "processes" and len(rest) >= 2:
            if rest[1] not in datasets:
                return error(404, "Process not found", f"process {rest[1]} does not exist")
            if len(rest) == 2:
                return json_reply({"id": rest[1], "title": rest[1], "links": []})
            if rest[2:] == ["execution"] and request.method == "POST":
                inputs = json.loads(request.body)["inputs"]
                job_id = uuid.uuid4().hex
                jobs[job_id] = {"polls": 0, "data": datasets[rest[1]], "inputs": inputs, "process": rest[1]}
                return json_reply(
                    {
                        "processID": rest[1],
                        "type": "process",
                        "jobID": job_id,
                        "status": "accepted",
                        "links": [
                            {
                                "href": f"{base}/api/retrieve/v1/jobs/{job_id}",
                                "rel": "monitor",
                                "type": "application/json",
                            }
                        ],
                    },
                    201,
                )
        if rest[0] == "jobs" and len(rest) >= 2 and rest[1] in jobs:
            job = jobs[rest[1]]
            if len(rest) == 2:
                job["polls"] += 1
                status = "successful" if job["polls"] > app.polls_before_success else "running"
                links = [{"href": f"{base}/api/retrieve/v1/jobs/{rest[1]}/results", "rel": "results"}] \
                    if status == "successful" else []
                return json_reply({"processID": job["process"], "jobID": rest[1], "status": status,
                                   "type": "process", "metadata": {}, "links": links})
            if rest[2:] == ["results"]:
                return json_reply({"asset": {"value": {"type": "application/netcdf",
                                                       "href": f"{base}/download/{rest[1]}.nc",
                                                       "file:size": len(job["data"])}}})
        return error(404, "not found")

    app.jobs = jobs
    app.polls_before_success = polls_before_success
    return app


# --- MAST portal API (columnsconfig, invoke: Mast.Caom.Filtered / Mast.Caom.Products, Download/file) --------

CAOM_COLUMNS = {"obs_collection": "string", "target_name": "string", "dataproduct_type": "string",
                "obs_id": "string", "obsid": "string", "instrument_name": "string", "t_min": "float"}
PRODUCT_COLUMNS = {"obsID": "string", "obs_collection": "string", "dataproduct_type": "string",
                   "productType": "string", "productGroupDescription": "string",
                   "productSubGroupDescription": "string", "dataURI": "string", "productFilename": "string",
                   "size": "int", "calib_level": "int"}


def mast_app(
    observations: list[dict], products: list[dict], files: dict[str, bytes], token: str | None = None
):
    def table(rows: list[dict], columns: dict[str, str]) -> Reply:
        return json_reply({"status": "COMPLETE", "msg": "", "data": rows,
                           "fields": [{"name": n, "type": t} for n, t in columns.items()],
                           "paging": {"page": 1, "pageSize": len(rows), "pagesFiltered": 1, "rows": len(rows),
                                      "rowsFiltered": len(rows), "rowsTotal": len(rows)}})

    def app(request: Request) -> Reply:
        if request.path == "/whoami":
            cookie = request.headers.get("cookie", "")
            known = token is not None and f"mast_token={token}" in cookie
            return json_reply(
                {"anon": not known, "attrib": {"display_name": "Loopback User"} if known else {}}
            )
        if request.path.endswith("/columnsconfig"):
            return json_reply({name: {"vot.datatype": "double" if kind == "float" else "char", "text": name}
                               for name, kind in CAOM_COLUMNS.items()})
        if request.path == "/api/v0/invoke":
            mashup = json.loads(request.form()["request"])
            if mashup["service"] == "Mast.Caom.Filtered":
                rows = observations
                for entry in mashup["params"]["filters"]:
                    rows = [r for r in rows if str(r.get(entry["paramName"])) in entry["values"]]
                return table(rows, CAOM_COLUMNS)
            if mashup["service"] == "Mast.Caom.Products":
                wanted = set(mashup["params"]["obsid"].split(","))
                return table([p for p in products if p["obsID"] in wanted], PRODUCT_COLUMNS)
            return json_reply({"status": "ERROR", "msg": f"unknown service {mashup['service']}"})
        if request.path == "/api/v0.1/Download/file":
            uri = request.query.get("uri", "")
            if uri not in files:
                return Reply(404, b"no such product")
            return Reply(200, files[uri], {"Content-Type": "application/fits"}, ranges=True)
        return Reply(404, b"not found")

    return app


# --- S3: moto's server behind a forwarding proxy that the fault plan can break ------------------------------

def proxy_app(target_port: int) -> Callable[[Request], Reply]:
    hop_by_hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def app(request: Request) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
        headers = {k: v for k, v in request.headers.items() if k not in hop_by_hop}
        headers["host"] = request.headers.get("host", "")
        connection.request(request.method, request.raw_path, body=request.body or None, headers=headers)
        response = connection.getresponse()
        body = response.read()
        reply_headers = {k: v for k, v in response.getheaders() if k.lower() not in hop_by_hop}
        connection.close()
        return Reply(response.status, body, reply_headers)

    return app


# --- helpers shared by the fetch tests ----------------------------------------------------------------------

class SleepRecorder:
    """Stands in for ``time.sleep`` in the retry policy: records each wait, sleeps at most 10 ms.

    The tests' read timeout is 10 s except where a stall is injected, so a slow, busy machine does not cause
    retries that a test does not expect."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(min(seconds, 0.01))


def fast_policy(attempts: int = 4, timeout: float = 10.0):
    from sapwood.data.sources.reliability import RetryPolicy

    return RetryPolicy(attempts=attempts, backoff=0.01, max_wait=30.0, timeout=timeout, sleep=SleepRecorder())


def fetch_through_fault(server, fault: Fault, source: str, out, catalog, overrides=None):
    """Fetch ``source`` with ``fault`` injected once into ``server``'s replies and check that it was met and
    retried: one wait (a stall may time out more than one request on a busy machine), and after a 429 the
    wait its ``Retry-After`` asks for. Returns the retry policy (its recorded waits)."""
    from sapwood.data.sources import fetch_sources

    policy = fast_policy(attempts=6, timeout=0.5 if fault.kind == "hang" else 10.0)
    server.plan.add(fault)
    fetch_sources([source], out, [catalog], overrides, policy=policy)
    assert server.plan.injected == [fault]
    assert len(policy.sleep.waits) == 1 or (fault.kind == "hang" and policy.sleep.waits)
    if fault.status == 429:
        assert policy.sleep.waits == [float(fault.headers["Retry-After"])]
    return policy


def write_catalog(path, sources: dict) -> object:
    import yaml

    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


def assert_clean(out, after_failure: bool = False) -> None:
    """No temporary file is left (after a failed run only hidden ``.NAME.part`` files, kept for resuming,
    never anything that looks complete), and every cache record matches the files it names (size and
    sha256)."""
    import hashlib
    from pathlib import Path

    out = Path(out)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".part")]
    if after_failure:
        assert all(p.name.startswith(".") for p in leftovers), leftovers
    else:
        assert leftovers == [], f"temporary files left behind: {leftovers}"
    from sapwood.data.sources.storage import RequestCache

    cache = RequestCache(out)
    for record_path in (out / ".sapwood-fetch").glob("*.json"):
        record = json.loads(record_path.read_text())
        served = cache.lookup(record["request"])
        if served is None:  # stale (a file was rewritten or removed since): never served
            continue
        for entry, file in zip(record["files"], served, strict=True):
            assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"], (
                f"{file} differs from its record"
            )
