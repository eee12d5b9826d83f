"""USR1 reopens log.file in the master and every worker (SPEC 6), with real processes.

Done as logrotate does it: rename the file, then signal the master. What must hold: nothing
restarts (same master, same workers), no request fails, every line logged before the signal is
in the renamed file and every line after it in the new one, none lost in between. Which worker
served a request is told apart by freezing the others (SIGSTOP), as in test_master.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from support import REPO, LogReader, Proxy, free_port
from test_master import Load, get, gone, start_proxy, status, stopped, uid_of, wait_until

from failproxy.telemetry.jsonlog import Sink

pytestmark = pytest.mark.timeout(90)

USR1_BIT = 1 << (signal.SIGUSR1 - 1)  # in /proc/PID/status signal masks


def sig_masks(pid: int) -> dict[str, int]:
    """SigPnd, ShdPnd, SigBlk, SigIgn, SigCgt of a process, as integers."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            out[key] = int(value.strip(), 16)
    return out


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def request_paths(log: LogReader, prefix: str) -> list[str]:
    return [ev["path"] for ev in log.find("request", path=lambda p: p.startswith(prefix))]


def serve_by_each(proxy: Proxy, workers: list[int], prefix: str, n: int) -> None:
    """`n` requests answered by each of `workers` in turn (every other one frozen):
    `PREFIX/PID/I`."""
    for pid in workers:
        live = status(proxy)
        with stopped(*(w for w in live["workers"] + live["retiring"] if w != pid)):
            for i in range(n):
                assert get(proxy.port, f"{prefix}/{pid}/{i}")[0] == 200


def rotate(proxy: Proxy) -> tuple[LogReader, LogReader]:
    """logrotate's part: rename log.file, then USR1 to the master. Returns readers of the renamed
    file and of the new one (which the proxy creates), and points `proxy.log` at the new one."""
    rotated = proxy.log_path.with_name(proxy.log_path.name + ".1")
    os.rename(proxy.log_path, rotated)
    proxy.send_signal(signal.SIGUSR1)
    proxy.log = LogReader(proxy.log_path)
    return LogReader(rotated), proxy.log


def test_usr1_reopens_the_log_in_the_master_and_every_worker_without_a_restart(
        tmp_path: Path, backend: Any) -> None:
    app = backend("app")
    proxy = start_proxy(tmp_path, [app], server={"workers": 2}, log={"access": True})
    try:
        master = proxy.pid
        workers = sorted(status(proxy)["workers"])
        assert len(workers) == 2
        serve_by_each(proxy, workers, "/before", 3)
        proxy.log.wait_for_events("request", 6, path=lambda p: p.startswith("/before/"))

        with Load(proxy.port, threads=4) as load:
            wait_until(lambda: load.snapshot()[0] >= 20, 10, "load under way")
            old, new = rotate(proxy)
            reopened = new.wait_for_event("log_reopened", timeout=10, pid=master)
            assert reopened["file"] == str(proxy.log_path) and "worker_pid" not in reopened
            for pid in workers:
                ev = new.wait_for_event("log_reopened", timeout=10, worker_pid=pid)
                assert ev["file"] == str(proxy.log_path) and ev["pid"] == pid
            # the load goes on being answered after every process reopened
            after_reopen = load.snapshot()[0]
            wait_until(lambda: load.snapshot()[0] >= after_reopen + 20, 10, "load after reopen")
        assert load.failures == [] and load.stale_retries == 0, load.failures[:5]

        serve_by_each(proxy, workers, "/after", 3)
        # each worker's access lines reach the new file (written once per loop turn: poll)
        for pid in workers:
            new.wait_for_events("request", 3, timeout=10, pid=pid,
                                path=lambda p, pid=pid: p.startswith(f"/after/{pid}/"))

        # nothing restarted
        assert proxy.alive() and status(proxy)["pid"] == master
        assert sorted(status(proxy)["workers"]) == workers
        assert not any(gone(pid) for pid in workers)
        assert not new.find("worker_exited") and not new.find("worker_started")
        assert not old.find("worker_exited")
        # the cut: before in the renamed file, after in the new one, every line whole
        assert sorted(request_paths(old, "/before/")) == sorted(
            f"/before/{pid}/{i}" for pid in workers for i in range(3))
        assert request_paths(new, "/before/") == [] and request_paths(old, "/after/") == []
        assert not old.find("log_reopened")
        assert old.garbage == [] and new.garbage == []
        # no access line of the load lost between the two files (each answered request logged
        # once; the last ones may still be on their way to the file)
        wait_until(lambda: len(request_paths(old, "/load/") + request_paths(new, "/load/"))
                   == load.ok, 10, f"{load.ok} /load/ access lines in the two files")
        assert request_paths(new, "/load/"), "the load's lines after the reopen"
    finally:
        proxy.stop()


def test_a_worker_forked_after_usr1_logs_to_the_new_file(tmp_path: Path, backend: Any) -> None:
    app = backend("app")
    proxy = start_proxy(tmp_path, [app], server={"workers": 1}, log={"access": True})
    try:
        (first,) = status(proxy)["workers"]
        _, new = rotate(proxy)
        new.wait_for_event("log_reopened", timeout=10, worker_pid=first)
        proxy.send_signal(signal.SIGTTIN)
        second = wait_until(lambda: next(w for w in status(proxy)["workers"] if w != first), 10,
                            "a second worker")
        wait_until(lambda: get(proxy.port)[0] == 200, 5)
        with stopped(first):
            for i in range(3):
                assert get(proxy.port, f"/late/{i}")[0] == 200
        new.wait_for_events("request", 3, timeout=10, pid=second,
                            path=lambda p: p.startswith("/late/"))
        new.wait_for_event("worker_started", worker_pid=second)
    finally:
        proxy.stop()


def test_usr1_to_a_worker_that_has_no_handler_yet_is_held_not_fatal(
        tmp_path: Path, backend: Any) -> None:
    """A worker just forked (the master passes USR1 on to every worker it knows) is caught
    frozen before its loop handles USR1: the signal must wait, blocked, then be handled; not
    kill it (the default action) nor be lost."""
    app = backend("app")
    proxy = start_proxy(tmp_path, [app], server={"workers": 1}, log={"access": True})
    master = proxy.pid
    try:
        child = None
        for _ in range(10):  # each try forks one worker more; a try misses when it is too late
            known = set(proxy.pids())
            proxy.send_signal(signal.SIGTTIN)
            deadline = time.monotonic() + 10
            fresh: set[int] = set()
            while not fresh and time.monotonic() < deadline:  # no sleep: the window is short
                fresh = set(proxy.pids()) - known
            assert fresh, "no worker forked after TTIN"
            (pid,) = fresh
            os.kill(pid, signal.SIGSTOP)
            wait_until(lambda pid=pid: proc_state(pid) == "T", 5, "the new worker stopped")
            # Blocked: not out of fork yet, or no handler yet, or a handler but no running loop
            # yet (uvloop would only note the signal then, and run it at the next one).
            if sig_masks(pid)["SigBlk"] & USR1_BIT:
                child = pid
                break
            os.kill(pid, signal.SIGCONT)  # already serving: too late, again
        if child is None:
            pytest.skip("never caught a new worker before it handled USR1 (machine too fast)")
        try:
            _, new = rotate(proxy)
            new.wait_for_event("log_reopened", timeout=10, pid=master)
            # the master passed it on: pending in the frozen worker, not acted on
            wait_until(lambda: (sig_masks(child)["ShdPnd"] | sig_masks(child)["SigPnd"])
                       & USR1_BIT, 5, "USR1 pending in the new worker")
        finally:
            os.kill(child, signal.SIGCONT)
        new.wait_for_event("log_reopened", timeout=10, worker_pid=child)
        assert not gone(child) and child in status(proxy)["workers"]
        assert not new.find("worker_exited") and not proxy.log.find("worker_exited")
        others = [w for w in status(proxy)["workers"] if w != child]
        with stopped(*others):
            assert get(proxy.port, "/held")[0] == 200
        new.wait_for_event("request", timeout=10, pid=child, path="/held")
    finally:
        proxy.stop()


def test_usr1_with_the_log_on_stderr_changes_nothing(tmp_path: Path, backend: Any) -> None:
    app = backend("app")
    admin = f"127.0.0.1:{free_port()}"
    proxy = Proxy(tmp_path, [app], server={"workers": 2, "pid_file": str(tmp_path / "fp.pid")},
                  admin={"listen": admin}, log={"file": "", "access": True})
    proxy.admin_listen = admin  # type: ignore[attr-defined]
    proxy.log = LogReader(tmp_path / "stderr.txt")  # the log is the process's stderr
    proxy.start()
    try:
        wait_until(lambda: len(status(proxy)["workers"]) == 2, 10, "2 workers")
        master = proxy.pid
        workers = sorted(status(proxy)["workers"])
        since = proxy.log.mark()
        proxy.send_signal(signal.SIGUSR1)
        # TTIN after it: the master handles its signals in order (USR1's number is the lower,
        # so even both pending at once arrive in that order), so this event says USR1 is done
        proxy.send_signal(signal.SIGTTIN)
        proxy.log.wait_for_event("workers_changed", since=since, timeout=10, workers=3)
        serve_by_each(proxy, workers, "/after", 2)
        for pid in workers:
            proxy.log.wait_for_events("request", 2, since=since, timeout=10, pid=pid,
                                      path=lambda p, pid=pid: p.startswith(f"/after/{pid}/"))
        assert proxy.alive() and status(proxy)["pid"] == master
        assert set(workers) <= set(status(proxy)["workers"])
        for event in ("worker_exited", "log_reopened", "log_reopen_failed", "internal_error"):
            assert not proxy.log.find(event, since=since), event
        assert not proxy.log_path.exists()
    finally:
        proxy.stop()


def test_workers_that_dropped_privileges_reopen_a_file_the_master_made(backend: Any) -> None:
    """A root master creates the new file as root; it hands it to server.user (nginx's way),
    so the workers, which open it by path, can."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    app = backend("app")
    workdir = Path(tempfile.mkdtemp(prefix="fpt-usr1-", dir="/tmp"))
    workdir.chmod(0o755)
    proxy = start_proxy(workdir, [app], server={"workers": 1, "user": "nobody"},
                        log={"access": True})
    try:
        (worker,) = status(proxy)["workers"]
        assert uid_of(worker) != 0
        _, new = rotate(proxy)
        new.wait_for_event("log_reopened", timeout=10, worker_pid=worker)
        assert proxy.log_path.stat().st_uid == uid_of(worker)
        assert get(proxy.port, "/dropped")[0] == 200
        new.wait_for_event("request", timeout=10, pid=worker, path="/dropped")
        assert not new.find("log_reopen_failed")
    finally:
        proxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_logrotate_snippet_signals_the_pid_file_of_the_systemd_unit(tmp_path: Path) -> None:
    snippet = (REPO / "deploy" / "logrotate" / "failproxy").read_text()
    unit = (REPO / "deploy" / "failproxy.service").read_text()
    match = re.search(r"^PIDFile=(\S+)$", unit, re.M)
    assert match
    pid_file = match.group(1)
    body = snippet[snippet.index("{"):]
    for directive in ("daily", "rotate 14", "compress", "delaycompress", "missingok",
                      "notifempty", "sharedscripts", "postrotate", "endscript"):
        assert re.search(rf"^\s+{directive}$", body, re.M), directive
    assert "copytruncate" not in body
    assert f'kill -USR1 "$(cat {pid_file})"' in body
    if shutil.which("logrotate"):
        run = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"),
                              str(REPO / "deploy" / "logrotate" / "failproxy")],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr


# ---- the sink itself (in process) -------------------------------------------------------------
def test_sink_reopen_cuts_between_lines_gathered_before_and_written_after(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = Sink(None, str(path), buffer=1 << 20, flush_after=60.0)

    async def turn() -> None:
        sink.write(b"before\n")  # gathered, not yet written (the buffer is far from full)
        os.rename(path, tmp_path / "a.log.1")
        assert sink.reopen()
        sink.write(b"after\n")

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(turn())
    finally:
        sink.flush()
        loop.close()
    assert (tmp_path / "a.log.1").read_bytes() == b"before\n"
    assert path.read_bytes() == b"after\n"


def test_sink_reopen_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "a.log"
    path.parent.mkdir()
    sink = Sink(None, str(path))
    sink.write(b"one\n")
    path.parent.rename(tmp_path / "moved")  # the path cannot be opened any more
    with pytest.raises(FileNotFoundError):
        sink.reopen()
    sink.write(b"two\n")
    assert (tmp_path / "moved" / "a.log").read_bytes() == b"one\ntwo\n"


def test_sink_on_stderr_has_nothing_to_reopen() -> None:
    sink = Sink(None, "")
    fd = sink.fileno()
    assert sink.reopen() is False and sink.fileno() == fd
