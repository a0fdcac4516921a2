"""Distributed tier: several gloo ranks per test (tests/rank_runner.py), e.g. parity with one process,
communication counts, the parallel API and resharding."""
