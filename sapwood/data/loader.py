"""Batches of datacube frames from a prepared store, straight into torch tensors.

Usage::

    store = CubeStore("STORE")
    split = split_store(store, val_runs=2, holdout_time=0.0)   # the one definition of held-out frames
    loader = CubeLoader(store, batch_size=32, windows=split.train, seed=0, normalize=True)
    for batch in loader:            # one epoch from the current position
        x, y = batch.state, batch.next_state     # [B, C, lat, lon] float32
        p = batch.params                         # [B, P] planet parameters (store.param_names)
    state = loader.state_dict()     # {"epoch", "batch", "seed"}; load_state_dict(state) resumes exactly

How a batch is read: the samples of an epoch are cut into *segments* of ``L = batch_size /
segments_per_batch`` consecutive times inside one time window ``(run, start, stop)`` (whole runs by default;
consecutive rows of the store). Segments are shuffled per epoch (chunk-level shuffling, a pure function of
``seed`` and the epoch) and ``segments_per_batch`` of them make a batch. Frame ``k`` of the window (``k =
0`` the state, ``k = 1`` the next state, ...) of a segment is one contiguous ``preadv`` of ``L`` rows
straight into ``frames[k, s*L:(s+1)*L]``, so a batch is ``window * segments_per_batch`` large reads
(``segments_per_batch`` defaults to the largest of 4, 3, 2, 1 dividing ``batch_size``) and no per-sample
Python work. While iterating, the reads of a batch are shared by ``read_threads`` threads, the prefetch
thread and ``read_threads - 1`` readers (page-cache copies in parallel; by default up to 4 threads for
batches of at least ``PARALLEL_READ_FROM_BYTES``, the prefetch thread alone below). Frame buffers are
recycled once no batch made from them is referenced any more (so a batch you keep stays valid). A
background thread prefetches ``prefetch`` batches (pinned memory when CUDA is available); normalization, when
asked for, is applied in place in that thread, and so is ``transform`` (per-batch work such as augmentation,
done while the consumer computes on the previous batch).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood.data.buffers import BufferPool
from sapwood.data.store import CubeStore
from sapwood.errors import SapwoodError

PARALLEL_READ_FROM_BYTES = 8 << 20


@dataclass
class Batch:
    """``frames [window, B, C, lat, lon]`` (frame 0 at ``time``, frame k at ``time + k``), planet ``params [B,
    P]``, and the ``run`` and ``time`` index of every sample ``[B]`` (int64)."""

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
        return Batch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.frames, self.params, self.run, self.time)
            )
        )


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
        raise SapwoodError(
            f"val_runs={val_runs} leaves no training run; the store has {store.runs} runs "
            f"(allowed 0..{store.runs - 1})"
        )
    held_runs = list(range(store.runs - val_runs, store.runs))
    train: list[Window] = []
    held: list[Window] = [(run, 0, int(store.run_times[run])) for run in held_runs]
    for run in range(store.runs - val_runs):
        times = int(store.run_times[run])
        cut = times - int(round(times * holdout_time)) if holdout_time else times
        if holdout_time and (cut < 2 or times - cut < 2):
            raise SapwoodError(
                f"holdout_time={holdout_time}: run {run} has {times} times, which leaves "
                f"{cut} for training and {times - cut} held out; each needs at least 2"
            )
        train.append((run, 0, cut))
        if cut < times:
            held.append((run, cut, times))
    return Split(train=train, held_out=sorted(held), held_out_runs=held_runs, holdout_time=holdout_time)


_LIVE_PREFETCH: dict[threading.Thread, threading.Event] = {}  # running prefetch threads and their stop
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_prefetch_threads(timeout_s: float = 60.0) -> None:
    """At interpreter exit, before daemon threads are frozen: stop every prefetch thread and wait until it
    has finished the batch in hand. A daemon thread still inside a torch or numba call when the interpreter
    finalizes is ended mid-call, which aborts the process ("terminate called without an active
    exception")."""
    with _LIVE_LOCK:
        live = list(_LIVE_PREFETCH.items())
    for _, stop in live:
        stop.set()
    for worker, _ in live:
        worker.join(timeout_s)


class CubeLoader:
    """Deterministic, resumable, prefetching batch loader over a :class:`CubeStore` (see the module
    docstring)."""

    def __init__(
        self, store: CubeStore | str | Path, batch_size: int, *, window: int = 2,
        segments_per_batch: int | None = None, runs: Sequence[int] | None = None,
        windows: Sequence[Window] | None = None, seed: int = 0, shuffle: bool = True, normalize: bool = False,
        prefetch: int = 2, pin_memory: bool | None = None, read_threads: int | None = None,
        transform: Callable[[Batch, int], Any] | None = None,
    ) -> None:
        self.store = store if isinstance(store, CubeStore) else CubeStore(store)
        if segments_per_batch is None:  # the largest of 4, 3, 2, 1 that divides the batch
            segments_per_batch = next(s for s in (4, 3, 2, 1) if batch_size % s == 0) if batch_size > 0 else 1
        if batch_size < 1 or segments_per_batch < 1 or batch_size % segments_per_batch:
            raise SapwoodError(
                f"batch_size={batch_size} must be a positive multiple of "
                f"segments_per_batch={segments_per_batch}"
            )
        if window < 2:
            raise SapwoodError(f"window={window}: need at least 2 frames (state and next state)")
        self.batch_size, self.window, self.segments_per_batch = batch_size, window, segments_per_batch
        self.segment_length = batch_size // segments_per_batch
        if windows is None:
            chosen = sorted(range(self.store.runs) if runs is None else runs)
            if not chosen or min(chosen) < 0 or max(chosen) >= self.store.runs:
                raise SapwoodError(
                    f"runs={list(runs or [])}: allowed run indices are 0..{self.store.runs - 1}"
                )
            windows = [(run, 0, int(self.store.run_times[run])) for run in chosen]
        table = np.asarray(list(windows), dtype=np.int64).reshape(-1, 3)
        if (
            table.size == 0
            or table[:, 0].min() < 0
            or table[:, 0].max() >= self.store.runs
            or np.any(table[:, 1] < 0)
            or np.any(table[:, 2] > self.store.run_times[table[:, 0]])
        ):
            raise SapwoodError(
                f"windows={list(windows)}: runs must be 0..{self.store.runs - 1} and times inside each run"
            )
        self.runs, self._window_start = table[:, 0], table[:, 1]
        self.seed, self.shuffle, self.normalize, self.prefetch = seed, shuffle, normalize, max(1, prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        samples_per_run = table[:, 2] - table[:, 1] - (window - 1)
        self.segments_per_run = np.maximum(samples_per_run, 0) // self.segment_length
        self._spare = np.maximum(samples_per_run, 0) % self.segment_length
        total = int(self.segments_per_run.sum())
        if total < segments_per_batch:
            raise SapwoodError(
                f"batch_size={batch_size} needs {segments_per_batch} segments of "
                f"{self.segment_length} samples; the selected runs have only {total}"
            )
        self.epoch, self.batch = 0, 0
        self._params = torch.as_tensor(self.store.params, dtype=torch.float32)
        self._pool = BufferPool(capacity=self.prefetch + 3)
        if read_threads is None:  # small batches: hand-offs to reader threads cost more than they save
            read_threads = 1 if self.batch_bytes < PARALLEL_READ_FROM_BYTES else min(4, os.cpu_count() or 1)
        self.read_threads = max(1, read_threads)
        self._readers: ThreadPoolExecutor | None = None
        self.transform = transform

    def __len__(self) -> int:
        """Batches per epoch."""
        return int(self.segments_per_run.sum()) // self.segments_per_batch

    @property
    def batch_bytes(self) -> int:
        """Bytes of ``frames`` in one batch."""
        return self.window * self.batch_size * self.store.row_bytes

    # --- the plan: a pure function of (seed, epoch) ---------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(run, first_time)`` of every segment of ``epoch`` in reading order (``[batches * segments]``)."""
        rng = np.random.default_rng([self.seed, epoch])
        offsets = self._window_start + (rng.integers(0, self._spare + 1) if self.shuffle else 0)
        run = np.repeat(self.runs, self.segments_per_run)
        within = np.arange(run.size) - np.repeat(
            np.cumsum(self.segments_per_run) - self.segments_per_run, self.segments_per_run
        )
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
            frames = torch.empty(
                (self.window, self.batch_size, *store.row_shape), dtype=torch.float32, pin_memory=True
            )
        else:
            frames = self._pool.take((self.window, self.batch_size, *store.row_shape))
        first_rows = store.run_rows[run] + first_time
        reads = [
            (first_row + k, frames[k, segment * length : (segment + 1) * length])
            for segment, first_row in enumerate(first_rows.tolist())
            for k in range(self.window)
        ]
        if (
            self._readers is not None
        ):  # positional reads release the GIL: the page-cache copies run in parallel
            shares = [reads[i :: self.read_threads] for i in range(self.read_threads)]
            pending = [self._readers.submit(_read_all, store, share) for share in shares[1:] if share]
            try:
                _read_all(store, shares[0])  # the calling thread takes a share: one hand-off fewer per batch
            finally:
                wait(pending)  # no read may still be writing into frames once this returns or raises
            for future in pending:
                future.result()
        else:
            _read_all(store, reads)
        if self.normalize:
            store.normalize(frames)
        sample_run = torch.from_numpy(np.repeat(run, length))
        sample_time = torch.from_numpy((first_time[:, None] + np.arange(length)[None]).reshape(-1))
        return Batch(frames, self._params[sample_run], sample_run, sample_time)

    # --- iteration with background prefetch -----------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """One epoch from the current position."""
        return self.batches(endless=False)

    def batches(self, endless: bool = False) -> Iterator[Batch]:
        """Batches from the current position to the end of the epoch, or, with ``endless``, on through every
        following epoch: the prefetch thread then reads the first batches of the next epoch while the last
        ones of this epoch are used, so no step waits at an epoch boundary. ``state_dict()`` follows the
        batches yielded.

        With a ``transform``, the prefetch thread calls ``transform(batch, number)`` on each batch, in reading
        order, and iteration yields what it returns; ``number = epoch * len(self) + index`` counts the
        batches since the start of epoch 0, so per-batch randomness keyed by it resumes exactly."""
        epoch, start, total = self.epoch, self.batch, len(self)
        if start >= total:
            epoch, start = epoch + 1, 0
            self.epoch, self.batch = epoch, 0
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def plan() -> Iterator[tuple[int, int]]:
            current, first = epoch, start
            while True:
                for index in range(first, total):
                    yield current, index
                if not endless:
                    return
                current, first = current + 1, 0

        def offer(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for position in plan():
                    if stop.is_set():
                        return
                    batch = self.read_batch(*position)
                    if self.transform is not None:
                        batch = self.transform(batch, position[0] * total + position[1])
                    item = (position, batch)
                    del batch
                    offer(item)
                    del item  # the consumer holds the only reference: its buffer can be recycled after use
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                offer(exc)
            offer(None)

        if self.read_threads > 1 and self._readers is None:
            self._readers = ThreadPoolExecutor(self.read_threads - 1, thread_name_prefix="sapwood-cube-read")
        worker = threading.Thread(target=produce, name="sapwood-cube-prefetch", daemon=True)
        with _LIVE_LOCK:
            _LIVE_PREFETCH[worker] = stop
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                (done_epoch, index), batch = item
                del item
                self.epoch, self.batch = (
                    (done_epoch + 1, 0) if index + 1 == total and endless else (done_epoch, index + 1)
                )
                yield batch
                del batch
            self.epoch, self.batch = epoch + 1, 0
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            worker.join()
            with _LIVE_LOCK:
                _LIVE_PREFETCH.pop(worker, None)
            if self._readers is not None:
                self._readers.shutdown(wait=True)
                self._readers = None

    # --- resumable position ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Position after the batches yielded so far: ``{"epoch", "batch", "seed"}``."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise SapwoodError(f"loader state has seed={state['seed']}, this loader seed={self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _read_all(store: CubeStore, reads: list[tuple[int, torch.Tensor]]) -> None:
    for first_row, out in reads:
        store.read_rows_into(first_row, out)


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """``batch`` (a tensor, :class:`Batch`, dict, list or tuple of them) on ``device``; tensors already there
    are passed through without a torch call (each call may hand the GIL to the prefetch thread)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Batch):
        yield from (batch.frames, batch.params, batch.run, batch.time)
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


class DeviceFeed:
    """The GPU feed: an endless, resumable batch iterator (``next``, ``state_dict``, ``load_state_dict``, such
    as a training task's batches) whose batches arrive on ``device``, the copy of batch k+1 overlapping the
    compute on batch k.

    With ``ahead`` (the default on CUDA), each call hands out the batch staged by the previous call and stages
    the next one: its host-to-device copy is issued with ``non_blocking=True`` on a side stream (from pinned
    memory, as
    :class:`CubeLoader` allocates when CUDA is available), and the compute stream waits for that copy only
    when the batch is handed out. ``state_dict()`` is the position after the batches handed out (not the
    staged one), so a resume continues exactly. Without ``ahead`` (the default on the CPU) it is a plain
    pass-through.
    """

    def __init__(self, batches: Any, device: torch.device | str, ahead: bool | None = None) -> None:
        self.batches, self.device = batches, torch.device(device)
        self.ahead = self.device.type == "cuda" if ahead is None else ahead
        self.stream = torch.cuda.Stream(self.device) if self.ahead and self.device.type == "cuda" else None
        self._staged: tuple[Any, dict[str, Any]] | None = None
        self._state: dict[str, Any] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def _stage(self) -> tuple[Any, dict[str, Any]]:
        host = next(self.batches)
        state = self.batches.state_dict()
        if self.stream is None:
            return to_device(host, self.device), state
        with torch.cuda.stream(self.stream):
            return to_device(host, self.device, non_blocking=True), state

    def __next__(self) -> Any:
        if not self.ahead:
            return to_device(next(self.batches), self.device)
        batch, self._state = self._staged if self._staged is not None else self._stage()
        if self.stream is not None:  # the compute stream waits for this batch's copy, and owns its memory
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for tensor in _tensors(batch):
                tensor.record_stream(torch.cuda.current_stream(self.device))
        self._staged = self._stage()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self.ahead and self._state is not None else self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._staged, self._state = None, None
        self.batches.load_state_dict(state)
