"""Costs as the bill has them, through a real tokenpak: Anthropic's 1-hour cache writes and
the long-context tier priced into the accounting row, streamed or not, and a cache hit
saving what the request cost."""

import pytest

from fakeprovider import usage_for
from helpers import accounting_rows, anthropic_client

MESSAGES = [{"role": "user", "content": "price my cache writes"}]
PROMPT = usage_for({"messages": MESSAGES})
OUTPUT = len("Echo: price my cache writes".split())


def ask(proxy, model, stream):
    client = anthropic_client(proxy)
    if not stream:
        return client.messages.create(model=model, max_tokens=50, messages=MESSAGES)
    with client.messages.stream(model=model, max_tokens=50, messages=MESSAGES) as answer:
        list(answer.text_stream)
        return answer.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
def test_one_hour_cache_writes_are_priced_at_twice_the_input(proxy, fake, stream):
    fake.cache_write_tokens, fake.cache_write_1h_tokens = 1000, 600
    answer = ask(proxy, "claude-sonnet-4-6", stream)
    # the client sees the provider's usage untouched
    assert answer.usage.cache_creation_input_tokens == 1000
    [row] = accounting_rows(proxy, 1)
    assert row["cache_write_tokens"] == 1000  # the total, as before
    # sonnet 4.6: input $3, output $15, 5-minute write $3.75, 1-hour write $6
    expected = (PROMPT * 3 + OUTPUT * 15 + 400 * 3.75 + 600 * 6) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)
    # what the same writes would cost at the 5-minute price: less, so the split counted
    assert row["cost_usd"] > (PROMPT * 3 + OUTPUT * 15 + 1000 * 3.75) / 1e6


def test_a_cache_hit_saves_the_one_hour_price_too(make_proxy, fake):
    proxy = make_proxy(cache__enabled=True)
    fake.cache_write_tokens, fake.cache_write_1h_tokens = 1000, 1000
    ask(proxy, "claude-sonnet-4-6", False)
    ask(proxy, "claude-sonnet-4-6", False)
    first, hit = accounting_rows(proxy, 2)
    assert hit["cache"] == "hit" and hit["cost_usd"] == 0
    assert first["cost_usd"] == pytest.approx((PROMPT * 3 + OUTPUT * 15 + 1000 * 6) / 1e6)
    assert hit["saved_usd"] == pytest.approx(first["cost_usd"])


@pytest.mark.parametrize("stream", [False, True])
def test_long_context_tier_prices_the_whole_request(proxy, fake, stream):
    # 250k tokens read from the provider's cache put the prompt over Sonnet 4.5's 200k
    fake.cached_tokens = 250_000
    ask(proxy, "claude-sonnet-4-5-20250929", stream)
    [row] = accounting_rows(proxy, 1)
    assert row["cache_read_tokens"] == 250_000
    # long tier: input $6, output $22.50, cache read $0.60
    assert row["cost_usd"] == pytest.approx((PROMPT * 6 + OUTPUT * 22.5 + 250_000 * 0.6) / 1e6)


def test_a_config_override_of_the_one_hour_price_is_used(make_proxy, fake):
    proxy = make_proxy(**{"pricing.claude-sonnet-4-6.cache_write_1h": 10.0})
    fake.cache_write_tokens, fake.cache_write_1h_tokens = 100, 100
    ask(proxy, "claude-sonnet-4-6", False)
    [row] = accounting_rows(proxy, 1)
    assert row["cost_usd"] == pytest.approx((PROMPT * 3 + OUTPUT * 15 + 100 * 10.0) / 1e6)
