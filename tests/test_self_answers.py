"""Answers tokenpak gives itself: correct HTTP (HEAD has no body) and never invisible.

Every such answer — a 4xx before forwarding, a 502/504 for an unreachable provider, a
malformed request line, `HEAD /` from Claude Code — must show in the access log, in
/metrics (counted by status) and in the accounting DB, like a forwarded request.
"""

import http.client
import json
import logging
import socket

import pytest

from helpers import OPENAI_KEY, db_rows, free_port, wait_for




def rows(proxy, count=1):
    """The DB rows, once there are at least `count`."""
    return wait_for(lambda: len(db_rows(proxy)) >= count and db_rows(proxy)) or db_rows(proxy)


def request(proxy, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def send_raw(proxy, data):
    """Raw bytes in, every byte the server sends until it closes out."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def metric_count(proxy, status):
    _, _, text = proxy.get("/metrics", {"X-TokenPak-Auth": "local-secret-token"})
    total = 0
    for line in text.decode().splitlines():
        if line.startswith("tokenpak_requests_total{") and 'status="%s"' % status in line:
            total += int(line.rsplit(" ", 1)[1])
    return total


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def access():
    """The access log's lines, caught on the access logger itself: an earlier test that set
    up tokenpak's logging in this process (serve, --daemon) may have stopped propagation."""
    logger = logging.getLogger("tokenpak.access")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: list(handler.lines)
    logger.removeHandler(handler)
    logger.setLevel(level)


def assert_seen(proxy, access, status, path, error_word, method=None):
    """The answer is in the access log, /metrics and the DB."""
    line = wait_for(lambda: [m for m in access()
                               if " %s - %d " % (path, status) in m])
    assert line, access()
    found = [r for r in rows(proxy) if r["status"] == status and r["path"] == path]
    assert found, rows(proxy)
    assert metric_count(proxy, status) >= 1
    assert found[-1]["provider"] is None
    assert error_word in (found[-1]["error"] or "")
    assert found[-1]["cost_usd"] == 0.0  # tokenpak's own answers cost nothing
    return found[-1]


# -- HEAD --------------------------------------------------------------------------------

def test_head_root_without_a_route_is_a_bodyless_200(proxy, fake, access):
    """Claude Code's start-up check. Raw bytes: a body after a HEAD answer would be read
    as the start of the next answer on a keep-alive connection."""
    answer = send_raw(proxy, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest == b""
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                 .split(b":")[1])
    response, body = request(proxy, "GET", "/")
    assert response.status == 200 and len(body) == length  # HEAD says what GET sends
    assert json.loads(body)["service"] == "tokenpak"
    assert fake.count() == 0
    assert wait_for(lambda: any(m.startswith("HEAD / - 200") for m in access()))
    assert [(r["method"], r["status"], r["cost_usd"])
            for r in rows(proxy, 2)] == [("HEAD", 200, 0.0), ("GET", 200, 0.0)]


def test_head_root_with_a_route_is_forwarded(make_proxy, fake):
    proxy = make_proxy(proxy__passthrough_url=fake.url)
    response, body = request(proxy, "HEAD", "/")
    assert body == b""
    assert fake.count() == 1 and fake.last().method == "HEAD"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health", "/stats"])
def test_head_errors_and_local_endpoints_have_no_body(make_proxy, path):
    proxy = make_proxy(proxy__auth_token="local-secret-token")
    answer = send_raw(proxy, b"HEAD %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      % path.encode())
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401" if path != "/health" else b"HTTP/1.1 200")
    assert b"Content-Length: " in head and rest == b""


# -- every self-answer is seen --------------------------------------------------------------

def test_401_is_seen(make_proxy, access):
    proxy = make_proxy(proxy__auth_token="local-secret-token")
    response, body = request(proxy, "POST", "/v1/chat/completions", b"{}",
                             {"Authorization": "Bearer " + OPENAI_KEY})
    assert response.status == 401 and b"X-TokenPak-Auth" in body
    row = assert_seen(proxy, access, 401, "/v1/chat/completions", "X-TokenPak-Auth")
    assert row["method"] == "POST"


def test_400_no_route_is_seen(proxy, access):
    response, _ = request(proxy, "POST", "/somewhere", b"{}")
    assert response.status == 400
    assert_seen(proxy, access, 400, "/somewhere", "")


def test_400_bad_content_length_is_seen(proxy, access):
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: nope\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert_seen(proxy, access, 400, "/v1/chat/completions", "Content-Length")


def test_405_on_a_local_endpoint_is_seen(proxy, access, fake):
    response, body = request(proxy, "POST", "/health", b"{}")
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    assert json.loads(body)["error"]["message"].startswith("/health answers GET")
    assert fake.count() == 0
    assert_seen(proxy, access, 405, "/health", "GET and HEAD")


def test_413_is_seen(make_proxy, access):
    proxy = make_proxy(proxy__max_request_bytes=1000)
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 5000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert_seen(proxy, access, 413, "/v1/chat/completions", "max_request_bytes")


def test_431_header_too_long_is_seen(proxy, access):
    answer = send_raw(proxy, b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    assert_seen(proxy, access, 431, "/v1/models", "too long")


def test_malformed_request_line_is_seen(proxy, access):
    answer = send_raw(proxy, b"GET /x HTTP/9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert [r["status"] for r in rows(proxy)] == [400]
    assert wait_for(lambda: any(m.startswith("- - - 400") for m in access()))
    assert metric_count(proxy, 400) == 1


def test_a_key_in_a_malformed_request_line_is_not_kept(proxy, access):
    # four words: the stdlib answers "Bad request syntax ('<the whole line>')"
    answer = send_raw(proxy, b"GET /v1beta/models?key=AIzaTestGoogleKeySECRET0123456789 "
                             b"extra HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    row = rows(proxy)[-1]
    assert row["status"] == 400 and "/v1beta/models?..." in row["error"]
    assert "SECRET" not in row["error"]
    assert wait_for(lambda: any(" 400 " in m for m in access()))
    assert not [m for m in access() if "SECRET" in m]


def test_502_unreachable_provider_is_seen(make_proxy, access):
    proxy = make_proxy(proxy__providers__openai__url="http://127.0.0.1:%d" % free_port())
    response, _ = request(proxy, "POST", "/v1/chat/completions",
                          json.dumps({"model": "gpt-4o", "messages": []}),
                          {"Authorization": "Bearer " + OPENAI_KEY})
    assert response.status == 502
    line = wait_for(lambda: [m for m in access()
                               if m.startswith("POST /v1/chat/completions openai 502")])
    assert line and "error=" in line[0]
    assert metric_count(proxy, 502) == 1
    row = rows(proxy)[-1]
    assert (row["status"], row["provider"], row["cost_usd"]) == (502, "openai", 0.0)
    assert row["error"]


def test_504_provider_timeout_is_seen(make_proxy, fake, access):
    fake.hang_seconds = 3
    try:
        proxy = make_proxy(proxy__read_timeout=0.5)
        response, _ = request(proxy, "POST", "/v1/chat/completions",
                              json.dumps({"model": "gpt-4o", "messages": []}),
                              {"Authorization": "Bearer " + OPENAI_KEY, "x-fake": "hang"})
        assert response.status == 504
        row = rows(proxy)[-1]
        assert metric_count(proxy, 504) == 1
        assert (row["status"], row["cost_usd"]) == (504, 0.0) and row["error"]
        assert wait_for(lambda: any(" 504 " in m for m in access()))
    finally:
        fake.hang_seconds = 30


def test_successful_local_endpoints_are_not_recorded(proxy):
    for path in ("/health", "/stats", "/metrics"):
        assert proxy.get(path)[0] == 200
    request(proxy, "POST", "/nowhere", b"{}")  # recorded: once it is, the others would be
    assert [r["path"] for r in rows(proxy)] == ["/nowhere"]


@pytest.mark.parametrize("path", ["/health", "/stats", "/metrics", "/dashboard"])
def test_local_pages_are_logged_with_their_status_and_size(proxy, fake, path):
    """Each local page says what it answered: a page that forgot to note its status was
    logged as "0 ... error=no answer" although its client got a 200."""
    logger = logging.getLogger("tokenpak.access")
    lines, level = _Lines(), logger.level
    lines.setLevel(logging.DEBUG)  # successful local answers are logged at debug
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        response, body = request(proxy, "GET", path, headers={"Host": "127.0.0.1"})
        assert response.status == 200 and body
        line = wait_for(lambda: [m for m in lines.lines if m.startswith("GET %s - " % path)])
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert line and line[0].startswith("GET %s - 200 " % path), line
    assert " %dB " % len(body) in line[0] and "error=" not in line[0], line
