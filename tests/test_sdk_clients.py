"""The official SDKs, pointed at tokenpak, get exactly what the provider answered."""

import json
import threading

import anthropic
import openai
import pytest

from helpers import ANTHROPIC_KEY, GOOGLE_KEY, OPENAI_KEY, anthropic_client, openai_client


MESSAGES = [{"role": "user", "content": "what is in the box"}]


def test_openai_non_stream(proxy, fake):
    answer = openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                          temperature=0.2)
    assert answer.choices[0].message.content == "Echo: what is in the box"
    assert answer.usage.prompt_tokens > 0
    received = fake.last()
    assert received.path == "/v1/chat/completions"
    assert received.header("Authorization") == "Bearer " + OPENAI_KEY
    assert received.json() == {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0.2}


def test_openai_stream(proxy, fake):
    stream = openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                          stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Echo: what is in the box"
    assert fake.last().json()["stream"] is True


def test_anthropic_non_stream(proxy, fake):
    message = anthropic_client(proxy).messages.create(
        model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
    assert message.content[0].text == "Echo: what is in the box"
    assert message.usage.input_tokens > 0
    received = fake.last()
    assert received.path == "/v1/messages"
    # anthropic 2.x sends the key as a Bearer token; older SDKs as x-api-key
    assert ANTHROPIC_KEY in (received.header("x-api-key"),
                             (received.header("Authorization") or "")[7:])
    assert received.header("anthropic-version")


def test_anthropic_stream(proxy, fake):
    client = anthropic_client(proxy)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=64,
                                messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: what is in the box"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6  # one per word of the answer


def test_openai_format_with_anthropic_key_goes_to_anthropic_compat(make_proxy, fake):
    # Anthropic's OpenAI-compatible endpoint is /v1/chat/completions on its own host: route
    # the key to the anthropic URL, keep the path.
    proxy = make_proxy(proxy__providers__openai__url="http://127.0.0.1:9")
    answer = openai_client(proxy, key=ANTHROPIC_KEY).chat.completions.create(
        model="claude-sonnet-4-6", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("Echo:")
    assert fake.last().path == "/v1/chat/completions"


def test_gemini_key_maps_v1_onto_base_path(proxy, fake):
    answer = openai_client(proxy, key=GOOGLE_KEY).chat.completions.create(
        model="gemini-2.0-flash", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("Echo:")
    assert fake.last().path == "/v1beta/openai/chat/completions"


def test_stream_is_incremental(proxy, fake):
    """The client receives the first event while the provider is still holding the rest:
    the fake provider waits for `gate`, which the test opens only after reading an event."""
    stream = openai_client(proxy, timeout=10).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-fake": "gate"})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert not fake.gate.is_set()
    fake.gate.set()
    rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert rest == "Echo: what is in the box"


def test_anthropic_stream_is_incremental(proxy, fake):
    client = anthropic_client(proxy, timeout=10)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES,
                                extra_headers={"x-fake": "gate"}) as stream:
        events = iter(stream)
        assert next(events).type == "message_start"
        assert not fake.gate.is_set()
        fake.gate.set()
        assert "".join(stream.text_stream) == "Echo: what is in the box"


def test_64_concurrent_streams(proxy, fake):
    client = openai_client(proxy, timeout=30)
    results, errors = {}, []

    def run(i):
        try:
            stream = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "n%d" % i}], stream=True,
                extra_headers={"x-fake-delay": "0.01"})
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == {i: "Echo: n%d" % i for i in range(64)}


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_rate_limit_passes_through(proxy, fake, sdk):
    if sdk == "openai":
        call = openai_client(proxy).chat.completions.with_raw_response.create
        kwargs = dict(model="gpt-4o", messages=MESSAGES)
        error = openai.RateLimitError
    else:
        call = anthropic_client(proxy).messages.create
        kwargs = dict(model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES)
        error = anthropic.RateLimitError
    with pytest.raises(error) as caught:
        call(extra_headers={"x-fake": "429"}, **kwargs)
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-request-id"] == "req_fake123"
    assert "rate limited" in str(caught.value)


def test_server_error_and_bad_key_pass_through(proxy, fake):
    with pytest.raises(openai.InternalServerError):
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                     extra_headers={"x-fake": "500"})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic_client(proxy, key="sk-ant-bad-key").messages.create(
            model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES)
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_unreachable_upstream_is_502_in_provider_shape(make_proxy):
    proxy = make_proxy(proxy__providers__anthropic__url="http://127.0.0.1:9")
    with pytest.raises(anthropic.APIStatusError) as caught:
        anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=5,
                                                messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "error"
    assert "cannot reach http://127.0.0.1:9" in caught.value.body["error"]["message"]


def test_read_timeout_is_504(make_proxy, fake):
    proxy = make_proxy(proxy__read_timeout=0.5)
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                     extra_headers={"x-fake": "hang"})
    assert caught.value.status_code == 504
    assert "proxy.read_timeout" in caught.value.message


def test_gzip_answer_passes_through_encoded(proxy, fake):
    # No Accept-Encoding rewriting for the client: the SDK decodes what the provider sent.
    answer = openai_client(proxy).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake": "gzip"})
    assert answer.choices[0].message.content == "Echo: what is in the box"


def test_claude_code_calls_pass_through(proxy, fake):
    """Claude Code: OAuth Bearer token, ?beta=true, count_tokens, models, anthropic-beta."""
    token = "sk-ant-oat01-test-oauth-token"
    client = anthropic.Anthropic(auth_token=token, base_url=proxy.url, max_retries=0)
    message = client.beta.messages.create(
        model="claude-sonnet-4-6", max_tokens=5, messages=MESSAGES,
        betas=["interleaved-thinking-2025-05-14"], extra_query={"beta": "true"})
    assert message.content[0].text == "Echo: what is in the box"
    received = fake.last()
    assert received.path == "/v1/messages?beta=true"
    assert received.header("Authorization") == "Bearer " + token
    assert received.header("anthropic-beta") == "interleaved-thinking-2025-05-14"
    count = client.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)
    assert count.input_tokens > 0
    assert fake.last().path == "/v1/messages/count_tokens"
    models = client.models.list()
    assert fake.last().path.startswith("/v1/models")
    assert models.data[0].id == "gpt-4o"


def test_models_listing_via_openai_sdk(proxy, fake):
    models = openai_client(proxy).models.list()
    assert [m.id for m in models.data] == ["gpt-4o"]
    assert json.loads(fake.last().body or b"{}") == {}
