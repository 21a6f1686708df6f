"""Benchmarks: throughput against baselines measured in the same run (see each script's --help)."""
