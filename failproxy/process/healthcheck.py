"""`python -m failproxy.process.healthcheck [CONFIG]`: GET /healthz on the admin endpoint that
CONFIG names.

The Docker image's HEALTHCHECK. Exit 0 when it answers 200 (the proxy serves), 1 otherwise, with
one line saying why. Only `admin.listen` is read from CONFIG, so a config being edited on disk
does not make a serving proxy look unhealthy; a wildcard address is asked on loopback.
"""

from __future__ import annotations

import http.client
import socket
import sys
import tomllib

from failproxy.config import parse_address

DEFAULT_CONFIG = "/etc/failproxy/config.toml"
TIMEOUT = 2.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def _connection(listen: str) -> http.client.HTTPConnection:
    address = parse_address(listen)
    if address.is_unix:
        return _UnixConnection(address.path, TIMEOUT)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    return http.client.HTTPConnection(host, address.port, timeout=TIMEOUT)


def check(config_path: str) -> tuple[bool, str]:
    try:
        with open(config_path, "rb") as f:
            admin = tomllib.load(f).get("admin", {})
        listen = admin.get("listen", "") if isinstance(admin, dict) else ""
        if not listen or not isinstance(listen, str):
            return False, f"{config_path}: no admin.listen, and the health check asks it"
        conn = _connection(listen)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        return False, f"{config_path}: {exc}"
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read(200).decode("ascii", "replace").strip()
    except OSError as exc:
        return False, f"{listen}: {exc}"
    finally:
        conn.close()
    return resp.status == 200, f"{listen}: {resp.status} {body}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ok, line = check(args[0] if args else DEFAULT_CONFIG)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
