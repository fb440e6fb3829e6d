"""Benchmarks for compressor: `python -m benchmarks --help`. Not part of the package."""
