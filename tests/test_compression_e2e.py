"""Compression and the footer through a real tokenpak, real SDKs and the fake provider."""

import json
from pathlib import Path

import pytest

from helpers import ANTHROPIC_KEY, OPENAI_KEY, unmarked, wait_for
from helpers import anthropic_client as an
from helpers import openai_client as oa

CORPUS = Path(__file__).resolve().parent / "corpus"


def case(name):
    return json.loads((CORPUS / name).read_text())


def strings(value):
    """Every string inside a JSON value (what the model will read)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# -- footer ---------------------------------------------------------------------------------
def test_footer_appended_and_stripped_round_trip_openai(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True)
    messages = [{"role": "user", "content": "first question"}]
    answer = oa(proxy).chat.completions.create(model="gpt-4o", messages=messages)
    text = answer.choices[0].message.content
    body, footer = text.split("\n\n")
    assert body == "Echo: first question"
    assert footer.startswith("[tokenpak] ") and "cache bypass" in footer and "$" in footer
    # The answer goes back as history: the provider must not see (or bill) the footer.
    messages += [{"role": "assistant", "content": text},
                 {"role": "user", "content": "second"}]
    oa(proxy).chat.completions.create(model="gpt-4o", messages=messages)
    sent = fake.last().json()["messages"]
    assert sent[1]["content"] == "Echo: first question"


def test_footer_stripped_however_the_client_gives_it_back(make_proxy, fake):
    """aider-style trailing whitespace, CRLF, markdown rendering, a block of its own: the
    provider never receives the footer."""
    proxy = make_proxy(footer__enabled=True)
    answer = an(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                       messages=[{"role": "user", "content": "first"}])
    text = answer.content[0].text
    said, line = text.split("\n\n")
    assert said == "Echo: first" and line.startswith("[tokenpak] ")
    variants = [
        text + "\n\n",
        text.replace("\n", "\r\n") + "\r\n",
        said + "\n\n*" + line.replace("[tokenpak]", "\\[tokenpak\\]") + "*\n",
        said + "\n\n> " + line,
        [{"type": "text", "text": said}, {"type": "text", "text": line + "\n"}],
    ]
    for variant in variants:
        an(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": variant},
            {"role": "user", "content": "second"}])
        sent = fake.last()
        assert b"tokenpak" not in sent.body, variant
        content = sent.json()["messages"][1]["content"]
        if isinstance(content, str):
            assert content.replace("\r\n", "\n") == said
        else:
            assert content == [{"type": "text", "text": said}]


def test_footer_in_streams_both_sdks(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True)
    stream = oa(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "streamed"}], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Echo: streamed\n\n[tokenpak] ")
    with an(proxy).messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                   messages=[{"role": "user", "content": "hi"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed.startswith("Echo: hi\n\n[tokenpak] ")
    assert final.content[0].text == streamed
    assert final.stop_reason == "end_turn"


def test_no_footer_on_tool_calls_or_json_mode(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True)
    tool = oa(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "weather?"}],
        extra_headers={"x-fake": "tool"})
    assert tool.choices[0].message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert tool.choices[0].message.content is None
    json_mode = oa(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "{}"}],
        response_format={"type": "json_object"})
    assert "[tokenpak]" not in json_mode.choices[0].message.content
    message = an(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                        messages=[{"role": "user", "content": "t"}],
                                        extra_headers={"x-fake": "tool"})
    assert message.content[0].type == "tool_use"


def test_footer_off_leaves_answers_byte_identical(proxy, fake):
    answer = oa(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "plain"}])
    assert "[tokenpak]" not in answer.http_response.text


def test_footer_never_stored_in_cache(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True, cache__enabled=True)
    first = oa(proxy).chat.completions.create(model="gpt-4o",
                                              messages=[{"role": "user", "content": "c"}])
    second = oa(proxy).chat.completions.create(model="gpt-4o",
                                               messages=[{"role": "user", "content": "c"}])
    assert "cache miss" in first.choices[0].message.content
    assert second.choices[0].message.content.count("[tokenpak]") == 1
    assert "cache hit" in second.choices[0].message.content


# -- compression --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["000-agent-session-0.json", "008-json-tools-8.json",
                                  "011-code-review-11.json"])
def test_corpus_request_is_compressed_upstream_keeping_every_needle(make_proxy, fake, name):
    data = case(name)
    proxy = make_proxy(compression__level="hybrid")
    if data["api"] == "anthropic":
        response = an(proxy).messages.with_raw_response.create(**data["body"])
    else:
        response = oa(proxy).chat.completions.with_raw_response.create(**data["body"])
    forwarded = fake.last()
    assert len(forwarded.body) < len(json.dumps(data["body"]).encode()) * 0.9
    text = "\n".join(strings(forwarded.json()))
    for needle in data["needles"]:
        assert needle in text, needle
    for block in data["verbatim"]:
        assert block in text
    before = int(response.headers["x-tokenpak-tokens-before"])
    after = int(response.headers["x-tokenpak-tokens-after"])
    assert after < before
    assert wait_for(lambda: proxy.app.requests_done >= 1)  # recorded off the hot path
    proxy.app.recorder.flush()
    stats = json.loads(proxy.get("/stats")[2])
    assert stats["compressed_requests"] == 1


def test_small_prompt_is_forwarded_byte_for_byte_in_strict(make_proxy, fake):
    data = case("014-small-14.json")
    proxy = make_proxy(compression__level="strict")
    raw = json.dumps(data["body"]).encode()
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", data["path"], body=raw,
                 headers={"Authorization": "Bearer " + OPENAI_KEY,
                          "Content-Type": "application/json"})
    conn.getresponse().read()
    assert fake.last().body == raw


def test_history_prefix_is_forwarded_identically_next_turn(make_proxy, fake):
    """Turn N's forwarded messages reappear byte-identical at the start of turn N+1, so the
    provider's prompt cache keeps hitting."""
    data = case("001-agent-session-1.json")
    proxy = make_proxy(compression__level="hybrid")
    body = data["body"]
    an(proxy).messages.create(**body)
    turn_n = fake.last().json()["messages"]
    follow_up = dict(body, messages=body["messages"] + [
        {"role": "assistant", "content": "Done; next I will run the tests."},
        {"role": "user", "content": "Go ahead and run them."}])
    an(proxy).messages.create(**follow_up)
    turn_n1 = fake.last().json()["messages"]
    assert len(turn_n1) == len(turn_n) + 2
    assert json.dumps(turn_n1[:len(turn_n)]) == json.dumps(turn_n)


def test_compressed_requests_are_accounted(make_proxy, fake):
    data = case("009-json-tools-9.json")
    proxy = make_proxy()
    oa(proxy).chat.completions.create(**data["body"])
    assert wait_for(lambda: proxy.app.requests_done >= 1)
    proxy.app.recorder.flush()
    stats = json.loads(proxy.get("/stats")[2])
    assert stats["compressed_requests"] == 1
    assert stats["tokens_saved"] > 0




def test_claude_code_turns_are_compressed_and_stay_prefix_stable(make_proxy, fake):
    """Claude Code's exact request (marker on the newest block, thinking, 24 tools), two turns
    sent as the CLI sends them: both compressed, turn N a byte-identical prefix of turn N+1."""
    data = case("agents/018-claude-code-18.json")
    proxy = make_proxy()  # default settings: hybrid, threshold 4,500
    import http.client
    forwarded = []
    for body in (data["previous"], data["body"]):
        raw = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("POST", data["path"], body=raw, headers={
            "x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        conn.close()
        assert len(fake.last().body) < 0.8 * len(raw)
        forwarded.append(fake.last().json())
    before, after = forwarded
    old, new = unmarked(before["messages"]), unmarked(after["messages"])
    assert json.dumps(new).startswith(json.dumps(old)[:-1])
    assert after["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    newest = after["messages"][-1]["content"][-1]["content"]
    assert newest != data["body"]["messages"][-1]["content"][-1]["content"]  # compressed too
    for key in ("system", "tools", "thinking", "context_management"):
        assert after[key] == data["body"][key]
    text = "\n".join(strings(after))
    assert all(needle in text for needle in data["needles"])
