"""Fuzzing the request parser: random framings against a real tokenpak and the fake provider.

Hypothesis builds a pipeline of requests on one connection, each framed with Content-Length
or chunked encoding (random chunk splits, extensions, trailers), and may turn one of them
into something RFC 9112 says to refuse (a bad chunk size, conflicting lengths, an unknown
Transfer-Encoding, a bare CR, obs-fold, whitespace before a colon, garbage) or a target
that is not a plain path. The invariant
is the one request smuggling breaks: upstream receives exactly the requests the client
framed before the first bad one (method, path, body bytes), and nothing after it; no answer
is a 5xx, and the connection always ends (tokenpak never waits for bytes that will not come).
"""

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SAFE_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1,
                    max_size=12)
BODIES = st.binary(max_size=300)
BAD_FRAMINGS = (
    lambda body: b"Transfer-Encoding: chunked\r\n\r\n-1\r\n" + body + b"\r\n0\r\n\r\n",
    lambda body: b"Transfer-Encoding: chunked\r\n\r\n0x%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    lambda body: b"Transfer-Encoding: chunked\r\n\r\n+%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    lambda body: b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), len(body) + 1, body),
    lambda body: b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (
        len(body), body),
    lambda body: b"Transfer-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    lambda body: b"Transfer-Encoding: gzip\r\n\r\n" + body,
    lambda body: b"X-A: 1\rTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(body), body),
    lambda body: b"X-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body),
    lambda body: b"Content-Length : %d\r\n\r\n%s" % (len(body), body),
    lambda body: b"Content-Length: 0x%x\r\n\r\n%s" % (len(body), body),
    lambda body: b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%sXY0\r\n\r\n" % (len(body), body),
)


@st.composite
def chunked(draw, body):
    """`body` in random chunks, with optional extensions and trailers."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces, start = [], 0
    for cut in cuts + [len(body)]:
        if cut > start:
            pieces.append(body[start:cut])
            start = cut
    out = b"Transfer-Encoding: %s\r\n\r\n" % draw(st.sampled_from([b"chunked", b"Chunked"]))
    for piece in pieces:
        ext = draw(st.sampled_from([b"", b";a=b", b" ; x"]))
        size = b"%x" % len(piece)
        out += (size.upper() if draw(st.booleans()) else size) + ext + b"\r\n" + piece + b"\r\n"
    trailer = draw(st.sampled_from([b"", b"X-Trailer: v\r\n"]))
    return out + b"0\r\n" + trailer + b"\r\n"


@st.composite
def pipelines(draw):
    """(raw bytes, the requests upstream must see, whether a bad one ends the pipeline)."""
    raw, expected = b"", []
    count = draw(st.integers(1, 4))
    bad_at = draw(st.one_of(st.none(), st.integers(0, count - 1)))
    for i in range(count):
        method = draw(st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]))
        path = "/fuzz/" + draw(SAFE_TEXT) + draw(st.sampled_from(["", "?q=1", "?a=b&c=d"]))
        body = draw(BODIES)
        head = b"%s %s HTTP/1.1\r\nHost: localhost\r\nX-Fuzz: %d\r\n" % (
            method.encode(), path.encode(), i)
        if i == bad_at:
            kind = draw(st.sampled_from(["framing", "target", "garbage"]))
            if kind == "framing":
                raw += head + draw(st.sampled_from(BAD_FRAMINGS))(body)
            elif kind == "target":  # a target that would leave the configured upstream
                target = draw(st.sampled_from([b"/fuzz/../x", b"@127.0.0.1:1/x", b"//h/x",
                                               b"http://h/x", b"/fuzz/%2e%2e/x"]))
                raw += head.replace(path.encode(), target, 1) + \
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            else:  # not even a request line
                raw += b"\x01" + draw(st.binary(max_size=60)) + b"\r\n\r\n"
            return raw, expected, True
        if draw(st.booleans()):
            raw += head + draw(chunked(body))
        elif body or draw(st.booleans()):
            raw += head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        else:
            raw += head + b"\r\n"
        expected.append((method, path, body))
    return raw, expected, False


def exchange(port, raw):
    """Send `raw`, half-close, and read until tokenpak closes; the bytes it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # it refused and closed before reading everything
            pass
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return answer
            except socket.timeout:
                raise AssertionError("tokenpak neither answered nor closed: %r" % raw[:200])
            if not data:
                return answer
            answer += data


def response_statuses(answer):
    """The status codes of the responses in `answer`, walked by their Content-Length (every
    answer in this test has one); a response cut short by a reset ends the list."""
    statuses = []
    while answer.startswith(b"HTTP/1.1 "):
        head, sep, rest = answer.partition(b"\r\n\r\n")
        if not sep:
            break
        statuses.append(int(head[9:12]))
        length = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        answer = rest[int(length[0]):] if length else b""
    return statuses


def test_upstream_sees_exactly_the_framed_requests(make_proxy, fake):
    proxy = make_proxy(proxy__passthrough_url=fake.url, proxy__max_request_bytes=4096)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(pipelines())
    def check(case):
        raw, expected, bad = case
        fake.reset_state()
        answer = exchange(proxy.port, raw)
        received = [(r.method, r.path, r.body) for r in fake.requests]
        assert received == expected, raw[:300]
        statuses = response_statuses(answer)
        assert all(status < 500 for status in statuses), answer[:500]
        if not bad:
            assert statuses == [200] * len(expected), answer[:500]

    check()
