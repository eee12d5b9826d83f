"""timer.Timer on a real uvloop loop: a deadline moved later costs no new handle, and a timer
given back by an ended connection serves the next one without ever firing for the old."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from failproxy import timer
from failproxy.timer import take_timer


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    timer._SPARE.clear()  # timers of other tests' loops
    yield lp
    timer._SPARE.clear()
    lp.close()


def _run(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_a_deadline_moved_later_fires_once_at_the_later_time(loop) -> None:
    fired: list[float] = []
    t = take_timer(loop, lambda: fired.append(loop.time()))
    start = loop.time()
    t.set(start + 0.05)
    t.set(start + 0.15)
    _run(loop, 0.1)
    assert fired == [], "fired at the first deadline after it moved"
    _run(loop, 0.15)
    # uvloop's clock counts whole milliseconds: 8739.973 - 8739.823 is 0.1499999... as floats,
    # so the check is made in the clock's own unit (fired no earlier than the later deadline).
    assert len(fired) == 1 and round((fired[0] - start) * 1000) >= 150


def test_a_timer_given_back_serves_the_next_connection_and_never_fires_for_the_old(loop) -> None:
    old: list[str] = []
    new: list[str] = []
    first = take_timer(loop, lambda: old.append("old"))
    first.set(loop.time() + 0.05)  # its handle is scheduled for 0.05 s from now
    stand_in = first.give_back()
    second = take_timer(loop, lambda: new.append("new"))
    assert second is first, "the spare timer was not reused"
    second.set(loop.time() + 0.12)  # later than the scheduled handle: no new handle
    _run(loop, 0.08)
    assert old == [] and new == [], "the handle scheduled for the old deadline fired a callback"
    _run(loop, 0.1)
    assert old == [] and new == ["new"]
    stand_in.set(loop.time() + 0.01)  # what the ended connection holds: arms nothing shared
    _run(loop, 0.03)
    assert old == [] and new == ["new"]


def test_a_given_back_timer_left_unused_fires_nothing(loop) -> None:
    calls: list[str] = []
    t = take_timer(loop, lambda: calls.append("x"))
    t.set(loop.time() + 0.02)
    t.give_back()
    _run(loop, 0.06)
    assert calls == []


def test_a_timer_of_another_loop_is_not_taken(loop) -> None:
    other = uvloop.new_event_loop()
    try:
        foreign = take_timer(other, lambda: None)
        foreign.give_back()
        mine = take_timer(loop, lambda: None)
        assert mine is not foreign
    finally:
        other.close()
