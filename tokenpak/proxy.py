"""The HTTP server: reads a client's request, sends it to the provider, relays the answer.

This module only wires the others together (design.md's "one request, end to end"):
the Handler reads a request and routes it (providers.py), then hands it to `exchange.run`,
which compresses, consults the cache, forwards (upstream.py), relays and accounts, and
talks back only through the Handler's small writer interface (start, write, end, whole,
fail, watch). Every setting a request reads comes from one runtime snapshot (runtime.py),
read once when the request arrives; `App.reload` swaps snapshots atomically.

It builds on `http.server`, with three deliberate departures from its defaults:
HTTP/1.1 keep-alive (`protocol_version`), TCP_NODELAY so a response written as headers then
body is not held back by Nagle's algorithm, and one dispatch for every method, because a
transparent proxy must forward methods it has never heard of.

Responses are relayed the way they arrive. A body with a Content-Length is read whole and
written with its headers in one send; anything else (SSE streams, chunked or close-delimited
bodies) is relayed chunk by chunk with chunked transfer encoding, each chunk written to the
socket the moment the provider sends it.

The process around it (config, logging, signals, reload, systemd, --daemon) is lifecycle.py's:
`tokenpak serve` and `python -m tokenpak.proxy --port N` (the seed docs' form) both run it.
"""

import hmac
import http.server
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus

from . import __version__, dashboard, exchange, framing, runtime, stats
from .accounting import Recorder
from .budget import Ledger
from .cache import CacheStore, load_secret
from .config import worker_count
from .coalesce import Coalescer
from .doctor import db_path_problem
from .errors import TokenpakError
from .hangup import HangupWatcher
from .metrics import Metrics
from .providers import NoRoute, check_target, redact
from .relay import RelayLoop
from .runtime import RESTART_KEYS, host_name
from .stats import printable
from .upstream import Upstream

log = logging.getLogger("tokenpak")
access_log = logging.getLogger("tokenpak.access")

AUTH_HEADER = exchange.AUTH_HEADER
LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "[::1]", "::1"))
METHOD_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
LOCAL_ENDPOINTS = {}  # path -> Handler method, filled below the Handler class
LOCAL_METHODS = ("GET", "HEAD")
# The GIL's switch interval for a process that holds thousands of mostly idle streaming
# threads. Python's 5 ms default makes every thread waiting for the GIL wake on its own
# every 5 ms to ask for it: with a few hundred streams relaying at once, those futex
# wake-ups cost more CPU (kernel time) than the relaying itself (measured: 1.7 s of CPU a
# second at 2,500 events/s, against 0.6 s at 20 ms). A relay thread gives the GIL up at
# every read and write anyway, so a longer interval only bounds how long a CPU-bound
# request (compressing a big prompt) may keep the others waiting.
SWITCH_INTERVAL = 0.02
SEED_WAIT = 5.0  # seconds a start with budgets waits to read the spend so far


def _strip_line(raw):
    return raw.rstrip(b"\r\n").decode("latin-1")


def error_body(api, status, message, kind=None):
    """tokenpak's own error, in the error shape the client's SDK already parses."""
    shape = "anthropic" if api == "anthropic" else "openai"
    kind = kind or _API_ERROR_TYPES.get((shape, status)) or _ERROR_TYPES.get(status, "api_error")
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


# Where the providers name an error type of their own: a 429 from a budget is OpenAI's
# out-of-credit error and Anthropic's rate limit, which their SDKs raise as RateLimitError.
_API_ERROR_TYPES = {("openai", 429): "insufficient_quota", ("anthropic", 429): "rate_limit_error"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 431: "request_too_large",
                408: "request_timeout", 413: "request_too_large", 502: "api_connection_error",
                503: "overloaded_error", 504: "timeout_error"}


class App:
    """The per-process state shared by all handler threads: the runtime snapshot (what a
    reload may change, runtime.py), the upstream pool, the coalescer, the accounting
    writer and the counters behind /health, /stats, /metrics."""

    def __init__(self, config):
        self.started = time.time()
        self.requests = 0
        self.requests_done = 0   # requests fully handled and recorded
        self.active = 0
        self.idle = threading.Condition()
        self.db_path = config.get("db.path")
        self.upstream = Upstream(config.get("proxy.connect_timeout"),
                                 config.get("proxy.read_timeout"))
        self.read_timeout = config.get("proxy.read_timeout")
        self.coalescer = Coalescer()
        self.hangup = HangupWatcher()
        self.relay = RelayLoop()  # its thread starts with the first stream (after any fork)
        self.metrics = Metrics()
        self.recorder = Recorder(self.db_path)
        self.ledger = self.recorder.ledger = Ledger()  # the spend the budgets are checked on
        self.verified_scopes = set()
        self._cache = None  # (CacheStore, secret), once a config has enabled the cache
        self.runtime = None
        self.reload(config)
        self.key_secret()  # now, not on the first request's accounting
        self.recorder.start()
        if self.runtime.budgets is not None and not self.ledger.seeded.wait(SEED_WAIT):
            log.warning("budgets: the spend so far could not be read from %s; counting from "
                        "now on", self.db_path)

    def reload(self, config):
        """Apply `config` (start, SIGHUP): the new snapshot is built and validated in full,
        then swapped in by one assignment. Raises TokenpakError on an invalid config, having
        changed nothing; returns the changed settings that only a restart applies, or None."""
        new = runtime.build(config, self._open_cache)
        old, self.runtime = self.runtime, new
        self.recorder.prices = new.prices
        self.ledger.configure(new.budgets)
        store = new.cache.store
        if store is not None:
            store.ttl = float(config.get("cache.ttl_seconds"))
            store.max_bytes = int(float(config.get("cache.max_mb")) * 1024 * 1024)
        if old is None:
            return None
        return [n for n in runtime.changed(old.config, config) if n in RESTART_KEYS] or None

    def _open_cache(self, config):
        """(store, secret): opened the first time and kept until close(), so a request on an
        older snapshot never finds its store closed; (None, None) if it cannot be opened
        (fail open: serve uncached, and try again on the next reload)."""
        if self._cache is None:
            try:
                secret = load_secret(os.path.join(os.path.dirname(self.db_path), "secret"))
                store = CacheStore(self.db_path, config.get("cache.ttl_seconds"),
                                   config.get("cache.max_mb"))
                store.wait_for_commit = worker_count(config) > 1
                self._cache = (store, secret)
            except Exception as exc:
                log.warning("cache disabled: cannot open %s (%s)", self.db_path, exc)
                return None, None
        return self._cache

    _secret = None

    def key_secret(self):
        """The install's HMAC secret (the cache's, next to the DB), loaded once: key ids
        name credentials in accounting even with the cache off. None if unreadable."""
        if self._secret is None:
            try:
                self._secret = load_secret(os.path.join(os.path.dirname(self.db_path), "secret"))
            except Exception as exc:
                log.warning("key ids disabled: cannot read the install's secret (%s)", exc)
                self._secret = b""
        return self._secret or None

    # -- local endpoints -----------------------------------------------------------------
    def health(self):
        """"ok", or "degraded" when the database cannot be written: requests are still
        served, but their accounting (and the cache) would be lost silently. With
        proxy.workers > 1 the figures are the whole instance's (workers.Peers)."""
        body = {"status": "ok", "version": __version__,
                "uptime_s": round(time.time() - self.started, 3), "requests": self.requests,
                "in_flight": self.active, "pid": os.getpid(), "worker_pid": os.getpid(),
                "workers": 1}
        problem = db_path_problem(self.db_path)
        if problem:
            body.update(status="degraded", accounting="db.path %s: %s" % (self.db_path, problem))
        return body if self.peers is None else self.peers.health(body)

    def counters(self):
        """What this process adds to an instance-wide /health."""
        return {"requests": self.requests, "in_flight": self.active}

    def stats(self, since=None, by=()):
        """The /stats document (stats.summary), with this process's rows written first."""
        self.recorder.flush(2.0)
        summary = stats.summary(self.db_path, since, by, self.runtime.config.key_names())
        summary["budgets"] = self.ledger.report(self.runtime.budgets)
        return summary

    peers = None  # with proxy.workers > 1: the other workers' figures (workers.Peers)

    def render_metrics(self):
        text = self.metrics_text()
        return text if self.peers is None else self.peers.merged(text)

    def metrics_text(self):
        """This process's own figures."""
        return self.metrics.render({
            "tokenpak_in_flight_requests": ("Requests being proxied right now.", self.active),
            "tokenpak_uptime_seconds": ("Seconds since this tokenpak started.",
                                        time.time() - self.started)},
            budgets=self.ledger.report(self.runtime.budgets))

    # -- in-flight tracking for a graceful stop --------------------------------------------
    def begin(self):
        with self.idle:
            self.active += 1
            self.requests += 1

    def end(self):
        with self.idle:
            self.active -= 1
            self.requests_done += 1
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
        self.hangup.close()
        self.relay.close()
        self.recorder.close()
        if self._cache is not None:
            self._cache[0].close()
        self.upstream.close()


class Handler(http.server.BaseHTTPRequestHandler):
    """One client connection; handles its requests one after another (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "tokenpak/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True

    def setup(self):
        self.timeout = self.server.app.runtime.client_timeout
        super().setup()

    # -- request reading ---------------------------------------------------------------
    def handle_one_request(self):
        """Read one request and dispatch it, whatever its method; then log and record it."""
        self.exchange = None  # never the previous keep-alive request's
        self.head_sent = False
        try:
            self.raw_requestline = self.rfile.readline(65537)
            # This request's settings, once it has arrived, whatever a reload does meanwhile.
            self.rt = self.server.app.runtime
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
        except (socket.timeout, TimeoutError):
            self.close_connection = True
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:
            self.internal_error()
        finally:
            self.finish_exchange()

    def internal_error(self):
        """A bug in tokenpak: log it, and answer in the provider's shape if we still can,
        rather than dropping the connection on the client's SDK."""
        log.exception("unexpected error while handling %s %s", self.command,
                      printable((self.path or "").split("?", 1)[0]))
        self.close_connection = True
        if not self.head_sent:
            try:
                self.fail(500, "tokenpak internal error; see the tokenpak log")
            except OSError:
                pass

    def finish_exchange(self):
        """Log and record the request this connection just answered, whoever answered it:
        the provider, the cache, or tokenpak itself (a 4xx before forwarding, a local
        endpoint, a malformed request line). Never raises."""
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        if not ex.status and not ex.error:
            ex.error = "no answer: the client's connection closed or timed out"
        if not ex.local and not ex.recorded:
            exchange.record(self.server.app, self.rt, ex)
        self.log_exchange(ex)  # last: once its line is there, /metrics and the DB count it

    def settle(self):
        """Queue the exchange's accounting row just before the last bytes of its answer go
        out. A client that has its whole answer then finds the request in /stats,
        /metrics and `tokenpak logs`, and its next request is checked against budgets that
        count this one: read-your-writes, as the cache has it (exchange.relay_stream).
        finish_exchange records the rest after the answer: those that end otherwise (a
        client gone, a close-delimited body), and a parsed request without the provider's
        usage (an error, a refusal), whose row counts the prompt's tokens itself: that can
        wait for the tokenizer to load, and such a row costs nothing, so no budget or bill
        is behind by it."""
        ex = self.exchange
        if ex is None or ex.local or ex.recorded or (ex.usage is None
                                                     and ex.compressed is not None):
            return
        ex.recorded = True
        exchange.record(self.server.app, self.rt, ex)

    def parse_request(self):
        """The request line and headers, read strictly (framing.py says why); False after
        answering a malformed request. Replaces http.server's lenient parser, and does not
        answer `Expect: 100-continue` here: read_body does, after the auth and size checks."""
        self.command, self.path, self.requestline = None, "", ""
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        self.framing = ("none", 0)
        try:
            self.requestline = _strip_line(self.raw_requestline)
            method, target, version = framing.parse_request_line(self.raw_requestline)
            self.command, self.path = method, target
            self.request_version = "HTTP/%d.%d" % version
            self.headers = framing.read_fields(self.rfile)
            framing.check_head(self.headers, version)
            self.framing = framing.body_framing(self.headers, version)
        except framing.FramingError as exc:
            if exc.status is not None:
                message = exc.message
                if self.command is None:  # the request line itself (query cut by send_error)
                    message = "%s: %r" % (message, self.requestline[:200])
                self.send_error(exc.status, message)
            return False
        tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",")}
        self.close_connection = "close" in tokens or (
            version < (1, 1) and "keep-alive" not in tokens)
        return True

    def dispatch(self):
        app = self.server.app
        self.exchange = exchange.Exchange(self.command, self.path, self.headers.items(), b"")
        local = LOCAL_ENDPOINTS.get(self.path.split("?", 1)[0])
        if local is not None and self.command not in LOCAL_METHODS:
            self.fail(405, "%s answers GET and HEAD only" % self.path.split("?", 1)[0],
                      extra=[("Allow", ", ".join(LOCAL_METHODS))])
            return
        if local is not None and (local in OPEN_PAGES or not self.rt.auth_token
                                  or self.authorised(self.rt.auth_token)):
            if local is not Handler.send_health and not self.host_allowed():
                self.fail(403, "Host %r is not a name of this tokenpak: local pages answer "
                               "only loopback names and proxy.allowed_hosts"
                               % printable(self.headers.get("Host") or "")[:100], close=True)
                return
            # A body on a local page is read and dropped (within the size limit): left in
            # the stream, it would be parsed as the next request.
            if self.framing[0] != "none" and self.read_body() is None:
                return
            # /health is open to monitors; usage figures need the token. Successful local
            # answers are logged but not recorded: a monitor polling /health every few
            # seconds would otherwise fill the accounting table with non-requests.
            self.exchange.local = True
            local(self, app)
            return
        app.begin()
        try:
            self.proxy(app)
        except (OSError, TimeoutError):
            raise  # the client's connection: handle_one_request closes it
        except Exception:
            self.internal_error()
        finally:
            self.finish_exchange()  # before end(): a drained tokenpak has recorded everything
            app.end()

    def host_allowed(self):
        """DNS-rebinding defence: a web page whose name resolves to 127.0.0.1 must not
        read /stats or /metrics from a browser. When tokenpak listens on loopback only, its
        local pages answer a Host naming loopback or one of proxy.allowed_hosts (/health,
        open to monitors and telling nothing about usage, answers any)."""
        if not self.server.loopback:
            return True
        name = host_name(self.headers.get("Host") or "")
        return name in LOOPBACK_NAMES or name in self.rt.allowed_hosts

    def send_health(self, app):
        self.send_json(200, app.health())

    def send_root(self, app):
        """GET or HEAD / that no rule routes: tokenpak says what it is (Claude Code sends
        `HEAD /` on start to check that its base URL answers)."""
        self.send_json(200, {"service": "tokenpak", "version": __version__,
                             "health": "/health"})

    def send_stats(self, app):
        """/stats, optionally `?since=7d` (or a date) and `?by=tag,key,day` (stats.GROUPS)."""
        query = urllib.parse.parse_qs(self.path.partition("?")[2])
        try:
            since = query.get("since", [""])[-1]
            by = [name.strip() for value in query.get("by", []) for name in value.split(",")
                  if name.strip()]
            document = app.stats(stats.parse_since(since) if since else None,
                                 stats.check_groups(list(dict.fromkeys(by))))
        except TokenpakError as exc:
            self.fail(400, "%s (%s)" % (exc.message.replace("--since", "since="), exc.hint))
            return
        self.send_json(200, document)

    def send_dashboard(self, app):
        """The dashboard page (dashboard.py): no figures in it, so no token needed for it;
        its script reads /stats, which needs the token."""
        body, headers = dashboard.page()
        self.send_local(200, headers, body)

    def send_metrics(self, app):
        body = app.render_metrics().encode("utf-8")
        self.send_local(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], body)

    def read_body(self):
        """The request body, or None after answering 4xx (size limit, bad framing). Sends
        `100 Continue` first when the client waits for it: only requests that passed the
        auth and size checks get it."""
        kind, size = self.framing
        limit = self.rt.max_body
        if kind == "none":
            return b""
        if kind == "length" and size > limit:
            self.fail_too_large(limit)
            return None
        if size != 0 and self.request_version == "HTTP/1.1" \
                and (self.headers.get("Expect") or "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if kind == "chunked":
            try:
                return framing.read_chunked(self.rfile, limit)
            except framing.FramingError as exc:
                self.close_connection = True
                if exc.status == 413:
                    self.fail_too_large(limit)
                elif exc.status is not None:
                    self.fail(exc.status, exc.message, close=True)
                return None
        body = self.rfile.read(size)
        if len(body) < size:
            self.close_connection = True
            return None
        return body

    def fail_too_large(self, limit):
        self.fail(413, "request body is larger than proxy.max_request_bytes (%d bytes); "
                       "it was not forwarded" % limit, close=True)

    # -- proxying ----------------------------------------------------------------------
    def proxy(self, app):
        ex = self.exchange
        if not METHOD_TOKEN.match(self.command):
            self.fail(400, "invalid HTTP method %r" % self.command[:40], close=True)
            return
        refused = check_target(self.path)
        if refused:
            self.fail(400, refused, close=True)
            return
        rt = self.rt
        if rt.auth_token and not self.authorised(rt.auth_token):
            # The body is not read: close, or it would be parsed as the next request.
            self.fail(401, "missing or wrong X-TokenPak-Auth header: this tokenpak requires "
                           "its proxy.auth_token", close=True)
            return
        body = self.read_body()
        if body is None:
            return
        ex.body = ex.forward_body = body
        try:
            ex.route = rt.router.route(ex.path, ex.lower, ex.model_name)
        except NoRoute as exc:
            if self.command in LOCAL_METHODS and ex.path.split("?", 1)[0] == "/":
                self.send_root(app)  # a transparent proxy forwards `/` when it can route it
                return
            self.fail(400, str(exc))
            return
        exchange.run(self, app, rt, ex)

    def authorised(self, token):
        given = self.headers.get(AUTH_HEADER) or ""
        return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))

    # -- the writer exchange.py uses (see its docstring) --------------------------------
    def whole(self, status, headers, body):
        """A complete answer with its length, headers and body in one send; body None: the
        head alone (HEAD, 204, 304), whose headers already say any length."""
        if body is None:
            self.settle()
            self.write_head(status, headers, None)
            return
        self.exchange.sent = len(body)
        self.settle()
        self.write_head(status, headers, str(len(body)), body)

    def start(self, status, headers):
        """Headers of an answer whose body follows in chunks (close-delimited for HTTP/1.0)."""
        self.chunked = self.request_version == "HTTP/1.1"
        if not self.chunked:
            self.close_connection = True
        self.write_head(status, headers, None, chunked=self.chunked)

    def write(self, data):
        """Send one piece of a stream now; False when the client has gone."""
        if not data:
            return True
        try:
            self.send_now(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        except OSError:
            self.close_connection = True
            return False
        self.exchange.sent += len(data)
        return True

    def end(self):
        self.settle()
        if self.chunked:
            try:
                self.send_now(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True

    def send_now(self, data):
        """`wfile.write(data)` (a sendall) in one system call when the socket takes it all.

        A socket with a timeout is non-blocking underneath, and sendall polls before each
        send: two releases of the GIL per relayed event, and with hundreds of streaming
        threads every reacquisition is a futex wait. write(2) on the descriptor sends at
        once; only what the socket buffer did not take goes through sendall, which waits
        for room within the client timeout."""
        try:
            sent = os.write(self.connection.fileno(), data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self.wfile.write(memoryview(data)[sent:])

    def watch(self, abort):
        """Call `abort()` (from the hang-up watcher's thread) if this client hangs up;
        returns the function that stops watching."""
        hangup = self.server.app.hangup
        token = hangup.watch(self.connection, abort)
        return lambda: hangup.unwatch(token)

    def direct(self):
        """What the relay loop needs to write this stream's body itself (relay.py): the
        loop, the socket's descriptor, whether the body is chunked, what to call if the
        loop finds the client gone, how to send bytes already framed (a clean end's last
        ones), the read and client timeouts. None for a socket
        without a timeout (proxy.client_timeout 0): it blocks, and a write from the loop
        would stall every stream; such a stream stays on this thread."""
        app = self.server.app
        if self.connection.gettimeout() is None:
            return None
        return (app.relay, self.connection.fileno(), self.chunked, self.lost, self.send_now,
                app.read_timeout, self.timeout)

    def lost(self):
        """The relay loop found this client gone: whatever the tail still writes fails at
        once rather than waiting on a client that takes nothing."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- writing -----------------------------------------------------------------------
    def write_head(self, status, headers, length, body=b"", chunked=False):
        """Status line and headers, plus a small body, in a single send.

        The answer to HEAD is the head alone (RFC 9110 9.3.2): Content-Length still says
        what GET would have sent, but no body follows, or the client would read it as the
        start of the next answer on the connection."""
        lines = ["HTTP/1.1 %d %s" % (status, _reason(status))]
        lines.extend("%s: %s" % pair for pair in headers)
        if length is not None:
            lines.append("Content-Length: %s" % length)
        elif chunked:
            lines.append("Transfer-Encoding: chunked")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.head_sent = True
        if body and self.command != "HEAD":
            head += body
        self.wfile.write(head)

    def send_json(self, status, obj, extra=()):
        body = json.dumps(obj).encode("utf-8")
        self.send_local(status, [("Content-Type", "application/json")] + list(extra), body)

    def send_local(self, status, headers, body):
        """An answer tokenpak gives itself, noted for the access log (status, bytes)."""
        ex = getattr(self, "exchange", None)
        if ex is not None:
            ex.status, ex.sent = status, 0 if self.command == "HEAD" else len(body)
        self.settle()
        self.write_head(status, headers, str(len(body)), body)

    def fail(self, status, message, close=False, extra=()):
        """Answer with tokenpak's own error, shaped like the provider's."""
        ex = getattr(self, "exchange", None)
        api = ex.route.api if ex is not None and ex.route is not None else None
        if api is None:
            api = "anthropic" if (self.path or "").startswith("/v1/messages") else "openai"
        if close:
            self.close_connection = True
        message = redact(message)
        if ex is not None:
            ex.error = ex.error or message
        self.send_json(status, error_body(api, status, message),
                       [(exchange.CACHE_HEADER, "bypass")] + list(extra))

    def send_error(self, code, message=None, explain=None):
        """The stdlib's errors for malformed HTTP (bad request line, header overflow), as
        JSON instead of an HTML page; recorded like tokenpak's other answers."""
        self.close_connection = True
        text = message or _reason(code)
        if explain:
            text = "%s: %s" % (text, explain)
        # The request line may not have been parsed: no method, and a path only if it was.
        method = self.command or "-"
        path = self.path if self.command and isinstance(getattr(self, "path", None), str) else "-"
        self.exchange = exchange.Exchange(method, path, [], b"")
        # The stdlib quotes the raw request line in some messages: never keep its query
        # string (Gemini's `?key=`) in the log or the DB.
        self.exchange.error = text = _no_query(text)
        try:
            self.send_json(int(code), error_body("openai", int(code), text))
        except OSError:
            pass

    # -- logging -----------------------------------------------------------------------
    def log_exchange(self, ex):
        """One access-log line. The path is logged without its query string, which may
        carry a key (Gemini's `?key=`); headers are never logged; control characters a
        client sent (path, model) are escaped so they cannot forge lines or colours on a
        terminal. Successful answers of the local endpoints go to the debug level."""
        level = logging.DEBUG if ex.local and ex.status < 400 else logging.INFO
        if access_log.isEnabledFor(level):
            # makeRecord + handle is Logger.log without its search of the call stack for a
            # file and line number that no tokenpak log format shows (a tenth of the line).
            access_log.handle(access_log.makeRecord(
                access_log.name, level, __file__, 0,
                "%s %s %s %d %.1fms %dB model=%s cache=%s%s",
                (ex.method, printable(ex.path.split("?", 1)[0]),
                 ex.route.provider if ex.route else "-",
                 ex.status, (time.monotonic() - ex.started) * 1000, ex.sent,
                 printable(ex.model or "-")[:200], ex.cache,
                 " error=%s" % printable(redact(ex.error)) if ex.error else ""), None))
        if access_log.isEnabledFor(logging.DEBUG) and not ex.local:  # why it went that way
            usage = ex.usage
            access_log.debug(
                "  client=%s upstream=%s stream=%s compression=%s ttfb=%s usage=%s",
                self.address_string(), ex.route.url.split("?", 1)[0] if ex.route else "-",
                "yes" if ex.streamed else "no",
                ex.compressed.reason if ex.compressed is not None else "-",
                "%.1fms" % (ex.ttfb * 1000) if ex.ttfb is not None else "-",
                "in=%d out=%d cache_read=%d" % (usage.input, usage.output, usage.cache_read)
                if usage is not None else "-")

    def log_request(self, code="-", size="-"):
        pass  # replaced by log_exchange

    def log_message(self, format, *args):
        log.debug("%s: %s", self.address_string(), _no_query(format % args))


_QUERY = re.compile(r"\?[^\s'\"]*")


def _no_query(text):
    """`text` with every query string cut out ("/v1/x?key=..." -> "/v1/x?...")."""
    return _QUERY.sub("?...", text) if "?" in text else text


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _reason(status):
    return _REASONS.get(status, "Unknown")


_REASONS = {status.value: status.phrase for status in HTTPStatus}  # not an Enum call per answer


LOCAL_ENDPOINTS.update({"/health": Handler.send_health, "/stats": Handler.send_stats,
                        "/metrics": Handler.send_metrics, "/dashboard": Handler.send_dashboard})
# Local pages answered without proxy.auth_token: /health (monitors) and the dashboard's
# page, which holds no figures (its data comes from /stats, token and all).
OPEN_PAGES = (Handler.send_health, Handler.send_dashboard)


class ProxyServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with the App attached and a deeper accept queue."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, app, listen_socket=None):
        self.app = app
        if sys.getswitchinterval() < SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)  # see SWITCH_INTERVAL
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
        self.loopback = _is_loopback(self.server_address[0])

    last_loop = 0.0

    def service_actions(self):
        # Called by serve_forever on every loop: the watchdog's sign of life.
        self.last_loop = time.monotonic()

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


if __name__ == "__main__":  # `python -m tokenpak.proxy --port N`, the seed docs' form
    from tokenpak.cli import main
    sys.exit(main(["serve"] + sys.argv[1:]))
