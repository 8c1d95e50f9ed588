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

The parser walks the bytes, not a decoded copy: decoding a 250 kB body that holds one
emoji (the Claude Code requests in tests/corpus/agents do) makes a 1 MB UCS-4 string,
and cost more than anything else here. Only values it has not seen are decoded, each
exactly (its end found first: a short value in a small window, a long one by a C-speed
scan of its strings and brackets), and handed to the same C scanner json.loads uses. Values an agent resends every
turn (its system prompt, tool definitions, every earlier message) are not decoded or
parsed again: big objects, arrays and strings are remembered by their bytes (`_known`). A
candidate is found by the value's first bytes and taken only if the body holds its whole
text at that place; such a value is self-delimiting, so the scanner would have read
exactly that text and made an equal value. It is then the same object for every request
that sends it, which is safe because nothing in tokenpak changes a request in place
(compression and footer stripping copy on write).
"""

import json
import re

from .tokens import LRU

# The fields whose list items get spans of their own: the conversation.
ITEM_FIELDS = ("messages", "input")

_scan = json.JSONDecoder().scan_once  # the C scanner json.loads uses: same values, errors
_SPACE = re.compile(rb"[ \t\n\r]*")
# A JSON string (unrolled, so it runs at C speed and cannot backtrack), or a bracket.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_ERRORS = (ValueError, IndexError, StopIteration, RecursionError, UnicodeDecodeError)
_OPEN, _CLOSE, _QUOTE = frozenset(b"[{"), frozenset(b"]}"), ord('"')
SMALL_WINDOW = 256          # bytes decoded first for a value not seen before
KNOWN_MIN_BYTES = 2048      # smaller values parse faster than they are looked up
KNOWN_PROBE = 160           # how many first bytes find a candidate
_known = LRU(4096, max_weight=16 << 20)  # {first bytes: (bytes, value)}, weighed in bytes


class Body:
    """A parsed JSON object and, when known, where its parts are in `data` (the raw body).

    `fields`: {name: (start, end)} of each top-level value; `items`: {field name: [(start,
    end)]} of each item of a top-level conversation list; byte offsets. No `data` (the
    body went through json.loads): no spans.
    """

    __slots__ = ("value", "data", "fields", "items", "known")

    def __init__(self, value, data=None, fields=None, items=None, known=None):
        self.value, self.data, self.fields, self.items = value, data, fields or {}, items or {}
        self.known = known or {}  # {start: the remembered bytes object of the value there}

    def raw(self, span):
        return self.data[span[0]:span[1]]


def parse(raw: bytes) -> Body:
    """The body's JSON value with spans; raises as json.loads does on invalid JSON."""
    try:
        if json.detect_encoding(raw) != "utf-8":
            raise ValueError("not plain UTF-8")  # a BOM, UTF-16/32: json.loads' own rules
        return _top(raw, {})
    except _ERRORS:
        return Body(json.loads(raw))


def _top(raw, known):
    i = _SPACE.match(raw).end()
    if raw[i] != ord("{"):
        raise ValueError("not an object")
    value, fields, items = {}, {}, {}
    i = _SPACE.match(raw, i + 1).end()
    if raw[i] == ord("}"):
        i += 1
    else:
        while True:
            if raw[i] != _QUOTE:
                raise ValueError("expected a name")
            name, i = _decode(raw, i)
            i = _SPACE.match(raw, i).end()
            if raw[i] != ord(":"):
                raise ValueError("expected ':'")
            start = i = _SPACE.match(raw, i + 1).end()
            if name in ITEM_FIELDS and raw[i] == ord("["):
                value[name], items[name], i = _array(raw, i, known)
            else:
                value[name], i = _value(raw, i, known)
                items.pop(name, None)  # a repeated name: the last value wins, as in json
            fields[name] = (start, i)
            i = _SPACE.match(raw, i).end()
            if raw[i] == ord(","):
                i = _SPACE.match(raw, i + 1).end()
            elif raw[i] == ord("}"):
                i += 1
                break
            else:
                raise ValueError("expected ',' or '}'")
    if _SPACE.match(raw, i).end() != len(raw):
        raise ValueError("extra data")
    return Body(value, raw, fields, items, known)


def _array(raw, i, known):
    """(list, [(start, end)] of its items, end offset) of the array at raw[i] == "["."""
    values, spans = [], []
    i = _SPACE.match(raw, i + 1).end()
    if raw[i] == ord("]"):
        return values, spans, i + 1
    while True:
        start = i
        value, i = _value(raw, i, known)
        values.append(value)
        spans.append((start, i))
        i = _SPACE.match(raw, i).end()
        if raw[i] == ord(","):
            i = _SPACE.match(raw, i + 1).end()
        elif raw[i] == ord("]"):
            return values, spans, i + 1
        else:
            raise ValueError("expected ',' or ']'")


def _value(raw, i, known):
    """(value, end) of the JSON value at raw[i], remembered if big (see the docstring);
    known[i] is then the remembered bytes, one object however often it is sent."""
    if raw[i] not in _OPEN and raw[i] != _QUOTE:
        return _decode(raw, i)
    probe = raw[i:i + KNOWN_PROBE]
    hit = _known.get(probe)
    if hit is not None and raw.startswith(hit[0], i):
        known[i] = hit[0]
        return hit[1], i + len(hit[0])
    value, end = _decode(raw, i)
    if end - i >= KNOWN_MIN_BYTES:
        known[i] = raw[i:end]
        _known.put(probe, (known[i], value), end - i)
    return value, end


def _decode(raw, i):
    """(value, end) of the JSON value at raw[i], decoding only its own bytes."""
    stop = min(len(raw), i + SMALL_WINDOW)
    while stop < len(raw) and 0x80 <= raw[stop] < 0xC0:
        stop -= 1  # never cut a UTF-8 sequence
    text = raw[i:stop].decode("utf-8", "surrogatepass")
    try:
        value, end = _scan(text, 0)
        if end < len(text) or stop == len(raw):
            return value, i + (end if text.isascii() else
                               len(text[:end].encode("utf-8", "surrogatepass")))
    except (StopIteration, ValueError):
        if stop == len(raw):
            raise ValueError("invalid JSON value")
    # Longer than the window: find its end in the bytes, then decode exactly that.
    stop = _end(raw, i)
    text = raw[i:stop].decode("utf-8", "surrogatepass")
    value, end = _scan(text, 0)
    if end != len(text):
        raise ValueError("value ends early")
    return value, stop


def _end(raw, i):
    """End offset of the string, object or array starting at raw[i] (not validated: the
    scanner does that)."""
    if raw[i] == _QUOTE:
        match = _STRING.match(raw, i)
        if match is None:
            raise ValueError("unterminated string")
        return match.end()
    if raw[i] not in _OPEN:
        raise ValueError("a long number or literal")
    depth = 0
    for match in _TOKEN.finditer(raw, i):
        token = match.group()
        if token[0] in _OPEN:
            depth += 1
        elif token[0] in _CLOSE:
            depth -= 1
            if depth == 0:
                return match.end()
    raise ValueError("unterminated value")


def dump(value) -> bytes:
    """Compact JSON bytes, non-ASCII kept; a lone surrogate (valid in JSON text, not in
    UTF-8) is escaped instead, so the result is always valid UTF-8 JSON."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def serialise(body: Body, new: dict, edits=None):
    """(bytes to forward, [(field name, its bytes)]) for `new`, a copy-on-write change of
    body.value: every part of `new` that is still the parsed object itself is the client's
    text again; only what changed is dumped.

    `edits` ({item index: ((path, new text), ...)}) may say that a conversation item of
    `new` is the parsed one with exactly those strings replaced (compression's changes):
    then its dump is remembered by (the item's remembered bytes, the edits), so a message
    compressed in every turn is not dumped again every turn either."""
    fields = []
    old = body.value
    for name, value in new.items():
        span = body.fields.get(name) if body.data is not None else None
        if span is None:
            piece = dump(value)
        elif value is old.get(name):
            piece = body.raw(span)
        elif name in body.items and isinstance(value, list):
            piece = _items(body, old[name], body.items[name], value, edits or {})
        else:
            piece = dump(value)
        fields.append((name, piece))
    out = b",".join(dump(name) + b":" + piece for name, piece in fields)
    return b"{" + out + b"}", fields


def _items(body, old, spans, new, edits):
    """A changed conversation list: unchanged items (same index, same object) as sent."""
    out = []
    for i, item in enumerate(new):
        if i < len(old) and item is old[i]:
            out.append(body.raw(spans[i]))
            continue
        source = body.known.get(spans[i][0]) if i < len(old) and i in edits else None
        if source is None:
            out.append(dump(item))
            continue
        # Keyed by objects the memos hand out again each turn (the remembered bytes, the
        # compressed texts): their hashes are cached, so a hit costs no pass over the text.
        key = (source, edits[i])
        data = _dumped.get(key)
        if data is None:
            data = dump(item)
            _dumped.put(key, data, len(data) + len(source))
        out.append(data)
    return b"[" + b",".join(out) + b"]"


_dumped = LRU(4096, max_weight=16 << 20)  # {(item bytes, edits): its new JSON bytes}


def fields_of(body: Body):
    """[(field name, its bytes)] of an unchanged body, for the cache key."""
    if body.data is None:
        return [(name, dump(value)) for name, value in body.value.items()]
    return [(name, body.raw(body.fields[name])) for name in body.value]
