"""The /metrics figures the master reads at scrape time, never a worker on a request's path.

- The Prometheus client conventions' `process_*` metrics, for the whole process group (SPEC 7),
  read from /proc as the official client reads one process. Summed over the master and its
  live workers; CPU time also keeps what reaped workers used (their rusage from wait4), so the
  counter never goes back when a worker exits, is replaced, or a reload retires a generation.
  Resident memory summed this way counts the pages the master shares copy-on-write with each
  worker once per process (as `ps` does for each one): an upper bound, the figure to alert on.
- `failproxy_build_info`: which build serves (failproxy/_build.py, `failproxy --version`).
- What the room policy decides on (balance.py), read afresh rather than taken from a worker:
  the accept-queue depth of each unix: upstream (sock_diag, the reading the policy makes at
  most once per loop turn) and the local app server's workers free as failproxy sees them (the
  learned worker count, from the boards, less this failproxy's requests in flight to it, from
  the shared load table).
- DNS lookups that failed (discovery/watch.py, which runs in the master).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from failproxy.routing.loadshare import LoadShare
from failproxy.routing.queue_depth import QueueProbe

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcessFigures:
    cpu_seconds: float = 0.0
    resident_bytes: int = 0
    virtual_bytes: int = 0
    open_fds: int = 0
    start_time: float = 0.0  # the first pid's (the master's), seconds since the epoch
    max_fds: int = 0  # the first pid's soft limit


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def _one(pid: int) -> tuple[float, int, int, int, float] | None:
    """CPU seconds, RSS, virtual size, open descriptors and start (ticks after boot) of `pid`;
    None when it is gone. Fields as proc(5) numbers them, counted after the command's `)`,
    which may itself hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    parts = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(parts[11]) + int(parts[12])) / _TICKS  # utime, stime
    return cpu, int(parts[21]) * _PAGE, int(parts[20]), fds, int(parts[19]) / _TICKS


def process_figures(pids: Sequence[int], reaped_cpu: float) -> ProcessFigures:
    """The group's figures: `pids[0]` is the master; `reaped_cpu`: what exited workers used."""
    out = ProcessFigures(cpu_seconds=reaped_cpu)
    for i, pid in enumerate(pids):
        figures = _one(pid)
        if figures is None:
            continue
        cpu, rss, vsize, fds, started = figures
        out.cpu_seconds += cpu
        out.resident_bytes += rss
        out.virtual_bytes += vsize
        out.open_fds += fds
        if i == 0:
            out.start_time = _boot_time() + started
            out.max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return out


class QueueReader:
    """One QueueProbe per unix: upstream, kept across scrapes (each caches its listener's inode
    and its netlink socket)."""

    def __init__(self) -> None:
        self._probes: dict[str, QueueProbe] = {}

    def depths(self, addresses: Iterable[str]) -> dict[str, int]:
        """Connections waiting in each unix: address's accept queue; those that cannot be read
        (no listener, not Linux) are left out."""
        out: dict[str, int] = {}
        wanted = [a for a in addresses if a.startswith("unix:")]
        for address in wanted:
            probe = self._probes.get(address)
            if probe is None:
                probe = self._probes[address] = QueueProbe(address[len("unix:") :])
            depth = probe.depth()
            if depth is not None:
                out[address] = depth
        for gone in self._probes.keys() - set(wanted):
            del self._probes[gone]
        return out


def in_flight(tables: Iterable[tuple[LoadShare, Sequence[str | None]]], address: str) -> int:
    """This failproxy's requests awaiting `address`'s answer, every worker of every generation:
    each table with the address text of each of its slots (Discovery.owners); tables of live
    workers only, which are open (master._reap closes one after its last worker)."""
    total = 0
    for share, owners in tables:
        if address not in owners:
            continue
        slot = list(owners).index(address)
        if slot >= share.slots:
            continue
        cells = share.cells
        for column in range(int(cells[0])):
            total += int(cells[1 + column * share.slots + slot])
    return total


@dataclass
class Scrape:
    """Everything this module adds to the /metrics page."""

    version: str
    compiled: bool
    process: ProcessFigures
    queues: Mapping[str, int]
    free_workers: Mapping[str, int]  # the local unix: address -> workers free, when known
    dns_failures: Mapping[str, int]  # DNS name -> failed lookups


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(s: Scrape) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def sample(name: str, value: float, label: str = "", text: str = "") -> None:
        labels = f'{{{label}="{_escape(text)}"}}' if label else ""
        lines.append(f"{name}{labels} {value!r}")

    p = s.process
    family("process_cpu_seconds_total", "counter",
           "User and system CPU time of the master and every worker, exited ones included.")
    sample("process_cpu_seconds_total", round(p.cpu_seconds, 2))
    family("process_resident_memory_bytes", "gauge",
           "Resident memory of the master and its workers, summed (shared pages once per process).")
    sample("process_resident_memory_bytes", float(p.resident_bytes))
    family("process_virtual_memory_bytes", "gauge",
           "Virtual memory of the master and its workers, summed.")
    sample("process_virtual_memory_bytes", float(p.virtual_bytes))
    family("process_open_fds", "gauge", "Open file descriptors of the master and its workers.")
    sample("process_open_fds", float(p.open_fds))
    family("process_max_fds", "gauge", "The master's limit of open descriptors (RLIMIT_NOFILE).")
    sample("process_max_fds", float(p.max_fds))
    family("process_start_time_seconds", "gauge",
           "When the master started, in seconds since the epoch.")
    sample("process_start_time_seconds", round(p.start_time, 2))
    family("failproxy_build_info", "gauge",
           "Always 1: the version, and whether the mypyc-compiled build serves (--version).")
    lines.append(f'failproxy_build_info{{version="{_escape(s.version)}",'
                 f'compiled="{"true" if s.compiled else "false"}"}} 1')
    family("failproxy_accept_queue_depth", "gauge",
           "Connections waiting in each unix: upstream's accept queue (sock_diag, read at scrape).")
    for address, depth in s.queues.items():
        sample("failproxy_accept_queue_depth", float(depth), "upstream", address)
    family("failproxy_free_workers", "gauge",
           "The local app server's workers free as the room policy sees them: its learned worker "
           "count less this failproxy's requests in flight to it.")
    for address, free in s.free_workers.items():
        sample("failproxy_free_workers", float(free), "upstream", address)
    family("failproxy_dns_failures_total", "counter",
           "Peer DNS lookups that failed ([[upstream.peers]]); the last good list is kept.")
    for name, count in sorted(s.dns_failures.items()):
        sample("failproxy_dns_failures_total", float(count), "dns", name)
    return "\n".join(lines) + "\n"
