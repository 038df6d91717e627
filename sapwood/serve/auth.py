"""Bearer API keys from ``SAPWOOD_API_KEYS``. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from sapwood.serve.errors import APIError


class APIKeyAuth:
    def __init__(self, keys: frozenset[str]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str) -> None:
        """Raise a 401 unless ``authorization`` is ``Bearer <a configured key>``."""
        if not self._keys:
            return
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key; send 'Authorization: Bearer <key>'", code="missing_api_key")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, key) for key in self._keys):
            raise APIError(401, "invalid API key", code="invalid_api_key")
