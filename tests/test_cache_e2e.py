"""The cache and coalescing through a real tokenpak, real SDKs and the fake provider."""

import sqlite3
import threading

import openai
import pytest

from helpers import (ALL_KEYS, anthropic_client, openai_client,
                     stream_until_final_event, wait_for)
from tokenpak import exchange


def ask(client, text="cache me", **kw):
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture
def cached(make_proxy):
    return make_proxy(cache__enabled=True)


def test_hit_miss_and_header(cached, fake):
    first = ask(openai_client(cached))
    second = ask(openai_client(cached))
    assert first.headers["x-tokenpak-cache"] == "miss"
    assert second.headers["x-tokenpak-cache"] == "hit"
    assert second.parse().choices[0].message.content == "Echo: cache me"
    assert second.parse().id == first.parse().id  # the very same answer
    assert fake.count("/chat/completions") == 1


def test_parameter_change_misses(cached, fake):
    ask(openai_client(cached), temperature=0.1)
    again = ask(openai_client(cached), temperature=0.9)
    assert again.headers["x-tokenpak-cache"] == "miss"
    ask(openai_client(cached), temperature=0.1, user="someone-else", metadata={"a": "b"},
        store=False)
    assert fake.count("/chat/completions") == 3  # `user`/`metadata` do not count; `store` does


def test_answer_changing_headers_are_in_the_key(cached, fake):
    """The same body with and without a beta feature is two questions; a reordered beta
    list is the same question."""
    def msg(**headers):
        return anthropic_client(cached).messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=50, extra_headers=headers,
            messages=[{"role": "user", "content": "beta or not"}])
    assert msg().headers["x-tokenpak-cache"] == "miss"
    with_beta = msg(**{"anthropic-beta": "context-1m-2025-08-07"})
    assert with_beta.headers["x-tokenpak-cache"] == "miss"
    assert fake.count("/v1/messages") == 2
    assert fake.last().header("anthropic-beta") == "context-1m-2025-08-07"
    both = msg(**{"anthropic-beta": "context-1m-2025-08-07,files-api-2025-04-14"})
    assert both.headers["x-tokenpak-cache"] == "miss"
    again = msg(**{"anthropic-beta": "files-api-2025-04-14, context-1m-2025-08-07"})
    assert again.headers["x-tokenpak-cache"] == "hit"
    assert fake.count("/v1/messages") == 3


def test_per_call_headers_do_not_defeat_the_cache(cached, fake):
    ask(openai_client(cached), extra_headers={
        "x-stainless-retry-count": "0", "x-request-id": "a", "User-Agent": "one/1.0",
        "idempotency-key": "k1"})
    again = ask(openai_client(cached), extra_headers={
        "x-stainless-retry-count": "1", "x-request-id": "b", "User-Agent": "two/2.0",
        "idempotency-key": "k2", "x-claude-code-session-id": "s2"})
    assert again.headers["x-tokenpak-cache"] == "hit"
    assert fake.count("/chat/completions") == 1


def test_no_cache_refreshes_and_no_store_bypasses(cached, fake):
    ask(openai_client(cached))
    refreshed = ask(openai_client(cached), extra_headers={"Cache-Control": "no-cache"})
    assert refreshed.headers["x-tokenpak-cache"] == "miss"
    assert fake.count("/chat/completions") == 2
    bypass = ask(openai_client(cached), "never stored", extra_headers={"Cache-Control": "no-store"})
    assert bypass.headers["x-tokenpak-cache"] == "bypass"
    again = ask(openai_client(cached), "never stored")
    assert again.headers["x-tokenpak-cache"] == "miss"
    assert fake.count("/chat/completions") == 4


def test_another_key_never_gets_the_entry(cached, fake):
    ask(openai_client(cached))
    other = ask(openai_client(cached, key="sk-test-another-key-0000"))
    assert other.headers["x-tokenpak-cache"] == "miss"
    assert fake.count("/chat/completions") == 2


def test_rejected_key_never_hits(cached, fake):
    ask(openai_client(cached))
    with pytest.raises(openai.AuthenticationError):
        ask(openai_client(cached, key="sk-bad-key"))
    with pytest.raises(openai.AuthenticationError):
        ask(openai_client(cached, key="sk-bad-key"))  # errors are never cached either
    assert fake.count("/chat/completions") == 3


def test_shared_scope_serves_other_verified_keys_only(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True, cache__scope="shared")
    ask(openai_client(proxy))
    ask(openai_client(proxy, key="sk-test-second"), "warm second key")  # the provider accepts it
    assert ask(openai_client(proxy, key="sk-test-second")).headers["x-tokenpak-cache"] == "hit"
    with pytest.raises(openai.AuthenticationError):
        ask(openai_client(proxy, key="sk-bad-unverified"))


def test_openai_stream_is_cached_and_replayed_as_events(cached, fake):
    def run():
        response = openai_client(cached).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "stream me"}], stream=True)
        chunks = list(response.parse())
        return response.headers["x-tokenpak-cache"], chunks

    state1, first = run()
    state2, second = run()
    assert (state1, state2) == ("miss", "hit")
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa
    assert text(first) == text(second) == "Echo: stream me"
    assert len(second) == len(first) > 3  # replayed event by event, not as one blob
    assert all(c.usage is None for c in second)  # the client never asked for usage
    assert fake.count("/chat/completions") == 1


def test_anthropic_stream_is_cached_and_replayed(cached, fake):
    for expected in ("miss", "hit"):
        with anthropic_client(cached).messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                        messages=[{"role": "user", "content": "stream"}]) as s:
            assert "".join(s.text_stream) == "Echo: stream"
            assert s.get_final_message().usage.output_tokens == 2
            assert s.response.headers["x-tokenpak-cache"] == expected
    assert fake.count("/v1/messages") == 1


def test_partial_stream_is_never_cached(cached, fake):
    for _ in range(2):
        stream = openai_client(cached).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "a b c d e f"}],
            stream=True, extra_headers={"x-fake": "reset"})
        with pytest.raises(openai.APIError) as caught:
            list(stream)
        # tokenpak's error event, not a dropped connection (APIConnectionError, a subclass)
        assert type(caught.value) is openai.APIError
        assert "the answer is incomplete" in caught.value.message
    assert fake.count("/chat/completions") == 2


def test_stream_and_non_stream_are_separate_entries(cached, fake):
    ask(openai_client(cached), "same prompt")
    stream = openai_client(cached).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "same prompt"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) \
        == "Echo: same prompt"
    assert fake.count("/chat/completions") == 2


def test_eight_concurrent_identical_requests_make_one_upstream_call(cached, fake):
    fake.delay_before = 0.3  # hold the first call long enough for all eight to arrive
    results, barrier = [], threading.Barrier(8)

    def run():
        barrier.wait()
        response = ask(openai_client(cached), "together")
        results.append((response.headers["x-tokenpak-cache"],
                        response.parse().choices[0].message.content))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8
    assert {text for _, text in results} == {"Echo: together"}
    assert fake.count("/chat/completions") == 1
    assert sorted(state for state, _ in results).count("miss") == 1


def test_concurrent_identical_streams_share_one_call_incrementally(cached, fake):
    """Followers receive events while the leader's upstream is still streaming."""
    seen_first = threading.Barrier(4, timeout=10)
    texts, errors = [], []

    def run():
        try:
            stream = openai_client(cached).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "shared stream"}],
                stream=True, extra_headers={"x-fake": "gate"})
            chunks = iter(stream)
            first = next(chunks)
            seen_first.wait()  # all four have an event; the upstream is still gated
            rest = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            texts.append((first.choices[0].delta.content or "") + "".join(rest))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    seen_first.wait()
    assert not fake.gate.is_set()
    fake.gate.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert texts == ["Echo: shared stream"] * 3
    assert fake.count("/chat/completions") == 1


def test_cache_survives_restart(make_proxy, fake, tmp_path):
    first = make_proxy(cache__enabled=True)
    ask(openai_client(first), "persist")
    first.app.runtime.cache.store.flush()
    first.stop()
    second = make_proxy(cache__enabled=True)
    assert ask(openai_client(second), "persist").headers["x-tokenpak-cache"] == "hit"
    assert fake.count("/chat/completions") == 1


def test_ttl_expiry(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True, cache__ttl_seconds=0)
    ask(openai_client(proxy))
    assert ask(openai_client(proxy)).headers["x-tokenpak-cache"] == "miss"
    assert fake.count("/chat/completions") == 2


def test_corrupt_db_at_start_still_serves(make_proxy, fake, tmp_path):
    db = tmp_path / "state" / "tokenpak.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    proxy = make_proxy(cache__enabled=True)
    assert ask(openai_client(proxy)).parse().choices[0].message.content == "Echo: cache me"
    assert ask(openai_client(proxy)).parse().choices[0].message.content == "Echo: cache me"


def test_db_holds_no_api_key(make_proxy, fake, tmp_path):
    proxy = make_proxy(cache__enabled=True)
    for key in ALL_KEYS:
        ask(openai_client(proxy, key=key), "secret check")
    with anthropic_client(proxy).messages.stream(model="claude-sonnet-4-6", max_tokens=5,
                                   messages=[{"role": "user", "content": "s"}]) as s:
        list(s.text_stream)
    proxy.app.runtime.cache.store.flush()
    proxy.app.recorder.flush()
    state = tmp_path / "state"
    files = [p for p in state.iterdir() if p.is_file()]
    assert any(p.name == "tokenpak.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for key in ALL_KEYS:
            assert key.encode() not in data, (path, key)
    rows = sqlite3.connect(str(state / "tokenpak.db")).execute(
        "select key_id from requests").fetchall()
    assert rows and all(len(r[0]) == 12 for r in rows)


def test_request_finishing_between_lookup_and_join_is_not_paid_twice(cached, fake,
                                                                      monkeypatch):
    """Request B misses the cache while identical request A is still in flight; A then
    stores its answer and leaves before B joins. B must find A's answer, not call again:
    from memory, or from the database once the writer committed it."""
    real_lookup, calls, first = exchange.lookup, [], []

    def racing_lookup(app, rt, ex, since=None):
        calls.append(since)
        if len(calls) == 1:  # B's lookup missed; A runs from start to end meanwhile
            thread = threading.Thread(target=lambda: first.append(ask(openai_client(cached), text)))
            thread.start()
            thread.join()
            assert wait_for(lambda: len(app.coalescer) == 0)  # A has left: B cannot follow it
            if committed:
                assert rt.cache.store.flush()
            return None
        return real_lookup(app, rt, ex, since)

    monkeypatch.setattr(exchange, "lookup", racing_lookup)
    for committed in (False, True):
        calls.clear()
        text = "race %s" % committed
        again = ask(openai_client(cached), text)
        assert first.pop().headers["x-tokenpak-cache"] == "miss"
        assert again.headers["x-tokenpak-cache"] == "hit"
        assert len(calls) == 4  # B, A, A's re-check, B's re-check
    assert fake.count("/chat/completions") == 2


@pytest.mark.parametrize("round_", range(20))
def test_a_streamed_answer_answers_the_identical_request_sent_right_after(cached, fake, round_):
    """Read-your-writes: the second of two identical streamed requests, sent as soon as the
    first one's stream ended, is answered locally, never by a second upstream call."""
    client = anthropic_client(cached)
    texts = []
    for _ in range(2):
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                    messages=[{"role": "user", "content": "twice %d" % round_}]) as s:
            texts.append(s.get_final_text())
    assert texts[0] == texts[1]
    assert fake.count("/v1/messages") == 1


def test_an_answer_whose_client_left_at_the_final_event_is_cached(cached, fake):
    """Codex hangs up as soon as the final event arrives, before the chunked body's end
    (the fake holds the stream open after message_stop meanwhile): the answer is whole,
    so the identical request sent next is answered from the cache."""
    answers = [stream_until_final_event(cached, [{"role": "user", "content": "leave early"}])
               for _ in range(2)]
    assert fake.count("/v1/messages") == 1
    assert b"x-tokenpak-cache: miss" in answers[0].lower()
    assert b"x-tokenpak-cache: hit" in answers[1].lower()
