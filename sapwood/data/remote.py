"""Zarr stores on S3 (``s3://BUCKET/KEY``) as inputs of ``sapwood prepare``, read through fsspec and s3fs.

A URL names one Zarr store (v3 ``zarr.json`` or v2 ``.zgroup``/``.zarray`` under it) or a prefix whose
``*.zarr`` children are taken, as a local folder's are. Everything comes from the environment, never from
arguments or files:

- credentials: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (plus ``AWS_SESSION_TOKEN`` for temporary
  ones), or ``AWS_NO_SIGN_REQUEST=YES`` for unsigned requests to a public bucket; shared credential files,
  profiles and instance metadata are not consulted;
- the endpoint of an S3-compatible service: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (default AWS);
- the region: ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` (default ``us-east-1``).

Every failure (no credentials, an unreachable endpoint, a missing bucket or store, a refused request) is one
line naming the URL, with every credential value replaced by ``***``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from sapwood.errors import SapwoodError

SCHEME = "s3://"
STORE_MARKERS = ("zarr.json", ".zgroup", ".zarray")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120


class RemoteInputError(SapwoodError):
    """A remote input cannot be reached or listed (the message is one line without credentials)."""


@dataclass(frozen=True)
class RemoteZarr:
    """One Zarr store on S3, named by its URL (``s3://bucket/key``, no trailing slash). Has the few path
    attributes that prepare's reports use (``name``, ``suffix``, ``parent``); it is never a local file."""

    url: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))

    @property
    def bucket(self) -> str:
        return self.url[len(SCHEME) :].split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.url[len(SCHEME) :].split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        stem, dot, ext = self.name.rpartition(".")
        return f".{ext}" if dot and stem else ""

    @property
    def parent(self) -> str:
        return self.url.rsplit("/", 1)[0] if self.key else self.url

    def is_file(self) -> bool:
        return False

    def is_dir(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.url


def is_remote(value: Any) -> bool:
    """Whether ``value`` names an S3 input (a :class:`RemoteZarr` or a string starting with ``s3://``)."""
    return isinstance(value, RemoteZarr) or (isinstance(value, str) and value.startswith(SCHEME))


def normalize_url(url: str) -> str:
    if not url.startswith(SCHEME) or not url[len(SCHEME) :].strip("/"):
        raise RemoteInputError(f"{url!r}: an S3 input is s3://BUCKET/KEY")
    return SCHEME + url[len(SCHEME) :].strip("/")


def as_input(text: str) -> Any:
    """A recorded input name back as a :class:`RemoteZarr` (``s3://``) or a local :class:`~pathlib.Path`."""
    from pathlib import Path

    return RemoteZarr(text) if is_remote(text) else Path(text)


# --- configuration from the environment ---------------------------------------------------------------------
def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def endpoint() -> str | None:
    return _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def storage_options(url: str) -> dict[str, Any]:
    """The s3fs options for reading ``url``, from the environment (see the module docstring)."""
    anonymous = (_env("AWS_NO_SIGN_REQUEST") or "").lower() in ("yes", "true", "1")
    options: dict[str, Any] = {
        "use_listings_cache": False,
        "client_kwargs": {"region_name": _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"},
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": 3, "mode": "standard"},
        },
    }
    if endpoint():
        options["endpoint_url"] = endpoint()
    if anonymous:
        return {**options, "anon": True}
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        raise RemoteInputError(
            f"{url}: no S3 credentials in the environment: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), or "
            "AWS_NO_SIGN_REQUEST=YES for a public bucket"
        )
    return {**options, "anon": False, "key": key, "secret": secret, "token": _env("AWS_SESSION_TOKEN")}


def redact(text: str) -> str:
    """``text`` on one line with every credential value of the environment replaced by ``***``."""
    from sapwood.data.sources.credentials import Redactor, one_line

    return one_line(Redactor.from_environment()(str(text)))


def filesystem(url: str) -> Any:
    """A fresh s3fs file system for ``url`` (no cached instance or listing, so a rerun sees changes)."""
    options = storage_options(url)
    try:
        import s3fs
    except ImportError:
        raise RemoteInputError(
            f"{url}: reading s3:// inputs needs s3fs (pip install 'sapwood[sources]')"
        ) from None
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def _failure(url: str, exc: BaseException, doing: str) -> RemoteInputError:
    where = endpoint() or "AWS S3"
    text = redact(f"{type(exc).__name__}: {exc}")
    names = {type(c).__name__ for c in _chain(exc)}
    if names & {
        "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
        "ConnectionRefusedError", "ClientConnectionError", "ServerDisconnectedError",
    }:
        return RemoteInputError(f"{url}: endpoint {where} unreachable while {doing} ({text[:200]})")
    if isinstance(exc, PermissionError) or names & {"NoCredentialsError", "PartialCredentialsError"}:
        return RemoteInputError(
            f"{url}: access refused by {where} while {doing}; check the credentials in "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({text[:200]})"
        )
    return RemoteInputError(f"{url}: {doing} failed at {where} ({text[:240]})")


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _bucket_exists(fs: Any, bucket: str) -> bool:
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        return False
    return True


def resolve(url: str) -> list[RemoteZarr]:
    """The Zarr stores that ``url`` names: itself when it is a store, else its ``*.zarr`` children, sorted."""
    url = normalize_url(url)
    fs = filesystem(url)
    target = url[len(SCHEME) :]
    try:
        names = {entry.rstrip("/").rsplit("/", 1)[-1]: entry for entry in fs.ls(target, detail=False)}
    except FileNotFoundError as exc:
        try:
            exists = _bucket_exists(fs, target.split("/", 1)[0])
        except Exception as inner:  # noqa: BLE001 - any client failure becomes one line
            raise _failure(url, inner, "listing the bucket") from None
        if not exists:
            raise RemoteInputError(
                f"{url}: bucket {target.split('/', 1)[0]!r} does not exist at {endpoint() or 'AWS S3'}"
            ) from None
        if "/" not in target:
            raise _failure(url, exc, "listing") from None
        raise RemoteInputError(f"{url}: nothing stored under this key") from None
    except Exception as exc:  # noqa: BLE001 - any client failure becomes one line
        raise _failure(url, exc, "listing") from None
    if any(marker in names for marker in STORE_MARKERS):
        return [RemoteZarr(url)]
    stores = [
        RemoteZarr(SCHEME + entry.rstrip("/"))
        for name, entry in sorted(names.items())
        if name.endswith(".zarr")
    ]
    if not stores:
        raise RemoteInputError(
            f"{url}: no Zarr store there (no zarr.json, .zgroup or .zarray, and no *.zarr "
            "inside); NetCDF files on S3 are fetched first with `sapwood fetch`"
        )
    return stores


def fingerprint(store: RemoteZarr) -> str:
    """A digest of every object of ``store`` (key, size, ETag): it changes when any object changes."""
    fs = filesystem(store.url)
    try:
        found = fs.find(store.url[len(SCHEME) :], detail=True)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes one line
        raise _failure(store.url, exc, "listing the store") from None
    h = hashlib.sha256(f"{endpoint() or ''}|{store.url}\n".encode())
    for key in sorted(found):
        info = found[key]
        h.update(f"{key}|{info.get('size')}|{info.get('ETag') or info.get('LastModified')}\n".encode())
    return h.hexdigest()


def open_zarr(store: RemoteZarr) -> Any:
    """``xarray.open_zarr`` of ``store`` through s3fs (times left undecoded, masks and packing decoded)."""
    import xarray as xr

    options = storage_options(store.url)
    fs = filesystem(store.url)
    root = store.url[len(SCHEME) :]
    try:
        consolidated = fs.exists(f"{root}/.zmetadata") or _consolidated_v3(fs, root)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes one line
        raise _failure(store.url, exc, "reading the store's metadata") from None
    return xr.open_zarr(store.url, decode_times=False, consolidated=consolidated, storage_options=options)


def _consolidated_v3(fs: Any, root: str) -> bool:
    import json

    try:
        return json.loads(fs.cat_file(f"{root}/zarr.json")).get("consolidated_metadata") is not None
    except (FileNotFoundError, ValueError):
        return False
