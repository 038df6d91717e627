"""Benchmarks: every figure is ours against a baseline measured in the same run."""
