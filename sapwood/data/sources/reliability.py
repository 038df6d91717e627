"""Retries, rate limits and HTTP sessions shared by every source.

* :class:`RetryPolicy`: exponential backoff with full jitter (tenacity), ``Retry-After`` honoured, a bounded
  number of attempts; its numbers come from ``SAPWOOD_FETCH_*`` environment variables so tests can shrink
  them.
* :class:`RateLimiter`: at most ``rate`` requests per second per source, shared by all its threads.
* :class:`HttpSession`: a ``requests.Session`` that waits for the source's rate limiter before every request
  and always has a timeout; the clients that accept a session (pyvo, astroquery, cdsapi) are given one.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests

from sapwood.errors import SapwoodError

log = logging.getLogger("sapwood.fetch")
T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransientError(Exception):
    """A failure worth retrying (a 5xx or 429, a truncated or corrupt transfer); may carry ``retry_after``."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SapwoodError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise SapwoodError(f"{name}={raw!r} must be >= 0")
    return value


@dataclass
class RetryPolicy:
    """How often and how patiently to retry (defaults, or ``SAPWOOD_FETCH_ATTEMPTS / _BACKOFF / _MAX_WAIT /
    _TIMEOUT``)."""

    attempts: int = 6
    backoff: float = 1.0  # base of the exponential backoff, seconds
    max_wait: float = 60.0  # cap of one wait, Retry-After included
    timeout: float = 60.0  # seconds for connecting and for each read
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        attempts = int(_env_float("SAPWOOD_FETCH_ATTEMPTS", 6))
        if attempts < 1:
            raise SapwoodError(f"SAPWOOD_FETCH_ATTEMPTS={attempts} must be >= 1")
        return cls(attempts=attempts, backoff=_env_float("SAPWOOD_FETCH_BACKOFF", 1.0),
                   max_wait=_env_float("SAPWOOD_FETCH_MAX_WAIT", 60.0),
                   timeout=_env_float("SAPWOOD_FETCH_TIMEOUT", 60.0) or 60.0)

    def wait_seconds(self, attempt: int, error: BaseException | None) -> float:
        """Full-jitter exponential backoff, or the server's ``Retry-After`` when it gave one (capped)."""
        retry_after = retry_after_seconds(error) if error is not None else None
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        return random.uniform(0, min(self.max_wait, self.backoff * 2 ** (attempt - 1)))

    def call(self, what: str, function: Callable[[], T]) -> T:
        """``function()`` retried on transient errors; the last error is re-raised when attempts run out."""
        from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, error)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2f s", what, state.attempt_number,
                        self.attempts, describe(error), state.upcoming_sleep)

        retrying = Retrying(stop=stop_after_attempt(self.attempts), wait=wait, sleep=self.sleep,
                            retry=retry_if_exception(is_transient), before_sleep=before_sleep, reraise=True)
        return retrying(function)


class RateLimiter:
    """At most ``rate`` acquisitions per second (evenly spaced), shared by threads; ``rate <= 0``:
    unlimited."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self) -> float:
        """Wait for the next slot; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + 1.0 / self.rate
        delay = start - now
        if delay > 0:
            self._sleep(delay)
        return delay


class HttpSession(requests.Session):
    """A session that waits for the rate limiter before each request and never waits forever."""

    def __init__(self, limiter: RateLimiter, timeout: float) -> None:
        super().__init__()
        self.limiter, self.timeout = limiter, timeout
        self.headers["User-Agent"] = "sapwood-fetch"

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        self.limiter.acquire()
        return super().request(method, url, *args, **kwargs)


def check_response(response: requests.Response, what: str) -> requests.Response:
    """``response`` when it succeeded; a :class:`TransientError` for 408/429/5xx, a SapwoodError otherwise."""
    if response.status_code < 400:
        return response
    reason = f"HTTP {response.status_code} {response.reason or ''}".strip()
    if response.status_code in RETRYABLE_STATUS:
        raise TransientError(
            f"{what}: {reason}", retry_after=parse_retry_after(response.headers.get("Retry-After"))
        )
    detail = response.text[:200] if response.text else ""
    raise SapwoodError(f"{what}: {reason} {detail}".strip())


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date, RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and everything it wraps (``__cause__``, ``__context__``, pyvo's ``cause``), each once."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        yield current
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None),
                      getattr(current, "reason", None)])


def _status_and_headers(error: BaseException) -> tuple[int | None, dict[str, str]]:
    response = getattr(error, "response", None)
    if isinstance(response, requests.Response):
        return response.status_code, dict(response.headers)
    if isinstance(response, dict):  # botocore ClientError
        metadata = response.get("ResponseMetadata", {})
        return metadata.get("HTTPStatusCode"), {
            k.lower(): v for k, v in metadata.get("HTTPHeaders", {}).items()
        }
    return None, {}


def retry_after_seconds(error: BaseException | None) -> float | None:
    for item in error_chain(error):
        if isinstance(item, TransientError) and item.retry_after is not None:
            return item.retry_after
        status, headers = _status_and_headers(item)
        if status is not None:
            value = headers.get("Retry-After") or headers.get("retry-after")
            if value:
                return parse_retry_after(value)
    return None


def _is_transient_one(error: BaseException) -> bool:
    if isinstance(error, TransientError | TimeoutError | ConnectionError | http.client.IncompleteRead):
        return True
    if isinstance(error, json.JSONDecodeError):  # a reply cut short; retried a bounded number of times
        return True
    if isinstance(
        error,
        requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError
        | requests.exceptions.ContentDecodingError,
    ):
        return True
    status, _ = _status_and_headers(error)
    if status is not None and status in RETRYABLE_STATUS:
        return True
    module = type(error).__module__
    if module.startswith("urllib3") and type(error).__name__ in (
        "ProtocolError", "ReadTimeoutError", "IncompleteRead", "NewConnectionError", "ConnectTimeoutError",
    ):
        return True
    if module.startswith("botocore") and type(error).__name__ in (
            "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
            "IncompleteReadError", "ResponseStreamingError", "ConnectionError"):
        return True
    # pyvo: a VOTable cut off mid-stream fails to parse
    return module.startswith("pyvo") and type(error).__name__ == "DALFormatError"


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or anything it wraps) is a failure that a retry may cure."""
    if isinstance(error, SapwoodError):
        return False
    return any(_is_transient_one(item) for item in error_chain(error))


def describe(error: BaseException | None) -> str:
    """A short one-line description of an error (the redactor runs over it before anyone sees it)."""
    if error is None:
        return "no error"
    status, _ = _status_and_headers(error)
    text = str(error) or type(error).__name__
    prefix = f"HTTP {status}: " if status is not None and str(status) not in text else ""
    return " ".join(f"{prefix}{type(error).__name__}: {text}".split())[:300]
