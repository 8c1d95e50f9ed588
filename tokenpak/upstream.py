"""Forwarding to the provider over pooled keep-alive connections.

One `requests.Session` for the whole process, with an adapter sized for many concurrent
streams: connections to api.openai.com and friends are reused across requests, which saves a
TLS handshake (tens of milliseconds) on every call.

Retries follow one rule: never send twice what the provider may already have received. A
connection that fails before the request is written (connect errors, including a pooled
keep-alive connection the provider had already closed, which urllib3 detects before reuse)
is retried; a failure after the request went out is retried only for idempotent methods.
A POST to /v1/chat/completions is therefore never re-sent: it may have been billed.

Each call goes straight to the mounted adapter with a request prepared here, not through
`Session.request`: that path merges environment settings, cookies and hooks on every call
and stores the provider's cookies in the session, then sends them with every other
client's requests. A transparent proxy wants none of it, and the saved work is a sixth of
a small request's CPU. The adapter still does the pooling, retries and TLS checks.

Two more per-call costs are taken out where requests' seams allow. A URL's preparation
(parsing, IDNA and quoting checks) is remembered per URL, for URLs without a query or
credentials (nothing secret is kept). And the pool's connections send the request head and a
small body in one send, where http.client makes two: one syscall, one TLS record and one
packet instead of two, and the provider is woken once, not first for a head whose body is
still to come.

Responses are always opened with `stream=True` and handed to the caller undecoded
(`Content-Encoding` passes through as it came), so the proxy decides per response whether to
relay chunk by chunk or read it whole.
"""

import requests
import urllib3
from requests.adapters import HTTPAdapter, TimeoutSauce
from requests.structures import CaseInsensitiveDict
from urllib3.util.retry import Retry

# Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection, never forwarded.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
))
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
CHUNK_SIZE = 64 * 1024
JOIN_MAX = 64 * 1024  # request bodies up to this size go out in the head's send
MAX_URLS = 256        # prepared URLs remembered (cleared when full)


class UpstreamError(Exception):
    """The provider could not be reached or did not answer in time.

    `status` is what the client gets: 502 (unreachable, connection broken) or 504 (timed
    out). The message never contains request headers."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Upstream:
    """The pooled HTTP client all requests go through."""

    def __init__(self, connect_timeout=10.0, read_timeout=600.0, pool_size=64):
        self.timeout = (connect_timeout, read_timeout)
        # Built once: given a tuple, the adapter would build this on every call.
        self._timeout = TimeoutSauce(connect=connect_timeout, read=read_timeout)
        self.session = requests.Session()
        # Forward exactly what the client sent: no default User-Agent/Accept headers, no
        # proxy or netrc lookups from the environment on every request.
        self.session.headers.clear()
        self.session.trust_env = False
        retry = Retry(total=2, connect=2, read=1, status=0, other=0, redirect=0,
                      allowed_methods=IDEMPOTENT, raise_on_status=False,
                      respect_retry_after_header=False)
        adapter = _Adapter(pool_connections=8, pool_maxsize=pool_size, max_retries=retry,
                           pool_block=False)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def send(self, method, url, headers, body):
        """Send one request; returns the open `requests.Response` (stream=True).

        `headers` is a dict of the headers to forward (hop-by-hop ones already removed).
        Raises UpstreamError when there is no response to relay."""
        try:
            prepared = prepare(method, url, headers, body)
            return self.session.get_adapter(url).send(prepared, stream=True,
                                                      timeout=self._timeout, verify=True)
        except requests.exceptions.ConnectTimeout:
            raise UpstreamError(504, "timed out connecting to %s" % _origin(url))
        except requests.exceptions.ReadTimeout:
            raise UpstreamError(504, "%s did not answer within %.0f s (proxy.read_timeout)"
                                % (_origin(url), self.timeout[1]))
        except requests.exceptions.RequestException as exc:
            raise UpstreamError(502, "cannot reach %s: %s" % (_origin(url), _reason(exc)))
        except ValueError as exc:  # a header or method http.client refuses to send
            raise UpstreamError(400, "request cannot be forwarded: %s" % str(exc)[:200])

    def close(self):
        self.session.close()


def prepare(method, url, headers, body):
    """The request as `requests` would prepare it (URL checked and quoted, Content-Length
    set from the body, credentials in the URL turned into a header), without its cookie jar
    and hooks. Raises requests' own errors for a bad URL, as Session.request would."""
    prepared = requests.PreparedRequest()
    prepared.prepare_method(method)
    known = _URLS.get(url)
    if known is None:
        prepared.prepare_url(url, None)
    else:
        prepared.url = known
    prepared.prepare_headers(headers)
    prepared.prepare_body(body, None)
    if known is None:
        prepared.prepare_auth(None, url)
        # Only a URL without credentials or a query (Gemini's `?key=`) is remembered: its
        # prepare_auth is a no-op, and no secret stays in memory after its request.
        if "@" not in url and "?" not in url:
            if len(_URLS) >= MAX_URLS:
                _URLS.clear()
            _URLS[url] = prepared.url
    return prepared


_URLS = {}  # the client-facing URL -> requests' prepared form of it


class _JoinedSend:
    """A pooled connection that sends the request head and a small body in one send.

    http.client writes the head, then the body: two syscalls, and on loopback the provider's
    server is woken for a head whose body has not arrived yet. Here `request` holds back a
    body of known length and `_send_output` (where http.client writes the head) appends it.
    Works with urllib3 2 (which sends the body itself after the head) and 1.26 (which hands
    it to http.client)."""

    _joined_body = None

    def request(self, method, url, body=None, headers=None, **kwargs):
        if isinstance(body, bytes) and 0 < len(body) <= JOIN_MAX \
                and not kwargs.get("chunked") and headers is not None \
                and "Content-Length" in headers:
            self._joined_body = body
            try:
                # No body for the caller to send: the Content-Length header already frames it.
                return super().request(method, url, None, headers, **kwargs)
            finally:
                self._joined_body = None
        return super().request(method, url, body, headers, **kwargs)

    def _send_output(self, message_body=None, encode_chunked=False):
        body = self._joined_body
        if body is None or message_body is not None:
            return super()._send_output(message_body, encode_chunked)
        self._buffer.extend((b"", b""))
        head = b"\r\n".join(self._buffer)
        del self._buffer[:]
        self.send(head + body)
        return None


class _HTTPConnection(_JoinedSend, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_JoinedSend, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter whose pools make _JoinedSend connections (the pool-class seam),
    and which finds a request's pool by its origin in a dict: the stock lookup parses the
    URL and builds urllib3's pool key on every call, though the origin is one of a few."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._pools = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        """requests >= 2.32's lookup, remembered per origin for the settings Upstream uses
        (verified TLS, no client certificate, no proxy). At most pool_connections origins
        are remembered, as the manager keeps; a pool it has closed on eviction (urllib3
        1.26 does) is looked up again."""
        scheme, _, rest = request.url.partition("://")
        origin = scheme + "://" + rest.split("/", 1)[0]
        pool = self._pools.get(origin)
        if pool is None or pool.pool is None or proxies or verify is not True \
                or cert is not None or "@" in origin:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            if not proxies and verify is True and cert is None and "@" not in origin:
                if len(self._pools) >= self._pool_connections:
                    self._pools.clear()
                self._pools[origin] = pool
        return pool

    def build_response(self, req, resp):
        """requests' Response for a urllib3 one, without parsing its Set-Cookie headers into
        a cookie jar nobody reads: they reach the client as headers, like any other."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = None  # tokenpak relays bytes; it never decodes response.text
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


def iter_body(response):
    """Yield the response body as it arrives, undecoded, one network read at a time.

    Chunked responses (SSE from OpenAI and Anthropic) yield each chunk as the provider sends
    it; others yield whatever one read returns (`read1`), never waiting to fill a buffer."""
    raw = response.raw
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(CHUNK_SIZE, decode_content=False)
        return
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2; Debian's 1.26 lacks it
    while True:
        data = read1(CHUNK_SIZE, decode_content=False) if read1 else raw._fp.read1(CHUNK_SIZE)
        if not data:
            return
        yield data


def read_body(response):
    """The whole body, undecoded (for small non-stream answers)."""
    return response.raw.read(decode_content=False)


def _origin(url):
    head, _, rest = url.partition("://")
    return head + "://" + rest.split("/", 1)[0]


def _reason(exc):
    """A short human reason for a connection failure, without urllib3's object reprs."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "Connection reset", "Remote end closed", "No route to host",
                   "Temporary failure in name resolution", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return exc.__class__.__name__
