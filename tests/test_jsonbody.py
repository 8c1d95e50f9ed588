"""Parse once, forward by splicing (jsonbody.py), and the cache key from forwarded bytes.

What upstream receives must parse to exactly the body tokenpak forwarded before it kept
the client's text (json.dumps of the compressed body), for every corpus request, mode and
client spelling; messages left alone are the client's bytes; the cache key changes with
any changed message and not with fields that cannot change the answer.
"""

import collections
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpak import compression as C
from tokenpak import exchange, footer, jsonbody
from tokenpak.cache import cache_key, key_from_fields
from tokenpak.providers import Route
from tokenpak.runtime import CachePolicy

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = sorted(CORPUS.glob("*.json")) + sorted((CORPUS / "agents").glob("*.json"))
# How clients spell the same body: Python's default, JSON.stringify's (compact, raw UTF-8),
# and a pretty-printed one.
SPELLINGS = {
    "python": lambda body: json.dumps(body).encode(),
    "compact": lambda body: json.dumps(body, ensure_ascii=False,
                                       separators=(",", ":")).encode("utf-8"),
    "indented": lambda body: json.dumps(body, ensure_ascii=False, indent=2).encode("utf-8"),
}


def _api(case):
    return case.get("api") or ("anthropic" if case["path"].startswith("/v1/messages")
                               else "openai")


def _forward(api, raw, settings):
    """(what tokenpak forwards now, what the old code forwarded: json.dumps of the body)."""
    parsed = jsonbody.parse(raw)
    assert parsed.data is not None  # the span parser took it, no fallback
    assert parsed.value == json.loads(raw)
    body = footer.strip_history(api, parsed.value, raw)
    result = C.compress_request(api, body, settings)
    body = result.body
    if body is parsed.value:
        return raw, raw
    old = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    new = jsonbody.serialise(parsed, body)[0]
    ex = exchange.Exchange("POST", "/", [], raw)
    ex.compressed = result
    for _ in range(2):  # the dumps of edited messages, remembered, then reused
        assert jsonbody.serialise(parsed, body, exchange.edits(ex, parsed.value))[0] == new
    return new, old


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("level", ["strict", "hybrid", "aggressive"])
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_forwarded_body_parses_to_what_was_forwarded_before(path, level, spelling):
    case = json.loads(path.read_text())
    raw = SPELLINGS[spelling](case["body"])
    new, old = _forward(_api(case), raw, C.Settings(level=level, threshold_tokens=500))
    assert json.loads(new) == json.loads(old)
    new.decode("utf-8")  # valid UTF-8


@pytest.mark.parametrize("path", sorted((CORPUS / "agents").glob("*.json")), ids=lambda p: p.stem)
def test_previous_turn_messages_are_forwarded_byte_identical(path):
    """Turn N's forwarded messages are turn N+1's, byte for byte, wherever neither turn
    carries a cache_control marker (the one field Claude Code moves between turns)."""
    case = json.loads(path.read_text())
    settings = C.Settings(level="hybrid")
    turns = []
    for body in (case["previous"], case["body"]):
        raw = SPELLINGS["compact"](body)
        parsed = jsonbody.parse(raw)
        new = C.compress_request("anthropic", parsed.value, settings).body
        forwarded = jsonbody.parse(jsonbody.serialise(parsed, new)[0])
        turns.append([forwarded.raw(span) for span in forwarded.items["messages"]])
    before, after = turns
    compared = 0
    for i, item in enumerate(before):
        if b'"cache_control"' not in item and b'"cache_control"' not in after[i]:
            assert after[i] == item, i
            compared += 1
    assert compared >= len(before) - 2


def test_unchanged_parts_are_the_clients_own_text():
    raw = ('{ "model" : "claude-x", "tools": [ {"name": "t", "n": 1.50} ],\n'
           ' "messages": [ {"role": "user", "content": "caf\\u00e9  "}, '
           '{"role": "user", "content": "b"} ] }').encode()
    parsed = jsonbody.parse(raw)
    messages = list(parsed.value["messages"])
    messages[1] = {"role": "user", "content": "B"}
    new = dict(parsed.value, messages=messages, extra=True)
    out, fields = jsonbody.serialise(parsed, new)
    assert out == (b'{"model":"claude-x","tools":[ {"name": "t", "n": 1.50} ],'
                   b'"messages":[{"role": "user", "content": "caf\\u00e9  "},'
                   b'{"role":"user","content":"B"}],"extra":true}')
    assert json.loads(out) == new
    assert dict(fields)["tools"] == b'[ {"name": "t", "n": 1.50} ]'


@pytest.mark.parametrize("raw", [
    ('{"messages": [{"c": "%s"}], "s": "%s", "n": [%s]}' % (
        "é🤖\\\" ]}{" * 300, "x" * 254 + "é", "1" * 300)).encode("utf-8"),
    ('{"s": "%s"}' % ("a" * 253 + "é")).encode("utf-8"),
    b'{"a": 1, "a": 2}', b'{"messages": [1], "messages": "x"}', b'{"messages": [1, 2], "x": 1}',
    b' {} ', b'{"messages": []}', b'{"s": "\\ud800"}', b'{"n": NaN, "i": -Infinity}',
])
def test_parse_gives_what_json_loads_gives(raw):
    parsed = jsonbody.parse(raw)
    assert json.dumps(parsed.value) == json.dumps(json.loads(raw))
    out = jsonbody.serialise(parsed, dict(parsed.value, z=0))[0]
    assert json.dumps(json.loads(out)) == json.dumps(dict(json.loads(raw), z=0))


@pytest.mark.parametrize("raw", [b'{"a": 1', b'{"a": 1} x', b'{"a" 1}', b'{"a": [1,]}',
                                 b'{"messages": [1 2]}', b"[1]", b'{"a": "\x01"}',
                                 b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"),
                                 b'{"a": "' + b"x" * 600 + b'}', b'{"a": [' + b"[" * 400 + b"]",
                                 b'{"a": "' + b"x" * 600 + b'\x01"}', b'{"a": "\xff"}'])
def test_parse_rejects_or_falls_back_like_json_loads(raw):
    try:
        expected = json.loads(raw)
    except ValueError:
        with pytest.raises(ValueError):
            jsonbody.parse(raw)
    else:
        assert jsonbody.parse(raw).value == expected


def test_lone_surrogate_in_a_changed_part_is_forwarded_as_valid_utf8():
    parsed = jsonbody.parse(b'{"messages": [{"role": "user", "content": "x"}]}')
    new = dict(parsed.value, messages=[{"role": "user", "content": "\ud800 y"}])
    out = jsonbody.serialise(parsed, new)[0]
    out.decode("utf-8")
    assert json.loads(out) == new


def _key(raw, headers=None):
    parsed = jsonbody.parse(raw)
    return key_from_fields("anthropic", "/v1/messages", jsonbody.fields_of(parsed), headers)


def test_key_from_forwarded_bytes():
    body = {"model": "claude-x", "max_tokens": 10,
            "messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]}
    base = _key(json.dumps(body).encode())
    assert _key(json.dumps(body).encode()) == base  # same request, same key
    reordered = dict(reversed(list(body.items())))
    assert _key(json.dumps(reordered).encode()) == base  # top-level order does not count
    for extra in ({"stream": True}, {"metadata": {"user_id": "u"}}, {"user": "a"}):
        assert _key(json.dumps(dict(body, **extra)).encode()) == base
    changed = dict(body, messages=[body["messages"][0], {"role": "user", "content": "tw0"}])
    assert _key(json.dumps(changed).encode()) != base
    assert _key(json.dumps(dict(body, max_tokens=11)).encode()) != base
    assert _key(json.dumps(body).encode(), {"anthropic-beta": "x"}) != base
    # Field framing: moving bytes from one field to the next is a different key.
    assert key_from_fields("p", "/", [("a", b'"xy"'), ("b", b'"z"')]) != \
        key_from_fields("p", "/", [("a", b'"x'), ("b", b'y""z"')])
    assert cache_key("p", "/", {"a": 1}) == key_from_fields("p", "/", [("a", b"1")])


class _Store:
    """prepare() only asks whether there is a store."""


_Rt = collections.namedtuple("Rt", "compression cache")


def _prepare(raw, level="hybrid", cache=True):
    rt = _rt(level, cache)
    ex = exchange.Exchange("POST", "/v1/messages", [("x-api-key", "sk-ant-test"),
                                                    ("anthropic-version", "2023-06-01")], raw)
    ex.route = Route("anthropic", "http://upstream/v1/messages", "upstream", "anthropic")
    exchange.prepare(rt, ex)
    return ex


def _rt(level, cache):
    """What prepare() reads of a runtime snapshot: compression settings, cache policy."""
    return _Rt(C.Settings(level=level),
              CachePolicy(_Store() if cache else None, b"s" * 32, False, False))


def test_prepare_keys_a_changed_message_apart_and_forwards_the_same_value():
    case = json.loads((CORPUS / "agents" / "019-claude-code-19.json").read_text())
    body = case["body"]
    raw = SPELLINGS["compact"](body)
    first, again = _prepare(raw), _prepare(raw)
    assert first.compressed.changed
    assert first.forward_body == again.forward_body and first.key == again.key
    expected = json.dumps(first.compressed.body, ensure_ascii=False).encode("utf-8")
    assert json.loads(first.forward_body) == json.loads(expected)
    messages = list(body["messages"])
    messages[2] = json.loads(json.dumps(messages[2]).replace("a", "b", 1))
    assert _prepare(SPELLINGS["compact"](dict(body, messages=messages))).key != first.key
    assert _prepare(SPELLINGS["compact"](dict(body, max_tokens=7))).key != first.key
    # No cache: the same body is forwarded.
    assert _prepare(raw, cache=False).forward_body == first.forward_body


def test_a_remembered_value_is_reused_only_where_the_body_holds_all_of_it():
    """Big values are remembered by their first bytes: a body that starts a value the
    same way but goes on differently gets its own value, never the remembered one."""
    long = "x" * (jsonbody.KNOWN_MIN_BYTES + 10)
    first = {"role": "user", "content": [{"type": "text", "text": long}]}
    bodies = [
        {"messages": [first], "system": long},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": long + "y"}]}],
         "system": long + "z"},
        {"messages": [dict(first, extra=1)], "system": long[:-1]},
        {"messages": [first, first], "system": long},
    ]
    for body in bodies + bodies:
        for spelling in ("python", "compact"):
            raw = SPELLINGS[spelling](body)
            parsed = jsonbody.parse(raw)
            assert parsed.value == body
            assert jsonbody.fields_of(parsed) == [
                (name, raw[start:end]) for name, (start, end) in parsed.fields.items()]
            items = [parsed.raw(span) for span in parsed.items["messages"]]
            assert [json.loads(item) for item in items] == body["messages"]
    again = jsonbody.parse(SPELLINGS["compact"](bodies[0])).value
    assert again["system"] is jsonbody.parse(SPELLINGS["compact"](bodies[3])).value["system"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    | st.sampled_from(["]}[{\\\"", "é🤖" * 90, "x" * 300]),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["messages", "input", "model", "tools", "x"]), _JSON,
                       max_size=5),
       st.sampled_from(sorted(SPELLINGS)))
def test_parse_agrees_with_json_loads(body, spelling):
    raw = SPELLINGS[spelling](body)
    parsed = jsonbody.parse(raw)
    assert parsed.data is not None
    assert json.dumps(parsed.value) == json.dumps(json.loads(raw))
    for name, span in parsed.fields.items():
        assert json.dumps(json.loads(parsed.raw(span))) == json.dumps(parsed.value[name])
    for name, spans in parsed.items.items():
        assert [json.loads(parsed.raw(span)) for span in spans] == parsed.value[name]
