"""An open-loop HTTP client: requests leave at a fixed rate whatever the answers do.

Request i is sent at t0 + i/rate to front i mod len(fronts), on a new connection with
`Connection: close` (as clients spread by DNS round robin do). Its latency is measured from
its *scheduled* start, so a stalled server cannot slow the client down and hide its own
queueing (no coordinated omission). Every load is bounded: `duration` seconds of arrivals,
each request at most `timeout` seconds, at most `max_in_flight` requests open.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop


@dataclass(frozen=True)
class Front:
    name: str  # the host's name, as the app's X-Served-By header gives it
    host: str
    port: int
    slow_share: float  # probability that a request sent to this front asks for /slow


@dataclass
class Outcome:
    front: str
    slow: bool
    status: int  # 0 = no HTTP answer
    error: str  # "" when a response arrived
    latency_ms: float
    served_by: str


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0
    skipped: int = 0  # arrivals dropped because max_in_flight requests were open

    def summary(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.status == 200]
        errors = Counter(o.error or f"http_{o.status}" for o in self.outcomes
                         if o.status != 200)
        if self.skipped:
            errors["client_max_in_flight"] += self.skipped
        overflowed = sum(1 for o in ok if o.served_by != o.front)
        served: dict[str, Counter[str]] = {}
        for o in ok:
            served.setdefault(o.front, Counter())[o.served_by] += 1
        return {"sent": self.sent, "ok": len(ok), "errors": dict(errors),
                "error_count": sum(errors.values()), "overflowed": overflowed,
                "served_by": {k: dict(v) for k, v in served.items()}}


def run(fronts: list[Front], *, rate: float, duration: float, slow_ms: int,
        timeout: float = 15.0, max_in_flight: int = 4000, seed: int = 1) -> LoadResult:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(fronts, rate, duration, slow_ms, timeout, max_in_flight, seed))


async def _run(fronts: list[Front], rate: float, duration: float, slow_ms: int,
               timeout: float, max_in_flight: int, seed: int) -> LoadResult:
    # time.perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds
    rnd = random.Random(seed)
    result = LoadResult()
    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * duration)
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        front = fronts[i % len(fronts)]
        slow = rnd.random() < front.slow_share
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            result.skipped += 1
            continue
        path = f"/slow?ms={slow_ms}" if slow else "/fast"
        task = asyncio.create_task(_one(front, path, slow, due, timeout, result))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    for task in list(tasks):
        task.cancel()
    return result


async def _one(front: Front, path: str, slow: bool, due: float, timeout: float,
               result: LoadResult) -> None:
    """One request; latency from its scheduled start (or from when it left, if earlier)."""
    # uvloop's sleep can wake up to a millisecond early: a request that left before its due
    # time is measured from when it left, never from the future (no negative latencies).
    start = min(due, time.perf_counter())
    status, error, served_by = 0, "", ""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(front.host, front.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
                         .encode())
            data = await reader.read()
        status, served_by = _parse(data)
        if status == 0:
            error = "bad_response"
    except TimeoutError:
        error = "timeout"
    except OSError as exc:
        error = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    result.outcomes.append(Outcome(front.name, slow, status, error,
                                   (time.perf_counter() - start) * 1000, served_by))


def _parse(data: bytes) -> tuple[int, str]:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    lines = head.split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, ""
    served_by = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-served-by":
            served_by = value.strip()
    return status, served_by
