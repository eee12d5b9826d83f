"""What an operator sees of a real `failproxy serve` (issue 19): process titles in ps, tracebacks
in the JSON log, an access log that `log.level` does not silence, and the /metrics families the
Prometheus client conventions name (process_*, build info) beside the room policy's readings.

Every process and socket is real; every wait is for an event, a title or a figure, never a
sleep.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply, Request
from support import REPO, Proxy, RawConn, build_request, proc_status
from test_master import admin_get, start_proxy, status, wait_until
from test_metrics import promtool_check, sample

import failproxy


def title(pid: int) -> str:
    """What `ps -o args` shows: /proc/PID/cmdline, NUL-separated, padded with NULs; "" once
    the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return " ".join(part.decode() for part in raw.split(b"\0") if part)


def metrics(proxy: Proxy) -> str:
    code, body = admin_get(proxy, "/metrics")
    assert code == 200, body
    return body.decode()


def maybe(text: str, name: str, **labels: str) -> float | None:
    try:
        return sample(text, name, **labels)
    except AssertionError:
        return None


# ---- process titles ---------------------------------------------------------------------------
def test_ps_names_the_master_and_each_numbered_worker(tmp_path: Path, backend: Any) -> None:
    """`failproxy master CONFIG` and `failproxy worker[N] CONFIG`, as nginx and unicorn show
    theirs; a replacement takes the number of the worker it replaces; a draining worker says
    so while its last request finishes."""

    def slow(req: Request) -> Reply:
        return Reply(200, body=b"slow") if req.target != "/slow" else Reply(200, body=b"done",
                                                                              delay=1.5)

    app = HTTPBackend("app", handler=slow)
    proxy = start_proxy(tmp_path, [app.address], server={"workers": 2})
    try:
        config = str(proxy.config_path)
        assert title(proxy.pid) == f"failproxy master {config}"
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(proxy.pid)], capture_output=True,
                            text=True, check=True).stdout.strip()
        assert ps == f"failproxy master {config}"
        workers = status(proxy)["workers"]
        names = {title(pid): pid for pid in workers}
        assert sorted(names) == [f"failproxy worker[{n}] {config}" for n in (0, 1)]

        os.kill(names[f"failproxy worker[0] {config}"], signal.SIGKILL)
        new = wait_until(lambda: [p for p in status(proxy)["workers"] if p not in workers], 10,
                         "a replacement worker")
        # Listed as soon as it is forked: it says its name once it runs (the master's until then).
        wait_until(lambda: title(new[0]) == f"failproxy worker[0] {config}", 10,
                   "the replacement takes worker[0]")

        # A request in flight keeps its worker draining after QUIT: that one shows "(stopping)".
        current = status(proxy)["workers"]
        client = RawConn(proxy.port)
        client.send(build_request("GET", "/slow"))
        app.wait_requests(1)
        for pid in current:
            os.kill(pid, signal.SIGQUIT)
        wait_until(lambda: any(title(p).endswith(" (stopping)") for p in current), 5,
                   "a draining worker's title")
        assert client.read_response("GET").status == 200
        client.close()
    finally:
        proxy.stop()
        app.stop()


# ---- tracebacks in the JSON log ---------------------------------------------------------------
def test_a_worker_that_cannot_start_logs_its_traceback_in_the_json_log(
        tmp_path: Path, backend: Any) -> None:
    """A real failure: the master at its descriptor limit forks a worker that cannot open
    /dev/null. The JSON log gets `worker_failed` with the whole traceback (before, only stderr
    had it), and once the limit is raised again the master's next try serves."""
    app = backend("app")
    proxy = start_proxy(tmp_path, [app.address], server={"workers": 1})
    try:
        mark = proxy.log.mark()
        soft, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (in_use, hard))
        try:
            proxy.send_signal(signal.SIGTTIN)
            failed = proxy.log.wait_for_event("worker_failed", timeout=10, since=mark)
        finally:
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert failed["level"] == "error" and failed["worker_pid"] != proxy.pid
        trace = failed["exception"]
        assert trace.startswith("Traceback (most recent call last):"), trace
        assert "_detach_master_fds" in trace and "[Errno 24] Too many open files" in trace, trace
        assert not proxy.log.garbage
        wait_until(lambda: len(status(proxy)["workers"]) == 2, 10, "the second worker")
    finally:
        proxy.stop()


LOG_SCRIPT = """
import sys
from failproxy.telemetry import logs
from failproxy.config import LogConfig

logs.configure(LogConfig(format=sys.argv[1], file=sys.argv[2]))
log = logs.get_logger()
try:
    {}["missing"]
except KeyError as exc:
    log.exception("caught")                                # the master's and discovery's form
    log.error("internal_error", where="test", exc_info=exc)  # events.internal_error's
logs.flush()
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_logged_exceptions_keep_their_traceback(tmp_path: Path, fmt: str) -> None:
    """Both ways failproxy's code logs an exception keep the traceback: in JSON as one string
    in `exception` (orjson alone rendered exc_info as the message), on the console as printed."""
    path = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", LOG_SCRIPT, fmt, str(path)], check=True, env=env,
                   timeout=30)
    text = path.read_text()
    if fmt == "console":
        assert text.count("Traceback (most recent call last):") == 2
        assert text.count("KeyError: 'missing'") == 2
        return
    import json

    records = [json.loads(line) for line in text.splitlines()]
    assert [r["event"] for r in records] == ["caught", "internal_error"]
    for record in records:
        assert record["level"] == "error"
        assert record["exception"].startswith("Traceback (most recent call last):")
        assert record["exception"].rstrip().endswith("KeyError: 'missing'")
        assert "exc_info" not in record


# ---- the access log -----------------------------------------------------------------------------
class QuietProxy(Proxy):
    """A proxy whose log may leave out `worker_started` (level warning): its port accepting is
    enough, a request waits in the shared backlog for the worker."""

    def _wait_worker(self, deadline: float) -> None:
        return


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_level_warning_keeps_the_access_log(tmp_path: Path, backend: Any, fmt: str) -> None:
    """`log.level = "warning"` used to turn the access log off without a word: `log.access`
    alone decides now, in both formats, while info events stay quiet."""
    app = backend("app")
    proxy = QuietProxy(tmp_path, [app.address], log={"level": "warning", "format": fmt})
    proxy.start()
    try:
        assert proxy.request("GET", "/seen").status == 200
        if fmt == "json":
            record = proxy.log.wait_for_event("request", path="/seen")
            assert record["status"] == 200 and record["level"] == "info"
            assert not proxy.log.find("worker_started")  # info: still below the level
        else:
            wait_until(lambda: "/seen" in proxy.log_path.read_text(), 5, "the request line")
            text = proxy.log_path.read_text()
            assert "request" in text and "worker_started" not in text
    finally:
        proxy.stop()


def test_log_access_false_silences_only_the_access_log(tmp_path: Path, backend: Any) -> None:
    app = backend("app")
    proxy = Proxy(tmp_path, [app.address], log={"level": "debug", "access": False})
    proxy.start()
    try:
        assert proxy.request("GET", "/unseen").status == 200
        with proxy.connect() as c:  # a later info event of the same worker, to wait for
            c.send(b"GARBAGE\r\n\r\n")
            assert c.read_response("GET").status == 400
        proxy.log.wait_for_event("client_error", status=400)
        assert not proxy.log.find("request")
    finally:
        proxy.stop()


# ---- /metrics ------------------------------------------------------------------------------------
def test_process_metrics_sum_the_group_and_build_info_names_the_build(
        tmp_path: Path, backend: Any) -> None:
    app = backend("app")
    before = time.time()
    proxy = start_proxy(tmp_path, [app.address], server={"workers": 2})
    try:
        text = metrics(proxy)
        promtool_check(text)
        pids = [proxy.pid, *status(proxy)["workers"]]
        assert before - 2 <= sample(text, "process_start_time_seconds") <= time.time()

        fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
        master_fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        assert abs(sample(text, "process_open_fds") - fds) <= 4 < fds - master_fds
        rss = sum(proc_status(pid)["VmRSS"] * 1024 for pid in pids)
        master_rss = proc_status(proxy.pid)["VmRSS"] * 1024
        assert 0.8 * rss <= sample(text, "process_resident_memory_bytes") <= 1.2 * rss
        assert rss > 1.5 * master_rss  # the workers are in it
        assert sample(text, "process_max_fds") == resource.prlimit(
            proxy.pid, resource.RLIMIT_NOFILE)[0]

        version = subprocess.run([sys.executable, "-m", "failproxy", "--version"],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
        compiled = "true" if "compiled with mypyc" in version else "false"
        assert sample(text, "failproxy_build_info", version=failproxy.__version__,
                      compiled=compiled) == 1
        assert "always 1 with fail_timeout = 0" in text  # failproxy_upstream_up's HELP

        # CPU time is a counter: a worker's share stays in it after the worker is gone.
        for _ in range(100):
            assert proxy.request("GET", "/").status == 200
        cpu = sample(metrics(proxy), "process_cpu_seconds_total")
        assert cpu > 0
        workers = status(proxy)["workers"]
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(status(proxy)["workers"]) & set(workers)
                   and len(status(proxy)["workers"]) == 2, 10, "two new workers")
        after = metrics(proxy)
        assert sample(after, "process_cpu_seconds_total") >= cpu
        promtool_check(after)
    finally:
        proxy.stop()


def test_accept_queue_and_free_workers_are_what_the_room_policy_reads(
        tmp_path: Path, backend: Any, sockdir: Path) -> None:
    """The local app server's accept queue (a listener that never accepts, with real queued
    connections) and its workers free as failproxy sees them: 1 learned worker, then 0 while a
    request of ours waits there."""
    path = str(sockdir / "app.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(5)
    queued = []
    peer = backend("peer")
    proxy = start_proxy(tmp_path, [f"unix:{path}", {"address": peer.address, "backup": True}])
    local = f"unix:{path}"
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            queued.append(s)
        text = wait_until(lambda: (t := metrics(proxy))
                          and maybe(t, "failproxy_free_workers", upstream=local) == 1 and t, 5,
                          "free_workers on the first board")
        assert sample(text, "failproxy_accept_queue_depth", upstream=local) == 3
        assert maybe(text, "failproxy_accept_queue_depth", upstream=peer.address) is None
        promtool_check(text)

        client = RawConn(proxy.port)  # goes home (W = 1, none of ours there) and waits there
        client.send(build_request("GET", "/waits"))
        text = wait_until(lambda: (t := metrics(proxy))
                          and maybe(t, "failproxy_free_workers", upstream=local) == 0 and t, 5,
                          "no free worker while ours waits")
        assert sample(text, "failproxy_accept_queue_depth", upstream=local) == 4
        client.close()
    finally:
        proxy.stop()
        for s in queued:
            s.close()
        listener.close()


# ---- counting a request once --------------------------------------------------------------------
def test_a_mid_body_413_is_counted_once(tmp_path: Path, backend: Any) -> None:
    """Streaming a chunked body (request_buffering = false) past max_body_bytes: one 413
    answered, one counted."""
    app = backend("app")
    proxy = start_proxy(tmp_path, [app.address],
                        server={"max_body_bytes": 100, "request_buffering": False})
    try:
        with proxy.connect() as c:
            c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"50\r\n" + b"a" * 80 + b"\r\n")
            # The head went upstream and the body streams after it: the exchange is under way.
            wait_until(lambda: app.connections >= 1, 5, "the upstream connection")
            c.send(b"50\r\n" + b"a" * 80 + b"\r\n")
            assert c.read_response("POST").status == 413
        text = wait_until(lambda: (t := metrics(proxy))
                          and maybe(t, "failproxy_requests_total", status="413") and t, 5)
        assert sample(text, "failproxy_requests_total", status="413") == 1
    finally:
        proxy.stop()


def test_dns_failures_are_counted_per_name(tmp_path: Path, sockdir: Path) -> None:
    """A name server that never answers: every lookup of the peers' name times out, is logged
    as `resolve_failed` and counted under its name."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read: no answer
    silent.bind(("127.0.0.1", 0))
    resolver = f"127.0.0.1:{silent.getsockname()[1]}"
    proxy = start_proxy(tmp_path, [f"unix:{sockdir / 'app.sock'}"],
                        upstream={"resolver": [resolver], "resolver_timeout": 0.1},
                        peers=[{"dns": "peers.test", "port": 8080,  # type: ignore[list-item]
                                "resolve_interval": 0.1}])
    try:
        proxy.log.wait_for_event("resolve_failed", dns="peers.test", failures=2)
        logged = len(proxy.log.find("resolve_failed", dns="peers.test"))
        text = metrics(proxy)
        promtool_check(text)
        assert sample(text, "failproxy_dns_failures_total", dns="peers.test") >= logged >= 2
    finally:
        proxy.stop()
        silent.close()
