"""Scenarios: the runs, one module each — `throughput`, `failover`, `memory`, `seed` (issue 7's
three boxes behind real unicorn), `slowclients` (with `slowload`, its slow clients as a process of
their own) and the fault `soak`. Each starts targets, drives them with instruments and returns its
figures; `python -m bench MODE` (bench/runner.py) runs them and writes RESULTS.md.
"""
