"""Tests for tokenpak.sse: framing, usage watching, stream rewriting and SDK compatibility.

The streams are built here in the providers' real wire format (compact JSON, key order as
the APIs send it). SDK compatibility is proven without a network: the rewriter's output is
served by an httpx2 MockTransport to real `openai` and `anthropic` clients.
"""

import json

import anthropic
try:  # the SDKs' own HTTP library: httpx2 under openai>=3 / anthropic>=2 (Python >= 3.11)
    import httpx2
except ImportError:  # older Pythons get SDK versions built on httpx, the same API
    import httpx as httpx2
import openai
import pytest

from tokenpak import sse
from tokenpak.footer import format_line

LINE = format_line(12345, 8100, "miss", 0.0123)


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# -- realistic streams -----------------------------------------------------------------

def openai_stream(pieces=("Hello", ", wor", "ld!"), include_usage=False, finish="stop",
                  tool_call=False, eol="\n", usage=None):
    """An OpenAI chat.completions stream as api.openai.com sends it."""
    head = {"id": "chatcmpl-BvX9", "object": "chat.completion.chunk", "created": 1753000000,
            "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
            "system_fingerprint": "fp_34a54ae93c"}
    usage = usage or {"prompt_tokens": 5200, "completion_tokens": 7, "total_tokens": 5207,
                      "prompt_tokens_details": {"cached_tokens": 4096, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}

    def chunk(choices, n, use=None):
        obj = dict(head, choices=choices)
        if include_usage:
            obj["usage"] = use
        obj["obfuscation"] = "pad%d" % n
        return "data: " + _dumps(obj) + eol + eol

    deltas = [{"role": "assistant", "content": "", "refusal": None}]
    if tool_call:
        deltas.append({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": ""}}]})
        args = {"arguments": "{\"city\":\"Oslo\"}"}
        deltas.append({"tool_calls": [{"index": 0, "function": args}]})
    else:
        deltas += [{"content": p} for p in pieces]
    out = [chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}], i)
           for i, d in enumerate(deltas)]
    out.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}], 90))
    if include_usage:
        out.append(chunk([], 91, usage))
    out.append("data: [DONE]" + eol + eol)
    return "".join(out).encode("utf-8")


def _anthropic_event(name, obj, eol="\n"):
    return "event: %s%sdata: %s%s%s" % (name, eol, _dumps(obj), eol, eol)


def anthropic_stream(blocks=(("text", ("Hello", ", world!")),), stop="end_turn", eol="\n",
                     error_after=None):
    """An Anthropic messages stream as api.anthropic.com sends it.

    blocks: (type, pieces) with type text, thinking or tool_use.
    """
    ev = lambda name, obj: _anthropic_event(name, obj, eol)  # noqa: E731
    out = [ev("message_start", {"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-opus-4-6", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 472, "cache_creation_input_tokens": 1200,
                                         "cache_read_input_tokens": 3000, "output_tokens": 2}}})]
    out.append("event: ping" + eol + 'data: {"type": "ping"}' + eol + eol)
    for i, (kind, pieces) in enumerate(blocks):
        if kind == "text":
            start, dtype, key = {"type": "text", "text": ""}, "text_delta", "text"
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            dtype, key = "thinking_delta", "thinking"
        else:
            start = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
            dtype, key = "input_json_delta", "partial_json"
        out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": start}))
        for p in pieces:
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": dtype, key: p}}))
        if kind == "thinking":
            sig = {"type": "signature_delta", "signature": "EqQBCkgI"}
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": sig}))
        if error_after == i:
            out.append(ev("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                "message": "Overloaded"}}))
            return "".join(out).encode("utf-8")
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(ev("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 15}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return "".join(out).encode("utf-8")


def rewrite(rewriter, stream, size=7):
    """Feed `stream` in `size`-byte pieces; return the pieces the client would receive."""
    out = [rewriter.feed(stream[i:i + size]) for i in range(0, len(stream), size)]
    out.append(rewriter.close())
    return [o for o in out if o]


# -- real SDKs over a mock transport ----------------------------------------------------

def _http(chunks, status=200):
    def handler(request):
        return httpx2.Response(status, headers={"content-type": "text/event-stream"},
                               content=iter(chunks))
    return httpx2.Client(transport=httpx2.MockTransport(handler))


def openai_client(chunks):
    return openai.OpenAI(api_key="sk-test", base_url="http://tokenpak.test/v1",
                         http_client=_http(chunks), max_retries=0)


def anthropic_client(chunks):
    return anthropic.Anthropic(api_key="sk-ant-test", base_url="http://tokenpak.test",
                               http_client=_http(chunks), max_retries=0)


def openai_sdk_chunks(chunks, **kw):
    client = openai_client(chunks)
    return list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **kw))


def anthropic_sdk_final(chunks):
    client = anthropic_client(chunks)
    with client.messages.stream(model="claude-opus-4-6", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        return stream.get_final_message()


# -- EventParser ------------------------------------------------------------------------

MIXED = (b": keep-alive comment\n\n"
         b"event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n"
         b"data: line one\ndata: line two\nid: 7\nretry: 100\n\n"
         b"event: custom\ndata:no-space\n\n"
         b"\n"  # a stray blank line
         + "data: {\"t\":\"héllo ✓\"}\r\n\r\n".encode("utf-8")
         + b"data: [DONE]\n\n")

MIXED_EXPECTED = [(None, None), ("ping", '{"type": "ping"}'), (None, "line one\nline two"),
                  ("custom", "no-space"), (None, None), (None, '{"t":"héllo ✓"}'),
                  (None, "[DONE]")]


def _fields(events):
    return [(e.event, e.data) for e in events]


def test_parser_whole_stream():
    parser = sse.EventParser()
    events = parser.feed(MIXED)
    assert _fields(events) == MIXED_EXPECTED
    assert b"".join(e.raw for e in events) == MIXED
    assert parser.tail() == b""


STREAMS = {
    "mixed": lambda: MIXED,
    "openai": lambda: openai_stream(include_usage=True),
    "openai_crlf": lambda: openai_stream(include_usage=True, eol="\r\n"),
    "anthropic": lambda: anthropic_stream(),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_parser_every_split_offset(name):
    """Two pieces split at every byte offset, and one byte at a time, give the same events."""
    stream = STREAMS[name]()
    whole = sse.EventParser().feed(stream)
    assert len(whole) > 6
    for cut in range(len(stream) + 1):
        parser = sse.EventParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert _fields(events) == _fields(whole), cut
        assert b"".join(e.raw for e in events) == stream
    parser = sse.EventParser()
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i:i + 1])]
    assert [e.raw for e in events] == [e.raw for e in whole]


def test_parser_crlf_split_between_cr_and_lf():
    parser = sse.EventParser()
    assert parser.feed(b"data: a\r\n\r") == []  # the last CR may start a CRLF
    events = parser.feed(b"\ndata: b\r\n\r\n")
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    assert _fields(events) == [(None, "a"), (None, "b")]


def test_parser_bare_cr_line_ends():
    parser = sse.EventParser()
    events = parser.feed(b"event: x\rdata: 1\r\rdata: 2\r\rdata: 3")
    assert _fields(events) == [("x", "1"), (None, "2")]
    assert parser.tail() == b"data: 3"


def test_parser_tail_and_split_events_roundtrip():
    parser = sse.EventParser()
    assert parser.feed(b'data: {"a":1}\n\ndata: {"b"') and parser.tail() == b'data: {"b"'
    stream = anthropic_stream(blocks=(("thinking", ("Hm",)), ("text", ("Hi",))))
    pieces = sse.split_events(stream)
    assert b"".join(pieces) == stream
    assert len(pieces) == stream.count(b"\n\n")
    assert sse.split_events(b"data: 1\n\ndata: 2") == [b"data: 1\n\n", b"data: 2"]


# -- UsageWatcher and usage_from_response ------------------------------------------------

def _watch(api, stream):
    watcher = sse.UsageWatcher(api)
    for e in sse.EventParser().feed(stream):
        watcher.observe(e)
    return watcher


def test_watcher_openai_usage_model_and_end():
    w = _watch("openai", openai_stream(include_usage=True))
    assert w.usage == sse.Usage(input=5200 - 4096, output=7, cache_read=4096, cache_write=0)
    assert w.usage.prompt_total == 5200
    assert (w.model, w.stop_reason, w.complete, w.errored) == (
        "gpt-4o-mini-2024-07-18", "stop", True, False)


def test_watcher_openai_incomplete_and_error():
    stream = openai_stream(include_usage=True)
    w = _watch("openai", stream[:stream.index(b"data: [DONE]")])
    assert not w.complete and w.usage.output == 7
    w = _watch("openai", b'data: {"error":{"message":"The server had an error",'
                         b'"type":"server_error"}}\n\n')
    assert w.errored and w.error_message == "The server had an error" and not w.complete


def test_watcher_openai_decodes_only_interesting_chunks(monkeypatch):
    calls = []
    real = sse._loads
    monkeypatch.setattr(sse, "_loads", lambda text: calls.append(text) or real(text))
    w = _watch("openai", openai_stream(pieces=["tok"] * 200, include_usage=True))
    assert len(calls) == 3  # first chunk (model), the finish chunk, the usage chunk
    assert w.usage.output == 7


def test_watcher_anthropic_usage_is_cumulative():
    stream = anthropic_stream(blocks=(("thinking", ("Let me see",)), ("text", ("Hi",))))
    stream = stream.replace(b'"usage":{"output_tokens":15}',
                            b'"usage":{"input_tokens":480,"cache_read_input_tokens":3000,'
                            b'"cache_creation_input_tokens":null,"output_tokens":15}')
    w = _watch("anthropic", stream)
    assert w.usage == sse.Usage(input=480, output=15, cache_read=3000, cache_write=1200)
    assert (w.model, w.stop_reason, w.complete) == ("claude-opus-4-6", "end_turn", True)


def test_watcher_anthropic_error():
    w = _watch("anthropic", anthropic_stream(error_after=0))
    assert w.errored and w.error_message == "Overloaded" and not w.complete
    assert w.usage.input == 472 and w.stop_reason is None


def test_watcher_rejects_unknown_api():
    with pytest.raises(ValueError):
        sse.UsageWatcher("gemini")


def test_usage_from_response():
    oa = {"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                    "prompt_tokens_details": {"cached_tokens": 64}}}
    assert sse.usage_from_response("openai", oa) == sse.Usage(36, 20, 64, 0)
    assert sse.usage_from_response("openai", {"usage": {"prompt_tokens": 9,
                                                        "completion_tokens": 1}}) == sse.Usage(9, 1)
    an = {"usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 7,
                    "cache_creation_input_tokens": 3}}
    assert sse.usage_from_response("anthropic", an) == sse.Usage(10, 5, 7, 3)
    assert sse.usage_from_response("anthropic", {"type": "message"}) == sse.Usage()
    assert sse.usage_from_response("openai", {"usage": None}) == sse.Usage()


# -- StreamRewriter: fast path, drop_usage ------------------------------------------------

def test_fast_path_returns_the_same_object():
    rw = sse.StreamRewriter("openai")
    events = sse.split_events(openai_stream(include_usage=True))
    for raw in events:
        assert rw.feed(raw) is raw
    assert rw.close() == b""
    assert rw.watcher.complete and rw.watcher.usage.output == 7


def test_fast_path_holds_only_a_torn_event():
    stream = anthropic_stream()
    rw = sse.StreamRewriter("anthropic")
    cut = stream.index(b"Hello") + 2
    first = rw.feed(stream[:cut])
    assert stream[:cut].startswith(first) and first.endswith(b"\n\n") and b"Hello" not in first
    assert first + rw.feed(stream[cut:]) + rw.close() == stream
    assert rw.watcher.complete


def test_drop_usage_is_byte_exact():
    with_usage = openai_stream(include_usage=True)
    without = openai_stream(include_usage=False)
    assert b'"usage":null' in with_usage and b'"usage"' not in without
    for size in (1, 13, len(with_usage)):
        rw = sse.StreamRewriter("openai", drop_usage=True)
        assert b"".join(rewrite(rw, with_usage, size)) == without
        assert rw.watcher.usage.cache_read == 4096 and rw.watcher.complete


def test_drop_usage_other_serialisations():
    rw = sse.StreamRewriter("openai", drop_usage=True)
    spaced = b'data: {"id": "x", "choices": [], "usage": null}\n\n'
    first = b'data: {"usage":null,"id":"x","choices":[]}\n\n'
    nested = b'data: {"id":"x","choices":[],"usage":null,"x":{"usage":null}}\n\n'
    assert rw.feed(spaced) == b'data: {"id": "x", "choices": []}\n\n'
    assert rw.feed(first) == b'data: {"id":"x","choices":[]}\n\n'
    assert rw.feed(nested) == nested  # unsure which is top level: untouched
    assert rw.feed(b": ping\n\n") == b": ping\n\n"


def test_drop_usage_keeps_usage_on_a_chunk_with_choices():
    chunk = (b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n')
    rw = sse.StreamRewriter("openai", drop_usage=True)
    assert rw.feed(chunk) == chunk
    assert rw.watcher.usage == sse.Usage(3, 1)


# -- StreamRewriter: footer ----------------------------------------------------------------

def _footer(seen):
    def make(usage):
        seen.append(sse.Usage(**vars(usage)))
        return LINE
    return make


def test_openai_footer_placed_before_finish_chunk_with_final_usage():
    seen = []
    stream = openai_stream(include_usage=True)
    rw = sse.StreamRewriter("openai", footer=_footer(seen))
    out = b"".join(rewrite(rw, stream))
    events = sse.split_events(out)
    assert len(events) == len(sse.split_events(stream)) + 1
    footer = json.loads(events[-4][len(b"data: "):])
    assert footer["choices"] == [{"index": 0, "delta": {"content": "\n\n" + LINE},
                                  "logprobs": None, "finish_reason": None}]
    assert (footer["id"], footer["created"], footer["model"], footer["usage"]) == (
        "chatcmpl-BvX9", 1753000000, "gpt-4o-mini-2024-07-18", None)
    assert b'"finish_reason":"stop"' in events[-3] and events[-1] == b"data: [DONE]\n\n"
    assert seen == [sse.Usage(1104, 7, 4096, 0)]  # called once, with the final usage
    assert out.replace(events[-4], b"") == stream  # everything else unchanged


def test_openai_footer_without_usage_chunk_waits_for_done():
    stream = openai_stream(include_usage=False, eol="\r\n")
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    events = sse.split_events(b"".join(rewrite(rw, stream)))
    assert json.loads(events[-3][6:])["choices"][0]["delta"]["content"] == "\n\n" + LINE
    assert events[-3].endswith(b"}\r\n\r\n") and b'"usage"' not in events[-3]


@pytest.mark.parametrize("case", ["tool_call", "no_line", "error", "raises", "cut"])
def test_openai_no_footer_leaves_stream_unchanged(case):
    stream = openai_stream(include_usage=True, tool_call=case == "tool_call",
                           finish="tool_calls" if case == "tool_call" else "stop")
    footer = lambda u: LINE  # noqa: E731
    if case == "no_line":
        footer = lambda u: None  # noqa: E731
    if case == "raises":
        footer = lambda u: 1 / 0  # noqa: E731
    if case == "error":  # an error event right after the finish chunk
        events = sse.split_events(stream)
        stream = b"".join(events[:-2]) + sse.error_event("openai", "boom")
    if case == "cut":
        stream = stream[:stream.index(b'"choices":[]') - 100]
    rw = sse.StreamRewriter("openai", footer=footer)
    assert b"".join(rewrite(rw, stream)) == stream


def test_openai_no_footer_for_forced_function_or_several_choices():
    # A named tool_choice ends with finish_reason "stop", not "tool_calls".
    forced = openai_stream(include_usage=True, tool_call=True, finish="stop")
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, forced)) == forced
    # n=2: choice 1 still streams after choice 0 finished; nothing may be held for it.
    events = sse.split_events(openai_stream(include_usage=True))
    second = events[1].replace(b'"index":0', b'"index":1')
    stream = b"".join(events[:1] + [second] + events[1:])
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, stream)) == stream


def test_openai_footer_and_drop_usage_together():
    rw = sse.StreamRewriter("openai", drop_usage=True, footer=lambda u: LINE)
    out = b"".join(rewrite(rw, openai_stream(include_usage=True)))
    expected = openai_stream(include_usage=False)
    events = sse.split_events(out)
    assert b'"usage"' not in out and out.replace(events[-3], b"") == expected
    assert rw.watcher.usage.output == 7


def test_openai_only_closing_events_are_held():
    """Every content delta reaches the client as soon as its event is complete."""
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    sent = b""
    for raw in sse.split_events(openai_stream(pieces=["a", "b", "c"], include_usage=True)):
        sent += rw.feed(raw)
        if b'"content":"' in raw:
            assert sent.endswith(raw)
    assert b'"content":"c"' in sent


def test_anthropic_footer_on_last_text_block():
    seen = []
    blocks = (("text", ("First",)), ("tool_use", ('{"city":', '"Oslo"}')), ("text", ("Done.",)))
    stream = anthropic_stream(blocks=blocks)
    rw = sse.StreamRewriter("anthropic", footer=_footer(seen))
    out = b"".join(rewrite(rw, stream, size=5))
    events = sse.EventParser().feed(out)
    names = [e.event for e in events]
    assert names[-5:] == ["content_block_delta", "content_block_delta", "content_block_stop",
                          "message_delta", "message_stop"]
    footer = json.loads(events[-4].data)
    assert footer == {"type": "content_block_delta", "index": 2,
                      "delta": {"type": "text_delta", "text": "\n\n" + LINE}}
    assert out.replace(events[-4].raw, b"") == stream
    assert seen == [sse.Usage(472, 15, 3000, 1200)]


@pytest.mark.parametrize("blocks,stop", [
    ((("text", ("I'll check.",)), ("tool_use", ('{"city":"Oslo"}',))), "tool_use"),
    ((("text", ("Hi",)),), "tool_use"),
    ((("text", ("Hi",)), ("thinking", ("hmm",))), "end_turn"),
    ((("text", ("Searching",)),), "pause_turn"),
])
def test_anthropic_no_footer_leaves_stream_unchanged(blocks, stop):
    stream = anthropic_stream(blocks=blocks, stop=stop)
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, stream, size=3)) == stream


def test_anthropic_ping_between_last_stop_and_message_delta():
    stream = anthropic_stream()
    ping = b'event: ping\ndata: {"type": "ping"}\n\n'
    at = stream.index(b"event: message_delta")
    stream = stream[:at] + ping + stream[at:]
    out = b"".join(rewrite(sse.StreamRewriter("anthropic", footer=lambda u: LINE), stream))
    names = [e.event for e in sse.EventParser().feed(out)]
    assert names[-5:] == ["content_block_delta", "content_block_stop", "ping", "message_delta",
                          "message_stop"]
    assert LINE.encode() in out


def test_anthropic_error_mid_stream_no_footer():
    stream = anthropic_stream(error_after=0)
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, stream)) == stream and rw.watcher.errored


def test_anthropic_holds_nothing_but_the_stop_and_pings():
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    stream = anthropic_stream(blocks=(("text", ("a", "b")), ("text", ("c",))))
    sent = b""
    for e in sse.EventParser().feed(stream):
        sent += rw.feed(e.raw)
        if e.event in ("content_block_delta", "content_block_start", "message_start"):
            assert sent.endswith(e.raw)
    assert sent.count(b"event: content_block_stop") == 2


def test_anthropic_footer_crlf():
    stream = anthropic_stream(eol="\r\n")
    out = b"".join(rewrite(sse.StreamRewriter("anthropic", footer=lambda u: LINE), stream))
    assert out.count(b"\r\n\r\n") == stream.count(b"\r\n\r\n") + 1
    assert b"\n" not in out.replace(b"\r\n", b"")  # every line end is CRLF, footer's too
    footer = [e for e in sse.EventParser().feed(out) if LINE in (e.data or "")]
    assert len(footer) == 1 and footer[0].raw.startswith(b"event: content_block_delta\r\ndata: ")


def test_close_flushes_held_events_and_abort_ends_cleanly():
    stream = anthropic_stream()
    cut = stream.index(b"event: message_delta")
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    sent = rw.feed(stream[:cut])
    assert sent == stream[:stream.index(b"event: content_block_stop")]
    assert sent + rw.close() == stream[:cut]  # the held stop goes out unchanged, no footer

    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    sent = rw.feed(stream[:cut + 20])  # torn inside message_delta
    assert sent == stream[:stream.index(b"event: content_block_stop")]
    end = rw.abort("upstream connection reset")
    assert end == (stream[stream.index(b"event: content_block_stop"):cut]
                   + sse.error_event("anthropic", "upstream connection reset"))
    assert rw.watcher.errored and not rw.watcher.complete


def test_close_observes_an_unterminated_last_event():
    rw = sse.StreamRewriter("openai")
    stream = openai_stream(include_usage=True)[:-1]  # "data: [DONE]\n" only
    assert b"".join(rewrite(rw, stream)) == stream
    assert rw.watcher.complete


def test_non_sse_body_goes_blind(monkeypatch):
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 100)
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    blob = b"x" * 150
    assert rw.feed(b"data: 1\n\n" + blob) == b"data: 1\n\n" + blob
    assert rw.feed(b"\n\n") == b"\n\n" and rw.close() == b""


# -- the real SDKs parse what we emit -------------------------------------------------------

def test_openai_sdk_reads_footer_and_usage():
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    chunks = openai_sdk_chunks(rewrite(rw, openai_stream(include_usage=True), size=11),
                               stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!\n\n" + LINE
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4096
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_sdk_accumulates_footer_and_drop_usage():
    rw = sse.StreamRewriter("openai", drop_usage=True, footer=lambda u: LINE)
    client = openai_client(rewrite(rw, openai_stream(include_usage=True), size=64))
    with client.chat.completions.stream(model="gpt-4o-mini",
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
        chunks = [ev.chunk for ev in stream if ev.type == "chunk"]
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello, world!\n\n" + LINE
    assert final.choices[0].finish_reason == "stop" and final.usage is None
    assert all(c.choices and c.usage is None for c in chunks)


def gemini_stream():
    """Gemini's OpenAI-compatible stream: the last words arrive with the finish_reason."""
    head = {"created": 1753000000, "id": "Yk1aaN2x", "model": "gemini-2.5-flash",
            "object": "chat.completion.chunk"}
    first = dict({"choices": [{"delta": {"content": "Hello", "role": "assistant"},
                               "index": 0}]}, **head)
    last = dict({"choices": [{"delta": {"content": ", world!", "role": "assistant"},
                              "finish_reason": "stop", "index": 0}]}, **head,
                usage={"completion_tokens": 4, "prompt_tokens": 9, "total_tokens": 13})
    return ("data: %s\n\ndata: %s\n\ndata: [DONE]\n\n" % (_dumps(first), _dumps(last))).encode()


def test_openai_sdk_footer_when_finish_chunk_carries_text():
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    client = openai_client(rewrite(rw, gemini_stream(), size=40))
    with client.chat.completions.stream(model="gemini-2.5-flash",
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
        chunks = [ev.chunk for ev in stream if ev.type == "chunk"]
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello, world!\n\n" + LINE
    assert final.choices[0].finish_reason == "stop" and final.usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "stop"]
    assert rw.watcher.usage == sse.Usage(9, 4)


def test_openai_sdk_tool_call_untouched():
    rw = sse.StreamRewriter("openai", drop_usage=True, footer=lambda u: LINE)
    stream = openai_stream(include_usage=True, tool_call=True, finish="tool_calls")
    client = openai_client(rewrite(rw, stream))
    with client.chat.completions.stream(model="gpt-4o-mini",
                                        messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert not msg.content and msg.tool_calls[0].function.arguments == '{"city":"Oslo"}'


def test_openai_sdk_raises_on_error_event():
    stream = openai_stream(pieces=["partial answer"] * 3)
    rw = sse.StreamRewriter("openai", footer=lambda u: LINE)
    events = sse.split_events(stream)
    torn = b"".join(events[:3]) + events[3][:40]  # role chunk, two deltas, a torn third
    chunks = [rw.feed(torn), rw.abort("upstream connection reset mid-stream")]
    got = []
    with pytest.raises(openai.APIError, match="upstream connection reset mid-stream"):
        for c in openai_client(chunks).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True):
            got.append(c.choices[0].delta.content)
    assert got[1:] == ["partial answer"] * 2  # whole events only, then the error


def test_anthropic_sdk_reads_footer_and_usage():
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    blocks = (("thinking", ("Let me think",)), ("text", ("Hello", ", world!")))
    final = anthropic_sdk_final(rewrite(rw, anthropic_stream(blocks=blocks), size=9))
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hello, world!\n\n" + LINE
    assert final.content[0].thinking == "Let me think"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (472, 15)
    assert final.usage.cache_read_input_tokens == 3000 and final.stop_reason == "end_turn"


def test_anthropic_sdk_tool_use_untouched():
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    blocks = (("text", ("Checking.",)), ("tool_use", ('{"city":', '"Oslo"}')))
    final = anthropic_sdk_final(rewrite(rw, anthropic_stream(blocks=blocks, stop="tool_use")))
    assert final.content[0].text == "Checking." and final.content[1].input == {"city": "Oslo"}


def test_anthropic_sdk_raises_on_error_event():
    stream = anthropic_stream()
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    torn = stream[:stream.index(b"event: content_block_stop") + 10]
    chunks = [rw.feed(torn), rw.abort("upstream connection reset mid-stream")]
    with pytest.raises(anthropic.APIStatusError,
                       match="upstream connection reset mid-stream") as info:
        anthropic_sdk_final(chunks)
    assert info.value.body["error"]["type"] == "api_error"


def test_error_event_shapes():
    oa = sse.error_event("openai", 'bad "thing"')
    assert oa.startswith(b"data: ") and oa.endswith(b"\n\n")
    assert json.loads(oa[6:]) == {"error": {"message": 'bad "thing"', "type": "server_error",
                                            "param": None, "code": None}}
    an = sse.error_event("anthropic", "busy", kind="overloaded_error")
    [event] = sse.EventParser().feed(an)
    assert event.event == "error"
    assert json.loads(event.data) == {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "busy"}}


def test_cached_replay_through_both_sdks():
    """A recorded upstream stream, replayed event by event through a fresh rewriter."""
    recorded = openai_stream(include_usage=True)
    rw = sse.StreamRewriter("openai", drop_usage=True)
    replay = [rw.feed(raw) for raw in sse.split_events(recorded)] + [rw.close()]
    chunks = openai_sdk_chunks([c for c in replay if c])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"
    assert all(c.usage is None for c in chunks)

    recorded = anthropic_stream()
    rw = sse.StreamRewriter("anthropic", footer=lambda u: LINE)
    replay = [rw.feed(raw) for raw in sse.split_events(recorded)] + [rw.close()]
    final = anthropic_sdk_final([c for c in replay if c])
    assert final.content[0].text == "Hello, world!\n\n" + LINE


# -- OpenAI Responses ----------------------------------------------------------------------

RESPONSES_USAGE = {"input_tokens": 5200, "input_tokens_details": {"cached_tokens": 4096},
                   "output_tokens": 40, "output_tokens_details": {"reasoning_tokens": 33},
                   "total_tokens": 5240}


def responses_stream(pieces=("Hello", ", wor", "ld!"), call=False, reasoning=True,
                     eol="\n", event_lines=True, end="response.completed"):
    """A Responses stream as api.openai.com sends it: a reasoning item, a message, and
    optionally a function call after the message (Codex's "I'll run it" + shell call)."""
    seq = [0]
    out = []

    def ev(kind, **fields):
        obj = dict({"type": kind, "sequence_number": seq[0]}, **fields)
        seq[0] += 1
        head = "event: %s%s" % (kind, eol) if event_lines else ""
        out.append("%sdata: %s%s%s" % (head, _dumps(obj), eol, eol))

    base = {"id": "resp_68a1", "object": "response", "created_at": 1753000000,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": "You are Codex.", "model": "gpt-5-codex", "output": [],
            "tools": [], "usage": None, "metadata": {}}
    ev("response.created", response=base)
    ev("response.in_progress", response=base)
    items = []
    if reasoning:
        item = {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "gAAA"}
        ev("response.output_item.added", output_index=0, item=dict(item, encrypted_content=None))
        ev("response.output_item.done", output_index=0, item=item)
        items.append(item)
    text = "".join(pieces)
    index = len(items)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [],
           "role": "assistant"}
    ev("response.output_item.added", output_index=index, item=msg)
    ev("response.content_part.added", item_id="msg_1", output_index=index, content_index=0,
       part=part)
    for p in pieces:
        ev("response.output_text.delta", item_id="msg_1", output_index=index, content_index=0,
           delta=p, logprobs=[], obfuscation="x1")
    ev("response.output_text.done", item_id="msg_1", output_index=index, content_index=0,
       text=text, logprobs=[])
    ev("response.content_part.done", item_id="msg_1", output_index=index, content_index=0,
       part=dict(part, text=text))
    msg = dict(msg, status="completed", content=[dict(part, text=text)])
    ev("response.output_item.done", output_index=index, item=msg)
    items.append(msg)
    if call:
        fc = {"id": "fc_1", "type": "function_call", "status": "completed",
              "arguments": '{"command":["ls"]}', "call_id": "call_1", "name": "shell"}
        ev("response.output_item.added", output_index=index + 1,
           item=dict(fc, status="in_progress", arguments=""))
        ev("response.function_call_arguments.delta", item_id="fc_1", output_index=index + 1,
           delta=fc["arguments"])
        ev("response.function_call_arguments.done", item_id="fc_1", output_index=index + 1,
           arguments=fc["arguments"])
        ev("response.output_item.done", output_index=index + 1, item=fc)
        items.append(fc)
    if end:
        status = end[len("response."):]
        final = dict(base, status=status, output=items, usage=RESPONSES_USAGE)
        if end == "response.failed":
            final["error"] = {"code": "server_error", "message": "The model failed."}
        ev(end, response=final)
    return "".join(out).encode("utf-8")


def responses_events(chunks):
    """The JSON of each event the client received."""
    return [json.loads(e.data) for e in sse.EventParser().feed(b"".join(chunks))
            if e.data is not None]


def test_watcher_responses_usage_model_and_end():
    for event_lines in (True, False):  # OpenAI sends `event:` lines; compatible servers may not
        w = sse.UsageWatcher("responses")
        for e in sse.EventParser().feed(responses_stream(event_lines=event_lines)):
            w.observe(e)
        assert w.model == "gpt-5-codex" and w.complete and not w.errored
        # cached tokens are part of input_tokens, reasoning tokens of output_tokens
        assert w.usage == sse.Usage(5200 - 4096, 40, 4096, 0)
        assert w.stop_reason == "completed"


def test_watcher_responses_incomplete_failed_and_error():
    w = sse.UsageWatcher("responses")
    for e in sse.EventParser().feed(responses_stream(end="response.incomplete")):
        w.observe(e)
    assert w.complete and w.stop_reason == "incomplete" and w.usage.output == 40
    w = sse.UsageWatcher("responses")
    for e in sse.EventParser().feed(responses_stream(end="response.failed")):
        w.observe(e)
    assert not w.complete and w.errored and w.error_message == "The model failed."
    w = sse.UsageWatcher("responses")
    for e in sse.EventParser().feed(responses_stream(end=None)):
        w.observe(e)
    assert not w.complete and not w.errored and w.model == "gpt-5-codex"
    # OpenAI's error event: documented flat, sent nested; both are read
    for data in ({"type": "error", "sequence_number": 2, "code": "x", "message": "flat"},
                 {"type": "error", "sequence_number": 2,
                  "error": {"type": "too_many_requests", "message": "nested"}}):
        w = sse.UsageWatcher("responses")
        w.observe(sse.EventParser().feed(b"event: error\ndata: " + _dumps(data).encode()
                                         + b"\n\n")[0])
        assert w.errored and w.error_message in ("flat", "nested")


def test_usage_from_response_responses():
    obj = {"object": "response", "usage": RESPONSES_USAGE}
    assert sse.usage_from_response("responses", obj) == sse.Usage(1104, 40, 4096, 0)
    assert sse.usage_from_response("responses", {"usage": None}) == sse.Usage()


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_responses_footer_in_every_event_that_repeats_the_text(size, eol):
    stream = responses_stream(eol=eol)
    seen = []
    rw = sse.StreamRewriter("responses", footer=lambda u: seen.append(u) or LINE)
    out = b"".join(rewrite(rw, stream, size=size))
    events = responses_events([out])
    assert out.count((eol + eol).encode()) == len(events)  # the stream's own line ends
    final = "Hello, world!\n\n" + LINE
    by_type = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    assert "".join(e["delta"] for e in by_type["response.output_text.delta"]) == final
    assert by_type["response.output_text.delta"][-1] == {
        "type": "response.output_text.delta", "sequence_number": 9, "item_id": "msg_1",
        "output_index": 1, "content_index": 0, "delta": "\n\n" + LINE, "logprobs": []}
    assert by_type["response.output_text.done"][0]["text"] == final
    assert by_type["response.content_part.done"][0]["part"]["text"] == final
    assert by_type["response.output_item.done"][1]["item"]["content"][0]["text"] == final
    completed = by_type["response.completed"][0]["response"]
    assert completed["output"][1]["content"][0]["text"] == final
    assert completed["output"][0] == {"id": "rs_1", "type": "reasoning", "summary": [],
                                      "encrypted_content": "gAAA"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert seen == [sse.Usage(1104, 40, 4096, 0)]  # the footer saw the final usage
    # everything before the text's end is forwarded byte for byte
    head = stream[:stream.index(b"event: response.output_text.done")]
    assert b"".join(rewrite(sse.StreamRewriter("responses", footer=lambda u: LINE),
                            stream, size))[:len(head)] == head


def test_responses_only_the_closing_events_are_held():
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    events = sse.split_events(responses_stream())
    for raw in events:
        out = rw.feed(raw)
        kind = json.loads(raw.split(b"data: ", 1)[1])["type"]
        if kind in ("response.output_text.done", "response.content_part.done",
                    "response.output_item.done") and b"msg_1" in raw:
            assert out == b""
        elif kind == "response.completed":
            assert out.count(b"\n\n") == 5  # the footer delta, the three held events, the end
        else:
            assert out == raw  # deltas go out as they arrive, never delayed


@pytest.mark.parametrize("kwargs", [dict(call=True), dict(end="response.failed"),
                                    dict(end=None)])
def test_responses_no_footer_leaves_stream_unchanged(kwargs):
    """Text then a function call (the answer ends in the call), a failed response, a
    stream cut short: byte for byte what the provider sent."""
    stream = responses_stream(**kwargs)
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, stream, size=13)) == stream


def test_responses_error_event_mid_stream_releases_without_footer():
    stream = responses_stream(end=None)
    error = (b'event: error\ndata: {"type":"error","sequence_number":12,"error":'
             b'{"type":"server_error","code":null,"message":"boom","param":null}}\n\n')
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    assert b"".join(rewrite(rw, stream + error)) == stream + error
    assert rw.watcher.errored and rw.watcher.error_message == "boom"


def test_responses_abort_is_a_numbered_error_event_the_sdk_raises():
    stream = responses_stream(pieces=("partial ", "answer ", "cut"))
    events = sse.split_events(stream)
    cut = [i for i, raw in enumerate(events) if b"output_text.delta" in raw][2]
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    chunks = [rw.feed(b"".join(events[:cut]) + events[cut][:30]),
              rw.abort("upstream connection lost mid-stream")]
    [error] = responses_events(chunks[1:])
    assert error["type"] == "error" and error["sequence_number"] == cut
    assert error["message"] == error["error"]["message"] == "upstream connection lost mid-stream"
    got = []
    with pytest.raises(openai.APIError, match="upstream connection lost mid-stream"):
        with openai_client(chunks).responses.stream(model="gpt-5-codex", input="hi") as s:
            for e in s:
                got.append(e)
    assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == \
        "partial answer "


def test_responses_sdk_accumulates_the_footer():
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    chunks = rewrite(rw, responses_stream(), size=50)
    with openai_client(chunks).responses.stream(model="gpt-5-codex", input="hi") as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert deltas == final.output_text == "Hello, world!\n\n" + LINE
    assert final.usage.input_tokens_details.cached_tokens == 4096
    # a cached stream replayed event by event through a fresh rewriter parses the same way
    rw = sse.StreamRewriter("responses", footer=lambda u: LINE)
    replay = [rw.feed(raw) for raw in sse.split_events(responses_stream())] + [rw.close()]
    with openai_client([c for c in replay if c]).responses.stream(
            model="gpt-5-codex", input="hi") as s:
        assert s.get_final_response().output_text == "Hello, world!\n\n" + LINE
