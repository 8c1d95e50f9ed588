"""Server-sent events: framing, usage accounting and the rewrites tokenpak makes to a stream.

Every streamed answer (OpenAI chat completions, OpenAI Responses, Anthropic messages) flows
through here on its way to the client, so this module does three jobs in one pass over each
chunk:

* frame the byte stream into events, exactly as the SDKs' decoders do (LF, CRLF or CR line
  ends, comments, multi-line data), keeping each event's raw bytes so the stream can be
  forwarded and cached byte for byte;
* watch the few events that carry usage, the model name or the end of the answer, and
  json-decode only those (a stream has hundreds of content deltas nobody needs to parse);
* optionally rewrite: drop the usage chunk the proxy asked OpenAI for on its own account, and
  insert the stats footer as one more text delta before the stream's closing events.

The Responses API (what Codex speaks) repeats the final text after the deltas: in
`response.output_text.done` (text), `response.content_part.done` (part),
`response.output_item.done` (item) and `response.completed` (response.output), and Codex
keeps the item from output_item.done as its history. The footer must be in all of them, or
the client's accumulated deltas and its final object disagree. The usage the footer reports
only arrives in response.completed, so from a text's output_text.done on, its closing events
are held (they carry nothing new; no delta is ever delayed). If another output starts
instead (a function call, another part), they go out unchanged and no footer is added to
that text. At response.completed (or .incomplete) the footer becomes one more
output_text.delta inserted before output_text.done, and is appended to the text in each
held event and in the completed response. Every event carries a `sequence_number`: the
inserted delta takes output_text.done's number and the held events and the ending, none of
which the client has seen, move up by one; nothing follows the ending, so the numbering
stays gapless. Appending the footer to the last real delta instead would need every delta
held until the next one arrives: a stream one token late throughout.

It is pure: bytes in, bytes out, no I/O. The proxy owns the sockets.

`Usage` keeps the providers' token counts in disjoint buckets, Anthropic style: `input` is
the prompt tokens billed at the full input rate, so OpenAI's `prompt_tokens` (which includes
cached tokens) becomes `input + cache_read`; the Responses API's `input_tokens` likewise.
Reasoning tokens are part of the output count in both OpenAI APIs and billed as output.
Cost is then sum(bucket * price) for all.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

OPENAI = "openai"
ANTHROPIC = "anthropic"
RESPONSES = "responses"
APIS = (OPENAI, RESPONSES, ANTHROPIC)

_LINE_END = re.compile(rb"\r\n|\r|\n")
# An OpenAI chunk needs decoding only if one of these keys has a non-null value.
_OPENAI_INTEREST = re.compile(rb'"(?:finish_reason|usage|error)"\s*:\s*[^n\s]')
_ANTHROPIC_INTEREST = frozenset(("message_start", "message_delta", "error"))
# Responses events that carry the model, usage or the end; the rest are content.
_RESPONSES_ENDS = frozenset(("response.completed", "response.incomplete", "response.failed"))
_RESPONSES_INTEREST = _RESPONSES_ENDS | {"response.created", "error"}
# The event's own "type" comes first in OpenAI's serialisation: enough when `event:` is absent.
_RESPONSES_TYPE = re.compile(rb'"type"\s*:\s*"([^"]+)"')
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
# What may follow a text's output_text.done before the answer ends, all held for the footer.
_RESPONSES_TEXT_CLOSE = frozenset(("response.content_part.done", "response.output_item.done",
                                   "response.output_text.annotation.added"))
# The `"usage":null` member OpenAI adds to every chunk under include_usage.
_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_USAGE_NULL_FIRST = re.compile(rb'\{\s*"usage"\s*:\s*null\s*,\s*')
_TOOL_CALLS = re.compile(rb'"(?:tool_calls|function_call)"\s*:\s*[\[{]')
_OTHER_CHOICE = re.compile(rb'"index"\s*:\s*[1-9]')
# Answers that hand control back to the client's code: a footer there would corrupt them.
_NO_FOOTER_STOPS = frozenset(("tool_calls", "function_call", "tool_use", "pause_turn"))
# A well-formed provider event is a few KiB; past this the body is not SSE we understand.
MAX_EVENT_BYTES = 8 << 20


@dataclass
class Usage:
    """Token counts of one answer, in disjoint buckets (see the module docstring)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0  # the part of cache_write Anthropic keeps for an hour (2x price)

    @property
    def prompt_total(self) -> int:
        """All prompt tokens, cached or not (OpenAI's `prompt_tokens`)."""
        return self.input + self.cache_read + self.cache_write


class Event:
    """One SSE event: its exact bytes, and its `event:` name and joined `data:` lines.

    A block without fields (a `: comment`, a stray blank line) is an Event whose event and
    data are both None; it is kept so that joining the raw bytes reproduces the stream.
    """

    __slots__ = ("raw", "event", "data")

    def __init__(self, raw: bytes, event=None, data=None):
        self.raw = raw
        self.event = event
        self.data = data

    def __repr__(self):
        return "Event(raw=%r, event=%r, data=%r)" % (self.raw, self.event, self.data)


def _parse_event(raw: bytes) -> Event:
    """Read the event name and data of one complete event, as the WHATWG SSE spec does."""
    # Fast paths for the two shapes providers send: "data: X\n\n", "event: N\ndata: X\n\n".
    size = len(raw)
    first = raw.find(b"\n")
    if raw[:6] == b"data: " and first == size - 2 and raw[-1] == 10:
        return Event(raw, None, raw[6:-2].decode("utf-8", "replace"))
    if (raw[:7] == b"event: " and raw.find(b"\n", first + 1) == size - 2 and raw[-1] == 10
            and raw[first + 1:first + 7] == b"data: " and b"\r" not in raw):
        return Event(raw, raw[7:first].decode("utf-8", "replace"),
                     raw[first + 7:-2].decode("utf-8", "replace"))
    name = None
    data = None
    for line in raw.split(b"\n") if b"\r" not in raw else _LINE_END.split(raw):
        if not line or line[:1] == b":":
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            text = value.decode("utf-8", "replace")
            data = text if data is None else data + "\n" + text
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return Event(raw, name, data)


class EventParser:
    """Incremental SSE framer: feed raw bytes as they arrive (any split, LF/CRLF/CR line ends).

    Each returned Event's `raw` is its exact bytes including the blank line that ends it, so
    b"".join(e.raw for e in events) + tail() reproduces the input byte for byte. Work per
    feed is proportional to the new bytes, however large the pending event grows.
    """

    def __init__(self):
        self._buf = bytearray()  # the incomplete trailing event
        self._line_start = 0  # where its incomplete last line begins
        self._cr = False  # a CR was seen: use the general framer from now on

    def feed(self, data: bytes) -> list:
        """Return the events completed by `data` (possibly none)."""
        if type(data) is not bytes:
            data = bytes(data)
        new_from = len(self._buf)  # the offset of `data` in buf
        if new_from:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        if self._cr or b"\r" in data:
            self._cr = True
            return self._feed_any(buf, new_from)
        # LF only, as every provider sends: an event ends at the first "\n\n". The pending
        # bytes hold none, so a new one can start at the last old byte at the earliest.
        events = []
        start = 0
        end = len(buf)
        scan = new_from - 1 if new_from else 0
        while start < end:
            if buf[start] == 10:  # a blank line on its own
                stop = start + 1
            else:
                at = buf.find(b"\n\n", scan if scan > start else start)
                if at < 0:
                    break
                stop = at + 2
            events.append(_parse_event(bytes(buf[start:stop]) if buf is self._buf
                                       else buf[start:stop] if start or stop < end else buf))
            start = stop
        newline = buf.rfind(b"\n", max(start, new_from))
        line_start = newline + 1 if newline >= 0 else max(self._line_start, start)
        self._keep(buf, start, line_start)
        return events

    def _feed_any(self, buf, new_from: int) -> list:
        """The general framer, for CRLF and CR line ends."""
        events = []
        start = 0
        line_start = self._line_start
        end = len(buf)
        # Terminators can only be in the new bytes, or a CR deferred at the old end.
        for m in _LINE_END.finditer(buf, max(line_start, new_from - 1)):
            if m.end() == end and buf[m.start()] == 13 and m.end() - m.start() == 1:
                break  # a CR at the very end may be the first half of a CRLF: wait
            if m.start() == line_start:  # an empty line ends the event
                events.append(_parse_event(bytes(buf[start:m.end()])))
                start = m.end()
            line_start = m.end()
        self._keep(buf, start, line_start)
        return events

    def _keep(self, buf, start: int, line_start: int) -> None:
        """Keep buf[start:] (the incomplete event) for the next feed."""
        if start == len(buf):
            self._buf = bytearray()
            line_start = start
        elif buf is self._buf:
            del buf[:start]
        else:
            self._buf = bytearray(buf[start:])
        self._line_start = line_start - start

    def tail(self) -> bytes:
        """Bytes of an incomplete trailing event (b"" at an event boundary)."""
        return bytes(self._buf)


def split_events(raw: bytes) -> list:
    """Split a recorded SSE stream into its events' raw bytes, for replaying a cached stream.

    The pieces join back to `raw` exactly; an unterminated last event is the last piece.
    """
    parser = EventParser()
    pieces = [e.raw for e in parser.feed(raw)]
    if parser.tail():
        pieces.append(parser.tail())
    return pieces


def _int(value) -> int:
    """A token count from a usage object: missing, null or garbage counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _openai_usage(u: dict) -> Usage:
    details = u.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _int(u.get("prompt_tokens"))
    return Usage(max(prompt - cached, 0), _int(u.get("completion_tokens")), cached, 0)


def _anthropic_update(usage: Usage, u: dict) -> None:
    """Apply an Anthropic usage object; a field absent or null keeps its earlier value."""
    for key, attr in (("input_tokens", "input"), ("output_tokens", "output"),
                      ("cache_read_input_tokens", "cache_read"),
                      ("cache_creation_input_tokens", "cache_write")):
        value = u.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(usage, attr, value)
    # {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}: the split of the writes
    split = u.get("cache_creation")
    if isinstance(split, dict):
        usage.cache_write_1h = _int(split.get("ephemeral_1h_input_tokens"))
        if not isinstance(u.get("cache_creation_input_tokens"), int):
            usage.cache_write = usage.cache_write_1h + _int(split.get("ephemeral_5m_input_tokens"))


def _responses_usage(u: dict) -> Usage:
    """The Responses API's usage, split like chat's: `input_tokens` includes the cached ones
    (input_tokens_details.cached_tokens), `output_tokens` the reasoning ones, as billed."""
    details = u.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = _int(u.get("input_tokens"))
    return Usage(max(prompt - cached, 0), _int(u.get("output_tokens")), cached, 0)


def usage_from_response(api: str, obj: dict) -> Usage:
    """Usage of a non-streamed JSON response body (Usage() when it has none)."""
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return Usage()
    if api == OPENAI:
        return _openai_usage(u)
    if api == RESPONSES:
        return _responses_usage(u)
    usage = Usage()
    _anthropic_update(usage, u)
    return usage


class UsageWatcher:
    """Follows a stream's events for what accounting and caching need.

    `complete` is True once the stream ended normally ([DONE] / message_stop /
    response.completed or response.incomplete); only such a stream may be cached. `errored`
    is True after an error event (or response.failed). `stop_reason` is the answer's
    finish_reason (OpenAI, choice 0), stop_reason (Anthropic) or final status (Responses).
    """

    def __init__(self, api: str):
        if api not in APIS:
            raise ValueError("api must be one of %s, not %r" % (", ".join(APIS), api))
        self.api = api
        self.usage = Usage()
        self.model = None
        self.complete = False
        self.errored = False
        self.error_message = None
        self.stop_reason = None

    def observe(self, event) -> None:
        """Account for one event; cheap unless the event can carry usage or an ending."""
        self._observe(event)

    def _observe(self, event):
        """observe(), returning the decoded JSON object when it had to decode one."""
        if event.data is None:
            return None
        if self.api == OPENAI:
            if event.data == "[DONE]":
                self.complete = True
                return None
            if self.model is not None and not _OPENAI_INTEREST.search(event.raw):
                return None
            obj = _loads(event.data)
            if obj is not None:
                self._openai(obj)
            return obj
        if self.api == RESPONSES:
            return self._responses(event)
        if event.event == "message_stop":
            self.complete = True
        if event.event not in _ANTHROPIC_INTEREST:
            return None
        obj = _loads(event.data)
        if event.event == "error":
            self._error(obj)
        elif obj is not None:
            self._anthropic(event.event, obj)
        return obj

    def _error(self, obj) -> None:
        self.errored = True
        err = obj.get("error") if isinstance(obj, dict) else None
        msg = err.get("message") if isinstance(err, dict) else None
        if msg is None and isinstance(obj, dict):
            msg = obj.get("message")  # the Responses error event as documented (flat)
        self.error_message = msg if isinstance(msg, str) else "error event in stream"

    def _responses(self, event):
        """A Responses event: decode only the start, the three endings and errors."""
        name = event_type(event)
        if name not in _RESPONSES_INTEREST:
            return None
        obj = _loads(event.data)
        if name == "error":
            self._error(obj)
            return obj
        response = obj.get("response") if obj is not None else None
        if not isinstance(response, dict):
            return obj
        if isinstance(response.get("model"), str):
            self.model = response["model"]
        if isinstance(response.get("usage"), dict):
            self.usage = _responses_usage(response["usage"])
        if name in _RESPONSES_ENDS:
            self.stop_reason = response.get("status") or name[len("response."):]
            if name == "response.failed":
                self._error(response)  # response.error.message
            else:
                self.complete = True
        return obj

    def _openai(self, obj: dict) -> None:
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if obj.get("error"):
            self._error(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = _openai_usage(usage)
        for choice in obj.get("choices") or ():
            if (isinstance(choice, dict) and choice.get("finish_reason")
                    and choice.get("index", 0) == 0):
                self.stop_reason = choice["finish_reason"]

    def _anthropic(self, name: str, obj: dict) -> None:
        if name == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("model"), str):
                    self.model = msg["model"]
                if isinstance(msg.get("usage"), dict):
                    _anthropic_update(self.usage, msg["usage"])
            return
        delta = obj.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason"):
            self.stop_reason = delta["stop_reason"]
        if isinstance(obj.get("usage"), dict):
            _anthropic_update(self.usage, obj["usage"])  # cumulative counts


def event_type(event):
    """A Responses event's type: its `event:` name, else the "type" its data starts with."""
    if event.event is not None:
        return event.event
    if event.data is None:
        return None
    m = _RESPONSES_TYPE.search(event.raw, 0, 200)
    return m.group(1).decode("utf-8", "replace") if m else None


def _loads(text: str):
    """json.loads that answers None, not an exception, for what is not a JSON object."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_event(api: str, message: str, kind: str = "api_error", sequence: int = 0) -> bytes:
    """One SSE event in the provider's own error shape, e.g. after an upstream reset.

    The OpenAI SDK raises APIError(message) on it, the Anthropic SDK an APIStatusError
    whose body is the error object. `kind` is Anthropic's error type (api_error,
    overloaded_error, ...); OpenAI's stream errors carry type server_error.

    Responses: an `error` event numbered `sequence`. OpenAI documents its fields flat
    (code, message, param) but sends them nested under "error"; both are given, so clients
    written against either find the message, and the OpenAI SDK raises APIError on it.
    """
    if api == RESPONSES:
        err = {"type": "server_error", "code": "server_error", "message": message,
               "param": None}
        obj = {"type": "error", "sequence_number": sequence, "code": "server_error",
               "message": message, "param": None, "error": err}
        return b"event: error\ndata: " + _dumps(obj) + b"\n\n"
    if api == OPENAI:
        err = {"message": message, "type": "server_error", "param": None, "code": None}
        return b"data: " + _dumps({"error": err}) + b"\n\n"
    err = {"type": "error", "error": {"type": kind, "message": message}}
    return b"event: error\ndata: " + _dumps(err) + b"\n\n"


class StreamRewriter:
    """Transforms a provider SSE byte stream on its way to the client, event by event.

    With neither drop_usage nor footer it only frames and watches: feed() returns the very
    `data` object it was given whenever that ends on an event boundary (the normal case).
    Whatever the options, an incomplete trailing event is held until its end arrives, so
    the client only ever receives whole events and an error event can always follow.
    Beyond that, only the content-free closing events are held back (for the footer).

    footer: None or a callable (Usage) -> str|None; see the module docstring of footer.py.
    """

    def __init__(self, api: str, drop_usage: bool = False, footer=None):
        self.watcher = UsageWatcher(api)
        self.api = api
        self._parser = EventParser()
        self._drop_usage = bool(drop_usage) and api == OPENAI
        self._footer = footer
        self._footer_ok = footer is not None  # False once a footer is ruled out or done
        self._held = []  # raw bytes of events held back for the footer
        self._blind = False  # gave up framing: everything passes untouched
        self._template = None  # OpenAI: the finish chunk, whose id/model the footer copies
        self._text_blocks = set()  # Anthropic: indexes of text content blocks
        self._held_index = None  # Anthropic: index of the text block whose stop is held
        self._held_events = []  # Responses: the held events, parsed
        self._last_raw = b""  # Responses: the last whole event, for the error's number

    def feed(self, data: bytes) -> bytes:
        """Bytes to send to the client now (may be b"")."""
        if self._blind:
            return data
        parser = self._parser
        had_tail = parser._buf
        events = parser.feed(data)
        if len(parser._buf) > MAX_EVENT_BYTES:
            return self._go_blind(events)
        if events and self.api == RESPONSES:
            self._last_raw = events[-1].raw
        if not (self._drop_usage or self._footer_ok or self._held):
            observe = self.watcher._observe
            for e in events:
                observe(e)
            if not had_tail and not parser._buf:
                return data
            return b"".join([e.raw for e in events])
        handle = (self._openai_event if self.api == OPENAI else
                  self._responses_event if self.api == RESPONSES else self._anthropic_event)
        out = []
        for e in events:
            out.extend(handle(e))
        return b"".join(out)

    def close(self) -> bytes:
        """Flush at the end of the upstream body: held events, then any unterminated tail.

        A tail is still observed (a stream ending `data: [DONE]` without its blank line is
        complete) and forwarded, as the provider sent it.
        """
        tail = self._parser.tail()
        self._parser = EventParser()
        if tail and not self._blind:
            self.watcher._observe(_parse_event(tail))
        out = b"".join(self._held) + tail
        self._held = []
        self._footer_ok = False
        return out

    def abort(self, message: str) -> bytes:
        """Bytes that end the client's stream cleanly after the upstream failed mid-stream.

        Held events go out unchanged, an incomplete trailing event is dropped (it cannot be
        parsed) and the provider-shaped error event follows, so the client's SDK raises an
        error rather than silently returning a truncated answer.
        """
        out = b"".join(self._held)
        self._held = []
        self._footer_ok = False
        self._parser = EventParser()
        self.watcher.errored = True
        self.watcher.error_message = message
        if self.api == RESPONSES:  # numbered after the last event the client received
            seen = _SEQUENCE.findall(self._last_raw)
            return out + error_event(self.api, message, sequence=int(seen[-1]) + 1 if seen else 0)
        return out + error_event(self.api, message)

    def _go_blind(self, events) -> bytes:
        """Stop framing a body that is not SSE as we know it; send everything as it is."""
        self._blind = True
        self._footer_ok = False
        out = b"".join(self._held) + b"".join(e.raw for e in events) + self._parser.tail()
        self._held = []
        self._parser = EventParser()
        return out

    def _release(self, extra=()) -> list:
        """Give up the footer: the held events go out unchanged, then `extra`."""
        out = self._held + list(extra)
        self._held = []
        self._footer_ok = False
        return out

    def _footer_text(self):
        """The footer line for the usage seen so far, or None (a failing callable too)."""
        try:
            line = self._footer(self.watcher.usage)
        except Exception:  # the footer is an extra: never cost the user the answer
            log.exception("footer callable failed; stream sent without footer")
            return None
        return line if isinstance(line, str) and line else None

    # -- OpenAI chat completions -------------------------------------------------------

    def _openai_event(self, e) -> list:
        obj = self.watcher._observe(e)
        raw = self._strip_usage(e, obj) if self._drop_usage else e.raw
        if not self._footer_ok:
            return [raw]
        if self._held:
            return self._openai_holding(e, obj, raw)
        if e.data is None:
            return [raw]
        if _TOOL_CALLS.search(raw) or _OTHER_CHOICE.search(raw) or self.watcher.errored:
            return self._release([raw])  # tool call, n > 1 or error: no footer
        if obj is not None and self.watcher.stop_reason:
            if self.watcher.stop_reason in _NO_FOOTER_STOPS:
                return self._release([raw])
            self._template = obj
            self._held = [raw]
            return []
        return [raw]

    def _openai_holding(self, e, obj, raw) -> list:
        """After the finish chunk: wait for the usage chunk or [DONE], then add the footer."""
        if e.data is None:
            self._held.append(raw)
            return []
        done = e.data == "[DONE]"
        usage_chunk = obj is not None and obj.get("choices") == [] and "usage" in obj
        if not (done or usage_chunk) or self.watcher.errored:
            return self._release([raw])
        text = self._footer_text()
        if text is None:
            return self._release([raw])
        eol = b"\r\n" if self._held[0].endswith(b"\r\n") else b"\n"
        tmpl = self._template
        last = tmpl["choices"][0]
        delta = last.get("delta") if isinstance(last.get("delta"), dict) else {}
        footer = {"index": 0, "delta": {"content": "\n\n" + text}, "logprobs": None,
                  "finish_reason": None}
        if not (delta.get("content") or delta.get("refusal")):  # OpenAI's own empty finish chunk
            chunks = [self._chunk(tmpl, [footer], None)]
            return [b"data: " + _dumps(c) + eol + eol for c in chunks] + self._release([raw])
        # Some providers (Gemini) send the last words with the finish_reason: split that
        # chunk so the words come first and the footer chunk carries the finish_reason.
        footer["finish_reason"] = last["finish_reason"]
        words = [dict(last, finish_reason=None)] + list(tmpl["choices"][1:])
        usage = tmpl.get("usage")  # stays on the chunk with the finish_reason, where it was
        chunks = [self._chunk(tmpl, words, None, omit_usage=usage is not None),
                  self._chunk(tmpl, [footer], usage)]
        held, self._held = self._held[1:], []
        return [b"data: " + _dumps(c) + eol + eol for c in chunks] + held + self._release([raw])

    def _chunk(self, template: dict, choices: list, usage, omit_usage=False) -> dict:
        """A chunk like `template` (same id, model, created...) with other choices and usage."""
        chunk = {}
        for key, value in template.items():
            if key == "choices":
                value = choices
            elif key == "usage":
                if omit_usage or (usage is None and self._drop_usage):
                    continue
                value = usage
            elif key == "obfuscation":  # random padding of the original chunk
                continue
            chunk[key] = value
        return chunk

    def _strip_usage(self, e, obj) -> bytes:
        """Remove what include_usage added: the usage-only chunk and `"usage":null`."""
        raw = e.raw
        if e.data is None or b'"usage"' not in raw:
            return raw
        if obj is not None and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            return b""
        if raw.count(b'"usage"') != 1:
            return raw  # unsure which member is the top-level one: leave it
        out, n = _USAGE_NULL_AFTER.subn(b"", raw, 1)
        if n:
            return out
        return _USAGE_NULL_FIRST.sub(b"{", raw, 1)

    # -- Anthropic messages -------------------------------------------------------------

    def _anthropic_event(self, e) -> list:
        self.watcher._observe(e)
        name = e.event
        out = []
        if self._footer_ok and self._held:
            if name == "message_delta":
                return self._anthropic_footer(e.raw)
            if name == "ping" or e.data is None:
                self._held.append(e.raw)
                return []
            out = self._held  # another block follows: that stop was not the last one
            self._held = []
        if not self._footer_ok:
            return out + [e.raw]
        if name == "content_block_start":
            obj = _loads(e.data or "")
            block = obj.get("content_block") if obj else None
            if isinstance(block, dict) and block.get("type") == "text":
                self._text_blocks.add(obj.get("index"))
        elif name == "content_block_stop":
            obj = _loads(e.data or "")
            index = obj.get("index") if obj else None
            if index in self._text_blocks:
                self._held = [e.raw]
                self._held_index = index
                return out
        elif name == "error" or self.watcher.errored:
            return out + self._release([e.raw])
        return out + [e.raw]

    def _anthropic_footer(self, delta_raw: bytes) -> list:
        """The last block was text: emit footer delta, its stop, then message_delta."""
        if self.watcher.stop_reason in _NO_FOOTER_STOPS:
            return self._release([delta_raw])
        text = self._footer_text()
        if text is None:
            return self._release([delta_raw])
        eol = b"\r\n" if self._held[0].endswith(b"\r\n") else b"\n"
        body = {"type": "content_block_delta", "index": self._held_index,
                "delta": {"type": "text_delta", "text": "\n\n" + text}}
        event = b"event: content_block_delta" + eol + b"data: " + _dumps(body) + eol + eol
        return [event] + self._release([delta_raw])

    # -- OpenAI Responses ---------------------------------------------------------------

    def _responses_event(self, e) -> list:
        """Hold a text's closing events from its output_text.done on; a footer goes in at
        response.completed if no other output came after that text (see the module doc)."""
        obj = self.watcher._observe(e)
        if not self._footer_ok:
            return [e.raw]
        name = event_type(e)
        out = []
        if self._held:
            if e.data is None or name in _RESPONSES_TEXT_CLOSE:
                self._held.append(e.raw)
                self._held_events.append(e)
                return []
            if name in ("response.completed", "response.incomplete"):
                return self._responses_footer(e, obj)
            out, self._held, self._held_events = self._held, [], []  # more output follows
        if name in ("error", "response.failed") or self.watcher.errored:
            return out + self._release([e.raw])
        if name == "response.output_text.done":
            self._held, self._held_events = [e.raw], [e]
            return out
        return out + [e.raw]

    def _responses_footer(self, end, end_obj) -> list:
        """The held text is the answer's last output: one footer delta before its
        output_text.done, and the same words appended wherever the final text is repeated.
        The held events and the ending are renumbered (+1) after the inserted delta; none
        of them has reached the client yet, and nothing follows the ending."""
        events, self._held_events = self._held_events, []
        line = self._footer_text()
        done = _loads(events[0].data)
        if line is None or done is None or end_obj is None:
            return self._release([end.raw])
        add = "\n\n" + line
        item_id, index = done.get("item_id"), done.get("content_index")
        seq = done.get("sequence_number")
        response = end_obj.get("response")
        output = response.get("output") if isinstance(response, dict) else None
        last = output[-1] if isinstance(output, list) and output else None
        targets = [(done, None)]  # (object, the part in it that holds the final text)
        for e in events[1:]:
            obj = _loads(e.data) if e.data is not None else None
            if e.data is not None and obj is None:
                return self._release([end.raw])
            targets.append((obj, _final_part(event_type(e), obj, item_id, index)))
        targets.append((end_obj, _item_part(last, item_id, index)))
        if not (isinstance(seq, int) and isinstance(done.get("text"), str)
                and targets[-1][1] is not None):
            return self._release([end.raw])  # the answer does not end in this text
        delta = {"type": "response.output_text.delta", "sequence_number": seq,
                 "item_id": item_id, "output_index": done.get("output_index"),
                 "content_index": index, "delta": add, "logprobs": []}
        out = [_event_bytes(events[0], delta, "response.output_text.delta")]
        done["text"] += add
        for e, (obj, part) in zip(events + [end], targets):
            if obj is None:
                out.append(e.raw)  # a comment
                continue
            if part is not None:
                part["text"] += add
            if isinstance(obj.get("sequence_number"), int):
                obj["sequence_number"] += 1
            out.append(_event_bytes(e, obj))
        self._held = []
        self._footer_ok = False
        return out


def _item_part(item, item_id, index):
    """The output_text part `index` of the message output item `item_id`, or None."""
    if not (isinstance(item, dict) and item.get("type") == "message"
            and item.get("id") == item_id and isinstance(index, int)):
        return None
    content = item.get("content")
    part = content[index] if isinstance(content, list) and 0 <= index < len(content) else None
    if isinstance(part, dict) and part.get("type") == "output_text" and \
            isinstance(part.get("text"), str):
        return part
    return None


def _final_part(name, obj, item_id, index):
    """The part of a held closing event that repeats the final text, or None."""
    if name == "response.content_part.done" and obj.get("item_id") == item_id \
            and obj.get("content_index") == index:
        part = obj.get("part")
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            return part
    elif name == "response.output_item.done":
        return _item_part(obj.get("item"), item_id, index)
    return None


def _event_bytes(like, obj, name=None) -> bytes:
    """`obj` as an event framed like the event `like` (its `event:` line and line ends)."""
    eol = b"\r\n" if like.raw.endswith(b"\r\n") else b"\n"
    head = b""
    if like.event is not None:
        head = b"event: " + (name or like.event).encode("utf-8") + eol
    return head + b"data: " + _dumps(obj) + eol + eol
