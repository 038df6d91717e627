"""Credentials for the archives: read from environment variables (or the clients' own standard files),
never from arguments, and redacted from every log record and error message while a fetch runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator

from sapwood.errors import SapwoodError

# Variables whose values are secret wherever they appear (the sources' catalog entries add their own).
KNOWN_SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "CDSAPI_KEY", "ECMWF_DATASTORES_KEY",
    "MAST_API_TOKEN", "NCBI_API_KEY", "ESO_TOKEN", "GAIA_TOKEN",
)
REDACTED = "***"
MIN_SECRET_LENGTH = 4  # shorter values would redact ordinary words


class MissingCredentialError(SapwoodError):
    """A source needs a credential that is not set."""


def require_env(variable: str, source: str, hint: str = "") -> str:
    """The value of ``variable``, or a one-line error naming the variable to set."""
    value = os.environ.get(variable, "").strip()
    if not value:
        extra = f" ({hint})" if hint else ""
        raise MissingCredentialError(
            f"source {source!r} needs a credential: set the environment variable {variable}{extra}"
        )
    return value


def optional_env(variable: str) -> str | None:
    value = os.environ.get(variable, "").strip()
    return value or None


class Redactor:
    """Replaces every known secret value in a text with ``***`` (also URL-encoded forms)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    @classmethod
    def from_environment(cls, variables: Iterable[str] = ()) -> Redactor:
        names = set(KNOWN_SECRET_VARIABLES) | set(variables)
        return cls(os.environ.get(name, "") for name in names)

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < MIN_SECRET_LENGTH:
            return
        from urllib.parse import quote, quote_plus

        self._secrets.update({secret, quote(secret, safe=""), quote_plus(secret)})

    @property
    def pattern(self) -> re.Pattern[str] | None:
        if not self._secrets:
            return None
        return re.compile("|".join(re.escape(s) for s in sorted(self._secrets, key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        pattern = self.pattern
        return pattern.sub(REDACTED, text) if pattern else text


def one_line(text: str, limit: int = 400) -> str:
    """A message squeezed to one line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def redacted_logging(redactor: Redactor) -> Iterator[None]:
    """While active, every log record created anywhere (clients included) has its secrets replaced.

    The record factory formats the message eagerly, so handlers and filters added later, on any logger,
    never see a secret.
    """
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a client's malformed record: keep its raw text
            message = str(record.msg)
        record.msg = redactor(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redactor(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)
