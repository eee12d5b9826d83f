"""Fuzzing failproxy's request path as a black box (issue 9 item 4).

1. `test_request_stream_property`: any request stream drawn by `httpgen.pipelines()` (a grammar
   of HTTP/1.1 request heads and bodies, with mutations) sent on one connection gets, request by
   request and in order, either its upstream's answer, having reached a strict upstream (h11)
   as exactly the same method, target, end-to-end headers and body, plus failproxy's own
   X-Forwarded-*/Via/X-Request-Id, or a 4xx/5xx and a close with nothing of it reaching the
   upstream (for a bad body: the upstream never receives it complete), and nothing after it.
2. `test_pending_shape`: the same property for each shape SPEC section 8 refuses that failproxy
   still forwards (`httpgen.PENDING`), xfail(strict) one by one.
3. `test_stateful_pipelines_and_resets`: a Hypothesis state machine interleaving pipelined
   requests (unique ids, bodies), client resets and upstream resets (the backends reset, close
   or cut a response where a request header tells them to, or drop every connection), checking
   one answer per request, in order, byte-exact bodies, cut responses never presented as
   complete, and no non-idempotent request reaching the backends twice.

One proxy and its backends serve the whole module (a failproxy start costs ~0.5 s). The example
counts come from the Hypothesis profile named by FAILPROXY_FUZZ: "ci" (default: fixed seed,
bounded, the module in ~30 s) or "long" (`make fuzz`: random seeds, many more examples).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpgen
import pytest
from backends import CLOSE, RESET, HTTPBackend, Reply
from httpgen import EITHER_BODY, EITHER_HEAD, FORWARD, REJECT_BODY, REJECT_HEAD, GenReq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from strict_backend import SeenRequest, StrictBackend
from support import IncompleteResponse, Proxy, RawConn

PROFILE = os.environ.get("FAILPROXY_FUZZ", "ci")
LONG = PROFILE == "long"
# Examples per test: (ci, long). `make fuzz` runs the long counts (about 10 minutes).
EXAMPLES = {
    "stream": (250, 8000),
    "pending": (20, 300),
    "stateful": (25, 900),
}
_common: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much, HealthCheck.large_base_example],
    "print_blob": True,
}
# CI: a fixed seed, and no shrinking (each step is a real exchange; a failure is reported with
# its raw bytes as found)
settings.register_profile("ci", derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], **_common)
settings.register_profile("long", **_common)


def examples(name: str, **kw: Any) -> settings:
    ci, long = EXAMPLES[name]
    n = long if LONG else ci
    scale = float(os.environ.get("FAILPROXY_FUZZ_SCALE", "1"))  # e.g. 0.1 for a quick long run
    return settings(settings.get_profile(PROFILE), max_examples=max(1, int(n * scale)), **kw)


pytestmark = pytest.mark.timeout(3600 if LONG else 120)

OWN = {b"x-forwarded-for", b"x-forwarded-proto", b"via", b"x-request-id", b"content-length",
       b"transfer-encoding"}
HEX32 = re.compile(rb"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def strict_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, StrictBackend]]:
    backend = StrictBackend()
    fp = Proxy(tmp_path_factory.mktemp("fuzz"), [backend.address],
               server={"header_timeout": 5.0, "body_timeout": 3.0}, log={"level": "info"})
    fp.start()
    yield fp, backend
    try:
        assert fp.alive(), "failproxy died during the fuzz run"
        assert not fp.log.find("internal_error"), fp.log.find("internal_error")[:3]
        assert not fp.log.find("worker_exited"), fp.log.find("worker_exited")[:3]
    finally:
        fp.stop()
        backend.stop()


_examples = itertools.count(1)


# ---- one stream ------------------------------------------------------------------------------

def _abort(sock: socket.socket) -> None:
    """Close with RST: the client is gone, not merely done sending."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def check_forwarded(rec: SeenRequest, r: GenReq) -> None:
    """What the strict upstream read is exactly what the client sent, less hop-by-hop headers,
    plus failproxy's own."""
    what = f"request {r.tag!r} {r.describe()}\nupstream got {rec.raw[-2000:]!r}"
    assert rec.complete and not rec.error, what
    assert rec.method == r.method, what
    assert rec.target == (r.expect_target or r.target), what
    assert rec.version == b"1.1", what
    rest = [(k, v) for k, v in rec.headers if k.lower() not in OWN]
    if r.expect_host is not None or r.host_any:
        hosts = [v for k, v in rest if k.lower() == b"host"]
        assert len(hosts) == 1, f"one Host upstream: {hosts}; {what}"
        if r.expect_host is not None:
            assert hosts[0] == r.expect_host, what
        rest = [(k, v) for k, v in rest if k.lower() != b"host"]
    assert rest == r.end_to_end(), f"end-to-end headers differ; {what}"
    assert rec.header_all(b"x-forwarded-for") == [b"127.0.0.1"], what
    assert rec.header_all(b"x-forwarded-proto") == [b"http"], what
    vias = r.client_values(b"via")
    assert rec.header_all(b"via") == [b", ".join([*vias, b"1.1 failproxy"])], what
    rids = rec.header_all(b"x-request-id")
    sent = r.client_values(b"x-request-id")
    assert len(rids) == 1, what
    assert rids[0] == sent[-1] if sent else HEX32.match(rids[0]), what
    cl, te = rec.header_all(b"content-length"), rec.header_all(b"transfer-encoding")
    if r.framing == "cl":
        assert len(cl) == 1 and int(cl[0]) == len(r.body) and not te, what
    elif r.framing == "chunked":
        # request_buffering (the default, SPEC 9): read whole, de-chunked, sent with its length
        assert len(cl) == 1 and int(cl[0]) == len(r.body) and not te, what
    else:
        assert not cl and not te, what
    assert rec.body == r.body, what


def run_stream(fp: Proxy, backend: StrictBackend, reqs: list[GenReq],
               frags: list[bytes] | None = None) -> str:
    """Send the stream, read what comes back, and check it against the model; returns a
    one-word outcome (for the statistics)."""
    ex = reqs[0].tag.split(b"-")[0]
    stream = b"".join(r.raw if r.truncate_at is None else r.raw[: r.truncate_at] for r in reqs)
    desc = "\n".join(f"  [{i}] {r.describe()}" for i, r in enumerate(reqs))
    mark = backend.mark()
    c = RawConn(fp.port, timeout=5)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent_ok = True
    for i, part in enumerate(frags or [stream]):
        if i:
            time.sleep(0.002)
        try:
            c.send(part)
        except OSError:  # failproxy already refused and closed: fine, checked below
            sent_ok = False
            break
    forwarded: dict[int, SeenRequest] = {}
    refused: int | None = None
    truncated: int | None = None
    ended = len(reqs)
    outcome = "forwarded"
    try:
        for i, r in enumerate(reqs):
            if r.truncate_at is not None:
                truncated, ended = i, i
                outcome = "truncated"
                break
            try:
                resp = c.read_response(r.answered_method, timeout=5)
            except IncompleteResponse as e:
                raise AssertionError(f"request [{i}] got no answer ({e}); stream:\n{desc}") from e
            seen = resp.header("x-seen")
            if seen is not None:
                assert r.kind in (FORWARD, EITHER_HEAD, EITHER_BODY), \
                    f"request [{i}] reached the upstream, SPEC refuses it; stream:\n{desc}"
                assert resp.status == 200, (resp.status, desc)
                rec = backend.requests[int(seen)]
                assert rec.header_all(b"x-fuzz") == [r.tag], \
                    f"answer [{i}] is for {rec.header_all(b'x-fuzz')}: out of order\n{desc}"
                check_forwarded(rec, r)
                forwarded[i] = rec
                if not r.ends_connection() and not r.close_optional:
                    assert "close" not in resp.connection_tokens, \
                        f"request [{i}] answered with Connection: close\n{desc}"
                if r.ends_connection() or (r.close_optional and "close" in resp.connection_tokens):
                    assert "close" in resp.connection_tokens, (i, resp.raw_head, desc)
                    c.wait_closed(3)
                    ended = i + 1
                    outcome = "closed"
                    break
            else:
                assert r.kind != FORWARD, \
                    f"request [{i}] refused ({resp.status} {resp.body!r}), SPEC accepts it; " \
                    f"stream:\n{desc}"
                assert 400 <= resp.status < 600, (resp.status, desc)
                assert "close" in resp.connection_tokens, (resp.raw_head, desc)
                rest = c.wait_closed(3)
                # a refused HEAD may still carry the error text; nothing else may follow
                extra = int(resp.header("content-length") or 0) if r.method == b"HEAD" else 0
                assert len(rest) == extra, f"more after the refusal: {rest!r}\n{desc}"
                refused, ended = i, i
                outcome = f"refused {resp.status}"
                break
        else:
            assert sent_ok
            assert c.is_open(0.01), f"nothing may follow the last answer: {c.buf!r}\n{desc}"
    finally:
        if truncated is not None:
            _abort(c.sock)
        else:
            c.close()
    if ended < len(reqs) or refused is not None:
        time.sleep(0.03)  # a byte wrongly forwarded would have reached the upstream by now
    for rec in backend.since(mark):
        assert not rec.error, f"the strict upstream could not read what failproxy sent: " \
                              f"{rec.error}\n{rec.raw[-1500:]!r}\nstream:\n{desc}"
        tags = rec.header_all(b"x-fuzz")
        assert len(tags) == 1, (rec, desc)
        rex, _, ri = tags[0].partition(b"-")
        if rex != ex:
            continue  # a late record of an earlier example (checked there: never complete)
        i = int(ri)
        if i in forwarded:
            assert rec is forwarded[i], f"request [{i}] reached the upstream twice\n{desc}"
        elif (i == refused and reqs[i].kind in (REJECT_BODY, EITHER_BODY)) or i == truncated:
            assert not rec.complete, \
                f"request [{i}] was refused or cut short, the upstream got it whole\n{desc}"
        else:
            raise AssertionError(f"request [{i}] reached the upstream ({rec.raw[-600:]!r}); "
                                 f"it should not have\n{desc}")
    return outcome


# ---- the properties ----------------------------------------------------------------------------

OUTCOMES: Counter[str] = Counter()


@st.composite
def streams(draw: st.DrawFn, pending: frozenset[str] = frozenset(),
            force: str | None = None) -> tuple[list[GenReq], list[bytes]]:
    reqs = draw(httpgen.pipelines(next(_examples), pending, force))
    data = b"".join(r.raw if r.truncate_at is None else r.raw[: r.truncate_at] for r in reqs)
    return reqs, draw(httpgen.fragments(data))


def _refused_alone(request_line: bytes, mutation: str) -> tuple[list[GenReq], list[bytes]]:
    """A one-request stream refused with a 5xx: an explicit example, so the property reaches a
    5xx refusal whatever the examples Hypothesis draws in a given run (which ones it draws
    changed with the suite around it; this keeps the outcome check below from depending on it)."""
    tag = b"0000000-%d" % len(mutation)
    raw = request_line + b"\r\nHost: example.test\r\nX-Fuzz: " + tag + b"\r\n\r\n"
    req = GenReq(method=b"GET", target=b"/", version=b"1.1", host=b"example.test",
                 headers=[(b"X-Fuzz", b" ", tag, b"")], kind=REJECT_HEAD, mutation=mutation,
                 tag=tag, raw=raw)
    return [req], [raw]


def test_request_stream_property(strict_proxy) -> None:
    fp, backend = strict_proxy
    OUTCOMES.clear()

    @examples("stream")
    @example(_refused_alone(b"GET / HTTP/1.2", "unsupported_version"))
    @example(_refused_alone(b"CONNECT other.example:443 HTTP/1.1", "connect"))
    @given(streams(httpgen.FIXED))
    def prop(case: tuple[list[GenReq], list[bytes]]) -> None:
        reqs, frags = case
        OUTCOMES[run_stream(fp, backend, reqs, frags)] += 1
        OUTCOMES.update(f"kind {r.kind}" for r in reqs)
        OUTCOMES.update(f"mutation {r.mutation}" for r in reqs if r.mutation)

    prop()
    print(dict(sorted(OUTCOMES.items())))
    # the grammar reaches every outcome (a generator that only makes valid requests, or only
    # garbage, would pass vacuously)
    assert OUTCOMES["forwarded"] and OUTCOMES["closed"] and OUTCOMES["truncated"], OUTCOMES
    assert sum(v for k, v in OUTCOMES.items() if k.startswith("refused 4")), OUTCOMES
    assert sum(v for k, v in OUTCOMES.items() if k.startswith("refused 5")), OUTCOMES
    mutations = [k for k in OUTCOMES if k.startswith("mutation ")]
    assert len(mutations) >= len(httpgen.HEAD_MUTATIONS + httpgen.BODY_MUTATIONS) // 2, mutations


@pytest.mark.parametrize("shape", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=httpgen.PENDING[name])
                 if name in httpgen.PENDING else ())
    for name in httpgen.SHAPES])
def test_pending_shape(strict_proxy, shape: str) -> None:
    """One shape in every stream: a PENDING one fails (strict xfail) until failproxy does what
    SPEC section 8 says, then the mark comes off and the shape joins the main property."""
    fp, backend = strict_proxy

    @examples("pending", phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)
    @given(streams(frozenset({shape}), force=shape))
    def prop(case: tuple[list[GenReq], list[bytes]]) -> None:
        reqs, frags = case
        run_stream(fp, backend, reqs, frags)

    prop()


# ---- the state machine --------------------------------------------------------------------------

IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE"}
# A 502/504 to HEAD carries a body (test_head_error_answer_has_no_body): until that is fixed
# the machine sends HEAD no fault that must end in an error, and drops a connection after an
# error answer to HEAD instead of reading on (the body would be taken for the next answer).
HEAD_ERROR_HAS_BODY = False
# Closing a client connection with pipelined bytes still unread makes the kernel reset it, and
# what was not yet delivered of earlier, complete answers is lost
# (test_close_with_unread_pipelined_input_keeps_earlier_answers): until that is fixed an answer
# may be cut short when a later request on its connection was cut (and so closed it).
CLOSE_RESETS_WITH_UNREAD_INPUT = False
FAULTS = ["", "", "", "", "", "", "slow", "reset-first", "close-first", "reset", "cut",
          "cut-chunked"]


def payload(rid: str, size: int) -> bytes:
    unit = hashlib.sha256(rid.encode()).hexdigest().encode()
    return (unit * (size // len(unit) + 1))[:size]


class FaultyApp:
    """The backends' handler: answers `payload(id, size)` or does what X-Fault says."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()

    def __call__(self, req: Any) -> Reply | str:
        rid = req.header("x-id") or "?"
        fault = req.header("x-fault") or ""
        size = int(req.header("x-size") or "0")
        with self.lock:
            first = self.seen[rid] == 0
            self.seen[rid] += 1
        body = payload(rid, size)
        headers = [("X-Id", rid)]
        if fault == "reset" or (fault == "reset-first" and first):
            return RESET
        if fault == "close-first" and first:
            return CLOSE
        if fault == "cut":
            return Reply(200, headers=headers, body=body[: size // 2], content_length=size,
                         then=RESET)
        if fault == "cut-chunked":
            return Reply(200, headers=headers, body=[body[: size // 2]], chunked=True, then=RESET)
        if req.body_len != int(req.header("x-body") or "0"):
            return Reply(400, headers=headers, body=b"body length differs")
        return Reply(200, headers=headers, body=body, delay=0.05 if fault == "slow" else 0.0,
                     chunked=size % 2 == 1)


@dataclass
class Sent:
    rid: str
    method: str
    fault: str
    size: int
    disturbed: bool = False


@dataclass
class Conn:
    raw: RawConn
    pending: list[Sent] = field(default_factory=list)
    dead: bool = False


class World:
    """The module's proxy and backends for the state machine."""

    def __init__(self, d: Path) -> None:
        self.app = FaultyApp()
        self.a = HTTPBackend("a", handler=self.app)
        self.b = HTTPBackend("b", handler=self.app)
        self.fp = Proxy(d, [self.a.address, {"address": self.b.address, "backup": True}],
                        upstream={"read_timeout": 3.0}, log={"level": "info"})
        self.fp.start()
        self.ids = itertools.count(1)
        self.outcomes: Counter[str] = Counter()

    def stop(self) -> None:
        self.fp.stop()
        self.a.stop()
        self.b.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("stateful"))
    yield w
    try:
        assert w.fp.alive()
        assert not w.fp.log.find("internal_error"), w.fp.log.find("internal_error")[:3]
    finally:
        w.stop()


def _request_bytes(s: Sent, body_kind: str, body: bytes) -> bytes:
    head = (f"{s.method} /s/{s.rid} HTTP/1.1\r\nHost: fuzz.test\r\nX-Id: {s.rid}\r\n"
            f"X-Size: {s.size}\r\nX-Body: {len(body)}\r\n")
    if s.fault:
        head += f"X-Fault: {s.fault}\r\n"
    if body_kind == "chunked":
        mid = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:mid], body[mid:]) if p)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed + b"0\r\n\r\n"
    if body_kind == "cl" or s.method in ("POST", "PUT"):
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return (head + "\r\n").encode()


class Pipelines(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.conns: list[Conn] = []

    @initialize()
    def start(self) -> None:
        self.posts_before = self._post_counts()

    def _post_counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for b in (self.world.a, self.world.b):
            for r in b.seen():
                if r.method == "POST":
                    out[r.header("x-id") or "?"] += 1
        return out

    def _conn(self, i: int) -> Conn:
        live = [c for c in self.conns if not c.dead]
        if i < len(live):
            return live[i]
        c = Conn(RawConn(self.world.fp.port, timeout=5))
        c.raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns.append(c)
        return c

    @rule(i=st.integers(0, 3), reqs=st.lists(st.tuples(
        st.sampled_from(["GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE"]),
        st.sampled_from(FAULTS), st.sampled_from([0, 10, 1000, 70000]),
        st.sampled_from(["none", "cl", "chunked"]), st.sampled_from([0, 5, 3000])),
        min_size=1, max_size=3), split=st.booleans())
    def send(self, i: int, reqs: list[tuple[str, str, int, str, int]], split: bool) -> None:
        c = self._conn(i)
        data = b""
        for method, fault, size, body_kind, body_len in reqs:
            if fault.startswith("cut") and (method == "HEAD" or size < 100):
                fault = ""
            if method == "HEAD" and fault == "reset" and HEAD_ERROR_HAS_BODY:
                fault = "reset-first"
            s = Sent(str(next(self.world.ids)), method, fault, size)
            data += _request_bytes(s, body_kind, os.urandom(body_len) if body_kind != "none"
                                   or method in ("POST", "PUT") else b"")
            c.pending.append(s)
        parts = [data[: len(data) // 2], data[len(data) // 2:]] if split else [data]
        for p in parts:
            try:
                c.raw.send(p)
            except OSError:
                break
            time.sleep(0.001)

    # No preconditions: which connections are still open depends on what failproxy did, and
    # Hypothesis needs the same rules on offer when it replays the same choices.
    @rule(i=st.integers(0, 3))
    def read(self, i: int) -> None:
        live = [c for c in self.conns if c.pending and not c.dead]
        if live:
            self._read_all(live[i % len(live)])

    def _read_all(self, c: Conn) -> None:
        out = self.world.outcomes
        while c.pending:
            s = c.pending[0]
            try:
                resp = c.raw.read_response(s.method, timeout=8)
            except IncompleteResponse as e:
                closing = [k for k, p in enumerate(c.pending)
                           if p.fault.startswith("cut") or p.disturbed]
                explained = bool(closing) and (closing[0] == 0 or CLOSE_RESETS_WITH_UNREAD_INPUT)
                assert explained, f"{s}: answer cut short ({e}) though nothing cut it"
                assert c.raw.eof, f"{s}: a cut answer must close the connection"
                out["cut"] += 1
                self._gone(c, after=closing[0])
                return
            c.pending.pop(0)
            rid = resp.header("x-id")
            if rid is not None:
                assert rid == s.rid, f"answer for {rid} where {s.rid} was due: out of order"
                assert resp.status == 200, (s, resp.status, resp.body[:200])
                assert not s.fault.startswith("cut") or s.disturbed, \
                    f"{s}: a cut answer was presented as complete"
                assert s.fault != "reset" or s.disturbed, f"{s} answered through resets"
                if s.method == "POST" and (s.fault in ("reset-first", "close-first")):
                    raise AssertionError(f"{s}: a POST that reached an upstream was replayed")
                want = b"" if s.method == "HEAD" else payload(s.rid, s.size)
                assert resp.body == want, f"{s}: body differs ({len(resp.body)} bytes)"
                out["ok"] += 1
            else:
                assert resp.status in (502, 504), (s, resp.status, resp.body)
                allowed = s.fault == "reset" or s.disturbed or (
                    s.method not in IDEMPOTENT and s.fault in ("reset-first", "close-first"))
                assert allowed, f"{s}: {resp.status} though a retry would have served it"
                out[f"error {resp.status}"] += 1
                head_body = s.method == "HEAD" and HEAD_ERROR_HAS_BODY
                if "close" in resp.connection_tokens or head_body:
                    self._gone(c, after=None)
                    return
        assert not c.raw.buf, f"bytes after the last answer: {c.raw.buf[:200]!r} (answered twice?)"

    def _gone(self, c: Conn, after: int | None) -> None:
        """The proxy closed the connection after the cut answer to pending[after]: what was
        pipelined behind that never reaches a backend."""
        c.dead = True
        c.raw.close()
        if after is not None:
            never = {s.rid for s in c.pending[after + 1:]}
            time.sleep(0.02)
            reached = {r.header("x-id") for b in (self.world.a, self.world.b) for r in b.seen()}
            assert not never & reached, f"requests pipelined after a cut answer were forwarded: " \
                                        f"{never & reached}"
        c.pending.clear()

    @rule(i=st.integers(0, 3), wait=st.sampled_from([0.0, 0.0, 0.005, 0.03]))
    def client_reset(self, i: int, wait: float) -> None:
        live = [c for c in self.conns if not c.dead]
        if not live:
            return
        c = live[i % len(live)]
        time.sleep(wait)
        _abort(c.raw.sock)
        c.dead = True
        self.world.outcomes["client reset"] += 1

    @rule(which=st.sampled_from(["a", "b"]))
    def upstream_drop_all(self, which: str) -> None:
        """The backend closes every connection it has, busy or pooled."""
        for c in self.conns:
            for s in c.pending:
                s.disturbed = True
        getattr(self.world, which).close_idle()
        time.sleep(0.02)  # the FINs reach failproxy: the pool must not hand those out again
        self.world.outcomes["upstream drop"] += 1

    @invariant()
    def no_post_twice(self) -> None:
        counts = self._post_counts()
        twice = {k: v for k, v in counts.items() if v > 1}
        assert not twice, f"POSTs that reached the backends more than once: {twice}"

    def teardown(self) -> None:
        for c in self.conns:
            if not c.dead:
                self._read_all(c)
                c.raw.close()
        self.no_post_twice()


def test_stateful_pipelines_and_resets(world) -> None:
    Pipelines.world = world
    world.outcomes.clear()
    run_state_machine_as_test(Pipelines, settings=examples("stateful",
                                                            stateful_step_count=12))
    print(dict(world.outcomes))
    for k in ("ok", "cut", "error 502", "client reset", "upstream drop"):
        assert world.outcomes[k], f"no {k!r} outcome: {world.outcomes}"


def test_head_error_answer_has_no_body(proxy, backend) -> None:
    """Found by the state machine: RFC 9110 9.3.2, no content in an answer to HEAD."""
    fp = proxy([backend("gone", handler=lambda r: RESET)])
    with fp.connect(timeout=3) as c:
        c.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /g HTTP/1.1\r\nHost: t\r\n\r\n")
        head = c.read_response("HEAD")
        assert head.status == 502
        assert "close" not in head.connection_tokens, "the request was read whole: stays open"
        assert c.buf == b"" or c.buf.startswith(b"HTTP/1.1 "), f"a body follows: {c.buf!r}"
        assert c.read_response().status == 502


def test_close_with_unread_pipelined_input_keeps_earlier_answers(proxy, backend) -> None:
    """Found by the state machine. A request with `Connection: close` behind a large answer, and
    one more request sent while failproxy is not reading (it answers in order): after the
    second answer failproxy closes with that request unread, the kernel sends RST instead of
    FIN and drops what the client had not yet received. nginx avoids it with a lingering close
    (shut down writing, read and discard input for a while, then close)."""
    big = os.urandom(300_000)
    app = backend("app", handler=lambda r: Reply(200, body=big if r.target == "/big" else b"x"))
    fp = proxy([app])
    with fp.connect(timeout=10, rcvbuf=65536) as c:
        c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)
        c.send(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        first = c.read_response(timeout=5)
        assert first.body == big
        second = c.read_response(timeout=5)
        assert second.body == b"x" and "close" in second.connection_tokens
        c.wait_closed(3)
    assert [r.target for r in app.requests] == ["/big", "/x"]
