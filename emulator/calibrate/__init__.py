"""Calibration on the emulator's host: the collective microbenchmark (bench.py, Ray
workers), alpha-beta fitting (fit.py, pure) and the host-overhead probe (host.py)."""
