"""The pre-fork master: binds the listeners, forks the workers, turns signals into process changes.

Structure after gunicorn's arbiter: signal handlers only queue the signal and wake the main loop
(asyncio's own self-pipe), which pops each one and awaits its `handle_<signal>` method, reaps
exited children with wait4(WNOHANG), and brings the worker set back to what it should be.
Signal meanings are unicorn's (SPEC 6), not gunicorn's: TERM/INT quick stop, QUIT graceful stop,
HUP reload, USR2 re-exec, TTIN/TTOU one worker more/fewer, USR1 reopen the log file (here, then
in every worker).

USR1 is logrotate's `postrotate` signal, sent whenever the pid file names this master, so its
default action (death) must never apply: it is blocked from the start of `serve` (before the
pid file exists) until the loop's handler is installed, stays blocked in a forked worker until
the worker's own handler is, and across the exec of a USR2 upgrade. One arriving meanwhile is
held, not lost: it is delivered once the handler is there.

The loop is a stdlib asyncio loop, never uvloop (libuv keeps process-wide signal state that a
forked worker must not share), and the admin endpoint runs on it: one thread, so no fork ever
happens while another thread could hold a lock.

Generations: each accepted reload starts one. Workers of older generations keep serving until
every worker of the newest is ready (`WorkerMetrics.ready()`, or alive `READY_FALLBACK` seconds),
then get QUIT and drain. The listening sockets are shared by all of them, so a connection queued
meanwhile is accepted by whichever worker gets to it: nothing is refused. `reloaded` is logged
once every older worker has closed its accepting sockets (it says so in its metrics slot), not
when QUIT is sent: a worker takes a loop turn to hear a signal, and a connection made in it would
meet the old configuration after the log said the new one serves.

HUP also reads the TLS certificate and key again (failproxy/tls.py): the master builds the context
before forking, so a pair that does not load fails the reload and the workers inherit exactly what
was checked.

USR2, unicorn's way: the master renames pid_file to `<pid_file>.oldbin` and fork+execs
`python -m failproxy serve CONFIG` with the listening sockets' descriptors in FAILPROXY_FD and
its own pid in FAILPROXY_OLD_MASTER. When all of the new master's workers are ready it sends
QUIT to the old master (what unicorn's documented `before_fork` hook does), which drains and
exits. If the new master dies first, the old one restores the pid file and keeps serving.

In ps and top the processes say what they are, as nginx's and unicorn's do (setproctitle):
`failproxy master CONFIG`, `failproxy master (old) CONFIG` while a USR2 successor starts, and
`failproxy worker[N] CONFIG`, N the smallest number no other worker of the generation holds,
so a replaced worker takes its predecessor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pwd
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from setproctitle import setproctitle

import failproxy
from failproxy import config as config_mod
from failproxy import tls
from failproxy.config import Config, ConfigError, Upstream
from failproxy.discovery import watch
from failproxy.discovery.peertable import PeerTable
from failproxy.discovery.watch import Discovery
from failproxy.process import listeners, scrape
from failproxy.process.admin import AdminServer
from failproxy.process.listeners import ListenError, ListenerSet
from failproxy.proxy.core import core_class
from failproxy.routing.loadshare import LoadShare
from failproxy.telemetry import logs
from failproxy.telemetry.metrics import Snapshot, Totals, WorkerMetrics, render

OLD_MASTER_ENV = "FAILPROXY_OLD_MASTER"
READY_FALLBACK = 1.0  # a worker that never calls metrics.ready() counts as serving after this
KILL_GRACE = 5.0  # SIGKILL a stopping worker this long after its own deadline
QUICK_STOP = 1.0  # SPEC: TERM ends in-flight requests after at most 1 s
HANDLED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
           signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
# Held blocked until a handler is installed (module docstring): the one signal sent to a
# worker by the master itself, and to the master by a pid file that may predate its handlers.
HELD = frozenset({signal.SIGUSR1})
# A new worker holds the stop signals too until its loop runs: a QUIT sent by the master right
# after the fork (TTOU, a reload) would otherwise be noted by uvloop and never acted upon.
WORKER_HELD = HELD | {signal.SIGQUIT, signal.SIGTERM, signal.SIGINT}
MAX_ROUTES_SHOWN = 50  # /status lists at most this many routes (SPEC 7)

WorkerMain = Callable[[Config, list[Any], WorkerMetrics, PeerTable, tuple[LoadShare, int]], int]


class StartupError(Exception):
    """The master cannot start (bind failure, unknown user, already running)."""


@dataclass(eq=False)
class WorkerProcess:
    """The master's record of one forked worker (the process itself runs worker.Worker)."""

    pid: int
    generation: int
    cfg: Config
    metrics: WorkerMetrics
    # Label text of each server slot: the generation's Discovery.owners, which changes as DNS
    # peers come and go (None: a slot never used yet).
    addresses: Sequence[str | None]
    discovery: Discovery
    column: int  # its column in discovery.load (loadshare.py)
    number: int = 0  # N of its title, `failproxy worker[N]`
    started: float = field(default_factory=time.monotonic)
    base: Snapshot | None = None  # counts already folded into Master.retired (fold_server)
    retiring: bool = False
    kill_at: float | None = None

    def ready(self) -> bool:
        return self.metrics.is_ready() or time.monotonic() - self.started >= READY_FALLBACK


def worker_count(cfg: Config) -> int:
    return cfg.server.workers or os.cpu_count() or 1


def _check_user(cfg: Config) -> None:
    if cfg.server.user:
        try:
            pwd.getpwnam(cfg.server.user)
        except KeyError:
            raise ConfigError([f"server.user: no such user: {cfg.server.user!r}"]) from None


def _drop_privileges(user: str) -> None:
    """Workers run as `user` when the master was started as root (the master keeps root, as
    nginx's does, so a reload can still bind a privileged port)."""
    if not user or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _detach_master_fds(keep: set[int]) -> None:
    """Point every inherited socket, pipe and epoll descriptor a worker must not hold (admin
    listener and connections, the master's loop) at /dev/null. Not closed: a stale Python object
    in the copied heap could later close a number the worker has reused."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    keep = keep | {0, 1, 2, devnull}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            continue
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_pid_file(path: str) -> None:
    """Refuse to start over a running master (checked before binding anything)."""
    other = _read_pid(path) if path else None
    if other and other != os.getpid() and _alive(other):
        raise StartupError(f"server.pid_file: {path} names running process {other}")


def _write_pid(path: str) -> None:
    _check_pid_file(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pid(path: str) -> None:
    if path and _read_pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)


def _load_worker_main() -> WorkerMain:
    # Imported by the master once, so a fork starts serving at once (as unicorn's preload_app:
    # HUP re-reads the config, USR2 loads new code).
    from failproxy.process.worker import worker_main

    return worker_main


class Master:
    """One master process: its listeners, its workers, its admin endpoint."""

    def __init__(self, config_path: str, cfg: Config) -> None:
        _check_user(cfg)
        _check_pid_file(cfg.server.pid_file)
        self.config_path = config_path
        self.cfg = cfg
        self.log: Any = logs.get_logger()
        self.started_at = time.time()
        self.pid = os.getpid()
        old = os.environ.pop(OLD_MASTER_ENV, "")
        self.old_master = int(old) if old.isdigit() else None
        self.listeners = ListenerSet(listeners.inherit(os.environ.pop(listeners.FD_ENV, None)))
        try:
            self.listeners.update(listeners.configured(cfg), cfg.server.backlog)
            admin_sock = (self.listeners.acquire(cfg.admin.listen, listeners.ADMIN_BACKLOG)
                          if cfg.admin.listen else None)
        except ListenError as exc:
            self.listeners.close_unused_inherited()
            self.listeners.close_all(unlink=False)
            raise StartupError(str(exc)) from exc
        self.listeners.close_unused_inherited()
        self.admin = AdminServer(self, admin_sock) if admin_sock else None
        self.admin_text = cfg.admin.listen.text if cfg.admin.listen else ""
        self.pid_path = cfg.server.pid_file
        if self.pid_path:
            _write_pid(self.pid_path)
        self.worker_main = _load_worker_main()
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 0
        self.num_workers = worker_count(cfg)
        self.retired = Totals()
        self.discovery = self._discovery(cfg, None)
        self.signals: list[int] = []
        self.wake = asyncio.Event()
        self.stopping: str | None = None  # "graceful" | "quick"
        self.serving = False
        self.reload_pending = False
        self.reexec_pid: int | None = None
        self.next_spawn_at = 0.0
        self.backoff = 0.0
        self.reaped_cpu = 0.0  # CPU seconds of the workers reaped so far (process_cpu_seconds)
        self.queues = scrape.QueueReader()
        self._title()

    def _title(self, state: str = "") -> None:
        setproctitle(f"failproxy master{state} {self.config_path}")

    def _discovery(self, cfg: Config, previous: Discovery | None) -> Discovery:
        discovery = Discovery(cfg, self.log, previous)

        def reassigning(slot: int) -> None:
            # A DNS peer's slot passes to a new address: what it counted so far stays its own.
            for worker in self.workers.values():
                if worker.discovery is discovery:
                    worker.base = self.retired.fold_server(worker.metrics, worker.addresses,
                                                           slot, worker.base)

        discovery.on_reassign = reassigning
        return discovery

    # -- main loop -------------------------------------------------------------------------------

    def run(self) -> int:
        loop = asyncio.SelectorEventLoop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            loop.close()
            logs.flush()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in HANDLED:
            loop.add_signal_handler(sig, self._queue, sig)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # blocked since serve(): now handled
        if self.admin:
            await self.admin.start()
        self.log.info("starting", listen=[a.text for a in listeners.configured(self.cfg)],
                      workers=self.num_workers, admin=self.admin_text or None)
        # Peers from DNS and self are known before the first fork (workers start with them).
        await self.discovery.start()
        self.discovery.run()
        while True:
            while self.signals:
                name = signal.Signals(self.signals.pop(0)).name
                await getattr(self, "handle_" + name[3:].lower())()
            self._reap()
            if self.stopping:
                if not self.workers:
                    break
            else:
                self._spawn_missing()
                self._promote()
            self._enforce_deadlines()
            await self._sleep()
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # a late logrotate must not kill us
        for sig in HANDLED:
            loop.remove_signal_handler(sig)
        await self.discovery.stop()
        _remove_pid(self.pid_path)
        self.log.info("stopped", mode=self.stopping)
        return 0

    def _queue(self, sig: int) -> None:
        self.signals.append(sig)
        self.wake.set()

    async def _sleep(self) -> None:
        busy = self.stopping or self.reload_pending or any(
            not w.ready() for w in self.workers.values()) or (
            len(self._current()) != self.num_workers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), 0.05 if busy else 1.0)
        self.wake.clear()

    # -- signals ---------------------------------------------------------------------------------

    async def handle_chld(self) -> None:
        self._reap()

    async def handle_term(self) -> None:
        await self._stop("quick")

    async def handle_int(self) -> None:
        await self._stop("quick")

    async def handle_quit(self) -> None:
        await self._stop("graceful")

    async def handle_ttin(self) -> None:
        if not self.stopping:
            self.num_workers += 1
            self.log.info("workers_changed", workers=self.num_workers)

    async def handle_ttou(self) -> None:
        if not self.stopping and self.num_workers > 1:
            self.num_workers -= 1
            self.log.info("workers_changed", workers=self.num_workers)

    async def handle_usr1(self) -> None:
        """Reopen log.file (SPEC 6: logrotate renamed it), then have every worker reopen its
        own: each writes through its own descriptor, so each must. Nothing else changes. The
        master goes first so that a worker forked from now on inherits the new file, and a
        retiring worker is told too, since it logs until it exits. A worker that has not yet
        installed its handler holds the signal until it has (`_fork`). With the log on stderr
        this does nothing beyond passing the signal on, which the workers ignore likewise."""
        try:
            path = logs.reopen()
        except OSError as exc:
            self.log.warning("log_reopen_failed", detail=str(exc))
        else:
            if path:
                self._hand_log_over()
                self.log.info("log_reopened", file=path)
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGUSR1)

    def _hand_log_over(self) -> None:
        """Workers that drop to `server.user` reopen the new file as that user: a root master
        gives it to them first (logs.hand_over), as nginx's master does."""
        user = self.cfg.server.user
        if not user or os.geteuid() != 0:
            return
        try:
            logs.hand_over(pwd.getpwnam(user).pw_uid)
        except (KeyError, OSError) as exc:
            self.log.warning("log_reopen_failed", detail=f"giving the log to {user}: {exc}")

    async def handle_hup(self) -> None:
        if self.stopping:
            return
        self.log.info("reloading", config=self.config_path)
        try:
            cfg = config_mod.load(self.config_path)
            _check_user(cfg)
            ssl_ctx = tls.load(cfg.server)  # the certificate and key are read again
        except ConfigError as exc:
            self.log.error("reload_failed", detail="; ".join(exc.problems))
            return
        except OSError as exc:
            self.log.error("reload_failed", detail=f"{self.config_path}: {exc.strerror or exc}")
            return
        try:
            await self._apply(cfg)
        except (ListenError, StartupError, OSError) as exc:
            self.log.error("reload_failed", detail=str(exc))
            return
        tls.adopt(cfg.server, ssl_ctx)
        self.generation += 1
        self.num_workers = worker_count(cfg)
        self.reload_pending = True
        self._spawn_missing()

    async def handle_usr2(self) -> None:
        if self.stopping:
            return
        if self.reexec_pid is not None:
            self.log.warning("reexec_refused", detail="a new master is already running",
                             new_master=self.reexec_pid)
            return
        if self.old_master is not None:
            self.log.warning("reexec_refused", detail="the old master has not stopped yet",
                             old_master=self.old_master)
            return
        if self.pid_path:
            oldbin = self.pid_path + ".oldbin"
            with contextlib.suppress(OSError):
                os.replace(self.pid_path, oldbin)
                self.pid_path = oldbin
        socks = self.listeners.all() + ([self.admin.sock] if self.admin else [])
        fds = [s.fileno() for s in socks]
        env = dict(os.environ)
        env[listeners.FD_ENV] = ",".join(map(str, fds))
        env[OLD_MASTER_ENV] = str(self.pid)
        argv = [sys.executable, "-m", "failproxy", "serve", self.config_path]
        pid = self._fork(hold=HELD)  # held across exec, until the new master handles it
        if pid == 0:
            try:
                for fd in fds:
                    os.set_inheritable(fd, True)
                os.execve(sys.executable, argv, env)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(127)
        self.reexec_pid = pid
        self._title(" (old)")
        self.log.info("reexec", new_master=pid, fds=fds)

    # -- reload helpers --------------------------------------------------------------------------

    async def _apply(self, cfg: Config) -> None:
        """Bind what the new config adds (all or nothing), then switch to it."""
        admin_text = cfg.admin.listen.text if cfg.admin.listen else ""
        new_admin = None
        if admin_text != self.admin_text and cfg.admin.listen:
            new_admin = listeners.bind_one(cfg.admin.listen, listeners.ADMIN_BACKLOG)
        try:
            removed = self.listeners.update(listeners.configured(cfg), cfg.server.backlog)
        except BaseException:
            if new_admin:
                new_admin.close()
            raise
        for sock in removed:
            listeners.close(sock, unlink=True)
        if admin_text != self.admin_text:
            if self.admin:
                await self.admin.stop()
            self.admin = AdminServer(self, new_admin) if new_admin else None
            if self.admin:
                await self.admin.start()
            self.admin_text = admin_text
        # From here on nothing fails the reload: a bad pid or log path is reported, not fatal.
        moved = cfg.server.pid_file != self.cfg.server.pid_file
        if moved and not self.pid_path.endswith(".oldbin"):  # mid-USR2 the new master owns it
            _remove_pid(self.pid_path)
            self.pid_path = cfg.server.pid_file
            try:
                if self.pid_path:
                    _write_pid(self.pid_path)
            except (OSError, StartupError) as exc:
                self.log.warning("pid_file_failed", detail=str(exc))
        if cfg.log != self.cfg.log:
            try:
                logs.configure(cfg.log)
                self.log = logs.get_logger()
            except OSError as exc:
                self.log.warning("log_config_failed", detail=str(exc))
        # The new generation's peers: the last good answers carried over, new entries resolved
        # now, so its workers start with a list; the old workers keep theirs while they drain.
        discovery = self._discovery(cfg, self.discovery)
        await discovery.start()
        await self.discovery.stop()
        self.discovery = discovery
        discovery.run()
        self.cfg = cfg

    # -- workers ---------------------------------------------------------------------------------

    def _current(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values()
                if w.generation == self.generation and not w.retiring]

    def _fork(self, hold: frozenset[int] = frozenset()) -> int:
        """fork() with our signals blocked, so none reaches the child before it resets them.
        The child keeps `hold` blocked: its own code unblocks them once it handles them, and a
        signal sent meanwhile waits for that instead of taking its default action."""
        logs.flush()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask | hold)
            return 0
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    def _spawn(self) -> None:
        cfg = self.cfg
        socks = self.listeners.sockets(listeners.configured(cfg))
        discovery = self.discovery
        metrics = WorkerMetrics(discovery.n_slots)
        column = discovery.load.claim()
        taken = {w.number for w in self._current()}
        number = next(n for n in range(len(taken) + 1) if n not in taken)
        try:
            pid = self._fork(hold=WORKER_HELD)  # until worker_main handles them
        except OSError as exc:
            metrics.close()
            discovery.load.release(column)
            self.log.error("fork_failed", detail=str(exc))
            self.next_spawn_at = time.monotonic() + 1.0
            return
        if pid == 0:
            setproctitle(f"failproxy worker[{number}] {self.config_path}")
            self._worker_child(cfg, socks, metrics, discovery.table, (discovery.load, column))
        worker = WorkerProcess(pid, self.generation, cfg, metrics, discovery.owners, discovery,
                               column, number)
        self.workers[pid] = worker
        self.log.info("worker_started", worker_pid=pid, generation=self.generation,
                      worker=number)

    def _worker_child(self, cfg: Config, socks: list[Any], metrics: WorkerMetrics,
                      peers: PeerTable, load: tuple[LoadShare, int]) -> NoReturn:
        code = 1
        try:
            gc.freeze()  # the master's heap stays shared copy-on-write, and is never collected
            for other in self.workers.values():
                other.metrics.close()
            _detach_master_fds({s.fileno() for s in socks})
            _drop_privileges(cfg.server.user)
            code = self.worker_main(cfg, socks, metrics, peers, load)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            # In the log, with its traceback (logs.py), where an operator looks first; stderr
            # keeps it when the log cannot take it. The log's `pid` is still the master's here
            # (logs.configure runs in worker_main), hence worker_pid.
            try:
                logs.get_logger().error("worker_failed", worker_pid=os.getpid(), exc_info=exc)
            except BaseException:
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                logs.flush()
                sys.stderr.flush()
            os._exit(code)

    def _spawn_missing(self) -> None:
        current = self._current()
        while len(current) < self.num_workers and time.monotonic() >= self.next_spawn_at:
            self._spawn()
            current = self._current()
        for worker in sorted(current, key=lambda w: w.started)[self.num_workers :]:
            self._retire(worker, signal.SIGQUIT)

    def _promote(self) -> None:
        """Once the newest generation is complete and ready, retire every older worker."""
        current = self._current()
        if len(current) < self.num_workers or not all(w.ready() for w in current):
            return
        for worker in list(self.workers.values()):
            if worker.generation < self.generation and not worker.retiring:
                self._retire(worker, signal.SIGQUIT)
        if self.reload_pending and not self._older_still_accepting():
            self.reload_pending = False
            self.log.info("reloaded", generation=self.generation, workers=self.num_workers)
        if not self.serving:
            self.serving = True
            self.log.info("started", workers=self.num_workers,
                          listen=[a.text for a in listeners.configured(self.cfg)],
                          core=core_class() is not None)
            self._notify_old_master()

    def _older_still_accepting(self) -> bool:
        """Whether a worker of an older generation may still accept a connection: QUIT was sent,
        but its loop has not closed its accepting sockets yet (WorkerMetrics.stopped_accepting).
        One that never does is killed at its deadline, and reaped, so this ends."""
        return any(w.generation < self.generation and not w.metrics.has_stopped_accepting()
                   for w in self.workers.values())

    def _notify_old_master(self) -> None:
        old, self.old_master = self.old_master, None
        if old is not None and os.getppid() == old:
            self.log.info("upgrade_handover", old_master=old)
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGQUIT)

    def _retire(self, worker: WorkerProcess, sig: int) -> None:
        worker.retiring = True
        grace = worker.cfg.server.shutdown_timeout if sig == signal.SIGQUIT else QUICK_STOP
        deadline = time.monotonic() + grace + KILL_GRACE
        worker.kill_at = min(deadline, worker.kill_at or deadline)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at:
                worker.kill_at = None
                self.log.warning("worker_killed", worker_pid=worker.pid,
                                 detail="did not stop within its shutdown timeout")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.reexec_pid:
                self._reexec_died(code)
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self.reaped_cpu += usage.ru_utime + usage.ru_stime
            self.retired.add(worker.metrics, worker.addresses, gauges=False, base=worker.base)
            worker.metrics.close()
            worker.discovery.load.release(worker.column)  # its requests in flight went with it
            old = worker.discovery
            if old is not self.discovery and all(w.discovery is not old
                                                 for w in self.workers.values()):
                old.close()  # the last worker of an older generation: its peer table goes
            expected = worker.retiring or self.stopping is not None
            level = "info" if expected and code == 0 else "warning"
            getattr(self.log, level)("worker_exited", worker_pid=pid, exit_code=code,
                                     generation=worker.generation, expected=expected)
            if not expected:
                lived = time.monotonic() - worker.started
                self.backoff = 0.0 if lived > 1.0 else min(max(0.1, self.backoff * 2), 2.0)
                self.next_spawn_at = time.monotonic() + self.backoff

    def _reexec_died(self, code: int) -> None:
        self.reexec_pid = None
        self._title()
        self.log.error("reexec_failed", exit_code=code)
        if self.stopping is None and self.pid_path.endswith(".oldbin"):
            original = self.pid_path.removesuffix(".oldbin")
            _remove_pid(self.pid_path)
            self.pid_path = original
            with contextlib.suppress(OSError, StartupError):
                _write_pid(original)

    async def _stop(self, mode: str) -> None:
        if self.stopping == "quick" or self.stopping == mode:
            return
        if self.stopping is None:
            self.log.info("stopping", mode=mode, workers=len(self.workers))
            if self.admin:
                await self.admin.stop()
                self.admin = None
            # A new master from USR2 shares these sockets: then leave its UNIX paths alone.
            self.listeners.close_all(unlink=self.reexec_pid is None)
        self.stopping = mode
        sig = signal.SIGQUIT if mode == "graceful" else signal.SIGTERM
        for worker in self.workers.values():
            self._retire(worker, sig)

    # -- admin source ----------------------------------------------------------------------------

    def totals(self) -> Totals:
        totals = self.retired.copy()
        for worker in self.workers.values():
            totals.add(worker.metrics, worker.addresses, gauges=True, base=worker.base)
        return totals

    def healthy(self) -> bool:
        return self.stopping is None and any(w.ready() for w in self.workers.values())

    def status(self) -> dict[str, Any]:
        totals = self.totals()
        live = sorted(self.workers.values(), key=lambda w: w.started)
        choice = self.discovery.self_choice
        own = choice.address
        # Every worker not yet reaped, as the gauges count them: a reaped one's board is gone.
        boards = [b for b in (w.metrics.read_learned() for w in live) if b is not None]
        learned, routes = merge_learned(boards)
        return {
            "version": failproxy.__version__,
            "pid": self.pid,
            "workers": [w.pid for w in live if not w.retiring],
            "retiring": [w.pid for w in live if w.retiring],
            "generation": self.generation,
            "uptime": round(time.time() - self.started_at, 3),
            "upstreams": [_upstream_status(s, dns, s.address == own, totals, learned)
                          for s, dns in self.discovery.servers()],
            "routes": routes,
            "self": {"address": own.text if own else None, "reason": choice.reason,
                     "detected": choice.detected},
            "peers": self.discovery.describe(),
        }

    def metrics_text(self) -> str:
        servers = [s.address.text for s, _ in self.discovery.servers()]
        page = render(self.totals(), servers, sum(not w.retiring for w in self.workers.values()))
        return page + scrape.render(self.scrape(servers))

    def scrape(self, servers: Sequence[str]) -> scrape.Scrape:
        """What /metrics adds to the workers' counters (scrape.py): read now, for the group."""
        live = sorted(self.workers.values(), key=lambda w: w.started)
        process = scrape.process_figures([self.pid, *(w.pid for w in live)], self.reaped_cpu)
        free: dict[str, int] = {}
        primaries = [s for s in self.cfg.upstream.servers if not s.backup]
        if primaries and primaries[0].address.is_unix:
            local = primaries[0].address.text
            boards = [b for b in (w.metrics.read_learned() for w in live) if b is not None]
            workers = merge_learned(boards)[0].get(local, {}).get("concurrency")
            if workers is not None:  # the room policy runs and has learned it
                tables = {id(w.discovery): (w.discovery.load, w.discovery.owners) for w in live}
                own = self.discovery.self_choice.address
                busy = scrape.in_flight(tables.values(), local)
                if own is not None:
                    busy += scrape.in_flight(tables.values(), own.text)
                free[local] = max(0, int(workers) - busy)
        return scrape.Scrape(
            version=failproxy.__version__,
            compiled=failproxy.BUILD.startswith("compiled"),
            process=process,
            queues=self.queues.depths(servers),
            free_workers=free,
            dns_failures=dict(watch.FAILURES),
        )


def _upstream_status(server: Upstream, dns: str | None, own: bool, totals: Totals,
                     learned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One server in /status: SPEC 7's fields; `dns` (the name it came from) only for a peer
    from DNS, and `self: true` only on the address taken as this box's own. `learned`: from
    `merge_learned`; null figures where no worker has one."""
    text = server.address.text
    figures = learned.get(text, {})
    out: dict[str, Any] = {
        "address": text,
        "backup": server.backup,
        "state": "down" if totals.down[text] else "up",
        "fails": totals.fails[text],
        "requests": totals.server_requests[text],
        "failovers": totals.server_failovers[text],
        "concurrency": figures.get("concurrency"),
        "service_ms": figures.get("service_ms"),
    }
    if dns is not None:
        out["dns"] = dns
    if own:
        out["self"] = True
    return out


def merge_learned(boards: Sequence[dict[str, Any]]
                  ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """What the workers learned (their boards, WorkerContext.learned()), merged for /status.

    Per upstream address: `concurrency`, the largest any worker learned (each worker learns the
    same server, and the largest is the least it is known to serve at once); `service_ms`, the
    mean over the workers that have a figure. Per route: `count` summed, `ms` weighted by
    count, `class` that of the worker that saw the route most (slow on a tie, the safer
    guess); slowest first, at most MAX_ROUTES_SHOWN."""
    concurrency: dict[str, int] = {}
    service: dict[str, list[float]] = {}
    # route -> [count, sum of ms * count, sum of ms, workers, largest count, slow]
    merged: dict[str, list[Any]] = {}
    for board in boards:
        for address, figures in (board.get("upstreams") or {}).items():
            c = figures.get("concurrency")
            if c is not None:
                concurrency[address] = max(int(c), concurrency.get(address, int(c)))
            ms = figures.get("service_ms")
            if ms is not None:
                service.setdefault(address, []).append(float(ms))
        for entry in board.get("routes") or []:
            count, ms, slow = int(entry["count"]), float(entry["ms"]), entry["class"] == "slow"
            row = merged.setdefault(entry["route"], [0, 0.0, 0.0, 0, -1, False])
            row[0] += count
            row[1] += ms * count
            row[2] += ms
            row[3] += 1
            if count > row[4]:
                row[4], row[5] = count, slow
            elif count == row[4]:
                row[5] = row[5] or slow
    learned: dict[str, dict[str, Any]] = {}
    for address in concurrency.keys() | service.keys():
        times = service.get(address)
        learned[address] = {
            "concurrency": concurrency.get(address),
            "service_ms": round(sum(times) / len(times), 3) if times else None,
        }
    routes = [
        {"route": route, "class": "slow" if slow else "fast",
         "ms": round(weighted / count if count else plain / workers, 3), "count": count}
        for route, (count, weighted, plain, workers, _, slow) in merged.items()
    ]
    routes.sort(key=lambda r: (-r["ms"], r["route"]))
    return learned, routes[:MAX_ROUTES_SHOWN]


def serve(config_path: str) -> int:
    """`failproxy serve CONFIG`: 0 after a clean stop, 1 when the config or a listener is bad."""
    # Held until the master's loop handles it (module docstring). Not unblocked on the way out:
    # the process is ending, and a USR1 delivered now would kill it with the wrong status.
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    path = os.path.abspath(config_path)
    try:
        cfg = config_mod.load(path)
        _check_user(cfg)
        tls.adopt(cfg.server, tls.load(cfg.server))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{config_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logs.configure(cfg.log)
    try:
        master = Master(path, cfg)
    except (StartupError, ListenError, OSError) as exc:
        logs.get_logger().error("startup_failed", detail=str(exc))
        logs.flush()
        print(f"failproxy: {exc}", file=sys.stderr)
        return 1
    return master.run()
