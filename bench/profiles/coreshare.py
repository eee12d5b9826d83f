"""What share of a seed-like load the C core answers itself (failproxy/proxy/_core.pyx).

The profile-guided build's training load (failproxy._pgo: the seed's upstream section with its
two peers and this box's own port as backups, four keep-alive clients, GETs of a few routes,
POSTs with a body, a chunked answer now and then, an app server that closes each connection as
unicorn does), run in this process with the core in front, and the worker's counters read
after: the requests the core answered (`failproxy_core_requests_total`), against all of them
and where they went. The rest were the relay's: a POST, or the policy's choice of a peer.

    python -m bench.profiles.coreshare [REQUESTS]
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import uvloop

from failproxy import _pgo, config
from failproxy.telemetry import logs
from failproxy.telemetry.metrics import _Layout


async def measure(requests: int) -> str:
    core = _pgo._core()
    if core is None:
        raise SystemExit("coreshare: this build has no C core (the compiled build has)")
    with tempfile.TemporaryDirectory(prefix="coreshare-") as tmp:
        path = os.path.join(tmp, "app.sock")
        peers = []
        for _ in range(3):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            peers.append(sock)
        addr = [f"127.0.0.1:{s.getsockname()[1]}" for s in peers]
        cfg = config.loads(_pgo.CONFIG.format(path=path, peer1=addr[0], peer2=addr[1],
                                              own=addr[2], log=os.path.join(tmp, "access.log")))
        logs.configure(cfg.log)
        try:
            ctx = await _pgo._phase(cfg, path, peers, True, requests, core)
        finally:
            for sock in peers:
                sock.close()
    q, _ = ctx.metrics.snapshot()
    layout = _Layout(ctx.metrics.n_servers)
    where = [q[layout.server_requests + i] for i in range(ctx.metrics.n_servers)]
    return (f"core answered {q[layout.core]} of {requests} requests "
            f"({q[layout.core] / requests:.1%}); upstream requests by server in order {where}")


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    print(uvloop.run(measure(requests)))


if __name__ == "__main__":
    main()
