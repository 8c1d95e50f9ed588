"""What the test files share by name: the credentials they send, SDK clients pointed at a
tokenpak, raw HTTP, polling, and a tokenpak started in this process or as a process.

conftest.py holds the fixtures and nothing a test imports; a test module imports from here,
never from conftest or from another test module (pytest may load conftest under another
module name, and a test file imported by a second one runs its tests' imports twice).
"""

import http.client
import json
import os
import socket
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import anthropic
import openai

from tokenpak import proxy as proxymod

REPO = Path(__file__).resolve().parents[1]
WAIT = 10.0  # the bound of every wait: a hang guard, reached only when something is broken

# The API keys tests use. test_zz_credentials greps every artefact for all of them.
OPENAI_KEY = "sk-test-openai-0123456789abcdefSECRET"
ANTHROPIC_KEY = "sk-ant-api03-test-anthropic-SECRET-0123456789"
GOOGLE_KEY = "AIzaTestGoogleKeySECRET0123456789"
ALL_KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GOOGLE_KEY)
# Every other credential a test sends; test_zz_credentials greps the artefacts for these too.
OTHER_SECRETS = ("sk-test-another-key-0000", "sk-test-second", "sk-ant-oat01-test-oauth-token",
                 "local-secret-token", "sk-bad-unverified", "sk-bad-key", "sk-ant-bad-key")


# -- clients -----------------------------------------------------------------------------------
def _base(target):
    """A running tokenpak (anything with `.url`) or a base URL string."""
    return getattr(target, "url", target)


def openai_client(target, key=OPENAI_KEY, **kw):
    """The official OpenAI SDK pointed at tokenpak; no retries, so a test sees each answer."""
    return openai.OpenAI(api_key=key, base_url=_base(target) + "/v1", max_retries=0, **kw)


def anthropic_client(target, key=ANTHROPIC_KEY, **kw):
    """The official Anthropic SDK pointed at tokenpak; no retries."""
    return anthropic.Anthropic(api_key=key, base_url=_base(target), max_retries=0, **kw)


def raw_request(proxy, method, path, body=b"", headers=None):
    """One request over http.client: (response, body) with nothing an SDK would add."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=WAIT)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def send_raw(proxy, data, read=True, timeout=5):
    """Write raw bytes on a socket and return whatever the server answers."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def open_stream(proxy, scenario, text="w " * 30, headers=None):
    """Start a streamed OpenAI chat request on a raw socket (so a test can hang up at a
    moment of its choosing) and read until the first event arrives. Returns (socket, the
    bytes received so far: the response head and at least the start of one event)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": text}]}).encode()
    extra = "".join("%s: %s\r\n" % pair for pair in (headers or {}).items()).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 b"sk-x\r\nx-fake: %s\r\n%sContent-Length: %d\r\n\r\n%s"
                 % (scenario.encode(), extra, len(body), body))
    data = b""
    while b"data: " not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return sock, data


def stream_until_final_event(proxy, messages, key=ANTHROPIC_KEY):
    """A streamed Anthropic request on a raw socket that hangs up as soon as message_stop
    arrives, before the chunked body's end, as Codex and the SDKs do; the fake's `linger`
    scenario holds its stream open meanwhile. Returns the bytes received."""
    body = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 50, "stream": True,
                       "messages": messages}).encode()
    head = ("POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "x-api-key: %s\r\nanthropic-version: 2023-06-01\r\nx-fake: linger\r\n"
            "Content-Length: %d\r\n\r\n" % (key, len(body))).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head + body)
        received = b""
        while b"message_stop" not in received:
            data = sock.recv(65536)
            assert data, "stream ended before message_stop"
            received += data
    return received


def assert_healthy(proxy):
    status, _, body = proxy.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


# -- waiting -----------------------------------------------------------------------------------
def wait_for(condition, timeout=WAIT, interval=0.01):
    """Poll until `condition()` is true; returns its last value. The deadline only guards
    against a hang: tests assert on the outcome, never on how long it took."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return condition()


def accounting_rows(proxy, count=None):
    """The accounting rows of an in-process tokenpak, as dicts in the order their requests
    began (db_rows says why), once `count` requests are done (without `count`: once no
    handler is busy). An answer with the provider's usage queues its row before its client
    has it (Handler.settle); other rows come just after."""
    if count is None:
        assert wait_for(lambda: not proxy.app.active)
    else:
        assert wait_for(lambda: proxy.app.requests_done >= count)
    return db_rows(proxy)


def db_rows(proxy):
    """The accounting rows the writer has flushed so far (none when there is no DB yet), in
    the order their requests began: a row's id is the order the handler threads queued
    them, which for rows queued after the answer (see Handler.settle) can be after the
    client's next request. A row's `ts` and `latency_ms` are
    taken together at its end, so their difference is its start."""
    proxy.app.recorder.flush()
    if not os.path.exists(proxy.app.db_path):
        return []
    conn = sqlite3.connect(proxy.app.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "select * from requests order by ts - coalesce(latency_ms, 0) / 1000.0, id")]
    finally:
        conn.close()


def unmarked(value):
    """`value` without any cache_control field: where Claude Code's marker sits is not
    content, so prefix checks compare bodies with the markers removed."""
    if isinstance(value, dict):
        return {k: unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [unmarked(v) for v in value]
    return value


def run_cli(capsys, *argv):
    """`tokenpak ARGV` in this process: (exit status, stdout, stderr), as a user sees them."""
    from tokenpak import cli
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def config_file():
    """The config file every test's isolated environment points TOKENPAK_CONFIG at."""
    return os.environ["TOKENPAK_CONFIG"]


# -- tokenpak in this process ------------------------------------------------------------------
class RunningProxy:
    """A tokenpak server running in this process on a free port."""

    def __init__(self, config):
        self.server = proxymod.create_server(config)
        self.app = self.server.app
        self.config = config
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def get(self, path, headers=None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


def proxy_settings(fake_url, tmp_path, **overrides):
    """Config overrides for a tokenpak pointed at the fake provider. Cache and footer are
    off unless a test turns them on, so forwarding tests see the provider's exact bytes.
    `a__b=v` sets key `a.b`."""
    settings = {
        "proxy.host": "127.0.0.1", "proxy.port": 0,
        "proxy.providers.openai.url": fake_url,
        "proxy.providers.anthropic.url": fake_url,
        "proxy.providers.google.url": fake_url + "/v1beta/openai",
        "proxy.read_timeout": 5, "proxy.connect_timeout": 2,
        "cache.enabled": False, "footer.enabled": False,
        "db.path": str(Path(tmp_path) / "state" / "tokenpak.db"),
    }
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return settings


# -- tokenpak as a process ---------------------------------------------------------------------
# `python -c ACTIVATE FD ARGS...`: run `tokenpak ARGS` with the listening socket FD handed
# over as systemd's socket activation does.
ACTIVATE = r"""
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # as systemd does: the socket as fd 3, LISTEN_PID = the pid that execs
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "tokenpak"] + sys.argv[2:])
"""

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url, timeout=WAIT, process=None):
    """/health's JSON once tokenpak at `url` answers; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError("tokenpak exited with %s" % process.returncode)
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError("tokenpak did not become healthy at %s" % url)


def tokenpak_env(fake_url, home, **extra):
    """Environment for a tokenpak subprocess pointed at the fake provider."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPAK_")}
    env.update({
        "HOME": str(home), "PYTHONPATH": str(REPO),
        "TOKENPAK_CONFIG": str(Path(home) / ".tokenpak" / "config.json"),
        "TOKENPAK_DB": str(Path(home) / ".tokenpak" / "tokenpak.db"),
        "TOKENPAK_OPENAI_URL": fake_url, "TOKENPAK_ANTHROPIC_URL": fake_url,
        "TOKENPAK_GOOGLE_URL": fake_url + "/v1beta/openai",
    })
    env.update(extra)
    return env
