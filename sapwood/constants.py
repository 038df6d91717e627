"""Physical constants, one place: the simulator (:mod:`sapwood.data.simulate`) and the constraint module
(:mod:`sapwood.physics`) both take them from here, so a budget computed by one is the budget of the other."""

from __future__ import annotations

GAS_CONSTANT = 287.04  # R_d, dry air, J kg-1 K-1
VAPOUR_GAS_CONSTANT = 461.5  # R_v, water vapour, J kg-1 K-1
VIRTUAL_FACTOR = VAPOUR_GAS_CONSTANT / GAS_CONSTANT - 1  # 0.6078: T_v = T (1 + VIRTUAL_FACTOR q)
SPECIFIC_HEAT = 1004.64  # c_p, dry air, J kg-1 K-1
KAPPA = GAS_CONSTANT / SPECIFIC_HEAT  # R_d / c_p
REFERENCE_PRESSURE = 1.0e5  # p_0 of potential temperature, Pa
STEFAN_BOLTZMANN = 5.670374e-8  # W m-2 K-4

# Earth values, keyed by the names of the planet-parameter variables in the simulator's files
EARTH = {"planet_radius": 6.371e6, "gravity": 9.81, "rotation_rate": 7.292e-5, "stellar_flux": 1361.0,
         "mean_surface_pressure": 1.0e5, "obliquity": 23.44}


def virtual_temperature(temperature, humidity):
    """``T_v = T (1 + 0.608 q)`` for NumPy arrays or torch tensors (``q`` specific humidity, kg/kg)."""
    return temperature * (1 + VIRTUAL_FACTOR * humidity)
