"""A slowloris client, run as its own process so its work does not share a GIL with the client
that measures: `python tests/slowloris.py --port P --conns 1000 --interval 2`.

Opens `--conns` connections to 127.0.0.1:PORT, then sends each one the next byte of a request
head every `--interval` seconds (the sends spread evenly over the interval), never finishing
the head. Prints one JSON line {"event": "ready", ...} once every connection is open and has
sent its first byte, and when stdin reaches EOF (or after `--duration` seconds) one line
{"event": "done", "open": N, "closed": N, "answered": N, "bytes_sent": N} and exits: `closed`
counts connections the server closed, `answered` those on which any byte came back.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import threading
import time

HEAD = b"GET /slowloris HTTP/1.1\r\nHost: slow.test\r\nUser-Agent: slowloris\r\n" + \
    b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 40) for i in range(200))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=60.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.conns + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.conns + 256), hard))

    conns: list[socket.socket] = []
    for _ in range(args.conns):
        s = socket.create_connection((args.host, args.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HEAD[:1])
        s.setblocking(False)
        conns.append(s)
    sent = [1] * len(conns)
    closed: set[int] = set()
    answered: set[int] = set()
    sel = selectors.DefaultSelector()
    for i, s in enumerate(conns):
        sel.register(s, selectors.EVENT_READ, i)
    print(json.dumps({"event": "ready", "connected": len(conns)}), flush=True)

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + args.duration
    step = args.interval / len(conns)
    nxt = time.monotonic()
    i = 0
    while not stop.is_set() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, nxt - time.monotonic())):
            j = key.data
            try:
                data = conns[j].recv(65536)
            except OSError:
                data = b""
            if data:
                answered.add(j)
            else:
                closed.add(j)
                sel.unregister(conns[j])
        now = time.monotonic()
        while nxt <= now:
            if i not in closed and sent[i] < len(HEAD):
                try:
                    conns[i].send(HEAD[sent[i]:sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    closed.add(i)
            i = (i + 1) % len(conns)
            nxt += step
    print(json.dumps({"event": "done", "open": len(conns) - len(closed), "closed": len(closed),
                      "answered": len(answered), "bytes_sent": sum(sent)}), flush=True)
    for s in conns:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
