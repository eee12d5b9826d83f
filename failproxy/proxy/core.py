"""What a worker's client connections start as: the C core (proxy/_core.pyx) where the compiled
build has it, unless `FAILPROXY_CORE=0` turns it off; else the Python relay's ClientConnection.

The core answers the common request itself and hands everything else to the relay, before the
request goes upstream or with its answer in flight (Exchange.adopt), so turning it off changes
no answer, only who made it and what it cost (bench/PROFILE.md, "The plan for the core"; the
default since the suite passed with it on and it served the seed's layout as fast as unicorn
direct). The pure and mypyc-only builds never run it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from failproxy.proxy.context import WorkerContext
from failproxy.proxy.downstream import ClientConnection


def core_class() -> Any | None:
    """The core's protocol class, or None: turned off, or not built."""
    if os.environ.get("FAILPROXY_CORE", "") == "0":
        return None
    try:
        from failproxy.proxy._core import CoreConnection  # type: ignore[import-not-found]
    except ImportError:
        return None  # the pure or mypyc-only build: the Python relay serves alone
    return CoreConnection


def connection_factory(ctx: WorkerContext, tls: bool) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of a listener (loop.create_server)."""
    core = core_class()
    if core is not None:
        def make_core() -> asyncio.Protocol:
            return core(ctx, tls, ClientConnection)  # type: ignore[no-any-return]

        return make_core

    def make() -> asyncio.Protocol:
        return ClientConnection(ctx, tls)  # type: ignore[return-value]

    return make
