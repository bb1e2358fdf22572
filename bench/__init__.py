"""Benchmarks: each script prints a table and writes JSON (``python -m bench.NAME --help``, from the repository root).

A package so the tests import the scripts' functions (``from bench import throughput``) instead
of loading files by path; what the scripts share lives in :mod:`llmkit.profiling`.
"""
