"""``sapwood bench data`` and ``sapwood bench augment`` at tiny sizes: every figure comes with its same-run
limit."""

from __future__ import annotations

import json

import pytest

from sapwood.bench.augment import run_augment_bench
from sapwood.bench.data import run_data_bench


@pytest.mark.slow
def test_bench_augment_reports_seconds_gbps_and_the_memcpy_limit(tmp_path):
    results = run_augment_bench(tmp_path, batch_gb=0.002, levels=2, nlat=8, nlon=16, repeats=2)
    payload = json.loads((tmp_path / "augment.json").read_text())
    names = [r["name"] for r in payload["results"]]
    assert "fused augment in place vs numpy loop (cpu)" in names
    assert "fused augment GB/s vs memcpy GB/s (cpu)" in names
    for result in results:
        assert result.value > 0 and result.baseline_value > 0 and result.ratio > 0
    first = payload["results"][0]["params"]
    assert abs(first["batch_gb"] - 0.002) < 0.001 and first["GBps"] > 0


@pytest.mark.slow
def test_bench_data_reports_raw_memcpy_and_zarr_in_the_same_run(tmp_path):
    results = run_data_bench(
        tmp_path / "out", tmp_path / "work", batch_gb=0.002, levels=2, nlat=8, nlon=16, batches=2,
        progress=False, train_steps=3,
    )
    by_name = {r.name: r for r in results}
    params = by_name["loader with prefetch thread vs raw read"].params
    for key in ("loader_GBps", "raw_GBps", "memcpy_GBps", "naive_GBps", "read_batch_GBps"):
        assert params[key] > 0, key
    assert "zarr layout read_batch (direct shard reads) vs raw layout" in by_name
    assert (tmp_path / "work" / "store-zarr" / "zarr.json").exists()
    waits = [r for r in results if r.name.startswith("cube training data wait")]
    assert [r.params["augment"] for r in waits] == ["no augmentation", "roll+flip", "roll+flip+noise"]
    for result in waits:
        assert result.params["steps"] == 3 and 0 <= result.params["data_wait_fraction"] <= 1
        assert 0 <= result.value <= result.baseline_value  # a step waits at most as long as it takes
