"""The load table the overflow policy reads (loadshare.py): what one worker publishes, its
siblings see at their next loop turn; a worker that is gone counts for nothing. Real shared
memory across a real fork."""

from __future__ import annotations

import asyncio
import os

from failproxy.routing.loadshare import LoadShare, LoadView


def test_siblings_see_each_others_counts_a_turn_later() -> None:
    share = LoadShare(3)
    a_col, b_col = share.claim(), share.claim()
    assert a_col != b_col

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = LoadView(share, a_col, loop), LoadView(share, b_col, loop)
        a.publish(1, 2)
        a.publish(2, 1)
        assert b.others(1) == 0, "not before a's turn ends"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (b.others(0), b.others(1), b.others(2)) == (0, 2, 1)
        assert a.others(1) == 0, "a's own counts are not 'others' to a"
        a.publish(1, 0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert b.others(1) == 0
        assert b.others(7) == 0, "a slot past the table (a peer added later) counts nothing"

    asyncio.run(main())
    share.close()


def test_a_forked_worker_publishes_and_its_column_is_cleared_when_it_is_gone() -> None:
    share = LoadShare(2)
    parent_col, child_col = share.claim(), share.claim()
    pid = os.fork()
    if pid == 0:  # the worker: publish, let the turn end, exit
        code = 1
        try:
            async def child() -> None:
                view = LoadView(share, child_col, asyncio.get_running_loop())
                view.publish(0, 5)
                await asyncio.sleep(0)

            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0

    async def main() -> None:
        view = LoadView(share, parent_col, asyncio.get_running_loop())
        assert view.others(0) == 5, "the child's count, through shared memory"
        share.release(child_col)  # what the master does when it reaps that worker
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert view.others(0) == 0

    asyncio.run(main())
    assert share.claim() == child_col, "a released column is handed out again"
    share.close()
