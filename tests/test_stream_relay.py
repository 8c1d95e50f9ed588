"""The stream relay's write path (the relay loop, relay.py, and proxy.Handler.send_now for
streams it does not take): one write(2) when the client's socket takes the whole event,
the rest buffered or sent when there is room. A client that reads slowly must still
receive every byte of an event larger than its socket buffers, in order."""

import json
import os
import socket

from helpers import wait_for
from tokenpak import proxy as proxymod
from tokenpak import relay as relaymod


class CountingOs:
    """os, with write() counting the writes that did not send all their data."""

    def __init__(self):
        self.partial = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        try:
            sent = os.write(fd, data)
        except BlockingIOError:  # the socket buffer is full: nothing sent
            sent = -1
        if sent < len(data):
            self.partial += 1
        if sent < 0:
            raise BlockingIOError()
        return sent


def read_response(sock):
    """The whole chunked response on `sock`: (head, body with the chunk framing removed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    body = []
    while True:
        while b"\r\n" not in rest:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended before its last chunk"
            rest += chunk
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended inside a chunk"
            rest += chunk
        assert rest[size:size + 2] == b"\r\n"
        if size == 0:
            return head, b"".join(body)
        body.append(rest[:size])
        rest = rest[size + 2:]


def test_an_event_bigger_than_the_socket_buffers_reaches_a_slow_client_whole(
        make_proxy, fake, monkeypatch):
    counting = CountingOs()
    monkeypatch.setattr(proxymod, "os", counting)
    monkeypatch.setattr(relaymod, "os", counting)
    proxy = make_proxy(compression__enabled=False, proxy__max_request_bytes=16 << 20)
    # nine words of 700 kB: nine events, more than the socket buffers (4 MiB) hold unread
    text = " ".join("".join("%07d" % i for i in range(n, n + 100000))
                    for n in range(0, 900000, 100000))
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": text}]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room unread
    sock.settimeout(30)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     b"sk-x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        # Read nothing until the relay found the socket full: what it could not write at
        # once waits for this reader.
        assert wait_for(lambda: counting.partial > 0, timeout=30)
        head, stream = read_response(sock)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    events = [e for e in stream.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    answer = "".join(json.loads(e[len(b"data: "):])["choices"][0]["delta"].get("content") or ""
                     for e in events[:-1] if json.loads(e[len(b"data: "):])["choices"])
    assert answer == "Echo: " + text
