"""A CMIP6-like family of CF files to try ``sapwood prepare`` on when no files of your own are at hand.

``python -m sapwood.demo.cf_family --out DIR`` writes, with plain xarray (not sapwood's writer), an ensemble
of ``members`` monthly runs on a ``noleap`` calendar, each split into one file per decade-chunk of years the
way CMIP archives are: ``ta`` and ``ua`` on pressure levels given in Pa from the surface up (1000 -> 250 hPa),
``ps`` and ``tos`` at the surface, ``tos`` NaN over two continents, latitude, longitude, level and time
bounds, an ``areacella`` cell measure, and identity attributes (source_id, experiment_id, variant_label).

The fields are built to be learnable but not trivial: a seasonal cycle that is opposite in the two
hemispheres, planetary waves drifting east at a level- and latitude-dependent speed, winds in thermal balance
with the meridional temperature gradient, and red-noise (AR(1)) weather that differs between members.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DAYS_IN_MONTH = np.asarray([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
PLEV = np.asarray([100000.0, 85000.0, 50000.0, 25000.0])
MEASURES = "area: areacella"


def member_fields(member: int, years: int, nlat: int, nlon: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(member)
    months = 12 * years
    lat = np.linspace(-90 + 90 / nlat, 90 - 90 / nlat, nlat)
    lon = np.arange(nlon) * 360 / nlon
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    t = np.arange(months)[:, None, None, None]
    season = np.cos(2 * np.pi * (t - 0.5) / 12)  # peaks in January
    sigma = (PLEV / 1e5)[None, :, None, None]
    base = 288 * sigma**0.19 - 40 * np.sin(phi) ** 2
    seasonal = -12 * np.sin(phi) * season * sigma  # opposite in the two hemispheres
    speed = 0.35 + 0.25 * (1 - sigma)  # radians of longitude per month, faster aloft
    waves = 4 * np.cos(phi) ** 2 * np.cos(3 * lam - speed * t - member) + 2 * np.cos(phi) * np.sin(
        2 * lam - 0.5 * speed * t + 0.3 * member)
    weather = np.zeros((months, PLEV.size, nlat, nlon))
    for month in range(1, months):
        weather[month] = 0.7 * weather[month - 1] + 1.2 * rng.standard_normal((PLEV.size, nlat, nlon))
    ta = base + seasonal + waves + _smooth(weather)
    gradient = np.gradient(ta.mean(-1, keepdims=True), axis=2)
    ua = 10 * (1 - sigma) * np.cos(phi) - 6 * gradient + 0.5 * np.gradient(waves, axis=3)
    ps = 101000 - 800 * np.sin(2 * phi) ** 2 + 150 * waves[:, 0] + 60 * _smooth(weather)[:, 0]
    land = ((np.abs(lat[:, None] - 20) < 25) & (np.abs(lon[None, :] - 100) < 40)) | (
        (np.abs(lat[:, None] + 15) < 20) & (np.abs(lon[None, :] - 300) < 25))
    tos = np.where(land[None], np.nan, ta[:, 0] - 1.5)
    return {"ta": ta, "ua": ua, "ps": ps, "tos": tos, "lat": lat, "lon": lon}


def _smooth(field: np.ndarray) -> np.ndarray:
    """A 1-2-1 filter in latitude and longitude (periodic): weather with a spatial scale of a few cells."""
    out = field
    for axis in (-1, -2):
        if axis == -1:
            rolled = np.roll(out, 1, axis) + np.roll(out, -1, axis)
        else:
            south = np.concatenate([out[..., :1, :], out[..., :-1, :]], axis)
            rolled = south + np.concatenate([out[..., 1:, :], out[..., -1:, :]], axis)
        out = 0.5 * out + 0.25 * rolled
    return out


def write_family(out: Path, members: int = 3, years: int = 12, nlat: int = 16, nlon: int = 32,
                 years_per_file: int = 6) -> list[Path]:
    """Write the family into ``out``; returns the files."""
    import xarray as xr

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for member in range(1, members + 1):
        fields = member_fields(member, years, nlat, nlon)
        lat, lon = fields["lat"], fields["lon"]
        lat_edges = np.linspace(-90, 90, nlat + 1)
        lon_edges = np.arange(nlon + 1) * 360 / nlon
        month_edges = np.concatenate([[0], np.cumsum(np.tile(DAYS_IN_MONTH, years))]).astype(np.float64)
        area = (6.371e6**2 * np.deg2rad(360 / nlon) * np.abs(np.diff(np.sin(np.deg2rad(lat_edges))))[:, None]
                * np.ones(nlon)[None])
        label = f"r{member}i1p1f1"
        for first_year in range(0, years, years_per_file):
            chosen = slice(12 * first_year, 12 * min(years, first_year + years_per_file))
            edges = month_edges[chosen.start:chosen.stop + 1]
            ds = xr.Dataset(
                {"ta": (("time", "plev", "lat", "lon"), fields["ta"][chosen].astype(np.float32),
                        {"standard_name": "air_temperature", "units": "K", "cell_measures": MEASURES}),
                 "ua": (("time", "plev", "lat", "lon"), fields["ua"][chosen].astype(np.float32),
                        {"standard_name": "eastward_wind", "units": "m s-1", "cell_measures": MEASURES}),
                 "ps": (("time", "lat", "lon"), fields["ps"][chosen].astype(np.float32),
                        {"standard_name": "surface_air_pressure", "units": "Pa", "cell_measures": MEASURES}),
                 "tos": (("time", "lat", "lon"), fields["tos"][chosen].astype(np.float32),
                         {"standard_name": "sea_surface_temperature", "units": "K"}),
                 "areacella": (("lat", "lon"), area, {"standard_name": "cell_area", "units": "m2"}),
                 "time_bnds": (("time", "bnds"), np.stack([edges[:-1], edges[1:]], 1)),
                 "plev_bnds": (("plev", "bnds"), np.stack([PLEV + 7500, PLEV - 7500], 1)),
                 "lat_bnds": (("lat", "bnds"), np.stack([lat_edges[:-1], lat_edges[1:]], 1)),
                 "lon_bnds": (("lon", "bnds"), np.stack([lon_edges[:-1], lon_edges[1:]], 1))},
                coords={"time": ("time", (edges[:-1] + edges[1:]) / 2,
                                 {"standard_name": "time", "units": "days since 1850-01-01",
                                  "calendar": "noleap", "axis": "T", "bounds": "time_bnds"}),
                        "plev": ("plev", PLEV, {"standard_name": "air_pressure", "units": "Pa", "axis": "Z",
                                                "positive": "down", "bounds": "plev_bnds"}),
                        "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north",
                                             "axis": "Y", "bounds": "lat_bnds"}),
                        "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east",
                                             "axis": "X", "bounds": "lon_bnds"})},
                attrs={"Conventions": "CF-1.7", "source_id": "TOY-ESM", "experiment_id": "historical",
                       "variant_label": label})
            last_year = min(years, first_year + years_per_file) - 1
            path = out / f"Amon_TOY-ESM_historical_{label}_gn_{1850 + first_year}01-{1850 + last_year}12.nc"
            ds.to_netcdf(path, encoding={"time": {"dtype": "float64"}})
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the NetCDF files")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--years", type=int, default=12)
    args = parser.parse_args()
    paths = write_family(args.out, members=args.members, years=args.years)
    print(f"wrote {len(paths)} files to {args.out}")


if __name__ == "__main__":
    main()
