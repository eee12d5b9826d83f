"""The admin endpoint (SPEC 7): /healthz, /status, /metrics for the whole process group.

Served by the master on its own event loop, from a listening socket the master bound (so a USR2
re-exec hands it over like the client listeners); the figures come from a `Source`, which the
master implements by summing the workers' shared counters.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

import orjson
from aiohttp import web

from failproxy.telemetry.metrics import CONTENT_TYPE


class Source(Protocol):
    def healthy(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...


def make_app(source: Source) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        if source.healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="unavailable\n")

    async def status(_request: web.Request) -> web.Response:
        body = orjson.dumps(source.status(), option=orjson.OPT_INDENT_2) + b"\n"
        return web.Response(body=body, content_type="application/json")

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=source.metrics_text().encode(),
                            headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


class AdminServer:
    """One aiohttp runner on one socket; `stop()` closes the socket (the master's copy)."""

    def __init__(self, source: Source, sock: socket.socket) -> None:
        self.sock = sock
        self._runner = web.AppRunner(make_app(source), access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
        self.sock.close()
