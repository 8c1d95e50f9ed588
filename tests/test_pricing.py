"""The shipped price table, model matching, cost arithmetic and usage normalisation."""

import dataclasses
import json
import re

import pytest

from tokenpak import pricing, sse
from tokenpak.errors import TokenpakError


def test_table_is_dated_sourced_and_complete():
    with open(pricing.PRICES_FILE, encoding="utf-8") as fh:
        data = json.load(fh)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"])
    assert pricing.PRICES_DATE == data["date"]
    assert set(data["sources"]) == {"openai", "anthropic", "google"}
    for name in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3",
                 "o4-mini", "gpt-5", "gpt-5-mini", "claude-opus-4-6", "claude-sonnet-4-6",
                 "claude-haiku-4-5", "claude-3-7-sonnet", "claude-3-5-haiku", "gemini-2.0-flash",
                 "gemini-2.5-pro", "gemini-2.5-flash"):
        entry = data["models"][name]
        assert all(isinstance(entry[f], (int, float)) and entry[f] >= 0 for f in pricing.FIELDS), name
        assert entry["output"] >= entry["input"] >= entry["cache_read"], name


@pytest.mark.parametrize("model, family", [
    ("gpt-4o", "gpt-4o"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("openai/gpt-4o", "gpt-4o"),
    ("openai/claude-sonnet-4-6", "claude-sonnet-4-6"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("CLAUDE-HAIKU-4-5", "claude-haiku-4-5"),
    ("models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("gemini-2.5-flash-lite-preview-06-17", "gemini-2.5-flash-lite"),
    ("o3-mini-2025-01-31", "o3-mini"),
])
def test_price_for_maps_snapshots_to_their_family(model, family):
    table = pricing.load_prices()
    assert pricing.price_for(model, table) is table[family]


@pytest.mark.parametrize("model", ["", None, "llama-3-70b", "gpt-4x", "gpt-5.3", "o1x", "my-model"])
def test_unknown_models_have_no_price(model):
    assert pricing.price_for(model) is None
    assert pricing.cost(model, {"input": 1000, "output": 10}) is None


def test_prefix_must_end_at_a_name_segment():
    # gpt-4o must not be priced as gpt-4, nor gpt-4.1 as gpt-4
    table = pricing.load_prices()
    assert pricing.price_for("gpt-4o", table)["input"] != table["gpt-4"]["input"]
    assert pricing.price_for("gpt-4.1-2025-04-14", table) is table["gpt-4.1"]


def test_cost_uses_every_field():
    table = pricing.load_prices({"test-model": {"input": 1, "output": 2, "cache_read": 0.5,
                                                "cache_write": 4}})
    usage = {"input": 1_000_000, "output": 500_000, "cache_read": 2_000_000, "cache_write": 250_000}
    assert pricing.cost("test-model", usage, table) == pytest.approx(1 + 1 + 1 + 1)
    assert pricing.cost("test-model", {}, table) == 0.0


def test_cost_of_claude_sonnet_request():
    usage = {"input": 1000, "output": 200, "cache_read": 5000, "cache_write": 100}
    expected = (1000 * 3 + 200 * 15 + 5000 * 0.30 + 100 * 3.75) / 1e6
    assert pricing.cost("claude-sonnet-4-6", usage) == pytest.approx(expected)


def test_one_hour_cache_writes_cost_twice_the_input_price():
    # Anthropic: 5-minute writes 1.25x input (Haiku 3: $0.30, as listed), 1-hour writes 2x
    for name, entry in pricing.default_table().items():
        if entry["provider"] == "anthropic":
            assert entry["cache_write"] == pytest.approx(entry["input"] * 1.25, abs=0.02), name
            assert entry["cache_write_1h"] == pytest.approx(entry["input"] * 2), name
        else:  # no such thing elsewhere: the same as any write
            assert entry["cache_write_1h"] == entry["cache_write"], name
    usage = {"input": 100, "output": 10, "cache_read": 0, "cache_write": 1000, "cache_write_1h": 600}
    expected = (100 * 3 + 10 * 15 + 400 * 3.75 + 600 * 6) / 1e6
    assert pricing.cost("claude-sonnet-4-6", usage) == pytest.approx(expected)
    # a split larger than the writes is capped: never more 1-hour tokens than written ones
    capped = dict(usage, cache_write_1h=5000)
    assert pricing.cost("claude-sonnet-4-6", capped) == pytest.approx((100 * 3 + 10 * 15 + 1000 * 6) / 1e6)


def test_long_context_tier_prices_the_whole_request():
    short = {"input": 150_000, "output": 1000, "cache_read": 50_000, "cache_write": 0}
    assert pricing.cost("claude-sonnet-4-5-20250929", short) == pytest.approx(
        (150_000 * 3 + 1000 * 15 + 50_000 * 0.30) / 1e6)  # 200,000 exactly: not over
    long = dict(short, cache_write=2000, cache_write_1h=1000)
    assert pricing.cost("claude-sonnet-4-5-20250929", long) == pytest.approx(
        (150_000 * 6 + 1000 * 22.5 + 50_000 * 0.60 + 1000 * 7.5 + 1000 * 12) / 1e6)
    assert pricing.cost("claude-sonnet-4-20250514", {"input": 300_000, "output": 0}) == pytest.approx(1.8)
    assert pricing.cost("gemini-2.5-pro", {"input": 250_000, "output": 1000}) == pytest.approx(
        (250_000 * 2.5 + 1000 * 15) / 1e6)
    # models without a tier: the same figures at any size
    assert pricing.cost("claude-sonnet-4-6", {"input": 300_000}) == pytest.approx(0.9)
    assert pricing.cost("gemini-2.5-flash", {"input": 300_000}) == pytest.approx(0.09)


def test_overrides_set_the_new_figures_and_tiers():
    table = pricing.load_prices({
        "claude-sonnet-4-6": {"cache_write_1h": 7.0},
        "my-model": {"input": 1, "output": 2, "cache_read": 0.1, "long_context_tokens": 1000,
                     "long_input": 2, "long_output": 3},
        "gpt-4o": {"cache_write": 3.0}})
    assert table["claude-sonnet-4-6"]["cache_write_1h"] == 7.0
    assert table["claude-sonnet-4-6"]["derived"] == {}
    mine = table["my-model"]
    assert mine["long_context_tokens"] == 1000 and isinstance(mine["long_context_tokens"], int)
    # long cache figures follow the input price's step: 0.1 x 2/1
    assert mine["long_cache_read"] == pytest.approx(0.2)
    assert mine["derived"]["long_cache_read"] == "cache_read x long_input/input"
    assert pricing.cost("my-model", {"input": 1001, "output": 1000}, table) == pytest.approx(
        (1001 * 2 + 1000 * 3) / 1e6)
    assert pricing.cost("my-model", {"input": 1000, "output": 1000}, table) == pytest.approx(3000 / 1e6)
    # a derived figure follows the figure it derives from
    assert table["gpt-4o"]["cache_write_1h"] == 3.0


@pytest.mark.parametrize("overrides", [
    {"my-model": {"input": 1, "output": 2, "long_input": 3}},            # no threshold
    {"my-model": {"input": 1, "output": 2, "long_context_tokens": 10}},  # no long prices
    {"gpt-4o": {"long_context_tokens": -1}},
    {"gpt-4o": {"cache_write_2h": 1}},
])
def test_bad_tier_overrides_are_user_errors(overrides):
    with pytest.raises(TokenpakError) as err:
        pricing.load_prices(overrides)
    assert err.value.hint


def test_anthropic_cache_creation_split_is_read():
    usage = {"input_tokens": 30, "output_tokens": 12, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 700,
             "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 500}}
    out = usage_of(sse.ANTHROPIC, usage)
    assert out["cache_write"] == 700 and out["cache_write_1h"] == 500
    # the split alone (no total) still gives the total
    del usage["cache_creation_input_tokens"]
    assert usage_of(sse.ANTHROPIC, usage)["cache_write"] == 700
    # garbage in the split counts as nothing
    usage["cache_creation"] = {"ephemeral_1h_input_tokens": "many"}
    assert usage_of(sse.ANTHROPIC, usage)["cache_write_1h"] == 0


def test_overrides_merge_field_by_field_and_add_models():
    table = pricing.load_prices({"gpt-4o": {"input": 1.0}, "openai/local-llm": {"input": 0.2, "output": 0.4}})
    assert table["gpt-4o"]["input"] == 1.0
    assert table["gpt-4o"]["output"] == 10.0  # untouched
    assert {f: table["local-llm"][f] for f in pricing.PRICE_FIELDS} == {
        "input": 0.2, "output": 0.4, "cache_read": 0.2, "cache_write": 0.2, "cache_write_1h": 0.2}
    assert table["local-llm"]["derived"]["cache_write_1h"] == "defaults to the cache_write price"
    assert pricing.cost("local-llm", {"input": 1_000_000}, table) == pytest.approx(0.2)
    # the shipped default table is not changed by overrides
    assert pricing.price_for("gpt-4o")["input"] == 2.5


@pytest.mark.parametrize("overrides", [
    {"gpt-4o": {"input": "cheap"}},
    {"gpt-4o": {"input": -1}},
    {"gpt-4o": {"input": True}},
    {"gpt-4o": {"inptu": 1.0}},
    {"new-model": {"input": 1.0}},
    {"gpt-4o": 2.0},
])
def test_bad_overrides_are_user_errors(overrides):
    with pytest.raises(TokenpakError) as err:
        pricing.load_prices(overrides)
    assert err.value.hint


# Usage is normalised in one place, sse.py (Usage: disjoint buckets); cost reads its buckets.
def usage_of(api, usage):
    return dataclasses.asdict(sse.usage_from_response(api, {"usage": usage}))


def test_openai_usage_subtracts_cached_prompt_tokens():
    usage = {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280,
             "prompt_tokens_details": {"cached_tokens": 1024}}
    assert usage_of(sse.OPENAI, usage) == {
        "input": 176, "output": 80, "cache_read": 1024, "cache_write": 0, "cache_write_1h": 0}


def test_responses_api_usage_subtracts_cached_input_tokens():
    usage = {"input_tokens": 50, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 10}}
    assert usage_of(sse.RESPONSES, usage) == {
        "input": 40, "output": 7, "cache_read": 10, "cache_write": 0, "cache_write_1h": 0}


def test_anthropic_usage_keeps_input_as_is():
    usage = {"input_tokens": 30, "output_tokens": 12, "cache_read_input_tokens": 2000,
             "cache_creation_input_tokens": 500}
    out = usage_of(sse.ANTHROPIC, usage)
    assert out == {"input": 30, "output": 12, "cache_read": 2000, "cache_write": 500,
                   "cache_write_1h": 0}
    prices = pricing.price_for("claude-sonnet-4-6")
    assert pricing.cost("claude-sonnet-4-6", out) == pytest.approx(
        sum(out[f] * prices[f] for f in pricing.FIELDS) / 1e6)


@pytest.mark.parametrize("usage", [None, "x", {}, {"prompt_tokens": None, "completion_tokens": "9x"},
                                   {"prompt_tokens": -5, "completion_tokens": 3}])
def test_normalising_never_raises_on_bad_usage(usage):
    out = usage_of(sse.OPENAI, usage)
    assert set(out) == set(pricing.PRICE_FIELDS)
    assert all(isinstance(v, int) and v >= 0 for v in out.values())


def test_stream_reads_the_split_from_message_start_and_message_delta():
    """message_start carries the prompt's usage, message_delta the cumulative counts; a
    split in either is kept, a delta without one keeps the start's."""
    def watch(*events):
        watcher = sse.UsageWatcher(sse.ANTHROPIC)
        raw = b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(obj).encode())
                       for name, obj in events)
        for event in sse.EventParser().feed(raw):
            watcher.observe(event)
        return watcher.usage
    start = ("message_start", {"type": "message_start", "message": {
        "model": "claude-sonnet-4-6", "usage": {
            "input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 900,
            "cache_creation": {"ephemeral_5m_input_tokens": 100,
                               "ephemeral_1h_input_tokens": 800}}}})
    delta = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 42}})
    usage = watch(start, delta)
    assert (usage.cache_write, usage.cache_write_1h, usage.output) == (900, 800, 42)
    cumulative = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 42, "cache_creation_input_tokens": 1000,
                                              "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                                 "ephemeral_1h_input_tokens": 1000}}})
    usage = watch(start, cumulative)
    assert (usage.cache_write, usage.cache_write_1h) == (1000, 1000)
