"""Transparent forwarding at the HTTP level: headers, bodies, limits, bad input, the log."""

import base64
import hashlib
import http.client
import json
import logging

import pytest

from helpers import ALL_KEYS, OPENAI_KEY, assert_healthy, raw_request, send_raw, wait_for


def test_health(proxy):
    status, headers, body = proxy.get("/health")
    data = json.loads(body)
    assert status == 200
    assert data["status"] == "ok"
    assert set(data) >= {"version", "uptime_s", "requests"}
    assert headers["Content-Type"] == "application/json"


def test_request_headers_pass_through_except_hop_by_hop(proxy, fake):
    headers = {"Authorization": "Bearer " + OPENAI_KEY, "OpenAI-Organization": "org-1",
               "X-Custom-Thing": "Value With Case", "Content-Type": "application/json",
               "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic xyz", "TE": "trailers",
               "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "hop"}
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "h"}]}'
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", body, headers)
    assert response.status == 200
    received = fake.last()
    names = {n for n, _ in received.headers}
    assert received.header("X-Custom-Thing") == "Value With Case"
    assert "X-Custom-Thing" in names  # the name's case as the client sent it
    assert received.header("OpenAI-Organization") == "org-1"
    for hop in ("Keep-Alive", "Proxy-Authorization", "TE"):
        assert received.header(hop) is None
    assert received.body == body  # the body's bytes, untouched
    assert received.header("Host") == fake.url.split("//")[1]


def test_response_headers_pass_through(proxy, fake):
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions",
                              b'{"model":"gpt-4o","messages":[]}',
                              {"Authorization": "Bearer sk-x", "x-fake": "429"})
    assert response.status == 429
    assert response.getheader("Retry-After") == "7"
    assert response.getheader("x-ratelimit-remaining-requests") == "0"
    assert response.getheader("anthropic-ratelimit-requests-reset") == "2026-01-01T00:00:07Z"


def test_non_json_body_forwarded_byte_for_byte(proxy, fake):
    body = bytes(range(256)) * 40 + b"\r\n--boundary--\r\n"
    response, data = raw_request(proxy, "POST", "/v1/files", body, {
        "Authorization": "Bearer sk-x", "Content-Type": "multipart/form-data; boundary=b"})
    echo = json.loads(data)
    assert response.status == 200
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    assert base64.b64decode(echo["body_b64"]) == body


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_any_method_is_forwarded(proxy, fake, method):
    response, data = raw_request(proxy, method, "/v1/things/1", b"x" if method != "DELETE"
                                 else b"", {"Authorization": "Bearer sk-x"})
    assert response.status == 200
    assert json.loads(data)["method"] == method


def test_invalid_json_is_forwarded_untouched(proxy, fake):
    body = b'{"model": "gpt-4o", "messages": [oops'
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", body,
                              {"Authorization": "Bearer sk-x"})
    assert fake.last().body == body  # the provider, not tokenpak, judges its own API


def test_oversized_body_is_413_before_reading(make_proxy, fake):
    proxy = make_proxy(proxy__max_request_bytes=1000)
    # Declare 50 MB but send nothing: tokenpak must answer without waiting for the body.
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer sk-x\r\nContent-Length: 50000000\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"proxy.max_request_bytes" in body
    assert json.loads(body)["error"]["type"] == "request_too_large"
    assert fake.requests == []
    assert_healthy(proxy)


def test_oversized_chunked_body_is_413(make_proxy, fake):
    proxy = make_proxy(proxy__max_request_bytes=1000)
    chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
    answer = send_raw(proxy, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: sk-ant-x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk + chunk)
    assert answer.startswith(b"HTTP/1.1 413")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["type"] == "error"  # Anthropic shape
    assert fake.requests == []


def test_chunked_request_body_is_forwarded(proxy, fake):
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"chunky"}]}'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer sk-x\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + chunked + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert fake.last().body == body


@pytest.mark.parametrize("garbage, status", [
    (b"\x00\xff\xfe garbage\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/9.9\r\n\r\n", 505),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-H: v\r\n" * 200 + b"\r\n", 431),
])
def test_garbage_gets_its_error_status_and_server_stays_healthy(proxy, fake, garbage, status):
    answer = send_raw(proxy, garbage)
    # A whole answer in the provider's error shape, then the connection closes; never a
    # crash, a silent close or a forward.
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 %d " % status), answer[:80]
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]["message"]
    assert fake.requests == []
    assert_healthy(proxy)


def test_truncated_request_leaves_server_healthy(proxy, fake):
    send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                    b"\r\n\r\n{\"model\":", read=False)
    send_raw(proxy, b"POST /v1/chat/co", read=False)
    assert_healthy(proxy)
    assert fake.requests == []


def test_unroutable_request_is_a_clear_400(proxy, fake):
    response, data = raw_request(proxy, "POST", "/v2/unknown", b"{}", {})
    assert response.status == 400
    assert "proxy.passthrough_url" in json.loads(data)["error"]["message"]


def test_passthrough_url(make_proxy, fake):
    proxy = make_proxy(proxy__passthrough_url=fake.url + "/up")
    response, data = raw_request(proxy, "GET", "/anything?q=1", b"", {})
    assert response.status == 200
    assert json.loads(data)["path"] == "/up/anything?q=1"


def test_http10_client_gets_a_close_delimited_stream(proxy, fake):
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"old"}]}'
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer sk-x"
                             b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert rest.endswith(b"data: [DONE]\n\n")


def test_access_log_has_one_line_per_request_and_no_credentials(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="tokenpak")
    for key in ALL_KEYS:
        raw_request(proxy, "POST", "/v1/chat/completions?key=" + key,
                    b'{"model":"gpt-4o","messages":[]}', {"Authorization": "Bearer " + key})
    # The line is written once the response has gone out: wait for the server thread.
    def access_lines():
        return [r.getMessage() for r in caplog.records if r.name == "tokenpak.access"]
    wait_for(lambda: len(access_lines()) >= 3)
    lines = access_lines()
    assert len(lines) == 3
    # Each request came on its own connection, whose thread logs once its answer is out:
    # the lines are in the order the threads finished, not the order the requests came.
    providers = sorted(line.split()[2] for line in lines)
    assert all(line.startswith("POST /v1/chat/completions ") and " 200 " in line
               for line in lines), lines
    assert providers == ["anthropic", "google", "openai"], lines  # each key's own provider
    text = "\n".join(r.getMessage() for r in caplog.records)
    for key in ALL_KEYS:
        assert key not in text


def test_error_shape_of_a_keep_alive_request_is_its_own(make_proxy, fake):
    """A 413 after an Anthropic request on the same connection is in OpenAI's shape when
    its own path is OpenAI's: nothing carries over between keep-alive requests."""
    proxy = make_proxy(proxy__max_request_bytes=200)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/v1/messages", body=b'{"model":"claude-x","messages":[]}',
                 headers={"x-api-key": "sk-ant-x"})
    conn.getresponse().read()
    conn.request("POST", "/v1/chat/completions", body=b"x" * 500,
                 headers={"Authorization": "Bearer sk-x"})
    response = conn.getresponse()
    assert response.status == 413
    body = json.loads(response.read())
    assert body["error"]["type"] == "request_too_large"
    assert "type" not in body  # Anthropic's shape has a top-level "type": "error"
