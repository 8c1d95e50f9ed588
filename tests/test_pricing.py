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


def test_overrides_merge_field_by_field_and_add_models():
    table = pricing.load_prices({"gpt-4o": {"input": 1.0}, "openai/local-llm": {"input": 0.2, "output": 0.4}})
    assert table["gpt-4o"]["input"] == 1.0
    assert table["gpt-4o"]["output"] == 10.0  # untouched
    assert table["local-llm"] == {"input": 0.2, "output": 0.4, "cache_read": 0.2, "cache_write": 0.2}
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
        "input": 176, "output": 80, "cache_read": 1024, "cache_write": 0}


def test_responses_api_usage_subtracts_cached_input_tokens():
    usage = {"input_tokens": 50, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 10}}
    assert usage_of(sse.RESPONSES, usage) == {
        "input": 40, "output": 7, "cache_read": 10, "cache_write": 0}


def test_anthropic_usage_keeps_input_as_is():
    usage = {"input_tokens": 30, "output_tokens": 12, "cache_read_input_tokens": 2000,
             "cache_creation_input_tokens": 500}
    out = usage_of(sse.ANTHROPIC, usage)
    assert out == {"input": 30, "output": 12, "cache_read": 2000, "cache_write": 500}
    prices = pricing.price_for("claude-sonnet-4-6")
    assert pricing.cost("claude-sonnet-4-6", out) == pytest.approx(
        sum(out[f] * prices[f] for f in pricing.FIELDS) / 1e6)


@pytest.mark.parametrize("usage", [None, "x", {}, {"prompt_tokens": None, "completion_tokens": "9x"},
                                   {"prompt_tokens": -5, "completion_tokens": 3}])
def test_normalising_never_raises_on_bad_usage(usage):
    out = usage_of(sse.OPENAI, usage)
    assert set(out) == set(pricing.FIELDS)
    assert all(isinstance(v, int) and v >= 0 for v in out.values())
