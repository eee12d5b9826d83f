"""The load table the overflow policy reads (loadshare.py): what one worker publishes, its
siblings see by the end of its loop turn (the pure twin, which gathers per turn) or at once (the
Cython twin, C stores); a worker that is gone counts for nothing. Real shared memory across a
real fork. The compiled run checks both twins, the pure run the pure one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

import failproxy
from failproxy.routing import loadshare
from failproxy.routing.loadshare import LoadShare, LoadView, LoadViewPy

try:
    from failproxy.routing._loadview import LoadView as LoadViewC  # type: ignore[import-not-found]
except ImportError:
    LoadViewC = None

PURE = failproxy.BUILD.startswith("pure")
TWINS: list[Callable[..., Any]] = [LoadViewPy] + ([LoadViewC] if LoadViewC and not PURE else [])


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE:
        assert loadshare.BUILT == "pure" and LoadView is LoadViewPy
    else:
        assert loadshare.BUILT == "cython" and LoadView is LoadViewC


@pytest.mark.parametrize("twin", TWINS, ids=[t.__module__ for t in TWINS])
def test_siblings_see_each_others_counts_by_the_turns_end(twin: Callable[..., Any]) -> None:
    share = LoadShare(3)
    a_col, b_col = share.claim(), share.claim()
    assert a_col != b_col
    at_once = twin is not LoadViewPy

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = twin(share, a_col, loop), twin(share, b_col, loop)
        a.publish(1, 2)
        a.publish(2, 1)
        assert b.others(1) == (2 if at_once else 0), "the pure twin: not before a's turn ends"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (b.others(0), b.others(1), b.others(2)) == (0, 2, 1)
        assert a.others(1) == 0, "a's own counts are not 'others' to a"
        a.publish(1, 0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert b.others(1) == 0
        assert b.others(7) == 0, "a slot past the table (a peer added later) counts nothing"
        a.publish(7, 3)  # ... and is not written
        c = twin(share, share.claim(), loop)
        c.publish(2, 4)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (b.others(2), a.others(2), c.others(2)) == (5, 4, 1), "every sibling summed"

    asyncio.run(main())
    share.close()


@pytest.mark.parametrize("twin", TWINS, ids=[t.__module__ for t in TWINS])
def test_others_of_two_slots_is_their_sum(twin: Callable[..., Any]) -> None:
    """The overflow policy counts a box's UNIX socket and own TCP port together: one call."""
    share = LoadShare(3)
    a_col, b_col, c_col = share.claim(), share.claim(), share.claim()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b, c = (twin(share, col, loop) for col in (a_col, b_col, c_col))
        b.publish(0, 2)
        b.publish(2, 3)
        c.publish(2, 4)
        a.publish(0, 9)  # a's own: never in a's others
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert a.others_of(0, 2) == 2 + 3 + 4 == a.others(0) + a.others(2)
        assert a.others_of(0, -1) == a.others(0) == 2
        assert a.others_of(1, 2) == 7
        assert a.others_of(0, 7) == 2, "a slot past the table counts nothing"
        assert b.others_of(0, 2) == 9 + 4

    asyncio.run(main())
    share.close()


@pytest.mark.skipif(LoadViewC is None or PURE, reason="the Cython twin is not built")
def test_the_cython_twin_refuses_a_column_outside_the_table() -> None:
    share = LoadShare(2)
    with pytest.raises(ValueError):
        LoadViewC(share, loadshare.COLUMNS, None)
    with pytest.raises(ValueError):
        LoadViewC(share, -1, None)
    share.close()


@pytest.mark.parametrize("twin", TWINS, ids=[t.__module__ for t in TWINS])
def test_a_forked_worker_publishes_and_its_column_is_cleared_when_it_is_gone(
    twin: Callable[..., Any],
) -> None:
    share = LoadShare(2)
    parent_col, child_col = share.claim(), share.claim()
    pid = os.fork()
    if pid == 0:  # the worker: publish, let the turn end, exit
        code = 1
        try:
            async def child() -> None:
                view = twin(share, child_col, asyncio.get_running_loop())
                view.publish(0, 5)
                await asyncio.sleep(0)

            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0

    async def main() -> None:
        view = twin(share, parent_col, asyncio.get_running_loop())
        assert view.others(0) == 5, "the child's count, through shared memory"
        share.release(child_col)  # what the master does when it reaps that worker
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert view.others(0) == 0

    asyncio.run(main())
    assert share.claim() == child_col, "a released column is handed out again"
    share.close()
