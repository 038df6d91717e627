"""S3-compatible object stores (AWS, MinIO, Ceph, ...; any ``endpoint``) through boto3.

Every object under ``prefix`` (optionally only keys ending in one of ``suffixes``, e.g. ``.nc``; a Zarr store
is a prefix and is copied whole) lands in ``OUT/NAME/<key relative to prefix>``. Objects are fetched in
parallel (``concurrency``), each resumed with ranged GETs into its ``.part`` file, pinned to the listed ETag
(``If-Match``) and verified by size and, for single-part uploads, by the ETag's MD5. Each object has its own
cache record (endpoint, bucket, key, ETag, size), so a rerun downloads only new or changed objects.
Credentials: boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/credentials``); ``anonymous: true`` for public buckets.
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sapwood.data.sources.base import FetchContext, SourceBase
from sapwood.data.sources.credentials import MissingCredentialError
from sapwood.data.sources.reliability import TransientError, log
from sapwood.data.sources.storage import STREAM_CHUNK, part_path, resume_offset, verify_and_commit
from sapwood.errors import SapwoodError

PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


class S3Source(SourceBase):
    protocol: Literal["s3"] = "s3"
    bucket: str = ""
    prefix: str = ""
    suffixes: list[str] = Field(default_factory=list, description="keep only keys ending in one of these")
    max_objects: int = Field(10_000, ge=1, description="refuse prefixes with more objects than this")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    region: str = "us-east-1"


@functools.cache
def _service_model_loader():
    """botocore's loader, shared so the S3 service model is parsed once per process, not once per fetch."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def make_client(source: S3Source, ctx: FetchContext):
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    core = botocore.session.get_session()
    core.register_component("data_loader", _service_model_loader())
    session = boto3.session.Session(botocore_session=core)
    if not source.anonymous:
        credentials = session.get_credentials()
        if credentials is None:
            raise MissingCredentialError(
                f"source {source.name!r} needs a credential: set the environment variables AWS_ACCESS_KEY_ID "
                f"and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or mark the source anonymous: true"
            )
        frozen = credentials.get_frozen_credentials()
        for secret in (frozen.access_key, frozen.secret_key, frozen.token):
            ctx.redactor.add(secret)
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=ctx.policy.timeout,
                    read_timeout=ctx.policy.timeout, max_pool_connections=max(10, source.concurrency),
                    signature_version=UNSIGNED if source.anonymous else None,
                    s3={"addressing_style": "path"})
    client = session.client(
        "s3", endpoint_url=source.endpoint or None, region_name=source.region, config=config
    )

    def wait_for_rate_limit(**_: Any) -> None:  # returning None lets botocore send the request
        ctx.limiter.acquire()

    client.meta.events.register("before-send.s3", wait_for_rate_limit)
    return client


def list_objects(client: Any, source: S3Source) -> list[dict[str, Any]]:
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/") or (source.suffixes and not _wanted(key, source.suffixes)):
                continue
            objects.append({"key": key, "size": int(item["Size"]), "etag": item.get("ETag", "")})
            if len(objects) > source.max_objects:
                raise SapwoodError(
                    f"source {source.name!r}: more than max_objects={source.max_objects} objects "
                    f"under s3://{source.bucket}/{source.prefix}; narrow the prefix or raise max_objects"
                )
    return objects


def _wanted(key: str, suffixes: list[str]) -> bool:
    return any(key.endswith(s) or f"{s.rstrip('/')}/" in key for s in suffixes)


def local_path(folder: Path, prefix: str, key: str) -> Path:
    """Where ``key`` lands: its path below the prefix's folder (``a/b/`` for prefixes ``a/b/`` and
    ``a/b/t2m``)."""
    base = prefix if prefix.endswith("/") else prefix.rpartition("/")[0] + "/" if "/" in prefix else ""
    relative = key[len(base):] if base and key.startswith(base) else key
    parts = [p for p in relative.split("/") if p not in ("", ".", "..")]
    if not parts:
        parts = [key.rstrip("/").rsplit("/", 1)[-1]]
    return folder.joinpath(*parts)


def download_object(
    client: Any, source: S3Source, ctx: FetchContext, item: dict[str, Any], dest: Path
) -> Path:
    """One object into ``dest`` through its ``.part`` file; resumes from the bytes already there."""
    from botocore.exceptions import ClientError, FlexibleChecksumError

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    size, etag = item["size"], item["etag"]
    match = PLAIN_MD5_ETAG.match(etag)
    checksum = ("md5", match.group(1)) if match else None
    what = f"s3://{source.bucket}/{item['key']}"
    offset = resume_offset(
        part, {"s3": source.endpoint, "bucket": source.bucket, "key": item["key"], "etag": etag, "size": size}
    )
    if offset > size:
        part.unlink()
        offset = 0
    if offset < size:
        request = {"Bucket": source.bucket, "Key": item["key"]}
        if etag:
            request["IfMatch"] = etag
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            response = client.get_object(**request)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:  # changed since the listing: the next listing decides
                part.unlink(missing_ok=True)
                raise SapwoodError(f"{what} changed while it was fetched; run the fetch again") from None
            raise
        try:
            with open(part, "ab" if offset else "wb") as handle:
                for chunk in response["Body"].iter_chunks(STREAM_CHUNK):
                    handle.write(chunk)
        except FlexibleChecksumError:  # the body does not match the object's checksum: start again
            part.unlink(missing_ok=True)
            raise TransientError(
                f"{what}: checksum of the received body does not match; starting again"
            ) from None
    return verify_and_commit(part, dest, size, checksum, what)


def fetch(source: S3Source, ctx: FetchContext) -> list[Path]:
    if not source.bucket:
        raise SapwoodError(f"source {source.name!r} has no bucket: set bucket (and prefix)")
    client = make_client(source, ctx)
    objects = ctx.policy.call(f"{source.name} (list s3://{source.bucket}/{source.prefix})",
                              lambda: list_objects(client, source))
    if not objects:
        raise SapwoodError(f"source {source.name!r}: no objects under s3://{source.bucket}/{source.prefix}"
                           + (f" ending in {source.suffixes}" if source.suffixes else ""))
    folder = ctx.out / source.name
    ctx.expect(len(objects))

    def fetch_one(item: dict[str, Any]) -> tuple[Path, bool]:
        dest = local_path(folder, source.prefix, item["key"])
        record = {"s3": source.endpoint, "bucket": source.bucket, "key": item["key"], "etag": item["etag"],
                  "size": item["size"]}
        fetched = not ctx.cache.lookup(record)  # per-file records hold even under --refresh
        if fetched:
            ctx.policy.call(f"{source.name} (get {item['key']})",
                            lambda: download_object(client, source, ctx, item, dest))
            ctx.cache.store(record, [dest])
        ctx.file_done()
        return dest, fetched

    with ThreadPoolExecutor(max_workers=source.concurrency) as pool:
        results = list(pool.map(fetch_one, objects))
    fetched = sum(1 for _, new in results if new)
    log.info("%s: %d objects, %d downloaded, %d already cached", source.name, len(results), fetched,
             len(results) - fetched)
    return [path for path, _ in results]

