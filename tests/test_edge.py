"""What an edge proxy must refuse or normalise (SPEC 8; README "What failproxy refuses"), over
real sockets, byte for byte: RFC 9112 3 (request line, target forms), 5-7 (fields, framing,
chunked), RFC 9110 7.8 (Upgrade), on the request side and on the response side.

Each shape is either refused (a 4xx/5xx, the client connection closed, none of its bytes at the
upstream, or for a body error no complete request there), or forwarded in a checked form; the
response-side shapes end in a 502 and a client connection that is still in step (the next
request on it is answered) or closed. Shapes llhttp refuses by itself are here too: they pin it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply
from support import IncompleteResponse, Proxy, RawConn, build_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One proxy and one recording backend for the request tables."""
    d: Path = tmp_path_factory.mktemp("edge")
    app = HTTPBackend("app")
    fp = Proxy(d, [app], server={"header_timeout": 2.0})
    fp.start()
    yield fp, app
    fp.stop()
    app.stop()


H = "Host: a\r\n"
TE = "Transfer-Encoding: chunked\r\n"
POST = f"POST /r HTTP/1.1\r\n{H}"

# Refused before anything reaches the upstream: (raw request, status).
REFUSED = {
    # Host (RFC 9112 3.2, RFC 3986 3.2.2): fixed
    "host_slash": ("GET /r HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "host_backslash": ("GET /r HTTP/1.1\r\nHost: a\\b\r\n\r\n", 400),
    "host_userinfo": ("GET /r HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    "host_inner_space": ("GET /r HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "host_empty": ("GET /r HTTP/1.1\r\nHost: \r\n\r\n", 400),
    "host_port_only": ("GET /r HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
    "host_port_not_digits": ("GET /r HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
    "host_bad_pct": ("GET /r HTTP/1.1\r\nHost: a%zz\r\n\r\n", 400),
    "host_open_bracket": ("GET /r HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    "host_bracket_garbage": ("GET /r HTTP/1.1\r\nHost: [a/b]\r\n\r\n", 400),
    "host_invalid_on_http10": ("GET /r HTTP/1.0\r\nHost: a/b\r\n\r\n", 400),
    # request-target forms (RFC 9112 3.2): fixed
    "absolute_userinfo": (f"GET http://u:p@other.example/r HTTP/1.1\r\n{H}\r\n", 400),
    "absolute_ftp": (f"GET ftp://other.example/r HTTP/1.1\r\n{H}\r\n", 400),
    "absolute_empty_host": (f"GET http:///r HTTP/1.1\r\n{H}\r\n", 400),
    "absolute_bad_host": (f"GET http://a%zz/r HTTP/1.1\r\n{H}\r\n", 400),
    "absolute_invalid_host_header": ("GET http://other.example/r HTTP/1.1\r\nHost: a/b\r\n\r\n",
                                     400),
    "absolute_missing_host_http11": ("GET http://other.example/r HTTP/1.1\r\n\r\n", 400),
    "asterisk_get": (f"GET * HTTP/1.1\r\n{H}\r\n", 400),
    "asterisk_post": (f"POST * HTTP/1.1\r\n{H}Content-Length: 0\r\n\r\n", 400),
    "asterisk_query": (f"OPTIONS *?x HTTP/1.1\r\n{H}\r\n", 400),
    "asterisk_path": (f"OPTIONS */r HTTP/1.1\r\n{H}\r\n", 400),
    "fragment": (f"GET /r#frag HTTP/1.1\r\n{H}\r\n", 400),
    "absolute_fragment": (f"GET http://other.example/r#frag HTTP/1.1\r\n{H}\r\n", 400),
    # request line: llhttp refuses (pinned)
    "authority_form_get": (f"GET other.example:80 HTTP/1.1\r\n{H}\r\n", 400),
    "target_not_slash": (f"GET r HTTP/1.1\r\n{H}\r\n", 400),
    "target_space": (f"GET /a b HTTP/1.1\r\n{H}\r\n", 400),
    "target_tab": (f"GET /a\tb HTTP/1.1\r\n{H}\r\n", 400),
    "target_ctl": (f"GET /a\x01b HTTP/1.1\r\n{H}\r\n", 400),
    "target_nul": (f"GET /a\x00b HTTP/1.1\r\n{H}\r\n", 400),
    "target_high_byte": (f"GET /a\xffb HTTP/1.1\r\n{H}\r\n", 400),
    "method_lower_case": (f"get /r HTTP/1.1\r\n{H}\r\n", 400),
    "method_unknown": (f"FOO /r HTTP/1.1\r\n{H}\r\n", 400),
    "version_lower_case": (f"GET /r http/1.1\r\n{H}\r\n", 400),
    "version_three_digits": (f"GET /r HTTP/1.01\r\n{H}\r\n", 400),
    "version_trailing_space": (f"GET /r HTTP/1.1 \r\n{H}\r\n", 400),
    "http_0_9_line": ("GET /r\r\n\r\n", 505),
    "http_0_9": (f"GET /r HTTP/0.9\r\n{H}\r\n", 505),
    "bare_lf_request_line": (f"GET /r HTTP/1.1\n{H}\r\n", 400),
    "bare_lf_header": ("GET /r HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n", 400),
    "bare_lf_head_end": (f"GET /r HTTP/1.1\r\n{H}\n", 400),
    # fields (RFC 9112 5): llhttp refuses (pinned)
    "space_before_first_header": (f"GET /r HTTP/1.1\r\n X-A: 1\r\n{H}\r\n", 400),
    "empty_field_name": (f"GET /r HTTP/1.1\r\n{H}: v\r\n\r\n", 400),
    "field_name_bad_char": (f"GET /r HTTP/1.1\r\n{H}X(a): v\r\n\r\n", 400),
    "field_without_colon": (f"GET /r HTTP/1.1\r\n{H}X-A\r\n\r\n", 400),
    "ctl_in_value": (f"GET /r HTTP/1.1\r\n{H}X-A: a\x01b\r\n\r\n", 400),
    "del_in_value": (f"GET /r HTTP/1.1\r\n{H}X-A: a\x7fb\r\n\r\n", 400),
    # framing (RFC 9112 6): llhttp or failproxy refuse (pinned)
    "cl_plus": (f"{POST}Content-Length: +5\r\n\r\nhello", 400),
    "cl_minus": (f"{POST}Content-Length: -5\r\n\r\nhello", 400),
    "cl_inner_space": (f"{POST}Content-Length: 5 5\r\n\r\nhello", 400),
    "cl_list_same": (f"{POST}Content-Length: 5, 5\r\n\r\nhello", 400),
    "cl_list_differing": (f"{POST}Content-Length: 5, 6\r\n\r\nhello", 400),
    "cl_twice_same": (f"{POST}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    "cl_hex": (f"{POST}Content-Length: 0x5\r\n\r\nhello", 400),
    "cl_empty": (f"{POST}Content-Length: \r\n\r\nhello", 400),
    "cl_overflow": (f"{POST}Content-Length: 99999999999999999999999\r\n\r\nhello", 400),
    "te_chunked_twice": (f"{POST}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    "te_two_fields_chunked": (f"{POST}{TE}{TE}\r\n0\r\n\r\n", 400),
    "te_identity": (f"{POST}Transfer-Encoding: identity\r\n\r\nhello", 400),
    "te_chunked_with_params": (f"{POST}Transfer-Encoding: chunked;a=b\r\n\r\n0\r\n\r\n", 400),
    "te_trailing_comma": (f"{POST}Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", 400),
    "te_empty": (f"{POST}Transfer-Encoding: \r\n\r\n", 400),
    "te_vertical_tab": (f"{POST}Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    "te_empty_element": (f"{POST}Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 501),
    "connection_lists_te": (f"{POST}Connection: transfer-encoding\r\n{TE}\r\n0\r\n\r\n", 400),
}

# Refused once the head was read: the body (RFC 9112 7, chunked) is bad. The head may have
# been forwarded already; the upstream never gets a complete request.
BAD_BODY = {
    "chunk_size_overflow": f"{POST}{TE}\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk_size_hex_prefix": f"{POST}{TE}\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_negative": f"{POST}{TE}\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_space": f"{POST}{TE}\r\n5 \r\nhello\r\n0\r\n\r\n",
    "chunk_size_bare_lf": f"{POST}{TE}\r\n5\nhello\r\n0\r\n\r\n",
    "chunk_ext_bare_lf": f"{POST}{TE}\r\n5;a\nhello\r\n0\r\n\r\n",
    "chunk_data_bare_lf": f"{POST}{TE}\r\n5\r\nhello\n0\r\n\r\n",
    "chunk_data_too_long": f"{POST}{TE}\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    "last_chunk_bare_lf": f"{POST}{TE}\r\n5\r\nhello\r\n0\n\n",
    "trailer_bad_name": f"{POST}{TE}\r\n5\r\nhello\r\n0\r\nX T: 1\r\n\r\n",
    "trailer_bare_lf": f"{POST}{TE}\r\n5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
    "trailer_content_length": f"{POST}{TE}\r\n5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_request_refused_before_the_upstream(edge: Any, case: str) -> None:
    fp, app = edge
    raw, status = REFUSED[case]
    before = len(app.requests)
    mark = fp.log.mark()
    with fp.connect(timeout=5) as c:
        c.send(raw.encode("latin-1"))
        resp = c.read_response()
        assert resp.status == status, (case, resp.status, resp.body)
        c.wait_closed(3)
    fp.log.wait_for_event("client_error", since=mark, status=status)
    assert len(app.requests) == before, f"{case}: bytes reached the upstream"


@pytest.mark.parametrize("case", sorted(BAD_BODY))
def test_request_with_a_bad_body_never_completes_upstream(edge: Any, case: str) -> None:
    fp, app = edge
    mark = fp.log.mark()
    path = f"/body-{case}"
    with fp.connect(timeout=5) as c:
        c.send(BAD_BODY[case].replace("/r", path, 1).encode("latin-1"))
        resp = c.read_response()
        assert resp.status == 400, (case, resp.status, resp.body)
        c.wait_closed(3)
    fp.log.wait_for_event("client_error", since=mark, status=400)
    time.sleep(0.1)
    assert not [r for r in app.requests if r.path == path and r.complete], \
        f"{case}: the upstream received a complete request"


# Forwarded, in the form the upstream gets: (raw request, target, Host values upstream).
FORWARDED = {
    "absolute_form": (f"GET http://other.example/p?q HTTP/1.1\r\n{H}\r\n", "/p?q",
                      ["other.example"]),
    "absolute_no_path": (f"GET http://other.example HTTP/1.1\r\n{H}\r\n", "/", ["other.example"]),
    "absolute_query_only": (f"GET http://other.example?q=1 HTTP/1.1\r\n{H}\r\n", "/?q=1",
                            ["other.example"]),
    "absolute_https_port_case": (f"GET HTTPS://Other.Example:8443/p HTTP/1.1\r\n{H}\r\n", "/p",
                                 ["Other.Example:8443"]),
    "absolute_ipv6": (f"GET http://[::1]:8080/p HTTP/1.1\r\n{H}\r\n", "/p", ["[::1]:8080"]),
    "absolute_at_in_path": (f"GET http://other.example/p@q HTTP/1.1\r\n{H}\r\n", "/p@q",
                            ["other.example"]),
    "absolute_http10_no_host": ("GET http://other.example/p HTTP/1.0\r\n\r\n", "/p",
                                ["other.example"]),
    "options_asterisk": (f"OPTIONS * HTTP/1.1\r\n{H}\r\n", "*", ["a"]),
    "host_ipv4_port": ("GET /p HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n", "/p", ["127.0.0.1:8000"]),
    "host_ipv6": ("GET /p HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n", "/p",
                  ["[2001:db8::1]:443"]),
    "host_ipvfuture": ("GET /p HTTP/1.1\r\nHost: [v1.x:y]\r\n\r\n", "/p", ["[v1.x:y]"]),
    "host_pct_and_sub_delims": ("GET /p HTTP/1.1\r\nHost: xn--bcher-kva.example%41!$&'()*+,;=\r\n"
                                "\r\n", "/p", ["xn--bcher-kva.example%41!$&'()*+,;="]),
    "host_empty_port": ("GET /p HTTP/1.1\r\nHost: a:\r\n\r\n", "/p", ["a:"]),
    "host_trailing_ows": ("GET /p HTTP/1.1\r\nHost: a \t\r\n\r\n", "/p", ["a"]),
    # request line: llhttp accepts; failproxy writes its own line (pinned)
    "double_space_request_line": (f"GET  /p HTTP/1.1\r\n{H}\r\n", "/p", ["a"]),
    "empty_line_before_request": (f"\r\nGET /p HTTP/1.1\r\n{H}\r\n", "/p", ["a"]),
    "backslash_in_path": (f"GET /p\\q HTTP/1.1\r\n{H}\r\n", "/p\\q", ["a"]),
}


@pytest.mark.parametrize("case", sorted(FORWARDED))
def test_request_forwarded_in_checked_form(edge: Any, case: str) -> None:
    fp, app = edge
    raw, target, hosts = FORWARDED[case]
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(raw.encode("latin-1"))
        resp = c.read_response()
        assert resp.status == 200, (case, resp.status, resp.body)
    (req,) = app.wait_requests(before + 1)[before:]
    assert req.target == target
    assert req.version == "HTTP/1.1"
    assert req.header_all("host") == hosts


def test_chunk_extensions_and_trailers_are_not_forwarded(edge: Any) -> None:
    fp, app = edge
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(f"{POST}{TE}\r\n5;ext=\"a b\"\r\nhello\r\n6;x\r\n world\r\n0\r\n"
               "X-Trailer: t\r\n\r\n".encode())
        assert c.read_response().status == 200
        c.send(build_request("GET", "/after"))
        assert c.read_response().status == 200, "the connection stays in step"
    req = app.wait_requests(before + 2)[before]
    assert req.complete and req.body == b"hello world"
    assert b"ext" not in req.raw_head and not req.has_header("x-trailer")


def test_content_length_forms_llhttp_accepts(edge: Any) -> None:
    """Leading zeros and trailing OWS are valid Content-Length syntax: the body is read as 5."""
    fp, app = edge
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(f"{POST}Content-Length: 005\r\n\r\nhello".encode())
        assert c.read_response().status == 200
        c.send(f"{POST}Content-Length: 5 \r\n\r\nhello".encode())
        assert c.read_response().status == 200
        c.send(build_request("GET", "/after"))
        assert c.read_response().status == 200
    reqs = app.wait_requests(before + 3)[before:]
    assert [r.body for r in reqs] == [b"hello", b"hello", b""]


# ---- Upgrade (RFC 9110 7.8): h2c is never forwarded -------------------------------------------

H2C = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


def _no_upgrade_upstream(req: Any) -> None:
    assert not req.has_header("upgrade"), req.headers
    assert not req.has_header("http2-settings"), req.headers
    assert "upgrade" not in (req.header("connection") or "").lower(), req.headers


def test_h2c_get_is_answered_as_a_plain_request_and_the_connection_goes_on(edge: Any) -> None:
    fp, app = edge
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        # the next request is pipelined right behind: llhttp took it for the new protocol's bytes
        c.send(f"GET /h2c HTTP/1.1\r\n{H}{H2C}\r\n".encode() + build_request("GET", "/next"))
        first = c.read_response()
        assert first.status == 200 and first.body == b"app GET /h2c"
        assert "close" not in first.connection_tokens
        second = c.read_response()
        assert second.body == b"app GET /next"
        c.send(build_request("GET", "/third"))
        assert c.read_response().body == b"app GET /third"
        assert c.is_open()
    reqs = app.wait_requests(before + 3)[before:]
    assert [r.target for r in reqs] == ["/h2c", "/next", "/third"]
    _no_upgrade_upstream(reqs[0])


def test_upgrade_naming_only_h2c_without_connection_upgrade(edge: Any) -> None:
    fp, app = edge
    before = len(app.requests)
    resp = fp.request("GET", "/h2c-bare", headers=[("Upgrade", "h2c"),
                                                    ("HTTP2-Settings", "AAMAAABkAAQAAP__")])
    assert resp.status == 200
    (req,) = app.wait_requests(before + 1)[before:]
    _no_upgrade_upstream(req)


@pytest.mark.parametrize("framing", ["content_length", "chunked", "expect_100"])
def test_h2c_post_with_body_is_answered_as_a_plain_request(edge: Any, framing: str) -> None:
    """httptools makes llhttp skip the body of an upgrade request (it would be the new
    protocol's): failproxy reads it as this request's body and the connection goes on."""
    fp, app = edge
    before = len(app.requests)
    body = b"x" * 70000 + b"-end"
    with fp.connect(timeout=5) as c:
        if framing == "chunked":
            c.send(f"POST /h2c-post HTTP/1.1\r\n{H}{H2C}{TE}\r\n".encode())
            c.send(b"%x\r\n%b\r\n" % (len(body), body) + b"0\r\n\r\n" + build_request("GET", "/n"))
        elif framing == "expect_100":
            c.send(f"POST /h2c-post HTTP/1.1\r\n{H}{H2C}Expect: 100-continue\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode())
            assert c.read_head().status == 100
            c.send(body + build_request("GET", "/n"))
        else:
            c.send(f"POST /h2c-post HTTP/1.1\r\n{H}{H2C}Content-Length: {len(body)}\r\n\r\n"
                   .encode() + body[:1000])
            time.sleep(0.1)  # the rest of the body in a later read
            c.send(body[1000:] + build_request("GET", "/n"))
        assert c.read_response().body == b"app POST /h2c-post"
        assert c.read_response().body == b"app GET /n"
    post, nxt = app.wait_requests(before + 2)[before:]
    assert post.complete and post.body == body
    assert nxt.target == "/n"
    _no_upgrade_upstream(post)


def test_upgrade_list_drops_only_h2c(edge: Any) -> None:
    fp, app = edge
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(f"GET /ws HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n"
               .encode())
        resp = c.read_response()
        assert resp.status == 200  # the backend does not switch
        c.wait_closed(3)  # the bytes after an upgrade request are not parsed as HTTP
    (req,) = app.wait_requests(before + 1)[before:]
    assert req.header_all("upgrade") == ["websocket"]


def test_upgrade_with_a_body_is_forwarded_as_a_plain_request(edge: Any) -> None:
    fp, app = edge
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(f"POST /wsb HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: websocket\r\n"
               "Content-Length: 5\r\n\r\nhello".encode() + build_request("GET", "/n"))
        assert c.read_response().body == b"app POST /wsb"
        assert c.read_response().body == b"app GET /n"
    post, _ = app.wait_requests(before + 2)[before:]
    assert post.body == b"hello"
    _no_upgrade_upstream(post)


# ---- responses ----------------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED_OK = b"2\r\nok\r\n0\r\n\r\n"

# Whole responses an upstream sends; each gets the client a 502 (the head is refused).
BAD_RESPONSES = {
    # framing (RFC 9112 6): fixed
    "te_chunked_twice": OK + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + CHUNKED_OK,
    "te_two_fields_chunked": OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n" + CHUNKED_OK,
    "te_gzip_chunked": OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_OK,
    "te_empty_element": OK + b"Transfer-Encoding: ,chunked\r\n\r\n" + CHUNKED_OK,
    "connection_lists_content_length": OK + b"Connection: content-length\r\n"
                                       b"Content-Length: 2\r\n\r\nok",
    "connection_lists_te": OK + b"Connection: transfer-encoding\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_OK,
    # status line: fixed
    "status_099": b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok",
    "status_600": b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok",
    "status_999": b"HTTP/1.1 999 X\r\nContent-Length: 2\r\n\r\nok",
    "reason_nul_unknown_code": b"HTTP/1.1 299 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    "reason_esc_unknown_code": b"HTTP/1.1 299 O\x1bK\r\nContent-Length: 2\r\n\r\nok",
    "reason_del_unknown_code": b"HTTP/1.1 299 O\x7fK\r\nContent-Length: 2\r\n\r\nok",
    # refused already (pinned)
    "te_chunked_gzip": OK + b"Transfer-Encoding: chunked, gzip\r\n\r\nok",
    "te_identity": OK + b"Transfer-Encoding: identity\r\n\r\nok",
    "te_chunked_with_params": OK + b"Transfer-Encoding: chunked;q=1\r\n\r\n" + CHUNKED_OK,
    "te_and_cl": OK + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n" + CHUNKED_OK,
    "cl_plus": OK + b"Content-Length: +2\r\n\r\nok",
    "cl_minus": OK + b"Content-Length: -2\r\n\r\nok",
    "cl_inner_space": OK + b"Content-Length: 2 2\r\n\r\nok",
    "cl_list_same": OK + b"Content-Length: 2, 2\r\n\r\nok",
    "cl_list_differing": OK + b"Content-Length: 2, 3\r\n\r\nok!",
    "cl_twice_same": OK + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl_empty": OK + b"Content-Length: \r\n\r\nok",
    "cl_overflow": OK + b"Content-Length: 99999999999999999999999\r\n\r\nok",
    "obs_fold": OK + b"X-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
    "space_before_colon": OK + b"X-A : 1\r\nContent-Length: 2\r\n\r\nok",
    "nul_in_value": OK + b"X-A: 1\x002\r\nContent-Length: 2\r\n\r\nok",
    "bare_cr_in_value": OK + b"X-A: 1\r2\r\nContent-Length: 2\r\n\r\nok",
    "bare_lf_status_line": b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    "bare_lf_header": OK + b"X-A: 1\nContent-Length: 2\r\n\r\nok",
    "bare_lf_head_end": OK + b"Content-Length: 2\r\n\nok",
    "status_four_digits": b"HTTP/1.1 1000 X\r\nContent-Length: 2\r\n\r\nok",
    "status_two_digits": b"HTTP/1.1 20 X\r\nContent-Length: 2\r\n\r\nok",
    "status_leading_space": b"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\nok",
    "version_1_2": b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "version_lower_case": b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    # a 101 to a request that asked for no upgrade: fixed (it was relayed as a tunnel)
    "switching_protocols_unasked": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                                   b"Upgrade: websocket\r\n\r\nRAW BYTES",
    "switching_protocols_unasked_h2c": b"HTTP/1.1 101 Switching Protocols\r\n"
                                       b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\nRAW BYTES",
    "switching_protocols_bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\nRAW BYTES",
}

# The head is fine, the body is not (RFC 9112 7): the head may be relayed already, so the client
# gets a 502 or a connection closed before the response is complete, never a complete response.
BAD_RESPONSE_BODIES = {
    "chunk_size_overflow": OK + b"Transfer-Encoding: chunked\r\n\r\n10000000000000002\r\nok\r\n"
                           b"0\r\n\r\n",
    "chunk_size_bare_lf": OK + b"Transfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
    "chunk_ext_bare_lf": OK + b"Transfer-Encoding: chunked\r\n\r\n2;x\nok\r\n0\r\n\r\n",
    "chunk_data_bare_lf": OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\n0\r\n\r\n",
    "trailer_bad_name": OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX T: 1\r\n\r\n",
    "trailer_bare_lf": OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\n\r\n",
    "last_chunk_bare_lf": OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\n\n",
}

# Relayed: (raw response, status line the client gets, body).
RELAYED = {
    "te_upper_case": (OK + b"Transfer-Encoding: CHUNKED\r\n\r\n" + CHUNKED_OK, "200 OK", b"ok"),
    "te_trailing_ows": (OK + b"Transfer-Encoding: chunked \r\n\r\n" + CHUNKED_OK, "200 OK", b"ok"),
    "chunk_extension": (OK + b"Transfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\n\r\n",
                        "200 OK", b"ok"),
    "trailer": (OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
                "200 OK", b"ok"),
    "cl_leading_zeros": (OK + b"Content-Length: 002\r\n\r\nok", "200 OK", b"ok"),
    "cl_trailing_ows": (OK + b"Content-Length: 2 \r\n\r\nok", "200 OK", b"ok"),
    "obs_text_in_value": (OK + b"X-A: \xff\r\nContent-Length: 2\r\n\r\nok", "200 OK", b"ok"),
    "empty_line_before_status": (b"\r\n" + OK + b"Content-Length: 2\r\n\r\nok", "200 OK", b"ok"),
    "own_reason_for_known_code": (b"HTTP/1.1 200 Fine\x01\r\nContent-Length: 2\r\n\r\nok",
                                  "200 OK", b"ok"),
    "no_reason": (b"HTTP/1.1 404\r\nContent-Length: 2\r\n\r\nok", "404 Not Found", b"ok"),
    "unknown_code_reason_relayed": (b"HTTP/1.1 299 Custom\tThing\r\nContent-Length: 2\r\n\r\nok",
                                    "299 Custom\tThing", b"ok"),
    "http_1_0": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "200 OK", b"ok"),
    "http_2_0_read_as_1_0": (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "200 OK", b"ok"),
    "http_0_9_read_as_1_0": (b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok", "200 OK", b"ok"),
    "204_with_content_length": (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                                "204 No Content", b""),
}


@pytest.fixture(scope="module")
def upstream_shapes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    raws = {**BAD_RESPONSES, **BAD_RESPONSE_BODIES, **{k: v[0] for k, v in RELAYED.items()}}

    def handler(req: Any) -> Reply:
        name = req.target.lstrip("/")
        if name in raws:
            return Reply(raw=raws[name], close=True)
        return Reply(200, body=b"fine")

    d: Path = tmp_path_factory.mktemp("shapes")
    app = HTTPBackend("shapes", handler=handler)
    fp = Proxy(d, [app], upstream={"read_timeout": 3.0})
    fp.start()
    yield fp, app
    fp.stop()
    app.stop()


def _still_in_step(c: RawConn) -> None:
    """The next request on the client connection gets its own answer (or the connection is
    closed): never bytes of the refused response."""
    try:
        c.send(build_request("GET", "/after"))
        resp = c.read_response(timeout=3)
    except (IncompleteResponse, OSError):
        assert c.eof, "neither answered nor closed"
        return
    assert resp.status == 200 and resp.body == b"fine", resp


@pytest.mark.parametrize("case", sorted(BAD_RESPONSES))
def test_invalid_response_head_gives_502(upstream_shapes: Any, case: str) -> None:
    fp, _ = upstream_shapes
    mark = fp.log.mark()
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", f"/{case}"))
        resp = c.read_response(timeout=5)
        assert resp.status == 502, (case, resp.status, resp.body)
        assert b"RAW" not in resp.body
        _still_in_step(c)
        assert not c.eof, "a 502 to a complete GET keeps the client connection"
    fp.log.wait_for_event("upstream_invalid", since=mark)
    assert fp.log.wait_for_event("request", since=mark, path=f"/{case}")["status"] == 502


@pytest.mark.parametrize("case", sorted(BAD_RESPONSE_BODIES))
def test_invalid_response_body_is_never_presented_as_complete(upstream_shapes: Any,
                                                              case: str) -> None:
    fp, _ = upstream_shapes
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", f"/{case}"))
        try:
            resp = c.read_response(timeout=5)
        except IncompleteResponse:
            assert c.eof, "the client connection is closed"
        else:
            assert resp.status == 502, (case, resp.status, resp.body)
            _still_in_step(c)
    assert fp.request("GET", "/fresh").body == b"fine"


@pytest.mark.parametrize("case", sorted(RELAYED))
def test_response_relayed(upstream_shapes: Any, case: str) -> None:
    fp, _ = upstream_shapes
    _, status_line, body = RELAYED[case]
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", f"/{case}"))
        resp = c.read_response(timeout=5)
        assert resp.raw_head.split(b"\r\n", 1)[0] == b"HTTP/1.1 " + status_line.encode()
        assert resp.body == body
        _still_in_step(c)


def test_101_naming_another_protocol_than_asked_gives_502(upstream_shapes: Any) -> None:
    fp, app = upstream_shapes
    for case in ("switching_protocols_unasked_h2c", "switching_protocols_bare"):
        with fp.connect(timeout=5) as c:
            c.send(build_request("GET", f"/{case}", headers=[("Connection", "Upgrade"),
                                                             ("Upgrade", "websocket")]))
            resp = c.read_response(timeout=5)
            assert resp.status == 502, (case, resp.status, resp.body)
            assert b"RAW" not in c.wait_closed(3), "never a tunnel"
    asked = [r for r in app.requests if r.target == "/switching_protocols_unasked_h2c"]
    assert asked and asked[-1].header_all("upgrade") == ["websocket"]
