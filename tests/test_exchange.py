"""exchange.py on its own: one request driven through a fake writer and a stub upstream.

No sockets: the writer records what the Handler would have sent, the upstream returns
canned responses shaped like requests' (a raw body read chunk by chunk), and the cache
is a real CacheStore in a temporary database. What the proxy adds on the wire (framing,
the provider's error shape) is covered by the end-to-end tests; here we check the
request path itself: what goes upstream, what reaches the writer, in which calls.
"""

import json
import types

import pytest

from tokenpak import config as configmod
from tokenpak import exchange, runtime
from tokenpak.cache import CacheStore
from tokenpak.coalesce import Coalescer
from tokenpak.upstream import UpstreamError

KEY = {"Authorization": "Bearer sk-test-exchange", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"


class Writer:
    """The writer interface (see exchange's docstring), recording every call in order."""

    def __init__(self):
        self.calls = []

    def start(self, status, headers):
        self.calls.append(("start", status, dict(headers)))

    def write(self, data):
        if data:
            self.calls.append(("write", data))
        return True

    def end(self):
        self.calls.append(("end",))

    def whole(self, status, headers, body):
        self.calls.append(("whole", status, dict(headers), body))

    def fail(self, status, message):
        self.calls.append(("fail", status, message))

    def watch(self, abort):
        return lambda: None

    def settle(self):
        pass  # accounting is the Handler's

    def chunks(self):
        return [c[1] for c in self.calls if c[0] == "write"]


class Headers(dict):
    """Enough of urllib3's HTTPHeaderDict: case-insensitive get()."""

    def get(self, name, default=None):
        for key, value in self.items():
            if key.lower() == name.lower():
                return value
        return default


class Response:
    """A canned upstream response; a streamed one is read back chunk by chunk."""

    def __init__(self, status, headers, chunks):
        self.status_code, self.reason = status, "OK"
        self.headers = Headers(headers)
        self.raw = types.SimpleNamespace(headers=self.headers, chunked=True,
                                         supports_chunked_reads=lambda: True,
                                         read_chunked=lambda size, decode_content: iter(chunks),
                                         read=lambda decode_content: b"".join(chunks))
        self.closed = False

    def close(self):
        self.closed = True


class Upstream:
    """Returns the queued answers in order and records what it was sent."""

    def __init__(self, *answers):
        self.answers, self.sent = list(answers), []

    def send(self, method, url, headers, body):
        self.sent.append((method, url, headers, json.loads(body) if body else None))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def whole(status, obj, **headers):
    body = json.dumps(obj).encode()
    return Response(status, dict({"Content-Type": "application/json",
                                  "Content-Length": str(len(body))}, **headers), [body])


def chat_answer(text="hi"):
    return {"id": "c1", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


STREAM = [
    b'data: {"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n',
    b'data: {"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":'
    b'[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n',
    b'data: {"id":"s","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n',
    b"data: [DONE]\n\n",
]


@pytest.fixture
def setup(tmp_path):
    """(app state, runtime snapshot) for exchange.run, the cache on, footer off."""
    stores = []

    def build(upstream, **settings):
        values = {"db.path": str(tmp_path / "tokenpak.db"), "cache.enabled": True,
                  "footer.enabled": False, "compression.enabled": False}
        values.update(settings)
        config = configmod.load(values, environ={}, path=str(tmp_path / "none.json"))

        def open_cache(config):
            stores.append(CacheStore(config.get("db.path"), config.get("cache.ttl_seconds"),
                                     config.get("cache.max_mb")))
            return stores[-1], b"secret" * 6

        rows = []
        app = types.SimpleNamespace(
            upstream=upstream, coalescer=Coalescer(), read_timeout=5.0,
            verified_scopes=set(), rows=rows,
            recorder=types.SimpleNamespace(record=rows.append),
            metrics=types.SimpleNamespace(observe=lambda row: None))
        return app, runtime.build(config, open_cache)

    yield build
    for store in stores:
        store.close()


def send(app, rt, body, headers=KEY, path=CHAT):
    """One request through exchange.run, accounted; returns (writer, exchange)."""
    ex = exchange.Exchange("POST", path, list(headers.items()), json.dumps(body).encode())
    ex.route = rt.router.route(ex.path, ex.lower, ex.model_name)
    out = Writer()
    exchange.run(out, app, rt, ex)
    exchange.record(app, rt, ex)
    return out, ex


def ask(text, stream=False):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    return dict(body, stream=True) if stream else body


def test_a_whole_answer_is_written_once_and_accounted(setup):
    upstream = Upstream(whole(200, chat_answer("hello there")))
    app, rt = setup(upstream)
    out, ex = send(app, rt, ask("hello"))
    (method, url, headers, sent), = upstream.sent
    assert (method, sent["messages"][0]["content"]) == ("POST", "hello")
    assert url.endswith(CHAT) and headers["Authorization"] == KEY["Authorization"]
    (call,) = out.calls
    assert call[:2] == ("whole", 200)
    assert call[2]["X-TokenPak-Cache"] == "miss" and "Content-Length" not in call[2]
    assert json.loads(call[3])["choices"][0]["message"]["content"] == "hello there"
    (row,) = app.rows
    assert (row["status"], row["cache"], row["usage"]["input"]) == (200, "miss", 11)


def test_a_stream_is_relayed_chunk_by_chunk(setup):
    upstream = Upstream(Response(200, {"Content-Type": "text/event-stream"}, STREAM))
    app, rt = setup(upstream)
    out, ex = send(app, rt, ask("stream", stream=True))
    assert out.calls[0][:2] == ("start", 200) and out.calls[-1] == ("end",)
    # Each upstream event is its own write, in order; the usage chunk this client did not
    # ask for (tokenpak asked upstream for it) is dropped on the way back.
    assert upstream.sent[0][3]["stream_options"] == {"include_usage": True}
    assert out.chunks() == STREAM[:2] + STREAM[3:]
    assert (ex.usage.input, ex.usage.output, ex.complete) == (9, 2, True)


def test_a_repeat_is_replayed_from_the_cache_without_an_upstream_call(setup):
    upstream = Upstream(Response(200, {"Content-Type": "text/event-stream"}, STREAM))
    app, rt = setup(upstream)
    first, _ = send(app, rt, ask("again", stream=True))
    rt.cache.store.flush()
    again, ex = send(app, rt, ask("again", stream=True))
    assert len(upstream.sent) == 1
    assert ex.cache == "hit" and again.calls[0][2]["X-TokenPak-Cache"] == "hit"
    assert b"".join(again.chunks()) == b"".join(first.chunks())
    assert [row["cache"] for row in app.rows] == ["miss", "hit"]


def test_an_unreachable_provider_fails_through_the_writer(setup):
    upstream = Upstream(UpstreamError(502, "cannot reach https://api.openai.com: "
                                           "connection refused"))
    app, rt = setup(upstream)
    out, ex = send(app, rt, ask("down"))
    assert out.calls == [("fail", 502, "cannot reach https://api.openai.com: "
                                       "connection refused")]
    assert app.rows[0]["error"].startswith("cannot reach")


def test_a_provider_error_is_relayed_in_its_own_shape_and_not_cached(setup):
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    upstream = Upstream(whole(529, error), whole(529, error))
    app, rt = setup(upstream)
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01",
               "Content-Type": "application/json"}
    for _ in range(2):
        out, ex = send(app, rt, body, headers, path="/v1/messages")
        (call,) = out.calls
        assert call[:2] == ("whole", 529) and json.loads(call[3]) == error
        rt.cache.store.flush()
    assert len(upstream.sent) == 2  # an error is never served from the cache
