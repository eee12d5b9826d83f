"""The failover rules of failproxy.routing.policy, as tables (SPEC 3 server order, SPEC 4)."""

from __future__ import annotations

import errno

import pytest

from failproxy.config import Address, Upstream, parse_address
from failproxy.routing import policy
from failproxy.routing.policy import (
    CONNECT_REASONS,
    REASONS,
    RETRY_ON_NAMES,
    classify_connect_errno,
    errno_name,
    exhausted_status,
    expand_retry_on,
    may_retry,
    may_retry_stale,
    server_order,
    walk_limit_reached,
)


def server(address: str, backup: bool = False) -> Upstream:
    return Upstream(parse_address(address), backup=backup)


def names(order: tuple[Upstream, ...]) -> list[str]:
    return [s.address.text for s in order]


U = "unix:/tmp/app.sock"
U2 = "unix:/tmp/other.sock"
H1, H2, H3 = "127.0.1.1:9000", "127.0.1.2:9000", "127.0.1.3:9000"
RING = [server(U), server(H1, True), server(H2, True), server(H3, True)]


# --- server order --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("servers", "self_address", "want"),
    [
        # no self: primaries in listed order, then backups in listed order
        (RING, None, [U, H1, H2, H3]),
        # the ring: self goes last, the rest follow it around
        (RING, H1, [U, H2, H3, H1]),
        (RING, H2, [U, H3, H1, H2]),
        (RING, H3, [U, H1, H2, H3]),
        # primaries first wherever they are listed
        ([server(H1, True), server(U), server(H2, True), server(U2)], None, [U, U2, H1, H2]),
        ([server(H1, True), server(U), server(H2, True), server(U2)], H1, [U, U2, H2, H1]),
        # self naming no server, or a primary, leaves the order as listed
        (RING, "127.0.0.9:9000", [U, H1, H2, H3]),
        (RING, U, [U, H1, H2, H3]),
        # only backups, only primaries, one of each
        ([server(H1, True), server(H2, True)], H2, [H1, H2]),
        ([server(H1, True), server(H2, True)], H1, [H2, H1]),
        ([server(U), server(H1)], H1, [U, H1]),
        ([server(H1, True)], H1, [H1]),
        ([server(U)], None, [U]),
        ([], None, []),
    ],
)
def test_server_order(servers: list[Upstream], self_address: str | None, want: list[str]) -> None:
    self_addr = None if self_address is None else parse_address(self_address)
    order = server_order(servers, self_addr)
    assert names(order) == want
    assert isinstance(order, tuple)
    assert sorted(names(order)) == sorted(s.address.text for s in servers)  # nothing lost


def test_server_order_keeps_the_entries_themselves() -> None:
    order = server_order(RING, parse_address(H2))
    assert all(any(o is s for s in RING) for o in order)


def test_server_order_does_not_change_its_input() -> None:
    servers = list(RING)
    server_order(servers, parse_address(H1))
    assert servers == RING


def test_server_order_matches_self_by_address_not_spelling() -> None:
    servers = [server("[::1]:9001", True), server("[::1]:9002", True)]
    self_address = parse_address("[0:0::1]:9001")
    assert names(server_order(servers, self_address)) == ["[::1]:9002", "[::1]:9001"]


def test_every_host_of_a_ring_tries_itself_last_and_the_peers_in_turn() -> None:
    hosts = [f"127.0.1.{i}:9000" for i in range(1, 6)]
    servers = [server(U)] + [server(h, True) for h in hosts]
    firsts = []
    for h in hosts:
        order = names(server_order(servers, Address(h, "tcp", h.split(":")[0], 9000)))
        assert order[0] == U and order[-1] == h
        firsts.append(order[1])
    # each box spills first onto a different peer: overflow spreads around the ring
    assert sorted(firsts) == sorted(hosts)


# --- connect errno -> reason ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (errno.EAGAIN, "overloaded"),
        (errno.EWOULDBLOCK, "overloaded"),
        (errno.ECONNREFUSED, "refused"),
        (errno.ENOENT, "missing"),
        (errno.ETIMEDOUT, "connect_timeout"),
        (errno.EHOSTUNREACH, "unreachable"),
        (errno.ENETUNREACH, "unreachable"),
        (errno.EACCES, "unreachable"),
        (errno.EADDRNOTAVAIL, "unreachable"),
        (errno.ECONNRESET, "unreachable"),
        (None, "unreachable"),
        (99999, "unreachable"),
    ],
)
def test_classify_connect_errno(err: int | None, reason: str) -> None:
    assert classify_connect_errno(err) == reason
    assert reason in CONNECT_REASONS


@pytest.mark.parametrize(
    ("err", "name"),
    [
        (errno.EAGAIN, "EAGAIN"),
        (errno.ECONNREFUSED, "ECONNREFUSED"),
        (errno.ENOENT, "ENOENT"),
        (errno.ETIMEDOUT, "ETIMEDOUT"),
        (None, None),
        (99999, "99999"),
    ],
)
def test_errno_name(err: int | None, name: str | None) -> None:
    assert errno_name(err) == name


# --- the reasons and what retry_on may name ------------------------------------------------------


def test_reasons_are_the_spec_table_in_order() -> None:
    assert REASONS == (
        "overloaded",
        "refused",
        "missing",
        "connect_timeout",
        "unreachable",
        "busy",
        "queue_full",
        "reset",
        "timeout",
        "http_502",
        "http_503",
        "http_504",
        # the overflow policy's skips (SPEC 4.3 lets failproxy add reasons; README)
        "workers_busy",
        "queued",
        "held",
        "hold_timeout",
        "least_wait",
    )
    assert [policy.REASON_INDEX[r] for r in REASONS] == list(range(len(REASONS)))
    assert set(REASONS[:7]) == CONNECT_REASONS
    assert set(REASONS[7:12]) == policy.SENT_REASONS
    assert {"connect", "reset", "timeout", "http_502", "http_503", "http_504"} == RETRY_ON_NAMES
    assert policy.STATUS_REASONS == {502: "http_502", 503: "http_503", 504: "http_504"}
    assert {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"} == policy.IDEMPOTENT_METHODS
    for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE", b"POST", b"PATCH",
                   b"LOCK", b"get", b"GETS", b""):
        assert policy.idempotent(method) == (method in policy.IDEMPOTENT_METHODS), method


@pytest.mark.parametrize(
    ("retry_on", "want"),
    [
        (["connect"], CONNECT_REASONS),
        (["connect", "reset"], CONNECT_REASONS | {"reset"}),
        (["reset", "timeout"], {"reset", "timeout"}),
        (["http_502", "http_503", "http_504"], {"http_502", "http_503", "http_504"}),
        (["connect", "connect"], CONNECT_REASONS),
        ([], set()),
        (("connect", "reset", "timeout", "http_502", "http_503", "http_504"), set(REASONS[:12])),
    ],
)
def test_expand_retry_on(retry_on: list[str], want: set[str]) -> None:
    got = expand_retry_on(retry_on)
    assert got == want
    assert isinstance(got, frozenset)


# --- may a failed request move on? ---------------------------------------------------------------

DEFAULT = expand_retry_on(["connect", "reset"])
EVERYTHING = expand_retry_on(sorted(RETRY_ON_NAMES))
SENT = sorted(policy.SENT_REASONS)

# (reason, retry_on, idempotent, replayable, retry_non_idempotent) -> may move on
MAY_RETRY = [
    # connect reasons: nothing was sent, so always -- when retry_on has them
    *[((r, DEFAULT, i, p, n), True) for r in sorted(CONNECT_REASONS)
      for i in (True, False) for p in (True, False) for n in (True, False)],
    *[((r, frozenset({"reset"}), True, True, True), False) for r in sorted(CONNECT_REASONS)],
    # after sending: idempotent and the bytes still held
    *[((r, EVERYTHING, True, True, False), True) for r in SENT],
    # ... or the operator allows replays, still only with the bytes held
    *[((r, EVERYTHING, False, True, True), True) for r in SENT],
    *[((r, EVERYTHING, True, True, True), True) for r in SENT],
    # never when the body is no longer held
    *[((r, EVERYTHING, i, False, n), False) for r in SENT
      for i in (True, False) for n in (True, False)],
    # never a non-idempotent request unless allowed
    *[((r, EVERYTHING, False, True, False), False) for r in SENT],
    # never a reason retry_on leaves out
    (("timeout", DEFAULT, True, True, True), False),
    (("http_502", DEFAULT, True, True, True), False),
    (("http_503", expand_retry_on(["http_502"]), True, True, True), False),
    (("reset", expand_retry_on(["connect"]), True, True, True), False),
    (("reset", frozenset(), True, True, True), False),
    (("overloaded", frozenset(), True, True, True), False),
    (("reset", DEFAULT, True, True, False), True),
]  # fmt: skip


@pytest.mark.parametrize(("case", "want"), MAY_RETRY)
def test_may_retry(case: tuple[str, frozenset[str], bool, bool, bool], want: bool) -> None:
    reason, retry_on, idempotent, replayable, retry_non_idempotent = case
    got = may_retry(
        reason,
        retry_on=retry_on,
        idempotent=idempotent,
        replayable=replayable,
        retry_non_idempotent=retry_non_idempotent,
    )
    assert got is want


@pytest.mark.parametrize(
    ("idempotent", "replayable", "retry_non_idempotent", "want"),
    [
        (True, True, False, True),
        (True, True, True, True),
        (False, True, True, True),
        (False, True, False, False),  # a POST is never replayed, not even on a fresh connection
        (True, False, False, False),
        (True, False, True, False),
        (False, False, True, False),
        (False, False, False, False),
    ],
)
def test_may_retry_stale(
    idempotent: bool, replayable: bool, retry_non_idempotent: bool, want: bool
) -> None:
    got = may_retry_stale(
        idempotent=idempotent, replayable=replayable, retry_non_idempotent=retry_non_idempotent
    )
    assert got is want


# --- the end of the walk -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_reason", "status"),
    [
        ("connect_timeout", 504),
        ("timeout", 504),
        ("overloaded", 502),
        ("refused", 502),
        ("missing", 502),
        ("unreachable", 502),
        ("busy", 502),
        ("queue_full", 502),
        ("reset", 502),
        ("http_502", 502),
        ("http_503", 502),
        ("http_504", 502),
        (None, 502),
    ],
)
def test_exhausted_status(last_reason: str | None, status: int) -> None:
    assert exhausted_status(last_reason) == status


@pytest.mark.parametrize(
    ("attempts", "tries", "elapsed", "retry_timeout", "reached"),
    [
        # no limits: the walk ends only when the servers run out
        (1, 0, 0.0, 0.0, False),
        (100, 0, 1e6, 0.0, False),
        # tries bounds the attempts made so far
        (0, 1, 0.0, 0.0, False),
        (1, 1, 0.0, 0.0, True),
        (1, 2, 0.0, 0.0, False),
        (2, 2, 0.0, 0.0, True),
        (3, 2, 0.0, 0.0, True),
        # retry_timeout bounds the time spent
        (1, 0, 0.99, 1.0, False),
        (1, 0, 1.0, 1.0, True),
        (1, 0, 5.0, 1.0, True),
        # either limit ends it
        (1, 5, 2.0, 1.0, True),
        (5, 5, 0.5, 1.0, True),
        (2, 5, 0.5, 1.0, False),
    ],
)
def test_walk_limit_reached(
    attempts: int, tries: int, elapsed: float, retry_timeout: float, reached: bool
) -> None:
    assert walk_limit_reached(attempts, tries, elapsed, retry_timeout) is reached
