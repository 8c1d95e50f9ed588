"""The relay loop (tokenpak/relay.py): one thread per process moves the bodies of all
chunked streams.

The chunked decoder is checked on its own (every split of a body, any split by hypothesis,
broken framing refused). The loop is checked end to end through a real tokenpak: many
streams at once through the SDK, a client that stops reading (its buffer bounded, the
provider back-pressured, the rest delivered once it reads), a provider that goes silent,
the upstream connection closed after each stream, and a TLS provider whose records arrive
split across reads and are read from the TLS buffer (`pending()`) with no new bytes on the
socket.
"""

import json
import shutil
import socket
import ssl
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import requests.adapters
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import accounting_rows, openai_client, wait_for
from tokenpak import relay as relaymod
from tokenpak.relay import ChunkedDecoder, ChunkedError


# -- the chunked decoder -----------------------------------------------------------------------
def encode(chunks, extensions=(), trailers=b""):
    """A chunked body of `chunks`, the i-th size line carrying extensions[i] if given."""
    out = b""
    for i, chunk in enumerate(chunks):
        ext = extensions[i] if i < len(extensions) else b""
        out += b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk)
    return out + b"0\r\n" + trailers + b"\r\n"


def decode(pieces):
    decoder = ChunkedDecoder()
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out, decoder


BODY_CHUNKS = [b"data: {\"a\":1}\n\n", b"x", b"\r\n0\r\n\r\n", b"data: [DONE]\n\n"]
BODY = encode(BODY_CHUNKS, extensions=(b";name=value", b"", b" ;x")) + b"NEXT"


def test_a_body_split_at_every_byte_boundary_decodes_to_its_chunks():
    for cut in range(len(BODY) + 1):
        chunks, decoder = decode([BODY[:cut], BODY[cut:]])
        assert chunks == BODY_CHUNKS, cut
        assert decoder.done and decoder.extra == b"NEXT"


def test_a_body_fed_byte_by_byte_decodes_to_its_chunks():
    chunks, decoder = decode([BODY[i:i + 1] for i in range(len(BODY))])
    assert chunks == BODY_CHUNKS and decoder.done


def test_trailers_are_consumed_and_a_big_chunk_comes_in_pieces():
    big = bytes(range(256)) * 1024  # 256 KiB: more than one piece
    body = encode([big], trailers=b"X-Checksum: abc\r\nX-Other: 1\r\n")
    chunks, decoder = decode([body[i:i + 1000] for i in range(0, len(body), 1000)])
    assert b"".join(chunks) == big and len(chunks) > 1 and decoder.done


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_any_split_of_a_valid_body_decodes_to_its_chunks(chunks, data):
    body = encode(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=10)))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    out, decoder = decode(pieces)
    assert out == chunks and decoder.done and decoder.extra == b""


BROKEN = [
    b"zz\r\nab\r\n0\r\n\r\n",            # not hex
    b"0x2\r\nab\r\n0\r\n\r\n",           # int() would take it; HTTP does not
    b"+2\r\nab\r\n0\r\n\r\n",
    b"-2\r\nab\r\n0\r\n\r\n",
    b"2 2\r\nab\r\n0\r\n\r\n",
    b"\r\nab\r\n0\r\n\r\n",              # no size at all
    b"2\nab\r\n0\r\n\r\n",               # bare LF
    b"2\r\nabXY0\r\n\r\n",               # data not followed by CRLF
    b"2\r\nab\n0\r\n\r\n",
    b"2\r\nab\r\n0\r\nno colon\r\n\r\n",  # a trailer that is not a field
    b"1" * 5000,                         # a size line that never ends
    b"11111111111111111\r\n",            # 17 hex digits
]


@pytest.mark.parametrize("body", BROKEN)
def test_broken_framing_is_an_error_however_it_is_split(body):
    for cut in range(len(body) + 1):
        with pytest.raises(ChunkedError):
            decode([body[:cut], body[cut:]])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.binary(min_size=2, max_size=2), st.data())
def test_a_chunk_not_followed_by_crlf_is_never_accepted(chunk, ending, data):
    if ending == b"\r\n":
        ending = b"\r\r"
    body = b"%x\r\n%s%s0\r\n\r\n" % (len(chunk), chunk, ending)
    cut = data.draw(st.integers(0, len(body)))
    with pytest.raises(ChunkedError):
        decode([body[:cut], body[cut:]])


# -- a provider whose bytes the tests control ------------------------------------------------
def sse_event(text):
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


FINAL = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
         b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":'
         b'{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
         b"data: [DONE]\n\n")
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


class Conn:
    """One accepted connection, plain or TLS. TLS runs through a MemoryBIO so the test
    decides how the encrypted bytes are cut into TCP sends (a record split across reads)."""

    def __init__(self, sock, context, piece):
        self.sock = sock
        self.piece = piece  # TLS bytes per send (None: as produced)
        self.tls = None
        if context is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush_tls()
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("handshake: peer closed")
                    self.incoming.write(data)
            self._flush_tls()

    def _flush_tls(self):
        data = self.outgoing.read()
        step = self.piece or len(data) or 1
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])

    def recv(self):
        if self.tls is None:
            return self.sock.recv(65536)
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self.incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def send(self, data):
        if self.tls is None:
            self.sock.sendall(data)
            return
        self.tls.write(data)
        self._flush_tls()

    def read_request(self):
        data = b""
        while b"\r\n\r\n" not in data:
            more = self.recv()
            if not more:
                return None
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += self.recv()
        return head


class ScriptedProvider:
    """Answers every request by calling `script(conn)`, then waits for the peer to close
    (the connection stays open: nothing but the body's own framing ends the stream).
    Counts the connections it accepted."""

    def __init__(self, script, context=None, piece=None):
        self.script = script
        self.context = context
        self.piece = piece
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        scheme = "https" if context else "http"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        sock.settimeout(60)
        try:
            conn = Conn(sock, self.context, self.piece)
            while conn.read_request() is not None:
                self.script(conn)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self):
        self.listener.close()


@pytest.fixture
def scripted():
    started = []

    def start(script, **kw):
        server = ScriptedProvider(script, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def proxy_to(make_proxy, server, **overrides):
    return make_proxy(proxy__providers__openai__url=server.url,
                      compression__enabled=False, **overrides)


def ask(proxy, text="hi"):
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}], stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def chunked(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- end to end ---------------------------------------------------------------------------------
def test_many_streams_at_once_are_relayed_by_the_loop(make_proxy, fake):
    proxy = make_proxy(compression__enabled=False)
    count = 200
    words = " ".join("w%d" % i for i in range(8))

    def one(i):
        stream = openai_client(proxy).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "%d %s" % (i, words)}],
            stream=True, extra_headers={"x-fake-delay": "0.02"})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    assert answers == ["Echo: %d %s" % (i, words) for i in range(count)]
    rows = accounting_rows(proxy, count)
    assert len(rows) == count
    assert all(r["complete"] == 1 and r["output_tokens"] == 10 and not r["error"]
               for r in rows)
    loop = proxy.app.relay
    assert loop.relayed == count  # every body went through the loop, not its thread
    assert loop.chunks >= count * 12  # role, 10 words (with "Echo:"), finish, usage, [DONE]


def test_a_client_that_stops_reading_pauses_the_provider_and_gets_everything_later(
        make_proxy, scripted):
    event = sse_event("x" * 60000)  # ~60 kB each: 40 MB in all, more than socket buffers
    total = 700
    progress = {"sent": 0, "blocked": False}

    def script(conn):
        conn.send(HEAD)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.sock.settimeout(0.2)
        for _ in range(total):
            data = chunked(event)
            while data:
                try:
                    sent = conn.sock.send(data)
                except socket.timeout:
                    progress["blocked"] = True  # tokenpak is not reading: TCP pushes back
                    continue
                data = data[sent:]
            progress["sent"] += 1
        conn.sock.settimeout(60)
        conn.send(chunked(FINAL) + b"0\r\n\r\n")

    server = scripted(script)
    proxy = proxy_to(make_proxy, server)
    client = socket.socket()
    client.settimeout(60)
    client.connect(("127.0.0.1", proxy.port))
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   b"sk-x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        loop = proxy.app.relay
        streams = wait_for(lambda: list(loop._streams))
        stream = streams[0]
        assert wait_for(lambda: progress["blocked"] and stream.paused)
        # Paused: tokenpak holds a bounded buffer, the provider's writes block.
        bound = relaymod.MAX_BUFFERED + relaymod.RECV_SIZE + relaymod.MAX_CHUNK_PIECE + 64
        assert len(stream.out) <= bound
        assert progress["sent"] < total
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            data = client.recv(1 << 20)
            assert data, "the stream ended early"
            received += data
    finally:
        client.close()
    assert progress["sent"] == total
    assert received.count(b'"content": "' + b"x" * 60000) == total
    assert b"data: [DONE]" in received
    row = accounting_rows(proxy, 1)[-1]
    assert row["complete"] == 1 and row["output_tokens"] == 2


def test_a_provider_silent_past_read_timeout_ends_the_stream_with_an_error(make_proxy, fake):
    fake.hold_seconds = 5
    proxy = make_proxy(compression__enabled=False, proxy__read_timeout=1)
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a b c"}], stream=True,
        extra_headers={"x-fake": "hold"})
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "incomplete" in str(caught.value)
    row = accounting_rows(proxy, 1)[-1]
    assert row["complete"] == 0 and "TimeoutError" in row["error"]
    assert proxy.app.relay.relayed == 1


def test_the_upstream_connection_is_reused_after_a_relayed_stream(make_proxy, scripted):
    def script(conn):
        conn.send(HEAD + chunked(sse_event("ok")) + chunked(FINAL) + b"0\r\n\r\n")

    server = scripted(script)
    proxy = proxy_to(make_proxy, server, proxy__max_request_bytes=16 << 20)
    # A client that reads each answer to its end (the SDKs may close at [DONE], and then
    # tokenpak stops the upstream, which is never reused), and a request that waits until
    # the previous one is finished (or it finds the connection still in use). The fourth
    # is bigger than the socket buffers: the socket is blocking again, not left
    # non-blocking by the loop (a send would fail half-way).
    session = requests.Session()
    for i, text in enumerate(["a", "b", "c", "x" * (8 << 20), "d"]):
        answer = session.post(proxy.url + "/v1/chat/completions", json={
            "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": "Bearer sk-x"}, timeout=30)
        assert answer.status_code == 200 and b'"content": "ok"' in answer.content
        assert wait_for(lambda: proxy.app.requests_done > i)
    session.close()
    assert server.connections == 1  # one connection, back in the pool after each body
    assert proxy.app.relay.relayed == 5


def test_a_connection_with_bytes_after_the_body_is_not_reused(make_proxy, scripted):
    def script(conn):
        conn.send(HEAD + chunked(sse_event("ok")) + chunked(FINAL) + b"0\r\n\r\nJUNK")

    server = scripted(script)
    proxy = proxy_to(make_proxy, server)
    for i in range(2):
        assert ask(proxy) == "ok"
        assert wait_for(lambda: proxy.app.requests_done > i)
    assert server.connections == 2


# -- TLS -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made now with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return str(cert), context


@pytest.fixture
def trust(certificate, monkeypatch):
    """requests trusts the test's certificate (its CA bundle path), in this process only."""
    monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", certificate[0])
    return certificate[1]


TLS_WORDS = ["w%03d " % i for i in range(300)]


def tls_script(conn):
    # The whole answer in one TLS write (one to a few records), the connection kept open.
    body = b"".join(chunked(sse_event(w)) for w in TLS_WORDS) + chunked(FINAL) + b"0\r\n\r\n"
    conn.send(HEAD + body)


def test_a_tls_provider_streams_through_the_loop_with_records_split_across_reads(
        make_proxy, scripted, trust):
    server = scripted(tls_script, context=trust, piece=700)  # records cut into 700-byte sends
    proxy = proxy_to(make_proxy, server)
    assert ask(proxy) == "".join(TLS_WORDS)
    assert proxy.app.relay.relayed == 1
    assert accounting_rows(proxy, 1)[-1]["complete"] == 1


def test_bytes_already_decrypted_are_read_without_waiting_for_the_socket(
        make_proxy, scripted, trust, monkeypatch):
    # Small reads, and a pause after every read that gave the client something: each time
    # the rest of the record is in the TLS buffer, not on the socket, and the provider
    # sends nothing more. Only SSLSocket.pending() tells the loop to go on reading.
    monkeypatch.setattr(relaymod, "RECV_SIZE", 1000)
    monkeypatch.setattr(relaymod, "MAX_BUFFERED", 0)
    server = scripted(tls_script, context=trust)
    proxy = proxy_to(make_proxy, server, proxy__read_timeout=3)
    assert ask(proxy) == "".join(TLS_WORDS)
    assert accounting_rows(proxy, 1)[-1]["complete"] == 1


def test_a_failure_inside_the_loop_ends_that_stream_only(make_proxy, fake, monkeypatch):
    from tokenpak import sse
    feed = sse.StreamRewriter.feed

    def broken(self, data):
        if b"boom" in data:
            raise RuntimeError("a bug in one stream's handling")
        return feed(self, data)

    monkeypatch.setattr(sse.StreamRewriter, "feed", broken)
    proxy = make_proxy(compression__enabled=False)
    with pytest.raises(openai.APIError):
        ask(proxy, "boom")
    assert [ask(proxy, "fine %d" % i) for i in range(3)] == ["Echo: fine %d" % i
                                                              for i in range(3)]
    rows = accounting_rows(proxy, 4)
    assert "RuntimeError" in rows[0]["error"] and rows[0]["complete"] == 0
    assert all(r["complete"] == 1 for r in rows[1:])
    assert proxy.app.relay.relayed == 4


def test_closing_the_loop_ends_its_streams_so_a_drain_that_ran_out_of_time_finishes(
        make_proxy, fake):
    # App.close after lifecycle's grace period: a stream still in the loop must end (with
    # the error event), not leave its handler thread waiting for ever.
    fake.hold_seconds = 20
    proxy = make_proxy(compression__enabled=False, proxy__read_timeout=30)
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a b c"}], stream=True,
        extra_headers={"x-fake": "hold"})
    chunks = iter(stream)
    next(chunks)  # the stream is in the loop, its provider silent
    assert wait_for(lambda: proxy.app.relay._streams)
    proxy.app.relay.close()
    with pytest.raises(openai.APIError) as caught:
        list(chunks)
    assert "incomplete" in str(caught.value)
    row = accounting_rows(proxy, 1)[-1]
    assert row["complete"] == 0 and "ConnectionAbortedError" in row["error"]


def test_a_client_that_takes_nothing_for_the_client_timeout_is_gone(make_proxy, scripted):
    def script(conn):
        conn.send(HEAD)
        while True:  # more than any buffers hold, until tokenpak lets go of this upstream
            conn.send(chunked(sse_event("x" * 60000)))

    server = scripted(script)
    proxy = proxy_to(make_proxy, server, proxy__client_timeout=1)
    client = socket.socket()
    client.connect(("127.0.0.1", proxy.port))
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                       b"Bearer sk-x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        # Reads nothing: once its socket is full, it takes nothing for a second.
        row = accounting_rows(proxy, 1)[-1]
        assert row["complete"] == 0 and "client disconnected" in row["error"]
        assert proxy.app.relay.relayed == 1 and not proxy.app.relay._streams
    finally:
        client.close()
