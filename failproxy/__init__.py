"""failproxy: a per-host front proxy: the local UNIX socket first, then ordered TCP peers."""

__version__ = "0.1.0"
