"""A request's JSON body parsed once, with where each part sits in the client's text.

Why. A Claude Code turn is 250-350 kB of JSON, and all but its newest messages are the
ones the previous turn sent. Dumping the whole (compressed) body again to forward it cost
~3 ms, and dumping it once more, key-sorted, for the cache key ~1.4 ms: more than the rest
of the proxy together. So the body is parsed once, remembering the span of every top-level
field and of every conversation item (`messages`, or Responses' `input`) in the client's
text, and `serialise` rebuilds what goes upstream from those spans: a field or message
that compression and footer stripping left alone (the very same object, as they copy on
write) is the client's own text again, and only what changed is dumped.

What upstream receives parses to exactly the value `json.dumps(new_body)` would have sent;
only whitespace, escapes and number spellings may differ, as the client wrote them. The
cache key is a hash over the same per-field bytes (cache.key_from_fields), so no part of
the body is serialised twice.

Anything this parser does not follow (a top-level array, invalid JSON, a non-UTF-8
encoding) falls back to `json.loads`, which then accepts or rejects the body as before; such
a body has no spans and is dumped whole when it changes.

Values an agent resends every turn (its system prompt, tool definitions, every earlier
message) are not parsed again: big objects, arrays and strings are memoised by their text
(`_known`). A candidate is found by the value's first characters and taken only if the
body holds its whole text at that place; such a value is self-delimiting, so the scanner
would have read exactly that text and made an equal value. The value is then the same
object for every request that sends it, which is safe because nothing in tokenpak changes
a request in place (compression and footer stripping copy on write), and its UTF-8 bytes
are at hand for forwarding and hashing without encoding them again.
"""

import json
import re
import sys
from json.decoder import scanstring

from .tokens import LRU

# The fields whose list items get spans of their own: the conversation.
ITEM_FIELDS = ("messages", "input")

_DECODER = json.JSONDecoder()
_scan = _DECODER.scan_once  # the C scanner json.loads uses: same values, same errors
_SPACE = re.compile(r"[ \t\n\r]*")
_ERRORS = (ValueError, IndexError, StopIteration, RecursionError, UnicodeDecodeError)
KNOWN_MIN_CHARS = 2048      # smaller values parse faster than they are looked up
KNOWN_PROBE = 160           # how many first characters find a candidate
_known = LRU(4096, max_weight=16 << 20)  # bytes of text held  # {first characters: (text, value, UTF-8 bytes)}


class Body:
    """A parsed JSON object and, when known, the spans of its parts in `text`.

    `fields`: {name: (start, end)} of each top-level value; `items`: {field name: [(start,
    end)]} of each item of a top-level conversation list. Offsets index `text` (a str).
    """

    __slots__ = ("value", "text", "fields", "items", "encoded")

    def __init__(self, value, text=None, fields=None, items=None, encoded=None):
        self.value, self.text, self.fields, self.items = value, text, fields, items or {}
        self.encoded = encoded or {}  # {start: UTF-8 bytes} of remembered values

    def raw(self, span):
        start, end = span
        data = self.encoded.get(start)
        return data if data is not None else \
            self.text[start:end].encode("utf-8", "surrogatepass")


def parse(raw: bytes) -> Body:
    """The body's JSON value with spans; raises as json.loads does on invalid JSON."""
    try:
        text = raw.decode("utf-8", "surrogatepass")  # what json.loads does for UTF-8 bytes
        if text.startswith("\ufeff"):
            raise ValueError("BOM")  # json.loads has its own rules for those: leave it to it
        return _top(text, {})
    except _ERRORS:
        return Body(json.loads(raw))


def _top(text, encoded):
    i = _SPACE.match(text).end()
    if text[i] != "{":
        raise ValueError("not an object")
    value, fields, items = {}, {}, {}
    i = _SPACE.match(text, i + 1).end()
    if text[i] == "}":
        i += 1
    else:
        while True:
            if text[i] != '"':
                raise ValueError("expected a name")
            name, i = scanstring(text, i + 1)
            i = _SPACE.match(text, i).end()
            if text[i] != ":":
                raise ValueError("expected ':'")
            start = i = _SPACE.match(text, i + 1).end()
            if name in ITEM_FIELDS and text[i] == "[":
                value[name], items[name], i = _array(text, i, encoded)
            else:
                value[name], i = _value(text, i, encoded)
                items.pop(name, None)  # a repeated name: the last value wins, as in json
            fields[name] = (start, i)
            i = _SPACE.match(text, i).end()
            if text[i] == ",":
                i = _SPACE.match(text, i + 1).end()
            elif text[i] == "}":
                i += 1
                break
            else:
                raise ValueError("expected ',' or '}'")
    if _SPACE.match(text, i).end() != len(text):
        raise ValueError("extra data")
    return Body(value, text, fields, items, encoded)


def _value(text, i, encoded):
    """(value, end) of the JSON value at text[i], remembered if big (see the docstring)."""
    if text[i] not in '{["':
        return _scan(text, i)
    probe = text[i:i + KNOWN_PROBE]
    known = _known.get(probe)
    if known is not None and text.startswith(known[0], i):
        encoded[i] = known[2]
        return known[1], i + len(known[0])
    value, end = _scan(text, i)
    if end - i >= KNOWN_MIN_CHARS:
        raw = text[i:end]
        data = raw.encode("utf-8", "surrogatepass")
        encoded[i] = data
        _known.put(probe, (raw, value, data), sys.getsizeof(raw) + len(data))
    return value, end


def _array(text, i, encoded):
    """(list, [(start, end)] of its items, end offset) of the array at text[i] == "["."""
    values, spans = [], []
    i = _SPACE.match(text, i + 1).end()
    if text[i] == "]":
        return values, spans, i + 1
    while True:
        start = i
        value, i = _value(text, i, encoded)
        values.append(value)
        spans.append((start, i))
        i = _SPACE.match(text, i).end()
        if text[i] == ",":
            i = _SPACE.match(text, i + 1).end()
        elif text[i] == "]":
            return values, spans, i + 1
        else:
            raise ValueError("expected ',' or ']'")


def dump(value) -> bytes:
    """Compact JSON bytes, non-ASCII kept; a lone surrogate (valid in JSON text, not in
    UTF-8) is escaped instead, so the result is always valid UTF-8 JSON."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def serialise(body: Body, new: dict):
    """(bytes to forward, [(field name, its bytes)]) for `new`, a copy-on-write change of
    body.value: every part of `new` that is still the parsed object itself is the client's
    text again; only what changed is dumped."""
    fields = []
    old = body.value
    for name, value in new.items():
        span = body.fields.get(name) if body.text is not None else None
        if span is None:
            piece = dump(value)
        elif value is old.get(name):
            piece = body.raw(span)
        elif name in body.items and isinstance(value, list):
            piece = _items(body, old[name], body.items[name], value)
        else:
            piece = dump(value)
        fields.append((name, piece))
    out = b",".join(dump(name) + b":" + piece for name, piece in fields)
    return b"{" + out + b"}", fields


def _items(body, old, spans, new):
    """A changed conversation list: unchanged items (same index, same object) as sent."""
    out = []
    for i, item in enumerate(new):
        if i < len(old) and item is old[i]:
            out.append(body.raw(spans[i]))
        else:
            out.append(dump(item))
    return b"[" + b",".join(out) + b"]"


def fields_of(body: Body):
    """[(field name, its bytes)] of an unchanged body, for the cache key."""
    if body.text is None:
        return [(name, dump(value)) for name, value in body.value.items()]
    return [(name, body.raw(body.fields[name])) for name in body.value]
