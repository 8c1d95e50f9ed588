"""One epoll loop per process that relays the bodies of all streamed answers at once.

A streamed answer used to be relayed by its own handler thread: every upstream event woke
that thread, which then had to win the GIL back from thousands of others. With a few
thousand streams most of the process's CPU went to the kernel handing the GIL from thread
to thread (README, "Many long streams"), and the cost of an event grew with the number of
threads. Here one thread moves the *body* of every chunked stream: it reads each provider
socket when epoll says it is readable, decodes the chunked framing itself, hands each chunk
to the stream's `feed` (exchange.relay_stream: flight, size, rewriter) and writes what comes
back to the client's socket. The handler thread sets the stream up, then waits on an Event
until the body is over and runs the usual tail (final event, store, accounting): it is not
woken per event.

Three small pieces:
  ChunkedDecoder  the strict, incremental decoder of a chunked body (RFC 9112 7.1)
  Stream          one stream's state: its two sockets, decoder, client buffer and clocks
  RelayLoop       the thread, its selector, the timers

The body is taken over from urllib3 after the response head was read (`take_over`): what
http.client's buffered reader already holds is read first, the socket is then read directly,
non-blocking. A TLS socket may hold decrypted bytes that do not make its descriptor readable
(`SSLSocket.pending()`): the loop reads until the socket says it would block, and when it
stops early (a slow client, a fair share) it remembers the stream as ready. Anything that is
not a chunked body of the expected shape stays on the handler thread (upstream.iter_body).

A slow client costs bounded memory: past MAX_BUFFERED bytes waiting for it, its upstream is
no longer read, so TCP back-pressures the provider as it did when the thread blocked in its
write. Timeouts are checked once a second: an upstream silent for proxy.read_timeout fails
the stream (TimeoutError), a client that takes nothing for the client timeout is gone.

After a clean end with nothing left over, the upstream connection goes back to urllib3's
pool (give_back) for the next request to reuse; after anything else it is closed.
"""

import collections
import logging
import os
import selectors
import socket
import ssl
import threading
import time

log = logging.getLogger("tokenpak")

RECV_SIZE = 64 * 1024        # one recv from a provider socket
READS_PER_TURN = 16          # recvs for one stream before the others get their turn
MAX_BUFFERED = 256 * 1024    # bytes waiting for a slow client before its upstream pauses
MAX_CHUNK_PIECE = 64 * 1024  # a chunk larger than this is passed on in pieces as it arrives
MAX_LINE = 4096              # a chunk-size or trailer line
MAX_TRAILERS = 64 * 1024     # all trailer lines of a body together
TAKE_OVER_READ = 256 * 1024  # more than http.client's reader ever buffers
TICK = 1.0                   # seconds between timeout checks


class ChunkedError(ValueError):
    """The provider's chunked framing is broken: the stream fails as an upstream error."""


class ChunkedDecoder:
    """Incremental, strict decoder of a chunked body. `feed(data)` returns the chunks it
    completed (a chunk over MAX_CHUNK_PIECE bytes comes in pieces as it arrives); `done`
    once the last chunk and the trailers are read. Extensions are ignored, trailers
    consumed, every CRLF checked: bad framing raises ChunkedError rather than passing a
    misread body on as if it were the provider's."""

    __slots__ = ("_buf", "_left", "_state", "_piece", "_trailers", "done", "extra")

    def __init__(self):
        self._buf = b""        # bytes not decoded yet (a partial line)
        self._left = 0         # data bytes still due in the current chunk
        self._state = "size"   # size, data, crlf, trailer, done
        self._piece = []       # the current chunk's data so far
        self._trailers = 0
        self.done = False
        self.extra = b""       # bytes after the body's end (the connection cannot be reused)

    def feed(self, data):
        out = []
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == "data":
                take = min(self._left, end - pos)
                self._piece.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "crlf"
                    out.append(b"".join(self._piece))
                    self._piece = []
                elif sum(map(len, self._piece)) >= MAX_CHUNK_PIECE:
                    out.append(b"".join(self._piece))
                    self._piece = []
                continue
            if state == "done":
                self.extra += buf[pos:]
                pos = end
                break
            if state == "crlf":
                if end - pos < 2:
                    if buf[pos:end] != b"\r"[:end - pos]:
                        raise ChunkedError("chunk not followed by CRLF")
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedError("chunk not followed by CRLF")
                pos += 2
                self._state = "size"
                continue
            # A line: a chunk size, or a trailer.
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if end - pos > MAX_LINE:
                    raise ChunkedError("chunk line too long")
                break
            line = buf[pos:nl]
            pos = nl + 1
            if len(line) > MAX_LINE or not line.endswith(b"\r"):
                raise ChunkedError("chunk line not ended by CRLF")
            line = line[:-1]
            if state == "size":
                self._size(line)
            else:
                self._trailer(line)
        self._buf = buf[pos:] if pos < end else b""
        return out

    def _size(self, line):
        digits = line.split(b";", 1)[0].rstrip(b" \t")
        if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
            raise ChunkedError("invalid chunk size")
        self._left = int(digits, 16)
        self._state = "data" if self._left else "trailer"

    def _trailer(self, line):
        if not line:
            self._state = "done"
            self.done = True
            return
        self._trailers += len(line) + 2
        if self._trailers > MAX_TRAILERS or b":" not in line:
            raise ChunkedError("invalid trailer")


def take_over(response):
    """(socket, bytes already read, the socket's timeout) for a chunked `requests` response
    whose body has not been touched, its socket now non-blocking; None for anything else
    (not chunked, an unknown object shape), which the handler thread relays itself. Works
    with urllib3 2.x and 1.26: both wrap an http.client response whose buffered reader
    holds the socket."""
    raw = getattr(response, "raw", None)
    fp = getattr(raw, "_fp", None)   # http.client.HTTPResponse
    reader = getattr(fp, "fp", None)  # its io.BufferedReader over a SocketIO
    sock = getattr(getattr(reader, "raw", None), "_sock", None)
    if not (getattr(raw, "chunked", False) and getattr(fp, "chunked", False)
            and getattr(fp, "chunk_left", 0) is None and isinstance(sock, socket.socket)
            and hasattr(reader, "read1") and getattr(raw, "_fp_bytes_read", 0) == 0):
        return None
    timeout = sock.gettimeout()
    sock.setblocking(False)
    # What the reader buffered with the head: read1 returns all of it (its buffer is 8 KiB,
    # io.DEFAULT_BUFFER_SIZE, far below the size asked) and nothing from the socket; with
    # an empty buffer it reads the socket once. Anything more the loop reads itself.
    try:
        data = reader.read1(TAKE_OVER_READ)
    except OSError:  # would block (SSLWantReadError too), or reset: the loop's recv sees
        data = b""   # the same socket and tells which
    head = [data] if data else []  # b"": nothing now, or end of file: the loop will tell
    return sock, head, timeout


def give_back(response, sock, timeout):
    """Return the connection of a body that ended cleanly, nothing after it, to urllib3's
    pool: its socket blocking again with urllib3's timeout, and http.client's response
    closed (it never read the body; an open one would make the next request on the
    connection fail with ResponseNotReady). requests' close() then leaves it pooled."""
    sock.settimeout(timeout)
    response.raw._fp._close_conn()
    response.raw.release_conn()


class Stream:
    """One stream in the loop: created by the handler thread (RelayLoop.relay), then
    touched by the loop thread only, until `done` is set."""

    def __init__(self, sock, head, feed, client_fd, chunked, gone, lost,
                 read_timeout, client_timeout):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.head = head              # bytes take_over read
        self.feed = feed              # chunk -> bytes for the client, or None
        self.client_fd = client_fd
        self.chunked = chunked        # the client's answer is chunked (HTTP/1.1)
        self.gone = gone              # threading.Event: the client hung up (hang-up watcher)
        self.lost = lost              # called (loop thread) when a write finds it gone
        self.read_timeout = read_timeout
        self.client_timeout = client_timeout
        self.decoder = ChunkedDecoder()
        self.out = bytearray()        # framed bytes the client's socket has not taken yet
                                      # (after a clean end: for the handler thread to write)
        self.sent = 0                 # body bytes given to the client (Exchange.sent)
        self.client_dead = False
        self.paused = False           # upstream not read: the client's buffer is full
        self.reading = False          # upstream registered in the selector
        self.writing = False          # client registered for EVENT_WRITE
        self.ending = False           # body over; flushing what the client still has to take
        self.failure = None           # the exception that ended the body, if any
        self.last_read = self.last_write = time.monotonic()
        self.done = threading.Event()

    def pending(self):
        """Decrypted bytes a TLS socket holds: they do not make the descriptor readable."""
        return self.sock.pending() if self.tls else 0


class RelayLoop:
    """The relay thread of one process (App.relay): started on the first stream, closed
    with the App. Every stream's failure is that stream's; the loop goes on."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new = collections.deque()   # streams handed over, not registered yet
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._streams = set()
        self._ready = set()               # streams to read without waiting for epoll
        self._thread = None
        self._closed = False
        self.relayed = 0                  # streams taken over (the tests read these)
        self.chunks = 0                   # chunks decoded

    # -- the handler thread's side ------------------------------------------------------
    def relay(self, stream):
        """Relay `stream`'s body; returns once it is over (None, or the exception that
        ended it). The caller then finishes the answer from its own thread."""
        with self._lock:
            if self._closed:
                return ConnectionAbortedError("tokenpak is stopping")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokenpak-relay",
                                                daemon=True)
                self._thread.start()
            self._new.append(stream)
        self._wake()
        stream.done.wait()
        return stream.failure

    def close(self):
        """Stop the thread; streams still running end with an error (a drain that ran out
        of time), so their handler threads finish."""
        with self._lock:
            self._closed = True
            started = self._thread is not None
        self._wake()
        if not started:
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop thread --------------------------------------------------------------------
    def _run(self):
        next_tick = time.monotonic() + TICK
        while True:
            try:
                events = self._selector.select(0 if self._ready else TICK)
            except OSError:
                events = []
            if self._closed:
                self._shutdown()
                return
            try:
                next_tick = self._turn(events, next_tick)
            except Exception:  # a bug outside any one stream: the loop must go on
                log.exception("relay: loop error")

    def _turn(self, events, next_tick):
        """One pass over what epoll reported, the ready streams and, when due, the timers."""
        for key, mask in events:
            stream = key.data
            if stream is None:
                self._drain_wake()
                continue
            try:
                if key.fileobj is stream.sock:
                    self._read(stream)
                else:
                    self._flush(stream)
            except Exception as exc:  # a bug for this stream only: end it
                self._fail(stream, exc)
        for stream in list(self._ready):
            self._ready.discard(stream)
            if stream in self._streams and stream.reading:
                try:
                    self._read(stream)
                except Exception as exc:
                    self._fail(stream, exc)
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + TICK
            self._tick(now)
        return next_tick

    def _drain_wake(self):
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        while True:
            with self._lock:
                if not self._new:
                    return
                stream = self._new.popleft()
            try:
                self._add(stream)
            except Exception as exc:
                self._fail(stream, exc)

    def _add(self, stream):
        self._streams.add(stream)
        self.relayed += 1
        head, stream.head = stream.head, None
        for data in head:
            if not self._received(stream, data):
                return
        self._resume(stream)
        self._ready.add(stream)  # the socket may already hold more than epoll reports

    def _read(self, stream):
        """Read the stream's upstream until it is drained, it pauses, or its turn ends. A
        read shorter than asked drained the socket (epoll is level-triggered: anything
        that arrives meanwhile is reported again), unless TLS holds decrypted bytes."""
        for _ in range(READS_PER_TURN):
            try:
                data = stream.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                break
            except ssl.SSLWantWriteError:  # a TLS renegotiation: rare; try again soon
                self._ready.add(stream)
                break
            except OSError as exc:
                self._finish(stream, exc)
                return
            if not self._received(stream, data):
                return
            if stream.paused:
                break
            if len(data) < RECV_SIZE and not stream.pending():
                break  # drained: no recv just to hear EAGAIN; epoll reports what comes next
        else:
            self._ready.add(stream)  # its turn ended, not its data
        self._flush(stream)

    def _received(self, stream, data):
        """Decode and pass on what one read returned; False once the body is over."""
        if not data:
            if stream.decoder.done or stream.gone.is_set():
                self._finish(stream, None)
            else:
                self._finish(stream, ConnectionResetError(
                    "the provider closed the connection mid-stream"))
            return False
        stream.last_read = time.monotonic()
        try:
            chunks = stream.decoder.feed(data)
        except ChunkedError as exc:
            self._finish(stream, exc)
            return False
        for chunk in chunks:
            self.chunks += 1
            self._deliver(stream, chunk)
        if stream.decoder.done:
            self._finish(stream, None)
            return False
        if len(stream.out) > MAX_BUFFERED and not stream.paused:
            stream.paused = True
            self._stop_reading(stream)
        return True

    def _deliver(self, stream, chunk):
        data = stream.feed(chunk)
        if not data or stream.client_dead:
            return
        if stream.gone.is_set():
            self._client_gone(stream)
            return
        stream.sent += len(data)
        if not stream.out:  # the client's time to take it starts now, not at its last write
            stream.last_write = stream.last_read
        if stream.chunked:
            stream.out += b"%x\r\n" % len(data)
            stream.out += data
            stream.out += b"\r\n"
        else:
            stream.out += data

    def _flush(self, stream):
        """Write what the client's socket takes now; register for EVENT_WRITE for the rest."""
        if stream.out and not stream.client_dead:
            if stream.gone.is_set():
                self._client_gone(stream)
            else:
                try:
                    written = os.write(stream.client_fd, stream.out)
                except (BlockingIOError, InterruptedError):
                    written = 0
                except OSError:
                    self._client_gone(stream)
                    written = 0
                if written:
                    del stream.out[:written]
                    stream.last_write = time.monotonic()
        want = bool(stream.out) and not stream.client_dead
        if want != stream.writing:
            self._register_client(stream, want)
        if not stream.out:
            if stream.ending:
                self._hand_back(stream)
            elif stream.paused:
                self._resume(stream)

    def _client_gone(self, stream):
        """The client's socket failed or the hang-up watcher saw it leave: nothing more is
        written to it. Reading goes on (followers of its flight may still read the answer)
        until the upstream is shut down or ends."""
        if stream.client_dead:
            return
        stream.client_dead = True
        stream.out = bytearray()
        if stream.writing:
            self._register_client(stream, False)
        try:
            stream.lost()
        except Exception:
            log.exception("relay: abort after a client left failed")
        if stream.ending:
            self._hand_back(stream)
        elif stream.paused:
            self._resume(stream)

    def _resume(self, stream):
        stream.paused = False
        stream.last_read = time.monotonic()  # a paused stream was not waiting on the provider
        if not stream.reading and stream in self._streams and not stream.ending:
            self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            stream.reading = True
        if stream.pending():  # decrypted already: epoll will not report it
            self._ready.add(stream)

    def _stop_reading(self, stream):
        if stream.reading:
            stream.reading = False
            try:
                self._selector.unregister(stream.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _register_client(self, stream, want):
        stream.writing = want
        if want:
            self._selector.register(stream.client_fd, selectors.EVENT_WRITE, stream)
        else:
            try:
                self._selector.unregister(stream.client_fd)
            except (KeyError, ValueError, OSError):
                pass

    def _finish(self, stream, failure):
        """The body is over: hand the stream back once its client has what was read."""
        if stream.ending:
            return
        stream.ending = True
        stream.failure = failure
        self._stop_reading(stream)
        self._ready.discard(stream)
        if not stream.out or stream.client_dead or stream.decoder.done:
            # A clean end leaves its last bytes (the final event, as a rule) for the handler
            # thread to write: it then goes straight on to queue the accounting row, as the
            # client may ask for it the moment it has that event.
            self._hand_back(stream)
        else:
            self._flush(stream)

    def _hand_back(self, stream):
        if stream.writing:
            self._register_client(stream, False)
        self._stop_reading(stream)
        self._streams.discard(stream)
        self._ready.discard(stream)
        stream.done.set()

    def _fail(self, stream, exc):
        """An unexpected error in this stream's handling (a bug): it ends, as an upstream
        error, at once; the handler thread writes what its client had not taken yet, then
        tells it the answer is incomplete. The other streams go on."""
        log.error("relay: stream failed", exc_info=exc)
        stream.failure = stream.failure or exc
        stream.ending = True
        try:
            self._hand_back(stream)
        except Exception:
            stream.done.set()

    def _tick(self, now):
        """Timeouts, checked once a second rather than per event."""
        for stream in list(self._streams):
            try:
                if stream.gone.is_set() and not stream.client_dead:
                    self._client_gone(stream)
                elif stream.out and now - stream.last_write > stream.client_timeout:
                    self._client_gone(stream)  # the client took nothing for its timeout
                if not stream.ending and not stream.paused \
                        and now - stream.last_read > stream.read_timeout:
                    self._finish(stream, TimeoutError("no data from the provider for %.0f s"
                                                      % stream.read_timeout))
            except Exception as exc:
                self._fail(stream, exc)

    def _shutdown(self):
        for stream in list(self._streams):
            stream.failure = stream.failure or ConnectionAbortedError("tokenpak is stopping")
            stream.done.set()
        with self._lock:
            for stream in self._new:
                stream.failure = ConnectionAbortedError("tokenpak is stopping")
                stream.done.set()
            self._new.clear()
        self._streams.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

