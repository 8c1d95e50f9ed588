"""upstream.Upstream on its own: what reaches the provider through the prepared-request path."""

import http.server
import threading

import pytest

from tokenpak import upstream as upstream_module
from tokenpak.upstream import Upstream, UpstreamError


class _Provider(http.server.BaseHTTPRequestHandler):
    """Answers every request with a Set-Cookie, and remembers the headers it received."""

    protocol_version = "HTTP/1.1"
    seen = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.seen.append((dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Set-Cookie", "__cf_bm=tenant-a; Path=/")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def provider():
    _Provider.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_headers_and_body_arrive_as_given_and_no_cookie_is_replayed(provider):
    upstream = Upstream()
    try:
        for key in ("sk-tenant-a", "sk-tenant-b"):
            response = upstream.send("post", provider + "/v1/chat/completions",
                                     {"Authorization": "Bearer " + key}, b'{"a":1}')
            assert response.status_code == 200
            assert response.raw.read(decode_content=False) == b"ok"
            response.close()
    finally:
        upstream.close()
    (first, body), (second, _) = _Provider.seen
    assert body == b'{"a":1}'
    assert first["Content-Length"] == "7"
    assert second["Authorization"] == "Bearer sk-tenant-b"
    # One client's provider cookie must never ride along on another client's request.
    assert "Cookie" not in second


def test_a_refused_connection_is_a_502_without_headers():
    upstream = Upstream(connect_timeout=2)
    with pytest.raises(UpstreamError) as caught:
        upstream.send("POST", "http://127.0.0.1:1/v1/x", {"Authorization": "Bearer sk-secret"},
                      b"{}")
    assert caught.value.status == 502
    assert "sk-secret" not in caught.value.message
    upstream.close()


def _sends(monkeypatch):
    """Every write the pooled connections make, as the bytes given to one send."""
    sent = []
    original = upstream_module._HTTPConnection.send

    def send(self, data):
        sent.append(bytes(data))
        return original(self, data)

    monkeypatch.setattr(upstream_module._HTTPConnection, "send", send)
    return sent


def test_a_small_request_goes_out_in_one_send(provider, monkeypatch):
    sent = _sends(monkeypatch)
    upstream = Upstream()
    try:
        for body in (b'{"model":"gpt-4o"}', b'{"model":"gpt-4o","n":2}'):
            response = upstream.send("POST", provider + "/v1/chat/completions",
                                     {"Content-Type": "application/json"}, body)
            assert response.raw.read(decode_content=False) == b"ok"
            response.close()
    finally:
        upstream.close()
    # Head and body in one write each time (a pooled connection, then the same one reused).
    assert len(sent) == 2
    assert sent[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert sent[0].endswith(b"\r\n\r\n" + b'{"model":"gpt-4o"}')
    assert b"Content-Length: 18\r\n" in sent[0]
    assert [body for _, body in _Provider.seen] == [b'{"model":"gpt-4o"}',
                                                    b'{"model":"gpt-4o","n":2}']


def test_a_large_body_and_a_bodiless_request_still_arrive_whole(provider, monkeypatch):
    sent = _sends(monkeypatch)
    large = b'{"x":"' + b"a" * (upstream_module.JOIN_MAX + 10) + b'"}'
    upstream = Upstream()
    try:
        response = upstream.send("POST", provider + "/v1/x", {}, large)
        response.raw.read(decode_content=False)
        response.close()
        response = upstream.send("POST", provider + "/v1/y", {}, None)
        response.raw.read(decode_content=False)
        response.close()
    finally:
        upstream.close()
    assert [body for _, body in _Provider.seen] == [large, b""]
    assert sent[1] == large  # past JOIN_MAX: the body is its own write, not copied
    assert _Provider.seen[1][0]["Content-Length"] == "0"


def test_prepared_urls_are_remembered_only_without_query_or_credentials(provider):
    upstream_module._URLS.clear()
    upstream = Upstream()
    try:
        for path in ("/v1/a", "/v1/a", "/v1/b?key=AIzaSecret"):
            upstream.send("POST", provider + path, {}, b"{}").close()
        response = upstream.send("POST", provider.replace("//", "//user:pw@") + "/v1/c", {},
                                 b"{}")
        response.close()
    finally:
        upstream.close()
    assert list(upstream_module._URLS) == [provider + "/v1/a"]
    assert [headers.get("Authorization") for headers, _ in _Provider.seen] == \
        [None, None, None, "Basic dXNlcjpwdw=="]


def test_more_origins_than_pools_keep_working():
    """Origins past pool_connections evict the oldest pools (urllib3 1.26 closes them): a
    remembered pool must never be one that refuses requests (a 502)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Provider) for _ in range(10)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    _Provider.seen = []
    upstream = Upstream()
    try:
        for _ in range(2):
            for server in servers:
                response = upstream.send("POST", "http://127.0.0.1:%d/v1/x"
                                         % server.server_address[1], {}, b"{}")
                assert response.status_code == 200
                response.raw.read(decode_content=False)
                response.close()
    finally:
        upstream.close()
        for server in servers:
            server.shutdown()
            server.server_close()
    assert len(_Provider.seen) == 20
