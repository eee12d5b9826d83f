"""Benchmark harness: failproxy side by side with nginx, HAProxy and a naive Python proxy.

Run `python -m bench quick` (or `make bench`); see bench/runner.py and bench/RESULTS.md.
"""
