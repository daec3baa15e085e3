"""Benchmarks (`python -m bench.<name>`); numbers go into README.md."""
