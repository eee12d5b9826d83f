"""timer.Timer: a deadline moved later costs no new handle, and a timer given back by an ended
connection serves the next one without ever firing for the old.

The timing logic runs against an injected clock (FakeLoop: time moves only when the test says
so), so no check depends on how fast a loaded machine runs. A few checks also run on a real
uvloop loop, each waiting for the callback it needs and relying only on the loop's ordering of
timers (a timer due earlier runs before a later one), never on wall-clock margins."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from failproxy.proxy import timer
from failproxy.proxy.timer import take_timer


class _Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop(asyncio.AbstractEventLoop):
    """The two calls Timer makes (time, call_at) on a clock that moves only through advance()."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.scheduled = 0  # call_at calls: each is a new loop handle
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None
                ) -> Any:
        h = _Handle(when, callback)
        self.scheduled += 1
        heapq.heappush(self._heap, (when, next(self._seq), h))
        return h

    def live_handles(self) -> int:
        return sum(1 for _, _, h in self._heap if not h.cancelled)

    def advance(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)

    def advance_to(self, end: float) -> None:
        """Moves the clock, running every handle due on the way at its own time, in order."""
        while self._heap and self._heap[0][0] <= end:
            when, _, h = heapq.heappop(self._heap)
            if h.cancelled:
                continue
            self.now = max(self.now, when)
            h.callback()
        self.now = end


@pytest.fixture(autouse=True)
def _no_spares() -> Iterator[None]:
    timer._SPARE.clear()  # timers of other tests' loops
    yield
    timer._SPARE.clear()


@pytest.fixture
def fake() -> FakeLoop:
    return FakeLoop()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def test_a_deadline_moved_later_fires_once_at_the_later_time(fake: FakeLoop) -> None:
    fired: list[float] = []
    t = take_timer(fake, lambda: fired.append(fake.time()))
    start = fake.time()
    t.set(start + 0.05)
    t.set(start + 0.15)
    assert fake.scheduled == 1, "moving the deadline later scheduled a new handle"
    fake.advance(0.1)
    assert fired == [], "fired at the first deadline after it moved"
    assert fake.scheduled == 2, "the first handle did not reschedule itself for the later deadline"
    fake.advance_to(start + 0.149)
    assert fired == [], "fired before the later deadline"
    fake.advance_to(start + 0.15)
    assert fired == [start + 0.15]
    fake.advance(10.0)
    assert fired == [start + 0.15], "fired more than once"
    assert fake.live_handles() == 0


def test_a_deadline_moved_earlier_takes_a_new_handle_and_fires_then(fake: FakeLoop) -> None:
    fired: list[float] = []
    t = take_timer(fake, lambda: fired.append(fake.time()))
    start = fake.time()
    t.set(start + 0.5)
    t.set(start + 0.1)
    assert fake.scheduled == 2 and fake.live_handles() == 1, "the later handle was not cancelled"
    fake.advance(0.1)
    assert fired == [start + 0.1]
    fake.advance(1.0)
    assert fired == [start + 0.1]


def test_a_cleared_timer_does_not_fire(fake: FakeLoop) -> None:
    fired: list[str] = []
    t = take_timer(fake, lambda: fired.append("x"))
    t.set(fake.time() + 0.1)
    t.clear()
    fake.advance(1.0)
    assert fired == []
    t.set(fake.time() + 0.1)  # armed again after its handle ran: a new handle, fires once
    fake.advance(1.0)
    assert fired == ["x"]


def test_a_timer_given_back_serves_the_next_connection_and_never_fires_for_the_old(
    fake: FakeLoop,
) -> None:
    old: list[str] = []
    new: list[float] = []
    first = take_timer(fake, lambda: old.append("old"))
    first.set(fake.time() + 0.05)  # its handle is scheduled for 0.05 s from now
    stand_in = first.give_back()
    second = take_timer(fake, lambda: new.append(fake.time()))
    assert second is first, "the spare timer was not reused"
    deadline = fake.time() + 0.12
    second.set(deadline)  # later than the scheduled handle: no new handle
    assert fake.scheduled == 1
    fake.advance(0.08)  # the old deadline passed
    assert old == [] and new == [], "the handle scheduled for the old deadline fired a callback"
    fake.advance_to(deadline)
    assert old == [] and new == [deadline]
    stand_in.set(fake.time() + 0.01)  # what the ended connection holds: arms nothing shared
    fake.advance(1.0)
    assert old == [] and new == [deadline]


def test_the_stand_in_is_made_once_per_timer_and_never_fires(fake: FakeLoop) -> None:
    calls: list[str] = []
    t = take_timer(fake, lambda: calls.append("first"))
    first_stand_in = t.give_back()
    again = take_timer(fake, lambda: calls.append("second"))
    assert again is t
    second_stand_in = again.give_back()
    assert second_stand_in is first_stand_in, "a new stand-in was made for each connection"
    assert second_stand_in is not t
    first_stand_in.set(fake.time() + 0.01)  # both ended connections hold it: it calls neither
    fake.advance(1.0)
    assert calls == []


def test_a_held_timer_calls_nothing_until_it_resumes_for_the_next_life(fake: FakeLoop) -> None:
    calls: list[str] = []
    t = take_timer(fake, lambda: calls.append("first"))
    t.set(fake.time() + 0.05)
    assert not t.held_by(fake)
    t.hold()  # upstream.open_connection keeps it with its ended connection
    assert t.held_by(fake) and not t.held_by(FakeLoop())
    fake.advance(1.0)
    assert calls == [], "a held timer fired"
    t.resume(lambda: calls.append("second"))
    assert not t.held_by(fake)
    t.set(fake.time() + 0.05)
    fake.advance(1.0)
    assert calls == ["second"]


def test_a_given_back_timer_left_unused_fires_nothing(fake: FakeLoop) -> None:
    calls: list[str] = []
    t = take_timer(fake, lambda: calls.append("x"))
    t.set(fake.time() + 0.02)
    t.give_back()
    fake.advance(1.0)
    assert calls == []
    assert fake.live_handles() == 0


def test_a_timer_of_another_loop_is_not_taken(fake: FakeLoop) -> None:
    other = FakeLoop()
    foreign = take_timer(other, lambda: None)
    foreign.set(other.time() + 1.0)
    foreign.give_back()
    mine = take_timer(fake, lambda: None)
    assert mine is not foreign
    assert other.live_handles() == 0, "the foreign timer was not closed"


# On a real uvloop loop: the same behaviour, waiting for the callback itself.


def _wait(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], deadline: float = 30.0) -> Any:
    return loop.run_until_complete(asyncio.wait_for(fut, deadline))


def test_real_loop_a_deadline_moved_later_fires_once_no_earlier(loop) -> None:
    fired: list[float] = []
    done = loop.create_future()

    def fire() -> None:
        fired.append(loop.time())
        done.set_result(None)

    t = take_timer(loop, fire)
    start = loop.time()
    t.set(start + 0.05)
    t.set(start + 0.15)
    _wait(loop, done)
    # uvloop's clock counts whole milliseconds: 8739.973 - 8739.823 is 0.1499999... as floats,
    # so the check is made in the clock's own unit (fired no earlier than the later deadline).
    assert round((fired[0] - start) * 1000) >= 150
    # A timer due after the deadline runs after any handle the timer could still hold.
    loop.run_until_complete(asyncio.sleep(0.05))
    assert len(fired) == 1


def test_real_loop_a_given_back_timer_never_fires_for_the_old(loop) -> None:
    old: list[str] = []
    new: list[float] = []
    done = loop.create_future()

    def fire_new() -> None:
        new.append(loop.time())
        done.set_result(None)

    first = take_timer(loop, lambda: old.append("old"))
    first.set(loop.time() + 0.05)
    stand_in = first.give_back()
    second = take_timer(loop, fire_new)
    assert second is first, "the spare timer was not reused"
    deadline = loop.time() + 0.12
    second.set(deadline)
    _wait(loop, done)  # the old handle (due earlier) has run by now
    assert old == [] and round((new[0] - deadline) * 1000) >= 0
    stand_in.set(loop.time() + 0.01)
    loop.run_until_complete(asyncio.sleep(0.03))  # due after the stand-in's deadline
    assert old == [] and len(new) == 1
