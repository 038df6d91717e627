"""Skill metrics of gridded forecasts, WeatherBench 2 definitions (Rasp et al. 2024, section 4), with masks.

Fields are ``[time, channels, lat, lon]`` (``time`` = independent forecast cases). ``weights`` are cell-area
weights times the mask, ``[lat, lon]`` or ``[channels, lat, lon]``, each channel scaled to mean 1 over the
grid (:func:`normalized_weights`), so masked cells (weight 0) never count and a weighted mean is
``(w * x).mean()``:

- RMSE (per channel) = sqrt( mean_t  mean_ij  w_ij (f - o)^2 ): the time mean is taken of the
  area-weighted MSE, then the square root (WB2 eq. 1).
- ACC (per channel) = mean_t [ sum_ij w_ij f' o' / sqrt( sum_ij w_ij f'^2 * sum_ij w_ij o'^2 ) ] with
  anomalies ``f' = f - c``, ``o' = o - c`` against a climatology ``c`` (WB2 eq. 2).
- skill against a baseline b = 1 - RMSE_model / RMSE_b (> 0: better than the baseline).

A variable with several levels is the mean of its channels' MSE (RMSE) or ACC. All reductions in fp32
(ACC sums in fp64).
"""

from __future__ import annotations

import torch


def latitude_weights(lat_degrees: torch.Tensor) -> torch.Tensor:
    """``cos(lat) / mean(cos(lat))``: mean 1, so a weighted mean is ``(w * x).mean()``."""
    w = torch.cos(torch.deg2rad(lat_degrees.double())).clamp_min(0)
    return (w / w.mean()).float()


def normalized_weights(area: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``area [lat, lon]`` times ``valid [channels, lat, lon]`` (when given), each channel scaled to mean 1
    (fully masked channels stay 0)."""
    weights = area.double() if valid is None else area.double()[None] * valid.double()
    mean = weights.mean(dim=(-2, -1), keepdim=True)
    return torch.where(mean > 0, weights / mean.clamp_min(1e-300), torch.zeros_like(weights)).float()


def _weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if weights.dim() == 1:  # latitudes in degrees (the simulator's regular grid)
        return latitude_weights(weights).to(like.device)[:, None]
    return weights.to(like.device).float()


def weighted_mse(forecast: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Area-weighted MSE over valid cells ``[time, channels]``."""
    w = _weights(weights, forecast)
    return ((forecast.float() - truth.float()) ** 2 * w).mean(dim=(-2, -1))


def rmse(forecast: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """WB2 RMSE per channel ``[channels]``."""
    return weighted_mse(forecast, truth, weights).mean(0).sqrt()


def acc(
    forecast: torch.Tensor, truth: torch.Tensor, climatology: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """WB2 anomaly correlation coefficient per channel ``[channels]``; ``climatology`` broadcasts to the
    fields (e.g. ``[channels, lat, lon]`` or ``[time, channels, lat, lon]``)."""
    w = _weights(weights, forecast).double()
    f = forecast.double() - climatology.double()
    o = truth.double() - climatology.double()
    num = (w * f * o).sum(dim=(-2, -1))
    den = ((w * f * f).sum(dim=(-2, -1)) * (w * o * o).sum(dim=(-2, -1))).sqrt().clamp_min(1e-30)
    return (num / den).mean(0).float()


def per_variable(
    values: torch.Tensor, names: list[str], levels: int, variables_3d: list[str], reduce_sqrt: bool = False
) -> dict[str, float]:
    """Group a per-channel vector into per-variable numbers (3-D variables average their levels).

    With ``reduce_sqrt`` the values are RMSEs: their squares are averaged, then the root taken.
    """
    out: dict[str, float] = {}
    start = 0
    for name in names:
        width = levels if name in variables_3d else 1
        chunk = values[start : start + width].double()
        out[name] = float(chunk.pow(2).mean().sqrt() if reduce_sqrt else chunk.mean())
        start += width
    return out
