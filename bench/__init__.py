"""Benchmarks: each script prints a table and writes JSON (``python bench/NAME.py --help``).

A package so the tests import the scripts' functions (``from bench import throughput``) instead
of loading files by path; what the scripts share lives in :mod:`llmkit.profiling`.
"""
