"""A small, real physical model of planetary atmospheres that writes CF-convention NetCDF datacubes.

It is the embedded default data of the scientific side of sapwood (``sapwood simulate --out DIR``):
an ensemble of runs, one NetCDF file per planet, nothing downloaded.

Model
=====
A multi-layer, sigma-coordinate, *kinematic* transport model on a rotating sphere with Newtonian
relaxation of temperature.

Grid (per run)
    * ``lat``: ``nlat`` cell centres, edges ``phi_{j-1/2} = -90 + j*180/nlat`` degrees (poles are edges).
    * ``lon``: ``nlon`` cell centres ``lambda_i = i*360/nlon`` degrees, periodic.
    * ``lev``: ``nlev`` layers of the sigma coordinate ``sigma = p/ps`` (model top ``ptop = 0 Pa``);
      interfaces ``sigma_{k+1/2} = (k+1)/nlev`` (k = 0 is the top layer, lev increases downward),
      ``lev = sigma_k = (k+1/2)/nlev`` at layer midpoints, ``dsigma = 1/nlev``.
      Full-level pressure ``p_k = sigma_k * ps``; layer pressure thickness ``dp_k = dsigma_k * ps``.
    * cell area ``A_j = a^2 * dlambda * (sin phi_{j+1/2} - sin phi_{j-1/2})`` (written as ``cell_area``;
      proportional to the cos-lat weight of the cell).

Winds (prescribed, an exact solution of real dynamics)
    In every layer the flow is a Rossby-Haurwitz wave of zonal wavenumber ``m = 4``, an exact solution of the
    nonlinear non-divergent barotropic vorticity equation on a sphere rotating at ``Omega`` (Haurwitz 1940;
    Williamson et al. 1992 test case 6), with streamfunction::

        psi_k = a^2 * (-w_k sin(phi) + K_k cos(phi)^m sin(phi) cos(m (lambda - nu_k t) + phase))
        u = -(1/a) dpsi/dphi,   v = 1/(a cos phi) dpsi/dlambda
        nu_k = (m (3 + m) w_k - 2 Omega) / ((1 + m)(2 + m))      (the pattern's angular phase speed)

    ``w_k = U_k / a`` with a thermal-wind jet ``U_k = 5 + 60 tanh(R_d dT ln(1/sigma_k) / (2 Omega a) / 60)`` m/s,
    ``K_k = w_k / 2``. The stored ``u``, ``v`` are these analytic winds at cell centres at the output time.

Transport (flux-form finite volume, first-order upwind, conservative to round-off)
    Face volume fluxes come from ``psi`` at cell corners (a discrete curl, so the discrete horizontal
    divergence of every layer's flow is zero up to round-off). Horizontal layer mass fluxes are
    ``dsigma * ps_upwind * face_flux``. Surface pressure obeys the column continuity equation::

        d(ps)/dt + div(sum_k dsigma_k ps V_k) = 0

    and the vertical mass flux between layers is diagnosed so that each layer keeps ``dp_k = dsigma_k ps``.
    Temperature ``T`` and specific humidity ``q`` are carried as ``dp``-weighted tracers with the same
    horizontal and vertical mass fluxes and upwind values (donor cell), so ``q`` stays positive and both
    ``sum T dp A`` and ``sum q dp A`` are changed by transport only by round-off. Substeps are chosen so the
    Courant number is <= 0.4; outputs every ``dt_hours`` (default 6 h).

Forcing (declared; the only non-conservative term)
    After each substep ``T <- T + dt (T_eq - T) / tau`` with radiative equilibrium
    ``T_eq(phi, sigma) = (T0 - dT sin^2 phi) sigma^0.19``, ``T0 = 1.13 (S (1 - 0.3) / (4 sigma_SB))^(1/4)``,
    ``dT = 0.2 T0`` and radiative time ``tau = c_p p0 / (g 4 sigma_SB T0^3)`` (about 22 days for Earth).
    The global-mean heating it did over each output interval is written as ``heating`` [W m-2].
    ``q`` has no source or sink.

Diagnosed variables (thermodynamic and hydrostatic consistency)
    * ideal gas: ``rho = sigma_k ps / (R_d T)``  [kg m-3]
    * hydrostatic geopotential height at full levels (flat surface ``z = 0`` at ``sigma = 1``)::

          zg_k = sum_{m > k} (R_d T_m / g) ln(sigma_{m+1/2} / sigma_{m-1/2}) + (R_d T_k / g) ln(sigma_{k+1/2} / sigma_k)

Constants: ``R_d = 287.04 J kg-1 K-1``, ``c_p = 1004.64 J kg-1 K-1``, ``sigma_SB = 5.670374e-8 W m-2 K-4``
(also written as global attributes ``gas_constant``, ``specific_heat``).

Variables (dims ``(time, lev, lat, lon)`` unless noted, CF ``standard_name`` and ``units`` set)
    ``T`` air_temperature [K], ``u`` eastward_wind [m s-1], ``v`` northward_wind [m s-1],
    ``q`` specific_humidity [kg kg-1], ``ps`` surface_air_pressure [Pa] (time, lat, lon),
    ``rho`` air_density [kg m-3], ``zg`` geopotential_height [m], ``heating`` [W m-2] (time),
    ``cell_area`` [m2] (lat, lon), and the planet parameters as scalar variables (also global attributes):
    ``planet_radius`` [m], ``gravity`` [m s-2], ``rotation_rate`` [s-1], ``stellar_flux`` [W m-2],
    ``mean_surface_pressure`` [Pa].

Budgets (``M = (1/g) sum ps A`` etc.; all sums over cells and layers with ``dp_k = dsigma_k ps``)
    * mass ``sum ps A``: conserved to round-off (relative change < 1e-12 per step in the float64
      integration; < 1e-6 between stored float32 outputs).
    * water ``sum_k sum q dp A``: conserved to round-off (same tolerances).
    * enthalpy ``H = (c_p/g) sum T dp A``: ``H(t_n) - H(t_{n-1}) = heating_n * dt_out * 4 pi a^2`` to round-off
      (relative to ``H``: < 1e-12 in float64, < 1e-6 from stored float32 files).
    * total energy ``E = H + (1/g) sum (u^2 + v^2)/2 dp A``: the winds are prescribed (kinematic), so kinetic
      energy is not exactly balanced; ``|E_n - E_{n-1} - heating_n dt_out 4 pi a^2| / E_n < 1e-5`` per output step.
    * axial angular momentum ``L = (1/g) sum (u + Omega a cos phi) a cos phi dp A``: kinematic, not exactly
      conserved; relative change per output step < 1e-3.
    * per-layer area integrals of ``(u^2 + v^2)/2`` and of ``u cos phi`` (not mass weighted) are exact
      invariants of the Rossby-Haurwitz flow: constant to round-off.
    * ideal gas residual ``rho R_d T / (sigma ps) - 1`` and the hydrostatic ``zg`` recurrence above: zero to
      round-off (< 1e-6 relative in float32 files).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sapwood.errors import SapwoodError

GAS_CONSTANT = 287.04  # R_d, J kg-1 K-1
SPECIFIC_HEAT = 1004.64  # c_p, J kg-1 K-1
STEFAN_BOLTZMANN = 5.670374e-8  # W m-2 K-4
WAVENUMBER = 4
COURANT_TARGET = 0.4
EARTH = {"radius": 6.371e6, "gravity": 9.81, "rotation_rate": 7.292e-5, "stellar_flux": 1361.0,
         "surface_pressure": 1.0e5}
CUBE_VARIABLES = ("T", "u", "v", "q", "ps", "rho", "zg")
PLANET_VARIABLES = {  # netCDF name -> (PlanetParams field, units, long name)
    "planet_radius": ("radius", "m", "planet radius"),
    "gravity": ("gravity", "m s-2", "surface gravity"),
    "rotation_rate": ("rotation_rate", "s-1", "planetary rotation rate"),
    "stellar_flux": ("stellar_flux", "W m-2", "incoming stellar flux at the substellar point"),
    "mean_surface_pressure": ("surface_pressure", "Pa", "global-mean surface pressure"),
}


@dataclass(frozen=True)
class PlanetParams:
    """The parameters that distinguish one ensemble member (one run) from another."""

    radius: float = EARTH["radius"]
    gravity: float = EARTH["gravity"]
    rotation_rate: float = EARTH["rotation_rate"]
    stellar_flux: float = EARTH["stellar_flux"]
    surface_pressure: float = EARTH["surface_pressure"]


@dataclass(frozen=True)
class Grid:
    """Sizes of one run: layers, latitudes, longitudes, output times and output interval."""

    levels: int = 8
    nlat: int = 32
    nlon: int = 64
    times: int = 24
    dt_hours: float = 6.0

    def validate(self) -> None:
        if self.levels < 2:
            raise SapwoodError(f"levels={self.levels}: need at least 2 layers")
        if self.nlat < 8 or self.nlat % 2:
            raise SapwoodError(f"nlat={self.nlat}: must be even and >= 8")
        if self.nlon < 4 * WAVENUMBER:
            raise SapwoodError(f"nlon={self.nlon}: must be >= {4 * WAVENUMBER} to resolve the wave")
        if self.times < 2:
            raise SapwoodError(f"times={self.times}: need at least 2 output times")
        if not 0 < self.dt_hours <= 48:
            raise SapwoodError(f"dt_hours={self.dt_hours}: allowed range is (0, 48]")


def sample_planets(runs: int, seed: int = 0) -> list[PlanetParams]:
    """``runs`` planets, log-uniform around Earth (radius 0.5-2x, gravity 5-25, rotation 0.25-2x, flux 0.6-1.5x,
    surface pressure 0.5-2 bar). The first planet of seed 0 is not special; the draw is reproducible."""
    rng = np.random.default_rng(seed)

    def log_uniform(low: float, high: float) -> np.ndarray:
        return np.exp(rng.uniform(math.log(low), math.log(high), runs))

    radius = EARTH["radius"] * log_uniform(0.5, 2.0)
    gravity = log_uniform(5.0, 25.0)
    rotation = EARTH["rotation_rate"] * log_uniform(0.25, 2.0)
    flux = EARTH["stellar_flux"] * log_uniform(0.6, 1.5)
    pressure = log_uniform(0.5e5, 2.0e5)
    return [PlanetParams(float(r), float(g), float(o), float(s), float(p))
            for r, g, o, s, p in zip(radius, gravity, rotation, flux, pressure, strict=True)]


class Simulation:
    """One run: state ``ps [lat, lon]``, ``T, q [lev, lat, lon]`` in float64, advanced by :meth:`advance`."""

    def __init__(self, planet: PlanetParams, grid: Grid, phase: float = 0.0) -> None:
        grid.validate()
        self.planet, self.grid, self.phase = planet, grid, phase
        a, m = planet.radius, WAVENUMBER
        self.lat_edges = np.linspace(-math.pi / 2, math.pi / 2, grid.nlat + 1)
        self.lat = 0.5 * (self.lat_edges[1:] + self.lat_edges[:-1])
        self.dlon = 2 * math.pi / grid.nlon
        self.lon = np.arange(grid.nlon) * self.dlon
        self.lon_east_edges = self.lon + 0.5 * self.dlon
        self.sigma_edges = np.arange(grid.levels + 1) / grid.levels
        self.sigma = 0.5 * (self.sigma_edges[1:] + self.sigma_edges[:-1])
        self.dsigma = np.diff(self.sigma_edges)
        self.area = (a * a * self.dlon * np.diff(np.sin(self.lat_edges)))[:, None] * np.ones(grid.nlon)

        t0 = 1.13 * (planet.stellar_flux * 0.7 / (4 * STEFAN_BOLTZMANN)) ** 0.25
        self.t_contrast = 0.2 * t0
        self.tau = SPECIFIC_HEAT * planet.surface_pressure / (planet.gravity * 4 * STEFAN_BOLTZMANN * t0**3)
        self.t_eq = ((t0 - self.t_contrast * np.sin(self.lat) ** 2)[None, :, None]
                     * self.sigma[:, None, None] ** 0.19 * np.ones((1, 1, grid.nlon)))
        thermal_wind = GAS_CONSTANT * self.t_contrast * np.log(1 / self.sigma) / (2 * planet.rotation_rate * a)
        jet = 5.0 + 60.0 * np.tanh(thermal_wind / 60.0)
        self.omega = jet / a  # solid-body angular velocity per layer, s-1
        self.amplitude = 0.5 * self.omega  # K_k, s-1
        self.nu = (m * (3 + m) * self.omega - 2 * planet.rotation_rate) / ((1 + m) * (2 + m))

        coslat, sinlat = np.cos(self.lat), np.sin(self.lat)
        wave = coslat[:, None] ** m * np.cos(m * (self.lon[None, :] - phase))
        self.ps = planet.surface_pressure * (1 + 0.02 * (sinlat[:, None] ** 2 - 1 / 3) + 0.01 * wave)
        self.temperature = self.t_eq + 3.0 * wave[None]
        humidity_scale = 0.015 * (planet.stellar_flux / EARTH["stellar_flux"]) ** 1.5
        self.humidity = (humidity_scale * self.sigma[:, None, None] ** 3
                         * (0.2 + 0.8 * coslat[None, :, None] ** 2) * np.ones((1, 1, grid.nlon)))
        self.time = 0.0
        self.substeps = self._substeps_per_output()

    # --- winds -------------------------------------------------------------------------------------------
    def streamfunction(self, lat: np.ndarray, lon: np.ndarray, time: float) -> np.ndarray:
        """``psi [lev, lat, lon]`` in m2 s-1 on the given 1-D latitudes and longitudes (radians)."""
        a, m = self.planet.radius, WAVENUMBER
        sinlat, coslat = np.sin(lat)[None, :, None], np.abs(np.cos(lat))[None, :, None]
        angle = m * (lon[None, None, :] - self.nu[:, None, None] * time - self.phase)
        return a * a * (-self.omega[:, None, None] * sinlat
                        + self.amplitude[:, None, None] * coslat**m * sinlat * np.cos(angle))

    def winds(self, time: float) -> tuple[np.ndarray, np.ndarray]:
        """Analytic ``u, v [lev, lat, lon]`` (m s-1) at cell centres."""
        a, m = self.planet.radius, WAVENUMBER
        sinlat, coslat = np.sin(self.lat)[None, :, None], np.cos(self.lat)[None, :, None]
        angle = m * (self.lon[None, None, :] - self.nu[:, None, None] * time - self.phase)
        w, k = self.omega[:, None, None], self.amplitude[:, None, None]
        u = a * w * coslat + a * k * coslat ** (m - 1) * (m * sinlat**2 - coslat**2) * np.cos(angle)
        v = -a * k * m * coslat ** (m - 1) * sinlat * np.sin(angle)
        return u, v

    def face_fluxes(self, time: float) -> tuple[np.ndarray, np.ndarray]:
        """Volume fluxes (m2 s-1, per unit pressure) through east faces ``[lev, lat, lon]`` and north/south
        faces ``[lev, lat+1, lon]`` (row j is the south face of cell j; the pole rows are zero)."""
        corners = self.streamfunction(self.lat_edges, self.lon_east_edges, time)
        east = -(corners[:, 1:, :] - corners[:, :-1, :])
        north = corners - np.roll(corners, 1, axis=2)
        north[:, 0], north[:, -1] = 0.0, 0.0
        return east, north

    def _substeps_per_output(self) -> int:
        dt_out = self.grid.dt_hours * 3600.0
        worst = 0.0
        for fraction in np.linspace(0, 1, 5):
            east, north = self.face_fluxes(fraction * 2 * math.pi / max(np.abs(self.nu).max(), 1e-12))
            outflow = (np.maximum(east, 0) + np.maximum(-np.roll(east, 1, axis=2), 0)
                       + np.maximum(north[:, 1:], 0) + np.maximum(-north[:, :-1], 0))
            worst = max(worst, float((outflow / self.area[None]).max()))
        return max(1, math.ceil(dt_out * worst / COURANT_TARGET))

    # --- time stepping -----------------------------------------------------------------------------------
    def _horizontal_divergence(self, east_mass: np.ndarray, north_mass: np.ndarray) -> np.ndarray:
        return east_mass - np.roll(east_mass, 1, axis=2) + north_mass[:, 1:] - north_mass[:, :-1]

    def step(self, dt: float) -> float:
        """Advance one substep of ``dt`` seconds; return the enthalpy added by the forcing (J)."""
        east, north = self.face_fluxes(self.time + 0.5 * dt)
        ps, temperature, humidity = self.ps, self.temperature, self.humidity
        dsig = self.dsigma[:, None, None]
        layer_mass = dsig * ps[None] * self.area[None]  # g * kg per cell per layer

        def upwind_east(field: np.ndarray) -> np.ndarray:
            return np.where(east > 0, field, np.roll(field, -1, axis=-1))

        def upwind_north(field: np.ndarray) -> np.ndarray:
            south_of_face = np.concatenate([field[:, :1], field], axis=1)
            north_of_face = np.concatenate([field, field[:, -1:]], axis=1)
            return np.where(north > 0, south_of_face, north_of_face)

        ps3 = np.broadcast_to(ps[None], temperature.shape)
        east_mass = dt * dsig * east * upwind_east(ps3)
        north_mass = dt * dsig * north * upwind_north(ps3)
        mass_div = self._horizontal_divergence(east_mass, north_mass)
        new_ps = ps - mass_div.sum(axis=0) / self.area
        new_layer_mass = dsig * new_ps[None] * self.area[None]
        # vertical mass crossing interface k+1/2 (downward positive), zero at top and surface
        vertical = np.cumsum(layer_mass - mass_div - new_layer_mass, axis=0)[:-1]

        new_tracers = []
        for tracer in (temperature, humidity):
            tracer_mass = tracer * layer_mass
            tracer_mass = tracer_mass - self._horizontal_divergence(east_mass * upwind_east(tracer),
                                                                    north_mass * upwind_north(tracer))
            interface_value = np.where(vertical > 0, tracer[:-1], tracer[1:])
            vertical_flux = vertical * interface_value
            tracer_mass[:-1] -= vertical_flux
            tracer_mass[1:] += vertical_flux
            new_tracers.append(tracer_mass / new_layer_mass)
        new_temperature, new_humidity = new_tracers
        heating_increment = dt * (self.t_eq - new_temperature) / self.tau
        self.ps, self.humidity = new_ps, new_humidity
        self.temperature = new_temperature + heating_increment
        self.time += dt
        return float(SPECIFIC_HEAT / self.planet.gravity * (heating_increment * new_layer_mass).sum())

    def advance(self) -> float:
        """Advance one output interval; return the global-mean heating over it (W m-2)."""
        dt_out = self.grid.dt_hours * 3600.0
        dt = dt_out / self.substeps
        enthalpy_added = sum(self.step(dt) for _ in range(self.substeps))
        if self.humidity.min() < 0:
            raise RuntimeError("negative humidity: Courant condition violated")
        return enthalpy_added / (dt_out * 4 * math.pi * self.planet.radius**2)

    # --- diagnostics -------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, np.ndarray]:
        """The cube variables at the current time, float64, dims ``[lev, lat, lon]`` (``ps``: ``[lat, lon]``)."""
        u, v = self.winds(self.time)
        temperature, ps, g = self.temperature, self.ps, self.planet.gravity
        pressure = self.sigma[:, None, None] * ps[None]
        rho = pressure / (GAS_CONSTANT * temperature)
        thickness = GAS_CONSTANT * temperature / g
        layer_depth = np.log(self.sigma_edges[1:] / np.maximum(self.sigma_edges[:-1], 1e-300))[:, None, None]
        below = np.cumsum((thickness * layer_depth)[::-1], axis=0)[::-1]  # sum over m >= k
        below = np.concatenate([below[1:], np.zeros_like(below[:1])], axis=0)  # sum over m > k
        zg = below + thickness * np.log(self.sigma_edges[1:] / self.sigma)[:, None, None]
        return {"T": temperature, "u": u, "v": v, "q": self.humidity, "ps": ps, "rho": rho, "zg": zg}


def run_states(planet: PlanetParams, grid: Grid, phase: float = 0.0) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    """Yield ``(variables, heating)`` for each of ``grid.times`` outputs (the first is the initial state)."""
    sim = Simulation(planet, grid, phase)
    yield sim.diagnostics(), 0.0
    for _ in range(grid.times - 1):
        heating = sim.advance()
        yield sim.diagnostics(), heating


VARIABLE_ATTRS = {
    "T": {"standard_name": "air_temperature", "units": "K", "long_name": "air temperature"},
    "u": {"standard_name": "eastward_wind", "units": "m s-1", "long_name": "eastward wind"},
    "v": {"standard_name": "northward_wind", "units": "m s-1", "long_name": "northward wind"},
    "q": {"standard_name": "specific_humidity", "units": "kg kg-1", "long_name": "specific humidity"},
    "ps": {"standard_name": "surface_air_pressure", "units": "Pa", "long_name": "surface pressure"},
    "rho": {"standard_name": "air_density", "units": "kg m-3", "long_name": "air density (ideal gas)"},
    "zg": {"standard_name": "geopotential_height", "units": "m", "long_name": "geopotential height (hydrostatic)"},
}


def write_run(path: Path, planet: PlanetParams, grid: Grid, phase: float = 0.0, dtype: str = "float32",
              run_id: int = 0) -> Path:
    """Simulate one planet and write it to ``path`` (NetCDF4, contiguous variables, CF attributes).

    Written to ``path.tmp`` first and renamed, so a file with the final name is always complete.
    """
    import netCDF4

    if dtype not in ("float32", "float64"):
        raise SapwoodError(f"dtype={dtype!r}: allowed are 'float32', 'float64'")
    sim_probe = Simulation(planet, grid, phase)
    tmp = path.with_name(path.name + ".tmp")
    with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
        ds.Conventions = "CF-1.10"
        ds.title = "sapwood kinematic Rossby-Haurwitz transport model (see sapwood.data.simulate)"
        ds.source = "sapwood.data.simulate"
        ds.run_id = run_id
        ds.gas_constant = GAS_CONSTANT
        ds.specific_heat = SPECIFIC_HEAT
        ds.wave_phase = phase
        for key, value in asdict(planet).items():
            ds.setncattr(key, value)
        ds.createDimension("time", grid.times)
        ds.createDimension("lev", grid.levels)
        ds.createDimension("lat", grid.nlat)
        ds.createDimension("lon", grid.nlon)
        ds.createDimension("bnds", 2)
        coords = {
            "time": (("time",), np.arange(grid.times) * grid.dt_hours,
                     {"standard_name": "time", "units": "hours since 2000-01-01 00:00:00",
                      "calendar": "proleptic_gregorian", "axis": "T"}),
            "lev": (("lev",), sim_probe.sigma,
                    {"standard_name": "atmosphere_sigma_coordinate", "units": "1", "positive": "down",
                     "axis": "Z", "bounds": "lev_bnds", "formula_terms": "sigma: lev ps: ps ptop: ptop"}),
            "lat": (("lat",), np.degrees(sim_probe.lat),
                    {"standard_name": "latitude", "units": "degrees_north", "axis": "Y", "bounds": "lat_bnds"}),
            "lon": (("lon",), np.degrees(sim_probe.lon),
                    {"standard_name": "longitude", "units": "degrees_east", "axis": "X", "bounds": "lon_bnds"}),
            "lev_bnds": (("lev", "bnds"), np.stack([sim_probe.sigma_edges[:-1], sim_probe.sigma_edges[1:]], 1), {}),
            "lat_bnds": (("lat", "bnds"), np.degrees(np.stack([sim_probe.lat_edges[:-1], sim_probe.lat_edges[1:]], 1)), {}),
            "lon_bnds": (("lon", "bnds"), np.degrees(np.stack([sim_probe.lon - sim_probe.dlon / 2,
                                                               sim_probe.lon + sim_probe.dlon / 2], 1)), {}),
            "cell_area": (("lat", "lon"), sim_probe.area,
                          {"standard_name": "cell_area", "units": "m2"}),
        }
        for name, (dims, values, attrs) in coords.items():
            var = ds.createVariable(name, "f8", dims)
            var.setncatts(attrs)
            var[:] = values
        ptop = ds.createVariable("ptop", "f8", ())
        ptop.setncatts({"units": "Pa", "long_name": "pressure at the model top"})
        ptop.assignValue(0.0)
        for nc_name, (field, units, long_name) in PLANET_VARIABLES.items():
            var = ds.createVariable(nc_name, "f8", ())
            var.setncatts({"units": units, "long_name": long_name})
            var.assignValue(getattr(planet, field))
        store_type = "f4" if dtype == "float32" else "f8"
        variables = {}
        for name, attrs in VARIABLE_ATTRS.items():
            dims = ("time", "lat", "lon") if name == "ps" else ("time", "lev", "lat", "lon")
            variables[name] = ds.createVariable(name, store_type, dims, contiguous=True)
            variables[name].setncatts({**attrs, "coordinates": "time lev lat lon" if name != "ps" else "time lat lon"})
        heating = ds.createVariable("heating", "f8", ("time",))
        heating.setncatts({"units": "W m-2", "long_name": "global-mean diabatic heating over the preceding interval"})
        for index, (state, heat) in enumerate(run_states(planet, grid, phase)):
            for name, values in state.items():
                variables[name][index] = values
            heating[index] = heat
    tmp.replace(path)
    return path


def simulate_ensemble(out: Path, runs: int = 4, grid: Grid | None = None, seed: int = 0,
                      dtype: str = "float32", progress: bool = True,
                      planets: list[PlanetParams] | None = None) -> list[Path]:
    """Write ``runs`` NetCDF files ``out/run_NNNN.nc`` over ``planets`` (default: :func:`sample_planets`)."""
    grid = grid or Grid()
    grid.validate()
    if runs < 1:
        raise SapwoodError(f"runs={runs}: need at least 1")
    out.mkdir(parents=True, exist_ok=True)
    if planets is not None and len(planets) != runs:
        raise SapwoodError(f"{len(planets)} planets given for runs={runs}")
    planets = list(planets) if planets is not None else sample_planets(runs, seed)
    phases = np.random.default_rng(seed + 1).uniform(0, 2 * math.pi / WAVENUMBER, runs)
    paths = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("simulating", total=runs)
        for run_id, (planet, phase) in enumerate(zip(planets, phases, strict=True)):
            paths.append(write_run(out / f"run_{run_id:04d}.nc", planet, grid, float(phase), dtype, run_id))
            bar.advance(task)
    return paths
