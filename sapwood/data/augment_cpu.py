"""The CPU kernel of :mod:`sapwood.data.augment`: roll, flip, sign change and noise in one pass (numba).

Each plane ``frames[k, b, c]`` ``[lat, lon]`` is processed by one thread, two mirrored rows at a time: both
rows are copied to a small scratch (cache-resident), then written back rolled, mirrored, sign-changed and
perturbed. Every element of the batch is therefore read once and written once, and ``out`` may be ``frames``
itself (in place). The noise is the counter-based field of :func:`sapwood.data.augment.hash_uniform`
(bit-identical here), computed inline, so no random numbers are stored or drawn from a sequential generator.
"""

from __future__ import annotations

import numba
import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)
TO_UNIT = np.float32(2.0**-24)
CENTER = np.float32(8388607.5)


@numba.njit(inline="always")
def mix32(x: np.uint64) -> np.uint64:
    """``lowbias32`` (C. Wellons' 32-bit integer hash) on the low 32 bits of ``x``, held in a uint64."""
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & MASK32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & MASK32
    x ^= x >> np.uint64(16)
    return x


@numba.njit(inline="always")
def _write_row(row, source, shift, sign, offset, noisy, slope, intercept, key, first_cell):
    nlon = row.shape[0]
    for i in range(shift):
        row[i] = sign * source[nlon - shift + i] + offset
    for i in range(shift, nlon):
        row[i] = sign * source[i - shift] + offset
    if noisy:  # a second sweep over the row while it is in L1: each loop is contiguous and vectorizes
        for i in range(nlon):
            h = mix32(key ^ np.uint64(first_cell + i))
            centered = (np.float32(np.int32(h >> np.uint64(8))) - CENTER) * TO_UNIT
            y = row[i]
            row[i] = y + centered * (slope * y + intercept)


@numba.njit(parallel=True, cache=True)
def fused_planes(
    frames, out, shifts, flips, sign, offset, slope, intercept, perturb, seed_key
):  # pragma: no cover
    """``out[k, b, c] = noise(sign/offset(roll(flip(frames[k, b, c]))))`` for every plane (see the module
    doc).

    ``frames``/``out`` float32 ``[W, B, C, lat, lon]`` (may be the same array); ``shifts`` int64 ``[B]``;
    ``flips`` bool ``[B]``; ``sign``/``offset`` float32 ``[C]`` applied where flipped; ``slope``/``intercept``
    float32 ``[C]``; ``perturb`` bool ``[W]`` (frames that get noise); ``seed_key`` the mixed noise seed."""
    window, batch, channels, nlat, nlon = frames.shape
    half = (nlat + 1) // 2
    for plane in numba.prange(window * batch * channels):
        k = plane // (batch * channels)
        b = (plane // channels) % batch
        c = plane % channels
        flipped = flips[b]
        shift = shifts[b] % nlon
        sign_c = sign[c] if flipped else np.float32(1.0)
        offset_c = offset[c] if flipped else np.float32(0.0)
        noisy = perturb[k]
        key = mix32(seed_key ^ np.uint64(plane))
        scratch = np.empty((2, nlon), dtype=np.float32)
        for j in range(half):
            mirror = nlat - 1 - j
            scratch[0, :] = frames[k, b, c, j]
            scratch[1, :] = frames[k, b, c, mirror]
            top, bottom = (scratch[1], scratch[0]) if flipped else (scratch[0], scratch[1])
            _write_row(
                out[k, b, c, j], top, shift, sign_c, offset_c, noisy, slope[c], intercept[c], key, j * nlon
            )
            if mirror != j:
                _write_row(
                    out[k, b, c, mirror], bottom, shift, sign_c, offset_c, noisy, slope[c], intercept[c], key,
                    mirror * nlon,
                )


def set_threads(count: int) -> None:
    """Use ``count`` threads (at most numba's configured maximum)."""
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
