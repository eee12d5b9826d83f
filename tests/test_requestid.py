"""WorkerContext.new_request_id: 32 hex digits, a per-process prefix and a counter, the same
ids as formatting the whole counter each time (the table of last digits and the head made once
per 4096 ids must not skip, repeat or misplace a digit at a block's edge)."""

from __future__ import annotations

import asyncio

from failproxy import config
from failproxy.proxy.context import WorkerContext
from failproxy.telemetry.metrics import WorkerMetrics


def test_ids_across_block_edges_are_prefix_and_counter() -> None:
    async def main() -> None:
        cfg = config.loads('[[upstream.server]]\naddress = "unix:/nonexistent/a.sock"\n')
        ctx = WorkerContext(cfg, WorkerMetrics(1), asyncio.get_running_loop())
        prefix = ctx.new_request_id()[:16]
        first = int(ctx.new_request_id()[16:], 16)
        assert first == (1 << 60) + 2, "the counter starts at 2**60"
        seen = set()
        for n in range(first + 1, first + 3 * 4096 + 10):
            rid = ctx.new_request_id()
            assert rid == prefix + f"{n:016x}", n
            seen.add(rid)
        assert len(seen) == 3 * 4096 + 9

    asyncio.run(main())
