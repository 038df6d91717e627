"""Physics-aware augmentation of datacube batches, vectorized over the batch, on the batch's device.

Every transform takes ``frames [window, B, C, lat, lon]`` (:attr:`sapwood.data.loader.Batch.frames`; the same
random draw is applied to all frames of a sample, so a state and its successor stay a valid pair) and returns
the augmented frames (possibly the same tensor, modified in place). :class:`Augment` composes them. Per-channel behaviour comes from
:class:`ChannelRoles` (built once from the variable list); there is no Python loop over samples or variables.

Each transform declares in ``preserves`` which properties of the truth it keeps:

* ``mass``, ``water``, ``energy``, ``angular_momentum``: the global integrals of :mod:`sapwood.data.simulate`
  (area-weighted sums over cells and layers) are unchanged up to float round-off,
* ``ideal_gas``, ``hydrostatic``: the pointwise diagnostic relations between T, ps, rho and zg,
* ``dynamics``: the augmented pair is still a solution of the model's equations (the rotating sphere is
  symmetric under a longitude shift, and under ``phi -> -phi`` with ``v -> -v``),
* ``positivity``: T, q, ps, rho and zg stay positive.

Data may be raw (physical units) or normalized with per-channel ``mean``/``std``; give the statistics to
:meth:`ChannelRoles.from_variables` and the transforms act on the physical values the tensor represents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sapwood.data.buffers import BufferPool
from sapwood.errors import SapwoodError

ALL_PROPERTIES = frozenset({"mass", "water", "energy", "angular_momentum", "ideal_gas", "hydrostatic",
                            "dynamics", "positivity"})
SIGN_FLIP_ON_HEMISPHERE = {"v"}
POSITIVE_VARIABLES = {"T", "q", "ps", "rho", "zg"}
DEFAULT_NOISE = {  # relative (log-normal) scale for positive variables, absolute (physical units) for the others
    "T": 0.002, "q": 0.02, "ps": 0.0005, "rho": 0.002, "zg": 0.001, "u": 0.3, "v": 0.3,
}


@dataclass
class ChannelRoles:
    """Per-channel vectors ``[C]``: ``sign`` under a hemispheric flip, ``positive``, noise scales, and the
    normalization ``mean/std`` ratio (zeros for raw data) and ``std``."""

    sign: torch.Tensor
    positive: torch.Tensor
    noise: torch.Tensor
    mean_over_std: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_variables(cls, variables: Sequence[tuple[str, int]], mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, noise: dict[str, float] | None = None) -> ChannelRoles:
        """``variables``: ``(name, levels)`` in channel order (``levels = 0`` for a 2-D variable)."""
        scales = {**DEFAULT_NOISE, **(noise or {})}
        names = [name for name, levels in variables for _ in range(max(levels, 1))]
        sign = torch.tensor([-1.0 if n in SIGN_FLIP_ON_HEMISPHERE else 1.0 for n in names])
        positive = torch.tensor([n in POSITIVE_VARIABLES for n in names])
        noise_scale = torch.tensor([float(scales.get(n, 0.0)) for n in names])
        std_t = torch.ones(len(names), dtype=torch.float64) if std is None else torch.tensor(std, dtype=torch.float64)
        mean_t = torch.zeros(len(names), dtype=torch.float64) if mean is None else torch.tensor(mean, dtype=torch.float64)
        if std_t.numel() != len(names) or mean_t.numel() != len(names):
            raise SapwoodError(f"mean/std have {mean_t.numel()}/{std_t.numel()} entries; the variables have "
                               f"{len(names)} channels")
        return cls(sign, positive, noise_scale, (mean_t / std_t).float(), std_t.float())

    @classmethod
    def from_store(cls, store: object, normalized: bool, noise: dict[str, float] | None = None) -> ChannelRoles:
        """Roles for the channels of a :class:`sapwood.data.store.CubeStore` (normalized or raw batches)."""
        variables = [(v["name"], v["levels"]) for v in store.variables]  # type: ignore[attr-defined]
        if normalized:
            return cls.from_variables(variables, store.mean.tolist(), store.std.tolist(), noise)  # type: ignore[attr-defined]
        return cls.from_variables(variables, noise=noise)

    def on(self, like: torch.Tensor) -> ChannelRoles:
        """The vectors shaped ``[C, 1, 1]`` on ``like``'s device and dtype."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(like.device, like.dtype if t.dtype != torch.bool else torch.bool).reshape(-1, 1, 1)
        return ChannelRoles(*(cast(t) for t in (self.sign, self.positive, self.noise, self.mean_over_std, self.std)))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class RollAndFlip:
    """Per sample: shift longitude by a random whole number of cells (periodic) when ``roll``, and with probability
    ``flip_p`` mirror latitude (north <-> south) with the meridional wind negated. Both are index permutations of
    the grid, so they are applied together as one gather over the flattened (lat, lon) plane."""

    preserves = ALL_PROPERTIES

    def __init__(self, roll: bool = True, flip_p: float = 0.5) -> None:
        if not 0 <= flip_p <= 1:
            raise SapwoodError(f"flip_p={flip_p}: allowed range is [0, 1]")
        self.roll, self.flip_p = roll, flip_p

    def __call__(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> torch.Tensor:
        batch, nlon, device = frames.shape[1], frames.shape[-1], frames.device
        shifts = (torch.randint(0, nlon, (batch,), generator=generator, device=device) if self.roll
                  else torch.zeros(batch, dtype=torch.long, device=device))
        flips = torch.rand(batch, generator=generator, device=device) < self.flip_p
        return roll_and_flip(frames, shifts, flips, roles)


def LongitudeRoll() -> RollAndFlip:  # noqa: N802 - a named configuration of RollAndFlip
    """Random periodic longitude shift per sample."""
    return RollAndFlip(roll=True, flip_p=0.0)


def HemisphereFlip(p: float = 0.5) -> RollAndFlip:  # noqa: N802 - a named configuration of RollAndFlip
    """Hemispheric mirror with ``v -> -v`` for each sample with probability ``p``."""
    return RollAndFlip(roll=False, flip_p=p)


_OUTPUTS = BufferPool(capacity=4)


def roll_and_flip(frames: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, roles: ChannelRoles) -> torch.Tensor:
    """``frames [window, B, C, lat, lon]`` with sample b rolled by ``shifts[b]`` longitudes (as ``torch.roll``)
    and, where ``flips[b]``, mirrored in latitude with ``v`` negated (in physical units). Returns a new tensor."""
    nlat, nlon, device = frames.shape[-2], frames.shape[-1], frames.device
    lon_source = (torch.arange(nlon, device=device)[None] - shifts[:, None]) % nlon  # [B, lon]
    lat = torch.arange(nlat, device=device)[None]
    lat_source = torch.where(flips[:, None], nlat - 1 - lat, lat)  # [B, lat]
    plane_source = (lat_source[:, :, None] * nlon + lon_source[:, None, :]).reshape(1, -1, 1, nlat * nlon)
    flat = frames.reshape(*frames.shape[:3], nlat * nlon)
    if frames.device.type == "cpu" and frames.dtype == torch.float32:  # recycled output: no fresh page faults
        out = _OUTPUTS.take(tuple(frames.shape))
        torch.gather(flat, -1, plane_source.expand(flat.shape), out=out.view(flat.shape))
    else:
        out = torch.gather(flat, -1, plane_source.expand(flat.shape)).reshape(frames.shape)
    flipped = flips.nonzero().flatten()
    negated = (roles.sign < 0).nonzero().flatten().to(device)
    if flipped.numel() and negated.numel():
        rows, cols = flipped[:, None], negated[None, :]
        offset = (2 * roles.mean_over_std.to(device, frames.dtype)[negated]).reshape(1, 1, -1, 1, 1)
        out[:, rows, cols] = -out[:, rows, cols] - offset
    return out


class Noise:
    """Per-variable random perturbation of the frames in ``frames_to_perturb`` (default: the input state only).

    With ``u`` uniform on ``[-sqrt(3), sqrt(3)]`` (zero mean, unit variance, bounded; on the CPU drawn as 16-bit
    words, four per 64-bit random draw, which is 4x fewer generator calls than float draws): positive variables get
    multiplicative noise ``x * (1 + s u)`` with relative scale ``s < 1/sqrt(3)``, so they stay strictly positive;
    the others additive noise ``x + s u`` with ``s`` in physical units. Only ``positivity`` is preserved.
    """

    preserves = frozenset({"positivity"})

    def __init__(self, scale: float = 1.0, frames_to_perturb: Sequence[int] = (0,)) -> None:
        self.scale, self.frames_to_perturb = scale, tuple(frames_to_perturb)
        self._scratch: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Scratch kept between calls (never returned), so large temporaries do not page-fault every call."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = self._scratch[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def __call__(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> torch.Tensor:
        r = roles.on(frames)
        relative = torch.where(r.positive, r.noise * self.scale, torch.zeros_like(r.noise))
        if float(relative.max()) * 3**0.5 >= 1:
            raise SapwoodError(f"relative noise scale {float(relative.max()):g} would allow negative values; "
                               f"keep it below {1 / 3**0.5:.3f}")
        absolute = torch.where(r.positive, torch.zeros_like(r.noise), r.noise * self.scale / r.std)
        # x' = x + u * (relative * (x + mean/std) + absolute), u uniform on [-sqrt(3), sqrt(3)]
        if frames.device.type == "cpu":
            # 16-bit uniform words, four per 64-bit draw: u = (k + 1/2) * sqrt(3) / 32768, k in [-32768, 32767]
            step = 3**0.5 / 32768
            slope, intercept = relative * step, (relative * r.mean_over_std + absolute) * step
        else:
            width = 2 * 3**0.5
            slope, intercept = relative * width, (relative * r.mean_over_std + absolute) * width
        for k in self.frames_to_perturb:  # a loop over frames (1 by default), not over samples or variables
            x = frames[k]
            amplitude = self._buffer("amplitude", tuple(x.shape), x.dtype, x.device)
            torch.addcmul(intercept, x, slope, out=amplitude)
            if x.device.type == "cpu":
                words = self._buffer("words", ((x.numel() + 3) // 4,), torch.int64, x.device)
                words.random_(-2**63, None, generator=generator)
                x.addcmul_(words.view(torch.int16)[: x.numel()].view(x.shape), amplitude).add_(amplitude, alpha=0.5)
            else:
                uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).sub_(0.5)
                x.addcmul_(uniform, amplitude)
        return frames


class TimeCrop:
    """Keep ``length`` consecutive frames of the window, starting at a random offset per sample."""

    preserves = ALL_PROPERTIES

    def __init__(self, length: int = 2) -> None:
        if length < 1:
            raise SapwoodError(f"length={length}: must be >= 1")
        self.length = length

    def __call__(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> torch.Tensor:
        window, batch = frames.shape[0], frames.shape[1]
        if self.length > window:
            raise SapwoodError(f"TimeCrop length={self.length} is longer than the window of {window} frames")
        start = torch.randint(0, window - self.length + 1, (batch,), generator=generator, device=frames.device)
        times = start[None] + torch.arange(self.length, device=frames.device)[:, None]  # [length, B]
        return frames[times, torch.arange(batch, device=frames.device)[None]]


class Augment:
    """Apply ``transforms`` in order with a deterministic random stream: call ``n`` uses ``seed + n``.

    :class:`RollAndFlip` writes a new tensor (on the CPU from a recycled buffer pool: reused only once nothing
    references it); :class:`Noise` then perturbs that in place. The input ``frames`` are left unchanged unless
    :class:`Noise` comes first.
    """

    def __init__(self, roles: ChannelRoles, transforms: Sequence[object] | None = None, seed: int = 0) -> None:
        self.roles = roles
        self.transforms = list(transforms if transforms is not None else (RollAndFlip(), Noise()))
        self.seed, self.calls = seed, 0

    @property
    def preserves(self) -> frozenset[str]:
        kept = ALL_PROPERTIES
        for transform in self.transforms:
            kept = kept & transform.preserves  # type: ignore[attr-defined]
        return kept

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5:
            raise SapwoodError(f"frames must be [window, batch, channels, lat, lon], got shape {tuple(frames.shape)}")
        generator = _generator(frames.device, self.seed + self.calls)
        self.calls += 1
        for transform in self.transforms:
            frames = transform(frames, self.roles, generator)  # type: ignore[operator]
        return frames


def numpy_loop_augment(frames: np.ndarray, variables: Sequence[tuple[str, int]], seed: int = 0,
                       noise: dict[str, float] | None = None) -> np.ndarray:
    """The baseline of ``sapwood bench augment``: the same roll, flip and noise on raw data written the usual way,
    one sample and one variable at a time in numpy."""
    scales = {**DEFAULT_NOISE, **(noise or {})}
    rng = np.random.default_rng(seed)
    out = np.empty_like(frames)
    window, batch = frames.shape[:2]
    for b in range(batch):
        shift, flip = int(rng.integers(frames.shape[-1])), bool(rng.random() < 0.5)
        channel = 0
        for name, levels in variables:
            count = max(levels, 1)
            block = np.roll(frames[:, b, channel:channel + count], shift, axis=-1)
            if flip:
                block = block[..., ::-1, :] * (-1.0 if name in SIGN_FLIP_ON_HEMISPHERE else 1.0)
            block = np.array(block, dtype=frames.dtype)
            uniform = rng.uniform(-3**0.5, 3**0.5, block[0].shape)
            if name in POSITIVE_VARIABLES:
                block[0] *= 1 + scales[name] * uniform
            else:
                block[0] += scales.get(name, 0.0) * uniform
            out[:, b, channel:channel + count] = block
            channel += count
    return out
