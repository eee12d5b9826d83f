"""Targets: what is measured — the command lines and config files of every server (`servers`:
failproxy, nginx, HAProxy, the upstreams), the proxies written for comparison (`floor_proxy`:
uvloop + httptools with no features; `cfloor.pyx`: the seed layout's pass-through in C on its
own epoll loop; `naive_proxy`: aiohttp), and the Rack apps unicorn runs
behind them (`seed_app/`, `slowclients_app/`, `soak_app/`). Imports only bench.instruments.
"""
