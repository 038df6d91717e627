"""The datacube surrogate: patch embedding -> the language model's transformer blocks (non-causal) ->
un-patching to the next state.

A state is ``[batch, channels, lat, lon]`` in physical units (the cube store's channel layout; see
:class:`sapwood.config.CubeModelConfig`). The model normalizes internally with per-channel statistics
kept as buffers (saved in the checkpoint and set from ``cube.normalization`` by ``init_weights``), so
callers and the server speak physical units. It predicts the tendency ``next - state`` scaled by the
per-channel tendency std.

Any grid: the grid is padded with zeros up to a multiple of the patch size (padding is masked: it never
reaches the output, which is cropped back). Masked cells (``cube.grid.valid``, from the store: land in an
ocean field, missing values) enter the network as 0 in normalized units and are predicted as persistence.

Tokens: one per ``patch x patch`` tile of the padded grid (all channels of the tile in one vector) plus one
conditioning token per planet parameter (``value * weight_p + bias_p``; none when the store has no planet
parameters). The blocks are exactly :class:`sapwood.model.transformer.Block` with ``causal=False``.

Two input scalings, chosen by the normalization the model was trained with:

- **per sample** (``cube.normalization.anomaly_std`` given; every store-trained surrogate): each sample's
  channels enter as anomalies from their own mean over the valid cells, in units of the per-channel anomaly
  std, so planets with very different surface pressures or temperatures present their weather on one
  scale; the spatial means (in state-std units), the log spatial stds (in anomaly-std units) and the planet
  parameters are added to every tile through one linear layer (conditioning), and through another set a
  per-sample, per-channel gain of the predicted tendency (quiet and vigorous planets differ 100-fold).
  Position: a learned embedding per tile row (latitude) and a rotary embedding periodic in longitude
  (integer wave numbers around the tile columns), so attention sees relative, periodic east-west offsets
  and the network is equivariant to zonal shifts by whole tiles.
- **global** (no anomaly statistics): states in units of the per-channel state mean/std over the store; a
  learned embedding per tile and no rotary embedding (cos = 1, sin = 0).
"""

from __future__ import annotations

import base64
import hashlib
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sapwood.config import CubeModelConfig, ModelConfig
from sapwood.model.transformer import Block, RMSNorm


def encode_array(values: np.ndarray, bits: bool = False) -> str:
    """A float32 array (or a boolean array as packed bits) as zlib-compressed base64 text."""
    raw = np.packbits(np.asarray(values, dtype=bool).reshape(-1)) if bits else np.asarray(values, "<f4")
    return base64.b64encode(zlib.compress(raw.tobytes(), 9)).decode()


def decode_array(text: str, shape: tuple[int, ...], bits: bool = False) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(text))
    if bits:
        return np.unpackbits(np.frombuffer(raw, np.uint8))[: int(np.prod(shape))].reshape(shape).astype(bool)
    return np.frombuffer(raw, "<f4").reshape(shape).copy()


def grid_digest(lat: np.ndarray, lon: np.ndarray, levels: np.ndarray, area: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in (lat, lon, levels, area):
        h.update(np.round(np.asarray(array, dtype=np.float64), 6).tobytes())
    return h.hexdigest()[:16]


def grid_area(cube: CubeModelConfig) -> np.ndarray:
    """Cell-area weights ``[lat, lon]`` (mean 1) of the cube's grid; ``cos(lat)`` rows on the simulator's
    default grid when the config carries no grid."""
    if cube.grid is not None:
        return decode_array(cube.grid.area, (cube.lat, cube.lon)).astype(np.float64)
    edges = np.linspace(-np.pi / 2, np.pi / 2, cube.lat + 1)
    rows = np.diff(np.sin(edges))
    return np.repeat((rows / rows.mean())[:, None], cube.lon, axis=1)


def grid_valid(cube: CubeModelConfig) -> np.ndarray:
    """The mask ``[channels, lat, lon]`` (True = valid) of the cube's grid (all valid without a grid)."""
    if cube.grid is not None:
        return decode_array(cube.grid.valid, (cube.channels, cube.lat, cube.lon), bits=True)
    return np.ones((cube.channels, cube.lat, cube.lon), dtype=bool)


def padded(size: int, patch: int) -> int:
    return -(-size // patch) * patch


def periodic_rope(rows: int, columns: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary ``(cos, sin)`` ``[rows * columns, head_dim]`` for tiles in row-major order: pair ``i`` turns by
    ``k_i * 2 pi * column / columns`` with integer wave numbers ``k_i = 1 + i mod max(columns // 2, 1)``, so
    every rotation is periodic in longitude and attention depends only on the east-west offset."""
    pairs = head_dim // 2
    wave = 1 + torch.arange(pairs, dtype=torch.float64) % max(columns // 2, 1)
    column = torch.arange(columns, dtype=torch.float64).repeat(rows)
    angle = column[:, None] * wave[None] * (2 * torch.pi / columns)
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos().float(), angle.sin().float()


class CubeSurrogate(nn.Module):
    """``model(state, planet_params)`` -> next state, both ``[batch, channels, lat, lon]``."""

    def __init__(self, cfg: ModelConfig, cube: CubeModelConfig):
        super().__init__()
        self.cfg = cfg
        self.cube = cube
        channels, patch = cube.channels, cube.patch
        self.padded_lat, self.padded_lon = padded(cube.lat, patch), padded(cube.lon, patch)
        self.grid_tokens = (self.padded_lat // patch) * (self.padded_lon // patch)
        self.cond_tokens = len(cube.planet_params)
        stats = cube.normalization
        self.per_sample = bool(stats is not None and stats.anomaly_std)
        self.patch_embed = nn.Linear(channels * patch * patch, cfg.hidden)
        rows = self.padded_lat // patch
        self.pos_embed = nn.Parameter(torch.empty(rows if self.per_sample else self.grid_tokens, cfg.hidden))
        if self.per_sample:
            self.global_embed = nn.Linear(2 * channels + self.cond_tokens, cfg.hidden)
            self.tendency_gain = nn.Linear(2 * channels + self.cond_tokens, channels)
        self.param_weight = nn.Parameter(torch.empty(max(self.cond_tokens, 1), cfg.hidden))
        self.param_bias = nn.Parameter(torch.empty(max(self.cond_tokens, 1), cfg.hidden))
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden, channels * patch * patch)
        # Normalization (physical units <-> network units); set from the data store's statistics.
        self.register_buffer("state_mean", torch.zeros(channels))
        self.register_buffer("state_std", torch.ones(channels))
        self.register_buffer("tendency_std", torch.ones(channels))
        self.register_buffer("param_mean", torch.zeros(max(self.cond_tokens, 1)))
        self.register_buffer("param_std", torch.ones(max(self.cond_tokens, 1)))
        if self.per_sample:
            self.register_buffer("anomaly_std", torch.ones(channels))
        self.register_buffer("valid", torch.ones(channels, cube.lat, cube.lon), persistent=False)
        seq = self.grid_tokens + self.cond_tokens
        self.register_buffer("rope_cos", torch.ones(1, seq, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(1, seq, cfg.head_dim), persistent=False)
        if self.pos_embed.device.type != "meta":
            self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights, residual projections and the head scaled down; buffers reset
        (so a meta-built model can be materialized with ``to_empty`` and then initialized)."""
        std = self.cfg.init_std
        with torch.no_grad():
            self.rope_cos.fill_(1.0)
            self.rope_sin.zero_()
            if self.per_sample:
                cos, sin = periodic_rope(
                    self.padded_lat // self.cube.patch, self.padded_lon // self.cube.patch, self.cfg.head_dim
                )
                self.rope_cos[0, self.cond_tokens :] = cos
                self.rope_sin[0, self.cond_tokens :] = sin
            self.state_mean.zero_()
            self.state_std.fill_(1.0)
            self.tendency_std.fill_(1.0)
            self.param_mean.zero_()
            self.param_std.fill_(1.0)
            self.valid.copy_(torch.from_numpy(grid_valid(self.cube)).float())
            stats = self.cube.normalization
            if stats is not None:
                as_tensor = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
                self.set_normalization(
                    as_tensor(stats.state_mean), as_tensor(stats.state_std), as_tensor(stats.tendency_std),
                    as_tensor(stats.param_mean) if stats.param_mean else None,
                    as_tensor(stats.param_std) if stats.param_std else None,
                )
                if self.per_sample:
                    self.anomaly_std.copy_(as_tensor(stats.anomaly_std).clamp_min(1e-12))
            nn.init.normal_(self.patch_embed.weight, 0.0, std, generator=generator)
            nn.init.zeros_(self.patch_embed.bias)
            nn.init.normal_(self.pos_embed, 0.0, std, generator=generator)
            nn.init.normal_(self.param_weight, 0.0, std, generator=generator)
            nn.init.normal_(self.param_bias, 0.0, std, generator=generator)
            if self.per_sample:
                nn.init.normal_(self.global_embed.weight, 0.0, std, generator=generator)
                nn.init.zeros_(self.global_embed.bias)
                nn.init.zeros_(self.tendency_gain.weight)  # gain 1 at the start
                nn.init.zeros_(self.tendency_gain.bias)
            for block in self.layers.values():
                block.init_weights(self.cfg, generator)
            self.norm.reset_parameters()
            nn.init.zeros_(self.head.weight)  # starts as persistence: the tendency is learned from zero
            nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def set_normalization(
        self, state_mean: torch.Tensor, state_std: torch.Tensor, tendency_std: torch.Tensor,
        param_mean: torch.Tensor | None = None, param_std: torch.Tensor | None = None,
    ) -> None:
        """Per-channel statistics of states and of one-step tendencies (and of planet parameters)."""
        self.state_mean.copy_(state_mean)
        self.state_std.copy_(state_std.clamp_min(1e-12))
        self.tendency_std.copy_(tendency_std.clamp_min(1e-12))
        if param_mean is not None and self.cond_tokens:
            self.param_mean.copy_(param_mean)
            self.param_std.copy_(param_std.clamp_min(1e-12))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, channels, lat, lon]`` (the padded grid) -> ``[batch, tiles, channels * patch *
        patch]``."""
        batch, channels, lat, lon = x.shape
        p = self.cube.patch
        x = x.reshape(batch, channels, lat // p, p, lon // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (lat // p) * (lon // p), channels * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        batch = tokens.shape[0]
        p, channels = self.cube.patch, self.cube.channels
        rows, cols = self.padded_lat // p, self.padded_lon // p
        x = tokens.reshape(batch, rows, cols, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, channels, rows * p, cols * p)

    def forward(self, state: torch.Tensor, planet_params: torch.Tensor | None = None) -> torch.Tensor:
        """The next state in physical units (same shape and dtype as ``state``)."""
        dtype = self.patch_embed.weight.dtype
        if self.cond_tokens and planet_params is None:
            raise ValueError(f"this surrogate needs planet parameters {self.cube.planet_params}")
        params = (
            ((planet_params.float() - self.param_mean) / self.param_std).to(dtype)
            if self.cond_tokens
            else None
        )
        x = state.float()
        conditions = None
        if self.per_sample:
            cells = self.valid.sum((-2, -1)).clamp_min(1)
            own_mean = (x * self.valid).sum((-2, -1)) / cells  # [batch, channels]
            anomaly = (x - own_mean[..., None, None]) * self.valid
            own_std = (anomaly.pow(2).sum((-2, -1)) / cells).sqrt()
            normed = (anomaly / self.anomaly_std[:, None, None]).to(dtype)
            conditions = torch.cat(
                (
                    (own_mean - self.state_mean) / self.state_std,
                    torch.log(own_std / self.anomaly_std).clamp(-4, 4),
                ),
                dim=-1,
            ).to(dtype)
            if params is not None:
                conditions = torch.cat((conditions, params), dim=-1)
        else:
            normed = ((x - self.state_mean[:, None, None]) / self.state_std[:, None, None] * self.valid).to(
                dtype
            )
        pad = (0, self.padded_lon - self.cube.lon, 0, self.padded_lat - self.cube.lat)
        h = self.patch_embed(self.patchify(F.pad(normed, pad) if any(pad) else normed))
        if self.per_sample:
            columns = self.padded_lon // self.cube.patch
            h = h + self.pos_embed.repeat_interleave(columns, dim=0)
            h = h + self.global_embed(conditions).unsqueeze(1)
        else:
            h = h + self.pos_embed
        if self.cond_tokens:
            cond = params.unsqueeze(-1) * self.param_weight + self.param_bias
            h = torch.cat((cond, h), dim=1)
        seq = h.shape[1]
        cos, sin = self.rope_cos[:, :seq], self.rope_sin[:, :seq]
        for name, block in self.layers.items():
            h = block(h, cos, sin, None, int(name), causal=False)
        h = self.norm(h[:, self.cond_tokens :])
        tendency = self.unpatchify(self.head(h))[..., : self.cube.lat, : self.cube.lon].float()
        scale = self.tendency_std[:, None, None] * self.valid
        if conditions is not None:
            scale = scale * torch.exp(self.tendency_gain(conditions).float().clamp(-12, 6))[..., None, None]
        tendency = tendency * scale
        return (state.float() + tendency).to(state.dtype)

    @torch.no_grad()
    def rollout(self, state: torch.Tensor, planet_params: torch.Tensor | None, steps: int) -> torch.Tensor:
        """Autoregressive prediction: ``[batch, steps, channels, lat, lon]`` (states 1..steps)."""
        out = []
        for _ in range(steps):
            state = self(state, planet_params)
            out.append(state)
        return torch.stack(out, dim=1)


class CubePredictor:
    """The low-latency batch-of-one path: preallocated input buffers, inference mode, and on a GPU an
    optional ``torch.compile`` and a captured CUDA graph (replayed for every call).

    ``predictor(state, planet_params)`` copies the inputs into the static buffers and returns the
    output buffer (valid until the next call; clone it to keep it).
    """

    def __init__(
        self, model: CubeSurrogate, batch: int = 1, compile: bool = False, cuda_graph: bool | None = None
    ):
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cube = model.cube
        self.state = torch.zeros(batch, cube.channels, cube.lat, cube.lon, device=self.device)
        self.params = torch.zeros(batch, max(len(cube.planet_params), 1), device=self.device)
        self.forward = torch.compile(model, mode="max-autotune-no-cudagraphs") if compile else model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph:
            self._capture()

    def _run(self) -> torch.Tensor:
        params = self.params if self.model.cond_tokens else None
        return self.forward(self.state, params)

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._run()

    @torch.inference_mode()
    def __call__(self, state: torch.Tensor, planet_params: torch.Tensor | None = None) -> torch.Tensor:
        self.state.copy_(state, non_blocking=True)
        if planet_params is not None and self.model.cond_tokens:
            self.params.copy_(planet_params, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return self._run()
