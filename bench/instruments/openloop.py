"""An open-loop HTTP client: requests leave on a schedule, whatever the answers do.

The schedule is made first, from a seed (`plan()`): every front gets its own Poisson stream of
arrivals (rate / number of fronts, as clients spread by DNS round robin give each box), and each
arrival is slow with the probability of its front's slow share. The same (key, seed) gives the
same schedule, so every front compared in one round gets exactly the same requests at the same
times (paired rounds); `digest()` names a schedule so that the pairing can be checked.

`run()` then sends each arrival at t0 + its offset, on a new connection with `Connection: close`
and `X-Request-Id: bench-<index>` (the proxies log it, so their logs can be joined with the
client's view). Its latency is measured from its *scheduled* start, so a stalled server cannot
slow the client down and hide its own queueing (no coordinated omission); how late the client
itself sent each request (`lag_ms`) is recorded too, so that a client that cannot keep up shows.
Every load is bounded: the schedule's length, each request at most `timeout` seconds, at most
`max_in_flight` requests open. A request that got no 200 (another status, a timeout, a
connection error, no answer at all) is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.instruments.stats import percentile


@dataclass(frozen=True)
class Front:
    name: str  # the host's name, as the app's X-Served-By header gives it
    host: str
    port: int


@dataclass(frozen=True)
class Arrival:
    index: int  # position in the schedule (sorted by `at`)
    at: float  # seconds after the start of the run
    front: int  # index into the fronts
    slow: bool


def plan(shares: Sequence[float], *, rate: float, duration: float, key: str,
         seed: int) -> list[Arrival]:
    """The arrivals of one run: a Poisson stream of rate/len(shares) per front, over
    `duration` seconds; request classes drawn with each front's slow share."""
    rnd = random.Random(f"{key}/{seed}")
    per_front = rate / len(shares)
    raw: list[tuple[float, int, bool]] = []
    for f, share in enumerate(shares):
        t = rnd.expovariate(per_front)
        while t < duration:
            raw.append((round(t, 6), f, rnd.random() < share))
            t += rnd.expovariate(per_front)
    raw.sort()
    return [Arrival(i, at, f, slow) for i, (at, f, slow) in enumerate(raw)]


def digest(schedule: Sequence[Arrival]) -> str:
    h = hashlib.sha256()
    for a in schedule:
        h.update(f"{a.at:.6f},{a.front},{int(a.slow)};".encode())
    return h.hexdigest()[:16]


@dataclass
class Outcome:
    index: int
    front: str
    slow: bool
    status: int  # 0 = no HTTP answer
    error: str  # "" when a response arrived
    latency_ms: float  # from the scheduled start
    lag_ms: float  # how late the client started the request (its own delay)
    served_by: str


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    planned: int = 0
    sent: int = 0
    skipped: int = 0  # arrivals dropped because max_in_flight requests were open
    lost: int = 0  # requests still open after timeout + 5 s (cancelled, no outcome)
    digest: str = ""
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.status == 200]
        errors = Counter(o.error or f"http_{o.status}" for o in self.outcomes
                         if o.status != 200)
        if self.skipped:
            errors["client_max_in_flight"] += self.skipped
        if self.lost:
            errors["client_lost"] += self.lost
        left = sum(1 for o in ok if o.served_by != o.front)
        served: dict[str, Counter[str]] = {}
        for o in ok:
            served.setdefault(o.front, Counter())[o.served_by] += 1
        lags = sorted(o.lag_ms for o in self.outcomes)
        return {"planned": self.planned, "sent": self.sent, "ok": len(ok),
                "errors": dict(errors), "error_count": sum(errors.values()),
                "left_box": left, "left_box_share": left / len(ok) if ok else 0.0,
                "served_by": {k: dict(v) for k, v in sorted(served.items())},
                "client_lag_p99_ms": percentile(lags, 99), "client_lag_max_ms":
                lags[-1] if lags else float("nan"), "digest": self.digest,
                "wall_s": round(self.wall_s, 2)}


def run(fronts: Sequence[Front], schedule: Sequence[Arrival], *, slow_ms: int,
        timeout: float = 15.0, max_in_flight: int = 4000) -> LoadResult:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(fronts, schedule, slow_ms, timeout, max_in_flight))


async def _run(fronts: Sequence[Front], schedule: Sequence[Arrival], slow_ms: int,
               timeout: float, max_in_flight: int) -> LoadResult:
    # time.perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds
    result = LoadResult(planned=len(schedule), digest=digest(schedule))
    tasks: set[asyncio.Task[None]] = set()
    # Route-shaped, as a real app's: slow actions on their own paths (`GET /reports/:id`),
    # fast ones on others (`GET /items/:id`), an identifier per request.
    slow_query = f"?ms={slow_ms}"
    t0 = time.perf_counter() + 0.05
    for a in schedule:
        due = t0 + a.at
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            result.skipped += 1
            continue
        path = f"/reports/{a.index}{slow_query}" if a.slow else f"/items/{a.index}"
        task = asyncio.create_task(_one(fronts[a.front], a, path, due, timeout, result))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    result.lost = len(tasks)
    for task in list(tasks):
        task.cancel()
    result.wall_s = time.perf_counter() - t0
    return result


async def _one(front: Front, a: Arrival, path: str, due: float, timeout: float,
               result: LoadResult) -> None:
    """One request; latency from its scheduled start (or from when it left, if earlier)."""
    # uvloop's sleep can wake up to a millisecond early: a request that left before its due
    # time is measured from when it left, never from the future (no negative latencies).
    now = time.perf_counter()
    start = min(due, now)
    status, error, served_by = 0, "", ""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(front.host, front.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: app\r\nX-Request-Id: bench-{a.index}"
                         "\r\nConnection: close\r\n\r\n".encode())
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
    result.outcomes.append(Outcome(a.index, front.name, a.slow, status, error,
                                   (time.perf_counter() - start) * 1000,
                                   max(0.0, (now - due) * 1000), served_by))


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
