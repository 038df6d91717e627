"""The CPU kernel of :mod:`sapwood.data.augment`: roll, flip, sign change and noise in one pass (numba).

Each plane ``frames[k, b, c]`` ``[lat, lon]`` is processed by one thread, two mirrored rows at a time: both
rows are copied to a small scratch (cache-resident), then written back rolled, mirrored, sign-changed and
perturbed. Every element of the batch is therefore read once and written once, and ``out`` may be ``frames``
itself (in place). The noise is the counter-based field of :func:`sapwood.data.augment.hash_uniform`
(bit-identical here), computed inline, so no random numbers are stored or drawn from a sequential generator.

Two compiled versions of the one kernel: :func:`fused_planes` spreads the planes over numba's thread pool,
:func:`fused_planes_serial` runs them on the calling thread. Both release the GIL, so the serial one overlaps
a training step when a prefetch thread calls it.

Threads: numba's thread pool uses the ``workqueue`` layer unless ``NUMBA_THREADING_LAYER`` says otherwise.
Its workers sleep between kernels. The ``omp`` layer's workers busy-wait after each kernel (libgomp's default
spin), so on a small CPU they hold the cores a torch training step needs: with one kernel per step, a cube
training step takes about 10x longer (``GOMP_SPINCOUNT=0``, ``OMP_WAIT_POLICY=passive`` or one numba thread
remove the slowdown too). The workqueue layer does not allow two parallel launches at once, so :func:`run`
takes the pool only when no other thread holds it and runs the kernel serially otherwise.
"""

from __future__ import annotations

import os
import threading
import types

import numba
import numpy as np

if "NUMBA_THREADING_LAYER" not in os.environ:  # before the first parallel launch fixes the layer
    numba.config.THREADING_LAYER = "workqueue"

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
    tail, head, rest = source[nlon - shift :], source[: nlon - shift], row[shift:]
    for i in range(shift):  # plain range indices into views: no negative-index checks, so the loops vectorize
        row[i] = sign * tail[i] + offset
    for i in range(nlon - shift):
        rest[i] = sign * head[i] + offset
    if noisy:  # a second sweep over the row while it is in L1: each loop is contiguous and vectorizes
        for i in range(nlon):
            h = mix32(key ^ np.uint64(first_cell + i))
            centered = (np.float32(np.int32(h >> np.uint64(8))) - CENTER) * TO_UNIT
            y = row[i]
            row[i] = y + centered * (slope * y + intercept)


def _fused_planes(
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
            upper, lower = frames[k, b, c, j], frames[k, b, c, mirror]
            for i in range(nlon):  # an explicit loop: a slice assignment checks for overlap on every row
                scratch[0, i] = upper[i]
                scratch[1, i] = lower[i]
            top, bottom = (scratch[1], scratch[0]) if flipped else (scratch[0], scratch[1])
            _write_row(
                out[k, b, c, j], top, shift, sign_c, offset_c, noisy, slope[c], intercept[c], key, j * nlon
            )
            if mirror != j:
                _write_row(
                    out[k, b, c, mirror], bottom, shift, sign_c, offset_c, noisy, slope[c], intercept[c], key,
                    mirror * nlon,
                )


def _compiled(name: str, **options: bool) -> numba.core.registry.CPUDispatcher:
    """``_fused_planes`` compiled under its own name: numba's on-disk cache keys on the function's name and
    signature, not on ``parallel``, so two builds of one function would load each other's code."""
    function = types.FunctionType(_fused_planes.__code__, _fused_planes.__globals__, name)
    function.__qualname__, function.__doc__ = name, _fused_planes.__doc__
    return numba.njit(cache=True, nogil=True, **options)(function)


fused_planes = _compiled("fused_planes", parallel=True)
fused_planes_serial = _compiled("fused_planes_serial")
_POOL = threading.Lock()  # one parallel launch at a time (the workqueue layer aborts on concurrent ones)


def run(arguments: tuple, threads: int) -> None:
    """:func:`fused_planes` on ``threads`` threads (at most numba's configured maximum), or
    :func:`fused_planes_serial` on the calling thread when ``threads`` is 1 or another thread holds the
    pool."""
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if threads > 1 and _POOL.acquire(blocking=False):
        try:
            numba.set_num_threads(threads)
            fused_planes(*arguments)
        finally:
            _POOL.release()
    else:
        fused_planes_serial(*arguments)


def warm() -> None:
    """Compile (or load from numba's cache) the serial kernel now, so that the first batch does not wait."""
    planes = np.zeros((1, 1, 1, 2, 2), dtype=np.float32)
    vector = np.zeros(1, dtype=np.float32)
    fused_planes_serial(
        planes, planes, np.zeros(1, np.int64), np.zeros(1, np.bool_), vector, vector, vector, vector,
        np.zeros(1, np.bool_), np.uint64(0),
    )
