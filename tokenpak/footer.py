"""The one-line stats footer tokenpak appends to answers, and its removal from history.

The footer tells a user, in the answer itself, what tokenpak did for that request:

    <answer text>

    [tokenpak] 12,345 → 8,100 tokens (34.4% saved) | cache miss | $0.0123

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

PREFIX = "[tokenpak]"
SEPARATOR = "\n\n"
_MARK = SEPARATOR + PREFIX + " "
_RAW_PREFIX = PREFIX.encode("ascii")
_CACHE_WORDS = ("hit", "miss", "bypass")


def format_line(tokens_before: int, tokens_after: int, cache: str, cost_usd) -> str:
    """The footer line: "[tokenpak] 12,345 → 8,100 tokens (34.4% saved) | cache miss | $0.0123".

    tokens_before/after: prompt tokens before and after compression. cache: "hit", "miss"
    or "bypass". cost_usd: the request's cost in dollars, or None when the model's price is
    unknown. No newline: callers add the blank line before it.
    """
    cache = str(cache).lower()
    if cache.startswith("cache "):
        cache = cache[len("cache "):]
    if cache not in _CACHE_WORDS:
        raise ValueError("cache must be one of %s, not %r" % (", ".join(_CACHE_WORDS), cache))
    before, after = int(tokens_before), int(tokens_after)
    saved = (before - after) * 100.0 / before if before > 0 else 0.0
    return "%s %s → %s tokens (%.1f%% saved) | cache %s | %s" % (
        PREFIX, format(before, ","), format(after, ","), saved, cache, _cost(cost_usd))


def _cost(cost_usd) -> str:
    if cost_usd is None:
        return "cost unknown"
    if 0 < cost_usd < 0.00005:
        return "<$0.0001"  # "$0.0000" would read as free
    return "$" + format(cost_usd, ",.4f")


def strip_text(text: str) -> str:
    """`text` without a trailing footer (SEPARATOR + one "[tokenpak] ..." line); else itself."""
    # Any last line after the mark counts, not only today's format: a footer written by an
    # older tokenpak in a long-running conversation must go too. Exactly one is removed, so
    # an answer that itself ended in such a line comes back as it was.
    at = text.rfind(_MARK)
    if at < 0 or "\n" in text[at + len(_MARK):]:
        return text
    return text[:at]


def _strip_content(content):
    """Content (a string, or a list of parts/blocks) with footers stripped; same object if none."""
    if isinstance(content, str):
        return strip_text(content) if PREFIX in content else content
    if not isinstance(content, list):
        return content
    new = None
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            continue
        text = part.get("text")
        if not isinstance(text, str) or PREFIX not in text:
            continue  # the common case: a substring test, no copy
        stripped = strip_text(text)
        if stripped is not text:
            if new is None:
                new = list(content)
            new[i] = dict(part, text=stripped)
    return content if new is None else new


def strip_history(api: str, body: dict, raw: bytes = None) -> dict:
    """`body` with the footer removed from earlier assistant turns; `body` itself if none had one.

    Works on OpenAI chat bodies (string content and text parts) and Anthropic messages bodies
    (string content and text blocks): both keep turns in body["messages"] with role
    "assistant". Pass the request's `raw` bytes when at hand: a body that does not contain
    "[tokenpak]" anywhere is returned at once. The input is never mutated: changed messages,
    content lists and parts are copies.
    """
    if raw is not None and _RAW_PREFIX not in raw:
        return body
    if api == "responses":
        return _strip_input(body)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return body
    new = None
    for i, msg in enumerate(messages):
        if not (isinstance(msg, dict) and msg.get("role") == "assistant"):
            continue
        content = msg.get("content")
        stripped = _strip_content(content)
        if stripped is not content:
            if new is None:
                new = list(messages)
            new[i] = dict(msg, content=stripped)
    if new is None:
        return body
    return dict(body, messages=new)


def _strip_input(body: dict) -> dict:
    """A Responses body with the footer stripped from assistant items in `input`."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return body  # a string input is the user's own text
    new = None
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and item.get("role") == "assistant"
                and item.get("type", "message") == "message"):
            continue
        content = item.get("content")
        stripped = _strip_output_text(content) if isinstance(content, list) else \
            _strip_content(content)
        if stripped is not content:
            if new is None:
                new = list(items)
            new[i] = dict(item, content=stripped)
    return body if new is None else dict(body, input=new)


def _strip_output_text(content: list) -> list:
    """Responses message content with footers stripped from `output_text` parts; the same
    list when none had one."""
    new = None
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "output_text"):
            continue
        text = part.get("text")
        if isinstance(text, str) and PREFIX in text:
            stripped = strip_text(text)
            if stripped is not text:
                if new is None:
                    new = list(content)
                new[i] = dict(part, text=stripped)
    return content if new is None else new


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
