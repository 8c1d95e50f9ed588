"""One proxied request, end to end: prepare, look up, forward, relay, record.

This is design.md's "one request" walk. `proxy.Handler` owns the sockets and calls `run()`
once a request is read and routed, with the request's runtime snapshot (runtime.py) and
the App's shared state (upstream pool, coalescer, accounting). Everything here talks to the
client through a small writer interface, which the Handler implements and a test can fake:

    start(status, headers)     the head of an answer whose body follows in chunks
    write(data) -> bool        one chunk, sent now; False once the client has gone
    end()                      the end of a chunked body
    whole(status, headers, body)  a complete answer in one send; body None: a head only
                                  (HEAD, 204, 304), its headers already saying the length
    fail(status, message, extra=())  tokenpak's own error, in the provider's error shape
    watch(abort) -> unwatch    call abort() if the client hangs up while we relay
    settle()                   queue the accounting row now, before a stream's final event
                               (end() and whole() do it themselves)
    direct() (optional)        what relay.RelayLoop needs to write a stream's body to the
                               client's socket itself; a writer without it (or returning
                               None) gets every chunk through write()

1. prepare: for a JSON body of a shape tokenpak knows (OpenAI chat, OpenAI Responses,
   Anthropic messages), strip old footers from the history and compress (footer.py,
   compression.py). An OpenAI chat stream that did not ask for usage is asked for it, and
   the extra chunk is dropped again on the way back (sse.StreamRewriter), so accounting
   never records a stream as free; a Responses stream always ends with its usage.
2. cache (cache.py): a fresh entry for this credential answers at once; otherwise identical
   requests in flight share one upstream call (coalesce.py).
3. forward (upstream.py) and relay, unless a spent budget refuses the call (budget.py;
   checked here, so cache hits and followers are still answered): a body with a length
   goes out in one write; a stream is relayed chunk by chunk, through the rewriter, to the
   client and into the flight, which followers read and which is the one copy kept for
   the cache.
4. record (accounting.py, metrics.Metrics): one row per request, queued to a writer thread.

Anything the optimisations raise is logged and the request goes on unoptimised: the user's
answer never depends on the cache, the compressor or the accounting database.
"""

import hashlib
import json
import logging
import threading
import time

from . import budget, footer, jsonbody, sse
from .accounting import MAX_TAG, SERVED_LOCALLY, figures, is_free
from .cache import Entry, key_from_fields, scope_id
from .coalesce import Flight, FlightFailed
from .compression import compress_request
from .hangup import shutdown_upstream
from .providers import credential, redact
from .relay import Stream, give_back, take_over
from .upstream import HOP_BY_HOP, UpstreamError, iter_body, read_body

log = logging.getLogger("tokenpak")

CACHE_HEADER = "X-TokenPak-Cache"
AUTH_HEADER = "x-tokenpak-auth"
TAG_HEADER = "x-tokenpak-tag"  # who or what a request is for; recorded, never forwarded
# Request headers tokenpak consumes itself or that describe the client's connection.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", AUTH_HEADER,
                             "x-tokenpak-provider", TAG_HEADER}
MAX_WHOLE_BODY = 1024 * 1024     # non-stream answers up to this size go out in one write
MAX_CACHED_BODY = 8 * 1024 * 1024  # larger answers are relayed but not cached
# Request headers that would make the answer differ from what tokenpak must parse.
NO_PARSE_HEADERS = ("accept-encoding",)
NOT_CACHED_HEADERS = frozenset(("set-cookie", "date"))


class Exchange:
    """Everything known about one proxied request, from arrival to its accounting row."""

    __slots__ = ("method", "path", "headers", "lower", "body", "route", "started", "status",
                 "sent", "error", "ttfb", "request", "forward_body", "compressed", "cache",
                 "scope", "key", "streamed", "usage", "model", "complete", "drop_usage",
                 "no_store", "no_cache", "local", "priced", "tag", "bad_tag", "key_id",
                 "_json", "parsed", "recorded")

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers          # [(name, value)] as the client sent them
        self.lower = {n.lower(): v for n, v in headers}
        self.body = body
        self.forward_body = body        # what goes upstream (compressed, usage requested)
        self.route = None
        self.started = time.monotonic()
        self.status = 0
        self.sent = 0                   # body bytes written to the client
        self.error = None
        self.ttfb = None
        self.request = None             # the parsed JSON body, when its shape is known
        self.compressed = None          # compression.Result
        self.cache = "bypass"
        self.scope = self.key = None
        self.streamed = False
        self.usage = None               # sse.Usage from the provider's answer
        self.model = None
        self.complete = True
        self.drop_usage = False
        self.no_store = self.no_cache = False
        self.local = False              # a local endpoint's answer: logged, not recorded
        self.recorded = False           # its row is queued (Handler.settle)
        self.priced = None              # (price inputs, figures) the footer computed
        self._json = False              # not parsed yet
        self.parsed = None              # jsonbody.Body: the JSON value and its spans
        self.tag = self.bad_tag = None  # X-TokenPak-Tag, or why it was refused
        self.key_id = False             # the credential's label (key_label); not known yet
        if TAG_HEADER in self.lower:
            self.tag, self.bad_tag = read_tag(self.lower[TAG_HEADER])

    def json_body(self):
        """The body as a JSON value, or None; parsed at most once per request."""
        if self._json is False:
            self._json = None
            if self.body and self.body.lstrip()[:1] == b"{":
                try:
                    self.parsed = jsonbody.parse(self.body)
                    self._json = self.parsed.value
                except (ValueError, UnicodeDecodeError, RecursionError):
                    pass
        return self._json

    def model_name(self):
        """The body's model name, parsed only when a routing rule needs it."""
        value = self.json_body()
        return value.get("model") if isinstance(value, dict) else None


def read_tag(value):
    """(tag, None) for an X-TokenPak-Tag value, or (None, why it is refused): trimmed, cut
    to MAX_TAG characters, empty meaning no tag. Control characters are refused rather than
    cleaned, as they would forge lines in the logs and reports the tag is shown in. The
    value arrives as latin-1 (http.server's reading); a UTF-8 tag reads as UTF-8."""
    try:
        value = value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    value = value.strip()
    if not value.isprintable():
        return None, "invalid X-TokenPak-Tag header: a tag cannot hold control characters"
    return (value[:MAX_TAG].rstrip() or None), None


# -- 1. prepare ---------------------------------------------------------------------------
def prepare(rt, ex):
    """Parse, strip footers, compress and decide on caching; never fails the request."""
    api = ex.route.api
    if api is None or ex.method != "POST":
        return
    request = ex.json_body()  # invalid JSON: the provider will say what is wrong with it
    if not known_shape(api, request):
        return
    ex.request = request
    ex.model = request.get("model") if isinstance(request.get("model"), str) else None
    ex.streamed = request.get("stream") is True
    directives = (ex.lower.get("cache-control") or "").lower()
    ex.no_store = "no-store" in directives
    ex.no_cache = "no-cache" in directives
    body = request
    try:
        body = footer.strip_history(api, body, ex.body)
        if rt.compression.enabled:
            ex.compressed = compress_request(api, body, rt.compression)
            body = ex.compressed.body
            if ex.compressed.changed:
                ex.compressed.prefetch()  # exact counts while the provider works
    except Exception:
        log.exception("compression failed; forwarding the request as it came")
        body, ex.compressed = request, None
    if api == "openai" and ex.streamed:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            # Ask for usage so the stream is accounted; the rewriter removes it again.
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            body = dict(body, stream_options=options)
            ex.drop_usage = True
    if body is not request:
        ex.forward_body, fields = jsonbody.serialise(ex.parsed, body, edits(ex, request))
    else:
        fields = None
    if rt.cache.store is not None and not ex.no_store:
        try:
            if fields is None:
                fields = jsonbody.fields_of(ex.parsed)
            ex.key = key_from_fields(ex.route.provider, ex.path, fields, ex.lower) + (
                ":sse" if ex.streamed else ":json")
            ex.scope = cache_scope(rt.cache, credential(ex.lower, ex.path))
            if ex.scope is None:
                ex.key = None  # no credential: not cached (cache.anonymous opts in)
            else:
                ex.cache = "miss"
        except Exception:
            log.exception("cache key failed; not caching this request")
            ex.key = None


def edits(ex, request):
    """{message index: ((path, new text), ...)}: compression's changes per message, when
    they are all that changed in it (no footer was stripped first), for jsonbody.serialise."""
    result = ex.compressed
    if result is None or not result.changed or result.original is not request:
        return None
    out = {}
    for unit, text, _ in result.changes:
        out.setdefault(unit.msg, []).append((unit.path, text))
    return {msg: tuple(changes) for msg, changes in out.items()}


def known_shape(api, request):
    """Whether a parsed body has the shape of its API: `messages` a list (chat, Anthropic),
    or `input` a string or a list of items (Responses)."""
    if not isinstance(request, dict):
        return False
    if api == "responses":
        return isinstance(request.get("input"), (str, list))
    return isinstance(request.get("messages"), list)


def cache_scope(policy, key):
    """The cache scope of a credential: an HMAC of it, never the key itself. None (do not
    cache) for a request without any credential, unless cache.anonymous opts in: otherwise
    every keyless client would read every other keyless client's answers."""
    if key is None and not policy.anonymous:
        return None
    return keyed_hmac(policy.secret, key)


def keyed_hmac(secret, key):
    """cache.scope_id(key, secret), memoised (see _SCOPES)."""
    memo = (secret, _fingerprint(key))
    scope = _SCOPES.get(memo)
    if scope is None:
        if len(_SCOPES) >= MAX_SCOPES:
            _SCOPES.clear()
        scope = _SCOPES[memo] = scope_id(key, secret)
    return scope


def _fingerprint(key):
    """A 128-bit BLAKE2b digest of the credential: collision-resistant (two keys sharing a
    memo entry would share a cache scope), a fifth of the HMAC's cost, and not the key."""
    if key is None:
        return None
    data = key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def key_label(app, rt, ex):
    """The request's key id: the first 12 hex characters of the credential's HMAC with the
    install's secret (its cache scope), None without a credential or a readable secret.
    Computed once per request, cache or not; it names a key in reports and budgets
    without being the key, and without the secret it cannot be traced back to one."""
    if ex.key_id is False:
        ex.key_id = None
        if ex.scope is not None and not rt.cache.anonymous:
            ex.key_id = ex.scope[:12]  # the cache's HMAC of a credential: the same figure
            return ex.key_id
        key = credential(ex.lower, ex.path)
        secret = rt.cache.secret or app.key_secret()
        if key is not None and secret is not None:
            ex.key_id = keyed_hmac(secret, key)[:12]
    return ex.key_id


# Scopes already computed, keyed by (install secret, the credential's fingerprint): a
# client sends the same key on every request, so its HMAC need not be redone each time.
# The raw key is never kept. Bounded: cleared when full.
_SCOPES = {}
MAX_SCOPES = 1024


def lookup(app, rt, ex, since=None):
    """The cache entry for this request's credential. In shared mode all keys read one
    scope, but only keys that this route's configured provider has itself accepted (a 2xx
    it answered, see record): a rejected key never gets a hit. `since`: see CacheStore.get."""
    if rt.cache.shared:
        if (ex.scope, ex.route.provider) not in app.verified_scopes:
            return None
        return rt.cache.store.get("shared", ex.key, since)
    return rt.cache.store.get(ex.scope, ex.key, since)


# -- 2. cache and coalescing --------------------------------------------------------------
def run(out, app, rt, ex):
    """Answer one routed request (see the module docstring): `out` is the writer, `app`
    the process's shared state, `rt` the runtime snapshot this request reads."""
    if ex.bad_tag:
        out.fail(400, ex.bad_tag)
        return
    prepare(rt, ex)
    if ex.key is None:
        forward(out, app, rt, ex, None)
        return
    version = rt.cache.store.version()  # before the lookup: see CacheStore.get
    entry = None if ex.no_cache else lookup(app, rt, ex)
    if entry is None:
        flight, leader = app.coalescer.join(ex.scope + ex.key)
        if leader and not ex.no_cache:
            # An identical request may have finished between our lookup and the join: its
            # answer is in the cache now, and asking the provider again would be paid twice.
            # It was put by this process (the coalescer is per process): no SELECT unless
            # the writer moved entries from memory to the database since our lookup.
            entry = lookup(app, rt, ex, since=version)
            if entry is not None:
                app.coalescer.done(ex.scope + ex.key, flight)
    if entry is not None:
        ex.cache = "hit"
        replay(out, rt, ex, entry)
        return
    if not leader:
        try:
            followed = follow(out, app, rt, ex, flight)
        finally:
            flight.leave()  # the last reader out stops the shared upstream call
        if followed:
            return
        # The leader failed before answering: make our own call, with a flight of our own
        # that no one joins (it holds the answer for the cache, as a leader's does).
        flight = Flight()
    try:
        forward(out, app, rt, ex, flight)
    finally:
        app.coalescer.done(ex.scope + ex.key, flight)


def replay(out, rt, ex, entry):
    """Answer from a cache entry, streamed as SSE events when the entry is a stream."""
    ex.status, ex.usage, ex.model = entry.status, _usage_from(entry.usage), entry.model or ex.model
    ex.ttfb = time.monotonic() - ex.started
    headers = list(entry.headers) + [(CACHE_HEADER, "hit")] + footer_headers(ex)
    if entry.streamed:
        rewriter = make_rewriter(rt, ex)
        out.start(entry.status, headers)
        out.settle()  # its figures are the entry's: accounted before its [DONE] goes out
        for event in sse.split_events(entry.body):
            out.write(rewriter.feed(event) if rewriter else event)
        if rewriter:
            out.write(rewriter.close())
        out.end()
        return
    out.whole(entry.status, headers,
              finish_body(rt, ex, entry.body, parse_answer(ex, entry.body)))


def follow(out, app, rt, ex, flight):
    """Answer from another request's upstream call; False if it failed before a head."""
    head = flight.wait_head(app.read_timeout)
    if head is None:
        return False
    ex.cache = "coalesced"
    rewriter = None
    ex.status, headers = head
    ex.ttfb = time.monotonic() - ex.started
    headers = [h for h in headers if h[0] != CACHE_HEADER] + [(CACHE_HEADER, "hit")]
    whole = any(name.lower() == "content-length" for name, _ in headers)
    try:
        if whole:
            body = b"".join(flight.chunks(app.read_timeout))
            headers = [h for h in headers if h[0].lower() != "content-length"]
            parsed = parse_answer(ex, body)
            out.whole(ex.status, headers + footer_headers(ex), finish_body(rt, ex, body, parsed))
            return True
        rewriter = make_rewriter(rt, ex) if ex.status < 300 else None
        out.start(ex.status, headers + footer_headers(ex))
        gone = threading.Event()  # our client hung up: stop reading the shared stream

        def hung_up():
            gone.set()
            flight.wake()

        unwatch = out.watch(hung_up)
        try:
            for chunk in flight.chunks(app.read_timeout, gone):
                if not out.write(rewriter.feed(chunk) if rewriter else chunk):
                    gone.set()
                    break
        finally:
            unwatch()
        if gone.is_set():
            ex.error, ex.complete = "client disconnected mid-stream", False
            return True
        if rewriter:
            out.write(rewriter.close())
            ex.usage = rewriter.watcher.usage
        out.end()
    except FlightFailed as exc:
        ex.error, ex.complete = "shared upstream call failed: %s" % exc, False
        if rewriter is not None:
            out.write(rewriter.abort("upstream connection lost mid-stream"))
        out.end()
    return True


# -- 3. forward and relay -------------------------------------------------------------------
def forward_headers(ex):
    headers = {n: v for n, v in ex.headers if n.lower() not in DROP_REQUEST}
    if ex.request is not None:
        for name in list(headers):
            if name.lower() in NO_PARSE_HEADERS:
                del headers[name]  # identity encoding: the answer must be parseable
    return headers


def response_headers(raw_headers):
    """Response headers to relay: all but hop-by-hop and framing ones, names as sent."""
    connection = raw_headers.get("Connection", "")
    extra = {token.strip().lower() for token in connection.split(",") if token.strip()}
    return [(n, v) for n, v in raw_headers.items()
            if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"
            and n.lower() not in extra]


def forward(out, app, rt, ex, flight):
    """Make the upstream call and relay its answer (to followers too, when leading)."""
    if rt.budgets is not None and over_budget(out, app, rt, ex, flight):
        return
    try:
        response = app.upstream.send(ex.method, ex.route.url,
                                     forward_headers(ex),
                                     ex.forward_body or None)
    except UpstreamError as exc:
        ex.error = exc.message
        if flight is not None:
            flight.finish(False)
        out.fail(exc.status, exc.message)
        return
    try:
        relay(out, rt, ex, response, flight)
    finally:
        response.close()


def over_budget(out, app, rt, ex, flight):
    """Refuse, with 429 and no upstream call, a request that a spent budget applies to
    (budget.py). Checked here, the one way to the provider: cache hits and coalesced
    followers, which cost nothing, never get this far; free endpoints (a GET, a token
    count) cost nothing either and pass. `x-should-retry: false` tells the
    SDKs not to retry what only the period's end will allow."""
    if is_free({"method": ex.method, "path": ex.path}):
        return False  # a model list or a token count costs nothing: it cannot run over
    key_id = key_label(app, rt, ex) if rt.budgets.keys else None  # the row's key id
    refused = budget.refusal(app.ledger, rt.budgets, ex.tag, key_id)
    if refused is None:
        return False
    message, retry_after = refused
    if flight is not None:
        flight.finish(False)  # followers check for themselves
    out.fail(429, message, extra=[("Retry-After", str(retry_after)),
                                  ("x-should-retry", "false")])
    return True


def relay(out, rt, ex, response, flight):
    ex.status = response.status_code
    ex.ttfb = time.monotonic() - ex.started
    headers = response_headers(response.raw.headers)
    headers.append((CACHE_HEADER, ex.cache))
    length = response.headers.get("Content-Length")
    if ex.method == "HEAD" or ex.status in (204, 304) or ex.status < 200:
        # A head alone; the provider's Content-Length (if any) says what GET would send.
        out.whole(ex.status, headers + ([("Content-Length", length)] if length else []), None)
        if flight is not None:
            flight.finish(False)
        return
    if length is not None and length.isdigit() and int(length) <= MAX_WHOLE_BODY:
        relay_whole(out, rt, ex, response, headers, flight)
    else:
        relay_stream(out, rt, ex, response, headers, flight)


def relay_whole(out, rt, ex, response, headers, flight):
    body = read_body(response)
    if flight is not None:
        flight.set_head(ex.status, headers + [("Content-Length", str(len(body)))])
        flight.push(body)
        flight.finish(True)
    parsed = parse_answer(ex, body)
    if ex.key is not None and 200 <= ex.status < 300 and not ex.no_store:
        store(rt, ex, headers, body, streamed=False)
    out.whole(ex.status, headers + footer_headers(ex), finish_body(rt, ex, body, parsed))


def relay_stream(out, rt, ex, response, headers, flight):
    """Relay chunk by chunk: to the client (through the rewriter) and to the flight, which
    followers read and which is the one copy kept for the cache (a cached request always
    has a flight). A client that leaves stops the upstream read at once, unless followers
    still need it; then the last of them to leave stops it.

    A chunked body is moved by the process's relay loop (relay.py), which calls `feed` per
    chunk from its own thread while this one waits for the body's end: no wake-up per
    event. Anything else is read here, chunk by chunk. Either way this thread then ends
    the answer (final event, footer, store, flight)."""
    rewriter = make_rewriter(rt, ex) if ex.request is not None and ex.status < 300 else None
    if flight is not None:
        flight.set_head(ex.status, headers)
    size = 0
    record = ex.key is not None and 200 <= ex.status < 300 and not ex.no_store

    gone = threading.Event()  # our client hung up (set from the hang-up watcher's thread)

    def stop():
        gone.set()
        shutdown_upstream(response)

    def abort():
        # Our client hung up: stop now, or once the last follower reading it has gone too.
        # After the final event the answer is whole (clients hang up right there): cut the
        # upstream's tail but keep the flight open to arrivals, which answered() then
        # finishes with the whole answer and caches.
        if (rewriter is not None and rewriter.watcher.complete) or flight is None \
                or flight.leader_left(stop):
            stop()

    def answered():
        # Our client left once the final event reached it: the answer is whole (see
        # got_final_event), so it is cached and shared like one that ended normally.
        if not got_final_event(ex, rewriter):
            return False
        if record and size <= MAX_CACHED_BODY:
            store(rt, ex, headers, flight.body(), streamed=True)
        if flight is not None:
            flight.finish(True)  # after store: a later arrival finds one or the other
        return True

    def feed(data):
        # One chunk of the body (called by the relay loop's thread): what the client gets.
        nonlocal size
        if flight is not None:
            flight.push(data)
        size += len(data)
        if gone.is_set():
            return None
        return rewriter.feed(data) if rewriter else data

    def lost():
        # The relay loop found the client gone (write failed, or it took nothing for the
        # client timeout): as a failed out.write below.
        if not gone.is_set():
            abort()

    out.start(ex.status, headers + footer_headers(ex))
    unwatch = out.watch(abort)
    direct = getattr(out, "direct", None)
    target = direct() if direct is not None else None
    source = take_over(response) if target is not None else None
    try:
        if source is not None:
            loop, fd, chunked, client_lost, send, read_timeout, client_timeout = target
            stream = Stream(source[0], source[1], feed, fd, chunked, gone, lost,
                            read_timeout, client_timeout)
            failure = loop.relay(stream)  # this thread sleeps until the body is over
            ex.sent += stream.sent
            if stream.out and not stream.client_dead and not gone.is_set():
                try:
                    send(bytes(stream.out))  # a clean end's last bytes (RelayLoop._finish)
                except OSError:
                    stream.client_dead = True
                    abort()
            if stream.client_dead:
                client_lost()
            if failure is not None:
                raise failure
            if stream.decoder.done and not stream.decoder.extra and not gone.is_set():
                give_back(response, source[0], source[2])
        else:
            for data in iter_body(response):
                data = feed(data)
                if data is not None and not out.write(data):
                    abort()
                    if gone.is_set():
                        break
    except Exception as exc:  # the upstream broke mid-stream (reset, timeout, bad framing)
        ex.complete = False
        if gone.is_set() and answered():
            return
        if not gone.is_set():
            ex.error = "upstream stream failed: %s" % exc.__class__.__name__
            if rewriter:
                out.write(rewriter.abort("upstream connection lost mid-stream; "
                                         "the answer is incomplete"))
            out.end()
        if flight is not None:
            flight.finish(False)
        return
    finally:
        unwatch()
    if gone.is_set():
        if answered():
            return
        ex.complete, ex.error = False, ex.error or "client disconnected mid-stream"
        if flight is not None:
            flight.finish(False)
        return
    tail = b""
    if rewriter:
        watcher = rewriter.watcher
        if watcher.complete or watcher.errored:
            tail = rewriter.close()
        else:
            # The body ended without [DONE] / message_stop: a truncated answer must not
            # look like a finished one to the client's SDK.
            ex.error = "upstream ended the stream before its final event"
            tail = rewriter.abort("the provider closed the stream early; "
                                  "the answer is incomplete")
        ex.usage, ex.complete = watcher.usage, watcher.complete
        ex.model = watcher.model or ex.model
    # Stored and accounted before the client has the final event (an SDK returns at
    # [DONE], before the body's end), and the flight finished after that: an identical
    # request the client sends the moment it has its answer finds the entry queued
    # (read-your-writes), or the flight, never neither; /stats, /metrics and the budgets
    # already count this one.
    if record and ex.complete and rewriter is not None and size <= MAX_CACHED_BODY:
        store(rt, ex, headers, flight.body(), streamed=True)
    out.settle()
    out.write(tail)
    if flight is not None:
        flight.finish(ex.complete)
    out.end()


def got_final_event(ex, rewriter):
    """A client that hung up once the final event reached it got the whole answer: Codex
    closes its connection at response.completed, before the chunked body's end. Then the
    call is complete and accounted with the usage that went through, not a lost stream."""
    if rewriter is None or not rewriter.watcher.complete:
        return False
    ex.usage, ex.complete = rewriter.watcher.usage, True
    ex.model = rewriter.watcher.model or ex.model
    return True


def store(rt, ex, headers, body, streamed):
    usage = ex.usage
    entry = Entry(status=ex.status, body=body, streamed=streamed, created=time.time(),
                  headers=[h for h in headers if h[0].lower() not in NOT_CACHED_HEADERS
                           and h[0] != CACHE_HEADER],
                  usage=_usage_dict(usage) if usage is not None else {},
                  model=ex.model or "")
    rt.cache.store.put("shared" if rt.cache.shared else ex.scope, ex.key, entry)


# -- footer ----------------------------------------------------------------------------------
def make_rewriter(rt, ex):
    """The stream rewriter for this client: drops the usage chunk it did not ask for and
    inserts the footer where allowed."""
    api = ex.route.api
    line = None
    if rt.footer and footer.wants_footer(api, ex.request):
        line = lambda usage: footer_line(rt, ex, usage)  # noqa: E731
    if line is None and not ex.drop_usage:
        return sse.StreamRewriter(api)
    return sse.StreamRewriter(api, drop_usage=ex.drop_usage, footer=line)


def finish_body(rt, ex, body, parsed):
    """A whole JSON answer with the footer appended, where allowed; else `body` itself.
    `parsed` is the answer's JSON object (parse_answer), modified in place."""
    if not (rt.footer and parsed is not None and 200 <= ex.status < 300
            and footer.wants_footer(ex.route.api, ex.request)):
        return body
    if not footer.append_to_response(ex.route.api, parsed, footer_line(rt, ex, ex.usage)):
        return body
    return _ANSWER_ENCODER.encode(parsed).encode("utf-8")


_ANSWER_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps makes one per call


def token_counts(ex, usage):
    """(tokens before, tokens after) compression: the provider's own prompt count, plus
    what compression removed; our count only when the provider gave none."""
    saved = 0
    result = ex.compressed
    if result is not None and result.changed:
        saved = max(0, result.tokens_before - result.tokens_after)
    if usage is not None and usage.prompt_total:
        return usage.prompt_total + saved, usage.prompt_total
    if result is not None:
        return result.tokens_before, result.tokens_after
    return 0, 0


def footer_line(rt, ex, usage):
    """The footer for this answer: the same cost and savings its accounting row gets."""
    accounted = row(ex, usage)
    priced = figures(accounted, rt.prices)
    ex.priced = (_price_inputs(accounted), priced)  # row() reuses them: priced once
    return footer.format_line(accounted["tokens_before"] or 0, accounted["tokens_after"] or 0,
                              "hit" if ex.cache in SERVED_LOCALLY else ex.cache,
                              priced["cost_usd"], priced["saved_usd"])


def footer_headers(ex):
    """X-TokenPak-* figures known before the answer: compression's token counts."""
    result = ex.compressed
    if result is None or not result.changed:
        return []
    before, after = result.tokens_before, result.tokens_after
    saved = (before - after) * 100.0 / before if before else 0.0
    return [("X-TokenPak-Tokens-Before", str(before)), ("X-TokenPak-Tokens-After", str(after)),
            ("X-TokenPak-Saved-Percent", "%.1f" % saved)]


# -- 4. accounting --------------------------------------------------------------------------
def record(app, rt, ex):
    """Queue the accounting row and count the metrics; never raises. In shared cache mode,
    the provider's own 2xx answer verifies a key for that provider (see lookup)."""
    try:
        if rt.cache.shared and ex.scope and ex.route is not None \
                and 200 <= ex.status < 300 and ex.cache in ("miss", "bypass") and not ex.error:
            app.verified_scopes.add((ex.scope, ex.route.provider))
        ex.error = redact(ex.error)
        key_label(app, rt, ex)
        accounted = row(ex)
        app.recorder.record(accounted)
        app.metrics.observe(accounted)
    except Exception:
        log.exception("accounting failed for one request")


def row(ex, usage=None):
    """The accounting row for a finished exchange (see accounting.py for the columns),
    priced already when the footer priced the same figures; `usage` defaults to ex.usage."""
    usage = ex.usage if usage is None else usage
    before = after = None
    if ex.request is not None:
        before, after = token_counts(ex, usage)
    accounted = {
        "ts": time.time(), "provider": ex.route.provider if ex.route else None,
        "model": ex.model, "method": ex.method, "path": ex.path.split("?", 1)[0],
        "status": ex.status,
        "streamed": ex.streamed, "cache": ex.cache,
        "usage": _usage_dict(usage) if usage is not None else None,
        "tokens_before": before, "tokens_after": after,
        "latency_ms": (time.monotonic() - ex.started) * 1000.0,
        "ttfb_ms": ex.ttfb * 1000.0 if ex.ttfb is not None else None,
        "key_id": ex.key_id or None, "tag": ex.tag,
        "error": ex.error, "complete": ex.complete,
    }
    if ex.priced is not None and ex.priced[0] == _price_inputs(accounted):
        accounted.update(ex.priced[1])
    return accounted


def _price_inputs(accounted):
    """What a row's price depends on (accounting.figures reads these fields only)."""
    return tuple(accounted[name] for name in ("model", "cache", "method", "path", "status",
                                               "usage", "tokens_before", "tokens_after"))


def _usage_dict(usage):
    out = {"input": usage.input, "output": usage.output, "cache_read": usage.cache_read,
           "cache_write": usage.cache_write}
    if usage.cache_write_1h:  # priced apart (pricing.cost); kept with a cached answer
        out["cache_write_1h"] = usage.cache_write_1h
    return out


def _usage_from(stored):
    if not stored:
        return None
    return sse.Usage(stored.get("input", 0), stored.get("output", 0),
                     stored.get("cache_read", 0), stored.get("cache_write", 0),
                     stored.get("cache_write_1h", 0))


def parse_answer(ex, body):
    """The JSON object of a whole answer to a known request shape, or None; sets the
    exchange's usage and model from it."""
    if ex.request is None or not body or body[:1] != b"{":
        return None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("model"), str):
        ex.model = obj["model"]
    if 200 <= ex.status < 300:
        ex.usage = sse.usage_from_response(ex.route.api, obj)
    return obj
