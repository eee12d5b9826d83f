"""A real DNS server and real network namespaces for the DNS-peer tests.

- `Dnsmasq`: Debian's dnsmasq on an address and port of its own, answering only from a hosts
  file (`--addn-hosts`, no upstream, no /etc/hosts) that `set_records` rewrites and makes it
  re-read (SIGHUP); `stop()` takes it down mid-test (a name server that is gone), `start()`
  brings it back.
- `Netns`: a network namespace made for one test (`ip netns add`), deleted after it; `socket()`
  makes a socket inside it from a thread of this process (setns(2) changes only the calling
  thread's namespace, and a socket stays in the namespace it was made in), so the test process
  can be a client of a proxy, or a backend, living in that namespace.
- `ForgingDNS`: a name server of the test's own that sends forged answers (another question,
  another owner name, another ID, another source address) before the genuine one, or instead
  of it: what an attacker racing the real server would send.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

CLONE_NEWNET = 0x40000000
DNSMASQ = shutil.which("dnsmasq") or next(
    (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.path.exists(p)), None)
IP = shutil.which("ip") or next(
    (p for p in ("/usr/sbin/ip", "/sbin/ip", "/bin/ip") if os.path.exists(p)), None)


class Dnsmasq:
    """dnsmasq serving `records` (address, name) from a hosts file it re-reads on SIGHUP."""

    def __init__(self, workdir: Path, host: str, port: int, netns: str | None = None) -> None:
        assert DNSMASQ is not None, "dnsmasq is not installed"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.netns = netns
        self.hosts = workdir / "dns-hosts"
        self.log_path = workdir / "dnsmasq.log"
        self.hosts.write_text("")
        self.proc: subprocess.Popen[bytes] | None = None
        self.reads = 0  # how many times it read the hosts file

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> Dnsmasq:
        assert DNSMASQ is not None
        cmd = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
               f"--addn-hosts={self.hosts}", f"--listen-address={self.host}",
               "--bind-interfaces", f"--port={self.port}", "--user=root", "--group=root",
               "--local=/#/",  # every name is ours: a missing record is NODATA/NXDOMAIN
               "--pid-file=", "--cache-size=0", "--local-ttl=0", "--log-queries",
               f"--log-facility={self.log_path}", "--conf-file=/dev/null"]
        if self.netns:
            assert IP is not None
            cmd = [IP, "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._wait_read(timeout=5.0)
        return self

    def _read_count(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace").count(f"read {self.hosts}")
        return 0

    def _wait_read(self, timeout: float) -> None:
        """Until it logged one more read of the hosts file than before."""
        want = self.reads + 1
        deadline = time.monotonic() + timeout
        while self._read_count() < want:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"dnsmasq exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsmasq did not read {self.hosts} within {timeout}s")
            time.sleep(0.02)
        self.reads = self._read_count()

    def set_records(self, records: list[tuple[str, str]]) -> None:
        """Serve exactly these (address, name) records from now on."""
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{address} {name}\n" for address, name in records))
        os.replace(tmp, self.hosts)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            self._wait_read(timeout=5.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


FORGERIES = ("question", "owner", "id", "source")


class ForgingDNS:
    """A UDP name server on `host` answering `records` (name -> IPv4 addresses) that, while
    `forge` names a forgery, sends that forgery before each genuine A answer (`then_genuine`)
    or instead of it. Every forgery points at `forged`:

    - `question`: the query's ID and a record of the name asked, but another question;
    - `owner`: the query's ID and question, but the A record is owned by another name;
    - `id`: the genuine question and record, but another ID;
    - `source`: the query's ID, question and owner name, sent from `spoof_host` instead of the
      address the query went to (the one check an off-path attacker who guessed the ID faces).

    Genuine answers: the name's A records, no AAAA record (NODATA), NXDOMAIN for other names.
    """

    EVIL = "evil.test."

    def __init__(self, host: str, spoof_host: str, forged: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.spoof = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.spoof.bind((spoof_host, 0))
        self.forged = forged
        self.records: dict[str, list[str]] = {}
        self.forge: str | None = None
        self.then_genuine = False
        self.sent: Counter[str] = Counter()  # forgeries sent, by kind
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    @property
    def server(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return (host, port)

    def set(self, forge: str | None, then_genuine: bool = False,
            records: dict[str, list[str]] | None = None) -> None:
        with self._cond:
            self.forge, self.then_genuine = forge, then_genuine
            if records is not None:
                self.records = {n.rstrip(".") + ".": a for n, a in records.items()}

    def wait_sent(self, kind: str, n: int, timeout: float = 5.0) -> None:
        """Until `n` forgeries of `kind` were sent in all."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.sent[kind] >= n, timeout):
                raise AssertionError(f"{self.sent[kind]} {kind} forgeries sent, not {n}")

    def _serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(65535)
            if self._stopping:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # not a DNS query: no answer, as a server would do
                continue
            with self._cond:
                forge, then_genuine = self.forge, self.then_genuine
                records = dict(self.records)
            (question,) = query.question
            name = question.name.to_text()
            is_a = question.rdtype == dns.rdatatype.A
            if forge is not None and is_a:
                self._send_forgery(forge, query, name, peer)
                with self._cond:
                    self.sent[forge] += 1
                    self._cond.notify_all()
                if not then_genuine:
                    continue
            genuine = dns.message.make_response(query)
            if name not in records:
                genuine.set_rcode(dns.rcode.NXDOMAIN)
            elif is_a:
                genuine.answer.append(dns.rrset.from_text(name, 0, "IN", "A", *records[name]))
            self.sock.sendto(genuine.to_wire(), peer)

    def _send_forgery(self, kind: str, query: dns.message.Message, name: str,
                      peer: tuple[str, int]) -> None:
        sock = self.sock
        if kind == "question":
            forged = dns.message.make_response(dns.message.make_query(self.EVIL, "A"))
            forged.id = query.id
            owner = name  # the record is the name asked for: only the question gives it away
        else:
            forged = dns.message.make_response(query)
            owner = self.EVIL if kind == "owner" else name
            if kind == "id":
                forged.id = (query.id + 1) % 65536
            elif kind == "source":
                sock = self.spoof
        forged.answer.append(dns.rrset.from_text(owner, 0, "IN", "A", self.forged))
        sock.sendto(forged.to_wire(), peer)

    def stop(self) -> None:
        self._stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wake:
            wake.sendto(b"", self.server)
        self._thread.join(5)
        self.sock.close()
        self.spoof.close()


_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """A network namespace of this test's own, with its loopback up."""

    def __init__(self, name: str) -> None:
        assert IP is not None
        self.name = name
        subprocess.run([IP, "netns", "add", name], check=True, capture_output=True)
        self.run("link", "set", "lo", "up")

    def run(self, *args: str) -> None:
        assert IP is not None
        subprocess.run([IP, "-n", self.name, *args], check=True, capture_output=True)

    def exec_prefix(self) -> list[str]:
        assert IP is not None
        return [IP, "netns", "exec", self.name]

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket that lives in this namespace (made from a thread that joined it)."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def make() -> None:
            try:
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                finally:
                    os.close(fd)
                made.append(socket.socket(family, socket.SOCK_STREAM))
            except BaseException as exc:  # reported in the calling thread
                failed.append(exc)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        if failed:
            raise failed[0]
        return made[0]

    def delete(self) -> None:
        assert IP is not None
        subprocess.run([IP, "netns", "delete", self.name], capture_output=True)


def veth_pair(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A virtual cable between two namespaces (both ends inside namespaces of ours)."""
    assert IP is not None
    subprocess.run([IP, "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name",
                    b_if, "netns", b.name], check=True, capture_output=True)
    a.run("link", "set", a_if, "up")
    b.run("link", "set", b_if, "up")


def can_make_netns() -> str:
    """"" when this process may make network namespaces, else why not."""
    if IP is None:
        return "no `ip` command (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"fpprobe{os.getpid()}"
    made = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "delete", name], capture_output=True)
    return ""
