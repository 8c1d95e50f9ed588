"""What a request cost: the shipped price table and model-name matching.

Prices live in `data/prices.json` (USD per 1M tokens, dated, with the providers' pricing
pages as source) so that a price change is a data edit, not a code change, and users can
override any figure with `pricing.<model>.<field>` in the config.

Cost is only as good as the token counts fed to it, and the providers count differently:
OpenAI's `prompt_tokens` *includes* the cached tokens, Anthropic's `input_tokens`
*excludes* cache reads and writes. Everything in tokenpak therefore works on one normalised
shape, produced once, where the answer is read (`sse.Usage`, as a dict in rows and entries):

    {"input": uncached prompt tokens, "output": completion tokens,
     "cache_read": prompt tokens read from the provider's cache,
     "cache_write": prompt tokens written to the provider's cache}

so "input" EXCLUDES cache_read and cache_write, and the prompt size is the sum of the three.
An unknown model costs `None` ("unknown"), never 0: a zero would silently under-report spend.
"""

from __future__ import annotations

import json
import os

from tokenpak.errors import TokenpakError

FIELDS = ("input", "output", "cache_read", "cache_write")
PRICES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prices.json")
# After a known prefix, the next character must end a name segment: "gpt-4o-2024-08-06"
# is gpt-4o, but "gpt-5.4" is not gpt-5 and "gpt-4o" is not gpt-4.
_SEGMENT_ENDS = "-@:_"


def _read_shipped():
    with open(PRICES_FILE, encoding="utf-8") as fh:
        return json.load(fh)


_SHIPPED = _read_shipped()
PRICES_DATE: str = _SHIPPED["date"]


class PriceTable(dict):
    """{model: {"input", "output", "cache_read", "cache_write", ...}} with a lookup memo.

    Model names come from clients, so the memo is bounded: past `_MEMO_MAX` distinct names
    lookups still work, they are just not remembered.
    """

    _MEMO_MAX = 4096

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memo = {}


def normalise_model(model) -> str:
    """Lower-case a model name and drop a routing prefix ("openai/", "models/")."""
    name = str(model or "").strip().lower()
    if "/" in name:
        name = name.rsplit("/", 1)[1]
    return name


def load_prices(overrides: dict | None = None) -> PriceTable:
    """The shipped table with `overrides` ({model: {field: usd_per_1m}}) merged field by field.

    A model that is not in the shipped table may be added; it needs at least `input` and
    `output`, its cache prices default to the input price. Raises TokenpakError on a value
    that is not a non-negative number, so a typo in the config is reported at start.
    """
    table = PriceTable()
    for name, entry in _SHIPPED["models"].items():
        table[name] = {f: float(entry[f]) for f in FIELDS}
        table[name]["provider"] = entry.get("provider", "")
    for raw_name, fields in (overrides or {}).items():
        name = normalise_model(raw_name)
        if not isinstance(fields, dict):
            raise TokenpakError(
                "pricing.%s must be a set of fields, not %r" % (raw_name, fields),
                hint="use pricing.%s.input / .output / .cache_read / .cache_write" % raw_name)
        merged = dict(table.get(name, {}))
        for field, value in fields.items():
            if field not in FIELDS:
                raise TokenpakError("unknown price field pricing.%s.%s" % (raw_name, field),
                                    hint="fields are: " + ", ".join(FIELDS))
            merged[field] = _price_value(raw_name, field, value)
        if "input" not in merged or "output" not in merged:
            raise TokenpakError("pricing.%s needs both input and output prices" % raw_name,
                                hint="set pricing.%s.input and pricing.%s.output (USD per 1M tokens)"
                                % (raw_name, raw_name))
        merged.setdefault("cache_read", merged["input"])
        merged.setdefault("cache_write", merged["input"])
        table[name] = merged
    return table


def _price_value(model, field, value) -> float:
    try:
        price = float(value)
    except (TypeError, ValueError):
        price = -1.0
    if isinstance(value, bool) or not price >= 0.0 or price == float("inf"):
        raise TokenpakError("pricing.%s.%s must be a non-negative number, not %r" % (model, field, value),
                            hint="prices are USD per 1M tokens, e.g. 2.5")
    return price


_DEFAULT: PriceTable | None = None


def default_table() -> PriceTable:
    """The shipped table without overrides, loaded once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_prices()
    return _DEFAULT


def price_for(model: str, table=None) -> dict | None:
    """Prices for `model`: exact name, else the longest listed prefix ending at a segment."""
    table = default_table() if table is None else table
    memo = getattr(table, "memo", None)
    if memo is not None and model in memo:
        return memo[model]
    found = _match(normalise_model(model), table)
    if memo is not None and len(memo) < PriceTable._MEMO_MAX:
        memo[model] = found
    return found


def _match(name, table):
    if not name:
        return None
    if name in table:
        return table[name]
    best = None
    # a linear scan over ~50 names, once per distinct model name thanks to the memo
    for known in table:
        if (len(name) > len(known) and name.startswith(known) and name[len(known)] in _SEGMENT_ENDS
                and (best is None or len(known) > len(best))):
            best = known
    return table[best] if best is not None else None


def cost(model: str, usage: dict, table=None) -> float | None:
    """USD for `usage` (normalised, see module doc) on `model`; None when the model is unknown."""
    prices = price_for(model, table)
    if prices is None or not usage:
        return None if prices is None else 0.0
    total = 0.0
    for field in FIELDS:
        tokens = usage.get(field) or 0
        if tokens > 0:
            total += tokens * prices[field]
    return total / 1_000_000
