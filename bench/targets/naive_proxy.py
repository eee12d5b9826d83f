"""A naive reverse proxy, written as most Python proxies are: aiohttp.web + a ClientSession.

It is the "what you would get without thinking about it" baseline of the throughput scenario:
each request is read whole, forwarded with the session (which pools keep-alive connections),
and the upstream's body is read whole and sent back. Runs on uvloop.

    python -m bench.targets.naive_proxy --listen 127.0.0.1:8080 --upstream unix:/tmp/up.sock \
        [--access-log FILE]
"""

from __future__ import annotations

import argparse
import logging

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "content-length", "host",
})

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str, base_url: str) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        if upstream.startswith("unix:"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=upstream[len("unix:"):], limit=64)
        else:
            connector = aiohttp.TCPConnector(limit=64)
        app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[SESSION].close()

    async def proxy(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = request.host
        body = await request.read()
        async with request.app[SESSION].request(
                request.method, base_url + request.path_qs, headers=headers,
                data=body or None, allow_redirects=False) as resp:
            payload = await resp.read()
            out_headers = {k: v for k, v in resp.headers.items()
                           if k.lower() not in HOP_BY_HOP}
            return web.Response(status=resp.status, headers=out_headers, body=payload)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="unix:/path or http://host:port")
    parser.add_argument("--access-log", default="", help="file for aiohttp's access log")
    args = parser.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    base_url = "http://localhost" if args.upstream.startswith("unix:") else args.upstream
    access_logger = None
    if args.access_log:
        access_logger = logging.getLogger("aiohttp.access")
        access_logger.setLevel(logging.INFO)
        access_logger.addHandler(logging.FileHandler(args.access_log))
        access_logger.propagate = False
    uvloop.install()
    web.run_app(make_app(args.upstream, base_url), host=host, port=int(port),
                access_log=access_logger, print=None, backlog=1024)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
