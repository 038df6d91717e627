"""The source catalog: the packaged ``catalog.yaml`` plus the user's files, validated per protocol."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from sapwood.data.sources.cds import CdsSource
from sapwood.data.sources.mast import MastSource
from sapwood.data.sources.ncbi import NcbiSource
from sapwood.data.sources.s3 import S3Source
from sapwood.data.sources.tap import TapSource
from sapwood.errors import ConfigError

USER_CATALOGS_VARIABLE = "SAPWOOD_SOURCES"
Source = Annotated[
    TapSource | MastSource | CdsSource | NcbiSource | S3Source, Field(discriminator="protocol")
]
PROTOCOLS = ("tap", "mast", "cds", "ncbi", "s3")
_ADAPTER: TypeAdapter = TypeAdapter(Source)


def _read_entries(text: str, origin: str) -> dict[str, dict[str, Any]]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"source catalog {origin}: not valid YAML ({' '.join(str(exc).split())[:200]})"
        ) from None
    entries = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ConfigError(
            f"source catalog {origin}: expected a mapping 'sources: {{NAME: {{protocol: ..., ...}}}}'"
        )
    return entries


def catalog_files(extra: Iterable[Path] = ()) -> list[Path]:
    """User catalogs: ``SAPWOOD_SOURCES`` (os.pathsep-separated) then ``extra``, later ones winning."""
    paths = [Path(p) for p in os.environ.get(USER_CATALOGS_VARIABLE, "").split(os.pathsep) if p.strip()]
    return paths + [Path(p) for p in extra]


class Catalog:
    """Named sources: the packaged entries, each overridden field by field by later user catalogs."""

    def __init__(self, entries: dict[str, dict[str, Any]]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, extra: Iterable[Path] = ()) -> Catalog:
        text = resources.files("sapwood.data.sources").joinpath("catalog.yaml").read_text()
        entries = _read_entries(text, "sapwood/data/sources/catalog.yaml")
        for path in catalog_files(extra):
            if not path.is_file():
                raise ConfigError(f"source catalog {str(path)!r} does not exist")
            for name, fields in _read_entries(path.read_text(), str(path)).items():
                entries[name] = {**entries.get(name, {}), **fields}
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(
        self, name: str, overrides: dict[str, Any] | None = None
    ) -> TapSource | MastSource | CdsSource | NcbiSource | S3Source:
        """The validated source ``name`` with ``overrides`` applied (one-line errors name the bad field)."""
        if name not in self.entries:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown source {name!r}{hint} (known: {', '.join(self.names)}; add your own "
                              f"with --catalog FILE)")
        fields = {**self.entries[name], **(overrides or {}), "name": name}
        if fields.get("protocol") not in PROTOCOLS:
            raise ConfigError(
                f"source {name!r}: protocol={fields.get('protocol')!r}; allowed: {', '.join(PROTOCOLS)}"
            )
        try:
            return _ADAPTER.validate_python(fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"][1:]) or "entry"
            raise ConfigError(f"source {name!r}: {where}={error.get('input')!r}: {error['msg']}") from None
