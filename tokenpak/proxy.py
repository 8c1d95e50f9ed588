"""The HTTP server: reads a client's request, sends it to the provider, relays the answer.

This module only wires the others together (design.md's "one request, end to end"):
providers.py picks the upstream, upstream.py sends, and the request/response transforms
(compression, cache, footer, accounting) plug in at `App.prepare` and `App.relay`.

It builds on `http.server`, with three deliberate departures from its defaults:
HTTP/1.1 keep-alive (`protocol_version`), TCP_NODELAY so a response written as headers then
body is not held back by Nagle's algorithm, and one dispatch for every method, because a
transparent proxy must forward methods it has never heard of.

Responses are relayed the way they arrive. A body with a Content-Length is read whole and
written with its headers in one send; anything else (SSE streams, chunked or close-delimited
bodies) is relayed chunk by chunk with chunked transfer encoding, each chunk written to the
socket the moment the provider sends it.

Run as `python -m tokenpak.proxy --port N` (the seed docs' form) or `tokenpak serve`.
"""

import http.server
import json
import logging
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus

from . import __version__
from .errors import TokenpakError
from .providers import NoRoute, Router, credential
from .upstream import HOP_BY_HOP, Upstream, UpstreamError, iter_body, read_body

log = logging.getLogger("tokenpak")
access_log = logging.getLogger("tokenpak.access")

AUTH_HEADER = "x-tokenpak-auth"
LOCAL_PATHS = ("/health",)
# Request headers tokenpak consumes itself or that describe the client's connection.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", AUTH_HEADER,
                             "x-tokenpak-provider"}
MAX_WHOLE_BODY = 1024 * 1024  # non-stream answers up to this size go out in one write
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Exchange:
    """Everything known about one proxied request, from arrival to the access-log line."""

    __slots__ = ("method", "path", "headers", "lower", "body", "route", "started",
                 "status", "sent", "error", "ttfb")

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers          # [(name, value)] as the client sent them
        self.lower = {n.lower(): v for n, v in headers}
        self.body = body
        self.route = None
        self.started = time.monotonic()
        self.status = 0
        self.sent = 0                   # body bytes written to the client
        self.error = None
        self.ttfb = None

    def model(self):
        """The body's model name, parsed only when a routing rule needs it."""
        if not self.body or self.body[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
            return None
        try:
            return json.loads(self.body).get("model")
        except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
            return None


def error_body(api, status, message, kind=None):
    """tokenpak's own error, in the error shape the client's SDK already parses."""
    kind = kind or _ERROR_TYPES.get(status, "api_error")
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                408: "request_timeout", 413: "request_too_large", 502: "api_connection_error",
                503: "overloaded_error", 504: "timeout_error"}


class App:
    """The per-process state shared by all handler threads."""

    def __init__(self, config):
        self.config = config
        self.started = time.time()
        self.requests = 0
        self.active = 0
        self.idle = threading.Condition()
        self.apply_config(config)
        self.upstream = Upstream(config.get("proxy.connect_timeout"),
                                 config.get("proxy.read_timeout"))

    def apply_config(self, config):
        """(Re)read the settings that can change without a restart."""
        self.config = config
        self.router = Router.from_config(config)
        self.max_body = config.get("proxy.max_request_bytes")
        self.auth_token = config.get("proxy.auth_token")

    def health(self):
        return {"status": "ok", "version": __version__,
                "uptime_s": round(time.time() - self.started, 3), "requests": self.requests}

    def begin(self):
        with self.idle:
            self.active += 1
            self.requests += 1

    def end(self):
        with self.idle:
            self.active -= 1
            if not self.active:
                self.idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no request is in flight; False if `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.idle.wait(left)
        return True

    def close(self):
        self.upstream.close()


class Handler(http.server.BaseHTTPRequestHandler):
    """One client connection; handles its requests one after another (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "tokenpak/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.app.config.get("proxy.client_timeout") or None
        super().setup()

    # -- request reading ---------------------------------------------------------------
    def handle_one_request(self):
        """Read one request and dispatch it, whatever its method."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.dispatch()
            self.wfile.flush()
        except (socket.timeout, TimeoutError):
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def dispatch(self):
        app = self.server.app
        if self.command == "GET" and self.path.split("?", 1)[0] in LOCAL_PATHS:
            self.send_json(200, app.health())
            return
        app.begin()
        try:
            self.proxy(app)
        finally:
            app.end()

    def read_body(self, app):
        """The request body, or None after answering 4xx (size limit, bad framing)."""
        length = self.headers.get("Content-Length")
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            return self.read_chunked_body(app.max_body)
        if length is None:
            return b""
        try:
            size = int(length)
            if size < 0:
                raise ValueError(length)
        except ValueError:
            self.fail(400, "invalid Content-Length header %r" % length[:40], close=True)
            return None
        if size > app.max_body:
            self.fail_too_large(app.max_body)
            return None
        body = self.rfile.read(size)
        if len(body) < size:
            self.close_connection = True
            return None
        return body

    def read_chunked_body(self, limit):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.fail(400, "malformed chunked request body", close=True)
                return None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.fail_too_large(limit)
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)

    def fail_too_large(self, limit):
        self.fail(413, "request body is larger than proxy.max_request_bytes (%d bytes); "
                       "it was not forwarded" % limit, close=True)

    # -- proxying ----------------------------------------------------------------------
    def proxy(self, app):
        if app.auth_token and not self.authorised(app.auth_token):
            self.fail(401, "missing or wrong X-TokenPak-Auth header: this tokenpak requires "
                           "its proxy.auth_token")
            return
        body = self.read_body(app)
        if body is None:
            return
        ex = Exchange(self.command, self.path, self.headers.items(), body)
        self.exchange = ex
        try:
            ex.route = app.router.route(ex.path, ex.lower, ex.model)
        except NoRoute as exc:
            self.fail(400, str(exc))
            return
        try:
            self.forward(app, ex)
        finally:
            self.log_exchange(ex)

    def authorised(self, token):
        import hmac
        given = self.headers.get(AUTH_HEADER) or ""
        return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))

    def forward(self, app, ex):
        headers = {n: v for n, v in ex.headers if n.lower() not in DROP_REQUEST}
        try:
            response = app.upstream.send(ex.method, ex.route.url, headers, ex.body or None)
        except UpstreamError as exc:
            ex.error = exc.message
            self.fail(exc.status, exc.message)
            return
        try:
            self.relay(ex, response)
        finally:
            response.close()

    def relay(self, ex, response):
        """Send the provider's answer on, unbuffered when it is a stream."""
        ex.status = response.status_code
        ex.ttfb = time.monotonic() - ex.started
        headers = _response_headers(response.raw.headers)
        length = response.headers.get("Content-Length")
        if self.command == "HEAD" or ex.status in (204, 304) or ex.status < 200:
            self.write_head(ex.status, response.reason, headers, length)
            return
        if length is not None and length.isdigit() and int(length) <= MAX_WHOLE_BODY:
            body = read_body(response)
            self.write_head(ex.status, response.reason, headers, str(len(body)), body)
            ex.sent = len(body)
            return
        self.relay_stream(ex, response, headers)

    def relay_stream(self, ex, response, headers):
        """Relay a body of unknown length chunk by chunk (SSE, chunked, close-delimited)."""
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        self.write_head(ex.status, response.reason, headers, None, chunked=chunked)
        write = self.wfile.write
        try:
            for data in iter_body(response):
                write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
                ex.sent += len(data)
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)) and ex.sent >= 0:
                # The client went away (or the upstream broke): stop reading at once; the
                # caller closes the upstream response.
                pass
            ex.error = "stream interrupted: %s" % exc.__class__.__name__
            self.close_connection = True
            return
        except Exception as exc:  # urllib3 protocol/timeout errors mid-stream
            ex.error = "upstream stream failed: %s" % exc.__class__.__name__
            self.close_connection = True
            return
        if chunked:
            write(b"0\r\n\r\n")

    # -- writing -----------------------------------------------------------------------
    def write_head(self, status, reason, headers, length, body=b"", chunked=False):
        """Status line and headers, plus a small body, in a single send."""
        lines = ["HTTP/1.1 %d %s" % (status, reason or _reason(status))]
        lines.extend("%s: %s" % pair for pair in headers)
        if length is not None:
            lines.append("Content-Length: %s" % length)
        elif chunked:
            lines.append("Transfer-Encoding: chunked")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head + body if body else head)

    def send_json(self, status, obj, extra=()):
        body = json.dumps(obj).encode("utf-8")
        headers = [("Content-Type", "application/json")] + list(extra)
        self.write_head(status, None, headers, str(len(body)), body)

    def fail(self, status, message, close=False):
        """Answer with tokenpak's own error, shaped like the provider's."""
        ex = getattr(self, "exchange", None)
        api = ex.route.api if ex is not None and ex.route is not None else None
        if api is None:
            api = "anthropic" if self.path.startswith("/v1/messages") else "openai"
        if close:
            self.close_connection = True
        if ex is not None:
            ex.status = status
        self.send_json(status, error_body(api, status, message))

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors for malformed HTTP (bad request line, header overflow), as
        JSON instead of an HTML page."""
        self.close_connection = True
        text = message or _reason(code)
        if explain:
            text = "%s: %s" % (text, explain)
        try:
            self.send_json(int(code), error_body("openai", int(code), text))
        except OSError:
            pass

    # -- logging -----------------------------------------------------------------------
    def log_exchange(self, ex):
        """One access-log line. The path is logged without its query string, which may
        carry a key (Gemini's `?key=`); headers are never logged."""
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %s %d %.1fms %dB%s", ex.method, ex.path.split("?", 1)[0],
                            ex.route.provider if ex.route else "-", ex.status,
                            (time.monotonic() - ex.started) * 1000, ex.sent,
                            " error=%s" % ex.error if ex.error else "")

    def log_request(self, code="-", size="-"):
        pass  # replaced by log_exchange

    def log_message(self, format, *args):
        log.debug("%s: %s", self.address_string(), format % args)


def _response_headers(raw_headers):
    """Response headers to relay: all but hop-by-hop and framing ones, names as sent."""
    connection = raw_headers.get("Connection", "")
    extra = {token.strip().lower() for token in connection.split(",") if token.strip()}
    return [(n, v) for n, v in raw_headers.items()
            if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"
            and n.lower() not in extra]


def _reason(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class ProxyServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with the App attached and a deeper accept queue."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, app, listen_socket=None):
        self.app = app
        if listen_socket is None:
            if ":" in address[0]:
                self.address_family = socket.AF_INET6
            super().__init__(address, Handler)
        else:  # socket activation: systemd already bound and listens
            self.address_family = listen_socket.family
            super().__init__(address, Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen_socket
            self.server_address = listen_socket.getsockname()

    def handle_error(self, request, client_address):
        log.exception("unexpected error while handling a request")


def create_server(config, listen_socket=None):
    """Bind the listening socket. Raises TokenpakError (port in use, bad address)."""
    host, port = config.get("proxy.host"), config.get("proxy.port")
    try:
        return ProxyServer((host, port), App(config), listen_socket)
    except OSError as exc:
        hint = "stop the other process or pick another port with --port" \
            if exc.errno == 98 else None
        raise TokenpakError("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc),
                            hint=hint)


def serve(config, on_ready=None, listen_socket=None):
    """Run the proxy in the foreground until SIGINT/SIGTERM; returns the exit code."""
    server = create_server(config, listen_socket)
    host, port = server.server_address[:2]
    if host not in LOOPBACK and not host.startswith("127."):
        log.warning("listening on %s: anyone who can reach this address can use the proxy "
                    "and the cache%s", host, "" if config.get("proxy.auth_token")
                    else "; set proxy.auth_token to require a token")
    stop = threading.Event()

    def request_stop(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    log.info("tokenpak %s listening on http://%s:%d", __version__, host, port)
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        grace = config.get("proxy.shutdown_grace_seconds")
        if not server.app.wait_idle(grace):
            log.warning("stopping with requests still in flight after %.0f s", grace)
        server.app.close()
        log.info("tokenpak stopped")
    return 0


def main(argv=None):
    """`python -m tokenpak.proxy --port N`, the same as `tokenpak serve --port N`."""
    from .cli import main as cli_main
    return cli_main(["serve"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
