"""failproxy: a per-host front proxy: the local UNIX socket first, then ordered TCP peers."""

from failproxy import _build

__version__ = "0.1.0"
# "compiled with mypyc" or "pure Python": decided before any hot module is imported (_build.py).
BUILD = _build.select(__path__[0])
