"""The master's current peer list, published to its workers through shared memory.

One table per config generation: an anonymous shared mmap the master creates before it forks
that generation's workers, so every worker (started at once, by TTIN, or replacing one that
died) finds the current list in it and serves with it from its first request. The master
resolves (discovery/watch.py) and writes; a worker reads on a self-rescheduling timer, and only when
the generation counter moved. No lock: a sequence counter, odd while the master writes, and the
generation repeated inside the payload, so a reader that raced a write sees a mismatch (or JSON
that does not parse) and simply tries again on its next tick.

A worker applies a new list between two requests (`PeerTarget.apply_peers`); nothing on the
per-request path reads this table.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from failproxy.config import Address, PeersConfig, Upstream, UpstreamConfig, parse_address

_HEADER = 16  # int64 sequence, int64 payload length
ROW_BYTES = 96  # room per published peer: [slot, "[v6]:port", entry] as JSON, with slack
POLL_INTERVAL = 1.0  # how often a worker looks at the counter (less when DNS is asked faster)


@dataclass(frozen=True, slots=True)
class Published:
    """What a worker reads: which addresses from DNS it uses, in which metric slots, and the
    address taken as this box's own."""

    generation: int
    self_address: str | None
    rows: tuple[tuple[int, str, int], ...]  # (slot, address text, [[upstream.peers]] index)


class PeerTable:
    """Written by the master only; read by any number of workers (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        self.capacity = 256 + ROW_BYTES * slots
        self._mm: mmap.mmap | None = mmap.mmap(-1, _HEADER + self.capacity)
        self._head = memoryview(self._mm)[:_HEADER].cast("q")
        self.generation = 0

    def publish(self, self_address: str | None, rows: Sequence[tuple[int, str, int]]) -> int:
        """Write a new list; returns its generation."""
        assert self._mm is not None
        generation = self.generation + 1
        data = orjson.dumps({"generation": generation, "self": self_address,
                             "rows": [list(row) for row in rows]})
        if len(data) > self.capacity:
            raise ValueError(f"peer table: {len(data)} bytes, room for {self.capacity}")
        head = self._head
        seq = head[0]
        head[0] = seq + 1  # odd: being written
        self._mm[_HEADER : _HEADER + len(data)] = data
        head[1] = len(data)
        head[0] = seq + 2
        self.generation = generation
        return generation

    def read(self, known: int = 0) -> Published | None:
        """The published list when its generation is not `known`; None when unchanged, never
        published, or caught mid-write (try again later)."""
        mm = self._mm
        if mm is None:
            return None
        head = self._head
        seq = head[0]
        if seq == 0 or seq & 1 or seq // 2 == known:
            return None
        length = head[1]
        if not 0 < length <= self.capacity:
            return None
        data = mm[_HEADER : _HEADER + length]
        if head[0] != seq:
            return None
        try:
            doc: Any = orjson.loads(data)
            generation = int(doc["generation"])
            rows = tuple((int(s), str(a), int(e)) for s, a, e in doc["rows"])
            self_address = doc["self"]
        except (ValueError, KeyError, TypeError):
            return None
        if generation != seq // 2 or not (self_address is None or isinstance(self_address, str)):
            return None
        return Published(generation, self_address, rows)

    def close(self) -> None:
        if self._mm is None:
            return
        self._head.release()
        self._mm.close()
        self._mm = None


def peer_upstream(entry: PeersConfig, address: Address) -> Upstream:
    """The `[[upstream.server]]` one resolved address of an entry stands for: a backup."""
    return Upstream(address, backup=True, fail_timeout=entry.fail_timeout,
                    max_fails=entry.max_fails, max_conns=entry.max_conns)


class PeerTarget(Protocol):
    """What takes a new list in a worker (context.WorkerContext)."""

    def apply_peers(
        self, dynamic: Sequence[tuple[int, Upstream]], self_address: Address | None
    ) -> tuple[list[str], list[str]]: ...


class PeerWatch:
    """A worker's side: look at the table now and then, apply a new list when there is one."""

    def __init__(self, table: PeerTable, upstream: UpstreamConfig, target: PeerTarget,
                 log: Any = None) -> None:
        self.table = table
        self.log = log
        self.upstream = upstream
        self.target = target
        self.generation = 0
        self.self_address: str | None = None
        intervals = [entry.resolve_interval for entry in upstream.peers]
        self.interval = min([POLL_INTERVAL, *intervals])
        self._handle: asyncio.TimerHandle | None = None

    def check(self) -> tuple[list[str], list[str]] | None:
        """Apply the published list if it is new: (added, removed) address texts, else None."""
        published = self.table.read(self.generation)
        if published is None:
            return None
        entries = self.upstream.peers
        dynamic = []
        for slot, text, entry in published.rows:
            if 0 <= entry < len(entries):
                dynamic.append((slot, peer_upstream(entries[entry], parse_address(text))))
        self_address = parse_address(published.self_address) if published.self_address else None
        self.generation = published.generation
        added, removed = self.target.apply_peers(dynamic, self_address)
        moved = published.self_address != self.self_address
        self.self_address = published.self_address
        if self.log is not None and (added or removed or moved):
            self.log.info("peers_applied", generation=published.generation, added=added,
                          removed=removed, self_address=published.self_address,
                          worker_pid=os.getpid())
        return added, removed

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check again every `interval` (only a config with [[upstream.peers]] needs it)."""
        if not self.upstream.peers:
            return

        def tick() -> None:
            self.check()
            self._handle = loop.call_later(self.interval, tick)

        self._handle = loop.call_later(self.interval, tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
