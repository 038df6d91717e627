"""Physics constraints of datacube states: the ONE home of budget math, losses, metrics and projection.

Everything is batched tensor code on the device of the inputs: states are ``[..., channels, lat, lon]``
in physical units (the cube store's channel layout, :class:`sapwood.config.CubeModelConfig`), any
leading dims (batch, time) are kept. Inputs are upcast to float32 before any reduction, so bf16/fp16
predictions are measured safely. The equations are those of :mod:`sapwood.data.simulate` (sigma layers,
``dp_k = dsigma_k ps``, cell areas ``A_j = a^2 dlambda (sin phi_{j+1/2} - sin phi_{j-1/2})``, i.e. the
cos-latitude area weight of the cell, and pressure weights ``dp / g``).

Budgets of one state (all divided by ``a^2``, which cancels in every ratio; ``w_j = A_j / a^2``)::

    mass      M = (1/g) sum_ij ps w                                      (kg / a^2)
    water     W = (1/g) sum_kij q dp w
    energy    E = (1/g) sum_kij (c_p T + (u^2 + v^2)/2) dp w           (internal + potential as
              enthalpy c_p T for a hydrostatic column with a flat surface, plus kinetic; no latent
              term: the simulator has no condensation, q is a passive tracer)
    momentum  I_k = sum_ij u cos(phi) w                                  (relative axial angular
              momentum of layer k per unit mass; an exact invariant of the simulator's flow)

Violation percentages of a transition ``state -> next`` (each a residual over a stated scale):

- ``mass``      = 100 |M' - M| / M                (no mass source)
- ``water``     = 100 |W' - W| / W                (no water source)
- ``energy``    = 100 |E' - E - 4 pi h dt| / E     (``h`` the declared global-mean heating, W m-2)
                  also ``energy_wm2`` = (E' - E - 4 pi h dt) / (4 pi dt): the same residual as a
                  global-mean flux (W m-2), a far stricter scale than the total energy
- ``momentum``  = 100 sum_k |I'_k - I_k| / sum_k |I_k|
- ``thermo`` (of ``next``) = ``ideal_gas`` + ``hydrostatic`` + ``negative_q`` (available terms summed):
    ``ideal_gas``   = 100 * mass-weighted mean |rho R_d T / (sigma ps) - 1|
    ``hydrostatic`` = 100 * mass-weighted mean |zg - zg_hydrostatic(T)| / (R_d T / g)   (per scale height)
    ``negative_q``  = 100 * sum relu(-q) dp w / sum |q| dp w
  ``supersaturation`` (mass fraction above ``q_sat(T, p) * 1.01``, Bolton 1980) is reported but is not
  part of ``thermo``: the simulator has no condensation, so its truth is supersaturated aloft.

Training loss: ``sum_c weight_c (residual_c / goal_c)^2`` with the relative residuals above and
goals mass 1e-3, energy 1e-2, momentum 2e-2, thermo 2e-2 (each term is 1 at its goal).

Projection (:func:`project`): exact mass fixer (``ps`` scaled by ``M / M'``), water fixer (``q`` scaled
by ``W / W'`` after that), an energy fixer (uniform ``T`` shift closing the energy budget) and
re-diagnosis of ``rho`` (ideal gas) and ``zg`` (hydrostatic) from ``T`` and ``ps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sapwood.config import CubeModelConfig, PhysicsLossConfig

GAS_CONSTANT = 287.04  # R_d, J kg-1 K-1 (as sapwood.data.simulate)
SPECIFIC_HEAT = 1004.64  # c_p, J kg-1 K-1
STEFAN_BOLTZMANN = 5.670374e-8
EARTH_DEFAULTS = {"planet_radius": 6.371e6, "gravity": 9.81, "rotation_rate": 7.292e-5,
                  "stellar_flux": 1361.0, "mean_surface_pressure": 1.0e5}
LOSS_GOALS = {"mass": 1e-3, "energy": 1e-2, "momentum": 2e-2, "thermo": 2e-2}
SUPERSATURATION_TOLERANCE = 0.01


@dataclass
class Geometry:
    """Grid and layout for budget computations (tensors on one device, float32)."""

    cube: CubeModelConfig
    sigma: torch.Tensor  # [L] layer midpoints
    dsigma: torch.Tensor  # [L]
    sigma_edges: torch.Tensor  # [L+1]
    lat: torch.Tensor  # [H] radians
    cell_weight: torch.Tensor  # [H, 1] cell area / a^2
    dt_seconds: float

    @classmethod
    def default(cls, cube: CubeModelConfig, device: str | torch.device = "cpu") -> Geometry:
        """The simulator's grid: uniform sigma layers, uniform lat cells with the poles as edges."""
        levels, nlat, nlon = cube.levels, cube.lat, cube.lon
        sigma_edges = torch.arange(levels + 1, dtype=torch.float64) / levels
        lat_edges = torch.linspace(-math.pi / 2, math.pi / 2, nlat + 1, dtype=torch.float64)
        weight = (2 * math.pi / nlon) * torch.diff(torch.sin(lat_edges))
        return cls(
            cube=cube,
            sigma=(0.5 * (sigma_edges[1:] + sigma_edges[:-1])).float().to(device),
            dsigma=torch.diff(sigma_edges).float().to(device),
            sigma_edges=sigma_edges.float().to(device),
            lat=(0.5 * (lat_edges[1:] + lat_edges[:-1])).float().to(device),
            cell_weight=weight[:, None].float().to(device),
            dt_seconds=cube.dt_hours * 3600.0,
        )

    def has(self, variable: str) -> bool:
        return variable in self.cube.variables

    def field(self, x: torch.Tensor, variable: str) -> torch.Tensor:
        """``variable`` of ``x [..., C, H, W]``: ``[..., L, H, W]`` (3-D) or ``[..., H, W]`` (surface)."""
        sl = self.cube.channel_slice(variable)
        out = x[..., sl, :, :]
        return out[..., 0, :, :] if variable in self.cube.surface_variables else out

    def planet(self, planet_params: torch.Tensor | None, name: str, like: torch.Tensor) -> torch.Tensor:
        """Planet parameter ``name`` per leading index of ``like`` (Earth value when not conditioned on)."""
        names = self.cube.planet_params
        if planet_params is not None and name in names:
            value = planet_params[..., names.index(name)].float()
            return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))
        return torch.full((), EARTH_DEFAULTS[name], device=like.device)


def _sum_grid(x: torch.Tensor, dims: int) -> torch.Tensor:
    return x.sum(dim=tuple(range(-dims, 0)))


def _layer_mass(ps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``dp w`` per cell and layer ``[..., L, H, W]`` (Pa / a^2 units)."""
    return geometry.dsigma[:, None, None] * ps.unsqueeze(-3) * geometry.cell_weight


def budgets(x: torch.Tensor, geometry: Geometry, planet_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Global budgets of states ``[..., C, H, W]``: ``mass``, ``water``, ``energy`` ``[...]`` and the
    per-layer ``momentum`` ``[..., L]`` (see the module docstring), in float32."""
    x = x.float()
    ps = geometry.field(x, "ps")
    gravity = geometry.planet(planet_params, "gravity", ps.sum((-2, -1)))
    dpw = _layer_mass(ps, geometry)
    out = {"mass": _sum_grid(ps * geometry.cell_weight, 2) / gravity}
    if geometry.has("q"):
        out["water"] = _sum_grid(geometry.field(x, "q") * dpw, 3) / gravity
    if geometry.has("T"):
        specific = SPECIFIC_HEAT * geometry.field(x, "T")
        if geometry.has("u") and geometry.has("v"):
            specific = specific + 0.5 * (geometry.field(x, "u") ** 2 + geometry.field(x, "v") ** 2)
        out["energy"] = _sum_grid(specific * dpw, 3) / gravity
    if geometry.has("u"):
        out["momentum"] = _sum_grid(geometry.field(x, "u") * torch.cos(geometry.lat)[:, None] * geometry.cell_weight, 2)
    return out


def relaxation_heating(state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
                       planet_params: torch.Tensor | None = None) -> torch.Tensor:
    """An estimate of the declared forcing ``h`` (W m-2) when the data do not carry it: the simulator's
    Newtonian relaxation ``c_p (T_eq - T) / tau`` integrated with the trapezoid rule over the interval."""
    s, n = state.float(), next_state.float()
    ps_like = geometry.field(s, "ps").sum((-2, -1))
    flux = geometry.planet(planet_params, "stellar_flux", ps_like)
    p0 = geometry.planet(planet_params, "mean_surface_pressure", ps_like)
    gravity = geometry.planet(planet_params, "gravity", ps_like)
    t0 = 1.13 * (flux * 0.7 / (4 * STEFAN_BOLTZMANN)) ** 0.25
    tau = SPECIFIC_HEAT * p0 / (gravity * 4 * STEFAN_BOLTZMANN * t0**3)
    expand = (lambda v: v[..., None, None, None]) if torch.is_tensor(t0) and t0.dim() else (lambda v: v)
    t_eq = (expand(t0) * (1 - 0.2 * torch.sin(geometry.lat)[:, None] ** 2)) * geometry.sigma[:, None, None] ** 0.19
    rate = 0.0
    for x in (s, n):
        dpw = _layer_mass(geometry.field(x, "ps"), geometry)
        rate = rate + 0.5 * _sum_grid((t_eq - geometry.field(x, "T")) * dpw, 3)
    return SPECIFIC_HEAT * rate / (tau * gravity * 4 * math.pi)


def hydrostatic_height(temperature: torch.Tensor, geometry: Geometry, gravity: torch.Tensor) -> torch.Tensor:
    """Full-level geopotential height ``[..., L, H, W]`` from ``T`` (flat surface at sigma = 1), as the
    simulator diagnoses it."""
    edges = geometry.sigma_edges
    layer_depth = torch.log(edges[1:] / edges[:-1].clamp_min(1e-30))[:, None, None]
    half_depth = torch.log(edges[1:] / geometry.sigma)[:, None, None]
    thickness = GAS_CONSTANT * temperature / gravity
    below_inclusive = torch.flip(torch.cumsum(torch.flip(thickness * layer_depth, (-3,)), -3), (-3,))
    below = below_inclusive - thickness * layer_depth  # sum over layers m > k
    return below + thickness * half_depth


def saturation_humidity(temperature: torch.Tensor, pressure: torch.Tensor) -> torch.Tensor:
    """``q_sat`` (kg/kg) over water, Bolton (1980) vapour pressure."""
    vapour = 611.2 * torch.exp(17.67 * (temperature - 273.15) / (temperature - 29.65))
    return 0.622 * vapour / (pressure - 0.378 * vapour).clamp_min(1e-3)


def thermo_residuals(x: torch.Tensor, geometry: Geometry,
                     planet_params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Thermodynamic-consistency violation percentages of states ``[..., C, H, W]`` -> ``[...]`` each."""
    x = x.float()
    ps = geometry.field(x, "ps")
    dpw = _layer_mass(ps, geometry)
    total = _sum_grid(dpw, 3)
    out: dict[str, torch.Tensor] = {}
    temperature = geometry.field(x, "T") if geometry.has("T") else None
    pressure = geometry.sigma[:, None, None] * ps.unsqueeze(-3)
    if geometry.has("rho") and temperature is not None:
        residual = geometry.field(x, "rho") * GAS_CONSTANT * temperature / pressure - 1
        out["ideal_gas"] = 100 * _sum_grid(residual.abs() * dpw, 3) / total
    if geometry.has("zg") and temperature is not None:
        gravity = geometry.planet(planet_params, "gravity", ps.sum((-2, -1)))
        gravity3 = gravity[..., None, None, None] if gravity.dim() else gravity
        scale_height = GAS_CONSTANT * temperature / gravity3
        residual = (geometry.field(x, "zg") - hydrostatic_height(temperature, geometry, gravity3)) / scale_height
        out["hydrostatic"] = 100 * _sum_grid(residual.abs() * dpw, 3) / total
    if geometry.has("q"):
        q = geometry.field(x, "q")
        out["negative_q"] = 100 * _sum_grid(torch.relu(-q) * dpw, 3) / _sum_grid(q.abs() * dpw, 3).clamp_min(1e-30)
        if temperature is not None:
            limit = saturation_humidity(temperature, pressure) * (1 + SUPERSATURATION_TOLERANCE)
            out["supersaturation"] = 100 * _sum_grid((q > limit).float() * dpw, 3) / total
    out["thermo"] = sum((out[k] for k in ("ideal_gas", "hydrostatic", "negative_q") if k in out),
                        torch.zeros_like(total))
    return out


def transition_residuals(state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
                         planet_params: torch.Tensor | None = None,
                         heating: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Signed relative residuals (fractions, not %) of the budgets of ``state -> next_state`` ``[...]``.

    ``heating``: declared global-mean heating (W m-2) per transition; estimated with
    :func:`relaxation_heating` when None.
    """
    before = budgets(state, geometry, planet_params)
    after = budgets(next_state, geometry, planet_params)
    out = {"mass": (after["mass"] - before["mass"]) / before["mass"]}
    if "water" in before:
        out["water"] = (after["water"] - before["water"]) / before["water"].clamp_min(1e-30)
    if "energy" in before:
        if heating is None:
            heating = relaxation_heating(state, next_state, geometry, planet_params)
        forcing = 4 * math.pi * geometry.dt_seconds * heating.float()
        imbalance = after["energy"] - before["energy"] - forcing
        out["energy"] = imbalance / before["energy"]
        out["energy_wm2"] = imbalance / (4 * math.pi * geometry.dt_seconds)
    if "momentum" in before:
        change = (after["momentum"] - before["momentum"]).abs().sum(-1)
        out["momentum"] = change / before["momentum"].abs().sum(-1).clamp_min(1e-30)
    return out


def violations(state: torch.Tensor, next_state: torch.Tensor, geometry: Geometry,
               planet_params: torch.Tensor | None = None,
               heating: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All violation percentages (see the module docstring) of ``state -> next_state``, per sample ``[...]``.
    ``energy_wm2`` is in W m-2 (signed); everything else in % (non-negative)."""
    residuals = transition_residuals(state, next_state, geometry, planet_params, heating)
    out = {k: (v if k == "energy_wm2" else 100 * v.abs()) for k, v in residuals.items()}
    out.update(thermo_residuals(next_state, geometry, planet_params))
    return out


def physics_loss(state: torch.Tensor, prediction: torch.Tensor, geometry: Geometry, weights: PhysicsLossConfig,
                 planet_params: torch.Tensor | None = None,
                 heating: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Differentiable ``sum_c weight_c (residual_c / goal_c)^2`` (batch mean) and its terms as metrics."""
    residuals = transition_residuals(state, prediction, geometry, planet_params, heating)
    thermo = thermo_residuals(prediction, geometry, planet_params)["thermo"] / 100
    terms = {"mass": residuals["mass"], "energy": residuals.get("energy"),
             "momentum": residuals.get("momentum"), "thermo": thermo}
    loss = torch.zeros((), device=prediction.device)
    metrics: dict[str, float] = {}
    for name, residual in terms.items():
        if residual is None:
            continue
        term = (residual / LOSS_GOALS[name]).pow(2).mean()
        loss = loss + getattr(weights, name) * term
        metrics[f"physics_{name}"] = float(term.detach())
    return loss, metrics


def mass_fix(prediction: torch.Tensor, state: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Exact mass (and water) conservation: ``ps`` scaled so ``M' = M``, then ``q`` so ``W' = W``.
    Gravity cancels, so no planet parameters are needed. Returns a new tensor (float32)."""
    out = prediction.float().clone()
    before = budgets(state, geometry)
    ps_slice = geometry.cube.channel_slice("ps")
    after_mass = _sum_grid(geometry.field(out, "ps") * geometry.cell_weight, 2) / EARTH_DEFAULTS["gravity"]
    scale = before["mass"] / after_mass
    out[..., ps_slice, :, :] *= scale[..., None, None, None]
    if geometry.has("q"):
        water = _sum_grid(geometry.field(out, "q") * _layer_mass(geometry.field(out, "ps"), geometry), 3)
        water = water / EARTH_DEFAULTS["gravity"]
        out[..., geometry.cube.channel_slice("q"), :, :] *= (before["water"] / water.clamp_min(1e-30))[..., None, None, None]
    return out


def project(prediction: torch.Tensor, state: torch.Tensor, geometry: Geometry,
            planet_params: torch.Tensor | None = None, heating: torch.Tensor | None = None,
            energy: bool = True, diagnose: bool = True) -> torch.Tensor:
    """Mass/water fixer, then (``energy``) a uniform ``T`` shift closing the energy budget, then
    (``diagnose``) ``rho`` and ``zg`` recomputed from ``T`` and ``ps``. Float32 result."""
    out = mass_fix(prediction, state, geometry)
    ps = geometry.field(out, "ps")
    gravity = geometry.planet(planet_params, "gravity", ps.sum((-2, -1)))
    if energy and geometry.has("T"):
        if heating is None:
            heating = relaxation_heating(state, out, geometry, planet_params)
        target = budgets(state, geometry, planet_params)["energy"] + 4 * math.pi * geometry.dt_seconds * heating.float()
        missing = target - budgets(out, geometry, planet_params)["energy"]
        shift = missing * gravity / (SPECIFIC_HEAT * _sum_grid(_layer_mass(ps, geometry), 3))
        out[..., geometry.cube.channel_slice("T"), :, :] += shift[..., None, None, None]
    if diagnose and geometry.has("T"):
        temperature = geometry.field(out, "T")
        pressure = geometry.sigma[:, None, None] * ps.unsqueeze(-3)
        if geometry.has("rho"):
            out[..., geometry.cube.channel_slice("rho"), :, :] = pressure / (GAS_CONSTANT * temperature)
        if geometry.has("zg"):
            gravity3 = gravity[..., None, None, None] if gravity.dim() else gravity
            out[..., geometry.cube.channel_slice("zg"), :, :] = hydrostatic_height(temperature, geometry, gravity3)
    return out
