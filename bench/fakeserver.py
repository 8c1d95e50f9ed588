"""A lean fake OpenAI provider for benchmarks that hold thousands of slow streams at once.

    python bench/fakeserver.py [--port 0]     # prints its URL, serves until killed

tests/fakeprovider.py is a thread per connection with a sleep per event: right for tests
(every scenario, every shape), but at thousands of concurrent streams its own threads and GIL
contend, and a benchmark through it would measure the fake as much as tokenpak. This one is a
single thread on `selectors` (epoll) with a timer heap: a held stream costs one socket and
one heap entry, so it is not the bottleneck.

It speaks just enough of /v1/chat/completions, over keep-alive HTTP/1.1:
- a body without `"stream": true`: one small chat.completion JSON answer, at once;
- with it: a chunked SSE stream of `x-fake-events` content events (default 30), one every
  `x-fake-interval` seconds (default 1.0), then the finish event, a usage event and
  `data: [DONE]`, as OpenAI sends them.
Anything else gets a 404 in OpenAI's error shape. Loopback only.
"""

import argparse
import heapq
import json
import selectors
import socket
import sys
import time

CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
         "model": "gpt-4o-mini", "system_fingerprint": "fp_bench"}
USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-4o-mini", "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}).encode()
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\nx-request-id: req_bench\r\n\r\n")


def sse(choices, usage=None):
    obj = dict(CHUNK, choices=choices)
    if usage is not None:
        obj["usage"] = usage
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


def content(i):
    return sse([{"index": 0, "delta": {"content": "word%d " % i}, "logprobs": None,
                 "finish_reason": None}])


FIRST = sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None}])
LAST = (sse([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
        + sse([], USAGE) + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


def response(status, body, content_type="application/json"):
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, b"OK" if status == 200 else b"Not Found", content_type.encode(),
               len(body)) + body)


class Conn:
    """One client connection: bytes read so far, bytes waiting to be written, and the
    stream it is in (events left, seconds between them), if any."""

    def __init__(self, sock):
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.left = 0
        self.interval = 0.0
        self.sent = 0


class FakeServer:
    def __init__(self, port=0, backlog=4096):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.timers = []  # (due, sequence, Conn): the next event of each stream
        self.sequence = 0

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.listener.getsockname()[1]

    def serve_forever(self):
        while True:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else 1.0
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self.accept()
                elif mask & selectors.EVENT_READ:
                    self.read(key.data)
                elif mask & selectors.EVENT_WRITE:
                    self.flush(key.data)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, conn = heapq.heappop(self.timers)
                self.tick(conn, now)

    def accept(self):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(sock, selectors.EVENT_READ, Conn(sock))

    def close(self, conn):
        if conn.sock is None:
            return
        self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = None

    def read(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self.close(conn)
        conn.inbuf += data
        self.parse(conn)

    def parse(self, conn):
        """Answer every complete request in the buffer, unless a stream is still going (a
        pipelined request waits for it to end)."""
        while conn.left == 0 and conn.sock is not None:
            head_end = conn.inbuf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = conn.inbuf[:head_end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if len(conn.inbuf) < head_end + 4 + length:
                return
            body = conn.inbuf[head_end + 4:head_end + 4 + length]
            conn.inbuf = conn.inbuf[head_end + 4 + length:]
            self.answer(conn, head[0].split(" "), headers, body)

    def answer(self, conn, request_line, headers, body):
        path = request_line[1] if len(request_line) > 1 else ""
        if path.split("?")[0] != "/v1/chat/completions":
            error = {"error": {"message": "not found", "type": "invalid_request_error",
                               "param": None, "code": None}}
            return self.send(conn, response(404, json.dumps(error).encode()))
        try:
            stream = bool(json.loads(body).get("stream"))
        except (ValueError, AttributeError):
            stream = False
        if not stream:
            return self.send(conn, response(200, ANSWER))
        conn.left = int(headers.get("x-fake-events") or 30)
        conn.interval = float(headers.get("x-fake-interval") or 1.0)
        conn.sent = 0
        self.send(conn, STREAM_HEAD + FIRST)
        self.schedule(conn, time.monotonic() + conn.interval)

    def schedule(self, conn, due):
        self.sequence += 1
        heapq.heappush(self.timers, (due, self.sequence, conn))

    def tick(self, conn, now):
        if conn.sock is None:
            return
        conn.sent += 1
        conn.left -= 1
        self.send(conn, content(conn.sent) + (LAST if conn.left <= 0 else b""))
        if conn.left > 0:
            self.schedule(conn, now + conn.interval)
        elif conn.inbuf:  # a pipelined request waited for the stream to end
            self.parse(conn)

    def send(self, conn, data):
        conn.outbuf += data
        self.flush(conn)

    def flush(self, conn):
        if conn.sock is None:
            return
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.close(conn)
        conn.outbuf = conn.outbuf[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self.selector.modify(conn.sock, events, conn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeServer(args.port)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
