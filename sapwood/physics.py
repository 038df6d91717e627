"""Physics constraints of datacube states: the ONE home of budget math, losses, metrics and projection.

Batched tensor code on the device of the inputs: states are ``[..., channels, lat, lon]`` in physical units
(the cube store's channel layout, :class:`sapwood.config.CubeModelConfig`); leading dims (batch, time) are
kept. Inputs are upcast to float32 before any reduction. The grid and equations are those of
:mod:`sapwood.data.simulate` (sigma layers ``dp_k = dsigma_k ps``, cell weights ``w_j = A_j / a^2``), the
constants those of :mod:`sapwood.constants`; the gas is moist: ``T_v = T (1 + 0.608 q)``.

Global means of one state (``<x> = sum_ij x w / sum_ij w``; ``W = sum_ij w = 4 pi``)::

    surface pressure  <ps>                                                       Pa
    column water      <sum_k q dp> / g                                           kg m-2
    total energy      <sum_k (c_p T + (u^2 + v^2)/2) dp> / g                     J m-2
    angular momentum  <sum_k (u + Omega a cos phi) a cos phi dp> / g              kg s-1 (axial, per m2)

Violations of a transition ``state -> next`` (one pass over each state, see :func:`violations`):

======================  ======  =====================================================================
key                     unit    definition
======================  ======  =====================================================================
``mass``                Pa      ``|<ps'> - <ps>|``: the global-mean surface-pressure drift of the step
``mass_pa``             Pa      the same, signed
``ps_change``           Pa      ``sqrt(<(ps' - ps)^2>)``: the typical local one-step change, the scale
                                ``mass`` is read against
``water``               kg m-2  ``|<column water'> - <column water>|``
``energy``              W m-2   ``|energy_wm2|``
``energy_wm2``          W m-2   ``(<E'> - <E>) / dt - h``: imbalance against the declared forcing ``h``
``momentum``            m s-1   ``|momentum_ms|``
``momentum_ms``         m s-1   ``(M' - M - torque dt) / (a <sum cos^2 phi dp> / g)``: the angular
                                momentum imbalance as the solid-body wind change at the equator
``ideal_gas``           %       mass-weighted mean ``|rho R_d T_v / (sigma ps) - 1|``
``hydrostatic``         %       mass-weighted mean ``|zg - zg_hydrostatic(T_v)| / (R_d T_v / g)``
``hydrostatic_m``       m       mass-weighted mean ``|zg - zg_hydrostatic(T_v)|``
``negative_q``          %       ``sum relu(-q) dp w / sum |q| dp w``
``thermo``              %       ``ideal_gas + hydrostatic + negative_q`` (the terms available)
======================  ======  =====================================================================

Declared forcing: ``heating`` (W m-2) and ``torque`` (N m) per transition when the data carry them (the
simulator writes both); otherwise :func:`declared_forcing` estimates them from the two states with the
simulator's Newtonian cooling and Rayleigh friction (trapezoid rule over the step).

Training loss (:func:`physics_loss`): ``sum_c weight_c (residual_c / goal_c)^2`` over the signed residuals
above with goals in the same units (:data:`LOSS_GOALS`: 1 Pa, 1 W m-2, 0.01 m s-1, 2 %); each term is 1 at its
goal, so ``cube.physics`` weights are read against that.

Projection (:func:`project`): mass and water fixers (``ps``, ``q`` scaled), an angular-momentum fixer
(solid-body ``u`` increment), optionally a weighted least-squares estimate of each column's ``T`` from the
predicted ``T``, ``zg`` and ``rho`` by their error variances (then ``zg`` and ``rho`` follow exactly from it),
and an energy fixer (uniform ``T`` shift, ``zg`` and ``rho`` kept consistent with it). No field is overwritten
by a diagnosis from another: each prediction enters the estimate with the weight of its error variance
(given, or the per-channel size of the predicted tendency), and ``diagnose=False`` keeps them as predicted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sapwood.config import CubeModelConfig, PhysicsLossConfig
from sapwood.constants import EARTH, GAS_CONSTANT, SPECIFIC_HEAT, VIRTUAL_FACTOR

EARTH_DEFAULTS = {
    k: EARTH[k]
    for k in ("planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure")
}
LOSS_GOALS = {"mass": 1.0, "energy": 1.0, "momentum": 0.01, "thermo": 2.0}  # Pa, W m-2, m s-1, %
UNITS = {
    "mass": "Pa", "mass_pa": "Pa", "ps_change": "Pa", "water": "kg m-2", "energy": "W m-2",
    "energy_wm2": "W m-2", "momentum": "m s-1", "momentum_ms": "m s-1", "ideal_gas": "%", "hydrostatic": "%",
    "hydrostatic_m": "m", "negative_q": "%", "thermo": "%",
}


@dataclass
class Geometry:
    """Grid, layout and forcing profiles for budget computations (tensors on one device, float32)."""

    cube: CubeModelConfig
    sigma: torch.Tensor  # [L] layer midpoints
    dsigma: torch.Tensor  # [L]
    sigma_edges: torch.Tensor  # [L+1]
    lat: torch.Tensor  # [H] radians
    cell_weight: torch.Tensor  # [H, 1] cell area / a^2
    dt_seconds: float
    coslat: torch.Tensor  # [H]
    hydrostatic_matrix: torch.Tensor  # [L, L]: zg = R_d / g * matrix @ T_v
    t_eq: torch.Tensor  # [L, H] Earth's equilibrium temperature (times s)
    k_t: torch.Tensor  # [L, H] Newtonian cooling rate (divided by r)
    k_v: torch.Tensor  # [L] Rayleigh friction rate

    @classmethod
    def default(cls, cube: CubeModelConfig, device: str | torch.device = "cpu") -> Geometry:
        """The simulator's grid: uniform sigma layers, uniform lat cells with the poles as edges."""
        levels, nlat, nlon = cube.levels, cube.lat, cube.lon
        sigma_edges = torch.arange(levels + 1, dtype=torch.float64) / levels
        lat_edges = torch.linspace(-math.pi / 2, math.pi / 2, nlat + 1, dtype=torch.float64)
        lat = 0.5 * (lat_edges[1:] + lat_edges[:-1])
        weight = (2 * math.pi / nlon) * torch.diff(torch.sin(lat_edges))
        return cls.from_grid(cube, sigma_edges, lat, weight[:, None], device)

    @classmethod
    def from_grid(
        cls, cube: CubeModelConfig, sigma_edges, lat, cell_weight, device: str | torch.device = "cpu",
        sigma=None,
    ) -> Geometry:
        """A geometry from layer edges in sigma ``[L+1]``, latitudes in radians ``[H]`` and cell areas over
        a^2 (``[H, 1]`` on a regular grid, ``[H, W]`` on any other), and the layer midpoints ``sigma``
        (halfway between the edges when not given); the hydrostatic integration matrix and the declared
        forcing profiles follow from them."""
        from sapwood.data.simulate import declared_heating_profiles

        sigma_edges = torch.as_tensor(sigma_edges, dtype=torch.float64)
        lat = torch.as_tensor(lat, dtype=torch.float64)
        if sigma is None:
            sigma = 0.5 * (sigma_edges[1:] + sigma_edges[:-1])
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        levels = sigma.numel()
        depth = torch.zeros(levels, levels, dtype=torch.float64)
        for k in range(levels):
            depth[k, k] = math.log(sigma_edges[k + 1] / sigma[k])
            for m in range(k + 1, levels):
                depth[k, m] = math.log(sigma_edges[m + 1] / sigma_edges[m])
        profiles = declared_heating_profiles(lat.numpy(), sigma.numpy())

        def put(t) -> torch.Tensor:
            return torch.as_tensor(t).float().to(device)

        return cls(
            cube=cube, sigma=put(sigma), dsigma=put(torch.diff(sigma_edges)), sigma_edges=put(sigma_edges),
            lat=put(lat), cell_weight=put(cell_weight), dt_seconds=cube.dt_hours * 3600.0,
            coslat=put(torch.cos(lat)), hydrostatic_matrix=put(depth), t_eq=put(profiles["t_eq"]),
            k_t=put(profiles["k_t"]), k_v=put(profiles["k_v"]),
        )

    def has(self, variable: str) -> bool:
        return variable in self.cube.variables

    def field(self, x: torch.Tensor, variable: str) -> torch.Tensor:
        """``variable`` of ``x [..., C, H, W]``: ``[..., L, H, W]`` (3-D) or ``[..., H, W]`` (surface)."""
        sl = self.cube.channel_slice(variable)
        out = x[..., sl, :, :]
        return out[..., 0, :, :] if variable in self.cube.surface_variables else out

    def planet(self, planet_params: torch.Tensor | None, name: str, like: torch.Tensor) -> torch.Tensor:
        """Planet parameter ``name`` shaped like ``like``'s leading dims (Earth's when not conditioned on)."""
        names = self.cube.planet_params
        if planet_params is not None and name in names:
            value = planet_params[..., names.index(name)].float().to(like.device)
            return value.expand(like.shape) if value.dim() else value
        return torch.full(like.shape, EARTH_DEFAULTS[name], device=like.device)


def _full_precision(function):
    """Run ``function`` with autocast off: its einsums and sums stay float32 under a bf16/fp16 region."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)

    return wrapper


# --- one pass over a state ----------------------------------------------------------------------------------


def _zonal_mass_sums(field: torch.Tensor, ps_weight: torch.Tensor) -> torch.Tensor:
    """``sum_lon field * ps * w`` -> ``[..., L, H]`` (the one pass over a 3-D field)."""
    return torch.einsum("...lhw,...hw->...lh", field, ps_weight)


@dataclass
class StateSums:
    """Global means (``/ sum w``) of one state, ``[...]`` each; the building blocks of every budget."""

    ps: torch.Tensor  # <ps>, Pa
    dp: torch.Tensor  # <sum_k dp> = <ps> (kept for clarity of the mass-weighted sums)
    water: torch.Tensor | None  # kg m-2
    energy: torch.Tensor | None  # J m-2
    momentum: torch.Tensor | None  # axial angular momentum per m2
    arm: torch.Tensor  # <sum cos^2 phi dp> / g, kg m-2: d(momentum) per unit solid-body equatorial wind / a
    heating: torch.Tensor | None  # declared Newtonian heating rate of this state, W m-2
    torque: torch.Tensor | None  # declared friction torque of this state per m2, N m-1


@_full_precision
def state_sums(
    x: torch.Tensor, geometry: Geometry, planet_params: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> StateSums:
    """All global sums of states ``[..., C, H, W]`` with one reduction pass per field (``work``: an optional
    scratch tensor shaped like one 3-D field, so no large temporary is allocated)."""
    x = x.float()
    ps = geometry.field(x, "ps")
    total_weight = geometry.cell_weight.expand(ps.shape[-2:]).sum()  # [H, 1] regular or [H, W] cell weights
    ps_weight = ps * geometry.cell_weight
    gravity = geometry.planet(planet_params, "gravity", ps_weight[..., 0, 0])
    radius = geometry.planet(planet_params, "planet_radius", gravity)
    dsigma_h = geometry.dsigma[:, None]  # [L, 1]
    zonal_psw = ps_weight.sum(-1)  # [..., H]
    mean_ps = zonal_psw.sum(-1) / total_weight
    coslat = geometry.coslat
    arm = (zonal_psw * coslat**2).sum(-1) * geometry.dsigma.sum() / (gravity * total_weight)
    water = energy = momentum = heating = torque = None
    if geometry.has("q"):
        water = (_zonal_mass_sums(geometry.field(x, "q"), ps_weight) * dsigma_h).sum((-2, -1)) / (
            gravity * total_weight
        )
    if geometry.has("T"):
        t_sums = _zonal_mass_sums(geometry.field(x, "T"), ps_weight)  # [..., L, H]
        enthalpy = SPECIFIC_HEAT * (t_sums * dsigma_h).sum((-2, -1))
        kinetic = torch.zeros_like(enthalpy)
        if geometry.has("u") and geometry.has("v"):
            u, v = geometry.field(x, "u"), geometry.field(x, "v")
            if _needs_graph(x) or work is None or work.shape != u.shape:
                speed2 = u * u + v * v
            else:
                speed2 = torch.mul(u, u, out=work).addcmul_(v, v)
            kinetic = 0.5 * (_zonal_mass_sums(speed2, ps_weight) * dsigma_h).sum((-2, -1))
        energy = (enthalpy + kinetic) / (gravity * total_weight)
        from sapwood.data.simulate import radiative_time_factor, temperature_scale

        flux = geometry.planet(planet_params, "stellar_flux", gravity)
        slow = radiative_time_factor(
            geometry.planet(planet_params, "mean_surface_pressure", gravity), gravity, flux
        )
        weights = geometry.k_t * dsigma_h  # [L, H]
        equilibrium = temperature_scale(flux) * ((weights * geometry.t_eq) * zonal_psw[..., None, :]).sum(
            (-2, -1)
        )
        heating = (
            SPECIFIC_HEAT * (equilibrium - (t_sums * weights).sum((-2, -1))) / (slow * gravity * total_weight)
        )
    if geometry.has("u"):
        u_sums = _zonal_mass_sums(geometry.field(x, "u"), ps_weight)  # [..., L, H]
        omega = geometry.planet(planet_params, "rotation_rate", gravity)
        relative = (u_sums * dsigma_h * coslat).sum((-2, -1)) * radius
        planetary = omega * radius**2 * (zonal_psw * coslat**2).sum(-1) * geometry.dsigma.sum()
        momentum = (relative + planetary) / (gravity * total_weight)
        torque = (
            -radius
            * (u_sums * (geometry.k_v[:, None] * dsigma_h) * coslat).sum((-2, -1))
            / (gravity * total_weight)
        )
    return StateSums(mean_ps, mean_ps, water, energy, momentum, arm, heating, torque)


def budgets(
    x: torch.Tensor, geometry: Geometry, planet_params: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Global means of states ``[..., C, H, W]``: ``mass`` (= <ps>, Pa), ``water`` (kg m-2), ``energy``
    (J m-2), ``momentum`` (axial angular momentum per m2), float32 ``[...]`` each."""
    sums = state_sums(x, geometry, planet_params)
    out = {"mass": sums.ps}
    for key in ("water", "energy", "momentum"):
        if getattr(sums, key) is not None:
            out[key] = getattr(sums, key)
    return out


def declared_forcing(
    state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
    planet_params: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Estimated declared ``heating`` (W m-2) and ``torque`` (N m) of ``state -> next_state``: the simulator's
    Newtonian cooling and Rayleigh friction, trapezoid rule over the step."""
    before, after = (
        state_sums(state, geometry, planet_params),
        state_sums(next_state, geometry, planet_params),
    )
    return _declared(before, after, geometry, planet_params, state)


def _declared(
    before: StateSums, after: StateSums, geometry: Geometry, planet_params: torch.Tensor | None,
    like: torch.Tensor,
) -> dict[str, torch.Tensor]:
    out = {}
    if before.heating is not None:
        out["heating"] = 0.5 * (before.heating + after.heating)
    if before.torque is not None:
        radius = geometry.planet(planet_params, "planet_radius", before.ps)
        out["torque"] = 0.5 * (before.torque + after.torque) * 4 * math.pi * radius**2
    return out


def _residuals(
    before: StateSums, after: StateSums, geometry: Geometry, planet_params: torch.Tensor | None,
    heating: torch.Tensor | None, torque: torch.Tensor | None, like: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Signed residuals in physical units (``mass_pa``, ``water_kgm2``, ``energy_wm2``, ``momentum_ms``)."""
    dt = geometry.dt_seconds
    declared = None
    out = {"mass_pa": after.ps - before.ps}
    if before.water is not None:
        out["water_kgm2"] = after.water - before.water
    if before.energy is not None:
        if heating is None:
            declared = _declared(before, after, geometry, planet_params, like)
            heating = declared["heating"]
        out["energy_wm2"] = (after.energy - before.energy) / dt - heating.float().to(after.energy.device)
    if before.momentum is not None:
        radius = geometry.planet(planet_params, "planet_radius", before.ps)
        if torque is None:
            declared = declared or _declared(before, after, geometry, planet_params, like)
            torque = declared["torque"]
        torque_per_area = torque.float().to(radius.device) / (4 * math.pi * radius**2)
        imbalance = after.momentum - before.momentum - torque_per_area * dt
        out["momentum_ms"] = imbalance / (radius * 0.5 * (before.arm + after.arm))
    return out


def transition_residuals(
    state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
    planet_params: torch.Tensor | None = None, heating: torch.Tensor | None = None,
    torque: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Signed budget residuals of ``state -> next_state`` in physical units ``[...]`` (see the module
    table)."""
    before, after = (
        state_sums(state, geometry, planet_params),
        state_sums(next_state, geometry, planet_params),
    )
    return _residuals(before, after, geometry, planet_params, heating, torque, state)


@_full_precision
def hydrostatic_height(
    temperature_v: torch.Tensor, geometry: Geometry, gravity: torch.Tensor
) -> torch.Tensor:
    """Full-level geopotential height ``[..., L, H, W]`` from the virtual temperature (flat surface at
    sigma = 1), as the simulator diagnoses it; ``gravity`` broadcastable to ``[..., 1, 1, 1]``."""
    return (
        GAS_CONSTANT * torch.einsum("kl,...lhw->...khw", geometry.hydrostatic_matrix, temperature_v) / gravity
    )


def virtual_temperature(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``T_v = T (1 + 0.608 q)`` of states ``[..., C, H, W]`` (``T`` when there is no ``q``)."""
    temperature = geometry.field(x, "T")
    return temperature * (1 + VIRTUAL_FACTOR * geometry.field(x, "q")) if geometry.has("q") else temperature


def saturation_humidity(temperature: torch.Tensor, pressure: torch.Tensor) -> torch.Tensor:
    """``q_sat`` (kg/kg) over water, Bolton (1980) vapour pressure."""
    vapour = 611.2 * torch.exp(17.67 * (temperature - 273.15) / (temperature - 29.65))
    return 0.622 * vapour / (pressure - 0.378 * vapour).clamp_min(1e-3)


@_full_precision
def thermo_residuals(
    x: torch.Tensor, geometry: Geometry, planet_params: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Thermodynamic-consistency violations of states ``[..., C, H, W]`` -> ``[...]`` each (module table).
    Each mass-weighted mean is one fused pass (``sum_lhw r dsigma_l w_h ps_hw`` as an einsum); temporaries
    live in two scratch fields (``work`` may supply one)."""
    x = x.float()
    ps = geometry.field(x, "ps")
    ps_weight = ps * geometry.cell_weight
    total = ps_weight.sum((-2, -1)) * geometry.dsigma.sum()
    shape = ps.shape[:-2] + (geometry.cube.levels,) + ps.shape[-2:]
    if _needs_graph(x):
        return _thermo_differentiable(x, geometry, planet_params, ps, ps_weight, total)
    work = work if work is not None and work.shape == shape else torch.empty(shape, device=x.device)

    def mass_mean(values: torch.Tensor, level_weight: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...lhw,...hw,l->...", values, ps_weight, level_weight) / total

    out: dict[str, torch.Tensor] = {}
    if geometry.has("T"):
        temperature = geometry.field(x, "T")
        temperature_v = (
            torch.addcmul(temperature, temperature, geometry.field(x, "q"), value=VIRTUAL_FACTOR)
            if geometry.has("q")
            else temperature
        )
        if geometry.has("rho"):
            # |rho R T_v / p - 1| dp w = |rho R T_v - p| (dsigma / sigma) w: ps cancels
            torch.mul(geometry.sigma[:, None, None], ps.unsqueeze(-3), out=work).neg_()
            misfit = work.addcmul_(geometry.field(x, "rho"), temperature_v, value=GAS_CONSTANT).abs_()
            out["ideal_gas"] = (
                100
                * torch.einsum(
                    "...lhw,...hw,l->...", misfit, geometry.cell_weight.expand_as(ps),
                    geometry.dsigma / geometry.sigma,
                )
                / total
            )
        if geometry.has("zg"):
            gravity = geometry.planet(planet_params, "gravity", total)
            columns = temperature_v.flatten(-2)
            height = torch.matmul(geometry.hydrostatic_matrix, columns, out=work.view(columns.shape)).view(
                shape
            )
            height.mul_((GAS_CONSTANT / gravity)[..., None, None, None])
            error = height.sub_(geometry.field(x, "zg")).abs_()
            out["hydrostatic_m"] = mass_mean(error, geometry.dsigma)
            out["hydrostatic"] = (
                100 / GAS_CONSTANT * gravity * mass_mean(error.div_(temperature_v), geometry.dsigma)
            )
    if geometry.has("q"):
        q = geometry.field(x, "q")
        negative = mass_mean(torch.neg(q, out=work).clamp_(min=0), geometry.dsigma)
        out["negative_q"] = 100 * negative / (mass_mean(q, geometry.dsigma) + 2 * negative).clamp_min(1e-30)
    out["thermo"] = sum(
        (out[k] for k in ("ideal_gas", "hydrostatic", "negative_q") if k in out), torch.zeros_like(total)
    )
    return out


def _needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _thermo_differentiable(
    x: torch.Tensor, geometry: Geometry, planet_params: torch.Tensor | None, ps: torch.Tensor,
    ps_weight: torch.Tensor, total: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """:func:`thermo_residuals` without in-place scratch fields, for the loss (autograd records every
    step)."""

    def mass_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...lhw,...hw,l->...", values, ps_weight, geometry.dsigma) / total

    out: dict[str, torch.Tensor] = {}
    if geometry.has("T"):
        temperature_v = virtual_temperature(x, geometry)
        if geometry.has("rho"):
            pressure = geometry.sigma[:, None, None] * ps.unsqueeze(-3)
            out["ideal_gas"] = 100 * mass_mean(
                (geometry.field(x, "rho") * GAS_CONSTANT * temperature_v / pressure - 1).abs()
            )
        if geometry.has("zg"):
            gravity = geometry.planet(planet_params, "gravity", total)
            error = (
                geometry.field(x, "zg")
                - hydrostatic_height(temperature_v, geometry, gravity[..., None, None, None])
            ).abs()
            out["hydrostatic_m"] = mass_mean(error)
            out["hydrostatic"] = 100 / GAS_CONSTANT * gravity * mass_mean(error / temperature_v)
    if geometry.has("q"):
        q = geometry.field(x, "q")
        negative = mass_mean(torch.relu(-q))
        out["negative_q"] = 100 * negative / (mass_mean(q) + 2 * negative).clamp_min(1e-30)
    out["thermo"] = sum(
        (out[k] for k in ("ideal_gas", "hydrostatic", "negative_q") if k in out), torch.zeros_like(total)
    )
    return out


def supersaturation(x: torch.Tensor, geometry: Geometry, tolerance: float = 0.01) -> torch.Tensor:
    """Mass fraction (%) of air with ``q > q_sat(T, p) (1 + tolerance)``: reported, not a constraint (the
    simulator has no condensation)."""
    x = x.float()
    ps = geometry.field(x, "ps")
    pressure = geometry.sigma[:, None, None] * ps.unsqueeze(-3)
    mass_weight = geometry.dsigma[:, None, None] * (ps * geometry.cell_weight).unsqueeze(-3)
    limit = saturation_humidity(geometry.field(x, "T"), pressure) * (1 + tolerance)
    return (
        100
        * ((geometry.field(x, "q") > limit).float() * mass_weight).sum((-3, -2, -1))
        / mass_weight.sum((-3, -2, -1))
    )


def violations(
    state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
    planet_params: torch.Tensor | None = None, heating: torch.Tensor | None = None,
    torque: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All violations of ``state -> next_state`` per sample ``[...]``, in the units of the module table."""
    ps = geometry.field(next_state, "ps")
    work = torch.empty(ps.shape[:-2] + (geometry.cube.levels,) + ps.shape[-2:], device=ps.device)
    before = state_sums(state, geometry, planet_params, work)
    after = state_sums(next_state, geometry, planet_params, work)
    residuals = _residuals(before, after, geometry, planet_params, heating, torque, state)
    out = {"mass": residuals["mass_pa"].abs(), "mass_pa": residuals["mass_pa"]}
    weight = geometry.cell_weight
    change = geometry.field(next_state, "ps").float() - geometry.field(state, "ps").float()
    out["ps_change"] = ((change**2 * weight).sum((-2, -1)) / weight.expand(change.shape[-2:]).sum()).sqrt()
    if "water_kgm2" in residuals:
        out["water"] = residuals["water_kgm2"].abs()
    if "energy_wm2" in residuals:
        out["energy"], out["energy_wm2"] = residuals["energy_wm2"].abs(), residuals["energy_wm2"]
    if "momentum_ms" in residuals:
        out["momentum"], out["momentum_ms"] = residuals["momentum_ms"].abs(), residuals["momentum_ms"]
    out.update(thermo_residuals(next_state, geometry, planet_params, work))
    return out


def physics_loss(
    state: torch.Tensor, prediction: torch.Tensor, geometry: Geometry, weights: PhysicsLossConfig,
    planet_params: torch.Tensor | None = None, heating: torch.Tensor | None = None,
    torque: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Differentiable ``sum_c weight_c (residual_c / goal_c)^2`` (batch mean) over the same residuals as
    :func:`violations`, and each term as a metric (``physics_<name>``: 1 means at the goal)."""
    residuals = transition_residuals(state, prediction, geometry, planet_params, heating, torque)
    terms = {
        "mass": residuals["mass_pa"], "energy": residuals.get("energy_wm2"),
        "momentum": residuals.get("momentum_ms"),
        "thermo": thermo_residuals(prediction, geometry, planet_params)["thermo"],
    }
    loss = torch.zeros((), device=prediction.device)
    metrics: dict[str, float] = {}
    for name, residual in terms.items():
        if residual is None:
            continue
        term = (residual / LOSS_GOALS[name]).pow(2).mean()
        loss = loss + getattr(weights, name) * term
        metrics[f"physics_{name}"] = float(term.detach())
    return loss, metrics


# --- projection ---------------------------------------------------------------------------------------------


def mass_fix(prediction: torch.Tensor, state: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Exact mass (and water) conservation: ``ps`` scaled so ``<ps'> = <ps>``, then ``q`` so the column
    water is unchanged. Gravity cancels, so no planet parameters are needed. Returns a new float32 tensor."""
    out = prediction.float().clone()
    before = state_sums(state, geometry)
    after = state_sums(out, geometry)
    out[..., geometry.cube.channel_slice("ps"), :, :] *= (before.ps / after.ps)[..., None, None, None]
    if geometry.has("q"):
        water = state_sums(out, geometry).water
        out[..., geometry.cube.channel_slice("q"), :, :] *= (before.water / water.clamp_min(1e-30))[
            ..., None, None, None
        ]
    return out


@_full_precision
def _thermo_least_squares(
    out: torch.Tensor, geometry: Geometry, gravity: torch.Tensor, error_std: torch.Tensor
) -> None:
    """In place: per column, the ``T`` minimizing the error-variance-weighted misfit to the predicted ``T``,
    ``zg`` (hydrostatic, linear in ``T``) and ``rho`` (ideal gas, linearized at the predicted ``T``); then
    ``zg`` and ``rho`` recomputed from it exactly."""
    cube = geometry.cube
    std = error_std.float().to(out.device)
    temperature = geometry.field(out, "T")
    columns = temperature.movedim(-3, -1)  # [..., H, W, L]
    virtual = (
        (1 + VIRTUAL_FACTOR * geometry.field(out, "q")) if geometry.has("q") else torch.ones_like(temperature)
    )
    virtual = virtual.movedim(-3, -1)
    precision_t = 1 / std[cube.channel_slice("T")] ** 2  # [L]
    normal = torch.diag_embed(precision_t.expand(columns.shape)).clone()  # [..., H, W, L, L]
    rhs = torch.zeros_like(columns)
    ps = geometry.field(out, "ps")
    pressure = (geometry.sigma[:, None, None] * ps.unsqueeze(-3)).movedim(-3, -1)
    if geometry.has("zg"):
        g = gravity[..., None, None, None, None]
        operator = GAS_CONSTANT / g * geometry.hydrostatic_matrix * virtual[..., None, :]  # [..., H, W, L, L]
        precision_z = 1 / std[cube.channel_slice("zg")] ** 2
        misfit = geometry.field(out, "zg").movedim(-3, -1) - (operator @ columns[..., None])[..., 0]
        weighted = operator.transpose(-1, -2) * precision_z
        normal = normal + weighted @ operator
        rhs = rhs + (weighted @ misfit[..., None])[..., 0]
    if geometry.has("rho"):
        rho_model = pressure / (GAS_CONSTANT * virtual * columns)
        slope = -rho_model / columns  # d rho / d T
        precision_r = 1 / std[cube.channel_slice("rho")] ** 2
        misfit = geometry.field(out, "rho").movedim(-3, -1) - rho_model
        normal = normal + torch.diag_embed(slope**2 * precision_r)
        rhs = rhs + slope * precision_r * misfit
    new_t = columns + torch.linalg.solve(normal, rhs[..., None])[..., 0]
    _set_temperature(out, geometry, new_t.movedim(-1, -3), gravity, consistent=True)


def _set_temperature(
    out: torch.Tensor, geometry: Geometry, temperature: torch.Tensor, gravity: torch.Tensor, consistent: bool
) -> None:
    """Write ``T`` into ``out``; with ``consistent``, also ``zg`` and ``rho`` diagnosed from it."""
    out[..., geometry.cube.channel_slice("T"), :, :] = temperature
    if not consistent:
        return
    temperature_v = virtual_temperature(out, geometry)
    if geometry.has("zg"):
        out[..., geometry.cube.channel_slice("zg"), :, :] = hydrostatic_height(
            temperature_v, geometry, gravity[..., None, None, None]
        )
    if geometry.has("rho"):
        pressure = geometry.sigma[:, None, None] * geometry.field(out, "ps").unsqueeze(-3)
        out[..., geometry.cube.channel_slice("rho"), :, :] = pressure / (GAS_CONSTANT * temperature_v)


def tendency_scale(prediction: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS of ``prediction - state`` over everything but the channel axis ``[C]``: the default
    error scale of a one-step prediction (its errors grow with its tendencies), floored at 1e-6 of the
    channel's magnitude."""
    change = (prediction.float() - state.float()).movedim(-3, 0).flatten(1)
    magnitude = state.float().movedim(-3, 0).flatten(1).abs().mean(1)
    return change.pow(2).mean(1).sqrt().clamp_min(1e-30).maximum(1e-6 * magnitude)


def project(
    prediction: torch.Tensor, state: torch.Tensor, geometry: Geometry,
    planet_params: torch.Tensor | None = None, heating: torch.Tensor | None = None, energy: bool = True,
    diagnose: bool = True, error_std: torch.Tensor | None = None, torque: torch.Tensor | None = None,
    momentum: bool = True,
) -> torch.Tensor:
    """Mass/water fixer; (``momentum``) a solid-body ``u`` increment closing the angular-momentum budget;
    (``diagnose``) the weighted least-squares ``T`` of each column from the predicted ``T``, ``zg``, ``rho``
    by their error standard deviations ``error_std [C]`` (default :func:`tendency_scale`; pass measured errors
    or the model's tendency std when known), with ``zg``, ``rho`` then exact; (``energy``) a uniform ``T``
    shift closing the energy budget (``zg``, ``rho`` follow it when diagnosed). With ``diagnose=False`` the
    predicted ``T``, ``zg``, ``rho`` are kept. Float32 result."""
    out = mass_fix(prediction, state, geometry)
    before = state_sums(state, geometry, planet_params)
    gravity = geometry.planet(planet_params, "gravity", before.ps)
    radius = geometry.planet(planet_params, "planet_radius", before.ps)
    if heating is None or torque is None:
        declared = _declared(before, state_sums(out, geometry, planet_params), geometry, planet_params, state)
        heating = declared.get("heating") if heating is None else heating
        torque = declared.get("torque") if torque is None else torque
    if momentum and geometry.has("u"):
        after = state_sums(out, geometry, planet_params)
        target = before.momentum + torque.float() / (4 * math.pi * radius**2) * geometry.dt_seconds
        wind = (target - after.momentum) / (radius * after.arm)
        out[..., geometry.cube.channel_slice("u"), :, :] += (
            wind[..., None, None, None] * geometry.coslat[:, None]
        )
    consistent = diagnose and geometry.has("T") and (geometry.has("zg") or geometry.has("rho"))
    if consistent:
        if error_std is None:
            error_std = tendency_scale(prediction, state)
        _thermo_least_squares(out, geometry, gravity, error_std)
    if energy and geometry.has("T"):
        after = state_sums(out, geometry, planet_params)
        missing = before.energy + geometry.dt_seconds * heating.float() - after.energy  # J m-2
        shift = missing * gravity / (SPECIFIC_HEAT * after.ps * geometry.dsigma.sum())
        _set_temperature(
            out, geometry, geometry.field(out, "T") + shift[..., None, None, None], gravity, consistent
        )
    return out
