"""End-to-end tier: the trainer and recipes run as a user runs them (also one rank through the rank
runner), torchrun, the launchers, the benchmarks' own tests and the documented commands."""
