"""``sapwood fetch``: overrides from ``--set`` / ``--request``, the catalog listing, the summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sapwood.errors import ConfigError, SapwoodError


def parse_overrides(request: Path | None, set_fields: list[str]) -> dict[str, Any]:
    """Fields from a ``--request`` YAML mapping, then ``--set FIELD=VALUE`` items (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    if request is not None:
        if not request.is_file():
            raise ConfigError(f"--request {str(request)!r} does not exist")
        try:
            data = yaml.safe_load(request.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--request {str(request)!r}: not valid YAML ({' '.join(str(exc).split())[:160]})"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"--request {str(request)!r}: expected a mapping of source fields, e.g. 'dataset: ...'"
            )
        overrides.update(data)
    for item in set_fields:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[field.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            overrides[field.strip()] = raw
    return overrides


def fetch_command(
    sources: list[str], out: Path | None, catalogs: list[Path], request: Path | None, set_fields: list[str],
    refresh: bool, list_sources: bool, console, verbose: bool = False,
) -> None:
    import logging

    from sapwood.data.sources import fetch_sources
    from sapwood.data.sources.catalog import Catalog

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    if list_sources:
        catalog = Catalog.load(catalogs)
        for name in catalog.names:
            entry = catalog.entries[name]
            needs = ", ".join(entry.get("credentials", [])) or "no credential"
            console.print(
                f"{name:28s} {entry.get('protocol', '?'):5s} {entry.get('endpoint', '')}  [{needs}]",
                highlight=False, soft_wrap=True, markup=False,
            )
        return
    if not sources:
        raise SapwoodError("name at least one source (sapwood fetch --list shows the catalog)")
    if out is None:
        raise SapwoodError("--out DIR is required: the folder to fetch into")
    from rich.progress import Progress

    overrides = parse_overrides(request, set_fields)
    with Progress(console=console, transient=True, disable=verbose) as bar:
        tasks: dict[str, Any] = {}

        def report(source: str, done: int, total: int | None) -> None:
            if source not in tasks:
                tasks[source] = bar.add_task(source, total=total)
            bar.update(tasks[source], completed=done, total=total)

        results = fetch_sources(sources, out, catalogs, overrides, refresh=refresh, report=report)
    for result in results:
        state = "cached, nothing fetched" if result.cached else "fetched"
        first = result.files[0] if result.files else out
        console.print(
            f"{result.source}: {len(result.files)} file(s), {result.bytes / 1e6:.2f} MB ({state}) -> "
            f"{first if len(result.files) == 1 else first.parent}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
