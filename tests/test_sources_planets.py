"""Exoplanet catalog -> planet parameters for `sapwood simulate --planets`: the documented mapping and
filling."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
from fetch_servers import EXOPLANET_COLUMNS, exoplanet_rows

from sapwood.data.sources.planets import (
    FIELDS,
    SUPPORTED,
    chen_kipping_mass,
    draw_planets,
    planet_from_row,
)
from sapwood.errors import SapwoodError

ROWS = {r["pl_name"]: r for r in exoplanet_rows()}


@pytest.fixture
def catalog_csv(tmp_path):
    path = tmp_path / "exoplanets.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([c[0] for c in EXOPLANET_COLUMNS])
        for row in exoplanet_rows():
            writer.writerow(["" if row[c[0]] is None else row[c[0]] for c in EXOPLANET_COLUMNS])
    return path


def test_measured_values_are_converted_to_si():
    planet = planet_from_row(ROWS["TRAPPIST-1 e"])
    assert planet.values["radius"] == pytest.approx(0.920 * 6.371e6)
    assert planet.values["gravity"] == pytest.approx(9.81 * 0.692 / 0.920**2)
    assert planet.values["rotation_rate"] == pytest.approx(2 * math.pi / (6.1010 * 86400))  # tidally locked
    assert planet.values["stellar_flux"] == pytest.approx(0.646 * 1361)
    assert planet.values["surface_pressure"] == 1e5
    assert planet.origin == {"radius": "measured", "gravity": "measured", "rotation_rate": "derived",
                             "stellar_flux": "measured", "surface_pressure": "filled"}


def test_unknowns_are_filled_as_documented():
    proxima = planet_from_row(ROWS["Proxima Cen b"])  # no mass: Chen & Kipping Terran branch
    assert chen_kipping_mass(1.07) == pytest.approx((1.07 / 1.008) ** (1 / 0.279))
    assert proxima.values["gravity"] == pytest.approx(9.81 * chen_kipping_mass(1.07) / 1.07**2)
    assert proxima.origin["gravity"] == "derived"
    assert chen_kipping_mass(2.61) == pytest.approx((2.61 / 0.808) ** (1 / 0.589))  # Neptunian branch
    kepler452 = planet_from_row(ROWS["Kepler-452 b"])  # no insolation, long orbit
    semi_major = (1.037 * (384.843 / 365.25) ** 2) ** (1 / 3)
    assert kepler452.values["stellar_flux"] == pytest.approx(
        1361 * 1.11**2 * (5757 / 5772) ** 4 / semi_major**2
    )
    assert kepler452.values["rotation_rate"] == 7.292e-5 and kepler452.origin["rotation_rate"] == "filled"
    trappist_f = planet_from_row(ROWS["TRAPPIST-1 f"])  # no insolation: from the star and Kepler's law
    assert trappist_f.origin["stellar_flux"] == "derived"
    only_teq = planet_from_row({"pl_name": "x", "pl_rade": 1.0, "pl_eqt": 255.0})
    assert only_teq.values["stellar_flux"] == pytest.approx(4 * 5.670374e-8 * 255.0**4 / 0.7)
    bare = planet_from_row({"pl_name": "y", "pl_rade": 1.0})
    assert bare.values["stellar_flux"] == 1361 and bare.origin["stellar_flux"] == "filled"
    assert planet_from_row({"pl_name": "z", "pl_rade": 1.0, "surface_pressure": 9.2e6}).values[
        "surface_pressure"] == 9.2e6


def test_draw_is_seeded_clipped_and_skips_rows_without_radius(catalog_csv):
    planets = draw_planets(catalog_csv, runs=10, seed=4)
    assert [p.name for p in planets] == [p.name for p in draw_planets(catalog_csv, runs=10, seed=4)]
    assert sorted(p.name for p in planets) == sorted(n for n in ROWS if n != "no radius")  # all 10, once each
    assert [p.name for p in draw_planets(catalog_csv, runs=10, seed=5)] != [p.name for p in planets]
    hot_jupiter = next(p for p in planets if p.name == "HD 209458 b")
    assert hot_jupiter.values["radius"] == SUPPORTED["radius"][1]
    assert hot_jupiter.origin["radius"].startswith("clipped from 9.93")
    for planet in planets:
        for field in FIELDS:
            low, high = SUPPORTED[field]
            assert low <= planet.values[field] <= high


def test_catalog_without_radii_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("pl_name,pl_rade\nx,\n")
    with pytest.raises(SapwoodError, match="no rows with pl_rade"):
        draw_planets(path, runs=2)
    with pytest.raises(SapwoodError, match="does not exist"):
        draw_planets(tmp_path / "missing.csv", runs=2)


def test_simulator_is_stable_at_every_corner_of_the_supported_range():
    from sapwood.data.simulate import Grid, PlanetParams, Simulation

    for corner in itertools.product(*(SUPPORTED[f] for f in FIELDS)):
        simulation = Simulation(PlanetParams(**dict(zip(FIELDS, corner, strict=True))),
                                Grid(levels=2, nlat=8, nlon=16, times=2, spinup_days=1))
        for _ in range(2):
            simulation.advance()
        assert np.isfinite(simulation.temperature).all() and (simulation.temperature > 0).all(), corner
        assert simulation.humidity.min() >= 0, corner


def test_parquet_catalog_reads_like_csv(tmp_path, catalog_csv):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = exoplanet_rows()
    table = pa.table({name: [r[name] for r in rows] for name, _, _ in EXOPLANET_COLUMNS})
    pq.write_table(table, tmp_path / "exoplanets.parquet")
    from_parquet = draw_planets(tmp_path / "exoplanets.parquet", runs=4, seed=9)
    from_csv = draw_planets(catalog_csv, runs=4, seed=9)
    assert [(p.name, p.values) for p in from_parquet] == [(p.name, p.values) for p in from_csv]
