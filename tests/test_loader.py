"""CubeLoader: deterministic per seed, exact resume, chunk shuffling, consistent pairs, no leaked threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from sapwood.data.loader import PARALLEL_READ_FROM_BYTES, CubeLoader, split_store
from sapwood.data.simulate import Grid
from sapwood.errors import SapwoodError


@pytest.fixture(scope="module")
def store(make_cube_store):
    return make_cube_store(runs=4, grid=Grid(levels=2, nlat=8, nlon=16, times=13, spinup_days=1), seed=2)


def signature(batch) -> list[tuple[int, int]]:
    return list(zip(batch.run.tolist(), batch.time.tolist(), strict=True))


def test_same_seed_same_batches_and_other_seed_other_order(store):
    first = [signature(b) for b in CubeLoader(store, batch_size=6, segments_per_batch=2, seed=7)]
    again = [signature(b) for b in CubeLoader(store, batch_size=6, segments_per_batch=2, seed=7)]
    other = [signature(b) for b in CubeLoader(store, batch_size=6, segments_per_batch=2, seed=8)]
    assert first == again and first != other
    assert len(first) == 8  # 12 pairs per run = 4 segments of 3; 16 segments, 2 per batch


def test_resume_continues_at_the_same_batch(store):
    reference = CubeLoader(store, batch_size=4, segments_per_batch=2, seed=3)
    expected = [b.frames.clone() for _ in range(2) for b in reference]  # two epochs
    loader = CubeLoader(store, batch_size=4, segments_per_batch=2, seed=3)
    got = []
    for batch in loader:
        got.append(batch.frames.clone())
        if len(got) == 3:
            break
    state = loader.state_dict()
    assert state == {"epoch": 0, "batch": 3, "seed": 3}
    resumed = CubeLoader(store, batch_size=4, segments_per_batch=2, seed=3)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got.extend(b.frames.clone() for b in resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_epochs_reshuffle_and_cover_disjoint_segments(store):
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=1)
    epoch0 = sum((signature(b) for b in loader), [])
    epoch1 = sum((signature(b) for b in loader), [])
    assert epoch0 != epoch1
    for samples in (epoch0, epoch1):
        assert len(set(samples)) == len(samples)  # no sample twice in an epoch
        assert all(0 <= t <= 11 for _, t in samples)


def test_frames_are_consecutive_times_of_one_run(store):
    whole = store.memmap()
    batch = next(iter(CubeLoader(store, batch_size=6, segments_per_batch=3, window=3, seed=0)))
    assert batch.frames.shape == (3, 6, *store.row_shape)
    rows = store.run_rows[batch.run.numpy()] + batch.time.numpy()
    for k in range(3):
        np.testing.assert_array_equal(batch.frames[k].numpy(), whole[rows + k])
    np.testing.assert_array_equal(batch.params.numpy(), store.params[batch.run.numpy()].astype(np.float32))


def test_run_subsets_and_split(store):
    split = split_store(store, val_runs=1)
    assert split.train_runs == [0, 1, 2] and split.held_out_runs == [3]
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, windows=split.held_out, seed=0)
    assert {r for b in loader for r in b.run.tolist()} == {3}


def test_time_holdout_windows_never_overlap_training(store):
    split = split_store(store, val_runs=1, holdout_time=0.25)  # 13 times: 10 train, 3 held out per run
    assert split.train == [(0, 0, 10), (1, 0, 10), (2, 0, 10)]
    assert split.held_out == [(0, 10, 13), (1, 10, 13), (2, 10, 13), (3, 0, 13)]
    loader = CubeLoader(store, batch_size=3, segments_per_batch=1, windows=split.train, seed=0)
    seen = {(r, t) for b in loader for r, t in zip(b.run.tolist(), b.time.tolist(), strict=True)}
    assert seen and max(t for _, t in seen) + 1 <= 9  # the next state of every pair is inside the window
    assert {r for r, _ in seen} == {0, 1, 2}
    with pytest.raises(SapwoodError, match="holdout_time=0.9"):
        split_store(store, val_runs=1, holdout_time=0.9)
    with pytest.raises(SapwoodError, match="val_runs=4"):
        split_store(store, val_runs=4)


def test_breaking_out_stops_the_prefetch_thread(store):
    before = threading.active_count()
    loader = CubeLoader(store, batch_size=2, segments_per_batch=1, prefetch=1, seed=0)
    for _ in loader:
        break
    assert threading.active_count() == before


EXIT_WHILE_PREFETCHING = textwrap.dedent(
    """
    import sys, threading, torch
    from sapwood.data.loader import CubeLoader
    busy = threading.Event()
    def transform(batch, number):
        if number >= 1:  # the prefetch thread is inside torch calls while the main thread exits
            busy.set()
            x = torch.randn(256, 256)
            for _ in range(300):
                x = torch.tanh(x @ x.T / 256)
            print("transform finished", flush=True)
        return batch
    batches = CubeLoader(sys.argv[1], 4, transform=transform).batches(endless=True)
    next(batches)
    busy.wait()
    """
)


def test_a_process_that_exits_while_the_prefetch_thread_computes_exits_cleanly(store):
    # without the exit hook the runtime ends the daemon thread inside torch: "terminate called without an
    # active exception", exit -6
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WHILE_PREFETCHING, str(store.path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transform finished" in done.stdout and "terminate called" not in done.stderr


def test_bad_arguments_are_refused(store):
    with pytest.raises(SapwoodError, match="batch_size=5"):
        CubeLoader(store, batch_size=5, segments_per_batch=2)
    with pytest.raises(SapwoodError, match="runs="):
        CubeLoader(store, batch_size=2, runs=[9])
    with pytest.raises(SapwoodError, match="only"):
        CubeLoader(store, batch_size=400, segments_per_batch=1)
    loader = CubeLoader(store, batch_size=2, seed=1)
    with pytest.raises(SapwoodError, match="seed"):
        loader.load_state_dict({"epoch": 0, "batch": 1, "seed": 2})


def test_kept_batches_stay_valid_while_buffers_are_recycled(store):
    whole = store.memmap()
    loader = CubeLoader(store, batch_size=2, segments_per_batch=1, prefetch=1, seed=4)
    kept = [(b.state, b.run.numpy(), b.time.numpy()) for b in loader]  # views only, no copies
    assert len(kept) > loader.prefetch + 3  # more batches than the pool holds
    for state, run, time in kept:
        np.testing.assert_array_equal(state.numpy(), whole[store.run_rows[run] + time])
    pointers = set()
    for batch in loader:  # batches dropped at once: their buffers are reused
        pointers.add(batch.frames.data_ptr())
    assert len(pointers) < len(loader)


def test_endless_batches_cross_epochs_in_order_and_resume(store):
    reference = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=4)
    expected = [signature(b) for _ in range(3) for b in reference]  # three epochs, one iterator each
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=4)
    stream = loader.batches(endless=True)
    got, states = [], []
    for _ in range(len(expected)):
        got.append(signature(next(stream)))
        states.append(loader.state_dict())
    stream.close()
    assert got == expected
    per_epoch = len(reference)
    assert states[per_epoch - 1] == {"epoch": 1, "batch": 0, "seed": 4}  # after the last batch of epoch 0
    assert states[per_epoch] == {"epoch": 1, "batch": 1, "seed": 4}
    resumed = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=4)
    resumed.load_state_dict(states[per_epoch + 2])
    assert signature(next(iter(resumed))) == expected[per_epoch + 3]


def test_the_prefetch_thread_reads_the_next_epoch_before_it_is_asked_for(store):
    class Recording(CubeLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.next_epoch_read = threading.Event()

        def read_batch(self, epoch, index):
            batch = super().read_batch(epoch, index)
            if (epoch, index) == (1, 0):
                self.next_epoch_read.set()
            return batch

    loader = Recording(store, batch_size=6, segments_per_batch=2, seed=0, prefetch=2)
    stream = loader.batches(endless=True)
    for _ in range(len(loader)):  # the whole of epoch 0; the consumer asks for nothing more
        next(stream)
    assert loader.next_epoch_read.wait(timeout=120)  # read by the thread, not on demand
    stream.close()


def test_transform_runs_on_the_prefetch_thread_numbered_across_epochs_and_resumes(store):
    def numbered(batch, number):
        return number, threading.current_thread().name, signature(batch)

    reference = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=5)
    expected = [signature(b) for _ in range(2) for b in reference]  # two epochs
    loader = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=5, transform=numbered)
    stream = loader.batches(endless=True)
    got = [next(stream) for _ in range(len(expected) - 3)]
    stream.close()
    assert [number for number, _, _ in got] == list(range(len(got)))
    assert {thread for _, thread, _ in got} == {"sapwood-cube-prefetch"}
    assert [s for _, _, s in got] == expected[: len(got)]
    resumed = CubeLoader(store, batch_size=6, segments_per_batch=2, seed=5, transform=numbered)
    resumed.load_state_dict(loader.state_dict())  # mid-way through epoch 1
    stream = resumed.batches(endless=True)
    rest = [next(stream) for _ in range(3)]
    stream.close()
    assert [n for n, _, _ in rest] == [len(got), len(got) + 1, len(got) + 2]
    assert [s for _, _, s in rest] == expected[len(got) :]


def test_small_batches_are_read_by_the_prefetch_thread_alone(store):
    small = CubeLoader(store, batch_size=6, segments_per_batch=3, seed=2)
    assert small.batch_bytes < PARALLEL_READ_FROM_BYTES and small.read_threads == 1


def test_parallel_reads_equal_serial_reads(store):
    serial = CubeLoader(store, batch_size=6, segments_per_batch=3, seed=2, read_threads=1)
    parallel = CubeLoader(store, batch_size=6, segments_per_batch=3, seed=2, read_threads=3)
    before = threading.active_count()
    for index, batch in enumerate(parallel):
        assert parallel._readers is not None
        assert torch.equal(batch.frames, serial.read_batch(0, index).frames)
    assert index == len(serial) - 1 and threading.active_count() == before


def test_device_feed_stages_ahead_and_resumes_exactly(store):
    from sapwood.data.loader import DeviceFeed

    def batches(state=None):
        loader = CubeLoader(store, batch_size=4, segments_per_batch=2, seed=6)
        if state is not None:
            loader.load_state_dict(state)

        class Endless:
            def __init__(self):
                self.stream = loader.batches(endless=True)

            def __next__(self):
                return next(self.stream)

            def state_dict(self):
                return loader.state_dict()

            def load_state_dict(self, state):
                loader.load_state_dict(state)
                self.stream = loader.batches(endless=True)

        return Endless()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = DeviceFeed(batches(), "cpu")
    expected = [next(plain).frames.clone() for _ in range(12)]
    feed = DeviceFeed(batches(), device, ahead=True)
    got = [next(feed).frames.cpu() for _ in range(5)]
    state = feed.state_dict()
    assert state == {"epoch": 0, "batch": 5, "seed": 6}  # the staged sixth batch is not counted
    resumed = DeviceFeed(batches(state), device, ahead=True)
    got += [next(resumed).frames.cpu() for _ in range(7)]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_cube_training_logs_the_time_each_step_waited_for_data(tmp_path):
    from sapwood.train.cube_task import simulated_store, surrogate_config
    from sapwood.train.loop import train
    from sapwood.train.metrics import read_events

    store = simulated_store(tmp_path / "data", runs=3, levels=2, nlat=8, nlon=16, times=6, spinup_days=1)
    config = surrogate_config(
        store, tmp_path / "run", steps=4, hidden=32, layers=1, heads=2, patch=4, batch_size=4, val_runs=1
    )
    config.train.log_every = 1
    summary = train(config)
    steps = read_events(tmp_path / "run" / "metrics.jsonl", "train")
    assert len(steps) == 4
    for record in steps:
        assert 0 <= record["data_wait_s"] <= record["step_s"] and 0 <= record["data_wait_fraction"] <= 1
    # the run's fraction: the waits of all steps over their time, which each step's own fraction bounds
    fractions = [record["data_wait_fraction"] for record in steps]
    assert min(fractions) <= summary["data_wait_fraction"] <= max(fractions)
    (done,) = read_events(tmp_path / "run" / "metrics.jsonl", "done")
    assert done["data_wait_fraction"] == summary["data_wait_fraction"]
