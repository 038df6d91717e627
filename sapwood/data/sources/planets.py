"""Planet parameters for ``sapwood simulate --planets CATALOG`` from an exoplanet catalog.

The catalog is a CSV or Parquet file with the NASA Exoplanet Archive's column names (what
``sapwood fetch nasa-exoplanets`` writes). ``runs`` rows are drawn at random (seeded; without replacement
while rows last) among the rows with a radius, and each becomes a
:class:`~sapwood.data.simulate.PlanetParams`:

================  =====================================================================================
parameter         from the catalog (first that applies)
================  =====================================================================================
radius            ``pl_rade`` [Earth radii] x 6.371e6 m (rows without it are not drawn)
gravity           ``9.81 * pl_bmasse / pl_rade**2`` [m s-2]; without a mass, the mass from Chen & Kipping
                  (2017)'s mass-radius relation ``R = C M^S`` (Terran C=1.008, S=0.279 below 1.23 R_E;
                  Neptunian C=0.808, S=0.589 above)
rotation_rate     ``2 pi / pl_rotper`` when the catalog has it [days]; else synchronous with the orbit,
                  ``2 pi / pl_orbper``, for orbits up to 100 days (tidally locked); else Earth's 7.292e-5 s-1
stellar_flux      ``pl_insol`` [Earth fluxes] x 1361 W m-2; else ``(st_rad)^2 (st_teff/5772 K)^4 / a^2`` with
                  ``a = pl_orbsmax`` [au] or Kepler's third law from ``pl_orbper`` and ``st_mass``; else
                  ``4 sigma pl_eqt^4 / 0.7`` (equilibrium temperature, Bond albedo 0.3, full redistribution);
                  else Earth's 1361 W m-2
surface_pressure  ``surface_pressure`` [Pa] when the catalog has it; else 1e5 Pa (Earth's surface; for giant
                  planets the conventional 1-bar reference level)
================  =====================================================================================

Every value is then clipped to the range the simulator is built for (:data:`SUPPORTED`: its explicit
radiative relaxation and transport stay stable there); :func:`write_provenance` records, per run, the planet's
name, each value, and whether it was ``measured``, ``derived``, ``filled`` or ``clipped``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sapwood.constants import EARTH, STEFAN_BOLTZMANN
from sapwood.errors import SapwoodError

EARTH_RADIUS = EARTH["planet_radius"]  # m
EARTH_GRAVITY = EARTH["gravity"]  # m s-2
EARTH_ROTATION = EARTH["rotation_rate"]  # s-1
EARTH_FLUX = EARTH["stellar_flux"]  # W m-2
EARTH_PRESSURE = EARTH["mean_surface_pressure"]  # Pa
SUN_TEFF = 5772.0  # K, IAU 2015 nominal
BOND_ALBEDO = 0.3
TIDAL_LOCK_DAYS = 100.0
DAY = 86400.0
SUPPORTED = {  # PlanetParams field -> (low, high), SI units
    "radius": (0.3 * EARTH_RADIUS, 4.0 * EARTH_RADIUS),
    "gravity": (2.0, 30.0),
    "rotation_rate": (0.1 * EARTH_ROTATION, 4.0 * EARTH_ROTATION),
    "stellar_flux": (0.1 * EARTH_FLUX, 4.0 * EARTH_FLUX),
    "surface_pressure": (1.0e4, 1.0e6),
}
FIELDS = tuple(SUPPORTED)


@dataclass
class CatalogPlanet:
    """One drawn planet: its catalog name, SI values and where each value came from."""

    name: str
    values: dict[str, float]
    origin: dict[str, str]


def read_catalog(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet table as dicts (empty cells are ``None``)."""
    if not path.is_file():
        raise SapwoodError(
            f"planet catalog {str(path)!r} does not exist; fetch one with 'sapwood fetch nasa-exoplanets'"
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="") as handle:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(row: dict[str, Any], column: str) -> float | None:
    value = row.get(column)
    try:
        number = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) and number > 0 else None


def chen_kipping_mass(radius_earth: float) -> float:
    """Mass [Earth masses] from radius [Earth radii] (Chen & Kipping 2017, ApJ 834, 17; Terran/Neptunian)."""
    if radius_earth < 1.008 * 2.04**0.279:
        return (radius_earth / 1.008) ** (1 / 0.279)
    return (radius_earth / 0.808) ** (1 / 0.589)


def planet_from_row(row: dict[str, Any]) -> CatalogPlanet:
    """The mapping documented in this module's docstring, before clipping."""
    radius_earth = _number(row, "pl_rade")
    if radius_earth is None:
        raise SapwoodError(f"planet {row.get('pl_name')!r} has no pl_rade")
    values, origin = {"radius": radius_earth * EARTH_RADIUS}, {"radius": "measured"}

    mass = _number(row, "pl_bmasse")
    origin["gravity"] = "measured" if mass is not None else "derived"
    mass = mass if mass is not None else chen_kipping_mass(radius_earth)
    values["gravity"] = EARTH_GRAVITY * mass / radius_earth**2

    rotation_days, orbit_days = _number(row, "pl_rotper"), _number(row, "pl_orbper")
    if rotation_days is not None:
        values["rotation_rate"], origin["rotation_rate"] = 2 * math.pi / (rotation_days * DAY), "measured"
    elif orbit_days is not None and orbit_days <= TIDAL_LOCK_DAYS:
        values["rotation_rate"], origin["rotation_rate"] = 2 * math.pi / (orbit_days * DAY), "derived"
    else:
        values["rotation_rate"], origin["rotation_rate"] = EARTH_ROTATION, "filled"

    values["stellar_flux"], origin["stellar_flux"] = _stellar_flux(row, orbit_days)

    pressure = _number(row, "surface_pressure")
    values["surface_pressure"] = pressure if pressure is not None else EARTH_PRESSURE
    origin["surface_pressure"] = "measured" if pressure is not None else "filled"
    return CatalogPlanet(str(row.get("pl_name") or "unnamed"), values, origin)


def _stellar_flux(row: dict[str, Any], orbit_days: float | None) -> tuple[float, str]:
    insolation = _number(row, "pl_insol")
    if insolation is not None:
        return insolation * EARTH_FLUX, "measured"
    teff, star_radius = _number(row, "st_teff"), _number(row, "st_rad")
    semi_major = _number(row, "pl_orbsmax")
    star_mass = _number(row, "st_mass")
    if semi_major is None and orbit_days is not None and star_mass is not None:
        semi_major = (star_mass * (orbit_days / 365.25) ** 2) ** (1 / 3)
    if teff is not None and star_radius is not None and semi_major is not None:
        return EARTH_FLUX * star_radius**2 * (teff / SUN_TEFF) ** 4 / semi_major**2, "derived"
    equilibrium = _number(row, "pl_eqt")
    if equilibrium is not None:
        return 4 * STEFAN_BOLTZMANN * equilibrium**4 / (1 - BOND_ALBEDO), "derived"
    return EARTH_FLUX, "filled"


def clip_to_supported(planet: CatalogPlanet) -> CatalogPlanet:
    for field, (low, high) in SUPPORTED.items():
        value = planet.values[field]
        clipped = min(max(value, low), high)
        if clipped != value:
            planet.values[field] = clipped
            planet.origin[field] = f"clipped from {value:.6g}"
    return planet


def draw_planets(path: Path, runs: int, seed: int = 0) -> list[CatalogPlanet]:
    """``runs`` planets drawn from the catalog at ``path`` (seeded), mapped and clipped."""
    rows = [row for row in read_catalog(path) if _number(row, "pl_rade") is not None]
    if not rows:
        raise SapwoodError(
            f"planet catalog {str(path)!r} has no rows with pl_rade (planet radius in Earth radii)"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    picks = [int(order[i % len(rows)]) for i in range(runs)]
    return [clip_to_supported(planet_from_row(rows[i])) for i in picks]


def planet_params(planets: list[CatalogPlanet]) -> list:
    from sapwood.data.simulate import PlanetParams

    return [PlanetParams(**{f: float(p.values[f]) for f in FIELDS}) for p in planets]


def write_provenance(planets: list[CatalogPlanet], path: Path) -> Path:
    """``run, name, <field>, <field>_origin ...`` for each run, written atomically."""
    from sapwood.data.sources.storage import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "name", *[c for f in FIELDS for c in (f, f"{f}_origin")]])
        for run, planet in enumerate(planets):
            writer.writerow(
                [
                    run,
                    planet.name,
                    *[c for f in FIELDS for c in (f"{planet.values[f]:.6g}", planet.origin[f])],
                ]
            )
    return path
