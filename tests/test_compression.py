"""Unit tests for tokenpak.compression: settings, the per-block pipeline, the walker, reports.

The pure text transforms (tokenpak.transforms) are tested in test_transforms.py.
"""

import copy
import json

import pytest

from tokenpak import compression as C
from tokenpak import transforms as T
from tokenpak import tokens

HYBRID0 = C.Settings(threshold_tokens=0)
STRICT0 = C.Settings(level="strict", threshold_tokens=0)
AGGRESSIVE = C.Settings(level="aggressive")

LOG_LINE = "\x1b[32m[worker-1] heartbeat ok queue=0 lag=0ms\x1b[0m"
PRETTY = json.dumps({"items": [{"name": "pkg%d" % i, "version": "1.%d" % i, "files": i,
                                "summary": "a package with a fairly long summary %d" % i}
                               for i in range(6)]}, indent=4)


# ------------------------------------------------------------------ settings

def test_settings_normalise_level_and_reject_unknown():
    assert C.Settings(level="balanced").level == "hybrid"
    assert C.Settings(level=" Strict ").level == "strict"
    with pytest.raises(ValueError):
        C.Settings(level="extreme")


# ------------------------------------------------------------------ per-block pipeline

def test_transform_block_keeps_fenced_code_exact():
    code = "```python\ndef f():   \n    return 1   \n```"
    text = "Look at this:   \n" + code + "\nThanks   "
    out = C.transform_block(text, HYBRID0)
    assert code in out
    assert out == "Look at this:\n" + code + "\nThanks"
    loose = C.transform_block(text, C.Settings(preserve_code=False))
    assert "def f():\n" in loose


def test_transform_block_leaves_code_like_output_and_honours_preserve_json():
    listing = "\n".join("%6d\t    value = compute(%d)   " % (i, i) for i in range(1, 30))
    assert C.transform_block(listing, HYBRID0, is_tool=True) == listing
    assert C.transform_block(PRETTY, C.Settings(preserve_json=True)) == PRETTY
    assert C.transform_block(PRETTY, STRICT0) == T.minify_json(PRETTY)


def test_transform_block_reports_each_step():
    seen = []
    text = "\n".join([LOG_LINE + "   "] * 4)
    C.transform_block(text, HYBRID0, observe=lambda name, before, after: seen.append(name))
    assert seen == ["ansi", "whitespace", "repeats"]


def test_transform_block_elides_only_tool_output_in_aggressive():
    text = "\n".join("step %05d finished without problems" % i for i in range(2000))
    assert "elided" in C.transform_block(text, AGGRESSIVE, is_tool=True)
    assert "elided" not in C.transform_block(text, AGGRESSIVE, is_tool=False)
    assert "elided" not in C.transform_block(text, HYBRID0, is_tool=True)


# ------------------------------------------------------------------ requests

def _log(n=60, tag="a"):
    steps = ["%s: step %d of 20 finished in %d ms   " % (tag, i, 7 * i) for i in range(20)]
    return "\n".join([LOG_LINE] * n + steps)


def openai_body():
    return {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse.   \n" + _log(5)},
            {"role": "developer", "content": _log(5)},
            {"role": "user", "content": "Run it.   "},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "bash", "arguments": '{"cmd": "make   "}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": _log()},
            {"role": "user", "content": [
                {"type": "text", "text": "Here is a screenshot   \n" + _log(10)},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA   "}}]},
        ],
        "tools": [{"type": "function", "function": {"name": "bash", "description": "run   "}}],
    }


def anthropic_body():
    return {
        "model": "claude-sonnet-4",
        "max_tokens": 100,
        "system": [{"type": "text", "text": _log(5)}],
        "messages": [
            {"role": "user", "content": "Build it."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Running make."},
                {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"cmd": "make   "}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": _log()}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_2", "name": "bash", "input": {"cmd": "make"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_2",
                 "content": [{"type": "text", "text": _log()},
                             {"type": "image", "source": {"type": "base64", "data": "AAAA   "}}]}]},
        ],
    }


def test_openai_request_compresses_only_user_assistant_and_tool_text():
    body = openai_body()
    before = copy.deepcopy(body)
    result = C.compress_request("openai", body, HYBRID0)
    assert body == before  # input never mutated
    out = result.body
    assert result.changed and out is not body
    assert out["messages"][0] == body["messages"][0]  # system
    assert out["messages"][1] == body["messages"][1]  # developer
    assert out["messages"][3] is body["messages"][3]  # untouched message shared, not copied
    assert out["tools"] is body["tools"]
    assert out["messages"][2]["content"] == "Run it."
    assert out["messages"][4]["content"].startswith("[worker-1] heartbeat ok queue=0 lag=0ms [×60]")
    assert out["messages"][4]["tool_call_id"] == "call_1"
    assert out["messages"][5]["content"][1] == body["messages"][5]["content"][1]  # image


def test_anthropic_request_keeps_tool_use_images_and_system():
    body = anthropic_body()
    before = copy.deepcopy(body)
    out = C.compress_request("anthropic", body, HYBRID0).body
    assert body == before
    assert out["system"] is body["system"]
    assert out["messages"][1] is body["messages"][1]
    first = out["messages"][2]["content"][0]
    assert first["tool_use_id"] == "toolu_1" and "[×60]" in first["content"]
    second = out["messages"][4]["content"][0]["content"]
    assert second[1] == body["messages"][4]["content"][0]["content"][1]  # image block
    # The same output again: a reference that says where the first copy is.
    assert second[0]["text"].startswith("[tokenpak: identical to the bash result for tool_use_id toolu_1")


def test_backref_keeps_first_copy_and_needs_hybrid():
    body = anthropic_body()
    strict = C.compress_request("anthropic", body, STRICT0).body
    assert "[×60]" in strict["messages"][4]["content"][0]["content"][0]["text"]
    small = {"messages": [{"role": "user", "content": "same short text"},
                          {"role": "user", "content": "same short text"}]}
    assert C.compress_request("openai", small, HYBRID0).changed is False


def test_a_marked_block_compresses_exactly_as_unmarked_and_keeps_its_marker():
    """Claude Code moves its marker to the newest block every turn: the mark changes nothing."""
    body = anthropic_body()
    plain = C.compress_request("anthropic", body, HYBRID0).body
    marked = copy.deepcopy(body)
    marked["messages"][2]["content"][0]["cache_control"] = {"type": "ephemeral"}
    marked["messages"][4]["content"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    out = C.compress_request("anthropic", marked, HYBRID0).body
    first, second = out["messages"][2]["content"][0], out["messages"][4]["content"][0]
    assert first["cache_control"] == {"type": "ephemeral"}
    assert second["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert "[×60]" in first["content"]
    assert first["content"] == plain["messages"][2]["content"][0]["content"]
    assert second["content"][0]["text"] == plain["messages"][4]["content"][0]["content"][0]["text"]
    assert second["content"][0]["text"].startswith("[tokenpak: identical to the bash result")


def test_thinking_turns_and_unknown_blocks_are_left_alone():
    body = {"messages": [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": _log()}]},
        {"role": "user", "content": [{"type": "mystery", "text": _log()},
                                     {"type": "text", "text": _log(), "citations": []}]},
    ]}
    result = C.compress_request("anthropic", body, HYBRID0)
    assert result.changed is False and result.body is body


def test_threshold_disabled_and_odd_shapes_return_the_same_object():
    body = openai_body()
    assert C.compress_request("openai", body, C.Settings()).body is body  # ~1k tokens < 4500
    assert C.compress_request("openai", body, C.Settings()).reason == "below threshold"
    off = C.compress_request("openai", body, C.Settings(enabled=False, threshold_tokens=0))
    assert off.body is body and off.reason == "disabled"
    for odd in ({}, {"messages": "hi"}, {"messages": [None, 3, {"role": "user"}]}, [1, 2]):
        assert C.compress_request("openai", odd, HYBRID0).body is odd
    assert C.compress_request("gemini", body, HYBRID0).body is body


def test_aggressive_ignores_threshold():
    body = openai_body()
    assert C.compress_request("openai", body, C.Settings(level="aggressive")).changed


def test_idempotent_and_prefix_stable():
    body = anthropic_body()
    once = C.compress_request("anthropic", body, HYBRID0).body
    assert C.compress_request("anthropic", once, HYBRID0).changed is False
    longer = copy.deepcopy(body)
    longer["messages"] += [{"role": "assistant", "content": "done"},
                           {"role": "user", "content": _log(30, "b")}]
    grown = C.compress_request("anthropic", longer, HYBRID0).body
    assert grown["messages"][:len(once["messages"])] == once["messages"]


def test_references_name_only_earlier_messages():
    text = _log()
    body = {"messages": [
        {"role": "tool", "tool_call_id": "c9", "content": text},
        {"role": "tool", "tool_call_id": "c9", "content": text},
    ]}
    before = C.compress_request("openai", body, HYBRID0).body
    assert before["messages"][1]["content"].startswith(
        "[tokenpak: identical to the tool result for tool_call_id c9,")
    later = {"role": "assistant", "tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]}
    grown = C.compress_request("openai", dict(body, messages=body["messages"] + [later]), HYBRID0)
    assert grown.body["messages"][:2] == before["messages"]


def test_json_tool_output_tables_and_element_references():
    page1 = json.dumps({"items": [{"name": "pkg%d" % i, "summary": "package number %d " % i * 8}
                                  for i in range(5)]}, indent=2)
    page2 = json.dumps({"items": [{"name": "pkg%d" % i, "summary": "package number %d " % i * 8}
                                  for i in range(3, 8)]}, indent=2)
    body = {"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "inventory", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": page1},
        {"role": "assistant", "tool_calls": [{"id": "c2", "type": "function",
                                              "function": {"name": "inventory", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": page2},
    ]}
    out = C.compress_request("openai", body, HYBRID0).body["messages"]
    first, second = json.loads(out[1]["content"]), json.loads(out[3]["content"])
    assert T.table_decode(first) == json.loads(page1)  # first copy complete and exact
    rows = second["items"]["rows"]
    assert rows[0] == "[tokenpak: same as items[3] of the inventory result for tool_call_id c1]"
    assert rows[1] == "[tokenpak: same as items[4] of the inventory result for tool_call_id c1]"
    assert rows[2][0] == "pkg5"
    strict = C.compress_request("openai", body, STRICT0).body["messages"]
    assert json.loads(strict[3]["content"]) == json.loads(page2)


def test_result_counts_are_exact_and_lazy(monkeypatch):
    body = openai_body()
    result = C.compress_request("openai", body, HYBRID0)
    assert result._cache == {}  # nothing counted on the hot path
    assert result.tokens_before == tokens.count_request("openai", body)
    assert result.tokens_after == tokens.count_request("openai", result.body)
    assert result.tokens_after < result.tokens_before
    saved = result.saved_by_transform
    assert saved["repeats"] > 0 and saved["ansi"] > 0
    assert sum(saved.values()) == result.tokens_before - result.tokens_after
    again = C.compress_request("openai", body, HYBRID0)
    again.prefetch()
    assert again.tokens_before == result.tokens_before  # waits for the counting thread's lock
    unchanged = C.compress_request("openai", body, C.Settings())
    assert unchanged.tokens_after == unchanged.tokens_before
    assert unchanged.saved_by_transform == {}


def test_memo_makes_a_resent_history_free(monkeypatch):
    body = anthropic_body()
    C.compress_request("anthropic", body, HYBRID0)
    calls = []
    real = C.transform_block
    monkeypatch.setattr(C, "transform_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    longer = copy.deepcopy(body)
    longer["messages"].append({"role": "user", "content": "and now?   "})
    C.compress_request("anthropic", longer, HYBRID0)
    assert len(calls) == 1  # only the new turn


def test_dry_run_and_format_report():
    body = anthropic_body()
    report = C.dry_run("anthropic", body, HYBRID0)
    assert report.tokens_before == tokens.count_request("anthropic", body)
    assert [m.index for m in report.messages] == list(range(5))
    assert report.messages[2].tokens_after < report.messages[2].tokens_before
    assert "repeats" in report.messages[2].transforms
    assert "backref" in report.messages[4].transforms
    text = C.format_report(report)
    assert "mode hybrid" in text and "threshold 0 tokens" in text
    assert "{:,}".format(report.tokens_before) in text
    assert "total" in text and "%" in text
    table = [line for line in text.splitlines() if line.strip().startswith(("0 ", "2 ", "4 "))]
    assert len(table) == 3 and len({line.index("user") for line in table}) == 1  # aligned
    below = C.format_report(C.dry_run("anthropic", body, C.Settings()))
    assert "below threshold: forwarded unchanged" in below


# ------------------------------------------------------------------ segments (issue 9)

def test_a_log_whose_repeated_line_ends_in_a_parenthesis_is_compressed():
    line = "WARN retrying connection to db.internal:5432 (attempt 3/5)"
    text = "\n".join([line] * 3000)
    out = C.transform_block(text, HYBRID0, is_tool=True)
    assert out == line + " [×3000]"


def test_pasted_json_then_log_then_fenced_code_each_get_their_own_treatment():
    dump = json.dumps({"service": "billing", "replicas": [
        {"name": "b-%d" % i, "status": "ok", "region": "eu-west-1"} for i in range(8)]}, indent=2)
    log = "\n".join("2026-11-23 10:00:01 INFO worker %d heartbeat ok (queue=0)   " % (i % 2)
                    for i in range(40))
    code = "```python\ndef handler(event):   \n    return {'ok': True}   \n```"
    text = "The state:\n" + dump + "\n\nThe log:\n" + log + "\n\nThe handler:\n" + code + "\nWhy?"
    body = {"messages": [{"role": "user", "content": text}]}
    out = C.compress_request("openai", body, HYBRID0).body["messages"][0]["content"]
    assert code in out  # byte-identical, trailing spaces and all
    state = out.split("\n")[1]
    assert T.table_decode(json.loads(state)) == json.loads(dump)  # minified, exact
    assert '"columns":["name","status","region"]' in state
    assert T.DITTO_LEGEND in out and "   \n" not in out.split("```")[0]
    assert tokens.count(out) < 0.6 * tokens.count(text)


def test_numbered_log_listing_collapses_with_its_line_range():
    """Claude Code's Read of a log: every line number the model could cite survives."""
    rows = ["%6d\t2026-05-09 07:29:%02d status installed pkg-%d" % (i, i % 60, i)
            for i in range(1, 12)]
    rows += ["%6d\t\x1b[32m[worker-0] heartbeat ok queue=0 lag=0ms\x1b[0m" % i
             for i in range(12, 3012)]
    rows += ["%6d\tdone" % 3012]
    text = "\n".join(rows) + "\n\n<system-reminder>\nBe careful.\n</system-reminder>"
    out = C.transform_block(text, HYBRID0, is_tool=True)
    assert "    12-3011\t[worker-0] heartbeat ok queue=0 lag=0ms [×3000]" in out
    assert "     1\t2026-05-09 07:29:01 status installed pkg-1" in out
    assert "  3012\tdone" in out and out.endswith("<system-reminder>\nBe careful.\n</system-reminder>")
    assert len(out) < len(text) / 50
    code = "\n".join("%6d\t    value = compute(%d)   " % (i, i) for i in range(1, 40))
    assert C.transform_block(code, HYBRID0, is_tool=True) == code  # a listing of code: exact


# ------------------------------------------------------------------ OpenAI Responses (Codex)

def responses_body():
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex.   \n" + _log(5),
        "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": _log(5)}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Fix the build.   \n" + _log(10)}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA" + "x" * 40},
            {"type": "function_call", "call_id": "call_1", "name": "shell",
             "arguments": '{"command": ["make"]}'},
            {"type": "function_call_output", "call_id": "call_1", "output": _log()},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": _log(5)}]},
            {"type": "function_call", "call_id": "call_2", "name": "shell",
             "arguments": '{"command": ["make", "-k"]}'},
            {"type": "function_call_output", "call_id": "call_2", "output": _log()},
            {"role": "user", "content": "Again?   "},
        ],
    }


def test_responses_input_compresses_tool_outputs_and_user_text_only():
    body = responses_body()
    before = copy.deepcopy(body)
    result = C.compress_request("responses", body, HYBRID0)
    assert body == before and result.changed
    out = result.body
    assert out["instructions"] == body["instructions"] and out["tools"] is body["tools"]
    items, old = out["input"], body["input"]
    for i in (0, 2, 3, 5, 6):  # developer, reasoning, calls, assistant output
        assert items[i] is old[i]
    assert items[1]["content"][0]["text"].startswith("Fix the build.\n")
    assert "[×10]" in items[1]["content"][0]["text"]
    assert items[4]["output"].startswith("[worker-1] heartbeat ok queue=0 lag=0ms [×60]")
    assert items[4]["call_id"] == "call_1"
    # The repeat names the first copy by its function_call: name, call_id and arguments.
    assert items[7]["output"] == C.reference_text(
        'the shell result for call_id call_1 (input {"command": ["make"]})')
    assert items[8]["content"] == "Again?"


def test_responses_leaves_string_input_encrypted_and_unknown_items_alone():
    text = {"model": "gpt-5", "input": _log(200)}
    assert C.compress_request("responses", text, HYBRID0).body is text
    body = {"model": "gpt-5", "input": [
        {"type": "function_call_output", "call_id": "c", "output": _log(), "encrypted_content": "x"},
        {"type": "function_call_output", "call_id": "c", "output": _log(), "extra": 1},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": _log(), "annotations": []}]},
    ]}
    assert C.compress_request("responses", body, HYBRID0).body is body


def test_responses_counts_instructions_input_and_tools():
    body = responses_body()
    texts = list(tokens.request_texts("responses", body))
    assert body["instructions"] in texts and '{"command": ["make"]}' in texts
    assert body["input"][4]["output"] in texts
    assert not any("gAAAA" in t for t in texts)  # encrypted reasoning is not prompt text
    total = tokens.count_request("responses", body)
    assert total == (tokens.REPLY_PRIMING + tokens.MESSAGE_OVERHEAD * len(body["input"])
                     + sum(tokens.count(t) for t in texts if t))
    assert tokens.estimate_request("responses", body) > 0.8 * total
    result = C.compress_request("responses", body, HYBRID0)
    assert result.tokens_after < result.tokens_before == total
    assert sum(result.saved_by_transform.values()) == result.tokens_before - result.tokens_after
    small = {"model": "gpt-5", "input": [{"role": "user", "content": "hi"}]}
    assert C.compress_request("responses", small, C.Settings()).reason == "below threshold"
