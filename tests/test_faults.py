"""Faults: upstream resets and hangs, clients that leave, keep-alive closes, a failing DB."""

import os
import socket
import subprocess
import sys
import threading
import time

import anthropic
import openai
import pytest

from helpers import accounting_rows, anthropic_client, open_stream, openai_client, wait_for


# -- upstream resets mid-stream --------------------------------------------------------------
def test_openai_reset_mid_stream_ends_with_an_error_event(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    stream = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "one two three four"}],
        stream=True, extra_headers={"x-fake": "reset"})
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Echo: one"  # what arrived before the reset, intact
    assert "incomplete" in str(caught.value)
    row = accounting_rows(proxy, 1)[-1]
    assert row["complete"] == 0 and "upstream" in row["error"]
    assert proxy.app.runtime.cache.store.stats()["entries"] == 0


def test_anthropic_reset_mid_stream_ends_with_an_error_event(proxy, fake):
    client = anthropic_client(proxy)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                    messages=[{"role": "user", "content": "a b c d"}],
                                    extra_headers={"x-fake": "reset"}) as stream:
            list(stream.text_stream)
    assert "incomplete" in str(caught.value)


# -- the client leaves mid-stream ---------------------------------------------------------------
def test_client_leaving_a_silent_stream_closes_the_upstream_at_once(make_proxy, fake):
    """The upstream sends nothing after the first event (a model 'thinking'): only the
    hang-up watcher can notice the client left; with read_timeout at 60 s, a close within
    the test's wait proves it did."""
    proxy = make_proxy(proxy__read_timeout=60)
    sock, _ = open_stream(proxy, "hold")
    sock.close()
    assert wait_for(lambda: fake.closed_by_peer == 1)
    assert wait_for(lambda: proxy.app.active == 0)


def test_100_disconnects_leave_no_thread_behind(make_proxy, fake):
    proxy = make_proxy(proxy__read_timeout=60)
    fake.hold_seconds = 20
    before = threading.active_count()
    for _ in range(100):
        open_stream(proxy, "hold")[0].close()
    assert wait_for(lambda: fake.closed_by_peer == 100, timeout=30)
    assert wait_for(lambda: proxy.app.active == 0)
    # Handler threads and the fake's own threads wind down; none may be left streaming.
    assert wait_for(lambda: threading.active_count() <= before + 2, timeout=15), \
        [t.name for t in threading.enumerate()]


# -- upstream keep-alive closes: retry only what is safe ---------------------------------------
class ClosingServer:
    """An upstream that answers, then silently closes the keep-alive connection; or, in
    `swallow` mode, reads a request and closes without answering."""

    def __init__(self, swallow=False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.swallow = swallow
        self.requests = []
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data:
                    continue
                self.requests.append(data.split(b"\r\n", 1)[0])
                if not self.swallow:
                    body = b'{"ok": true}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self):
        self.sock.close()


def test_upstream_closing_keep_alive_connections_is_transparent(make_proxy):
    upstream = ClosingServer()
    proxy = make_proxy(proxy__passthrough_url=upstream.url)
    try:
        for i in range(5):
            conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            conn.sendall(b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                         b"Connection: close\r\n\r\nx")
            assert b'{"ok": true}' in conn.makefile("rb").read()
            conn.close()
            time.sleep(0.02)  # let the upstream's close land before the next reuse
        assert len(upstream.requests) == 5  # one per request: nothing sent twice
    finally:
        upstream.close()


@pytest.mark.parametrize("method,sent", [("POST", 1), ("GET", 2)])
def test_a_request_that_may_have_arrived_is_not_resent(make_proxy, method, sent):
    upstream = ClosingServer(swallow=True)
    proxy = make_proxy(proxy__passthrough_url=upstream.url)
    try:
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        conn.sendall(b"%s /things HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n" % method.encode())
        answer = conn.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 502")
        # A POST may have been billed: never re-sent. A GET is safe to try once more.
        assert len(upstream.requests) == sent
    finally:
        upstream.close()


# -- the database fails while serving ------------------------------------------------------
def ask(proxy, text):
    response = openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}])
    return response.headers["x-tokenpak-cache"], response.parse().choices[0].message.content


def test_db_deleted_while_serving(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    assert ask(proxy, "before") == ("miss", "Echo: before")
    proxy.app.runtime.cache.store.flush()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(proxy.app.db_path + suffix):
            os.unlink(proxy.app.db_path + suffix)
    assert ask(proxy, "after")[1] == "Echo: after"
    # The cache comes back: a new entry is stored and hit again.
    assert wait_for(lambda: ask(proxy, "again")[0] == "hit", timeout=15)
    assert ask(proxy, "again") == ("hit", "Echo: again")


def test_db_locked_by_another_process_while_serving(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    ask(proxy, "warm")
    proxy.app.runtime.cache.store.flush()
    # Another process holds an exclusive lock until the test releases it (a line on stdin).
    locker = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], "
         "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
         "sys.stdin.readline(); c.execute('ROLLBACK')", proxy.app.db_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert locker.stdout.readline() == b"locked\n"
        for i in range(3):
            assert ask(proxy, "while locked %d" % i)[1] == "Echo: while locked %d" % i
    finally:
        locker.communicate(b"\n", timeout=10)
    assert locker.returncode == 0
    assert wait_for(lambda: ask(proxy, "after lock")[0] == "hit", timeout=15)


def test_db_corrupted_while_serving(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    ask(proxy, "first")
    proxy.app.runtime.cache.store.flush()
    proxy.app.recorder.flush()
    with open(proxy.app.db_path, "r+b") as handle:
        handle.write(b"\x00garbage" * 512)
    for i in range(3):
        assert ask(proxy, "corrupt %d" % i)[1] == "Echo: corrupt %d" % i
    assert wait_for(lambda: ask(proxy, "healed")[0] == "hit", timeout=15)
