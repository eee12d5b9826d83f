"""Backups from DNS and this box's own address, kept current by the master.

The master runs one `Discovery` per config generation on its event loop: every
`[[upstream.peers]]` entry is resolved (resolver.py: A and AAAA, no thread) when the proxy
starts and every `resolve_interval` after; the addresses, sorted, become backups `IP:port` after
the listed ones. This box's own address among all the backups is found from the kernel's
interface addresses (netaddrs.py) unless `upstream.self` names it. The result is published to
the workers (peertable.py), each address in a metric slot of its own (metrics.py): a slot keeps
its address while the address stays, and is given to a new address only once no never-used slot
is left (then the one freed longest ago), so the counters of an address that left are still its
own until the master folds them away (`on_reassign`).

A lookup that fails, or answers no address at all, keeps the last good list (`resolve_failed`):
DNS that hiccups never empties the backups. Changes are logged as `peers_changed` (`added`,
`removed`); a change of the address taken as self as `self_detected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from failproxy.config import Address, Config, PeersConfig, Upstream, parse_address
from failproxy.discovery import netaddrs, resolver
from failproxy.discovery.peertable import PeerTable, peer_upstream
from failproxy.routing.loadshare import LoadShare

# Failed lookups per name since this master started, for /metrics (failproxy_dns_failures_total):
# kept here, not in a Discovery, which a reload replaces.
FAILURES: Counter[str] = Counter()


@dataclass(frozen=True, slots=True)
class SelfChoice:
    """The address taken as this box's own, and why (as `failproxy check` prints it)."""

    address: Address | None
    reason: str
    detected: bool  # found from the interfaces (False: set in upstream.self, or none)


def find_self(backups: Sequence[Address], local: dict[str, str] | None,
              local_error: str = "") -> SelfChoice:
    """The first backup whose host is one of this box's own addresses (`local`: address ->
    interface name, loopback left out: see netaddrs). Hosts given by name are not compared."""
    if local is None:
        return SelfChoice(None, f"no self: the interface addresses cannot be read ({local_error})",
                          False)
    mine = [b for b in backups if b.host in local]
    if not mine:
        return SelfChoice(None, "no self: no backup address is on this box's interfaces", False)
    chosen = mine[0]
    reason = f"{chosen.host} is on interface {local[chosen.host]}"
    others = [b.text for b in mine[1:]]
    if others:
        reason += f"; also on this box, not taken as self: {', '.join(others)}"
    return SelfChoice(chosen, reason, True)


def window(addresses: Sequence[str], own: str | None, size: int) -> list[str]:
    """At most `size` of a sorted address list: this box's own and the ones that follow it
    around the ring (those it fails over to first), else the first `size`; sorted again."""
    if len(addresses) <= size:
        return list(addresses)
    if own is None or own not in addresses:
        return list(addresses[:size])
    start = addresses.index(own)
    picked = {addresses[(start + k) % len(addresses)] for k in range(size)}
    return [a for a in addresses if a in picked]


def _address(ip: str, port: int) -> Address:
    return parse_address(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")


@dataclass
class _Entry:
    """One [[upstream.peers]] entry's state."""

    index: int
    conf: PeersConfig
    first_slot: int
    resolved: list[str] | None = None  # last good answer (sorted IPs); None: never resolved
    used: list[str] = field(default_factory=list)  # address texts in use, sorted
    logged: list[str] = field(default_factory=list)  # the list the last peers_changed named
    error: str | None = None
    resolved_at: float | None = None
    failures: int = 0


class Discovery:
    """One config generation's DNS peers (see the module docstring)."""

    def __init__(self, cfg: Config, log: Any = None, previous: Discovery | None = None) -> None:
        up = cfg.upstream
        self.cfg = cfg
        self.log = log
        static = [s.address.text for s in up.servers]
        self.static_backups = [s.address for s in up.servers if s.backup]
        self.entries: list[_Entry] = []
        slot = len(static)
        for i, conf in enumerate(up.peers):
            self.entries.append(_Entry(i, conf, slot))
            slot += conf.max_peers
        self.n_slots = slot
        # slot -> the address it counts for: the current one, or the last one while it is free
        self.owners: list[str | None] = [*static, *([None] * (slot - len(static)))]
        self._freed: dict[int, float] = {}  # free slot -> when it was freed
        self._slot_of: dict[str, int] = {}
        self.table = PeerTable(max(self.n_slots, 1))
        # The generation's workers' requests in flight per slot (the overflow policy's view).
        self.load = LoadShare(max(self.n_slots, 1))
        self.self_choice = SelfChoice(up.self, "set in upstream.self", False) if up.self else (
            SelfChoice(None, "no self: not detected yet", False))
        self.rows: list[tuple[int, str, int]] = []
        self.on_reassign: Callable[[int], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if previous is not None:
            # A reload starts from the last good answers: new workers never start without them.
            known = {(e.conf.dns, e.conf.port): e for e in previous.entries}
            for entry in self.entries:
                old = known.get((entry.conf.dns, entry.conf.port))
                if old is not None:
                    entry.resolved, entry.logged = old.resolved, list(old.used)
                    entry.resolved_at, entry.error = old.resolved_at, old.error

    # -- the resolution loop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve what is not known yet (bounded by the resolver's timeouts), decide self and
        publish, before the first worker of this generation forks."""
        pending = [e for e in self.entries if e.resolved is None]
        await asyncio.gather(*(self._resolve(e) for e in pending))
        self.update()

    def run(self) -> None:
        """Resolve every entry again every `resolve_interval`, on the running loop."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(e)) for e in self.entries]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _loop(self, entry: _Entry) -> None:
        while True:
            await asyncio.sleep(entry.conf.resolve_interval)
            try:
                if await self._resolve(entry):
                    self.update()
            except Exception:  # a bug here must not end the lookups for good
                if self.log is not None:
                    self.log.exception("internal_error", dns=entry.conf.dns)

    async def _resolve(self, entry: _Entry) -> bool:
        """One lookup; True when it gave a list (changed or not). A failure keeps the last."""
        conf = entry.conf
        try:
            found = await resolver.resolve(
                conf.dns, [(a.host, a.port) for a in self.cfg.upstream.resolver],
                self.cfg.upstream.resolver_timeout)
        except resolver.DNSError as exc:
            entry.error = str(exc)
            entry.failures += 1
            FAILURES[conf.dns] += 1
            if self.log is not None:
                self.log.warning("resolve_failed", dns=conf.dns, port=conf.port, detail=str(exc),
                                 kept=list(entry.used), failures=entry.failures)
            return False
        entry.error = None
        entry.failures = 0
        entry.resolved = found
        entry.resolved_at = time.time()
        return True

    # -- deciding and publishing ------------------------------------------------------------------

    def _local(self) -> tuple[dict[str, str] | None, str]:
        try:
            return netaddrs.own_addresses(), ""
        except OSError as exc:
            return None, str(exc.strerror or exc)

    def candidates(self) -> list[tuple[_Entry, list[Address]]]:
        """Each entry's resolved addresses as backups, an address listed earlier (a listed
        server, or an earlier entry) not repeated."""
        seen = {s.address.text for s in self.cfg.upstream.servers}
        out = []
        for entry in self.entries:
            addresses = []
            for ip in sorted(entry.resolved or (), key=resolver.address_key):
                address = _address(ip, entry.conf.port)
                if address.text not in seen:
                    seen.add(address.text)
                    addresses.append(address)
            out.append((entry, addresses))
        return out

    def update(self) -> bool:
        """Decide self and each entry's list from the last answers; publish when something
        changed. True when it published."""
        candidates = self.candidates()
        old_self = self.self_choice
        if self.cfg.upstream.self is None:
            local, error = self._local()
            backups = [*self.static_backups, *(a for _, addrs in candidates for a in addrs)]
            self.self_choice = find_self(backups, local, error)
        own = self.self_choice.address
        changed = False
        for entry, addresses in candidates:
            texts = [a.text for a in addresses]
            used = window(texts, own.text if own is not None else None, entry.conf.max_peers)
            if used != entry.used:
                self._assign(entry, used)
                entry.used = used
                changed = True
        rows = [(self._slot_of[text], text, entry.index)
                for entry in self.entries for text in entry.used]
        self_text = own.text if own is not None else None
        first = self.table.generation == 0
        if not changed and not first and old_self.address == own:
            return False
        self.rows = rows
        self.table.publish(self_text, rows)
        self._log_changes(old_self, first)
        return True

    def _assign(self, entry: _Entry, used: list[str]) -> None:
        """Metric slots: kept by an address that stays; a new one takes a never-used slot of
        its entry, else the one freed longest ago (its counters are folded first)."""
        keep = set(used)
        block = range(entry.first_slot, entry.first_slot + entry.conf.max_peers)
        now = time.monotonic()
        for text in entry.used:
            if text not in keep:
                slot = self._slot_of.pop(text)
                self._freed[slot] = now
        for text in used:
            if text in self._slot_of:
                continue
            never = [s for s in block if self.owners[s] is None]
            if never:
                slot = never[0]
            else:
                slot = min((s for s in block if s in self._freed), key=self._freed.__getitem__)
                if self.on_reassign is not None:
                    self.on_reassign(slot)
            self._freed.pop(slot, None)
            self.owners[slot] = text
            self._slot_of[text] = slot

    def _log_changes(self, old_self: SelfChoice, first: bool) -> None:
        if self.log is None:
            return
        own = self.self_choice.address
        for entry in self.entries:
            if entry.used == entry.logged:
                continue
            before = set(entry.logged)
            self.log.info(
                "peers_changed", dns=entry.conf.dns, port=entry.conf.port,
                added=[a for a in entry.used if a not in before],
                removed=[a for a in entry.logged if a not in set(entry.used)],
                peers=list(entry.used), self_address=own.text if own is not None else None,
                generation=self.table.generation,
            )
            entry.logged = list(entry.used)
        if first or old_self.address != own:
            self.log.info("self_detected", address=own.text if own is not None else None,
                          reason=self.self_choice.reason, detected=self.self_choice.detected)

    # -- what the master shows --------------------------------------------------------------------

    def servers(self) -> list[tuple[Upstream, str | None]]:
        """Every server now, in config order (the listed ones, then each entry's addresses
        sorted), with the DNS name it came from (None for a listed one)."""
        out: list[tuple[Upstream, str | None]] = [(s, None) for s in self.cfg.upstream.servers]
        for entry in self.entries:
            for text in entry.used:
                out.append((peer_upstream(entry.conf, parse_address(text)), entry.conf.dns))
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Each entry's state, for /status."""
        return [
            {
                "dns": e.conf.dns,
                "port": e.conf.port,
                "addresses": list(e.used),
                "resolved": list(e.resolved or ()),
                "resolved_at": e.resolved_at,
                "error": e.error,
                "resolve_interval": e.conf.resolve_interval,
            }
            for e in self.entries
        ]

    def close(self) -> None:
        self.table.close()
        self.load.close()


async def resolve_once(cfg: Config) -> Discovery:
    """`failproxy check`: one resolution of every entry and the self decision, nothing logged."""
    discovery = Discovery(cfg)
    await discovery.start()
    return discovery
