"""Physics-aware augmentation of datacube batches, fused into one pass over the batch, on the batch's device.

Every transform takes ``frames [window, B, C, lat, lon]`` (:attr:`sapwood.data.loader.Batch.frames`; the same
random draw is applied to all frames of a sample, so a state and its successor stay a valid pair) and returns
the augmented frames (possibly the same tensor, modified in place). :class:`Augment` composes them; roll, flip
(with the sign change of ``v``), noise and positivity run as one pass that reads and writes each element once
(:func:`augment_planes`: a numba kernel on the CPU, :func:`reference_augment` elsewhere; the two agree to
round-off). Per-channel behaviour comes from :class:`ChannelRoles` (built once from the variable list).

Random numbers: the roll and flip are drawn per sample (a handful of draws from a CPU generator); the noise is
a counter-based hash of each element's position (:func:`hash_uniform`), computed inside the pass, so no random
field is stored and the result does not depend on the device or the number of threads.

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

ALL_PROPERTIES = frozenset(
    {"mass", "water", "energy", "angular_momentum", "ideal_gas", "hydrostatic", "dynamics", "positivity"}
)
SIGN_FLIP_ON_HEMISPHERE = {"v"}
POSITIVE_VARIABLES = {"T", "q", "ps", "rho", "zg"}
# relative (log-normal) scale for positive variables, absolute (physical units) for the others
DEFAULT_NOISE = {
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
    def from_variables(
        cls, variables: Sequence[tuple[str, int]], mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, noise: dict[str, float] | None = None,
    ) -> ChannelRoles:
        """``variables``: ``(name, levels)`` in channel order (``levels = 0`` for a 2-D variable)."""
        scales = {**DEFAULT_NOISE, **(noise or {})}
        names = [name for name, levels in variables for _ in range(max(levels, 1))]
        sign = torch.tensor([-1.0 if n in SIGN_FLIP_ON_HEMISPHERE else 1.0 for n in names])
        positive = torch.tensor([n in POSITIVE_VARIABLES for n in names])
        noise_scale = torch.tensor([float(scales.get(n, 0.0)) for n in names])
        std_t = (
            torch.ones(len(names), dtype=torch.float64)
            if std is None
            else torch.tensor(std, dtype=torch.float64)
        )
        mean_t = (
            torch.zeros(len(names), dtype=torch.float64)
            if mean is None
            else torch.tensor(mean, dtype=torch.float64)
        )
        if std_t.numel() != len(names) or mean_t.numel() != len(names):
            raise SapwoodError(
                f"mean/std have {mean_t.numel()}/{std_t.numel()} entries; the variables have "
                f"{len(names)} channels"
            )
        return cls(sign, positive, noise_scale, (mean_t / std_t).float(), std_t.float())

    @classmethod
    def from_store(
        cls, store: object, normalized: bool, noise: dict[str, float] | None = None
    ) -> ChannelRoles:
        """Roles for the channels of a :class:`sapwood.data.store.CubeStore` (normalized or raw batches)."""
        variables = [(v["name"], v["levels"]) for v in store.variables]  # type: ignore[attr-defined]
        if normalized:
            return cls.from_variables(variables, store.mean.tolist(), store.std.tolist(), noise)  # type: ignore[attr-defined]
        return cls.from_variables(variables, noise=noise)

    def on(self, like: torch.Tensor) -> ChannelRoles:
        """The vectors shaped ``[C, 1, 1]`` on ``like``'s device and dtype."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(like.device, like.dtype if t.dtype != torch.bool else torch.bool).reshape(-1, 1, 1)

        return ChannelRoles(
            *(cast(t) for t in (self.sign, self.positive, self.noise, self.mean_over_std, self.std))
        )


MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` (C. Wellons' 32-bit integer hash) of int64 tensors holding unsigned 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The hashed noise seed that keys every plane's noise (:func:`mix32` of one Python int)."""
    x = seed & MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash_uniform(
    seed: int, shape: Sequence[int], frames: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The noise field of :class:`Noise`: uniform values in ``(-1/2, 1/2)`` (24 bits, symmetric, mean exactly
    0 over the lattice) for frames ``frames`` of a batch of ``shape [window, B, C, lat, lon]``.

    Counter-based: the value at ``(k, b, c, j, i)`` is ``mix32(mix32(seed_key(seed) ^ plane) ^ cell)`` with
    ``plane = (k B + b) C + c`` and ``cell = j lon + i``, a pure function of its position, so the CPU kernel
    (:mod:`sapwood.data.augment_cpu`) computes it inline, bit-identical, in any order and any number of
    threads. Returns float32 ``[len(frames), B, C, lat, lon]``."""
    window, batch, channels, nlat, nlon = shape
    plane = torch.arange(window * batch * channels, device=device, dtype=torch.int64).reshape(
        window, batch, channels
    )
    key = mix32(seed_key(seed) ^ plane[list(frames)])
    cell = torch.arange(nlat * nlon, device=device, dtype=torch.int64)
    h = mix32(key[..., None] ^ cell)
    centered = ((h >> 8).to(torch.float32) - 8388607.5) * 2.0**-24
    return centered.reshape(len(frames), batch, channels, nlat, nlon)


@dataclass
class NoiseDraw:
    """What one :class:`Noise` call applies: per-channel ``slope``/``intercept`` (float32 ``[C]``; the change
    is ``x += u (slope x + intercept)`` with ``u`` from :func:`hash_uniform` of ``seed``) on ``frames``."""

    seed: int
    slope: torch.Tensor
    intercept: torch.Tensor
    frames: tuple[int, ...]


class RollAndFlip:
    """Per sample: shift longitude by a random whole number of cells (periodic) when ``roll``, and with
    probability ``flip_p`` mirror latitude (north <-> south) with the meridional wind negated. Both are index
    permutations of the grid; one random draw per sample is shared by every frame and channel, which is what
    keeps the budgets, the diagnostic relations and the dynamics (a per-channel draw would break them)."""

    preserves = ALL_PROPERTIES

    def __init__(self, roll: bool = True, flip_p: float = 0.5) -> None:
        if not 0 <= flip_p <= 1:
            raise SapwoodError(f"flip_p={flip_p}: allowed range is [0, 1]")
        self.roll, self.flip_p = roll, flip_p

    def draw(self, frames: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shifts [B] int64, flips [B] bool)`` from ``generator`` (on its device; CPU in
        :class:`Augment`)."""
        batch, nlon = frames.shape[1], frames.shape[-1]
        shifts = (
            torch.randint(0, nlon, (batch,), generator=generator, device=generator.device)
            if self.roll
            else torch.zeros(batch, dtype=torch.long, device=generator.device)
        )
        flips = torch.rand(batch, generator=generator, device=generator.device) < self.flip_p
        return shifts, flips

    def __call__(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> torch.Tensor:
        shifts, flips = self.draw(frames, generator)
        return augment_planes(frames, roles, shifts, flips, None)


def LongitudeRoll() -> RollAndFlip:  # noqa: N802 - a named configuration of RollAndFlip
    """Random periodic longitude shift per sample."""
    return RollAndFlip(roll=True, flip_p=0.0)


def HemisphereFlip(p: float = 0.5) -> RollAndFlip:  # noqa: N802 - a named configuration of RollAndFlip
    """Hemispheric mirror with ``v -> -v`` for each sample with probability ``p``."""
    return RollAndFlip(roll=False, flip_p=p)


_OUTPUTS = BufferPool(capacity=4)
PARALLEL_FROM_BYTES = 1 << 20  # smaller batches: the pool's launch costs more than a second thread saves


def roll_and_flip(
    frames: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, roles: ChannelRoles
) -> torch.Tensor:
    """The reference roll and flip (any device): ``frames [window, B, C, lat, lon]`` with sample b rolled by
    ``shifts[b]`` longitudes (as ``torch.roll``) and, where ``flips[b]``, mirrored in latitude with ``v``
    negated (in physical units). One gather over the flattened (lat, lon) plane; returns a new tensor."""
    nlat, nlon, device = frames.shape[-2], frames.shape[-1], frames.device
    shifts, flips = shifts.to(device), flips.to(device)
    lon_source = (torch.arange(nlon, device=device)[None] - shifts[:, None]) % nlon  # [B, lon]
    lat = torch.arange(nlat, device=device)[None]
    lat_source = torch.where(flips[:, None], nlat - 1 - lat, lat)  # [B, lat]
    plane_source = (lat_source[:, :, None] * nlon + lon_source[:, None, :]).reshape(1, -1, 1, nlat * nlon)
    flat = frames.reshape(*frames.shape[:3], nlat * nlon)
    out = torch.gather(flat, -1, plane_source.expand(flat.shape)).reshape(frames.shape)
    flipped = flips.nonzero().flatten()
    negated = (roles.sign < 0).nonzero().flatten().to(device)
    if flipped.numel() and negated.numel():
        rows, cols = flipped[:, None], negated[None, :]
        offset = (2 * roles.mean_over_std.to(device, frames.dtype)[negated]).reshape(1, 1, -1, 1, 1)
        out[:, rows, cols] = -out[:, rows, cols] - offset
    return out


def add_noise(frames: torch.Tensor, noise: NoiseDraw) -> torch.Tensor:
    """The reference noise (any device): ``x += u (slope x + intercept)`` on ``noise.frames``, in place."""
    uniform = hash_uniform(noise.seed, frames.shape, noise.frames, frames.device)
    slope = noise.slope.to(frames.device, frames.dtype).reshape(-1, 1, 1)
    intercept = noise.intercept.to(frames.device, frames.dtype).reshape(-1, 1, 1)
    for i, k in enumerate(noise.frames):
        x = frames[k]
        x.addcmul_(uniform[i], torch.addcmul(intercept, x, slope))
    return frames


def reference_augment(
    frames: torch.Tensor, roles: ChannelRoles, shifts: torch.Tensor, flips: torch.Tensor,
    noise: NoiseDraw | None,
) -> torch.Tensor:
    """Roll and flip, then noise, as separate passes: what the fused kernel must equal (a new tensor)."""
    out = roll_and_flip(frames, shifts, flips, roles)
    return add_noise(out, noise) if noise is not None else out


def augment_planes(
    frames: torch.Tensor, roles: ChannelRoles, shifts: torch.Tensor, flips: torch.Tensor,
    noise: NoiseDraw | None, in_place: bool = False, threads: int | None = None,
) -> torch.Tensor:
    """Roll, flip (with the sign change) and noise in one pass: on the CPU (float32) the numba kernel of
    :mod:`sapwood.data.augment_cpu`, reading and writing each element once (into ``frames`` when ``in_place``,
    else into a recycled buffer); elsewhere :func:`reference_augment`. Equal to :func:`reference_augment` to
    round-off.

    ``threads``: the kernel's threads on the CPU; by default ``torch.get_num_threads()`` for batches of at
    least ``PARALLEL_FROM_BYTES`` and 1 (the calling thread, no pool) below."""
    if frames.device.type != "cpu" or frames.dtype != torch.float32:
        out = reference_augment(frames, roles, shifts, flips, noise)
        return frames.copy_(out) if in_place else out
    from sapwood.data import augment_cpu

    frames = frames.contiguous()
    out = frames if in_place else _OUTPUTS.take(tuple(frames.shape))
    channels, window = frames.shape[2], frames.shape[0]
    sign = torch.where(roles.sign < 0, -1.0, 1.0).float()
    offset = torch.where(roles.sign < 0, -2 * roles.mean_over_std.float(), torch.zeros(channels))
    perturb = torch.zeros(window, dtype=torch.bool)
    if noise is not None:
        perturb[list(noise.frames)] = True
        slope, intercept, key = noise.slope.float(), noise.intercept.float(), seed_key(noise.seed)
    else:
        slope, intercept, key = torch.zeros(channels), torch.zeros(channels), 0
    if threads is None:
        threads = 1 if frames.numel() * 4 < PARALLEL_FROM_BYTES else torch.get_num_threads()
    arguments = (
        frames.numpy(), out.numpy(), shifts.to(torch.int64).cpu().numpy(), flips.cpu().numpy(), sign.numpy(),
        offset.numpy(), slope.contiguous().numpy(), intercept.contiguous().numpy(), perturb.numpy(),
        np.uint64(key),
    )
    augment_cpu.run(arguments, threads)
    return out


class PreparedPlanes:
    """:func:`augment_planes` on the CPU for one channel layout, window and noise coefficients, with the
    per-channel vectors converted once, in place and on the calling thread: a call is one kernel launch and
    no other torch work (for a prefetch thread that shares the interpreter with a training step, where every
    short torch call is a chance to lose the GIL). Equal to :func:`augment_planes` with the same draws."""

    def __init__(
        self, roles: ChannelRoles, window: int, slope: torch.Tensor | None = None,
        intercept: torch.Tensor | None = None, noisy_frames: Sequence[int] = (),
    ) -> None:
        negated = roles.sign.numpy() < 0
        self.sign = np.where(negated, -1.0, 1.0).astype(np.float32)
        self.offset = np.where(negated, -2 * roles.mean_over_std.float().numpy(), 0.0).astype(np.float32)
        channels = len(self.sign)
        self.slope = np.zeros(channels, np.float32) if slope is None else slope.float().numpy().copy()
        self.intercept = (
            np.zeros(channels, np.float32) if intercept is None else intercept.float().numpy().copy()
        )
        self.perturb = np.zeros(window, dtype=np.bool_)
        self.perturb[list(noisy_frames)] = True

    def __call__(
        self, frames: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, noise_seed: int = 0
    ) -> torch.Tensor:
        """``frames`` (float32, contiguous, CPU ``[window, B, C, lat, lon]``) rolled, flipped and perturbed
        in place with the noise field of ``noise_seed``."""
        from sapwood.data import augment_cpu

        array = frames.numpy()
        augment_cpu.run(
            (array, array, shifts.numpy().astype(np.int64, copy=False), flips.numpy(), self.sign,
             self.offset, self.slope, self.intercept, self.perturb, np.uint64(seed_key(noise_seed))),
            threads=1,
        )
        return frames


class Noise:
    """Per-variable random perturbation of the frames in ``frames_to_perturb`` (default: the input state
    only).

    With ``u`` uniform on ``[-sqrt(3), sqrt(3)]`` (zero mean, unit variance, bounded), independent per cell:
    positive variables get multiplicative noise ``x * (1 + s u)`` with relative scale ``s < 1/sqrt(3)``, so
    they stay strictly positive; the others additive noise ``x + s u`` with ``s`` in physical units. Only
    ``positivity`` is preserved exactly; being independent per cell with mean zero, the noise leaves the
    global integrals unbiased with a relative spread of ``s / sqrt(cells)`` (noise drawn per channel or on a
    coarse grid would move them by ``s`` itself). ``u`` comes from the counter-based :func:`hash_uniform`: one
    seed drawn per call, no stored random numbers.
    """

    preserves = frozenset({"positivity"})

    def __init__(self, scale: float = 1.0, frames_to_perturb: Sequence[int] = (0,)) -> None:
        self.scale, self.frames_to_perturb = scale, tuple(frames_to_perturb)

    def draw(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> NoiseDraw:
        slope, intercept, chosen = self.coefficients(roles, frames.shape[0])
        return NoiseDraw(self.draw_seed(generator), slope, intercept, chosen)

    @staticmethod
    def draw_seed(generator: torch.Generator) -> int:
        """The one random number a call draws from ``generator``: the seed of the noise field."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))

    def coefficients(
        self, roles: ChannelRoles, window: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """``(slope, intercept, frames)`` of :class:`NoiseDraw` for ``roles`` and a window of ``window``
        frames (the same on every call)."""
        chosen = sorted({k % window for k in self.frames_to_perturb if -window <= k < window})
        if len(chosen) != len(self.frames_to_perturb):
            raise SapwoodError(
                f"frames_to_perturb={list(self.frames_to_perturb)}: allowed frame indices are "
                f"{-window}..{window - 1}, each once"
            )
        relative = torch.where(
            roles.positive, roles.noise * self.scale, torch.zeros_like(roles.noise)
        ).float()
        if float(relative.max()) * 3**0.5 >= 1:
            raise SapwoodError(
                f"relative noise scale {float(relative.max()):g} would allow negative values; "
                f"keep it below {1 / 3**0.5:.3f}"
            )
        absolute = torch.where(
            roles.positive, torch.zeros_like(roles.noise), roles.noise * self.scale / roles.std
        )
        width = 2 * 3**0.5  # u = width * (uniform in (-1/2, 1/2))
        slope = (relative * width).float()
        intercept = ((relative * roles.mean_over_std + absolute) * width).float()
        return slope, intercept, tuple(chosen)

    def __call__(self, frames: torch.Tensor, roles: ChannelRoles, generator: torch.Generator) -> torch.Tensor:
        noise = self.draw(frames, roles, generator)
        zero = torch.zeros(frames.shape[1], dtype=torch.long)
        return augment_planes(frames, roles, zero, zero.bool(), noise, in_place=True)


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
        start = torch.randint(
            0, window - self.length + 1, (batch,), generator=generator, device=frames.device
        )
        times = start[None] + torch.arange(self.length, device=frames.device)[:, None]  # [length, B]
        return frames[times, torch.arange(batch, device=frames.device)[None]]


class Augment:
    """Apply ``transforms`` in order with a deterministic random stream: call ``n`` draws from a CPU generator
    seeded ``seed + n`` (the same augmentation on every device).

    A :class:`RollAndFlip` followed by a :class:`Noise` (the default) runs as one fused pass
    (:func:`augment_planes`): each element read and written once. Output: a new tensor (on the CPU a recycled
    buffer, reused only once nothing references it), or ``frames`` itself with ``in_place=True`` (for batches
    that are not kept elsewhere, such as the loader's). A lone :class:`Noise` works in place.
    """

    def __init__(
        self, roles: ChannelRoles, transforms: Sequence[object] | None = None, seed: int = 0,
        in_place: bool = False,
    ) -> None:
        self.roles = roles
        self.transforms = list(transforms if transforms is not None else (RollAndFlip(), Noise()))
        self.seed, self.calls, self.in_place = seed, 0, in_place

    @property
    def preserves(self) -> frozenset[str]:
        kept = ALL_PROPERTIES
        for transform in self.transforms:
            kept = kept & transform.preserves  # type: ignore[attr-defined]
        return kept

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5:
            raise SapwoodError(
                f"frames must be [window, batch, channels, lat, lon], got shape {tuple(frames.shape)}"
            )
        generator = torch.Generator().manual_seed(self.seed + self.calls)
        self.calls += 1
        roles = self.roles
        index = 0
        while index < len(self.transforms):
            transform = self.transforms[index]
            following = self.transforms[index + 1] if index + 1 < len(self.transforms) else None
            if isinstance(transform, RollAndFlip) and isinstance(following, Noise):
                shifts, flips = transform.draw(frames, generator)
                noise = following.draw(frames, roles, generator)
                frames = augment_planes(frames, roles, shifts, flips, noise, in_place=self.in_place)
                index += 2
                continue
            if isinstance(transform, RollAndFlip) and self.in_place:
                shifts, flips = transform.draw(frames, generator)
                frames = augment_planes(frames, roles, shifts, flips, None, in_place=True)
            else:
                frames = transform(frames, roles, generator)  # type: ignore[operator]
            index += 1
        return frames


def numpy_loop_augment(
    frames: np.ndarray, variables: Sequence[tuple[str, int]], seed: int = 0,
    noise: dict[str, float] | None = None,
) -> np.ndarray:
    """The baseline of ``sapwood bench augment``: the same roll, flip and noise on raw data written the usual
    way, one sample and one variable at a time in numpy."""
    scales = {**DEFAULT_NOISE, **(noise or {})}
    rng = np.random.default_rng(seed)
    out = np.empty_like(frames)
    window, batch = frames.shape[:2]
    for b in range(batch):
        shift, flip = int(rng.integers(frames.shape[-1])), bool(rng.random() < 0.5)
        channel = 0
        for name, levels in variables:
            count = max(levels, 1)
            block = np.roll(frames[:, b, channel : channel + count], shift, axis=-1)
            if flip:
                block = block[..., ::-1, :] * (-1.0 if name in SIGN_FLIP_ON_HEMISPHERE else 1.0)
            block = np.array(block, dtype=frames.dtype)
            uniform = rng.uniform(-(3**0.5), 3**0.5, block[0].shape)
            if name in POSITIVE_VARIABLES:
                block[0] *= 1 + scales[name] * uniform
            else:
                block[0] += scales.get(name, 0.0) * uniform
            out[:, b, channel : channel + count] = block
            channel += count
    return out
