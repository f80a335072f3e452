"""Benchmarks: each runs Tartarus and its peer in the same process and run."""
