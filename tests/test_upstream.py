"""upstream.Upstream on its own: what reaches the provider through the prepared-request path."""

import http.server
import threading

import pytest

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
