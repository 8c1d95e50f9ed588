"""The one-line stats footer tokenpak appends to answers, and its removal from history.

The footer tells a user, in the answer itself, what tokenpak did for that request:

    <answer text>

    [tokenpak] 12,345 → 8,100 tokens (34.4% saved) | cache miss | $0.0123 (saved $0.0040)

It is only safe on prose. A tool call, a JSON-mode answer or a forced tool is parsed by the
client's code, so those never get one (`wants_footer`, and the stop reason checks here and in
sse.StreamRewriter). Chat clients send earlier answers back as history; if the footer stayed
in them it would cost tokens on every turn and change the prefix the provider has cached, so
`strip_history` removes it again, leaving exactly the text the model wrote.

Streams get their footer from sse.StreamRewriter (as one more text delta); this module
formats the line and handles non-streamed bodies.

The OpenAI Responses API (what Codex speaks) is handled alike: its answers carry a footer
in the last output_text of the last output item when that item is a message (never after a
function call), and its requests keep earlier answers as assistant message items in `input`
whose `output_text` parts are stripped here.
"""

from __future__ import annotations

import re

PREFIX = "[tokenpak]"
SEPARATOR = "\n\n"
_WORD = "tokenpak"
_RAW_WORD = _WORD.encode("ascii")
# The footer line as clients give it back: optionally quoted ("> "), emphasised ("*", "_")
# and with markdown-escaped brackets ("\\[tokenpak\\]").
_FOOTER_LINE = re.compile(r"[ \t]*(?:>[ \t]*)*[*_]*\\?\[tokenpak\\?\][ \t]")
_FOOTER_WORDS = " tokens ("  # in every footer line format_line has written
_TEXT_PARTS = ("text", "output_text", "input_text")
_CACHE_WORDS = ("hit", "miss", "bypass")


def format_line(tokens_before: int, tokens_after: int, cache: str, cost_usd,
                saved_usd=None) -> str:
    """The footer line: "[tokenpak] 12,345 → 8,100 tokens (34.4% saved) | cache miss | $0.0123".

    tokens_before/after: prompt tokens before and after compression. cache: "hit", "miss"
    or "bypass". cost_usd: the request's cost in dollars, or None when the model's price is
    unknown. saved_usd: dollars tokenpak saved on it, priced as the accounting row prices
    them (never overstated); shown as " (saved $0.0040)" only when above zero. No newline:
    callers add the blank line before it.
    """
    cache = str(cache).lower()
    if cache.startswith("cache "):
        cache = cache[len("cache "):]
    if cache not in _CACHE_WORDS:
        raise ValueError("cache must be one of %s, not %r" % (", ".join(_CACHE_WORDS), cache))
    before, after = int(tokens_before), int(tokens_after)
    saved = (before - after) * 100.0 / before if before > 0 else 0.0
    line = "%s %s → %s tokens (%.1f%% saved) | cache %s | %s" % (
        PREFIX, format(before, ","), format(after, ","), saved, cache, _cost(cost_usd))
    if saved_usd is not None and saved_usd > 0:
        line += " (saved %s)" % _cost(saved_usd)
    return line


def _cost(cost_usd) -> str:
    if cost_usd is None:
        return "cost unknown"
    if 0 < cost_usd < 0.00005:
        return "<$0.0001"  # "$0.0000" would read as free
    return "$" + format(cost_usd, ",.4f")


def strip_text(text: str) -> str:
    """`text` without a trailing footer line; else `text` itself (the same object).

    The footer is the last non-blank line, after a blank line, starting with "[tokenpak] ".
    Clients hand it back in altered forms, and each must still be recognised:
    whitespace after it (aider rebuilds history from its markdown: "...$0.0001\n\n"), CRLF
    line ends, a markdown re-rendering (escaped brackets "\\[tokenpak\\]", the line in
    "*"/"_" emphasis, a "> " quote) and a block holding the footer alone (see
    `_strip_content`). Any line after the mark counts, not only today's format: a footer
    written by an older tokenpak in a long-running conversation must go too. Exactly one is
    removed, so an answer that itself ended in such a line comes back as it was.
    """
    end = len(text.rstrip())
    start = text.rfind("\n", 0, end) + 1
    if not _FOOTER_LINE.match(text, start, end):
        return text
    above = text.rfind("\n", 0, start - 1) if start else -1
    if above < 0:
        # The footer alone (a block of its own): only a line in the footer's own format,
        # since the model may well have answered "[tokenpak] is a proxy".
        if text[:start].strip() or _FOOTER_WORDS not in text[start:end]:
            return text
        return ""  # the caller drops the part it was in
    # the line before must be blank; the answer ends at the newline before that
    blank = text[above + 1:start - 1]
    if blank.strip():
        return text
    if blank.endswith("\r") and text[above - 1:above] == "\r":
        return text[:above - 1]  # CRLF throughout: the separator was "\r\n\r\n"
    return text[:above]


def _is_text_part(part):
    return isinstance(part, dict) and part.get("type") in _TEXT_PARTS \
        and isinstance(part.get("text"), str)


def _strip_content(content):
    """Content (a string, or a list of parts/blocks) with footers stripped; same object if none.

    A text part that held only the footer is removed, unless it was the only part (an empty
    list is not a valid turn; an empty text is what the model wrote, nothing)."""
    if isinstance(content, str):
        return strip_text(content) if _WORD in content else content
    if not isinstance(content, list):
        return content
    new = None
    for i, part in enumerate(content):
        if not _is_text_part(part) or _WORD not in part["text"]:
            continue  # the common case: a substring test, no copy
        stripped = strip_text(part["text"])
        if stripped is not part["text"]:
            if new is None:
                new = list(content)
            new[i] = dict(part, text=stripped)
    if new is None:
        return content
    kept = [p for p, old in zip(new, content)
            if p is old or p["text"].strip() or not old["text"].strip()]
    return kept if kept else new


def _strip_items(items):
    """A list of turns/items with the footer stripped from assistant content; same if none."""
    new = None
    for i, msg in enumerate(items):
        if not (isinstance(msg, dict) and msg.get("role") == "assistant"):
            continue
        content = msg.get("content")
        stripped = _strip_content(content)
        if stripped is not content:
            if new is None:
                new = list(items)
            new[i] = dict(msg, content=stripped)
    return new


def strip_history(api: str, body: dict, raw: bytes = None) -> dict:
    """`body` with the footer removed from earlier assistant turns; `body` itself if none had one.

    Works on OpenAI chat bodies (string content and text parts), Anthropic messages bodies
    (string content and text blocks), both keeping turns in body["messages"] with role
    "assistant", and OpenAI Responses bodies (assistant message items in body["input"],
    with "output_text" parts). Pass the request's `raw` bytes when at hand: a body that does
    not contain "tokenpak" anywhere is returned at once. The input is never mutated: changed
    messages, content lists and parts are copies.
    """
    if raw is not None and _RAW_WORD not in raw:
        return body
    if not isinstance(body, dict):
        return body
    for field in ("messages", "input"):
        items = body.get(field)
        if isinstance(items, list):
            new = _strip_items(items)
            if new is not None:
                body = dict(body, **{field: new})
    return body


def wants_footer(api: str, request_body: dict) -> bool:
    """Whether the answer to this request may carry a footer (prose, not machine-read output).

    False for OpenAI JSON mode (response_format json_object/json_schema), a forced tool
    (tool_choice "required" or a named function) and n > 1; for Responses when text.format
    asks for JSON or tool_choice forces a tool; for Anthropic when tool_choice forces a tool
    ("any"/"tool") or output_config.format / output_format asks for JSON.
    """
    if not isinstance(request_body, dict):
        return False
    choice = request_body.get("tool_choice")
    if api == "responses":
        text = request_body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            return False
        # A named tool ({"type": "function", ...}) or allowed_tools in "required" mode.
        return not (choice == "required" or (isinstance(choice, dict)
                                             and choice.get("mode") != "auto"))
    if api == "openai":
        # A forced function answers with finish_reason "stop", so catch it here too.
        fmt = request_body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            return False
        if choice == "required" or isinstance(choice, dict):
            return False
        n = request_body.get("n")
        return not (isinstance(n, int) and n > 1)
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        return False
    config = request_body.get("output_config")
    if isinstance(config, dict) and config.get("format"):
        return False
    return not request_body.get("output_format")


def append_to_response(api: str, response_obj: dict, line: str) -> bool:
    """Append SEPARATOR + line to the final text of a non-streamed response, in place.

    OpenAI: choices[0].message.content when it is a string and the answer is not a tool
    call. Responses: the last output_text part of the last output item, when that item is
    an assistant message (not a function call). Anthropic: the last content block when it
    is text and stop_reason is not tool_use (or pause_turn, where the client sends the turn
    back to continue it). Returns whether it appended. Cache the upstream body before
    calling this: the footer is never cached.
    """
    if not isinstance(response_obj, dict):
        return False
    if api == "responses":
        output = response_obj.get("output")
        last = output[-1] if isinstance(output, list) and output else None
        content = last.get("content") if isinstance(last, dict) else None
        part = content[-1] if isinstance(content, list) and content else None
        if not (isinstance(part, dict) and last.get("type") == "message"
                and part.get("type") == "output_text" and isinstance(part.get("text"), str)):
            return False
        part["text"] += SEPARATOR + line
        return True
    if api == "openai":
        choices = response_obj.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        msg = first.get("message") if isinstance(first, dict) else None
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            return False
        if first.get("finish_reason") in ("tool_calls", "function_call") or msg.get("tool_calls"):
            return False
        msg["content"] += SEPARATOR + line
        return True
    if response_obj.get("stop_reason") in ("tool_use", "pause_turn"):
        return False
    content = response_obj.get("content")
    last = content[-1] if isinstance(content, list) and content else None
    if not (isinstance(last, dict) and last.get("type") == "text"
            and isinstance(last.get("text"), str)):
        return False
    last["text"] += SEPARATOR + line
    return True
