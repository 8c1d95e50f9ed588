"""A fake LLM provider: a real HTTP server speaking OpenAI's and Anthropic's wire formats.

OpenAI's are chat completions and the Responses API (POST /v1/responses, what Codex speaks:
the same event sequence, field shapes and `event:` lines as api.openai.com).

Tests point tokenpak at it and assert on what it received (`requests`) and on what the
official SDKs parsed. Each answer is deterministic: it echoes the last user message, so a
test can tell answers apart, and it reports usage the way the real provider does.

Scenarios are picked per request by the `x-fake` header (the SDKs send it with
`extra_headers`) or by the model name (`fake-<scenario>`):
  429      rate limited, with Retry-After and x-ratelimit-* headers
  500      a server error in the provider's shape
  slow     stream events 0.05 s apart (`x-fake-delay` overrides)
  reset    stream a few events, then reset the connection (RST)
  hang     accept the request and never answer
  tool     answer with a tool call instead of text (Responses: only when the last input
           item asks, i.e. is not a function_call_output, so a tool round trip ends)
  gzip     non-stream answer gzip-encoded
  hold     stream the first event, then stay silent watching the socket: counts in
           `FakeProvider.closed_by_peer` if the proxy closes the connection meanwhile
  gate     stream the first event, then wait for `FakeProvider.gate` before the rest (proves
           the client got the first event while the upstream was still going)
  truncate (Responses) end the stream cleanly but without response.completed
  linger   (Anthropic) send message_stop, then hold the stream open (as `hold`) before
           ending it, so a client can hang up after the final event but before the end
A key containing "bad" gets 401, as the real providers answer an invalid key.

Scripted answers, for the real coding-agent CLIs (tests/test_agents_cli.py): a CLI drives a
conversation of several requests (a tool call, then the answer once it ran the tool), so
`FakeProvider.script` holds (trigger, reply) rules. The first rule whose trigger occurs in
the request's last turn (the JSON text of its last message or input item that is not a
system or developer message: Claude Code appends one after the user's) answers, otherwise
the echo does. A reply is {"text": "..."} or {"tool": name, "input": {...}, "id": call id},
sent as a tool_use, a tool_calls entry or a function_call. A rule depends on the request
alone, never on what came before, so the same conversation gets the same answers directly
and through tokenpak. Each request's answered usage is kept on its `Recorded`.
"""

import base64
import gzip
import hashlib
import http.server
import json
import socket
import struct
import threading
import time

ANSWER_PREFIX = "Echo: "


class Recorded:
    """One request as the fake provider received it."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers          # [(name, value)] in arrival order
        self.body = body
        self.usage = None               # the usage the fake answered with, when it did

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self):
        return json.loads(self.body)


def _last_user_text(messages):
    for message in reversed(messages or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = []
            for part in content or []:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(part.get("text", ""))
                elif isinstance(part, dict) and part.get("type") == "tool_result":
                    texts.append("tool result")
            return " ".join(texts)
        if message.get("role") == "tool":
            return "tool result"
    return ""


def _last_input_text(items):
    """The Responses API's `input` (a string or a list of items) as _last_user_text reads
    messages: the last user text, or "tool result" after a function_call_output."""
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call_output":
            return "tool result"
        if item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or []
                            if isinstance(p, dict) and p.get("type") == "input_text")
    return ""


def _valid_chat(payload):
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return False
    return all(isinstance(m, dict) and isinstance(m.get("content"), (str, list, type(None)))
               for m in payload["messages"])


def usage_for(body):
    """Deterministic 'prompt tokens' for a body: its JSON size / 4."""
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


def responses_usage_for(body):
    """usage_for of a Responses body: its instructions and input."""
    return max(1, len(json.dumps([body.get("instructions"), body.get("input")])) // 4)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def __getattr__(self, name):
        if name.startswith("do_"):  # any other method (PROPFIND, ...) is echoed too
            return self.handle_any
        raise AttributeError(name)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = Recorded(self.command, self.path, list(self.headers.items()), body)
        fake = self.server.fake
        self.record = record
        with fake.lock:
            fake.requests.append(record)
        scenario = self.headers.get("x-fake", "")
        payload = None
        if body[:1] == b"{":
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
        if isinstance(payload, dict) and str(payload.get("model", "")).startswith("fake-"):
            scenario = scenario or payload["model"][5:]
        key = self.headers.get("x-api-key") or self.headers.get("Authorization", "")
        path = self.path.split("?", 1)[0]
        anthropic = path.startswith("/v1/messages") or path.endswith("/messages")
        if fake.delay_before:
            time.sleep(fake.delay_before)
        if scenario == "hang":
            time.sleep(fake.hang_seconds)
            self.close_connection = True
            return
        if "bad" in key:
            return self.error(401, anthropic, "authentication_error", "invalid x-api-key")
        if scenario == "429":
            return self.error(429, anthropic, "rate_limit_error", "rate limited",
                              [("Retry-After", "7"), ("x-ratelimit-remaining-requests", "0"),
                               ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:07Z")])
        if scenario == "500":
            return self.error(500, anthropic, "api_error", "internal server error")
        if (path.endswith("/chat/completions") or path.endswith("/messages")) and \
                not _valid_chat(payload):
            # What the real providers do with a body that is not their shape.
            return self.error(400, anthropic, "invalid_request_error",
                              "messages: expected a list of message objects")
        if path.endswith("/chat/completions") and isinstance(payload, dict):
            return self.openai(payload, scenario)
        if path.endswith("/responses") and self.command == "POST":
            if not (isinstance(payload, dict) and isinstance(payload.get("input"), (str, list))):
                return self.error(400, False, "invalid_request_error",
                                  "Missing required parameter: 'input'.")
            return self.responses(payload, scenario)
        if path.endswith("/messages/count_tokens") and isinstance(payload, dict):
            return self.send_body(200, json.dumps({"input_tokens": usage_for(payload)}))
        if path.endswith("/messages") and isinstance(payload, dict):
            return self.anthropic(payload, scenario)
        if path.endswith("/models"):
            return self.send_body(200, json.dumps({"data": [{"id": "gpt-4o", "object": "model"}],
                                                   "object": "list"}))
        # Anything else: describe what arrived, so pass-through can be checked byte for byte.
        echo = {"method": self.command, "path": self.path, "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "body_b64": base64.b64encode(body).decode()}
        self.send_body(200, json.dumps(echo), [("X-Fake-Echo", "1")])

    # -- helpers -------------------------------------------------------------------------
    def send_body(self, status, text, extra=(), content_type="application/json"):
        data = text.encode() if isinstance(text, str) else text
        head = ["HTTP/1.1 %d %s" % (status, http.server.BaseHTTPRequestHandler.responses.get(
            status, ("X",))[0]), "Content-Type: " + content_type,
            "Content-Length: %d" % len(data), "x-request-id: req_fake123"]
        head += ["%s: %s" % pair for pair in extra]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)

    def error(self, status, anthropic, kind, message, extra=()):
        if anthropic:
            obj = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            obj = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
        self.send_body(status, json.dumps(obj), extra)

    def start_stream(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                         b"x-request-id: req_fakestream\r\n\r\n")

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")

    def hold(self):
        """Send nothing for up to hold_seconds; stop as soon as the peer closes."""
        fake = self.server.fake
        deadline = time.monotonic() + fake.hold_seconds
        self.connection.settimeout(0.02)
        while time.monotonic() < deadline:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        else:
            return
        with fake.lock:
            fake.closed_by_peer += 1
        raise ConnectionResetError("peer closed while held")

    def reset(self):
        """Abort the connection with a TCP RST, as a crashed upstream would."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def delay(self, scenario):
        if scenario == "hold":
            self.hold()
        if scenario == "gate":
            self.server.fake.gate.wait(10)
        if scenario == "slow" or self.headers.get("x-fake-delay"):
            time.sleep(float(self.headers.get("x-fake-delay") or self.server.fake.slow_delay))

    # -- OpenAI --------------------------------------------------------------------------
    def openai(self, body, scenario):
        reply = self.server.fake.scripted(body.get("messages"))
        text = reply.get("text") or ANSWER_PREFIX + _last_user_text(body.get("messages"))
        prompt = usage_for(body)
        words = text.split(" ")
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": self.server.fake.cached_tokens}}
        self.record.usage = usage
        model = body.get("model", "gpt-4o")
        cid = "chatcmpl-fake%d" % len(self.server.fake.requests)
        call = {"id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
        if "tool" in reply:
            call = {"id": reply.get("id", "call_1"), "name": reply["tool"],
                    "arguments": json.dumps(reply.get("input", {}))}
            scenario = "tool"
        if scenario == "tool":
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": text, "refusal": None}
            finish = "stop"
        if not body.get("stream"):
            obj = {"id": cid, "object": "chat.completion", "created": 1700000000, "model": model,
                   "choices": [{"index": 0, "message": message, "logprobs": None,
                                "finish_reason": finish}],
                   "usage": usage, "system_fingerprint": "fp_fake"}
            data = json.dumps(obj).encode()
            if scenario == "gzip":
                return self.send_body(200, gzip.compress(data), [("Content-Encoding", "gzip")])
            return self.send_body(200, data)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000,
                "model": model, "system_fingerprint": "fp_fake"}

        def event(choices, usage_value=None, with_usage=include_usage):
            obj = dict(base, choices=choices)
            if with_usage:
                obj["usage"] = usage_value
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        self.start_stream()
        self.chunk(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}]))
        if scenario == "tool":
            self.chunk(event([{"index": 0, "delta": {"tool_calls": [{
                "index": 0, "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                "logprobs": None, "finish_reason": None}]))
        else:
            for i, word in enumerate(words):
                self.delay(scenario)
                if scenario == "reset" and i == 2:
                    return self.reset()
                piece = word if i == 0 else " " + word
                self.chunk(event([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                   "finish_reason": None}]))
        self.chunk(event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
        if include_usage:
            self.chunk(event([], usage))
        self.chunk(b"data: [DONE]\n\n")
        self.end_stream()

    # -- OpenAI Responses --------------------------------------------------------------
    def responses(self, body, scenario):
        """POST /v1/responses: one message output item (or a function_call), usage at the end."""
        fake = self.server.fake
        n = len(fake.requests)
        items = body.get("input")
        reply = fake.scripted(items)
        tool_turn = "tool" in reply or scenario == "tool" and not (
            isinstance(items, list) and items and isinstance(items[-1], dict)
            and items[-1].get("type") == "function_call_output")
        text = reply.get("text") or ANSWER_PREFIX + _last_input_text(items)
        words = text.split(" ")
        prompt = responses_usage_for(body)
        usage = {"input_tokens": prompt,
                 "input_tokens_details": {"cached_tokens": fake.cached_tokens},
                 "output_tokens": len(words) + fake.reasoning_tokens,  # reasoning included
                 "output_tokens_details": {"reasoning_tokens": fake.reasoning_tokens},
                 "total_tokens": prompt + len(words) + fake.reasoning_tokens}
        self.record.usage = usage
        if tool_turn:
            item = {"id": "fc_fake%d" % n, "type": "function_call", "status": "completed",
                    "arguments": json.dumps(reply.get("input", {})) if "tool" in reply
                    else "{\"city\":\"Paris\"}",
                    "call_id": reply.get("id", "call_fake%d" % n),
                    "name": reply.get("tool", "get_weather")}
        else:
            item = {"id": "msg_fake%d" % n, "type": "message", "status": "completed",
                    "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                 "text": text}], "role": "assistant"}
        response = {
            "id": "resp_fake%d" % n, "object": "response", "created_at": 1700000000,
            "status": "completed", "background": False, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model", "gpt-4o"), "output": [item],
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": body.get("store", True), "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": body.get("tools", []), "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}
        if not body.get("stream"):
            return self.send_body(200, json.dumps(response))
        seq = [0]

        def event(kind, **fields):
            obj = dict({"type": kind, "sequence_number": seq[0]}, **fields)
            seq[0] += 1
            self.chunk(("event: %s\ndata: %s\n\n" % (kind, json.dumps(
                obj, separators=(",", ":")))).encode())

        pending = dict(response, status="in_progress", output=[], usage=None)
        self.start_stream()
        event("response.created", response=pending)
        event("response.in_progress", response=pending)
        if tool_turn:
            event("response.output_item.added", output_index=0,
                  item=dict(item, status="in_progress", arguments=""))
            event("response.function_call_arguments.delta", item_id=item["id"],
                  output_index=0, delta=item["arguments"])
            event("response.function_call_arguments.done", item_id=item["id"],
                  output_index=0, arguments=item["arguments"])
        else:
            event("response.output_item.added", output_index=0,
                  item=dict(item, status="in_progress", content=[]))
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            event("response.content_part.added", item_id=item["id"], output_index=0,
                  content_index=0, part=part)
            for i, word in enumerate(words):
                self.delay(scenario)
                if scenario == "reset" and i == 2:
                    return self.reset()
                event("response.output_text.delta", item_id=item["id"], output_index=0,
                      content_index=0, delta=word if i == 0 else " " + word, logprobs=[])
            event("response.output_text.done", item_id=item["id"], output_index=0,
                  content_index=0, text=text, logprobs=[])
            event("response.content_part.done", item_id=item["id"], output_index=0,
                  content_index=0, part=dict(part, text=text))
        event("response.output_item.done", output_index=0, item=item)
        if scenario == "truncate":
            return self.end_stream()  # the body ends without response.completed
        event("response.completed", response=response)
        self.end_stream()

    # -- Anthropic -----------------------------------------------------------------------
    def anthropic(self, body, scenario):
        fake = self.server.fake
        reply = fake.scripted(body.get("messages"))
        text = reply.get("text") or ANSWER_PREFIX + _last_user_text(body.get("messages"))
        prompt = usage_for(body)
        words = text.split(" ")
        model = body.get("model", "claude-sonnet-4-6")
        mid = "msg_fake%d" % len(fake.requests)
        tool = {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                "input": {"city": "Paris"}}
        if "tool" in reply:
            tool = {"type": "tool_use", "id": reply.get("id", "toolu_1"), "name": reply["tool"],
                    "input": reply.get("input", {})}
            scenario = "tool"
        if scenario == "tool":
            content = [tool]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": text}]
            stop = "end_turn"
        usage = {"input_tokens": prompt, "output_tokens": len(words),
                 "cache_creation_input_tokens": fake.cache_write_tokens,
                 "cache_read_input_tokens": fake.cached_tokens}
        if fake.cache_write_1h_tokens:  # the TTL split, as Anthropic reports it
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": fake.cache_write_tokens - fake.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": fake.cache_write_1h_tokens}
        self.record.usage = usage
        if not body.get("stream"):
            obj = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": stop, "stop_sequence": None,
                   "usage": usage}
            return self.send_body(200, json.dumps(obj))

        def event(name, obj):
            return ("event: %s\ndata: %s\n\n" % (name, json.dumps(obj))).encode()

        self.start_stream()
        start_usage = dict(usage, output_tokens=1)
        self.chunk(event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}))
        if scenario == "tool":
            self.chunk(event("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": dict(tool, input={})}))
            self.chunk(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "input_json_delta",
                                       "partial_json": json.dumps(tool["input"])}}))
        else:
            self.chunk(event("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}))
            self.chunk(event("ping", {"type": "ping"}))
            for i, word in enumerate(words):
                self.delay(scenario)
                if scenario == "reset" and i == 2:
                    return self.reset()
                piece = word if i == 0 else " " + word
                self.chunk(event("content_block_delta", {"type": "content_block_delta",
                                 "index": 0, "delta": {"type": "text_delta", "text": piece}}))
        self.chunk(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        self.chunk(event("message_delta", {"type": "message_delta",
                         "delta": {"stop_reason": stop, "stop_sequence": None},
                         "usage": {"output_tokens": len(words)}}))
        self.chunk(event("message_stop", {"type": "message_stop"}))
        if scenario == "linger":
            self.hold()
        self.end_stream()


class FakeProvider:
    """The fake provider server; `url` is its base URL, `requests` what it received."""

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()
        self.slow_delay = 0.05
        self.hang_seconds = 30
        self.hold_seconds = 20
        self.closed_by_peer = 0
        self.delay_before = 0.0
        self.cached_tokens = 0
        self.cache_write_tokens = 0
        self.cache_write_1h_tokens = 0  # of those, written to the 1-hour cache
        self.reasoning_tokens = 0
        self.script = []
        self.gate = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def reset_state(self):
        with self.lock:
            self.requests.clear()
        self.gate = threading.Event()
        self.closed_by_peer = 0
        self.delay_before = 0.0
        self.cached_tokens = 0
        self.cache_write_tokens = 0
        self.cache_write_1h_tokens = 0
        self.reasoning_tokens = 0
        self.script = []

    def scripted(self, items):
        """The scripted reply for a conversation (see the module doc), or {} for the echo."""
        turns = [item for item in items or [] if isinstance(item, dict) and
                 item.get("role") not in ("system", "developer")]
        if not self.script or not turns:
            return {}
        last = json.dumps(turns[-1])
        for trigger, reply in self.script:
            if trigger in last:
                return reply
        return {}

    def count(self, path_suffix=""):
        with self.lock:
            return sum(1 for r in self.requests if r.path.split("?")[0].endswith(path_suffix))

    def last(self):
        with self.lock:
            return self.requests[-1]
