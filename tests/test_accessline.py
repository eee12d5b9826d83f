"""The access-log line's two twins (telemetry/accessline.py): the Cython one and the pure one
make the same bytes for the same record, and the build that runs uses the one it says.

The compiled run checks both against each other; the pure-Python run (`make test` runs this file
on both builds) checks the pure twin against a line written out here, and that the extension
is not used.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import failproxy
from failproxy.telemetry import accessline

try:
    from failproxy.telemetry._accessline import render as render_c  # type: ignore[import-not-found]
except ImportError:
    render_c = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(render_c is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")

ARGS: tuple[Any, ...] = (
    "2026-12-04T13:07:36.037Z", 4242, "cd070ca8fa60da8b1000000000000002", b"GET",
    b"/items/1?q=\"\\\x01\xe9", 200, 164, 20011.046, "127.0.0.1", "unix:/run/app.sock",
    ("unix:/run/app.sock", "10.0.0.2:8080"), 2, True, 0.037, None, 0.5, "GET /items/:id", 0,
    False,
)
LINE = (
    b'{"event":"request","level":"info","timestamp":"2026-12-04T13:07:36.037Z","pid":4242,'
    b'"request_id":"cd070ca8fa60da8b1000000000000002","method":"GET",'
    b'"path":"/items/1?q=\\"\\\\\\u0001\xc3\xa9","status":200,"bytes_sent":164,'
    b'"duration_ms":20011.046,"client":"127.0.0.1","upstream":"unix:/run/app.sock",'
    b'"upstreams":["unix:/run/app.sock","10.0.0.2:8080"],"tries":2,"overflowed":true,'
    b'"connect_ms":0.037,"held_ms":null,"upstream_ms":0.5,"route":"GET /items/:id",'
    b'"spilled_bytes":0,"static":false}\n'
)


def test_the_pure_twin_writes_the_line_spec_5_names() -> None:
    assert accessline.render_py(*ARGS) == LINE
    record = json.loads(LINE)
    assert list(record)[:4] == ["event", "level", "timestamp", "pid"]
    assert record["path"] == "/items/1?q=\"\\\x01é", "latin-1 bytes, as they arrived"


@needs_c
def test_the_cython_twin_writes_the_same_line() -> None:
    assert render_c(*ARGS) == LINE


@needs_c
def test_strings_that_come_back_are_written_as_they_are_each_time() -> None:
    """The Cython twin keeps the escaped form of a str it meets twice (by identity: an upstream
    address, a route): the line stays the pure twin's, whichever strings come back, which are
    new, and whatever they hold."""
    # str objects made at run time (not shared constants), some needing escapes
    addresses = ["".join(["unix:/run/", name, ".sock"]) for name in ("a", 'q"uote', "b\\s")]
    routes = ["".join(["GET /", name]) for name in ("items/:id", "t\u00e9", "x\ty")]
    for round_ in range(4):
        for i, (address, route) in enumerate(zip(addresses, routes, strict=True)):
            ids = "".join(["id-", str(round_), "-", str(i)])  # new every line
            args = list(ARGS)
            args[2], args[9], args[10], args[16] = ids, address, (address, "10.0.0.2:8080"), route
            assert render_c(*args) == accessline.render_py(*args), (round_, i)
        addresses.append("".join(["10.0.0.", str(round_), ":80"]))  # one more each round
        routes.append("".join(["GET /r", str(round_)]))


def test_the_build_that_runs_uses_its_twin() -> None:
    expect = os.environ.get("FAILPROXY_EXPECT_BUILD", "")
    if PURE:
        assert accessline.BUILT == "pure" and accessline.render is accessline.render_py
    elif failproxy.BUILD == "compiled with mypyc and Cython":
        assert accessline.BUILT == "cython" and accessline.render is render_c
    if expect == "compiled":
        assert failproxy.BUILD == "compiled with mypyc and Cython"
    elif expect == "pure":
        assert PURE


no_surrogates = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
whole_us = st.integers(min_value=0, max_value=10**12).map(lambda us: us / 1000)
ms = st.none() | whole_us | st.floats(allow_nan=False, allow_infinity=False, min_value=0.0)


@needs_c
@settings(max_examples=3000, deadline=None)
@given(
    timestamp=no_surrogates, pid=st.integers(0, 2**31), request_id=st.none() | no_surrogates,
    method=st.binary(max_size=12), path=st.binary(max_size=60), status=st.integers(0, 999),
    bytes_sent=st.integers(0, 2**62), duration=whole_us, client=no_surrogates,
    upstream=st.none() | no_surrogates, upstreams=st.lists(no_surrogates, max_size=4).map(tuple),
    tries=st.integers(0, 64), overflowed=st.booleans(), connect=ms, held=ms, up=ms,
    route=no_surrogates, spilled=st.integers(0, 2**62), static=st.booleans(),
)
def test_both_twins_agree_on_any_record(**kw: Any) -> None:
    names = ["timestamp", "pid", "request_id", "method", "path", "status", "bytes_sent",
             "duration", "client", "upstream", "upstreams", "tries", "overflowed", "connect",
             "held", "up", "route", "spilled", "static"]
    args = tuple(kw[name] for name in names)
    c_line, py_line = render_c(*args), accessline.render_py(*args)
    whole = all(v is None or (v < 1e12 and round(v * 1000) / 1000 == v)
                for v in (kw["connect"], kw["held"], kw["up"]))
    if whole:
        assert c_line == py_line  # byte for byte: what failproxy logs
    else:
        # any other float: Python's repr there, orjson's here (1e-07 and 1e-7): the same value
        assert json.loads(c_line) == json.loads(py_line)


@needs_c
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_time_that_is_not_finite_is_null_in_both(value: float) -> None:
    args = list(ARGS)
    args[13] = value
    assert render_c(*args) == accessline.render_py(*args)
    assert json.loads(render_c(*args))["connect_ms"] is None


# Every byte that needs escaping, at every position of strings long enough for the Cython twin's
# eight-bytes-a-step scan to meet it inside a step, at a step's edge, and in the tail after the
# last whole step.
SPECIAL_TEXT = ['"', "\\", "\x7f", "é", "€", *map(chr, range(0x20))]
SPECIAL_BYTES = [b'"', b"\\", b"\x7f", b"\x80", b"\xe9", b"\xff",
                 *(bytes([c]) for c in range(0x20))]


@needs_c
@pytest.mark.parametrize("length", [1, 7, 8, 9, 16, 17, 23])
def test_both_twins_escape_every_special_at_every_position(length: int) -> None:
    def check(text: str, path: bytes) -> None:
        args = (text, 1, text, path, path, 200, 0, 1.0, text, text, (text, text), 1, False,
                None, None, None, text, 0, False)
        assert render_c(*args) == accessline.render_py(*args), (text, path)

    for pos in range(length):
        rest = length - pos - 1
        for ch in SPECIAL_TEXT:
            check("a" * pos + ch + "b" * rest, b"plain")
        for raw in SPECIAL_BYTES:
            check("plain", b"p" * pos + raw + b"q" * rest)


STAMP = re.compile(rb'^\{"event":"request","level":"info","timestamp":'
                   rb'"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z",')


@pytest.mark.parametrize("twin", ["pure", "cython"])
def test_no_timestamp_given_is_now_as_the_log_writes_it(twin: str) -> None:
    if twin == "cython" and (render_c is None or PURE):
        pytest.skip("the Cython twin is not built, or this run is pure Python")
    fn = accessline.render_py if twin == "pure" else render_c
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    line = fn(None, *ARGS[1:])
    after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    m = STAMP.match(line)
    assert m, line[:80]
    when = datetime.datetime.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S.%f")
    assert before - datetime.timedelta(milliseconds=1) <= when <= after, (before, when, after)
    # the rest of the line is the one the same record makes with its time given
    stamp = b'"' + m.group(1) + b'Z"'
    assert line == fn(stamp[1:-1].decode(), *ARGS[1:])
