"""Accounting through a real tokenpak: the DB rows, /stats, /metrics and `tokenpak stats`."""

import json

from pathlib import Path

import openai
import pytest

from fakeprovider import usage_for
from helpers import (accounting_rows, anthropic_client, openai_client,
                     stream_until_final_event)
from tokenpak import cli


MESSAGES = [{"role": "user", "content": "count my tokens please"}]
CORPUS = Path(__file__).resolve().parent / "corpus"
ANSWER_WORDS = len("Echo: count my tokens please".split())


def test_openai_usage_recorded_stream_and_not(proxy, fake):
    fake.cached_tokens = 3
    client = openai_client(proxy)
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                 stream=True))
    # The client did not ask for usage: it gets none, exactly as from the provider...
    assert [c.usage for c in chunks if c.usage is not None] == []
    assert all(c.choices for c in chunks)
    # ...but tokenpak asked upstream for it, so the stream is accounted, not free.
    assert fake.last().json()["stream_options"] == {"include_usage": True}
    prompt = usage_for({"messages": MESSAGES})
    first, second = accounting_rows(proxy)
    for row, streamed in ((first, 0), (second, 1)):
        assert row["streamed"] == streamed
        assert row["input_tokens"] + row["cache_read_tokens"] == prompt
        assert row["cache_read_tokens"] == 3
        assert row["output_tokens"] == ANSWER_WORDS
        assert row["provider"] == "openai" and row["model"] == "gpt-4o"
        assert row["status"] == 200 and row["complete"] == 1
        assert row["cost_usd"] > 0
        assert row["latency_ms"] > 0 and row["ttfb_ms"] is not None
    assert answer.usage.prompt_tokens == prompt


def test_client_that_asked_for_usage_still_gets_it(proxy, fake):
    client = openai_client(proxy)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == ANSWER_WORDS
    assert accounting_rows(proxy)[-1]["output_tokens"] == ANSWER_WORDS


def test_anthropic_usage_recorded_stream_and_not(proxy, fake):
    fake.cached_tokens, fake.cache_write_tokens = 5, 7
    client = anthropic_client(proxy)
    client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50,
                                messages=MESSAGES) as stream:
        list(stream.text_stream)
    prompt = usage_for({"messages": MESSAGES})
    for row in accounting_rows(proxy):
        assert row["input_tokens"] == prompt
        assert row["cache_read_tokens"] == 5 and row["cache_write_tokens"] == 7
        assert row["output_tokens"] == ANSWER_WORDS
        assert row["provider"] == "anthropic"
    assert [r["streamed"] for r in accounting_rows(proxy)] == [0, 1]


def test_unknown_model_costs_unknown_not_zero(proxy, fake):
    client = openai_client(proxy)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                   extra_body={"model": "my-finetune-x"})
    row = accounting_rows(proxy)[-1]
    assert row["model"] == "my-finetune-x"
    assert row["output_tokens"] == ANSWER_WORDS
    assert row["cost_usd"] is None


def test_free_endpoints_cost_zero_and_unknown_prices_count_as_unpriced(proxy, fake):
    """count_tokens and model listings are free: cost 0, not unknown. A request whose
    price is unknown is counted in unpriced_requests, consistently with its NULL cost."""
    an = anthropic_client(proxy)
    counted = an.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)
    assert counted.input_tokens == usage_for({"messages": MESSAGES})
    oa = openai_client(proxy)
    assert [m.id for m in oa.models.list()] == ["gpt-4o"]
    recorded = accounting_rows(proxy)
    assert [(r["method"], r["path"], r["cost_usd"]) for r in recorded] == [
        ("POST", "/v1/messages/count_tokens", 0.0), ("GET", "/v1/models", 0.0)]
    stats = json.loads(proxy.get("/stats")[2])
    assert stats["unpriced_requests"] == 0 and stats["cost_usd"] == 0.0
    # a billed call without a price, and one whose usage nobody reported
    oa.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                               extra_body={"model": "my-finetune-x"})
    oa.post("/embeddings", body={"input": "x"}, cast_to=object)
    accounting_rows(proxy, 4)  # the writer has them all
    stats = json.loads(proxy.get("/stats")[2])
    assert stats["unpriced_requests"] == 2
    by_model = stats["by_model"]
    assert (by_model["my-finetune-x"]["cost_usd"], by_model["my-finetune-x"]["unpriced"]) == \
        (None, 1)
    # the free calls' known 0 plus one request of unknown cost, counted as such
    assert (by_model["(unknown)"]["cost_usd"], by_model["(unknown)"]["unpriced"]) == (0.0, 1)


def test_compression_savings_priced_at_cache_read_when_the_provider_caches(make_proxy, fake):
    """The same compressed request saves the input price per removed token while the
    provider caches nothing, the (lower) cache-read price once it reads its cache; the
    footer shows the same figure as the row."""
    data = json.loads((CORPUS / "009-json-tools-9.json").read_text())
    proxy = make_proxy(footer__enabled=True)
    client = openai_client(proxy)
    first = client.chat.completions.create(**data["body"])
    fake.cached_tokens = 200
    second = client.chat.completions.create(**data["body"])
    a, b = accounting_rows(proxy)
    removed = a["tokens_before"] - a["tokens_after"]
    assert removed > 0 and b["tokens_before"] - b["tokens_after"] == removed
    assert a["saved_usd"] == pytest.approx(removed * 2.50 / 1e6)  # gpt-4o input
    assert b["saved_usd"] == pytest.approx(removed * 1.25 / 1e6)  # gpt-4o cache read
    assert b["compression_saved_usd"] == b["saved_usd"]
    for answer, row in ((first, a), (second, b)):
        assert answer.choices[0].message.content.endswith(
            "(saved $%.4f)" % row["saved_usd"])
    stats = json.loads(proxy.get("/stats")[2])
    assert stats["saved_usd"] == pytest.approx(a["saved_usd"] + b["saved_usd"])
    assert stats["compression_saved_usd"] == pytest.approx(stats["saved_usd"])


def test_a_footered_answer_is_priced_once(make_proxy, fake, monkeypatch):
    """The footer and the accounting row show one figure, computed once: the row reuses
    what the footer priced instead of pricing the same request again."""
    from tokenpak import accounting, exchange
    calls, price = [], accounting.figures

    def counted(row, table=None):
        calls.append(row["path"])
        return price(row, table)

    monkeypatch.setattr(exchange, "figures", counted)
    monkeypatch.setattr(accounting, "figures", counted)
    proxy = make_proxy(footer__enabled=True)
    answer = openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    row = accounting_rows(proxy, 1)[-1]
    assert "[tokenpak]" in answer.choices[0].message.content
    assert row["cost_usd"] > 0 and "$%.4f" % row["cost_usd"] in answer.choices[0].message.content
    assert calls == ["/v1/chat/completions"]


def test_cache_hits_are_recorded_as_savings(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    client = openai_client(proxy)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    recorded = accounting_rows(proxy)
    assert [r["cache"] for r in recorded] == ["miss", "hit", "hit"]
    assert recorded[1]["cost_usd"] == 0
    assert recorded[1]["saved_usd"] == recorded[0]["cost_usd"] > 0
    status, _, body = proxy.get("/stats")
    stats = json.loads(body)
    assert status == 200
    assert stats["cached"] == 2
    assert stats["requests"] == 3
    assert set(stats["token_usage"]) >= {"input", "output", "cached"}
    # token_usage counts what the provider billed; tokens served from the cache are "cached"
    assert stats["token_usage"]["output"] == ANSWER_WORDS
    assert stats["token_usage"]["cached"] >= 2 * ANSWER_WORDS
    assert "compressed_requests" in stats and stats["saved_usd"] > 0


def test_metrics_endpoint(proxy, fake):
    client = openai_client(proxy)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    status, headers, body = proxy.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    line = [l for l in text.splitlines() if l.startswith("tokenpak_requests_total{")][0]
    for label in ('provider="openai"', 'model="gpt-4o"', 'status="200"', 'cache="bypass"'):
        assert label in line
    assert line.endswith(" 1")
    assert "tokenpak_request_duration_seconds_bucket" in text
    assert "tokenpak_in_flight_requests" in text


def test_stats_cli_reads_the_db_while_the_proxy_is_down(make_proxy, fake, capsys, monkeypatch):
    proxy = make_proxy()
    client = openai_client(proxy)
    for model in ("gpt-4o", "gpt-4o", "gpt-4o-mini"):
        client.chat.completions.create(model=model, messages=MESSAGES)
    proxy.stop()
    monkeypatch.setenv("TOKENPAK_DB", proxy.app.db_path)
    assert cli.main(["stats", "--by", "model"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(l.startswith("gpt-4o ") for l in lines)
    assert any(l.startswith("gpt-4o-mini") for l in lines)
    assert "total" in lines[-1].lower() and "$" in out
    assert cli.main(["stats", "--json", "--since", "1h"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["requests"] == 3
    assert cli.main(["stats", "--since", "bogus"]) != 0


def test_client_leaving_right_after_the_final_event_is_accounted(proxy, fake):
    """Codex closes its connection as soon as response.completed arrives, before the chunked
    body's end: the provider answered (and billed) in full, so the row is complete with the
    usage, not a lost stream. The fake holds the stream open after message_stop meanwhile."""
    stream_until_final_event(proxy, MESSAGES)
    row = accounting_rows(proxy)[-1]
    assert row["complete"] == 1 and row["error"] is None
    assert row["input_tokens"] == usage_for({"messages": MESSAGES})
    assert row["output_tokens"] == ANSWER_WORDS and row["cost_usd"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_counted_before_its_client_has_the_answer(make_proxy, fake, monkeypatch,
                                                               stream):
    """Read-your-writes: once the SDK has its answer, /metrics, /stats and the budgets count
    the request, however late its thread gets to the rest of its bookkeeping (here, half a
    second late: with thousands of threads on one GIL, a 20 ms switch interval is normal)."""
    import time
    from tokenpak import proxy as proxy_module
    finish = proxy_module.Handler.finish_exchange

    def late(handler):
        time.sleep(0.5)
        finish(handler)

    monkeypatch.setattr(proxy_module.Handler, "finish_exchange", late)
    proxy = make_proxy(**{"pricing.gpt-4o.input": 1000000, "pricing.gpt-4o.output": 1000000,
                          "budget.daily_usd": 1})
    client = openai_client(proxy)
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=stream)
    if stream:
        list(answer)
    metrics = proxy.get("/metrics")[2].decode()
    assert ('tokenpak_requests_total{provider="openai",model="gpt-4o",status="200",'
            'cache="bypass"} 1') in metrics, metrics
    assert json.loads(proxy.get("/stats")[2])["requests"] == 1
    with pytest.raises(openai.RateLimitError):  # that one request spent the $1 budget
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(fake.requests) == 1
