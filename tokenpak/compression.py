"""Prompt compression: which texts of a request may change, and how, without losing a fact.

Why it looks like this. A rewrite that saves 30% of a prompt but changes a prefix the
provider has cached costs more than it saves (a peer raised Claude Code bills 2-7x that
way). The invariant that protects the provider's prompt cache: a block's compressed form
is a pure, deterministic function of the block, the blocks before it and the settings.
So every byte a client sent in turn N reaches the provider identically in turn N+1, and
results are memoised per block by content hash: a resent 100k-token history costs one
hash per block, not a re-compression. `cache_control` markers play no part in it: Claude
Code moves its marker to the newest block every turn, and a marked block is compressed
exactly as it would be unmarked (the marker itself is kept where it is). A rule "leave
marked blocks raw" would mean never compressing Claude Code, and each block would change
once its marker moved on.

Where compression starts. Strict and hybrid leave prompts below threshold_tokens alone,
so the turn that first crosses it rewrites the history once (the provider then re-reads
that prefix once); a session started before tokenpak is rewritten on its first turn
through it. After that, prefixes are stable.

What is never altered: roles, order, ids, the `cache_control` field, tool_use inputs and
tool_calls, tool definitions, the system prompt and system/developer messages, images,
documents, thinking/redacted_thinking blocks (and the assistant turn holding them),
blocks with extra fields (citations...), unknown shapes. OpenAI Responses bodies
(api "responses", what Codex sends): only `input` items are walked, and of those only
function/custom tool call outputs and user message text; never `instructions`, `tools`,
reasoning items, items carrying `encrypted_content`, assistant output items, or a
string `input`.

Inside a block, text is judged per segment (transforms.split_segments): fenced or
unfenced code keeps its exact text under preserve_code; JSON is minified and tabulated;
logs, numbered listings of logs (Claude Code's Read output), search and test output
lose escapes, redraws, repeats (a numbered listing keeps every line range) and repeated
timestamps. This module walks the request, chains the transforms per segment
(transform_block), adds back-references across messages (a repeated block, or a repeated
JSON array element, names its first copy, which stays), and reports exact savings per
transform (dry_run).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import tokens
from .config import LEVEL_ALIASES, LEVELS
from .transforms import (CODE, JSON, LISTING, TEXT, collapse_listing,
                         collapse_redraws, collapse_repeats, ditto_listing, ditto_timestamps,
                         dumps_compact, elide_middle, final_state, group_search_output,
                         json_elements, json_minified,
                         json_with_refs, map_listing, minify_json, normalize_whitespace,
                         parse_json_text, path_text, split_segments, strip_ansi, tabulate_json,
                         tabulate_value)

MIN_REF_CHARS = 400        # a back-reference costs ~35 tokens: only replace bigger blocks
MEMO_ENTRIES = 8192
MEMO_CHARS = 16 << 20      # bound on memoised output text (characters)
# Exact counts run off the request thread, in a pool with a bound on its threads: a burst of
# compressed requests queues its counting rather than starting a thread per request.
COUNTING_THREADS = 2
_counting = ThreadPoolExecutor(max_workers=COUNTING_THREADS, thread_name_prefix="tokenpak-count")


@dataclass(frozen=True)
class Settings:
    """compression.* config values; `level` is normalised ("balanced" -> "hybrid")."""

    enabled: bool = True
    level: str = "hybrid"
    threshold_tokens: int = 4500
    preserve_code: bool = True
    preserve_json: bool = False

    def __post_init__(self):
        level = LEVEL_ALIASES.get(str(self.level).strip().lower(), str(self.level).strip().lower())
        if level not in LEVELS:
            raise ValueError("compression level must be strict, hybrid (balanced) or aggressive, "
                             "not %r" % (self.level,))
        object.__setattr__(self, "level", level)


# ------------------------------------------------------------------ per-block pipeline

def _rstrip(line):
    """normalize_whitespace for one line: trailing spaces and tabs."""
    return line.rstrip(" \t") if line.endswith((" ", "\t")) else line


def _on_listing(function):
    return lambda text: map_listing(text, function)


# (name, {segment kind: str -> str}) in pipeline order; a kind not named is left as it is.
_CLEAN_STEPS = (
    # No escape sequence holds a newline, so a listing loses its escapes in one pass.
    ("ansi", {TEXT: strip_ansi, LISTING: strip_ansi}),
    ("whitespace", {TEXT: normalize_whitespace, LISTING: _on_listing(_rstrip)}),
    ("redraws", {TEXT: collapse_redraws, LISTING: _on_listing(final_state)}),
)
_REPEAT_STEPS = (("repeats", {TEXT: collapse_repeats, LISTING: collapse_listing}),
                 ("paths", {TEXT: group_search_output}))
_JSON_STEPS = (("json", {JSON: minify_json}),)
_TABLE_STEPS = (("table", {JSON: tabulate_json}),)
_TIMESTAMP_STEPS = (("timestamps", {TEXT: ditto_timestamps, LISTING: ditto_listing}),)


def _settings_key(settings):
    return (settings.level, settings.preserve_code, settings.preserve_json)


def _segments(text, settings):
    """split_segments; without preserve_code there is no code, with preserve_json JSON is
    left as it is (like code)."""
    return [(CODE if kind == JSON and settings.preserve_json else kind, chunk)
            for kind, chunk in split_segments(text, settings.preserve_code)]


def transform_block(text: str, settings: Settings, is_tool: bool = False,
                    observe: Optional[Callable[[str, str, str], None]] = None) -> str:
    """Compress one text block: a pure function of (text, settings, is_tool).

    The text is judged per segment (transforms.split_segments): code keeps its exact
    text under preserve_code, JSON is minified (and tabulated), logs, listings of logs,
    search and test output lose escapes, redraws, repeats and repeated timestamps.
    `observe(name, before, after)` is called for every step that changed the text.
    """
    def step(name, before, after):
        if observe is not None and after != before:
            observe(name, before, after)
        return after

    def run(steps, segments, out):
        for name, functions in steps:
            segments = [(kind, functions[kind](chunk) if kind in functions else chunk)
                        for kind, chunk in segments]
            out = step(name, out, "\n".join(chunk for _, chunk in segments))
        return segments, out

    hybrid = settings.level != "strict"
    # JSON first: line-based steps could break it (a run of identical "1," lines).
    if parse_json_text(text) is not None:
        return text if settings.preserve_json else _json_steps(text, hybrid, step)
    segments, out = run(_CLEAN_STEPS, _segments(text, settings), text)
    if parse_json_text(out) is not None:  # JSON once its colour codes are gone
        return out if settings.preserve_json else _json_steps(out, hybrid, step)
    if out != text:  # judged again on what the model will read (escapes hid JSON, say)
        segments = _segments(out, settings)
    steps = _REPEAT_STEPS + _JSON_STEPS + (_TABLE_STEPS if hybrid else ())
    segments, out = run(steps, segments, out)
    if is_tool and settings.level == "aggressive" and all(k != CODE for k, _ in segments):
        out = step("elide", out, elide_middle(out))
        segments = _segments(out, settings)
    # Last, so no later step can drop the line a ditto mark refers to.
    if hybrid:
        segments, out = run(_TIMESTAMP_STEPS, segments, out)
    return out


def _json_steps(text, hybrid, step):
    value = json.loads(text)
    minified, canonical = json_minified(text, value)
    out = step("json", text, minified)
    return step("table", out, tabulate_value(minified, value, canonical)) if hybrid else out


def _transform_memo(text, settings, is_tool, key):
    """(output, output digest) of `transform_block`, memoised by content hash."""
    memo_key = (_settings_key(settings), is_tool, key)
    hit = _memo.get(memo_key)
    if hit is None:
        out = transform_block(text, settings, is_tool)
        # An unchanged block stores no copy of its text: the caller has it.
        hit = (None, key) if out == text else (out, tokens.digest(out))
        _memo.put(memo_key, hit, 64 + len(out if hit[0] is not None else ""))
    return (text if hit[0] is None else hit[0]), hit[1]


_memo = tokens.LRU(MEMO_ENTRIES, max_weight=MEMO_CHARS)


# ------------------------------------------------------------------ request walking

class _Unit:
    """One replaceable text in a request, at messages[msg][path[0]][path[1]]...

    `path` is a tuple of keys and indexes inside the message (or Responses input item),
    ending at the string itself. `name` says how a back-reference names the block: ("text",
    role) or ("tool", call, call id, id field). The words themselves (`label`, `short`) are
    only made for a block that is referenced: a resent history makes one _Unit per block
    every turn, and formatting labels for all of them (a tool input dumped per result) cost
    more than the memoised compression itself.
    """

    __slots__ = ("msg", "path", "text", "is_tool", "name")

    def __init__(self, msg, path, text, is_tool, name):
        self.msg, self.path, self.text, self.is_tool, self.name = msg, path, text, is_tool, name

    @property
    def label(self):
        """How a back-reference names this block to the model."""
        if self.name[0] == "text":
            return _text_label(self.name[1], self.text)
        return _tool_labels(*self.name[1:])[0]

    @property
    def short(self):
        """The label without the tool input, for element references."""
        if self.name[0] == "text":
            return _text_label(self.name[1], self.text)
        return _tool_labels(*self.name[1:])[1]


# Blocks with any other field (citations, ...) are left alone. `cache_control` is not
# content: a marked block is compressed exactly as it would be unmarked, and keeps its mark.
_TEXT_KEYS = frozenset({"type", "text", "cache_control"})
_TOOL_RESULT_KEYS = frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"})
_THINKING = frozenset({"thinking", "redacted_thinking"})
_ANTHROPIC_ROLES = ("user", "assistant")
_OPENAI_ROLES = ("user", "assistant", "tool", "function")  # never system or developer
# Responses API input items tokenpak may rewrite, and the fields each may carry.
_RESPONSES_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
_RESPONSES_OUTPUT_KEYS = frozenset({"type", "call_id", "output", "id", "status"})
_RESPONSES_OUTPUTS = ("function_call_output", "custom_tool_call_output")
_INPUT_TEXT_KEYS = frozenset({"type", "text"})
APIS = ("openai", "anthropic", "responses")


def messages_key(api: str) -> str:
    """The body field holding the conversation: "input" for Responses, else "messages"."""
    return "input" if api == "responses" else "messages"


def _plain_text(block):
    return (isinstance(block, dict) and block.get("type") == "text"
            and isinstance(block.get("text"), str) and _TEXT_KEYS.issuperset(block))


def _one_line(text):
    """`text` as one clean line, so a reference quoting it is left alone by every transform
    when it is compressed again (idempotence): no escapes, newlines or trailing blanks."""
    return " ".join(strip_ansi(str(text)).split())


def _text_label(role, text):
    start = _one_line(text[:200])
    snippet = start[:60] + ("..." if len(start) > 60 else "")
    return 'the %s message that begins "%s"' % (role, snippet.replace('"', "'"))


def _tool_labels(call, call_id, id_field):
    """(label with the tool input, short label) naming one tool result."""
    name, args = call if call else ("tool", None)
    short = _one_line("the %s result for %s %s" % (name or "tool", id_field, call_id))
    if args is None:
        return short, short
    args = args if isinstance(args, str) else dumps_compact(args)
    snippet = _one_line(args[:100]) + ("..." if len(args) > 100 else "")
    return short + " (input %s)" % snippet, short


def _tool_calls(api, message):
    """(call id, (tool name, input)) for the tool calls a message (or input item) makes."""
    if not isinstance(message, dict):
        return
    if api == "responses":
        if message.get("type") == "function_call":
            yield message.get("call_id"), (message.get("name"), message.get("arguments"))
        elif message.get("type") == "custom_tool_call":
            yield message.get("call_id"), (message.get("name"), message.get("input"))
        return
    if message.get("role") != "assistant":
        return
    if api == "anthropic":
        content = message.get("content")
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_use":
                yield block.get("id"), (block.get("name"), block.get("input"))
        return
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield call.get("id"), (function.get("name"), function.get("arguments"))


def _units(api, messages):
    """Every text tokenpak may rewrite, in conversation order."""
    if api == "responses":
        yield from _responses_units(messages)
        return
    calls = {}  # tool call id -> (name, input), from this and earlier messages only
    roles = _ANTHROPIC_ROLES if api == "anthropic" else _OPENAI_ROLES
    for i, message in enumerate(messages):
        # Labels may only use this and earlier messages, or a later turn could change them.
        calls.update(_tool_calls(api, message))
        if not isinstance(message, dict) or message.get("role") not in roles:
            continue
        role, content = message["role"], message.get("content")
        tool_msg = role in ("tool", "function")
        name = (("tool", calls.get(message.get("tool_call_id")), message.get("tool_call_id"),
                 "tool_call_id") if tool_msg else ("text", role))
        if isinstance(content, str):
            yield _Unit(i, ("content",), content, tool_msg, name)
            continue
        if not isinstance(content, list):
            continue
        if any(isinstance(b, dict) and b.get("type") in _THINKING for b in content):
            continue  # thinking signatures cover the turn: leave it whole
        for j, block in enumerate(content):
            if _plain_text(block):
                yield _Unit(i, ("content", j, "text"), block["text"], tool_msg, name)
            elif (api == "anthropic" and isinstance(block, dict)
                  and block.get("type") == "tool_result" and _TOOL_RESULT_KEYS.issuperset(block)):
                tool_id = block.get("tool_use_id")
                tool = ("tool", calls.get(tool_id), tool_id, "tool_use_id")
                inner = block.get("content")
                if isinstance(inner, str):
                    yield _Unit(i, ("content", j, "content"), inner, True, tool)
                for k, item in enumerate(inner if isinstance(inner, list) else ()):
                    if _plain_text(item):
                        yield _Unit(i, ("content", j, "content", k, "text"), item["text"], True,
                                    tool)


def _responses_units(items):
    """The rewritable texts of a Responses `input` list: tool outputs and user text.

    Never: instructions and tools (not in `input`), reasoning items, anything carrying
    `encrypted_content` or fields tokenpak does not know, assistant output items.
    """
    calls = {}
    for i, item in enumerate(items):
        calls.update(_tool_calls("responses", item))
        if not isinstance(item, dict) or "encrypted_content" in item:
            continue
        kind = item.get("type")
        if kind in _RESPONSES_OUTPUTS and _RESPONSES_OUTPUT_KEYS.issuperset(item):
            call_id = item.get("call_id")
            tool = ("tool", calls.get(call_id), call_id, "call_id")
            output = item.get("output")
            if isinstance(output, str):
                yield _Unit(i, ("output",), output, True, tool)
            for k, part in enumerate(output if isinstance(output, list) else ()):
                if _input_text(part):
                    yield _Unit(i, ("output", k, "text"), part["text"], True, tool)
        elif (kind in ("message", None) and item.get("role") == "user"
              and _RESPONSES_MESSAGE_KEYS.issuperset(item)):
            content = item.get("content")
            if isinstance(content, str):
                yield _Unit(i, ("content",), content, False, ("text", "user"))
            for k, part in enumerate(content if isinstance(content, list) else ()):
                if _input_text(part):
                    yield _Unit(i, ("content", k, "text"), part["text"], False, ("text", "user"))


def _input_text(part):
    return (isinstance(part, dict) and part.get("type") == "input_text"
            and isinstance(part.get("text"), str) and _INPUT_TEXT_KEYS.issuperset(part))


def reference_text(label: str) -> str:
    """What replaces a repeated block: where the first copy is, in words a model can follow."""
    return "[tokenpak: identical to %s, earlier in this conversation; not repeated here]" % label


def _rewrite(messages, changes):
    """A new messages list sharing every untouched message, block and string.

    Copy-on-write along each changed unit's path: every dict or list on the way is
    copied once per request, everything beside it is shared with the input.
    """
    out = list(messages)
    copied = set()  # (message index,) + path prefixes already copied for this request
    for unit, text, _ in changes:
        parent, key = out, unit.msg
        for depth, step in enumerate(unit.path):
            prefix = (unit.msg,) + unit.path[:depth]
            if prefix not in copied:
                parent[key] = dict(parent[key]) if isinstance(parent[key], dict) \
                    else list(parent[key])
                copied.add(prefix)
            parent, key = parent[key], step
        parent[key] = text
    return out


_elements_memo = tokens.LRU(MEMO_ENTRIES)


def _element_refs(unit, key, seen):
    """{path: reference} for this unit's JSON elements already seen; records the new ones."""
    index = _elements_memo.get(key, False)
    if index is False:
        index = json_elements(unit.text)
        _elements_memo.put(key, index)
    refs, skip = {}, None
    for path, element_key, size in index or ():
        if skip is not None and path[:len(skip)] == skip:
            continue  # inside an element already replaced
        first = seen.get(element_key)
        if first is None:
            seen[element_key] = (path, unit)  # named only if ever referenced
            continue
        ref = "[tokenpak: same as %s of %s]" % (path_text(first[0]), first[1].short)
        if len(ref) + 4 < size:
            refs[path], skip = ref, path
    return refs


def _with_element_refs(unit, key, refs, settings):
    memo_key = ("refs", _settings_key(settings), key, tuple(refs.items()))
    out = _memo.get(memo_key)
    if out is None:
        out = json_with_refs(unit.text, refs, table=True)
        _memo.put(memo_key, out, 64 + len(out))
    return out


def _compress_messages(api, messages, settings):
    """[(unit, new_text, how)] for every unit whose forwarded text changes.

    `how` is "transforms" (its own pipeline), "backref" (replaced by a reference to an
    earlier copy) or "elements" (JSON whose repeated elements became references).

    Back-references look only backwards: the first copy of a block (or of a JSON array
    element) stays, later copies name it. Each decision depends on earlier units only.
    """
    hybrid = settings.level != "strict"
    seen, seen_elements = {}, {}
    changes = []
    for unit in _units(api, messages):
        # One hash per block is all a memoised history costs.
        key = tokens.digest(unit.text)
        out, out_key = _transform_memo(unit.text, settings, unit.is_tool, key)
        how = "transforms"
        if hybrid and len(out) >= MIN_REF_CHARS:
            # Same output, or the same raw text (so a compressed copy matches its original).
            first = seen.get(out_key) or seen.get(key)
            if first is not None:
                out, how = reference_text(first.label), "backref"
            else:
                seen.setdefault(out_key, unit)  # labelled only if ever referenced
                seen.setdefault(key, unit)
        if hybrid and how != "backref" and not settings.preserve_json:
            refs = _element_refs(unit, key, seen_elements)
            if refs:
                out, how = _with_element_refs(unit, key, refs, settings), "elements"
        if out is not unit.text and out != unit.text:
            changes.append((unit, out, how))
    return changes


# ------------------------------------------------------------------ results

_savings_memo = tokens.LRU(MEMO_ENTRIES)


def _block_savings(unit, new_text, how, settings):
    """{transform: tokens saved} for one changed block (exact counts, memoised)."""
    if how == "elements":  # the block's own transforms, then element references
        saved = dict(_block_savings(unit, None, "transforms", settings))
        plain = transform_block(unit.text, settings, unit.is_tool)
        saved["backref"] = tokens.count_block(plain) - tokens.count_block(new_text)
        return saved
    if how == "backref":
        return {"backref": tokens.count_block(unit.text) - tokens.count(new_text)}
    memo_key = (_settings_key(settings), unit.is_tool, tokens.digest(unit.text))
    saved = _savings_memo.get(memo_key)
    if saved is None:
        saved = {}

        def observe(name, before, after):
            saved[name] = (saved.get(name, 0)
                           + tokens.count_block(before) - tokens.count_block(after))

        transform_block(unit.text, settings, unit.is_tool, observe)
        _savings_memo.put(memo_key, saved)
    return saved


@dataclass
class Result:
    """What `compress_request` decided. `body` is the input object itself when unchanged.

    tokens_before / tokens_after / saved_by_transform are exact o200k counts, computed
    on first access (memoised per block): read them after forwarding, off the hot path.
    """

    body: dict
    changed: bool
    reason: str = "compressed"  # or: disabled, unknown shape, below threshold, nothing to save
    api: str = "openai"
    original: Optional[dict] = field(default=None, repr=False)
    settings: Settings = field(default_factory=Settings, repr=False)
    changes: list = field(default_factory=list, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def prefetch(self) -> None:
        """Count in the counting pool now (e.g. while the upstream call runs); never
        blocks. Whoever reads a count first computes it; the other waits for it (_lazy)."""
        _counting.submit(lambda: (self.tokens_before, self.tokens_after))

    def _lazy(self, name, compute):
        with self._lock:
            if name not in self._cache:
                self._cache[name] = compute()
            return self._cache[name]

    @property
    def tokens_before(self) -> int:
        original = self.body if self.original is None else self.original
        return self._lazy("before", lambda: tokens.count_request(self.api, original))

    @property
    def tokens_after(self) -> int:
        if not self.changed:
            return self.tokens_before
        return self._lazy("after", lambda: tokens.count_request(self.api, self.body))

    @property
    def saved_by_transform(self) -> Dict[str, int]:
        def compute():
            total = {}
            for unit, text, how in self.changes:
                for name, saved in _block_savings(unit, text, how, self.settings).items():
                    total[name] = total.get(name, 0) + saved
            return total
        return self._lazy("saved", compute)


def _unchanged(api, body, settings, reason):
    return Result(body=body, changed=False, reason=reason, api=api, original=body,
                  settings=settings)


def compress_request(api: str, body: dict, settings: Settings) -> Result:
    """Compress the prompt of a request body, copy-on-write.

    `api` is "openai" (chat completions), "anthropic" (messages) or "responses" (OpenAI
    Responses: its `input` list; a string `input` is left alone). Below `threshold_tokens`
    (estimated, strict/hybrid), when disabled, for unknown shapes, or when nothing
    changes, returns the input body object itself.
    """
    field_name = messages_key(api)
    messages = body.get(field_name) if isinstance(body, dict) else None
    if not settings.enabled:
        return _unchanged(api, body, settings, "disabled")
    if api not in APIS or not isinstance(messages, list) or not messages:
        return _unchanged(api, body, settings, "unknown shape")
    if settings.level != "aggressive":
        # Estimated, and only up to the threshold: never a full tokenisation on the hot path.
        estimated = tokens.estimate_request(api, body, stop_at=settings.threshold_tokens)
        if estimated < settings.threshold_tokens:
            return _unchanged(api, body, settings, "below threshold")
    changes = _compress_messages(api, messages, settings)
    if not changes:
        return _unchanged(api, body, settings, "nothing to save")
    new_body = dict(body)
    new_body[field_name] = _rewrite(messages, changes)
    return Result(body=new_body, changed=True, api=api, original=body, settings=settings,
                  changes=changes)


# ------------------------------------------------------------------ dry run / report

@dataclass
class MessageReport:
    """Tokens of one message before and after, and the transforms that touched it."""

    index: int
    role: str
    tokens_before: int
    tokens_after: int
    transforms: Tuple[str, ...] = ()


@dataclass
class Report:
    """A dry run of `compress_request`: per message, per transform and in total."""

    api: str
    settings: Settings
    backend: str
    note: str
    messages: List[MessageReport]
    transforms: Dict[str, int]
    tokens_before: int
    tokens_after: int
    body: dict


def _message_tokens(message):
    texts = tokens.message_texts(message)
    return sum(tokens.count_block(t) for t in texts if isinstance(t, str) and t)


def dry_run(api: str, body: dict, settings: Settings) -> Report:
    """What compression would do to `body`, with exact token counts (for `tokenpak compress`)."""
    result = compress_request(api, body, settings)
    before_msgs = body.get(messages_key(api)) if isinstance(body, dict) else None
    after_msgs = result.body.get(messages_key(api)) if isinstance(result.body, dict) else None
    touched = {}
    for unit, text, how in result.changes:
        names = tuple(_block_savings(unit, text, how, settings))
        touched[unit.msg] = tuple(dict.fromkeys(touched.get(unit.msg, ()) + names))
    rows = []
    for i, message in enumerate(before_msgs if isinstance(before_msgs, list) else ()):
        role = (message.get("role") or message.get("type", "?")) if isinstance(message, dict) \
            else "?"
        rows.append(MessageReport(i, str(role), _message_tokens(message),
                                  _message_tokens(after_msgs[i]), touched.get(i, ())))
    note = "compressed" if result.changed else result.reason + ": forwarded unchanged"
    return Report(api, settings, tokens.backend(), note, rows, dict(result.saved_by_transform),
                  result.tokens_before, result.tokens_after, result.body)


def _pct(saved, before):
    return "%.1f%%" % (100.0 * saved / before) if before else "0.0%"


def format_report(report: Report) -> str:
    """The dry run as an aligned plain-text table with thousands separators."""
    s = report.settings
    lines = ["tokenpak compress: %s request, mode %s, threshold %s tokens, tokenizer %s" % (
        report.api, s.level, format(s.threshold_tokens, ","), report.backend), report.note, ""]
    rows = [("#", "role", "before", "after", "saved", "transforms")]
    for m in report.messages:
        rows.append((str(m.index), m.role, format(m.tokens_before, ","),
                     format(m.tokens_after, ","), format(m.tokens_before - m.tokens_after, ","),
                     ", ".join(m.transforms)))
    # What no message row holds (system, tools, per-message framing), so columns add up.
    rest_before = report.tokens_before - sum(m.tokens_before for m in report.messages)
    rest_after = report.tokens_after - sum(m.tokens_after for m in report.messages)
    rows.append(("", "system, tools, framing", format(rest_before, ","), format(rest_after, ","),
                 format(rest_before - rest_after, ","), ""))
    saved = report.tokens_before - report.tokens_after
    rows.append(("", "total", format(report.tokens_before, ","), format(report.tokens_after, ","),
                 format(saved, ","), _pct(saved, report.tokens_before)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        lines.append("  ".join([r[0].rjust(widths[0]), r[1].ljust(widths[1])]
                               + [r[c].rjust(widths[c]) for c in (2, 3, 4)] + [r[5]]).rstrip())
    if report.transforms:
        lines.append("")
        width = max(len(n) for n in report.transforms)
        lines.append("transform".ljust(width) + "  tokens saved")
        for name, value in sorted(report.transforms.items(), key=lambda kv: -kv[1]):
            lines.append(name.ljust(width) + "  " + format(value, ",").rjust(12))
    return "\n".join(lines) + "\n"
