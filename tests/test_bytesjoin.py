"""The head joiner's two twins (proxy/bytesjoin.py): the Cython one gives what `b"".join` gives,
bytes and errors alike, and the build that runs uses the one it says."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import failproxy
from failproxy.proxy import bytesjoin

try:
    from failproxy.proxy._bytesjoin import join as join_c  # type: ignore[import-not-found]
except ImportError:
    join_c = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(join_c is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE:
        assert bytesjoin.BUILT == "pure" and bytesjoin.join is bytesjoin.join_py
    else:
        assert bytesjoin.BUILT == "cython" and bytesjoin.join is join_c


def test_a_head_is_its_pieces_in_order() -> None:
    parts = [b"GET", b" ", b"/x", b" HTTP/1.1\r\n", b"Host", b": ", b"a", b"\r\n", b"", b"\r\n"]
    assert bytesjoin.join(parts) == b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    assert bytesjoin.join([]) == b""


@needs_c
@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=80))
def test_the_cython_twin_joins_as_bytes_join(parts: list[bytes]) -> None:
    assert join_c(parts) == b"".join(parts)


class _Bytes(bytes):
    pass


@needs_c
@pytest.mark.parametrize("make", [
    lambda: [b"a", bytearray(b"b"), memoryview(b"c")],  # other buffers: handed to b"".join
    lambda: [b"a", _Bytes(b"sub")],                      # a bytes subclass
    lambda: (b"a", b"b"),                                 # not a list
    lambda: iter([b"a", b"b"]),
], ids=["buffers", "subclass", "tuple", "iterator"])
def test_the_cython_twin_hands_the_rest_to_bytes_join(make: Any) -> None:
    assert join_c(make()) == b"".join(make())


@needs_c
@pytest.mark.parametrize("parts", [[b"a", "text"], [b"a", None], [1], None], ids=str)
def test_the_cython_twin_refuses_what_bytes_join_refuses(parts: Any) -> None:
    with pytest.raises(TypeError) as expected:
        b"".join(parts)
    with pytest.raises(TypeError) as got:
        join_c(parts)
    assert str(got.value) == str(expected.value)
