"""SPEC 10's static files against a real directory: path safety, try_files, types, validators,
conditionals, ranges, gzip_static, HEAD, error pages. No sockets: `lookup` is pure file system."""

from __future__ import annotations

import gc
import gzip
import os
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from failproxy.config import StaticConfig
from failproxy.proxy.static import (
    UNSATISFIABLE,
    FileAnswer,
    StaticFiles,
    candidate,
    decode_path,
    none_match,
    parse_range,
)

MTIME = 1_700_000_000
TEN = b"0123456789"
CSS = b"body { color: red; }\n" * 50


def hdrs(*pairs: tuple[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in pairs:
        out += (name, b": ", value, b"\r\n")
    return out


def as_dict(lines: list[bytes]) -> dict[bytes, bytes]:
    assert len(lines) % 4 == 0
    out: dict[bytes, bytes] = {}
    for i in range(0, len(lines), 4):
        assert lines[i + 1] == b": " and lines[i + 3] == b"\r\n"
        assert lines[i] not in out, "a header line written twice"
        out[lines[i]] = lines[i + 2]
    return out


def body(answer: FileAnswer) -> bytes:
    """The bytes the caller would sendfile; closes the fd as the caller must."""
    assert answer.fd >= 0
    try:
        return os.pread(answer.fd, answer.length, answer.offset)
    finally:
        os.close(answer.fd)


def etag_of(path: Path) -> bytes:
    st = path.stat()
    return b'"%x-%x"' % (int(st.st_mtime), st.st_size)


def open_fds() -> dict[int, str]:
    """This process's open fds and what each one is open on."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own fd, closed by now
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    public = tmp_path / "public"
    public.mkdir()
    (public / "a.txt").write_bytes(TEN)
    (public / "a b.txt").write_bytes(b"spaced")
    (public / "index.html").write_bytes(b"<h1>home</h1>")
    (public / "docs").mkdir()
    (public / "docs" / "index.html").write_bytes(b"<h1>docs</h1>")
    (public / "about.html").write_bytes(b"<h1>about</h1>")
    (public / "both").write_bytes(b"plain both")
    (public / "both.html").write_bytes(b"<h1>both</h1>")
    (public / "emptydir").mkdir()
    (public / "empty.txt").write_bytes(b"")
    (public / "a").mkdir()
    (public / "a" / "b").write_bytes(b"a/b")
    (public / ".env").write_bytes(b"SECRET=1")
    (public / ".git").mkdir()
    (public / ".git" / "config").write_bytes(b"[core]")
    (public / "style.css").write_bytes(CSS)
    (public / "style.css.gz").write_bytes(gzip.compress(CSS))
    (public / "nogz.css").write_bytes(CSS)
    (public / "500.html").write_bytes(b"<h1>sorry</h1>")
    for name in [
        "x.js", "x.json", "x.svg", "x.png", "x.jpg", "x.gif", "x.webp", "x.ico", "x.xml",
        "x.woff", "x.woff2", "x.pdf", "x.wasm", "x.unknownext", "noext", "x.csv", "X.PNG",
    ]:  # fmt: skip
        (public / name).write_bytes(b"data")
    # Outside root.
    (tmp_path / "x").write_bytes(b"outside")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.txt").write_bytes(b"key")
    # Symlinks: inside root (fine) and escaping it (never served).
    (public / "alias.txt").symlink_to("a.txt")
    (public / "passwd").symlink_to("/etc/passwd")
    (public / "out").symlink_to(tmp_path / "secret")
    (public / "conf").symlink_to(".git/config")
    (public / "loop").symlink_to("loop")
    for path in public.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (MTIME, MTIME))
    return public


@pytest.fixture
def files(root: Path) -> StaticFiles:
    return StaticFiles(StaticConfig(root=str(root), error_pages=((502, "/500.html"),)))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test: the fds lookup opened are closed, or handed on and closed by `body`. Only an
    fd that is new counts: garbage of an earlier test (a socket, a file) may be finalized while
    this one runs and close an fd that was open before (under make test-stress a count went
    from 19 to 18). Collecting first makes that rarer; comparing what each fd is open on
    ignores it, and still sees a leaked fd that took a freed number."""
    gc.collect()
    before = open_fds()
    yield
    leaked = {fd: what for fd, what in open_fds().items() if before.get(fd) != what}
    assert not leaked, f"fds left open: {leaked}"


def get(files: StaticFiles, target: bytes, *pairs: tuple[bytes, bytes]) -> FileAnswer | None:
    return files.lookup(b"GET", target, hdrs(*pairs))


# ---------------------------------------------------------------- path safety


@pytest.mark.parametrize(
    "target",
    [
        b"/../x",
        b"/a/../../x",
        b"/%2e%2e/x",
        b"/%2E%2E/x",
        b"/.%2e/x",
        b"/a/%2F..%2Fb",
        b"/a%2fb",
        b"/a%5c..%5cb",
        b"/a\\b",
        b"/%00",
        b"/a.txt%00",
        b"/a.txt\x00",
        b"/a/./b",
        b"/./a.txt",
        b"/a/.",
        b"/.env",
        b"/.git/config",
        b"/%2egit/config",
        b"/passwd",  # symlink to /etc/passwd inside root
        b"/out/key.txt",  # symlinked directory escaping root
        b"/conf",  # symlink inside root onto a dot-file
        b"/loop",  # symlink loop
        b"/%ff.txt",  # invalid UTF-8
        b"/%zz",  # invalid escape
        b"/a.txt%",
        b"/a.txt%4",
        b"/a%0a.txt",  # control character
        b"/a.txt#frag",
        b"*",
        b"http://example.com/a.txt",  # absolute form: not a path
    ],
)
def test_path_escapes_go_upstream(files: StaticFiles, target: bytes) -> None:
    assert get(files, target) is None


def test_the_escape_targets_exist(root: Path) -> None:
    """The refusals above are refusals, not misses: the files they aim at are there."""
    assert (root.parent / "x").is_file()
    assert (root / "passwd").is_file()
    assert (root / "out" / "key.txt").is_file()
    assert (root / ".env").is_file()
    assert (root / "a" / "b").is_file()


def test_symlink_inside_root_is_served(files: StaticFiles, root: Path) -> None:
    answer = get(files, b"/alias.txt")
    assert answer is not None and answer.status == 200
    assert answer.path == str(root / "a.txt")
    assert body(answer) == TEN


def test_root_itself_through_a_symlink_follows_a_deploy(tmp_path: Path) -> None:
    """root = /app/current/public with `current` swapped per release: the new one is served."""
    for release in ("r1", "r2"):
        (tmp_path / release / "public").mkdir(parents=True)
        (tmp_path / release / "public" / "v.txt").write_bytes(release.encode())
    (tmp_path / "current").symlink_to(tmp_path / "r1")
    files = StaticFiles(StaticConfig(root=str(tmp_path / "current" / "public")))
    first = get(files, b"/v.txt")
    assert first is not None and body(first) == b"r1"
    (tmp_path / "next").symlink_to(tmp_path / "r2")
    os.replace(tmp_path / "next", tmp_path / "current")
    second = get(files, b"/v.txt")
    assert second is not None and body(second) == b"r2"


def test_fifo_is_not_served_and_does_not_block(files: StaticFiles, root: Path) -> None:
    os.mkfifo(root / "pipe.txt")
    assert get(files, b"/pipe.txt") is None


def test_the_stat_filter_is_only_a_filter(
    files: StaticFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the first stat to say yes to everything (a file swapped after it), the checks on the
    resolved path and on the opened fd still refuse what is not a regular file inside root."""
    monkeypatch.setattr(StaticFiles, "_maybe", lambda self, rel: True)
    os.mkfifo(root / "pipe.txt")
    for target in (b"/pipe.txt", b"/emptydir", b"/passwd", b"/out/key.txt", b"/conf", b"/nope"):
        assert get(files, target) is None, target
    served = get(files, b"/a.txt")
    assert served is not None and body(served) == TEN


def test_a_miss_resolves_nothing(files: StaticFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """Most requests are the app's: they cost a stat per candidate, no realpath."""
    calls: list[str] = []
    real = os.path.realpath

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(os.path, "realpath", counting)
    assert get(files, b"/users/123/edit") is None
    assert calls == []
    hit = get(files, b"/a.txt")
    assert hit is not None and calls  # a hit is resolved
    body(hit)


@pytest.mark.parametrize(("name", "target"), [("a\nb.txt", b"/a%0Ab.txt"), ("a\\b", b"/a%5Cb")])
def test_odd_names_refused_even_when_they_exist(
    files: StaticFiles, root: Path, name: str, target: bytes
) -> None:
    (root / name).write_bytes(b"never")
    assert get(files, target) is None


def test_unreadable_file_goes_upstream(files: StaticFiles, root: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    (root / "a.txt").chmod(0)
    assert get(files, b"/a.txt") is None


@pytest.mark.parametrize(
    "raw",
    [b"/.env", b"/a/./b", b"/a/../b", b"/%2e%2e/x", b"/.git/config", b"/a/.", b"a.txt", b""],
)
def test_decode_path_refuses_dot_segments(raw: bytes) -> None:
    """Refused by the request path alone, before try_files or the file system are asked."""
    assert decode_path(raw) is None


def test_fragment_is_refused_even_when_such_a_file_exists(files: StaticFiles, root: Path) -> None:
    (root / "a.txt#frag").write_bytes(b"never")
    assert get(files, b"/a.txt#frag") is None


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/a%20b.txt", "/a b.txt"),
        (b"/%C3%A9t%C3%A9", "/\u00e9t\u00e9"),
        (b"/%25", "/%"),  # decoded once: %25 is "%", not the start of another escape
        (b"//a//b/", "//a//b/"),
    ],
)
def test_decode_path(raw: bytes, path: str) -> None:
    assert decode_path(raw) == path


@pytest.mark.parametrize(
    ("pattern", "path", "rel"),
    [
        ("$uri", "/a.txt", "a.txt"),
        ("$uri/index.html", "/", "index.html"),
        ("$uri/index.html", "/docs/", "docs/index.html"),
        ("$uri.html", "/about", "about.html"),
        ("$uri", "/docs/", None),  # a directory reference
        ("$uri.html", "/docs/", None),  # "/docs/.html" is a dot-file
        ("$uri", "//a//b", "a/b"),
        ("/maintenance.html", "/anything", "maintenance.html"),
    ],
)
def test_candidate(pattern: str, path: str, rel: str | None) -> None:
    assert candidate(pattern, path) == rel


# ---------------------------------------------------------------- try_files


def test_try_files_order(files: StaticFiles, root: Path) -> None:
    a = get(files, b"/a.txt?x=1&y=../../etc")
    assert a is not None and a.path == str(root / "a.txt") and body(a) == TEN
    docs = get(files, b"/docs")  # a directory: $uri/index.html
    assert docs is not None and docs.path == str(root / "docs" / "index.html")
    body(docs)
    docs_slash = get(files, b"/docs/")
    assert docs_slash is not None and docs_slash.path == str(root / "docs" / "index.html")
    body(docs_slash)
    about = get(files, b"/about")  # $uri.html
    assert about is not None and about.path == str(root / "about.html")
    body(about)
    both = get(files, b"/both")  # $uri wins over $uri.html
    assert both is not None and both.path == str(root / "both")
    body(both)
    home = get(files, b"/")
    assert home is not None and home.path == str(root / "index.html")
    body(home)
    spaced = get(files, b"/a%20b.txt")
    assert spaced is not None and body(spaced) == b"spaced"
    merged = get(files, b"//a.txt")
    assert merged is not None and body(merged) == TEN


def test_try_files_misses(files: StaticFiles) -> None:
    assert get(files, b"/emptydir") is None  # a directory alone is not a file
    assert get(files, b"/missing") is None
    assert get(files, b"/a.txt/") is None  # not a.txt: the slash names a directory
    assert get(files, b"/a.txt/x") is None


def test_try_files_as_configured(root: Path) -> None:
    files = StaticFiles(StaticConfig(root=str(root), try_files=("$uri",)))
    assert get(files, b"/docs") is None
    assert get(files, b"/about") is None


def test_off_and_other_methods(root: Path, files: StaticFiles) -> None:
    assert StaticFiles(StaticConfig(root="")).lookup(b"GET", b"/a.txt", []) is None
    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"):
        assert files.lookup(method, b"/a.txt", []) is None


# ---------------------------------------------------------------- types and validators


@pytest.mark.parametrize(
    ("target", "ctype"),
    [
        (b"/a.txt", b"text/plain; charset=utf-8"),
        (b"/index.html", b"text/html; charset=utf-8"),
        (b"/style.css", b"text/css; charset=utf-8"),
        (b"/x.js", b"text/javascript; charset=utf-8"),
        (b"/x.json", b"application/json"),
        (b"/x.svg", b"image/svg+xml"),
        (b"/x.png", b"image/png"),
        (b"/X.PNG", b"image/png"),
        (b"/x.jpg", b"image/jpeg"),
        (b"/x.gif", b"image/gif"),
        (b"/x.webp", b"image/webp"),
        (b"/x.ico", b"image/x-icon"),
        (b"/x.xml", b"text/xml; charset=utf-8"),
        (b"/x.woff", b"font/woff"),
        (b"/x.woff2", b"font/woff2"),
        (b"/x.pdf", b"application/pdf"),
        (b"/x.wasm", b"application/wasm"),
        (b"/x.csv", b"text/csv; charset=utf-8"),  # Python's table, a text type
        (b"/x.unknownext", b"application/octet-stream"),
        (b"/noext", b"application/octet-stream"),
        (b"/about", b"text/html; charset=utf-8"),  # by the candidate's name, about.html
    ],
)
def test_content_type(files: StaticFiles, target: bytes, ctype: bytes) -> None:
    answer = files.lookup(b"HEAD", target, [])
    assert answer is not None
    assert as_dict(answer.headers)[b"Content-Type"] == ctype


def test_plain_200_headers(files: StaticFiles) -> None:
    answer = get(files, b"/a.txt")
    assert answer is not None and answer.status == 200
    assert answer.offset == 0 and answer.length == 10
    h = as_dict(answer.headers)
    assert h == {
        b"Content-Type": b"text/plain; charset=utf-8",
        b"Content-Length": b"10",
        b"Last-Modified": formatdate(MTIME, usegmt=True).encode(),
        b"ETag": b'"6553f100-a"',
        b"Accept-Ranges": b"bytes",
    }
    assert h[b"Last-Modified"] == b"Tue, 14 Nov 2023 22:13:20 GMT"
    assert body(answer) == TEN


def test_empty_file(files: StaticFiles) -> None:
    answer = get(files, b"/empty.txt")
    assert answer is not None and answer.status == 200
    assert answer.fd == -1 and answer.length == 0
    assert as_dict(answer.headers)[b"Content-Length"] == b"0"


def test_head_same_headers_no_body(files: StaticFiles) -> None:
    got = get(files, b"/a.txt")
    head = files.lookup(b"HEAD", b"/a.txt", [])
    assert got is not None and head is not None
    body(got)
    assert head.status == 200 and head.fd == -1 and head.length == 0
    assert head.headers == got.headers


def test_head_ignores_range(files: StaticFiles) -> None:
    """RFC 9110 14.2: range handling is defined for GET only."""
    head = files.lookup(b"HEAD", b"/a.txt", hdrs((b"Range", b"bytes=0-4")))
    assert head is not None and head.status == 200 and head.fd == -1
    assert as_dict(head.headers)[b"Content-Length"] == b"10"


# ---------------------------------------------------------------- conditionals

LM = formatdate(MTIME, usegmt=True).encode()
ETAG = b'"6553f100-a"'


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"If-None-Match", ETAG)],
        [(b"if-none-match", b"W/" + ETAG)],  # weak comparison
        [(b"If-None-Match", b'"other", ' + ETAG)],
        [(b"If-None-Match", b'"other"'), (b"If-None-Match", ETAG)],  # a list over two lines
        [(b"If-None-Match", b"*")],
        [(b"If-Modified-Since", LM)],
        [(b"If-Modified-Since", formatdate(MTIME + 60, usegmt=True).encode())],
        [(b"If-None-Match", ETAG), (b"If-Modified-Since", b"Mon, 01 Jan 1990 00:00:00 GMT")],
    ],
)
def test_304(files: StaticFiles, pairs: list[tuple[bytes, bytes]]) -> None:
    for method in (b"GET", b"HEAD"):
        answer = files.lookup(method, b"/a.txt", hdrs(*pairs, (b"Range", b"bytes=0-1")))
        assert answer is not None and answer.status == 304
        assert answer.fd == -1 and answer.length == 0
        assert as_dict(answer.headers) == {b"Last-Modified": LM, b"ETag": ETAG}


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"If-None-Match", b'"other"')],
        [(b"If-None-Match", b'"6553f100-b"')],
        [(b"If-Modified-Since", formatdate(MTIME - 1, usegmt=True).encode())],
        [(b"If-Modified-Since", b"not a date")],
        # If-None-Match present decides alone: a matching If-Modified-Since does not give 304.
        [(b"If-None-Match", b'"other"'), (b"If-Modified-Since", LM)],
    ],
)
def test_not_304(files: StaticFiles, pairs: list[tuple[bytes, bytes]]) -> None:
    answer = get(files, b"/a.txt", *pairs)
    assert answer is not None and answer.status == 200
    assert body(answer) == TEN


def test_none_match_parsing() -> None:
    assert none_match(b'"a,b", "c"', b'"a,b"')  # a comma inside a tag is not a separator
    assert not none_match(b'"a"', b'"b"')
    assert not none_match(b"", b'"b"')


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("value", "span", "data"),
    [
        (b"bytes=0-4", (0, 4), b"01234"),
        (b"bytes=-3", (7, 9), b"789"),
        (b"bytes=5-", (5, 9), b"56789"),
        (b"bytes=9-9", (9, 9), b"9"),
        (b"bytes=2-100", (2, 9), b"23456789"),  # last past the end: clamped
        (b"bytes=-100", (0, 9), TEN),  # suffix longer than the file: all of it
        (b"BYTES=1-2", (1, 2), b"12"),
    ],
)
def test_206(files: StaticFiles, value: bytes, span: tuple[int, int], data: bytes) -> None:
    answer = get(files, b"/a.txt", (b"Range", value))
    assert answer is not None and answer.status == 206
    h = as_dict(answer.headers)
    assert h[b"Content-Range"] == b"bytes %d-%d/10" % span
    assert h[b"Content-Length"] == b"%d" % len(data)
    assert h[b"Accept-Ranges"] == b"bytes"
    assert (answer.offset, answer.length) == (span[0], len(data))
    assert body(answer) == data


@pytest.mark.parametrize("value", [b"bytes=100-", b"bytes=10-", b"bytes=10-20", b"bytes=-0"])
def test_416(files: StaticFiles, value: bytes) -> None:
    answer = get(files, b"/a.txt", (b"Range", value))
    assert answer is not None and answer.status == 416
    assert answer.fd == -1 and answer.length == 0
    h = as_dict(answer.headers)
    assert h[b"Content-Range"] == b"bytes */10"
    assert h[b"Content-Length"] == b"0"


@pytest.mark.parametrize(
    "value",
    [
        b"bytes=0-1,3-4",  # several ranges: ignored
        b"bytes=0-1, 5-",
        b"bytes=abc",  # malformed: ignored
        b"bytes=",
        b"bytes=-",
        b"bytes=1-2-3",
        b"bytes 0-4",
        b"items=0-4",  # another unit
        b"bytes=+1-2",
    ],
)
def test_range_ignored(files: StaticFiles, value: bytes) -> None:
    answer = get(files, b"/a.txt", (b"Range", value))
    assert answer is not None and answer.status == 200
    assert b"Content-Range" not in as_dict(answer.headers)
    assert body(answer) == TEN


def test_if_range(files: StaticFiles) -> None:
    rng = (b"Range", b"bytes=0-4")
    same = get(files, b"/a.txt", rng, (b"If-Range", ETAG))
    assert same is not None and same.status == 206 and body(same) == b"01234"
    by_date = get(files, b"/a.txt", rng, (b"If-Range", LM))
    assert by_date is not None and by_date.status == 206 and body(by_date) == b"01234"
    for stale in (b'"other"', b"W/" + ETAG, formatdate(MTIME + 1, usegmt=True).encode()):
        answer = get(files, b"/a.txt", rng, (b"If-Range", stale))
        assert answer is not None and answer.status == 200, stale
        assert body(answer) == TEN


def test_parse_range_edges() -> None:
    assert parse_range(b"bytes=0-", 0) == UNSATISFIABLE
    assert parse_range(b"bytes=-5", 0) == UNSATISFIABLE
    assert parse_range(b"bytes=5-2", 10) == UNSATISFIABLE  # last before first, as nginx
    assert parse_range(b"bytes=" + b"9" * 5000 + b"-", 10) == UNSATISFIABLE
    assert parse_range(b"bytes=0-" + b"9" * 5000, 10) == (0, 9)
    assert parse_range(b" bytes=1-2 ", 10) == (1, 2)


# ---------------------------------------------------------------- gzip_static


def test_gzip_static_served(files: StaticFiles, root: Path) -> None:
    answer = get(files, b"/style.css", (b"Accept-Encoding", b"br, gzip;q=0.5"))
    assert answer is not None and answer.status == 200
    assert answer.path == str(root / "style.css.gz")
    h = as_dict(answer.headers)
    gz = (root / "style.css.gz").read_bytes()
    assert h[b"Content-Type"] == b"text/css; charset=utf-8"
    assert h[b"Content-Encoding"] == b"gzip"
    assert h[b"Vary"] == b"Accept-Encoding"
    assert h[b"Content-Length"] == b"%d" % len(gz)
    assert h[b"ETag"] == etag_of(root / "style.css.gz")
    assert h[b"ETag"] != etag_of(root / "style.css")
    data = body(answer)
    assert data == gz and gzip.decompress(data) == CSS


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [(b"Accept-Encoding", b"br")],
        [(b"Accept-Encoding", b"gzip;q=0")],
        [(b"Accept-Encoding", b"gzip;q=0, *")],
    ],
)
def test_gzip_static_plain_still_varies(
    files: StaticFiles, root: Path, pairs: list[tuple[bytes, bytes]]
) -> None:
    answer = get(files, b"/style.css", *pairs)
    assert answer is not None and answer.path == str(root / "style.css")
    h = as_dict(answer.headers)
    assert b"Content-Encoding" not in h
    assert h[b"Vary"] == b"Accept-Encoding"
    assert h[b"Content-Length"] == b"%d" % len(CSS)
    assert body(answer) == CSS


def test_gzip_static_wildcard_accepts(files: StaticFiles, root: Path) -> None:
    answer = get(files, b"/style.css", (b"accept-encoding", b"*"))
    assert answer is not None and answer.path == str(root / "style.css.gz")
    body(answer)


def test_no_gz_sibling_no_vary(files: StaticFiles) -> None:
    answer = get(files, b"/nogz.css", (b"Accept-Encoding", b"gzip"))
    assert answer is not None
    h = as_dict(answer.headers)
    assert b"Vary" not in h and b"Content-Encoding" not in h
    body(answer)


def test_gzip_static_off(root: Path) -> None:
    files = StaticFiles(StaticConfig(root=str(root), gzip_static=False))
    answer = get(files, b"/style.css", (b"Accept-Encoding", b"gzip"))
    assert answer is not None and answer.path == str(root / "style.css")
    h = as_dict(answer.headers)
    assert b"Vary" not in h and b"Content-Encoding" not in h
    assert body(answer) == CSS


def test_gz_sibling_escaping_root_is_not_used(files: StaticFiles, root: Path) -> None:
    (root.parent / "evil.gz").write_bytes(b"not yours")
    (root / "nogz.css.gz").symlink_to(root.parent / "evil.gz")
    answer = get(files, b"/nogz.css", (b"Accept-Encoding", b"gzip"))
    assert answer is not None and answer.path == str(root / "nogz.css")
    assert b"Vary" not in as_dict(answer.headers)
    assert body(answer) == CSS
    plain = get(files, b"/nogz.css")
    assert plain is not None and b"Vary" not in as_dict(plain.headers)
    body(plain)


def test_gz_sibling_directory_is_not_used(files: StaticFiles, root: Path) -> None:
    (root / "nogz.css.gz").mkdir()
    answer = get(files, b"/nogz.css", (b"Accept-Encoding", b"gzip"))
    assert answer is not None and answer.path == str(root / "nogz.css")
    assert b"Vary" not in as_dict(answer.headers)
    body(answer)


def test_gzip_static_conditionals_use_the_gz_validators(files: StaticFiles, root: Path) -> None:
    ae = (b"Accept-Encoding", b"gzip")
    gz_tag = etag_of(root / "style.css.gz")
    hit = get(files, b"/style.css", ae, (b"If-None-Match", gz_tag))
    assert hit is not None and hit.status == 304
    assert as_dict(hit.headers)[b"Vary"] == b"Accept-Encoding"
    miss = get(files, b"/style.css", ae, (b"If-None-Match", etag_of(root / "style.css")))
    assert miss is not None and miss.status == 200
    body(miss)
    part = get(files, b"/style.css", ae, (b"Range", b"bytes=0-1"))
    assert part is not None and part.status == 206
    assert body(part) == b"\x1f\x8b"  # the first bytes of the gzip file
    assert as_dict(part.headers)[b"Content-Encoding"] == b"gzip"


def test_head_of_gzip_static(files: StaticFiles) -> None:
    ae = (b"Accept-Encoding", b"gzip")
    got = get(files, b"/style.css", ae)
    head = files.lookup(b"HEAD", b"/style.css", hdrs(ae))
    assert got is not None and head is not None
    body(got)
    assert head.fd == -1 and head.headers == got.headers


# ---------------------------------------------------------------- error pages


def test_error_page(files: StaticFiles) -> None:
    assert files.error_page(502) == (b"text/html; charset=utf-8", b"<h1>sorry</h1>")
    assert files.error_page(503) is None  # no mapping


@pytest.mark.parametrize(
    "page", ["/missing.html", "/../x", "/.env", "/passwd", "/out/key.txt", "/docs", "/a/./b"]
)
def test_error_page_refused(root: Path, page: str) -> None:
    files = StaticFiles(StaticConfig(root=str(root), error_pages=((504, page),)))
    assert files.error_page(504) is None


def test_error_page_percent_is_literal(root: Path) -> None:
    (root / "50%.html").write_bytes(b"half")
    files = StaticFiles(StaticConfig(root=str(root), error_pages=((500, "/50%.html"),)))
    assert files.error_page(500) == (b"text/html; charset=utf-8", b"half")


def test_error_page_off_without_root() -> None:
    files = StaticFiles(StaticConfig(root="", error_pages=((502, "/500.html"),)))
    assert files.error_page(502) is None
