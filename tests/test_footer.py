"""Tests for tokenpak.footer: the line, where it may go, and its removal from history.

The round-trip tests go through the real SDKs (over an httpx2 MockTransport): the answer a
user's client sees carries the footer, and the same text sent back as history is stripped
to exactly what the model wrote.
"""

import copy
import json

import anthropic
try:  # the SDKs' own HTTP library: httpx2 under openai>=3 / anthropic>=2 (Python >= 3.11)
    import httpx2
except ImportError:  # older Pythons get SDK versions built on httpx, the same API
    import httpx as httpx2
import openai
import pytest
from hypothesis import given, settings, strategies as st

from tokenpak import footer, sse

LINE = footer.format_line(48213, 30150, "miss", 0.0123)
ANSWER = "Here is the fix:\n\n```py\nprint('hi')\n```\n\nDone."


# -- format_line ---------------------------------------------------------------------------

def test_format_line_exact():
    assert LINE == "[tokenpak] 48,213 → 30,150 tokens (37.5% saved) | cache miss | $0.0123"
    assert footer.format_line(1200, 1200, "hit", None) == (
        "[tokenpak] 1,200 → 1,200 tokens (0.0% saved) | cache hit | cost unknown")
    assert footer.format_line(0, 0, "bypass", 0) == (
        "[tokenpak] 0 → 0 tokens (0.0% saved) | cache bypass | $0.0000")


def test_format_line_shows_dollars_saved_when_any():
    assert footer.format_line(4000, 1000, "miss", 0.0123, 0.0009).endswith(
        "| cache miss | $0.0123 (saved $0.0009)")
    assert footer.format_line(100, 100, "miss", 0.0123, 0.0) == footer.format_line(
        100, 100, "miss", 0.0123)
    assert footer.format_line(100, 100, "hit", 0.0, 0.00001).endswith("$0.0000 (saved <$0.0001)")


def test_format_line_money_and_cache_words():
    assert footer.format_line(10, 5, "cache hit", 1234.5).endswith("| cache hit | $1,234.5000")
    assert footer.format_line(10, 5, "MISS", 0.00001).endswith("| <$0.0001")
    with pytest.raises(ValueError):
        footer.format_line(10, 5, "maybe", 0.1)


def test_format_line_is_one_line_with_the_prefix():
    line = footer.format_line(10 ** 9, 1, "miss", 99.99)
    assert line.startswith(footer.PREFIX + " ") and "\n" not in line
    assert "1,000,000,000 → 1 tokens (100.0% saved)" in line


# -- strip ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(text=st.text(), before=st.integers(0, 10 ** 7), after=st.integers(0, 10 ** 7),
       cache=st.sampled_from(["hit", "miss", "bypass"]),
       cost=st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)))
def test_strip_round_trips_any_answer(text, before, after, cache, cost):
    line = footer.format_line(before, after, cache, cost)
    assert footer.strip_text(text + footer.SEPARATOR + line) == text


def test_strip_text_leaves_other_text_alone():
    assert footer.strip_text(ANSWER) is ANSWER
    quoted = "The proxy prints\n\n[tokenpak] lines\nlike that one."
    assert footer.strip_text(quoted) == quoted  # not the last line
    twice = ANSWER + "\n\n" + LINE + "\n\n" + LINE
    assert footer.strip_text(twice) == ANSWER + "\n\n" + LINE  # exactly one footer removed


@pytest.mark.parametrize("returned", [
    ANSWER + "\n\n" + LINE + "\n\n",                       # aider: whitespace after it
    ANSWER + "\n\n" + LINE + " \n",
    (ANSWER + "\n\n" + LINE).replace("\n", "\r\n"),           # CRLF
    (ANSWER + "\n\n" + LINE + "\n").replace("\n", "\r\n"),
    ANSWER + "\n\n" + LINE.replace("[tokenpak]", "\\[tokenpak\\]"),  # markdown-escaped
    ANSWER + "\n\n*" + LINE + "*\n",                        # emphasised
    ANSWER + "\n\n_" + LINE + "_",
    ANSWER + "\n\n> " + LINE,                                # quoted
    ANSWER + "\n \n" + LINE,                                 # a blank line with a space
])
def test_strip_text_survives_client_rendering(returned):
    assert footer.strip_text(returned).replace("\r\n", "\n") == ANSWER


def test_strip_text_keeps_answers_that_only_mention_it():
    for text in ("[tokenpak] is a proxy", "Use it:\n[tokenpak] lines\nend",
                 "a\n\n[tokenpak]", "the [tokenpak] footer", "a\n\nsee [tokenpak] x"):
        assert footer.strip_text(text) is text


def test_footer_alone_in_its_block_is_removed():
    body = {"messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."},
                                          {"type": "text", "text": LINE + "\n"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\n\n" + LINE}]},
        {"role": "user", "content": "next"}]}
    out = footer.strip_history("anthropic", body)
    assert out["messages"][0]["content"] == [{"type": "text", "text": "Hello."}]
    # the only block: kept (an empty content list is not a valid turn), emptied
    assert out["messages"][1]["content"] == [{"type": "text", "text": ""}]


def test_strip_history_responses_input():
    body = {"model": "gpt-5", "input": [
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": ANSWER + "\n\n" + LINE + "\n"}]},
        {"type": "function_call_output", "call_id": "c", "output": "x"},
        {"role": "assistant", "content": ANSWER + "\n\n" + LINE}]}
    out = footer.strip_history("openai", body, json.dumps(body).encode())
    assert out["input"][1]["content"] == [{"type": "output_text", "text": ANSWER}]
    assert out["input"][3]["content"] == ANSWER
    assert out["input"][2] is body["input"][2]


def _openai_body():
    return {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A user quoting\n\n" + LINE},
        {"role": "assistant", "content": ANSWER + "\n\n" + LINE},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure.\n\n" + LINE}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "user", "content": "next"}]}


def test_strip_history_openai():
    body = _openai_body()
    snapshot = copy.deepcopy(body)
    out = footer.strip_history("openai", body, raw=json.dumps(body).encode())
    assert body == snapshot  # input untouched
    assert out["messages"][2]["content"] == ANSWER
    assert out["messages"][4]["content"] == [{"type": "text", "text": "Sure."}]
    assert out["messages"][1] is body["messages"][1]  # user turns are never touched
    assert [m is n for m, n in zip(out["messages"], body["messages"])] == [
        True, True, False, True, False, True, True, True]
    assert out["model"] == "gpt-4o"


def test_strip_history_anthropic():
    body = {"model": "claude-opus-4-6", "max_tokens": 100, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"},
            {"type": "text", "text": "Hello!\n\n" + LINE,
             "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": [{"type": "text", "text": "more"}]},
        {"role": "assistant", "content": "Plain\n\n" + LINE}]}
    snapshot = copy.deepcopy(body)
    out = footer.strip_history("anthropic", body)
    assert body == snapshot
    blocks = out["messages"][1]["content"]
    assert blocks[0] is body["messages"][1]["content"][0]  # untouched blocks are shared
    assert blocks[1] == {"type": "text", "text": "Hello!", "cache_control": {"type": "ephemeral"}}
    assert out["messages"][3]["content"] == "Plain"


def test_strip_history_returns_same_object_when_nothing_matched():
    body = {"messages": [{"role": "assistant", "content": ANSWER}]}
    assert footer.strip_history("openai", body) is body
    assert footer.strip_history("openai", body, raw=json.dumps(body).encode()) is body
    with_footer = {"messages": [{"role": "assistant", "content": ANSWER + "\n\n" + LINE}]}
    # the raw check comes first: bytes without the prefix mean no parse of the body at all
    assert footer.strip_history("openai", with_footer, raw=b'{"messages":[]}') is with_footer
    for odd in ({}, {"messages": "x"}, {"messages": [None, 3, {"role": "assistant"}]}, []):
        assert footer.strip_history("anthropic", odd) is odd


def test_strip_history_responses():
    said = [{"type": "output_text", "text": ANSWER + "\n\n" + LINE, "annotations": []}]
    body = {"model": "gpt-5-codex", "instructions": "You are Codex.\n\n" + LINE, "input": [
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "quoting\n\n" + LINE}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "message", "role": "assistant", "id": "msg_1", "content": said},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok\n\n" + LINE},
        {"role": "assistant", "content": "Plain\n\n" + LINE},
        {"role": "user", "content": "next"}]}
    snapshot = copy.deepcopy(body)
    out = footer.strip_history("responses", body, raw=json.dumps(body).encode())
    assert body == snapshot  # input untouched
    assert out["input"][2] == dict(body["input"][2], content=[
        {"type": "output_text", "text": ANSWER, "annotations": []}])
    assert out["input"][5]["content"] == "Plain"
    # only assistant messages: the user's text, tool output and instructions stay as sent
    assert [a is b for a, b in zip(out["input"], body["input"])] == [
        True, True, False, True, True, False, True]
    assert out["instructions"] is body["instructions"]
    for same in ({"input": "a string\n\n" + LINE}, {"input": [body["input"][0]]},
                 {"input": [{"role": "assistant", "content": [{"type": "output_text",
                                                               "text": ANSWER}]}]}):
        assert footer.strip_history("responses", same) is same


# -- wants_footer / append_to_response -------------------------------------------------------

@pytest.mark.parametrize("api,body,expected", [
    ("openai", {"messages": []}, True),
    ("openai", {"response_format": {"type": "text"}}, True),
    ("openai", {"response_format": {"type": "json_object"}}, False),
    ("openai", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, False),
    ("openai", {"tool_choice": "auto", "tools": [{}]}, True),
    ("openai", {"tool_choice": "required"}, False),
    ("openai", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, False),
    ("openai", {"n": 2}, False),
    ("anthropic", {"messages": []}, True),
    ("anthropic", {"tool_choice": {"type": "auto"}}, True),
    ("anthropic", {"tool_choice": {"type": "any"}}, False),
    ("anthropic", {"tool_choice": {"type": "tool", "name": "f"}}, False),
    ("anthropic", {"output_config": {"effort": "high"}}, True),
    ("anthropic", {"output_config": {"format": {"type": "json_schema", "schema": {}}}}, False),
    ("anthropic", {"output_format": {"type": "json_schema", "schema": {}}}, False),
    ("anthropic", "not a dict", False),
    ("responses", {"input": "hi"}, True),
    ("responses", {"text": {"format": {"type": "text"}, "verbosity": "low"}}, True),
    ("responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, False),
    ("responses", {"text": {"format": {"type": "json_object"}}}, False),
    ("responses", {"tool_choice": "auto", "tools": [{}]}, True),
    ("responses", {"tool_choice": "required"}, False),
    ("responses", {"tool_choice": {"type": "function", "name": "shell"}}, False),
    ("responses", {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, True),
    ("responses", {"tool_choice": {"type": "allowed_tools", "mode": "required", "tools": []}},
     False),
])
def test_wants_footer(api, body, expected):
    assert footer.wants_footer(api, body) is expected


def _openai_response(content="Hi there.", finish="stop", tool_calls=None):
    msg = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1753000000,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23,
                      "prompt_tokens_details": {"cached_tokens": 0}}}


def _anthropic_response(content=None, stop="end_turn"):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-6",
            "content": content if content is not None else [{"type": "text", "text": "Hi there."}],
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 20, "output_tokens": 3, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}}


def _responses_response(*items):
    message = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "annotations": [], "text": "Hi there."}]}
    return {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o",
            "output": list(items) if items else [message],
            "usage": {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 23}}


_REASONING = {"id": "rs_1", "type": "reasoning", "summary": []}
_CALL = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c",
         "name": "shell", "arguments": "{}"}


def test_append_to_response():
    obj = _openai_response()
    assert footer.append_to_response("openai", obj, LINE)
    assert obj["choices"][0]["message"]["content"] == "Hi there.\n\n" + LINE
    obj = _anthropic_response([{"type": "thinking", "thinking": "x", "signature": "s"},
                               {"type": "text", "text": "Hi there."}])
    assert footer.append_to_response("anthropic", obj, LINE)
    assert obj["content"][1]["text"] == "Hi there.\n\n" + LINE
    obj = _responses_response()
    obj["output"].insert(0, _REASONING)
    assert footer.append_to_response("responses", obj, LINE)
    assert obj["output"][1]["content"][0]["text"] == "Hi there.\n\n" + LINE


@pytest.mark.parametrize("api,obj", [
    ("openai", _openai_response(content=None, finish="tool_calls", tool_calls=[{"id": "c"}])),
    ("openai", _openai_response(content="", finish="stop", tool_calls=[{"id": "c"}])),
    ("openai", _openai_response(content="Calling.", finish="tool_calls")),
    ("openai", {"choices": []}),
    ("openai", {"error": {"message": "x"}}),
    ("anthropic", _anthropic_response(stop="tool_use")),
    ("anthropic", _anthropic_response(stop="pause_turn")),
    ("anthropic", _anthropic_response([{"type": "text", "text": "a"},
                                       {"type": "tool_use", "id": "t", "name": "f", "input": {}}])),
    ("anthropic", _anthropic_response([])),
    ("responses", _responses_response(_REASONING, _CALL)),
    ("responses", dict(_responses_response(), output=[
        _responses_response()["output"][0], _CALL])),  # text, then a call: no footer
    ("responses", dict(_responses_response(), output=[])),
    ("responses", dict(_responses_response(), output=[dict(
        _responses_response()["output"][0], content=[{"type": "refusal", "refusal": "no"}])])),
    ("responses", {"error": {"message": "x"}}),
])
def test_append_to_response_refuses(api, obj):
    snapshot = copy.deepcopy(obj)
    assert not footer.append_to_response(api, obj, LINE)
    assert obj == snapshot


# -- round trip through the SDKs ------------------------------------------------------------

def _client(api, body, stream=False):
    def handler(request):
        if stream:
            return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                   content=iter(body))
        return httpx2.Response(200, json=body)
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    if api == "openai":
        return openai.OpenAI(api_key="sk-test", base_url="http://t/v1", http_client=http,
                             max_retries=0)
    return anthropic.Anthropic(api_key="sk-ant-test", base_url="http://t", http_client=http,
                               max_retries=0)


def test_round_trip_openai_non_stream():
    obj = _openai_response(content=ANSWER)
    footer.append_to_response("openai", obj, LINE)
    got = _client("openai", obj).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "fix it"}])
    text = got.choices[0].message.content
    assert text == ANSWER + "\n\n" + LINE
    history = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": "fix it"}, got.choices[0].message.model_dump(exclude_none=True),
        {"role": "user", "content": "thanks"}]}
    raw = json.dumps(history).encode()
    assert footer.strip_history("openai", json.loads(raw), raw)["messages"][1]["content"] == ANSWER


def test_round_trip_anthropic_non_stream():
    obj = _anthropic_response([{"type": "text", "text": ANSWER}])
    footer.append_to_response("anthropic", obj, LINE)
    got = _client("anthropic", obj).messages.create(
        model="claude-opus-4-6", max_tokens=100, messages=[{"role": "user", "content": "fix it"}])
    assert got.content[0].text == ANSWER + "\n\n" + LINE
    blocks = [b.model_dump() for b in got.content]
    history = {"messages": [{"role": "user", "content": "fix it"},
                            {"role": "assistant", "content": blocks}]}
    out = footer.strip_history("anthropic", history)
    assert out["messages"][1]["content"][0]["text"] == ANSWER


def _sse(data):
    return "data: %s\n\n" % json.dumps(data, separators=(",", ":"))


def test_round_trip_openai_stream():
    head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    pieces = [ANSWER[:7], ANSWER[7:20], ANSWER[20:]]
    stream = "".join(
        [_sse(dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}]))]
        + [_sse(dict(head, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}]))
           for p in pieces]
        + [_sse(dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])),
           "data: [DONE]\n\n"]).encode()
    rw = sse.StreamRewriter("openai", footer=lambda usage: LINE)
    chunks = [rw.feed(stream[i:i + 50]) for i in range(0, len(stream), 50)] + [rw.close()]
    client = _client("openai", [c for c in chunks if c], stream=True)
    with client.chat.completions.stream(model="gpt-4o",
                                        messages=[{"role": "user", "content": "fix"}]) as s:
        text = s.get_final_completion().choices[0].message.content
    assert text == ANSWER + "\n\n" + LINE
    body = {"messages": [{"role": "assistant", "content": text}]}
    assert footer.strip_history("openai", body)["messages"][0]["content"] == ANSWER
