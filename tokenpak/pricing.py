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

Two rules make the figure the one on the provider's bill:
- Anthropic writes its prompt cache for 5 minutes (1.25x the input price) or for 1 hour
  (2x); the answer says how many of the written tokens went to each
  (`usage.cache_creation.ephemeral_1h_input_tokens`). The usage carries that part as
  "cache_write_1h", a subset of "cache_write", priced at `cache_write_1h`; the rest of
  "cache_write" is priced at `cache_write`.
- Long context: some models bill a request whose prompt (input + cache_read + cache_write)
  is over `long_context_tokens` at higher figures, for the whole request, output included
  (Claude Sonnet 4/4.5 with the 1M-context beta, Gemini 2.5 Pro: over 200k tokens). Those
  figures are the `long_*` fields of the model's entry.
"""

from __future__ import annotations

import json
import os

from tokenpak.errors import TokenpakError

FIELDS = ("input", "output", "cache_read", "cache_write")  # the token buckets of a usage
# The price figures of a model, USD per 1M tokens; the long_* ones apply over the threshold.
PRICE_FIELDS = FIELDS + ("cache_write_1h",)
LONG_FIELDS = tuple("long_" + f for f in PRICE_FIELDS)
THRESHOLD = "long_context_tokens"  # prompt tokens above which the long_* figures apply
OVERRIDE_FIELDS = PRICE_FIELDS + (THRESHOLD,) + LONG_FIELDS  # pricing.<model>.<field>
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
    """The shipped table with `overrides` ({model: {field: value}}) merged field by field.

    Fields are OVERRIDE_FIELDS: prices in USD per 1M tokens, and `long_context_tokens`, a
    token count. A model that is not in the shipped table may be added; it needs at least
    `input` and `output`. Figures left unset are derived (see `_complete`), and each entry
    names them in "derived" ({field: how}) so `tokenpak prices` can say where a figure
    comes from. Raises TokenpakError on a value that is not a non-negative number or a
    tier without its prices, so a typo in the config is reported at start.
    """
    table = PriceTable()
    for name, entry in _SHIPPED["models"].items():
        table[name] = _shipped_entry(name, entry)
    for raw_name, fields in (overrides or {}).items():
        name = normalise_model(raw_name)
        if not isinstance(fields, dict):
            raise TokenpakError(
                "pricing.%s must be a set of fields, not %r" % (raw_name, fields),
                hint="use pricing.%s.input / .output / .cache_read / .cache_write" % raw_name)
        known = table.get(name, {})
        # derived figures are derived again from the merged ones
        merged = {k: v for k, v in known.items()
                  if k != "derived" and k not in known.get("derived", ())}
        for field, value in fields.items():
            if field not in OVERRIDE_FIELDS:
                raise TokenpakError("unknown price field pricing.%s.%s" % (raw_name, field),
                                    hint="fields are: " + ", ".join(OVERRIDE_FIELDS))
            merged[field] = _price_value(raw_name, field, value)
        if "input" not in merged or "output" not in merged:
            raise TokenpakError("pricing.%s needs both input and output prices" % raw_name,
                                hint="set pricing.%s.input and pricing.%s.output (USD per 1M tokens)"
                                % (raw_name, raw_name))
        table[name] = _complete(raw_name, merged)
    return table


def _shipped_entry(name: str, entry: dict) -> dict:
    """A flat table entry from a prices.json entry (its "long_context" object flattened)."""
    flat = {f: float(entry[f]) for f in PRICE_FIELDS if f in entry}
    flat["provider"] = entry.get("provider", "")
    tier = entry.get("long_context")
    if tier:
        flat[THRESHOLD] = int(tier["above_tokens"])
        flat.update(("long_" + f, float(tier[f])) for f in PRICE_FIELDS if f in tier)
    return _complete(name, flat)


def _complete(name: str, entry: dict) -> dict:
    """Fill the figures a provider does not list: cache prices default to the input price
    (OpenAI and Google do not charge writes), a 1-hour write to the 5-minute write price,
    and a long-context cache figure to the short one scaled as the input price is (the
    providers' cache prices are multiples of the input price in both tiers)."""
    derived = {}
    for field, base, how in (("cache_read", "input", "the input price"),
                             ("cache_write", "input", "the input price"),
                             ("cache_write_1h", "cache_write", "the cache_write price")):
        if field not in entry:
            entry[field], derived[field] = entry[base], "defaults to " + how
    longs = [f for f in LONG_FIELDS if f in entry]
    if THRESHOLD not in entry:
        if longs:
            raise TokenpakError("pricing.%s.%s needs a threshold" % (name, longs[0]),
                                hint="set pricing.%s.%s (prompt tokens above which the "
                                     "long_* prices apply)" % (name, THRESHOLD))
    else:
        if "long_input" not in entry or "long_output" not in entry:
            raise TokenpakError("pricing.%s.%s needs long_input and long_output" % (name, THRESHOLD),
                                hint="set pricing.%s.long_input and .long_output (USD per 1M tokens)"
                                % name)
        ratio = entry["long_input"] / entry["input"] if entry["input"] else 1.0
        for field in ("cache_read", "cache_write", "cache_write_1h"):
            if "long_" + field not in entry:
                entry["long_" + field] = entry[field] * ratio
                derived["long_" + field] = "%s x long_input/input" % field
    entry["derived"] = derived
    return entry


def _price_value(model, field, value) -> float:
    try:
        price = float(value)
    except (TypeError, ValueError):
        price = -1.0
    if isinstance(value, bool) or not price >= 0.0 or price == float("inf"):
        raise TokenpakError("pricing.%s.%s must be a non-negative number, not %r" % (model, field, value),
                            hint="prices are USD per 1M tokens, e.g. 2.5; %s is a token count"
                                 % THRESHOLD)
    return int(price) if field == THRESHOLD else price


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
    """USD for `usage` (normalised, see module doc) on `model`; None when the model is unknown.

    Over the model's long-context threshold every figure is its long_* one; the 1-hour part
    of the cache writes ("cache_write_1h", never more than "cache_write") is priced apart.
    """
    prices = price_for(model, table)
    if prices is None or not usage:
        return None if prices is None else 0.0
    inp, out, read, write = (max(usage.get(f) or 0, 0) for f in FIELDS)
    write_1h = min(max(usage.get("cache_write_1h") or 0, 0), write)
    above = prices.get(THRESHOLD)
    tier = "long_" if above is not None and inp + read + write > above else ""
    return (inp * prices[tier + "input"] + out * prices[tier + "output"]
            + read * prices[tier + "cache_read"]
            + (write - write_1h) * prices[tier + "cache_write"]
            + write_1h * prices[tier + "cache_write_1h"]) / 1_000_000
