"""The overflow policy's local books (routing/localbooks.py): both twins give the same answers
to the same calls, the compiled run checks both, the pure run the pure one. What the answers
mean for where a request goes is tests/test_room.py's; here, the books' own rules: the order
of entries, a key sent again, the unsure ones, the run of fast answers, a key that changed
hands, and the references the C array holds."""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable
from typing import Any

import pytest

import failproxy
from failproxy.routing import localbooks
from failproxy.routing.localbooks import LocalBooks, LocalBooksPy
from failproxy.routing.routes import KNOWN_FAST, KNOWN_SLOW, UNKNOWN

try:
    from failproxy.routing._localbooks import (  # type: ignore[import-not-found]
        LocalBooks as LocalBooksC,
    )
except ImportError:
    LocalBooksC = None

PURE = failproxy.BUILD.startswith("pure")
TWINS: list[Callable[..., Any]] = [LocalBooksPy] + (
    [LocalBooksC] if LocalBooksC and not PURE else [])
SLOW = 0.05  # slow_after


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE:
        assert localbooks.BUILT == "pure" and LocalBooks is LocalBooksPy
    else:
        assert localbooks.BUILT == "cython" and LocalBooks is LocalBooksC


@pytest.fixture(params=TWINS, ids=[t.__module__ for t in TWINS])
def books(request: pytest.FixtureRequest) -> Any:
    return request.param(SLOW)


def test_fast_answers_make_a_fast_box_and_a_slow_one_unmakes_it(books: Any) -> None:
    keys = [object() for _ in range(5)]
    assert not books.fast_box(10.0, 3, 1.0), "no evidence yet"
    for i, key in enumerate(keys[:3]):
        books.sent(key, 10.0 + i, KNOWN_FAST, 1.0)
        books.answered(key, 10.0 + i + 0.01)
    assert books.fast_run == 3
    assert books.fast_box(12.5, 3, 1.0) is True
    assert not books.fast_box(12.5, 4, 1.0), "more evidence asked for"
    books.sent(keys[3], 20.0, KNOWN_FAST, 1.0)
    books.answered(keys[3], 20.0 + 2 * SLOW)  # slower than slow_after
    assert (books.fast_run, books.slow_at) == (0, 20.0 + 2 * SLOW)
    assert not books.fast_box(20.5, 0, 1.0), "a slow answer within `memory`"
    assert books.fast_box(21.5, 0, 1.0)
    assert len(books) == 0


def test_the_oldest_in_service_too_long_makes_the_box_slow(books: Any) -> None:
    old, new = object(), object()
    books.sent(old, 5.0, KNOWN_FAST, 1.0)
    books.sent(new, 5.58, KNOWN_FAST, 1.0)
    assert books.fast_box(5.0 + SLOW / 2, 0, 0.0)
    assert not books.fast_box(5.0 + 2 * SLOW, 0, 0.0), "the oldest has been there too long"
    assert books.slow_at == 5.0 + 2 * SLOW and books.fast_run == 0
    books.answered(old, 5.6)  # its answer, slow: the newer one is the oldest now
    assert books.slow_at == 5.6
    assert books.fast_box(5.61, 0, 0.0), "the newer one is within slow_after"
    assert not books.fast_box(5.7, 0, 0.0), "... and then no longer"
    books.answered(new, 5.7)
    assert len(books) == 0


def test_a_route_not_known_fast_keeps_the_box_from_queueing_until_it_ends(books: Any) -> None:
    slow, unknown, listed = object(), object(), object()
    books.sent(slow, 1.0, KNOWN_SLOW, 500.0)
    assert not books.fast_box(1.0, 0, 0.0)
    books.ended(slow, 1.0 + SLOW / 2)  # no answer, quick: not slow, and not counted fast
    assert books.fast_run == 0
    assert books.fast_box(1.1, 0, 0.0)
    books.sent(unknown, 2.0, UNKNOWN, 0.0)
    books.sent(listed, 2.0, KNOWN_SLOW, 0.0)  # listed slow, not timed: may take any time
    assert not books.fast_box(2.0, 0, 0.0)
    books.answered(unknown, 2.01)
    assert not books.fast_box(2.01, 0, 0.0), "one is still unsure"
    books.ended(listed, 2.0 + 2 * SLOW)  # no answer, and slow: the box is slow
    assert books.slow_at == 2.0 + 2 * SLOW
    assert books.fast_box(3.0, 0, 0.5)


def test_a_probe_may_go_only_while_every_time_in_service_is_known(books: Any) -> None:
    a, b = object(), object()
    assert books.may_probe(0.0), "nothing in service"
    books.sent(a, 1.0, KNOWN_FAST, 100.0)  # expected to end at 1.1
    assert books.may_probe(1.05)
    # overdue: past its end by its own time and slow_after more
    assert books.may_probe(1.1 + 0.1 + SLOW - 0.001)
    assert not books.may_probe(1.1 + 0.1 + SLOW + 0.001)
    books.sent(b, 1.0, UNKNOWN, 0.0)
    assert not books.may_probe(1.05), "a route not learned yet: its end is unknown"
    books.answered(b, 1.06)
    books.sent(b, 1.07, KNOWN_SLOW, 0.0)
    assert not books.may_probe(1.08), "listed slow but never timed"
    books.sent(b, 1.07, KNOWN_SLOW, 300.0)  # sent again: timed now, in its old place
    assert books.may_probe(1.08)
    assert len(books) == 2


def test_slow_after_zero_never_makes_a_fast_box(books: Any) -> None:
    books.slow_after = 0.0
    key = object()
    books.sent(key, 1.0, KNOWN_FAST, 1.0)
    books.answered(key, 1.0)
    assert books.fast_run == 1
    assert not books.fast_box(100.0, 0, 0.0)


def test_a_key_sent_again_keeps_its_place_and_an_unknown_key_changes_nothing(books: Any) -> None:
    first, second = object(), object()
    books.sent(first, 1.0, KNOWN_FAST, 1.0)
    books.sent(second, 1.5, KNOWN_FAST, 1.0)
    books.sent(first, 2.0, KNOWN_FAST, 1.0)  # the same key again: the entry is updated
    assert len(books) == 2
    # the oldest is still `first` (now sent at 2.0): in service 0.01, not too long
    assert books.fast_box(2.0 + 0.01, 0, 0.0)
    books.answered(object(), 3.0)
    books.ended(object(), 3.0)
    assert (len(books), books.fast_run) == (2, 0)
    books.answered(first, 2.01)
    books.answered(first, 2.02)  # twice: the second finds nothing
    assert (len(books), books.fast_run) == (1, 1)


def test_rekey_moves_an_entry_in_place(books: Any) -> None:
    core, exchange, other = object(), object(), object()
    books.sent(core, 1.0, UNKNOWN, 0.0)
    books.sent(other, 1.2, KNOWN_FAST, 1.0)
    books.rekey(core, exchange)
    books.rekey(object(), object())  # not in the books: nothing
    books.answered(core, 1.3)  # the old key is gone
    assert len(books) == 2 and books.fast_run == 0
    assert not books.fast_box(1.3, 0, 0.0), "the unsure entry moved with its key"
    books.answered(other, 1.21)
    assert books.fast_run == 1
    # the one that changed hands: in service since 1.0, so slow by 1.3
    books.answered(exchange, 1.3)
    assert (books.slow_at, books.fast_run, len(books)) == (1.3, 0, 0)
    assert books.fast_box(1.3 + 1.0, 0, 0.5), "nothing unsure left"


def test_many_in_service_and_out_of_order(books: Any) -> None:
    keys = [object() for _ in range(100)]
    for i, key in enumerate(keys):
        books.sent(key, float(i), KNOWN_FAST, 1.0)
    assert len(books) == 100
    for key in keys[1::2]:
        books.answered(key, 1000.0)
    assert len(books) == 50 and books.fast_run == 0  # every one of them slow
    for i, key in enumerate(keys[0::2]):
        books.ended(key, 2.0 * i + 0.001)
    assert len(books) == 0
    assert math.isclose(books.slow_at, 1000.0)


@pytest.mark.skipif(LocalBooksC is None or PURE, reason="the C array's references")
def test_the_c_array_holds_its_keys_while_they_are_in_it() -> None:
    books = LocalBooksC(SLOW)
    key = object()
    base = sys.getrefcount(key)
    books.sent(key, 1.0, KNOWN_FAST, 1.0)
    books.sent(key, 1.0, KNOWN_FAST, 1.0)
    assert sys.getrefcount(key) == base + 1
    new = object()
    books.rekey(key, new)
    assert sys.getrefcount(key) == base
    books.ended(new, 1.0)
    assert sys.getrefcount(new) == base
    held = object()
    books.sent(held, 1.0, KNOWN_FAST, 1.0)
    del books
    gc.collect()
    assert sys.getrefcount(held) == base, "let go with the books"
