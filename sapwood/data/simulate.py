"""The built-in planet simulator: a dry hydrostatic primitive-equation core with passive moisture that writes
CF-convention NetCDF datacubes (``sapwood simulate --out DIR``), one file per planet, nothing downloaded.

Model
=====
The hydrostatic primitive equations in sigma coordinates on a rotating sphere, forced as in Held & Suarez
(1994), scaled per planet, with a seasonal cycle.

Grid (per run)
    * ``lat``: ``nlat`` cell centres, edges ``phi_{j-1/2} = -90 + j*180/nlat`` degrees (poles are edges).
    * ``lon``: ``nlon`` cell centres ``lambda_i = i*360/nlon`` degrees, periodic.
    * ``lev``: ``nlev`` layers of ``sigma = p/ps`` (model top ``ptop = 0 Pa``); interfaces
      ``sigma_{k+1/2} = (k+1)/nlev`` (k = 0 is the top layer, lev increases downward), ``lev`` at layer
      midpoints; full-level pressure ``p_k = sigma_k ps``, layer thickness ``dp_k = dsigma_k ps``.
    * cell area ``A_j = a^2 dlambda (sin phi_{j+1/2} - sin phi_{j-1/2})`` (written as ``cell_area``).
    * Arakawa C staggering inside the model: ``ps``, ``theta``, ``q`` at cell centres, ``u`` on east faces,
      ``v`` on north/south faces (zero at the poles). The files hold ``u``, ``v`` averaged to cell centres.

Equations (per layer; ``V = (u, v)``, ``W = ps dsigma/dt`` the vertical mass flux)
    * continuity   ``d(ps)/dt = -sum_k dsigma_k div(ps V_k)``, ``W`` diagnosed so each layer keeps
      ``dp_k = dsigma_k ps`` (flux form: mass is conserved to round-off);
    * thermodynamics in flux form for potential temperature ``theta = T (p0/p)^kappa`` (``p0 = 1e5 Pa``):
      ``d(ps theta)/dt = -div(ps V theta) - d(W theta)/dsigma + ps Q / Pi`` - so temperature is prognostic and
      changes adiabatically with vertical motion (``dT/dt = kappa T omega / p`` in advective form);
    * momentum in vector-invariant form: ``dV/dt = -(f + zeta) k x V - grad(K + Phi) - R_d T_v grad(ln ps)
      - (W/ps) dV/dsigma + F``, with ``Phi`` the hydrostatic geopotential of the virtual temperature
      ``T_v = T (1 + 0.608 q)`` - the winds respond to the mass and temperature fields;
    * humidity ``q``: a passive tracer carried by the same mass fluxes, first-order upwind (positive, and
      ``q = const`` stays constant), no source or sink.
    Centred second-order differences, Wicker-Skamarock RK3 in time with the step chosen from the
    gravity-wave and advective Courant numbers each output interval; a zonal Fourier filter of the zonal
    mass flux and the zonal pressure-gradient force poleward of ~45 deg (it keeps every zonal mean, hence
    mass); divergence damping ``nu_d = 0.04 dx^2 / dt`` (gravity waves, not the vortical flow); a conservative
    grid-scale del^4 on ``u``, ``v``, ``T`` (2-grid wave damped in 6 h).

Forcing (Held & Suarez 1994; temperatures scaled by ``s = (S / 1361 W m-2)^(1/4)``, time scales by
``r = clip((p0 / 1 bar) (9.81 / g) / s^3, 0.5, 2)``, the planet's radiative inertia relative to Earth's)
    * Newtonian cooling ``dT/dt = -k_T (T - T_eq)`` with ``T_eq = s max(200, (315 - 60 sin^2 phi
      - 10 ln(sigma) cos^2 phi) sigma^kappa)`` K and ``k_T = (k_a + (k_s - k_a) max(0, (sigma - 0.7)/0.3)
      cos^4 phi) / r``, ``k_a = 1/(6 d)``, ``k_s = 1/(1.5 d)`` (faster than Held-Suarez' 40 d / 4 d so a
      run reaches its relaxed state within a spin-up of minutes);
    * seasonal cycle (hemispheric asymmetry): ``+ k_T 20 s (sin delta / sin 23.44 deg) sin phi sigma^kappa``
      with declination ``delta = 23.44 deg sin(2 pi t / 360 d + season)``, minus its mass-weighted global
      mean at every step, so it moves heat between hemispheres and the global heating stays
      ``c_p/g sum k_T (T_eq - T) dp A`` (computable from the state; :func:`sapwood.physics.declared_forcing`
      does);
    * Rayleigh friction ``F = -k_v V`` with ``k_v = max(0, (sigma - 0.7)/0.3) / (1 d)``; the kinetic energy
      it removes is returned as heat, so friction moves axial angular momentum but not total energy.
    * Fixers (as CAM's energy fixer): after each output interval a solid-body zonal wind ``c cos(phi)`` and
      then a uniform temperature shift close the budgets below exactly; their mean sizes are written as
      global attributes ``energy_fixer_wm2`` and ``momentum_fixer_ms`` (at the demo's 4x16x32 grid they are
      of the order of the declared heating and torque).

Each run starts from rest at ``T = T_eq`` (plus 1 K noise, seeded by the run id), uniform ``ps = p0``, damps
``v`` in 2 h during the first 2 days (the winds adjust to the mass field without exciting a sloshing
external mode), and integrates a spin-up of ``spinup_days`` (default ``4 / k_a`` = 24 days times ``r``, so
12-48 days) that is not written; the first output is the relaxed state. ``spinup_days=0`` starts from rest
(tests and I/O benchmarks that need bytes, not climate).

Variables (dims ``(time, lev, lat, lon)`` unless noted, CF ``standard_name`` and ``units`` set)
    ``T`` air_temperature [K], ``u`` eastward_wind [m s-1], ``v`` northward_wind [m s-1],
    ``q`` specific_humidity [kg kg-1], ``ps`` surface_air_pressure [Pa] (time, lat, lon),
    ``rho`` air_density [kg m-3], ``zg`` geopotential_height [m], ``heating`` [W m-2] and ``torque``
    [N m] (time), ``cell_area`` [m2] (lat, lon), and the planet parameters as scalar variables (also global
    attributes): ``planet_radius`` [m], ``gravity`` [m s-2], ``rotation_rate`` [s-1], ``stellar_flux``
    [W m-2], ``mean_surface_pressure`` [Pa].

Diagnosed variables (virtual temperature, :mod:`sapwood.constants`)
    * ideal gas ``rho = sigma_k ps / (R_d T_v)``;
    * hydrostatic geopotential height at full levels (flat surface ``z = 0`` at ``sigma = 1``)::

          zg_k = sum_{m > k} (R_d T_v,m / g) ln(sigma_{m+1/2} / sigma_{m-1/2}) + (R_d T_v,k / g)
          ln(sigma_{k+1/2} / sigma_k)

Budgets of the stored fields (``u``, ``v`` at cell centres; sums over cells and layers, ``dp = dsigma ps``)
    * mass ``sum ps A``: conserved to round-off (relative change < 1e-12 per output in float64; < 1e-6, i.e.
      the float32 rounding of ``ps``, from float32 files).
    * water ``sum q dp A``: conserved to round-off (same tolerances).
    * total energy ``E = (1/g) sum (c_p T + (u^2 + v^2)/2) dp A``:
      ``E_n - E_{n-1} = heating_n dt_out 4 pi a^2`` to round-off (< 1e-12 relative in float64; from float32
      files the residual is < 0.05 W m-2 as a global-mean flux). ``heating_n`` is the Newtonian heating
      integrated over the interval; :func:`sapwood.physics.declared_forcing` (trapezoid rule on the two
      stored states) reproduces it to 0.01-0.5 W m-2 (measured on 4 planets at 4x16x32).
    * axial angular momentum ``M = (1/g) sum (u + Omega a cos phi) a cos phi dp A``:
      ``M_n - M_{n-1} = torque_n dt_out`` to round-off (< 1e-12 relative in float64); ``torque_n`` is the
      friction torque over the interval; the trapezoid estimate reproduces it to < 3e-3 m s-1 of solid-body
      wind per step (measured as above).
    * The fixers are not small against the declared terms: the discretization is not energy- or angular-
      momentum-conserving, and the fixers return 0.05-6 W m-2 and 0.02-0.14 m s-1 per 6 h (same planets).
    * ideal gas and the hydrostatic ``zg`` above: zero to round-off (< 1e-6 relative in float32 files).
    Tests: ``tests/test_simulate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sapwood.constants import (
    EARTH,
    GAS_CONSTANT,
    KAPPA,
    REFERENCE_PRESSURE,
    SPECIFIC_HEAT,
    STEFAN_BOLTZMANN,
    virtual_temperature,
)
from sapwood.errors import SapwoodError

__all__ = [
    "GAS_CONSTANT", "SPECIFIC_HEAT", "STEFAN_BOLTZMANN", "Grid", "PlanetParams", "Simulation",
    "declared_heating_profiles", "sample_planets", "simulate_ensemble", "run_states", "write_run",
]

DAY = 86400.0
YEAR_DAYS = 360.0
OBLIQUITY_DEG = EARTH["obliquity"]
SEASON_AMPLITUDE = 20.0  # K at the declination's maximum, before scaling by s
SIGMA_BOUNDARY = 0.7
FRICTION_RATE = 1 / DAY
RELAX_FREE = 1 / (6 * DAY)
RELAX_SURFACE = 1 / (1.5 * DAY)
SPINUP_RELAXATION_TIMES = 4.0
GRID_DAMPING_SECONDS = 6 * 3600.0
COURANT_GRAVITY = 1.0
BALANCE_DAYS = (
    2.0  # first days of the spin-up: v damped in 2 h, so u adjusts to the mass field without sloshing
)
BALANCE_RATE = 1 / 7200.0
DIVERGENCE_DAMPING = 0.04  # nu_d = 0.04 dx^2 / dt: damps gravity waves (divergent flow), not vortical flow
COURANT_ADVECTION = 0.7
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

    radius: float = EARTH["planet_radius"]
    gravity: float = EARTH["gravity"]
    rotation_rate: float = EARTH["rotation_rate"]
    stellar_flux: float = EARTH["stellar_flux"]
    surface_pressure: float = EARTH["mean_surface_pressure"]


@dataclass(frozen=True)
class Grid:
    """Sizes of one run: layers, latitudes, longitudes, output times, output interval and spin-up
    (``spinup_days=None``: the planet's default, three free-atmosphere relaxation times)."""

    levels: int = 8
    nlat: int = 32
    nlon: int = 64
    times: int = 24
    dt_hours: float = 6.0
    spinup_days: float | None = None

    def validate(self) -> None:
        if self.levels < 2:
            raise SapwoodError(f"levels={self.levels}: need at least 2 layers")
        if self.nlat < 8 or self.nlat % 2:
            raise SapwoodError(f"nlat={self.nlat}: must be even and >= 8")
        if self.nlon < 16 or self.nlon % 2:
            raise SapwoodError(f"nlon={self.nlon}: must be even and >= 16")
        if self.times < 2:
            raise SapwoodError(f"times={self.times}: need at least 2 output times")
        if not 0 < self.dt_hours <= 48:
            raise SapwoodError(f"dt_hours={self.dt_hours}: allowed range is (0, 48]")
        if self.spinup_days is not None and not 0 <= self.spinup_days <= 3650:
            raise SapwoodError(f"spinup_days={self.spinup_days}: allowed range is [0, 3650]")


def _roll(field: np.ndarray, shift: int, axis: int) -> np.ndarray:
    """``np.roll`` for a shift of +-1 (the only ones the model uses), without its generic overhead."""
    if axis < 0:
        axis += field.ndim
    head = (slice(None),) * axis
    if shift == 1:
        return np.concatenate((field[head + (slice(-1, None),)], field[head + (slice(None, -1),)]), axis=axis)
    return np.concatenate((field[head + (slice(1, None),)], field[head + (slice(None, 1),)]), axis=axis)


# --- forcing: the formulas the simulator integrates and sapwood.physics estimates -------------------------


def temperature_scale(stellar_flux):
    """``s = (S / 1361)^(1/4)``: equilibrium temperatures scale with it (floats, arrays or tensors)."""
    return (stellar_flux / EARTH["stellar_flux"]) ** 0.25


def radiative_time_factor(surface_pressure, gravity, stellar_flux):
    """``r``: relaxation times relative to Earth's, ``(p0/1 bar)(9.81/g)/s^3`` clipped to [0.5, 2]."""
    raw = (
        (surface_pressure / EARTH["mean_surface_pressure"])
        * (EARTH["gravity"] / gravity)
        / temperature_scale(stellar_flux) ** 3
    )
    return raw.clamp(0.5, 2.0) if hasattr(raw, "clamp") else np.clip(raw, 0.5, 2.0)


def forcing_profiles(lat, sigma) -> dict[str, np.ndarray]:
    """Earth profiles on a grid (float64): ``t_eq [L, H]`` (K; times ``s`` for a planet), ``k_t [L, H]``
    (s-1; divided by ``r``), ``k_v [L]`` (s-1) and ``season [L, H]`` (K per unit
    sin(declination)/sin(obliquity),
    times ``s``). ``lat`` in radians, ``sigma`` the layer midpoints."""
    lat, sigma = np.asarray(lat, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    sin2, cos2 = np.sin(lat) ** 2, np.cos(lat) ** 2
    bracket = (315.0 - 60.0 * sin2[None] - 10.0 * np.log(sigma)[:, None] * cos2[None]) * sigma[
        :, None
    ] ** KAPPA
    boundary = np.maximum(0.0, (sigma - SIGMA_BOUNDARY) / (1 - SIGMA_BOUNDARY))
    return {
        "t_eq": np.maximum(200.0, bracket),
        "k_t": RELAX_FREE + (RELAX_SURFACE - RELAX_FREE) * boundary[:, None] * (cos2**2)[None],
        "k_v": FRICTION_RATE * boundary,
        "season": SEASON_AMPLITUDE * np.sin(lat)[None] * sigma[:, None] ** KAPPA,
    }


def declared_heating_profiles(lat, sigma) -> dict[str, np.ndarray]:
    """The profiles :mod:`sapwood.physics` needs to estimate the declared heating and friction torque."""
    profiles = forcing_profiles(lat, sigma)
    return {k: profiles[k] for k in ("t_eq", "k_t", "k_v")}


def sample_planets(runs: int, seed: int = 0) -> list[PlanetParams]:
    """``runs`` planets from a Latin hypercube over log-uniform ranges around Earth (radius 0.5-2x, gravity
    5-25 m s-2, rotation 0.25-2x, flux 0.6-1.5x, surface pressure 0.5-2 bar): every parameter's range is
    covered evenly for any ``runs``; the draw is reproducible."""
    rng = np.random.default_rng(seed)
    ranges = [
        (0.5 * EARTH["planet_radius"], 2.0 * EARTH["planet_radius"]), (5.0, 25.0),
        (0.25 * EARTH["rotation_rate"], 2.0 * EARTH["rotation_rate"]),
        (0.6 * EARTH["stellar_flux"], 1.5 * EARTH["stellar_flux"]), (0.5e5, 2.0e5),
    ]
    columns = []
    for low, high in ranges:
        strata = (rng.permutation(runs) + rng.uniform(size=runs)) / runs
        columns.append(np.exp(math.log(low) + strata * (math.log(high) - math.log(low))))
    return [PlanetParams(*(float(c[i]) for c in columns)) for i in range(runs)]


# --- the model -------------------------------------------------------------------------------------------


class Simulation:
    """One run in float64: ``ps [lat, lon]``, ``u [lev, lat, lon]`` (east faces), ``v [lev, lat+1, lon]``
    (south faces; row ``lat`` is the north pole), ``theta``, ``humidity`` ``[lev, lat, lon]``.
    :meth:`advance` integrates one output interval; :meth:`diagnostics` gives the stored variables."""

    def __init__(self, planet: PlanetParams, grid: Grid, phase: float = 0.0, seed: int = 0) -> None:
        grid.validate()
        self.planet, self.grid, self.phase = planet, grid, phase
        levels, nlat, nlon = grid.levels, grid.nlat, grid.nlon
        a = planet.radius
        self.lat_edges = np.linspace(-math.pi / 2, math.pi / 2, nlat + 1)
        self.lat = 0.5 * (self.lat_edges[1:] + self.lat_edges[:-1])
        self.dlon = 2 * math.pi / nlon
        self.dlat = math.pi / nlat
        self.lon = np.arange(grid.nlon) * self.dlon
        self.sigma_edges = np.arange(levels + 1) / levels
        self.sigma = 0.5 * (self.sigma_edges[1:] + self.sigma_edges[:-1])
        self.dsigma = np.diff(self.sigma_edges)
        self.area = (a * a * self.dlon * np.diff(np.sin(self.lat_edges)))[:, None] * np.ones(nlon)
        self.coslat = np.cos(self.lat)
        self.coslat_edges = np.cos(self.lat_edges)
        self.coslat_edges[[0, -1]] = 0.0
        self.dual_area = a * a * self.dlon * np.diff(np.sin(self.lat))  # corners at interior edges [nlat-1]
        self.coriolis_edges = 2 * planet.rotation_rate * np.sin(self.lat_edges)
        self.ds3 = self.dsigma[:, None, None]
        self.exner_sigma = (self.sigma[:, None, None] / REFERENCE_PRESSURE) ** KAPPA
        depth = np.zeros((levels, levels))
        for k in range(levels):
            depth[k, k] = math.log(self.sigma_edges[k + 1] / self.sigma[k])
            for m in range(k + 1, levels):
                depth[k, m] = math.log(self.sigma_edges[m + 1] / self.sigma_edges[m])
        self.geopotential_matrix = GAS_CONSTANT * depth  # Phi = matrix @ T_v
        # zonal filter poleward of the latitude where the zonal spacing is 0.7 of the meridional one
        self.filter_cos = min(1.0, self.dlat / self.dlon) * 0.7
        self.filter_rows = np.nonzero(self.coslat < self.filter_cos)[0]
        wavenumber = np.arange(nlon // 2 + 1)
        shrink = np.abs(np.sin(wavenumber * self.dlon / 2))
        with np.errstate(divide="ignore"):
            factor = (self.coslat[self.filter_rows, None] / self.filter_cos) / shrink[None]
        self.filter_factor = np.minimum(1.0, factor)
        self.face_length = self.coslat_edges * self.dlon / self.dlat  # north-face length / east-face length
        self.divergence_damping = 0.0
        self.cell_weight = np.diff(np.sin(self.lat_edges)) / self.dlat  # ~cos(phi) of the cell
        self.face_weight = self.coslat_edges[1:-1]

        scale = float(temperature_scale(planet.stellar_flux))
        slow = float(radiative_time_factor(planet.surface_pressure, planet.gravity, planet.stellar_flux))
        profiles = forcing_profiles(self.lat, self.sigma)
        self.t_eq = scale * profiles["t_eq"][:, :, None]
        self.k_t = profiles["k_t"][:, :, None] / slow
        self.k_v = profiles["k_v"][:, None, None]
        self.season = scale * profiles["season"][:, :, None] / math.sin(math.radians(OBLIQUITY_DEG))
        self.spinup_days = (
            grid.spinup_days
            if grid.spinup_days is not None
            else SPINUP_RELAXATION_TIMES * slow / (RELAX_FREE * DAY)
        )

        rng = np.random.default_rng(seed)
        self.time = -self.spinup_days * DAY
        self.balance_until = self.time + min(BALANCE_DAYS, 0.25 * self.spinup_days) * DAY
        self.ps = np.full((nlat, nlon), planet.surface_pressure)
        self.u = np.zeros((levels, nlat, nlon))
        self.v = np.zeros((levels, nlat + 1, nlon))
        temperature = (
            self.t_eq
            + self.season * math.sin(self.declination(self.time))
            + 1.0 * rng.standard_normal((levels, nlat, nlon))
        )
        self.theta = temperature / self.exner()
        humidity_scale = 0.015 * (planet.stellar_flux / EARTH["stellar_flux"]) ** 1.5
        self.humidity = (
            humidity_scale
            * self.sigma[:, None, None] ** 3
            * (0.2 + 0.8 * self.coslat[None, :, None] ** 2)
            * np.ones((1, 1, nlon))
        )
        self.energy_fixes: list[float] = []
        self.momentum_fixes: list[float] = []
        self._energy, self._momentum = self.energy(), self.angular_momentum()

    # --- helpers ------------------------------------------------------------------------------------------
    def declination(self, time: float) -> float:
        return math.radians(OBLIQUITY_DEG) * math.sin(2 * math.pi * time / (YEAR_DAYS * DAY) + self.phase)

    def exner(self, ps: np.ndarray | None = None) -> np.ndarray:
        return self.exner_sigma * (self.ps if ps is None else ps)[None] ** KAPPA

    @property
    def temperature(self) -> np.ndarray:
        """``T [lev, lat, lon]`` (K) from ``theta`` and ``ps``."""
        return self.theta * self.exner()

    def centred_winds(self) -> tuple[np.ndarray, np.ndarray]:
        return 0.5 * (self.u + _roll(self.u, 1, axis=2)), 0.5 * (self.v[:, :-1] + self.v[:, 1:])

    def layer_mass(self, ps: np.ndarray | None = None) -> np.ndarray:
        """``dp A`` per cell and layer (Pa m2)."""
        return self.ds3 * (self.ps if ps is None else ps)[None] * self.area[None]

    def energy(self) -> float:
        """Total energy of the stored fields (J)."""
        u, v = self.centred_winds()
        specific = SPECIFIC_HEAT * self.temperature + 0.5 * (u**2 + v**2)
        return float((specific * self.layer_mass()).sum() / self.planet.gravity)

    def angular_momentum(self) -> float:
        """Axial angular momentum of the stored fields (kg m2 s-1)."""
        a, omega = self.planet.radius, self.planet.rotation_rate
        u, _ = self.centred_winds()
        arm = a * self.coslat[None, :, None]
        return float(((u + omega * arm) * arm * self.layer_mass()).sum() / self.planet.gravity)

    def _zonal_filter(self, field: np.ndarray) -> np.ndarray:
        if self.filter_rows.size:
            rows = self.filter_rows
            spectrum = np.fft.rfft(field[:, rows], axis=-1) * self.filter_factor[None]
            field[:, rows] = np.fft.irfft(spectrum, n=field.shape[-1], axis=-1)
        return field

    # --- dynamics -----------------------------------------------------------------------------------------
    def _fluxes(self, u: np.ndarray, v: np.ndarray, ps: np.ndarray):
        """Zonal and meridional layer mass fluxes (Pa m2 s-1 per unit dsigma), their divergence, ``dps/dt``
        and the vertical mass flux ``W`` at the ``L+1`` interfaces (Pa s-1)."""
        a = self.planet.radius
        ps_east = 0.5 * (ps + _roll(ps, -1, axis=1))
        east = self._zonal_filter(u * ps_east[None] * (a * self.dlat))
        ps_north = np.zeros((ps.shape[0] + 1, ps.shape[1]))
        ps_north[1:-1] = 0.5 * (ps[1:] + ps[:-1])
        north = v * (ps_north * (a * self.dlon) * self.coslat_edges[:, None])[None]
        divergence = (east - _roll(east, 1, axis=2) + north[:, 1:] - north[:, :-1]) / self.area[None]
        dps = -(self.ds3 * divergence).sum(axis=0)
        vertical = np.zeros((u.shape[0] + 1,) + ps.shape)
        vertical[1:-1] = -np.cumsum(self.ds3 * (dps[None] + divergence), axis=0)[:-1]
        return east, north, divergence, dps, vertical

    def _tendencies(self, u, v, ps, mass_theta):
        """``d/dt`` of ``u, v, ps, ps*theta`` and the mass fluxes used."""
        a = self.planet.radius
        theta = mass_theta / ps[None]
        temperature_v = virtual_temperature(theta * self.exner(ps), self.humidity)
        east, north, _, dps, vertical = self._fluxes(u, v, ps)
        # potential temperature: centred face values
        theta_east = 0.5 * (theta + _roll(theta, -1, axis=2))
        theta_north = np.zeros_like(north)
        theta_north[:, 1:-1] = 0.5 * (theta[:, 1:] + theta[:, :-1])
        theta_flux_v = vertical[1:-1] * 0.5 * (theta[1:] + theta[:-1])
        flux_east, flux_north = east * theta_east, north * theta_north
        d_mass_theta = (
            -(flux_east - _roll(flux_east, 1, axis=2) + flux_north[:, 1:] - flux_north[:, :-1])
            / self.area[None]
        )
        d_mass_theta[:-1] -= theta_flux_v / self.ds3[:-1]
        d_mass_theta[1:] += theta_flux_v / self.ds3[1:]
        # momentum
        kinetic = 0.25 * (u**2 + _roll(u, 1, axis=2) ** 2 + v[:, :-1] ** 2 + v[:, 1:] ** 2)
        bernoulli = kinetic + np.einsum("kl,ljw->kjw", self.geopotential_matrix, temperature_v)
        log_ps = np.log(ps)
        dx = a * self.coslat[None, :, None] * self.dlon
        pgf_u = (
            -(
                (_roll(bernoulli, -1, axis=2) - bernoulli)
                + GAS_CONSTANT
                * 0.5
                * (temperature_v + _roll(temperature_v, -1, axis=2))
                * (_roll(log_ps, -1, axis=1) - log_ps)[None]
            )
            / dx
        )
        dy = a * self.dlat
        divergence = (
            (
                u
                - _roll(u, 1, axis=2)
                + v[:, 1:] * self.face_length[None, 1:, None]
                - v[:, :-1] * self.face_length[None, :-1, None]
            )
            * (a * self.dlat)
            / self.area[None]
        )
        pgf_u = self._zonal_filter(
            pgf_u + self.divergence_damping * (_roll(divergence, -1, axis=2) - divergence) / dx
        )
        pgf_v = (
            -(
                (bernoulli[:, 1:] - bernoulli[:, :-1])
                + GAS_CONSTANT
                * 0.5
                * (temperature_v[:, 1:] + temperature_v[:, :-1])
                * (log_ps[1:] - log_ps[:-1])[None]
            )
            / dy
            + self.divergence_damping * (divergence[:, 1:] - divergence[:, :-1]) / dy
        )
        # relative vorticity at cell corners (lat edges x east faces), polar caps at the pole rows
        zeta = np.empty_like(v)
        circulation = (
            u[:, :-1] * (a * self.coslat[:-1, None] * self.dlon)
            - u[:, 1:] * (a * self.coslat[1:, None] * self.dlon)
            + (_roll(v[:, 1:-1], -1, axis=2) - v[:, 1:-1]) * dy
        )
        zeta[:, 1:-1] = circulation / self.dual_area[None, :, None]
        cap_south = 2 * math.pi * a * a * (1 + math.sin(self.lat[0]))
        cap_north = 2 * math.pi * a * a * (1 - math.sin(self.lat[-1]))
        zeta[:, 0] = -(u[:, 0].sum(axis=-1) * a * self.coslat[0] * self.dlon / cap_south)[:, None]
        zeta[:, -1] = (u[:, -1].sum(axis=-1) * a * self.coslat[-1] * self.dlon / cap_north)[:, None]
        absolute = zeta + self.coriolis_edges[None, :, None]
        v_at_u = 0.25 * (v[:, :-1] + v[:, 1:] + _roll(v[:, :-1], -1, axis=2) + _roll(v[:, 1:], -1, axis=2))
        du = 0.5 * (absolute[:, :-1] + absolute[:, 1:]) * v_at_u + pgf_u
        u_at_v = 0.25 * (u[:, :-1] + u[:, 1:] + _roll(u[:, :-1], 1, axis=2) + _roll(u[:, 1:], 1, axis=2))
        absolute_v = 0.5 * (absolute[:, 1:-1] + _roll(absolute[:, 1:-1], 1, axis=2))
        dv = np.zeros_like(v)
        dv[:, 1:-1] = -absolute_v * u_at_v + pgf_v
        # vertical advection (W/ps) dV/dsigma, Arakawa form
        ps_u = 0.5 * (ps + _roll(ps, -1, axis=1))
        vertical_u = 0.5 * (vertical + _roll(vertical, -1, axis=2))[1:-1]
        term = 0.5 * vertical_u * (u[1:] - u[:-1])
        du[:-1] -= term / (ps_u[None] * self.ds3[:-1])
        du[1:] -= term / (ps_u[None] * self.ds3[1:])
        ps_v = 0.5 * (ps[1:] + ps[:-1])
        vertical_v = 0.5 * (vertical[1:-1, 1:] + vertical[1:-1, :-1])
        term = 0.5 * vertical_v * (v[1:, 1:-1] - v[:-1, 1:-1])
        dv[:-1, 1:-1] -= term / (ps_v[None] * self.ds3[:-1])
        dv[1:, 1:-1] -= term / (ps_v[None] * self.ds3[1:])
        return du, dv, dps, d_mass_theta

    def _transport_humidity(
        self, dt: float, u: np.ndarray, v: np.ndarray, ps: np.ndarray, new_ps: np.ndarray
    ) -> None:
        """First-order upwind transport of ``q`` with the mass fluxes of the last RK stage."""
        east, north, _, _, vertical = self._fluxes(u, v, ps)
        q = self.humidity
        q_east = np.where(east > 0, q, _roll(q, -1, axis=2))
        south_of_face = np.concatenate([q[:, :1], q], axis=1)
        north_of_face = np.concatenate([q, q[:, -1:]], axis=1)
        q_north = np.where(north > 0, south_of_face, north_of_face)
        flux_east, flux_north = east * q_east, north * q_north
        mass_q = (
            q * self.ps[None]
            - dt
            * (flux_east - _roll(flux_east, 1, axis=2) + flux_north[:, 1:] - flux_north[:, :-1])
            / self.area[None]
        )
        interface_q = np.where(vertical[1:-1] > 0, q[:-1], q[1:])
        flux_v = dt * vertical[1:-1] * interface_q
        mass_q[:-1] -= flux_v / self.ds3[:-1]
        mass_q[1:] += flux_v / self.ds3[1:]
        self.humidity = mass_q / new_ps[None]

    def _laplacian(self, field: np.ndarray, edges: bool = False) -> np.ndarray:
        """Grid-index Laplacian, conservative: zonal second difference plus the meridional divergence of
        area-weighted differences (zero flux through the poles), so ``sum A L(field) = 0`` for centred
        fields."""
        zonal = _roll(field, -1, -1) - 2 * field + _roll(field, 1, -1)
        if edges:  # v on the lat edges: plain second difference on the interior rows, poles stay zero
            inner = field[:, 1:-1]
            padded = np.concatenate([inner[:, :1], inner, inner[:, -1:]], axis=1)
            zonal[:, 1:-1] += padded[:, 2:] - 2 * inner + padded[:, :-2]
            zonal[:, [0, -1]] = 0.0
            return zonal
        flux = np.zeros((field.shape[0], field.shape[1] + 1, field.shape[2]))
        flux[:, 1:-1] = self.face_weight[None, :, None] * (field[:, 1:] - field[:, :-1])
        return zonal + (flux[:, 1:] - flux[:, :-1]) / self.cell_weight[None, :, None]

    def _hyperdiffusion(self, field: np.ndarray, dt: float, edges: bool = False) -> np.ndarray:
        """``field - dt nu del^4 field`` with the 2-grid wave damped in ``GRID_DAMPING_SECONDS``."""
        return field - (dt / (64 * GRID_DAMPING_SECONDS)) * self._laplacian(
            self._laplacian(field, edges), edges
        )

    def step(self, dt: float) -> tuple[float, float]:
        """One time step: RK3 dynamics, humidity transport, then forcing and diffusion. Returns the enthalpy
        added by Newtonian relaxation (J) and the angular momentum added by friction (kg m2 s-1)."""
        u0, v0, ps0, m0 = self.u, self.v, self.ps, self.theta * self.ps[None]
        u, v, ps, m = u0, v0, ps0, m0
        for fraction in (1 / 3, 1 / 2, 1.0):
            last_u, last_v, last_ps = u, v, ps
            du, dv, dps, dm = self._tendencies(u, v, ps, m)
            u, v, ps, m = (
                u0 + fraction * dt * du, v0 + fraction * dt * dv, ps0 + fraction * dt * dps,
                m0 + fraction * dt * dm,
            )
        self._transport_humidity(dt, last_u, last_v, last_ps, ps)
        self.u, self.v, self.ps, self.theta = u, v, ps, m / ps[None]
        self.time += dt
        return self._forcing(dt)

    def _forcing(self, dt: float) -> tuple[float, float]:
        g, a = self.planet.gravity, self.planet.radius
        layer_mass = self.layer_mass()
        temperature = self.temperature
        newtonian = dt * self.k_t * (self.t_eq - temperature)
        seasonal = dt * self.k_t * self.season * math.sin(self.declination(self.time))
        seasonal -= (seasonal * layer_mass).sum() / layer_mass.sum()
        u_before, v_before = self.centred_winds()
        self.u = self.u / (1 + dt * self.k_v)
        self.v = self.v / (1 + dt * (self.k_v + (BALANCE_RATE if self.time < self.balance_until else 0.0)))
        u_after, v_after = self.centred_winds()
        friction_heat = 0.5 * ((u_before**2 + v_before**2) - (u_after**2 + v_after**2)) / SPECIFIC_HEAT
        arm = a * self.coslat[None, :, None]
        torque = float(((u_after - u_before) * arm * layer_mass).sum() / g)
        self.u = self._hyperdiffusion(self.u, dt)
        self.v = self._hyperdiffusion(self.v, dt, edges=True)
        temperature = self._hyperdiffusion(temperature + newtonian + seasonal + friction_heat, dt)
        self.theta = temperature / self.exner()
        return float(SPECIFIC_HEAT * (newtonian * layer_mass).sum() / g), torque

    def _stable_step(self) -> float:
        a = self.planet.radius
        temperature_v = virtual_temperature(self.temperature, self.humidity)
        wave = math.sqrt(GAS_CONSTANT * max(float(temperature_v.max()), 1.0) / (1 - KAPPA))
        dx_filtered = a * self.filter_cos * self.dlon
        dy = a * self.dlat
        speed_u = np.abs(self.u).max(axis=(0, 2)) + 1e-3
        speed_v = float(np.abs(self.v).max()) + 1e-3
        gravity = COURANT_GRAVITY / ((wave + speed_u.max()) / dx_filtered + (wave + speed_v) / dy)
        advection = COURANT_ADVECTION / float((speed_u / (a * self.coslat * self.dlon)).max() + speed_v / dy)
        inertial = 1.0 / (
            2 * self.planet.rotation_rate + max(self.k_v.max(), self.k_t.max())
        )  # f dt, k dt < 1
        return min(gravity, advection, inertial)

    def advance(self, seconds: float | None = None) -> tuple[float, float]:
        """Integrate ``seconds`` (default one output interval), then close the angular momentum and energy
        budgets with the fixers. Returns the interval's mean declared heating (W m-2) and torque (N m)."""
        seconds = self.grid.dt_hours * 3600.0 if seconds is None else seconds
        substeps = max(1, math.ceil(seconds / self._stable_step()))
        dt = seconds / substeps
        spacing = self.planet.radius * min(self.dlat, self.filter_cos * self.dlon)
        self.divergence_damping = DIVERGENCE_DAMPING * spacing**2 / dt
        heat = torque = 0.0
        for _ in range(substeps):
            added_heat, added_momentum = self.step(dt)
            heat, torque = heat + added_heat, torque + added_momentum
        if not (
            np.isfinite(self.u).all()
            and self.humidity.min() >= 0
            and self.ps.min() > 0
            and self.theta.min() > 0
        ):
            raise SapwoodError(f"simulation of {self.planet} became unstable at t={self.time / DAY:.2f} d")
        area_total = 4 * math.pi * self.planet.radius**2
        # angular momentum fixer: a solid-body zonal wind c cos(phi)
        missing = self._momentum + torque - self.angular_momentum()
        arm = self.planet.radius * self.coslat[None, :, None]
        c = missing / float(
            (self.coslat[None, :, None] * arm * self.layer_mass()).sum() / self.planet.gravity
        )
        self.u = self.u + c * self.coslat[None, :, None]
        self.momentum_fixes.append(c)
        # energy fixer: a uniform temperature shift
        missing = self._energy + heat - self.energy()
        shift = missing * self.planet.gravity / (SPECIFIC_HEAT * float(self.layer_mass().sum()))
        self.theta = self.theta + shift / self.exner()
        self.energy_fixes.append(missing / (seconds * area_total))
        self._energy, self._momentum = self.energy(), self.angular_momentum()
        return heat / (seconds * area_total), torque / seconds

    def spin_up(self) -> None:
        """Integrate the spin-up (not written) in output intervals; afterwards ``time == 0``."""
        interval = self.grid.dt_hours * 3600.0
        while self.time < -1e-6:
            self.advance(min(interval, -self.time))
        self.time = 0.0
        self.energy_fixes.clear()
        self.momentum_fixes.clear()

    # --- diagnostics -------------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, np.ndarray]:
        """The cube variables at the current time, float64, dims ``[lev, lat, lon]`` (``ps``: ``[lat,
        lon]``)."""
        temperature, ps, g = self.temperature, self.ps, self.planet.gravity
        temperature_v = virtual_temperature(temperature, self.humidity)
        rho = self.sigma[:, None, None] * ps[None] / (GAS_CONSTANT * temperature_v)
        zg = np.einsum("kl,ljw->kjw", self.geopotential_matrix, temperature_v) / g
        u, v = self.centred_winds()
        return {
            "T": temperature, "u": u, "v": v, "q": self.humidity.copy(), "ps": ps.copy(), "rho": rho,
            "zg": zg,
        }


@dataclass
class Output:
    """One stored time: the variables and the declared forcing over the preceding interval."""

    variables: dict[str, np.ndarray]
    heating: float  # W m-2
    torque: float  # N m


def run_outputs(
    planet: PlanetParams, grid: Grid, phase: float = 0.0, seed: int = 0, simulation: Simulation | None = None
) -> Iterator[Output]:
    """Spin up, then yield ``grid.times`` outputs (the first is the relaxed initial state, forcing 0)."""
    sim = simulation or Simulation(planet, grid, phase, seed)
    sim.spin_up()
    yield Output(sim.diagnostics(), 0.0, 0.0)
    for _ in range(grid.times - 1):
        heating, torque = sim.advance()
        yield Output(sim.diagnostics(), heating, torque)


def run_states(
    planet: PlanetParams, grid: Grid, phase: float = 0.0
) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    """Yield ``(variables, heating)`` for each of ``grid.times`` outputs (the first is the initial state)."""
    for output in run_outputs(planet, grid, phase):
        yield output.variables, output.heating


VARIABLE_ATTRS = {
    "T": {"standard_name": "air_temperature", "units": "K", "long_name": "air temperature"},
    "u": {"standard_name": "eastward_wind", "units": "m s-1", "long_name": "eastward wind"},
    "v": {"standard_name": "northward_wind", "units": "m s-1", "long_name": "northward wind"},
    "q": {"standard_name": "specific_humidity", "units": "kg kg-1", "long_name": "specific humidity"},
    "ps": {"standard_name": "surface_air_pressure", "units": "Pa", "long_name": "surface pressure"},
    "rho": {
        "standard_name": "air_density",
        "units": "kg m-3",
        "long_name": "air density (ideal gas, virtual T)",
    },
    "zg": {
        "standard_name": "geopotential_height",
        "units": "m",
        "long_name": "geopotential height (hydrostatic, virtual T)",
    },
}


def write_run(
    path: Path, planet: PlanetParams, grid: Grid, phase: float = 0.0, dtype: str = "float32", run_id: int = 0
) -> Path:
    """Simulate one planet and write it to ``path`` (NetCDF4, contiguous variables, CF attributes).
    ``phase``: the season at the first output (radians of the year). Written to ``path.tmp`` first and
    renamed, so a file with the final name is always complete."""
    import netCDF4

    if dtype not in ("float32", "float64"):
        raise SapwoodError(f"dtype={dtype!r}: allowed are 'float32', 'float64'")
    sim = Simulation(planet, grid, phase, seed=run_id)
    tmp = path.with_name(path.name + ".tmp")
    with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
        ds.Conventions = "CF-1.10"
        ds.title = "sapwood primitive-equation planet model, Held-Suarez forcing (see sapwood.data.simulate)"
        ds.source = "sapwood.data.simulate"
        ds.run_id = run_id
        ds.gas_constant = GAS_CONSTANT
        ds.specific_heat = SPECIFIC_HEAT
        ds.season_phase = phase
        ds.spinup_days = sim.spinup_days
        for key, value in asdict(planet).items():
            ds.setncattr(key, value)
        ds.createDimension("time", grid.times)
        ds.createDimension("lev", grid.levels)
        ds.createDimension("lat", grid.nlat)
        ds.createDimension("lon", grid.nlon)
        ds.createDimension("bnds", 2)
        coords = {
            "time": (
                ("time",),
                np.arange(grid.times) * grid.dt_hours,
                {
                    "standard_name": "time", "units": "hours since 2000-01-01 00:00:00",
                    "calendar": "proleptic_gregorian", "axis": "T",
                },
            ),
            "lev": (
                ("lev",),
                sim.sigma,
                {
                    "standard_name": "atmosphere_sigma_coordinate", "units": "1", "positive": "down",
                    "axis": "Z", "bounds": "lev_bnds", "formula_terms": "sigma: lev ps: ps ptop: ptop",
                },
            ),
            "lat": (
                ("lat",),
                np.degrees(sim.lat),
                {"standard_name": "latitude", "units": "degrees_north", "axis": "Y", "bounds": "lat_bnds"},
            ),
            "lon": (
                ("lon",),
                np.degrees(sim.lon),
                {"standard_name": "longitude", "units": "degrees_east", "axis": "X", "bounds": "lon_bnds"},
            ),
            "lev_bnds": (("lev", "bnds"), np.stack([sim.sigma_edges[:-1], sim.sigma_edges[1:]], 1), {}),
            "lat_bnds": (
                ("lat", "bnds"),
                np.degrees(np.stack([sim.lat_edges[:-1], sim.lat_edges[1:]], 1)),
                {},
            ),
            "lon_bnds": (
                ("lon", "bnds"),
                np.degrees(np.stack([sim.lon - sim.dlon / 2, sim.lon + sim.dlon / 2], 1)),
                {},
            ),
            "cell_area": (("lat", "lon"), sim.area, {"standard_name": "cell_area", "units": "m2"}),
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
            variables[name].setncatts(
                {**attrs, "coordinates": "time lev lat lon" if name != "ps" else "time lat lon"}
            )
        heating = ds.createVariable("heating", "f8", ("time",))
        heating.setncatts(
            {"units": "W m-2", "long_name": "global-mean diabatic heating over the preceding interval"}
        )
        torque = ds.createVariable("torque", "f8", ("time",))
        torque.setncatts(
            {"units": "N m", "long_name": "friction torque on the atmosphere over the preceding interval"}
        )
        for index, output in enumerate(run_outputs(planet, grid, phase, simulation=sim)):
            for name, values in output.variables.items():
                variables[name][index] = values
            heating[index] = output.heating
            torque[index] = output.torque
        ds.energy_fixer_wm2 = float(np.mean(np.abs(sim.energy_fixes))) if sim.energy_fixes else 0.0
        ds.momentum_fixer_ms = float(np.mean(np.abs(sim.momentum_fixes))) if sim.momentum_fixes else 0.0
    tmp.replace(path)
    return path


def simulate_ensemble(
    out: Path, runs: int = 4, grid: Grid | None = None, seed: int = 0, dtype: str = "float32",
    progress: bool = True, planets: list[PlanetParams] | None = None,
) -> list[Path]:
    """Write ``runs`` NetCDF files ``out/run_NNNN.nc`` over ``planets`` (default: :func:`sample_planets`),
    each at a random season."""
    grid = grid or Grid()
    grid.validate()
    if runs < 1:
        raise SapwoodError(f"runs={runs}: need at least 1")
    out.mkdir(parents=True, exist_ok=True)
    if planets is not None and len(planets) != runs:
        raise SapwoodError(f"{len(planets)} planets given for runs={runs}")
    planets = list(planets) if planets is not None else sample_planets(runs, seed)
    seasons = np.random.default_rng(seed + 1).uniform(0, 2 * math.pi, runs)
    paths = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("simulating", total=runs)
        for run_id, (planet, season) in enumerate(zip(planets, seasons, strict=True)):
            paths.append(write_run(out / f"run_{run_id:04d}.nc", planet, grid, float(season), dtype, run_id))
            bar.advance(task)
    return paths
