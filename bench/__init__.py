"""Benchmarks, run from the repo root as `python -m bench.<name>` (e.g. `python -m bench.levers --help`)."""
