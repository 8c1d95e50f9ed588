"""The corpus contract: every realistic case keeps its needles and verbatim blocks.

tests/corpus/*.json (shipped copies of ../shared/corpus) are request bodies with `needles`
(strings that must survive compression) and `verbatim` (blocks that must arrive
byte-identical); tests/corpus/agents/*.json are Claude Code requests with their `previous`
turn, for the property that protects the provider's prompt cache: turn N is forwarded as a
byte-identical prefix of turn N+1, wherever the `cache_control` marker sits.
"""

import copy
import json
from pathlib import Path

import pytest

from helpers import unmarked
from tokenpak import compression as C
from tokenpak import tokens

CORPUS = Path(__file__).resolve().parent / "corpus"
# Claude Code's exact request shape: its system prompt and 24 tools, thinking,
# context_management, system-reminder blocks, the cache_control marker on the newest block,
# and each case's `previous` turn.
AGENTS = sorted((CORPUS / "agents").glob("*.json"))
CASES = sorted(CORPUS.glob("*.json")) + AGENTS
assert CASES and AGENTS, "tests/corpus is missing"


def _load(path):
    return json.loads(path.read_text())


def _strings(value):
    """Every string in a decoded JSON value (what the provider reads)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("level", ["strict", "hybrid"])
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_needles_and_verbatim_survive(path, level):
    case = _load(path)
    body = case["body"]
    original = copy.deepcopy(body)
    result = C.compress_request(case["api"], body, C.Settings(level=level))
    assert body == original  # the input is never mutated
    forwarded = json.loads(json.dumps(result.body))
    text = "\n".join(_strings(forwarded))
    for needle in case["needles"]:
        assert needle in text, needle
    for block in case["verbatim"]:
        assert any(block in s for s in _strings(forwarded)), block[:60]
    assert forwarded.get("system") == original.get("system")
    assert forwarded.get("tools") == original.get("tools")
    assert [m.get("role") for m in forwarded["messages"]] == [m.get("role") for m in original["messages"]]


@pytest.mark.parametrize("path", [p for p in CASES if "small" in p.stem], ids=lambda p: p.stem)
def test_small_prompts_are_forwarded_untouched(path):
    case = _load(path)
    result = C.compress_request(case["api"], case["body"], C.Settings(level="strict"))
    assert result.body is case["body"] and not result.changed


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_idempotent_and_prefix_stable_on_corpus(path):
    case = _load(path)
    settings = C.Settings(threshold_tokens=0)
    once = C.compress_request(case["api"], case["body"], settings).body
    assert C.compress_request(case["api"], once, settings).body is once
    messages = case["body"]["messages"]
    for cut in range(1, len(messages)):
        prefix = dict(case["body"], messages=messages[:cut])
        head = C.compress_request(case["api"], prefix, settings).body["messages"]
        assert head == once["messages"][:cut]


def test_hybrid_meets_the_savings_target():
    """>= 35% over agent-session, json-tools and code-review, by exact o200k counts."""
    if tokens.backend() == "estimator":
        pytest.skip("savings are measured with the exact tokenizer")
    before = after = 0
    for path in CASES:
        case = _load(path)
        if not case["name"].startswith(("agent-session", "json-tools", "code-review")):
            continue
        result = C.compress_request(case["api"], case["body"], C.Settings())
        before += result.tokens_before
        after += result.tokens_after
    assert before and (before - after) / before >= 0.35


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_aggressive_keeps_the_provider_shape(path):
    case = _load(path)
    result = C.compress_request(case["api"], case["body"], C.Settings(level="aggressive"))
    out, original = result.body, case["body"]
    assert len(out["messages"]) == len(original["messages"])
    for new, old in zip(out["messages"], original["messages"]):
        assert new.get("role") == old.get("role")
        assert new.get("tool_calls") == old.get("tool_calls")
        assert new.get("tool_call_id") == old.get("tool_call_id")
        if isinstance(old.get("content"), list):
            assert [b.get("type") for b in new["content"]] == [b.get("type") for b in old["content"]]
            for a, b in zip(new["content"], old["content"]):
                if b.get("type") == "tool_use":
                    assert a == b
    assert result.tokens_after <= result.tokens_before




def _markers(value, path=()):
    """Paths of every cache_control field, and its value."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "cache_control":
                yield path, item
            else:
                yield from _markers(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _markers(item, path + (i,))


@pytest.mark.parametrize("level", ["strict", "hybrid", "aggressive"])
@pytest.mark.parametrize("path", AGENTS, ids=lambda p: p.stem)
def test_previous_turn_is_forwarded_as_a_byte_identical_prefix(path, level):
    case = _load(path)
    settings = C.Settings(level=level)
    before = C.compress_request(case["api"], case["previous"], settings)
    after = C.compress_request(case["api"], case["body"], settings)
    assert before.changed and after.changed  # Claude Code's marker no longer stops compression
    old = unmarked(before.body["messages"])
    new = unmarked(after.body["messages"])
    assert len(new) > len(old)
    for i, message in enumerate(old):
        assert new[i] == message, i
    old_bytes = json.dumps(old).encode()
    new_bytes = json.dumps(new).encode()
    assert new_bytes.startswith(old_bytes[:-1])  # all but the closing "]"
    for key in ("system", "tools", "thinking", "context_management", "metadata"):
        assert after.body[key] == case["body"][key]
        assert before.body[key] == after.body[key]


@pytest.mark.parametrize("path", AGENTS, ids=lambda p: p.stem)
def test_claude_code_shape_keeps_markers_thinking_and_tool_inputs(path):
    case = _load(path)
    body = case["body"]
    out = C.compress_request(case["api"], body, C.Settings()).body
    assert list(_markers(out)) == list(_markers(body))  # every marker, where it was
    newest = out["messages"][-1]["content"][-1]
    assert newest["content"] != body["messages"][-1]["content"][-1]["content"]  # compressed
    for new, old in zip(out["messages"], body["messages"]):
        for a, b in zip(new["content"], old["content"]):
            if b["type"] != "tool_result" and b["type"] != "text":
                assert a == b  # thinking, tool_use
        if any(b["type"] == "thinking" for b in old["content"]):
            assert new == old  # the whole turn holding a signed thinking block


def test_agents_corpus_saves_tokens():
    """Claude Code sessions used to save 0% (the marker froze everything); hybrid, defaults."""
    if tokens.backend() == "estimator":
        pytest.skip("savings are measured with the exact tokenizer")
    before = after = 0
    for path in AGENTS:
        case = _load(path)
        result = C.compress_request(case["api"], case["body"], C.Settings())
        assert result.tokens_after < 0.85 * result.tokens_before, path.stem
        before += result.tokens_before
        after += result.tokens_after
    assert (before - after) / before >= 0.28
