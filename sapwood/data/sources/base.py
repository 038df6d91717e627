"""What every source has (catalog fields) and what every protocol's fetch receives (:class:`FetchContext`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sapwood.data.sources.credentials import Redactor
from sapwood.data.sources.reliability import HttpSession, RateLimiter, RetryPolicy
from sapwood.data.sources.storage import RequestCache

OPERATIONAL_FIELDS = {"description", "credentials", "credential_files", "rate_limit", "concurrency"}


class SourceBase(BaseModel):
    """One catalog entry. Protocol modules subclass it with their own request fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    protocol: str
    endpoint: str = Field(description="base URL of the service")
    description: str = ""
    credentials: list[str] = Field(default_factory=list, description="environment variables the source reads")
    credential_files: list[str] = Field(
        default_factory=list, description="the client's standard credential files"
    )
    rate_limit: float = Field(5.0, ge=0, description="requests per second (0 = unlimited)")
    concurrency: int = Field(4, ge=1, le=64, description="parallel transfers")

    def identity(self) -> dict[str, Any]:
        """What identifies the data fetched (the cache key): everything but the operational settings."""
        return self.model_dump(exclude=OPERATIONAL_FIELDS, mode="json")


@dataclass
class FetchContext:
    """Everything a protocol's ``fetch`` needs besides its source: output folder and the reliability kit."""

    out: Path
    policy: RetryPolicy
    limiter: RateLimiter
    session: HttpSession
    cache: RequestCache
    redactor: Redactor
    refresh: bool = False
    report: Callable[[int, int | None], None] | None = None  # (files done, files expected) for a progress bar

    @classmethod
    def create(
        cls, source: SourceBase, out: Path, policy: RetryPolicy, redactor: Redactor, refresh: bool = False,
        report: Callable[[int, int | None], None] | None = None,
    ) -> FetchContext:
        limiter = RateLimiter(source.rate_limit)
        return cls(out=out, policy=policy, limiter=limiter, session=HttpSession(limiter, policy.timeout),
                   cache=RequestCache(out), redactor=redactor, refresh=refresh, report=report)

    def __post_init__(self) -> None:
        self._done, self._total, self._lock = 0, None, threading.Lock()

    def expect(self, total: int) -> None:
        """The number of files this fetch will produce, once known."""
        self._total = total
        if self.report:
            self.report(self._done, total)

    def file_done(self) -> None:
        with self._lock:
            self._done += 1
            if self.report:
                self.report(self._done, self._total)
