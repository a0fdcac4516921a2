"""Unit tier: in-process tests only (no ranks, subprocesses or torchrun), about 2 minutes on 2 cores."""
