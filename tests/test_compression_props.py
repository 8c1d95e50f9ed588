"""Property tests: compression over generated OpenAI and Anthropic request bodies.

Whatever the body, the output is valid for the provider (same roles, ids, tool structure,
media, system prompt), the input is not mutated, compressing twice changes nothing, and
appending a turn leaves the compressed history byte-identical — also in Claude Code's
shape, where the cache_control marker moves to the newest block every turn.
"""

import copy
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import unmarked
from tokenpak import compression as C

PROPS = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

ESC = "\x1b[%dm"
lines = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["[worker-0] heartbeat ok", "ERROR request failed", "    return x",
                     "def f(x):", "```", "```python", "{", "}", "  \"a\": 1,", " 10%\r 50%\r100%",
                     "2026-05-09 07:29:12 status unpacked libfoo", "done   ", "a\r\n", "〃 x",
                     "x [×3]", "{\"columns\":[\"a\"],\"rows\":[[1]]}"]),
    st.integers(0, 40).map(lambda n: (ESC % (30 + n % 8)) + "colour" + ESC % 0),
)


def _repeat(pair):
    line, n = pair
    return "\n".join([line] * n)


block_text = st.lists(st.one_of(lines, st.tuples(lines, st.integers(2, 6)).map(_repeat)),
                      max_size=12).map("\n".join)
json_text = st.builds(
    lambda items, indent: json.dumps({"items": items}, indent=indent),
    st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "c"]), "n": st.integers(0, 3),
                                    "tags": st.lists(st.sampled_from(["x", "y"]), max_size=2)}),
             max_size=6),
    st.sampled_from([None, 2, 4]))
# Long blocks drawn from a small pool, so repeats (block and JSON element references) happen.
_ITEMS = [{"name": "package-%d" % i, "summary": "a library that does thing number %d " % i * 6}
          for i in range(8)]
big_texts = st.sampled_from([
    "\n".join("step %d of 40: compiled module_%d.c in %d ms" % (i, i, 3 * i) for i in range(40)),
    json.dumps({"items": _ITEMS[:5]}, indent=2),
    json.dumps({"items": _ITEMS[3:]}, indent=2),
    json.dumps(_ITEMS[2:6]),
])
texts = st.one_of(big_texts, block_text, big_texts, json_text)
ids = st.sampled_from(["id_1", "id_2", "id_3"])
cache = st.sampled_from([None, None, None, {"type": "ephemeral"}])


def _with_cache(block, marker):
    if marker is not None:
        block = dict(block, cache_control=marker)
    return block


openai_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
    st.just({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
    st.builds(lambda t, m: _with_cache({"type": "text", "text": t}, m), texts, cache),
)
openai_content = st.one_of(texts, st.lists(openai_part, max_size=3), st.none(), st.just(42))
openai_message = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c},
              st.sampled_from(["system", "developer", "user", "assistant"]), openai_content),
    st.builds(lambda i, a: {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "bash", "arguments": a}}]}, ids, texts),
    st.builds(lambda i, c: {"role": "tool", "tool_call_id": i, "content": c}, ids, openai_content),
    st.just({"role": "mystery", "content": "unknown role"}),
    st.just("not a message"),
)

anthropic_inner = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.just({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}),
)
anthropic_block = st.one_of(
    st.builds(lambda t, m: _with_cache({"type": "text", "text": t}, m), texts, cache),
    st.builds(lambda i, t: {"type": "tool_use", "id": i, "name": "bash", "input": {"cmd": t}}, ids, texts),
    st.builds(lambda i, c, m: _with_cache({"type": "tool_result", "tool_use_id": i, "content": c}, m),
              ids, st.one_of(texts, st.lists(anthropic_inner, max_size=3)), cache),
    st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": "sig"}, texts),
    st.just({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc  "}}),
    st.builds(lambda t: {"type": "text", "text": t, "citations": []}, texts),
    st.just({"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}}),
)
anthropic_message = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["user", "assistant"]),
              st.one_of(texts, st.lists(anthropic_block, max_size=4))),
    st.just({"role": "user"}),
    st.just(["odd"]),
)

levels = st.sampled_from(["strict", "hybrid", "balanced", "aggressive"])
compression_settings = st.builds(
    lambda level, code, js: C.Settings(level=level, threshold_tokens=0, preserve_code=code,
                                       preserve_json=js),
    levels, st.booleans(), st.booleans())
openai_body = st.builds(lambda m: {"model": "gpt-4o", "messages": m}, st.lists(openai_message, max_size=8))
anthropic_body = st.builds(
    lambda s, m: {"model": "claude", "max_tokens": 10, "system": s, "messages": m},
    st.one_of(texts, st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), max_size=2)),
    st.lists(anthropic_message, max_size=8))
bodies = st.one_of(st.tuples(st.just("openai"), openai_body),
                   st.tuples(st.just("anthropic"), anthropic_body))


def _skeleton(value, key=None):
    """The body with every rewritable text replaced by a placeholder: what must not change."""
    if isinstance(value, str) and key in ("text", "content"):
        return "<text>"
    if isinstance(value, dict):
        return {k: _skeleton(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_skeleton(v, key) for v in value]
    return value


@PROPS
@given(bodies, compression_settings)
def test_output_keeps_provider_shape(api_body, cfg):
    api, body = api_body
    original = copy.deepcopy(body)
    result = C.compress_request(api, body, cfg)
    assert body == original
    out = json.loads(json.dumps(result.body))
    if not result.changed:
        assert result.body is body
        return
    assert set(out) == set(original)
    assert out.get("system") == original.get("system")
    assert len(out["messages"]) == len(original["messages"])
    for new, old in zip(out["messages"], original["messages"]):
        if not isinstance(old, dict) or old.get("role") not in ("user", "assistant", "tool"):
            assert new == old  # system, developer, unknown roles and shapes
            continue
        assert _skeleton(new) == _skeleton(old)
        if isinstance(old.get("content"), list):
            for a, b in zip(new["content"], old["content"]):
                if not isinstance(b, dict) or b.get("type") not in ("text", "tool_result") \
                        or set(b) - {"type", "text", "tool_use_id", "content", "is_error",
                                     "cache_control"}:
                    assert a == b  # media, tool_use, thinking, unknown
                else:
                    assert a.get("cache_control") == b.get("cache_control")  # kept, in place


@PROPS
@given(bodies, compression_settings)
def test_idempotent(api_body, cfg):
    api, body = api_body
    once = C.compress_request(api, body, cfg).body
    twice = C.compress_request(api, once, cfg).body
    assert twice == once


@PROPS
@given(bodies, st.lists(st.one_of(openai_message, anthropic_message), min_size=1, max_size=3),
       compression_settings)
def test_prefix_stable_when_a_turn_is_appended(api_body, extra, cfg):
    api, body = api_body  # a marker in the new turn changes nothing before it
    before = C.compress_request(api, body, cfg).body
    grown = dict(body, messages=list(body["messages"]) + extra)
    after = C.compress_request(api, grown, cfg).body
    assert after["messages"][:len(body["messages"])] == before["messages"]


noisy_text = st.one_of(texts, st.text(alphabet="ab \t\r\n\x1b[]{}\":,0159m×〃-", max_size=80),
                       st.lists(lines, max_size=8).map("\r\n".join))


@PROPS
@given(noisy_text, compression_settings, st.booleans())
def test_block_transform_is_idempotent(text, cfg, is_tool):
    once = C.transform_block(text, cfg, is_tool)
    assert C.transform_block(once, cfg, is_tool) == once


# ------------------------------------------------------------------ Claude Code's shape

def _numbered(lines):
    return "\n".join("%6d\t%s" % (i, line) for i, line in enumerate(lines, 1))


_LOG = ["2026-05-09 07:29:%02d status unpacked libfoo%d" % (i // 3, i) for i in range(12)]
tool_outputs = st.one_of(
    texts,
    st.lists(st.sampled_from(_LOG + [ESC % 32 + "[worker-0] heartbeat ok" + ESC % 0]),
             min_size=2, max_size=30).map(_numbered),
    st.lists(st.sampled_from(["def f(x):", "    return x", "", "class A:", "    pass"]),
             min_size=2, max_size=12).map(_numbered),
    st.lists(lines, max_size=10).map("\n".join).map(lambda t: t + "\n\n<system-reminder>\nx\n"
                                                            "</system-reminder>"),
)
reminder = st.sampled_from(["<system-reminder>\nAvailable agent types: claude, explore.\n"
                            "</system-reminder>", "<system-reminder>\ncurrentDate: 2026-11-23\n"
                            "</system-reminder>"])


@st.composite
def claude_code_turns(draw):
    """A Claude Code conversation: reminders, thinking, tool_use, tool results, text."""
    first = [{"type": "text", "text": t} for t in draw(st.lists(reminder, max_size=2))]
    messages = [{"role": "user", "content": first + [{"type": "text", "text": draw(texts)}]}]
    for n in range(draw(st.integers(1, 5))):
        tool_id = "toolu_%d" % n
        assistant = [{"type": "text", "text": draw(st.sampled_from(["Let me check.", "Next."]))},
                     {"type": "tool_use", "id": tool_id, "name": draw(st.sampled_from(["Bash", "Read"])),
                      "input": {"command": draw(st.sampled_from(["cat log", "ls", "make"]))}}]
        if draw(st.booleans()):
            assistant.insert(0, {"type": "thinking", "thinking": draw(texts), "signature": "sig"})
        messages.append({"role": "assistant", "content": assistant})
        result = {"type": "tool_result", "tool_use_id": tool_id, "content": draw(tool_outputs)}
        messages.append({"role": "user", "content": [result]})
    return messages


def _marked(messages):
    """The messages as Claude Code sends them: the marker on the newest block only."""
    out = copy.deepcopy(messages)
    out[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return out




@PROPS
@given(claude_code_turns(), st.data(), compression_settings)
def test_claude_code_turn_is_a_byte_identical_prefix_of_the_next(messages, data, cfg):
    cut = data.draw(st.integers(1, len(messages) - 1))
    system = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    turn = {"model": "claude", "max_tokens": 10, "system": system}
    before = C.compress_request("anthropic", dict(turn, messages=_marked(messages[:cut])), cfg)
    after = C.compress_request("anthropic", dict(turn, messages=_marked(messages)), cfg)
    old = unmarked(before.body["messages"])
    new = unmarked(after.body["messages"])
    assert new[:cut] == old
    old_bytes, new_bytes = json.dumps(old).encode(), json.dumps(new).encode()
    assert new_bytes.startswith(old_bytes[:-1])
    assert after.body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert after.body["system"] == system
