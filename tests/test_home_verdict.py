"""The room policy's first decision, home or away, as a pure function (balance.home_verdict):
every row is one situation, read as the policy reads it. No I/O and no clock: the accept
queue's depth is an input, UNREAD until the verdict asks for it."""

from __future__ import annotations

import itertools

import pytest

from failproxy.routing.balance import (
    AWAY_BUSY,
    AWAY_QUEUED,
    HOME,
    HOME_WAIT,
    PROBE,
    READ_QUEUE,
    UNREAD,
    home_verdict,
)

# busy, workers, slow, fast_box, may_probe, queued -> verdict
TABLE = [
    # a free worker: home, nothing else looked at (not even the queue)
    (0, 1, False, False, False, UNREAD, HOME),
    (0, 1, True, False, False, UNREAD, HOME),
    (2, 4, False, False, False, UNREAD, HOME),
    (2, 4, True, False, True, UNREAD, HOME),
    # the last free worker: the queue says whether someone else's request took it...
    (3, 4, False, False, False, UNREAD, READ_QUEUE),
    (3, 4, False, False, False, 0, HOME),
    (3, 4, False, False, False, 1, AWAY_QUEUED),
    (3, 4, True, False, False, 1, AWAY_QUEUED),
    # ... unless the box is fast (a queued connection is a worker on its way back)
    (3, 4, False, True, False, UNREAD, HOME),
    # a slow-route request never trusts a fast box: it must not queue at home
    (3, 4, True, True, False, UNREAD, READ_QUEUE),
    (3, 4, True, True, False, 2, AWAY_QUEUED),
    # every worker busy
    (4, 4, False, False, False, UNREAD, AWAY_BUSY),
    (4, 4, True, False, False, UNREAD, AWAY_BUSY),
    (4, 4, False, True, False, UNREAD, HOME_WAIT),  # fast work only: wait at home
    (4, 4, True, True, False, UNREAD, AWAY_BUSY),
    # a probe for a worker beyond W needs an empty queue, and never a slow request
    (4, 4, False, False, True, UNREAD, READ_QUEUE),
    (4, 4, False, False, True, 0, PROBE),
    (4, 4, False, False, True, 1, AWAY_BUSY),
    (4, 4, False, True, True, 1, HOME_WAIT),
    (4, 4, True, False, True, UNREAD, AWAY_BUSY),
    (1, 1, False, False, True, 0, PROBE),  # W = 1, its worker busy
    (9, 4, False, True, False, 5, HOME_WAIT),
]


@pytest.mark.parametrize(("busy", "workers", "slow", "fast_box", "may_probe", "queued",
                          "verdict"), TABLE)
def test_home_verdict(busy: int, workers: int, slow: bool, fast_box: bool, may_probe: bool,
                      queued: int, verdict: int) -> None:
    assert home_verdict(busy, workers, slow, fast_box, may_probe, queued) == verdict


def test_the_queue_is_asked_for_only_when_it_decides() -> None:
    """Over every input: READ_QUEUE only with the queue unread, a read queue never asked for
    again, and the verdict with the queue read is never READ_QUEUE; where the queue is not
    needed its value changes nothing."""
    for busy, workers, slow, fast, probe in itertools.product(range(6), range(1, 5),
                                                               (False, True), (False, True),
                                                               (False, True)):
        first = home_verdict(busy, workers, slow, fast, probe, UNREAD)
        read = [home_verdict(busy, workers, slow, fast, probe, q) for q in (0, 1, 7)]
        assert READ_QUEUE not in read
        if first != READ_QUEUE:
            assert read == [first] * 3, (busy, workers, slow, fast, probe)
        if slow:
            assert PROBE not in read and HOME_WAIT not in read and first != HOME_WAIT
