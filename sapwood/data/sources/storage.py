"""Where fetched bytes land: atomic outputs, resumable verified downloads, and the request cache.

* Every output is written under a hidden temporary name (``.NAME.part``) and renamed when complete, so an
  interrupted fetch never leaves a file that looks complete (``prepare`` and ``tokenize`` skip ``.part``).
* :func:`download` resumes a ``.part`` file with an HTTP ``Range`` request and verifies size and checksum; a
  ``.part`` is resumed only from the origin it was started from (``.NAME.origin.part`` records it).
* :class:`RequestCache` keeps one JSON record per request under ``OUT/.sapwood-fetch/``; a record is written
  only after its files are in place, and is trusted only while every file still has its recorded size, so a
  rerun fetches nothing new and an interrupted run is simply resumed. A file rewritten since (another request
  with the same output name) no longer matches its recorded size and modification time, so a stale record is
  never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from sapwood import fsutil
from sapwood.data.sources.reliability import TransientError, check_response

CACHE_FOLDER = ".sapwood-fetch"
CHUNK = 1 << 20
STREAM_CHUNK = 1 << 14  # small reads: a dropped connection loses at most this much of what arrived


def part_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part")


def _origin_path(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".part") + ".origin.part")


def resume_offset(part: Path, origin: dict[str, Any]) -> int:
    """Bytes of ``part`` to keep: all of them when it was started from the same ``origin`` (URL or object and
    its version, size), none otherwise (a ``.part`` from another job or an older object is never spliced)."""
    meta = _origin_path(part)
    try:
        same = json.loads(meta.read_text()) == json.loads(json.dumps(origin, default=str))
    except (OSError, ValueError):
        same = False
    if not same or not part.exists():
        part.unlink(missing_ok=True)
        meta.write_text(json.dumps(origin, default=str))
        return 0
    return part.stat().st_size


def commit(tmp: Path, dest: Path) -> Path:
    """Make ``tmp`` durable and rename it to ``dest`` in one step."""
    fsutil.fsync_file(tmp)
    os.replace(tmp, dest)
    fsutil.fsync_dir(dest.parent)
    return dest


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``dest``; renamed to ``dest`` on success, removed on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        commit(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(dest: Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(session: requests.Session, url: str, dest: Path, expected_size: int | None = None,
             checksum: tuple[str, str] | None = None, what: str = "download") -> Path:
    """Fetch ``url`` into ``dest`` through ``dest``'s ``.part`` file, resuming it with a ``Range`` request.

    Raises :class:`TransientError` on a short or corrupt body (the caller's retry resumes the ``.part``); a
    checksum mismatch discards the ``.part``. ``checksum`` is ``(algorithm, hexdigest)``, e.g. ``("md5",
    ...)``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    offset = resume_offset(part, {"url": url, "size": expected_size})
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True) as response:
        if response.status_code == 416 and expected_size is not None and offset == expected_size:
            return verify_and_commit(part, dest, expected_size, checksum, what)
        check_response(response, what)
        if offset and response.status_code != 206:  # the server ignored the range: start again
            offset = 0
        total = _total_size(response, offset)
        if expected_size is None:
            expected_size = total
        elif total is not None and total != expected_size:
            raise TransientError(f"{what}: server reports {total} bytes, {expected_size} were announced")
        with open(part, "ab" if offset else "wb") as handle:
            for chunk in response.iter_content(STREAM_CHUNK):
                handle.write(chunk)
    return verify_and_commit(part, dest, expected_size, checksum, what)


def _total_size(response: requests.Response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    if response.status_code == 206 and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return (
        int(length) + (offset if response.status_code == 206 else 0) if length and length.isdigit() else None
    )


def verify_and_commit(part: Path, dest: Path, expected_size: int | None, checksum: tuple[str, str] | None,
                       what: str) -> Path:
    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise TransientError(f"{what}: transfer cut short at {size} of {expected_size} bytes")
    if expected_size is not None and size > expected_size:
        part.unlink()
        raise TransientError(f"{what}: received {size} bytes, expected {expected_size}; starting again")
    if checksum is not None:
        algorithm, expected = checksum
        actual = file_digest(part, algorithm)
        if actual != expected.lower():
            part.unlink()
            raise TransientError(f"{what}: {algorithm} {actual} does not match {expected}; starting again")
    commit(part, dest)
    _origin_path(part).unlink(missing_ok=True)
    return dest


def request_key(request: dict[str, Any]) -> str:
    """A stable key for a request: sha256 of its canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class RequestCache:
    """Records of completed requests in ``OUT/.sapwood-fetch/KEY.json``: the files each produced, with
    sizes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.folder = out / CACHE_FOLDER

    def _record_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def lookup(self, request: dict[str, Any]) -> list[Path] | None:
        """The files of a completed identical request, if all are still there with their recorded sizes."""
        path = self._record_path(request_key(request))
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        files = []
        for entry in record.get("files", []):
            file = self.out / entry["path"]
            if not file.is_file():
                return None
            stat = file.stat()
            if stat.st_size != entry["size"] or stat.st_mtime_ns != entry.get("mtime_ns"):
                return None  # rewritten since (e.g. by another request with the same output name)
            files.append(file)
        return files

    def store(self, request: dict[str, Any], files: list[Path]) -> None:
        """Record ``files`` (already in place) as the result of ``request``."""
        entries = [{"path": f.relative_to(self.out).as_posix(), "size": f.stat().st_size,
                    "mtime_ns": f.stat().st_mtime_ns, "sha256": file_digest(f)} for f in files]
        record = {
            "request": request,
            "files": entries,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_bytes_atomic(self._record_path(request_key(request)),
                           json.dumps(record, indent=1, sort_keys=True, default=str).encode())
