"""Instruments: what drives the load and what reads the meters, with no knowledge of what is
measured — the machine (`system`: packages, facts, RLIMIT_NOFILE, free ports), process groups and
/proc readers (`procs`), medians and percentiles (`stats`), wrk with exact percentiles (`wrk`) and
the open-loop Poisson client (`openloop`). The bottom layer of bench: imports nothing above it.
"""
