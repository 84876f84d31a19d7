"""Benchmarks: `make bench` (python -m benchmarks.run). Measured, never asserted in tests."""
