"""The OpenAI Responses API (POST /v1/responses, all that Codex speaks) through tokenpak.

A real tokenpak in front of the fake provider, driven by the openai SDK's own Responses
client (`responses.create`, `responses.stream`): what the SDK parsed, what upstream received,
what the accounting DB and /stats hold, and how cache hits and the footer look to the client.
"""

import json

import openai
import pytest

from fakeprovider import responses_usage_for
from helpers import OPENAI_KEY, accounting_rows
from tokenpak import pricing, providers

INPUT = "summarise the build log"
ANSWER = "Echo: " + INPUT
WORDS = len(ANSWER.split())


def client(proxy, base="/v1"):
    return openai.OpenAI(api_key=OPENAI_KEY, base_url=proxy.url + base, max_retries=0)


def stream(proxy, **kw):
    """One call through the SDK's stream helper: (the cache status recorded, the events,
    the final response the SDK accumulated)."""
    kw.setdefault("model", "gpt-4o")
    kw.setdefault("input", INPUT)
    with client(proxy).responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    return accounting_rows(proxy)[-1]["cache"], events, final


def deltas(events):
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# -- routing -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, api", [
    ("/v1/responses", "responses"), ("/responses", "responses"),
    ("/openai/v1/responses?x=1", "responses"), ("/v1/responses/resp_123", None),
    ("/v1/responses/resp_123/input_items", None), ("/v1/chat/completions", "openai"),
])
def test_api_of_responses(path, api):
    assert providers.api_of(path) == api


def test_bare_responses_path_goes_to_openai(proxy, fake):
    answer = client(proxy, base="").responses.create(model="gpt-4o", input=INPUT)
    assert answer.output_text == ANSWER
    assert fake.last().path == "/responses"
    assert fake.last().header("Authorization") == "Bearer " + OPENAI_KEY
    assert accounting_rows(proxy)[-1]["model"] == "gpt-4o"


# -- accounting ---------------------------------------------------------------------------

def test_usage_model_and_cost_recorded_stream_and_not(proxy, fake):
    fake.cached_tokens, fake.reasoning_tokens = 3, 2
    answer = client(proxy).responses.create(model="gpt-4o", input=INPUT, instructions="be brief")
    assert answer.output_text == ANSWER
    state, events, final = stream(proxy, instructions="be brief")
    assert final.output_text == deltas(events) == ANSWER
    assert events[-1].type == "response.completed"
    prompt = responses_usage_for({"instructions": "be brief", "input": INPUT})
    assert final.usage.input_tokens == answer.usage.input_tokens == prompt
    first, second = accounting_rows(proxy)
    for row, streamed in ((first, 0), (second, 1)):
        assert (row["provider"], row["model"], row["path"]) == ("openai", "gpt-4o", "/v1/responses")
        assert row["streamed"] == streamed and row["complete"] == 1 and row["status"] == 200
        # input_tokens includes the cached ones, output_tokens the reasoning ones
        assert row["input_tokens"] == prompt - 3 and row["cache_read_tokens"] == 3
        assert row["output_tokens"] == WORDS + 2
        billed = {"input": prompt - 3, "cache_read": 3, "output": WORDS + 2, "cache_write": 0}
        assert row["cost_usd"] == pytest.approx(pricing.cost("gpt-4o", billed))
        assert row["cost_usd"] > 0
    status, _, body = proxy.get("/stats")
    stats = json.loads(body)
    assert list(stats["by_model"]) == ["gpt-4o"]  # not "(unknown)"
    assert stats["unpriced_requests"] == 0
    assert stats["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])
    assert stats["token_usage"]["output"] == 2 * (WORDS + 2)


def test_a_list_of_input_items_is_forwarded_as_sent(proxy, fake):
    items = [{"type": "message", "role": "developer", "content": "be terse"},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": INPUT}]}]
    answer = client(proxy).responses.create(model="gpt-4o", input=items, store=False)
    assert answer.output_text == ANSWER
    assert fake.last().json() == {"model": "gpt-4o", "input": items, "store": False}


# -- cache ----------------------------------------------------------------------------------

def test_stream_is_cached_and_replayed_event_by_event(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    state1, first, final1 = stream(proxy)
    state2, second, final2 = stream(proxy)
    assert (state1, state2) == ("miss", "hit")
    raw = client(proxy).responses.with_raw_response.create(model="gpt-4o", input=INPUT,
                                                           stream=True)
    assert raw.headers["x-tokenpak-cache"] == "hit"
    assert [e.type for e in raw.parse()] == [e.type for e in first]
    assert fake.count("/v1/responses") == 1
    assert [e.type for e in second] == [e.type for e in first]
    assert [e.sequence_number for e in second] == list(range(len(first)))
    assert deltas(second) == final2.output_text == ANSWER
    assert final2.id == final1.id
    hit = accounting_rows(proxy)[-1]
    assert (hit["cache"], hit["streamed"], hit["model"], hit["cost_usd"]) == ("hit", 1, "gpt-4o", 0)
    assert hit["output_tokens"] == WORDS


def test_non_stream_is_cached(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    states = []
    for _ in range(2):
        raw = client(proxy).responses.with_raw_response.create(model="gpt-4o", input=INPUT)
        states.append(raw.headers["x-tokenpak-cache"])
        assert raw.parse().output_text == ANSWER
    assert states == ["miss", "hit"]
    assert fake.count("/v1/responses") == 1


# -- footer ---------------------------------------------------------------------------------

def test_stream_footer_is_the_same_in_every_event(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True, cache__enabled=True)
    for expected in ("miss", "hit"):
        state, events, final = stream(proxy)
        assert state == expected
        text = deltas(events)
        assert text.startswith(ANSWER + "\n\n[tokenpak] ") and "\n" not in text[len(ANSWER) + 2:]
        assert "| cache %s |" % expected in text
        assert final.output_text == text
        by_type = {e.type: e for e in events}
        assert by_type["response.output_text.done"].text == text
        assert by_type["response.content_part.done"].part.text == text
        assert by_type["response.output_item.done"].item.content[0].text == text
        assert by_type["response.completed"].response.output[0].content[0].text == text
        assert [e.sequence_number for e in events] == list(range(len(events)))
    assert fake.count("/v1/responses") == 1


def test_non_stream_footer(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True)
    answer = client(proxy).responses.create(model="gpt-4o", input=INPUT)
    assert answer.output_text.startswith(ANSWER + "\n\n[tokenpak] ")
    assert answer.output_text.endswith("| cache bypass | $%.4f" % accounting_rows(proxy)[-1]["cost_usd"])


@pytest.mark.parametrize("streamed", [False, True])
def test_no_footer_after_a_function_call(make_proxy, fake, streamed):
    proxy = make_proxy(footer__enabled=True)
    kw = dict(model="gpt-4o", input="weather in Paris?", extra_headers={"x-fake": "tool"})
    if streamed:
        final = stream(proxy, **kw)[2]
    else:
        final = client(proxy).responses.create(**kw)
    [call] = final.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather",
                                                      '{"city":"Paris"}')
    assert "[tokenpak]" not in final.model_dump_json()
    # The tool's result goes back; the answer to that is text, and gets its footer.
    items = [{"type": "message", "role": "user", "content": "weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name,
              "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    kw["input"] = items
    final = stream(proxy, **kw)[2] if streamed else client(proxy).responses.create(**kw)
    assert final.output_text.startswith("Echo: tool result\n\n[tokenpak] ")


def test_footer_in_history_is_stripped_before_upstream(make_proxy, fake):
    proxy = make_proxy(footer__enabled=True)
    first = client(proxy).responses.create(model="gpt-4o", input=INPUT)
    said = first.output_text
    assert "[tokenpak]" in said
    history = [{"role": "user", "content": INPUT},
               {"type": "message", "role": "assistant", "id": first.output[0].id,
                "status": "completed",
                "content": [{"type": "output_text", "text": said, "annotations": []}]},
               {"role": "user", "content": "and now?"}]
    client(proxy).responses.create(model="gpt-4o", input=history)
    sent = fake.last().json()["input"]
    assert sent[1]["content"][0]["text"] == ANSWER
    assert sent[0] == history[0] and sent[2] == history[2]
    assert b"[tokenpak]" not in fake.last().body


def test_stream_is_relayed_as_it_arrives_with_the_footer_on(make_proxy, fake):
    """The client has the first events while the provider still holds the rest (it waits
    for `gate`): holding events for the footer never holds the answer back."""
    proxy = make_proxy(footer__enabled=True, cache__enabled=True)
    with client(proxy).responses.stream(model="gpt-4o", input=INPUT,
                                        extra_headers={"x-fake": "gate"}) as s:
        events = iter(s)
        assert next(events).type == "response.created"
        assert not fake.gate.is_set()
        fake.gate.set()
        rest = list(events)
    assert deltas(rest).startswith(ANSWER + "\n\n[tokenpak] ")


# -- faults ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["reset", "truncate"])
def test_a_broken_stream_raises_in_the_sdk_and_is_not_cached(make_proxy, fake, scenario):
    proxy = make_proxy(cache__enabled=True, footer__enabled=True)
    seen = []
    with pytest.raises(openai.APIError, match="incomplete"):
        with client(proxy).responses.stream(model="gpt-4o", input=INPUT,
                                            extra_headers={"x-fake": scenario}) as s:
            for event in s:
                seen.append(event)
    numbers = [e.sequence_number for e in seen]
    assert numbers == list(range(len(numbers))) and numbers
    if scenario == "reset":
        assert deltas(seen) == "Echo: summarise"  # what arrived before the reset, intact
    row = accounting_rows(proxy)[-1]
    assert row["complete"] == 0 and row["error"] and row["streamed"] == 1
    assert stream(proxy)[0] == "miss"  # nothing was cached
