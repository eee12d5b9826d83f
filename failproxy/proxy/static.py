"""SPEC 10's static files: which request a file under `static.root` answers, and how.

Pure: no loop, no sockets. The client connection calls `StaticFiles.lookup` for a GET or HEAD
before any upstream is chosen; a `FileAnswer` is sent by the caller (status line, its own
Connection/Date/Server lines, these header pieces, then `length` bytes of `fd` from `offset` by
sendfile); None means no file answers and the request goes upstream as before.

Safety is decided on the request path before the file system is asked anything, and again on
what the file system says:
- the path is refused (None: upstream, never disk) when it could mean something other than the
  file it names: an encoded slash or backslash, NUL or another control character, a bad %-escape,
  invalid UTF-8, a `.`/`..` segment, or any segment starting with `.` (dot-files and dot-dirs:
  /.env, /.git/config, /.well-known/...: those are the app's to answer);
- each candidate is first stat'ed (one syscall: a miss, the common case, costs no more), then one
  that may be a file is resolved with realpath (symlinks followed) and must be strictly inside
  realpath(root), with no dot segment there either; the resolved path is opened with O_NOFOLLOW
  (it has no symlink left unless one was swapped in since) and O_NONBLOCK (a FIFO never blocks
  the open), and the opened fd is fstat'ed: only a regular file is served, so a file swapped for
  something else between the checks and the open is caught by what was actually opened.

root is resolved on every lookup, not once: a Capistrano-style root (/app/current/public, with
`current` swapped by each deploy) serves the new release the moment the link moves, as nginx does.
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
from email.utils import formatdate, mktime_tz, parsedate_tz
from typing import Final

from failproxy.config import StaticConfig
from failproxy.proxy.compress import accepts_gzip, header_list, header_value

# Types for the common web files, fixed so an answer does not depend on the box's
# /etc/mime.types; text types are declared UTF-8 (what every asset pipeline writes).
_WEB_TYPES: Final[dict[str, str]] = {
    "html": "text/html; charset=utf-8",
    "htm": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "mjs": "text/javascript; charset=utf-8",
    "json": "application/json",
    "map": "application/json",
    "svg": "image/svg+xml",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
    "ico": "image/x-icon",
    "txt": "text/plain; charset=utf-8",
    "xml": "text/xml; charset=utf-8",
    "woff": "font/woff",
    "woff2": "font/woff2",
    "pdf": "application/pdf",
    "wasm": "application/wasm",
    "gz": "application/gzip",
}
_OCTET: Final = b"application/octet-stream"

# The open flags for a candidate: see the module docstring.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY

# An error page is read whole into memory on the event loop: a page larger than this is not
# what error_pages is for, and falls back to the plain-text answer.
ERROR_PAGE_MAX: Final = 1 << 20

# One range, `bytes=first-last`, `first-` or `-suffix`; the unit is case-insensitive (RFC 9110
# 14.1). It admits no comma, so a value with several ranges never matches and is ignored.
_RANGE: Final = re.compile(rb"[Bb][Yy][Tt][Ee][Ss]=[ \t]*([0-9]*)-([0-9]*)[ \t]*")
# Entity tags in If-None-Match; a tag may contain a comma, so the list is not split on commas.
_ETAGS: Final = re.compile(rb'\*|(?:W/)?"[^"]*"')
# Past this many digits a position is larger than any file: parsed as this (and no huge int()).
_BIG: Final = 10**18

# What `parse_range` says besides a (first, last) pair.
UNSATISFIABLE: Final = (-1, -1)


class FileAnswer:
    """One answer from disk. `headers` are flat pieces (name, b": ", value, CRLF each) with
    Content-Length whenever the answer has a body to frame (200, 206, 416 even for HEAD), none on
    304; no status line and no Connection/Date/Server: those are the caller's. `fd` is -1 when
    no body is sent (304, 416, HEAD); otherwise it is the caller's to close."""

    __slots__ = ("fd", "headers", "length", "offset", "path", "status")

    def __init__(
        self, status: int, headers: list[bytes], fd: int, offset: int, length: int, path: str
    ) -> None:
        self.status = status
        self.headers = headers
        self.fd = fd
        self.offset = offset
        self.length = length
        self.path = path


def _unhex(c: int) -> int:
    """The value of one hex digit's byte, or -1."""
    if 48 <= c <= 57:
        return c - 48
    c |= 0x20  # lower case
    if 97 <= c <= 102:
        return c - 87
    return -1


def decode_path(raw: bytes) -> str | None:
    """The path of a request-target (query stripped by the caller), percent-decoded once, or None
    when it must not be served from disk: see the module docstring. `%2F` and `%5C` are refused
    rather than decoded: a path whose slashes differ from the URL's is not the URL's file."""
    if b"%" in raw:
        out = bytearray()
        i = 0
        while True:
            j = raw.find(b"%", i)
            if j < 0:
                out += raw[i:]
                break
            out += raw[i:j]
            if j + 2 >= len(raw):
                return None
            hi = _unhex(raw[j + 1])
            lo = _unhex(raw[j + 2])
            if hi < 0 or lo < 0:
                return None
            c = hi * 16 + lo
            if c == 0x2F:
                return None
            out.append(c)
            i = j + 3
        raw = bytes(out)
    for c in raw:
        if c < 0x20 or c == 0x7F or c == 0x5C:  # control characters (NUL among them), backslash
            return None
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not path.startswith("/"):
        return None
    for segment in path.split("/"):
        if segment.startswith("."):  # ".", ".." and every dot-file or dot-dir
            return None
    return path


def candidate(pattern: str, path: str) -> str | None:
    """A try_files pattern with `$uri` replaced by the decoded path, as a path relative to root
    with repeated slashes merged (as nginx's merge_slashes), or None when it names a directory
    (a trailing slash: "/docs/" is not "/docs") or has a dot segment (the pattern "$uri.html" on
    "/docs/" gives "/docs/.html", a dot-file)."""
    name = pattern.replace("$uri", path)
    if name.endswith("/"):
        return None
    parts = [s for s in name.split("/") if s]
    if not parts:
        return None
    for s in parts:
        if s.startswith("."):
            return None
    return "/".join(parts)


def _num(digits: bytes) -> int:
    return int(digits) if len(digits) <= 18 else _BIG


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """One Range value against a file of `size` bytes: (first, last) inclusive to send,
    UNSATISFIABLE (416), or None to ignore it and send the whole file: several ranges (serving
    them would need multipart/byteranges), another unit, or a malformed value, as nginx ignores a
    malformed one. `last < first` is unsatisfiable, as nginx answers it (RFC 9110 14.1.1 calls it
    invalid, and a set of only invalid ranges SHOULD get 416)."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None
    first_s, last_s = m.group(1), m.group(2)
    if not first_s:
        if not last_s:
            return None
        suffix = _num(last_s)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return (max(0, size - suffix), size - 1)
    first = _num(first_s)
    last = _num(last_s) if last_s else size - 1
    if first >= size or last < first:
        return UNSATISFIABLE
    return (first, min(last, size - 1))


def _http_date(value: bytes) -> int | None:
    """Seconds since the epoch of an HTTP-date, or None when it is not one."""
    try:
        parsed = parsedate_tz(value.decode("latin-1"))
    except (ValueError, TypeError, OverflowError):
        return None
    if parsed is None:
        return None
    try:
        return mktime_tz(parsed)
    except (ValueError, OverflowError):
        return None


def none_match(value: bytes, etag: bytes) -> bool:
    """Does If-None-Match `value` match `etag` (weak comparison, RFC 9110 13.1.2: W/ ignored on
    both sides; `*` matches any current representation)?"""
    ours = etag[2:] if etag.startswith(b"W/") else etag
    for tag in _ETAGS.findall(value):
        if tag == b"*":
            return True
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == ours:
            return True
    return False


def _range_still_valid(if_range: bytes, etag: bytes, mtime: int) -> bool:
    """Does If-Range name the current representation (RFC 9110 13.1.5)? An entity tag by strong
    comparison (a weak tag never matches), a date only by exact equality with Last-Modified."""
    if if_range.startswith(b'"'):
        return if_range == etag and not etag.startswith(b"W/")
    if if_range.startswith(b"W/"):
        return False
    return _http_date(if_range) == mtime


def _line(out: list[bytes], name: bytes, value: bytes) -> None:
    out += (name, b": ", value, b"\r\n")


class _Opened:
    """A candidate opened and fstat'ed: its fd (ours to close until handed on), what fstat said,
    and its real path."""

    __slots__ = ("fd", "path", "st")

    def __init__(self, fd: int, st: os.stat_result, path: str) -> None:
        self.fd = fd
        self.st = st
        self.path = path


class StaticFiles:
    """The files under one `static.root`, as SPEC 10 serves them. Built once per config; keeps
    no state between requests except a per-extension Content-Type cache."""

    __slots__ = ("_error_pages", "_gzip_static", "_mime", "_root", "_try_files", "_types")

    def __init__(self, cfg: StaticConfig) -> None:
        self._root = cfg.root
        self._try_files = cfg.try_files
        self._gzip_static = cfg.gzip_static
        self._error_pages = dict(cfg.error_pages)
        self._types: dict[str, bytes] = {k: v.encode() for k, v in _WEB_TYPES.items()}
        # Python's own table (not /etc/mime.types) for the rest, so answers are the same on
        # every box; read once, looked up per new extension.
        self._mime: dict[str, str] = dict(mimetypes.MimeTypes().types_map[True])

    def content_type(self, name: str) -> bytes:
        """The Content-Type for a file name, by its last extension; text types get UTF-8."""
        base = name.rpartition("/")[2]
        dot = base.rfind(".")
        ext = base[dot + 1 :].lower() if dot > 0 else ""
        known = self._types.get(ext)
        if known is not None:
            return known
        guess = self._mime.get("." + ext) if ext else None
        if guess is None:
            value = _OCTET
        elif guess.startswith("text/"):
            value = (guess + "; charset=utf-8").encode()
        else:
            value = guess.encode()
        if len(self._types) < 1024:  # extensions come from URLs: bounded
            self._types[ext] = value
        return value

    def _root_prefix(self) -> str:
        """realpath(root) with a trailing slash: what every served real path starts with."""
        real = os.path.realpath(self._root)
        return real if real.endswith("/") else real + "/"

    def _maybe(self, rel: str) -> bool:
        """Might root/rel be a file to serve? One stat, so a miss (most requests: the app's
        URLs) costs a syscall per candidate and not a realpath. Only a filter: a yes is checked
        again by `_open` on the resolved path and on the opened fd."""
        try:
            return stat.S_ISREG(os.stat(os.path.join(self._root, rel)).st_mode)
        except (OSError, ValueError):
            return False

    def _open(self, prefix: str, rel: str) -> _Opened | None:
        """Open root/rel if it resolves to a regular file strictly inside root, else None."""
        real = os.path.realpath(os.path.join(self._root, rel))
        if not real.startswith(prefix) or len(real) == len(prefix):
            return None
        if "/." in real[len(prefix) - 1 :]:  # a symlink into a dot-dir or onto a dot-file
            return None
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return _Opened(fd, st, real)

    def _regular(self, prefix: str, rel: str) -> bool:
        """Is root/rel a regular file inside root? Checked without opening it: the gzip sibling
        only decides Vary when the client does not take gzip."""
        real = os.path.realpath(os.path.join(self._root, rel))
        if not real.startswith(prefix) or len(real) == len(prefix):
            return False
        if "/." in real[len(prefix) - 1 :]:
            return False
        try:
            return stat.S_ISREG(os.stat(real).st_mode)
        except OSError:
            return False

    def lookup(self, method: bytes, target: bytes, headers: list[bytes]) -> FileAnswer | None:
        """The answer from disk for a request, or None: the request goes upstream. `target` is the
        raw origin-form request-target; `headers` the request's header pieces."""
        if not self._root or (method != b"GET" and method != b"HEAD"):
            return None
        raw = target.partition(b"?")[0]
        if b"#" in raw:
            return None
        path = decode_path(raw)
        if path is None:
            return None
        prefix = ""
        for pattern in self._try_files:
            rel = candidate(pattern, path)
            if rel is None or not self._maybe(rel):
                continue
            if not prefix:
                prefix = self._root_prefix()
            opened = self._open(prefix, rel)
            if opened is not None:
                return self._answer(method == b"HEAD", rel, opened, prefix, headers)
        return None

    def _answer(
        self, head: bool, rel: str, plain: _Opened, prefix: str, headers: list[bytes]
    ) -> FileAnswer:
        """The answer for an opened candidate: its gzip sibling chosen or not, then `_decide`.
        Every fd opened here is closed exactly once unless handed on in the answer."""
        served = plain
        try:
            vary = gzipped = False
            if self._gzip_static:
                ae = header_list(headers, b"accept-encoding")
                if ae is not None and accepts_gzip(ae):
                    gz = self._open(prefix, rel + ".gz") if self._maybe(rel + ".gz") else None
                    if gz is not None:
                        vary = gzipped = True
                        served = gz
                        os.close(plain.fd)
                else:
                    vary = self._maybe(rel + ".gz") and self._regular(prefix, rel + ".gz")
            answer = self._decide(head, rel, served.st, vary, gzipped, headers)
        except BaseException:
            os.close(served.fd)
            raise
        answer.path = served.path
        if answer.length == 0:
            os.close(served.fd)
        else:
            answer.fd = served.fd
        return answer

    def _decide(
        self,
        head: bool,
        rel: str,
        st: os.stat_result,
        vary: bool,
        gzipped: bool,
        headers: list[bytes],
    ) -> FileAnswer:
        """Status, headers and byte span for a file as fstat describes it (fd and path are filled
        in by the caller): 304 when a conditional matches (If-None-Match, when present, decides
        alone, RFC 9110 13.2.2), else 416/206 for a Range, else 200."""
        size = st.st_size
        mtime = int(st.st_mtime)
        etag = b'"%x-%x"' % (mtime, size)
        last_modified = formatdate(mtime, usegmt=True).encode()
        out: list[bytes] = []

        inm = header_list(headers, b"if-none-match")
        if inm is not None:
            not_modified = none_match(inm, etag)
        else:
            ims = header_value(headers, b"if-modified-since")
            since = _http_date(ims) if ims is not None else None
            not_modified = since is not None and mtime <= since
        if not_modified:
            _line(out, b"Last-Modified", last_modified)
            _line(out, b"ETag", etag)
            if vary:
                _line(out, b"Vary", b"Accept-Encoding")
            return FileAnswer(304, out, -1, 0, 0, "")

        first, last = 0, size - 1
        status = 200
        # Range is defined for GET only (RFC 9110 14.2: MUST be ignored for HEAD).
        rng = None if head else header_value(headers, b"range")
        if rng is not None:
            if_range = header_value(headers, b"if-range")
            if if_range is None or _range_still_valid(if_range, etag, mtime):
                span = parse_range(rng, size)
                if span == UNSATISFIABLE:
                    _line(out, b"Content-Length", b"0")
                    _line(out, b"Last-Modified", last_modified)
                    _line(out, b"ETag", etag)
                    _line(out, b"Accept-Ranges", b"bytes")
                    _line(out, b"Content-Range", b"bytes */%d" % size)
                    if vary:
                        _line(out, b"Vary", b"Accept-Encoding")
                    return FileAnswer(416, out, -1, 0, 0, "")
                if span is not None:
                    first, last = span
                    status = 206
        length = last - first + 1
        _line(out, b"Content-Type", self.content_type(rel))
        _line(out, b"Content-Length", b"%d" % length)
        _line(out, b"Last-Modified", last_modified)
        _line(out, b"ETag", etag)
        _line(out, b"Accept-Ranges", b"bytes")
        if status == 206:
            _line(out, b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))
        if gzipped:
            _line(out, b"Content-Encoding", b"gzip")
        if vary:
            _line(out, b"Vary", b"Accept-Encoding")
        if head:
            return FileAnswer(status, out, -1, 0, 0, "")
        return FileAnswer(status, out, -1, first, length, "")

    def error_page(self, status: int) -> tuple[bytes, bytes] | None:
        """(Content-Type, body) of the page static.error_pages maps `status` to, read from under
        root with the same path safety as a request, or None: no mapping, or the page is missing,
        unreadable, not a regular file or larger than ERROR_PAGE_MAX (the caller then sends its
        plain-text answer). Read on every call: a deploy that changes the page is seen at once."""
        page = self._error_pages.get(status)
        if page is None or not self._root:
            return None
        try:
            encoded = page.encode("utf-8")
        except UnicodeEncodeError:
            return None
        # A configured path, not a URL: a "%" in it is a "%" (decode_path checks the rest).
        path = decode_path(encoded.replace(b"%", b"%25"))
        if path is None:
            return None
        rel = candidate("$uri", path)
        if rel is None:
            return None
        opened = self._open(self._root_prefix(), rel)
        if opened is None:
            return None
        try:
            if opened.st.st_size > ERROR_PAGE_MAX:
                return None
            chunks: list[bytes] = []
            got = 0
            while got <= ERROR_PAGE_MAX:
                chunk = os.read(opened.fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got > ERROR_PAGE_MAX:
                return None
        except OSError:
            return None
        finally:
            os.close(opened.fd)
        return (self.content_type(rel), b"".join(chunks))
