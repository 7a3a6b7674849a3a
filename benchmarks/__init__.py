"""Benchmarks: one script per headline number (see benchmarks/README.md); `make bench` runs them all."""
