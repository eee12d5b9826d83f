"""The TLS server context of `server.tls_listen`, built from `server.tls_cert` / `server.tls_key`.

TLS 1.2 at least, ALPN `http/1.1` (the only protocol failproxy speaks), no passphrase prompt.

The master builds it (at start and on every HUP, so a renewed certificate is served after a
reload and a broken one fails the reload) and `adopt`s it; the workers it forks afterwards
inherit that very context through fork(), as nginx's do. So a worker serves exactly what the
master checked, and needs no read access to the key after dropping to `server.user`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Protocol

from failproxy.errors import ConfigError


class ServerConfig(Protocol):
    """What TLS needs of `[server]` (config.ServerConfig)."""

    @property
    def tls_listen(self) -> Sequence[object]: ...

    @property
    def tls_cert(self) -> str: ...

    @property
    def tls_key(self) -> str: ...

ALPN = ["http/1.1"]


class TLSError(ConfigError):
    """The certificate or key cannot be used; `key` is `tls_cert` or `tls_key`."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__([f"server.{key}: {detail}"])
        self.key = key
        self.detail = detail


def _read(key: str, path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise TLSError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None


def build(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context with this certificate chain and key; TLSError names the file at fault."""
    cert_text = _read("tls_cert", cert_path)
    key_text = _read("tls_key", key_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=cert_text)
    except (ssl.SSLError, ValueError):
        raise TLSError("tls_cert", f"no PEM certificate in {cert_path!r}") from None
    try:
        ctx.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except OSError as exc:  # ssl.SSLError is an OSError too
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            detail = f"the key in {key_path!r} does not match the certificate in server.tls_cert"
        elif "ENCRYPTED" in key_text:
            detail = f"{key_path!r} is encrypted: failproxy needs the key without a passphrase"
        elif isinstance(exc, ssl.SSLError):
            detail = f"no usable PEM private key in {key_path!r}"
        else:
            detail = f"cannot load {key_path!r}: {exc.strerror or exc}"
        raise TLSError("tls_key", f"cannot load the certificate and key: {detail}") from None
    return ctx


def load(server: ServerConfig) -> ssl.SSLContext | None:
    """The context `server` needs (None without `tls_listen`); raises TLSError."""
    if not server.tls_listen:
        return None
    return build(server.tls_cert, server.tls_key)


_adopted: tuple[ServerConfig, ssl.SSLContext] | None = None


def adopt(server: ServerConfig, ctx: ssl.SSLContext | None) -> None:
    """Master: workers forked from now on with this config (this very object) serve `ctx`."""
    global _adopted
    _adopted = (server, ctx) if ctx is not None else None


def server_context(server: ServerConfig) -> ssl.SSLContext:
    """Worker: the context the master adopted for this config, else one built now."""
    if _adopted is not None and _adopted[0] is server:
        return _adopted[1]
    ctx = load(server)
    if ctx is None:
        raise TLSError("tls_listen", "no TLS listener configured")
    return ctx
