"""Batches of datacube frames from a prepared store, straight into torch tensors.

Usage::

    store = CubeStore("STORE")
    split = split_store(store, val_runs=2, holdout_time=0.0)   # the one definition of held-out frames
    loader = CubeLoader(store, batch_size=32, windows=split.train, seed=0, normalize=True)
    for batch in loader:            # one epoch from the current position
        x, y = batch.state, batch.next_state     # [B, C, lat, lon] float32
        p = batch.params                         # [B, P] planet parameters (store.param_names)
    state = loader.state_dict()     # {"epoch", "batch", "seed"}; load_state_dict(state) resumes exactly

How a batch is read: the samples of an epoch are cut into *segments* of ``L = batch_size / segments_per_batch``
consecutive times inside one time window ``(run, start, stop)`` (whole runs by default; consecutive rows of
the store). Segments are shuffled per epoch (chunk-level
shuffling, a pure function of ``seed`` and the epoch) and ``segments_per_batch`` of them make a batch. Frame ``k``
of the window (``k = 0`` the state, ``k = 1`` the next state, ...) of a segment is one contiguous ``preadv`` of
``L`` rows straight into ``frames[k, s*L:(s+1)*L]``, so a batch is ``window * segments_per_batch`` large reads (``segments_per_batch`` defaults
to the largest of 4, 3, 2, 1 dividing ``batch_size``) and
no per-sample Python work. Frame buffers are recycled once no batch made from them is referenced any more
(so a batch you keep stays valid). A background thread prefetches ``prefetch`` batches (pinned memory when CUDA is
available); normalization, when asked for, is applied in place in that thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.data.buffers import BufferPool
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError


@dataclass
class Batch:
    """``frames [window, B, C, lat, lon]`` (frame 0 at ``time``, frame k at ``time + k``), planet ``params [B, P]``,
    and the ``run`` and ``time`` index of every sample ``[B]`` (int64)."""

    frames: torch.Tensor
    params: torch.Tensor
    run: torch.Tensor
    time: torch.Tensor

    @property
    def state(self) -> torch.Tensor:
        return self.frames[0]

    @property
    def next_state(self) -> torch.Tensor:
        return self.frames[1]

    def __len__(self) -> int:
        return self.frames.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.frames, self.params, self.run, self.time)))


Window = tuple[int, int, int]  # (run, first time, stop time)


@dataclass(frozen=True)
class Split:
    """The one definition of held-out data: the last ``val_runs`` runs of the store entirely (held-out planets
    or scenarios), plus the final ``holdout_time`` fraction of every other run. ``train`` and ``held_out`` are
    time windows ``(run, start, stop)``; no frame is in both."""

    train: list[Window]
    held_out: list[Window]
    held_out_runs: list[int]
    holdout_time: float

    @property
    def train_runs(self) -> list[int]:
        return sorted({run for run, _, _ in self.train})


def split_store(store: CubeStore, val_runs: int, holdout_time: float = 0.0) -> Split:
    """Split ``store`` into training and held-out windows (see :class:`Split`)."""
    if not 0 <= holdout_time < 1:
        raise SapwoodError(f"holdout_time={holdout_time}: allowed range is [0, 1)")
    if not 0 <= val_runs < store.runs:
        raise SapwoodError(f"val_runs={val_runs} leaves no training run; the store has {store.runs} runs "
                           f"(allowed 0..{store.runs - 1})")
    held_runs = list(range(store.runs - val_runs, store.runs))
    train: list[Window] = []
    held: list[Window] = [(run, 0, int(store.run_times[run])) for run in held_runs]
    for run in range(store.runs - val_runs):
        times = int(store.run_times[run])
        cut = times - int(round(times * holdout_time)) if holdout_time else times
        if holdout_time and (cut < 2 or times - cut < 2):
            raise SapwoodError(f"holdout_time={holdout_time}: run {run} has {times} times, which leaves "
                               f"{cut} for training and {times - cut} held out; each needs at least 2")
        train.append((run, 0, cut))
        if cut < times:
            held.append((run, cut, times))
    return Split(train=train, held_out=sorted(held), held_out_runs=held_runs, holdout_time=holdout_time)


class CubeLoader:
    """Deterministic, resumable, prefetching batch loader over a :class:`CubeStore` (see the module docstring)."""

    def __init__(self, store: CubeStore | str | Path, batch_size: int, *, window: int = 2,
                 segments_per_batch: int | None = None, runs: Sequence[int] | None = None,
                 windows: Sequence[Window] | None = None, seed: int = 0,
                 shuffle: bool = True, normalize: bool = False, prefetch: int = 2,
                 pin_memory: bool | None = None) -> None:
        self.store = store if isinstance(store, CubeStore) else CubeStore(store)
        if segments_per_batch is None:  # the largest of 4, 3, 2, 1 that divides the batch
            segments_per_batch = next(s for s in (4, 3, 2, 1) if batch_size % s == 0) if batch_size > 0 else 1
        if batch_size < 1 or segments_per_batch < 1 or batch_size % segments_per_batch:
            raise SapwoodError(f"batch_size={batch_size} must be a positive multiple of "
                               f"segments_per_batch={segments_per_batch}")
        if window < 2:
            raise SapwoodError(f"window={window}: need at least 2 frames (state and next state)")
        self.batch_size, self.window, self.segments_per_batch = batch_size, window, segments_per_batch
        self.segment_length = batch_size // segments_per_batch
        if windows is None:
            chosen = sorted(range(self.store.runs) if runs is None else runs)
            if not chosen or min(chosen) < 0 or max(chosen) >= self.store.runs:
                raise SapwoodError(f"runs={list(runs or [])}: allowed run indices are 0..{self.store.runs - 1}")
            windows = [(run, 0, int(self.store.run_times[run])) for run in chosen]
        table = np.asarray(list(windows), dtype=np.int64).reshape(-1, 3)
        if table.size == 0 or table[:, 0].min() < 0 or table[:, 0].max() >= self.store.runs or np.any(
                table[:, 1] < 0) or np.any(table[:, 2] > self.store.run_times[table[:, 0]]):
            raise SapwoodError(f"windows={list(windows)}: runs must be 0..{self.store.runs - 1} and times inside "
                               "each run")
        self.runs, self._window_start = table[:, 0], table[:, 1]
        self.seed, self.shuffle, self.normalize, self.prefetch = seed, shuffle, normalize, max(1, prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        samples_per_run = table[:, 2] - table[:, 1] - (window - 1)
        self.segments_per_run = np.maximum(samples_per_run, 0) // self.segment_length
        self._spare = np.maximum(samples_per_run, 0) % self.segment_length
        total = int(self.segments_per_run.sum())
        if total < segments_per_batch:
            raise SapwoodError(f"batch_size={batch_size} needs {segments_per_batch} segments of "
                               f"{self.segment_length} samples; the selected runs have only {total}")
        self.epoch, self.batch = 0, 0
        self._params = torch.as_tensor(self.store.params, dtype=torch.float32)
        self._pool = BufferPool(capacity=self.prefetch + 3)

    def __len__(self) -> int:
        """Batches per epoch."""
        return int(self.segments_per_run.sum()) // self.segments_per_batch

    @property
    def batch_bytes(self) -> int:
        """Bytes of ``frames`` in one batch."""
        return self.window * self.batch_size * self.store.row_bytes

    # --- the plan: a pure function of (seed, epoch) ------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(run, first_time)`` of every segment of ``epoch`` in reading order (``[batches * segments]``)."""
        rng = np.random.default_rng([self.seed, epoch])
        offsets = self._window_start + (rng.integers(0, self._spare + 1) if self.shuffle else 0)
        run = np.repeat(self.runs, self.segments_per_run)
        within = np.arange(run.size) - np.repeat(np.cumsum(self.segments_per_run) - self.segments_per_run,
                                                 self.segments_per_run)
        first_time = np.repeat(offsets, self.segments_per_run) + within * self.segment_length
        if self.shuffle:
            order = rng.permutation(run.size)
            run, first_time = run[order], first_time[order]
        used = len(self) * self.segments_per_batch
        return run[:used], first_time[:used]

    def read_batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch`` (independent of the iterator position)."""
        run, first_time = self.epoch_plan(epoch)
        chosen = slice(index * self.segments_per_batch, (index + 1) * self.segments_per_batch)
        run, first_time = run[chosen], first_time[chosen]
        if run.size != self.segments_per_batch:
            raise IndexError(f"batch {index} outside 0..{len(self) - 1}")
        length, store = self.segment_length, self.store
        if self.pin_memory:  # the CUDA caching host allocator recycles pinned blocks itself
            frames = torch.empty((self.window, self.batch_size, *store.row_shape), dtype=torch.float32,
                                 pin_memory=True)
        else:
            frames = self._pool.take((self.window, self.batch_size, *store.row_shape))
        first_rows = store.run_rows[run] + first_time
        for segment, first_row in enumerate(first_rows.tolist()):
            for k in range(self.window):
                store.read_rows_into(first_row + k, frames[k, segment * length:(segment + 1) * length])
        if self.normalize:
            store.normalize(frames)
        sample_run = torch.from_numpy(np.repeat(run, length))
        sample_time = torch.from_numpy((first_time[:, None] + np.arange(length)[None]).reshape(-1))
        return Batch(frames, self._params[sample_run], sample_run, sample_time)

    # --- iteration with background prefetch --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        epoch, start, total = self.epoch, self.batch, len(self)
        if start >= total:
            epoch, start = epoch + 1, 0
            self.epoch, self.batch = epoch, 0
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for index in range(start, total):
                    if stop.is_set():
                        return
                    item = self.read_batch(epoch, index)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                ready.put(exc)
            ready.put(None)

        worker = threading.Thread(target=produce, name="sapwood-cube-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.batch += 1
                yield item
            self.epoch, self.batch = epoch + 1, 0
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()

    # --- resumable position ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Position after the batches yielded so far: ``{"epoch", "batch", "seed"}``."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise SapwoodError(f"loader state has seed={state['seed']}, this loader seed={self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
