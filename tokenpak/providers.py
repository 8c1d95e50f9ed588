"""Which provider a request goes to, and the exact upstream URL.

Clients keep their own API keys and only change their base URL, so the request itself must
say where it goes. The rules, first match wins:

1. explicit: an `X-TokenPak-Provider: <name>` header, or a model name starting with one of a
   custom provider's `models` prefixes;
2. the credential (`credential()`: x-api-key, Authorization with any scheme, Azure's api-key,
   x-goog-api-key, a `?key=` query): `sk-ant-` -> anthropic (API keys and Claude Code's OAuth
   tokens alike), `AIza` -> google, any other `sk-` -> openai;
3. the path: `/v1/messages...` is Anthropic's API;
4. the model name: `claude-*` -> anthropic, `gemini-*` -> google, `gpt-*`, `o1..o9*`,
   `chatgpt-*`, `text-embedding-*` ... -> openai;
5. `proxy.passthrough_url`, for everything else.

Which *shape* a body has (OpenAI chat, OpenAI Responses or Anthropic messages) depends on the
path, not the provider: an OpenAI-format request with an Anthropic key goes to Anthropic's own
OpenAI-compatible endpoint and is still an OpenAI-shaped body. `/v1/responses` (all that Codex
speaks) routes like chat completions: an OpenAI key or a `gpt-*` model goes to OpenAI.

The upstream URL is the configured provider URL plus the client's path, and nothing else: the
request target must be origin-form (`/...`, `check_target`), so a target such as
`@127.0.0.1:9/x`, `:9/x` or `.attacker.tld/x` cannot name another host, and dot segments
cannot climb out of a provider's base path.
"""

import re
from urllib.parse import parse_qsl, unquote, urlsplit

BUILTIN = ("openai", "anthropic", "google")
PROVIDER_HEADER = "x-tokenpak-provider"

_MODEL_RULES = (
    (re.compile(r"^(claude)"), "anthropic"),
    (re.compile(r"^(gemini|gemma|learnlm)"), "google"),
    (re.compile(r"^(gpt-|o\d|chatgpt-|text-embedding-|davinci|babbage|dall-e|whisper|tts-|"
                r"omni-moderation|text-moderation|computer-use)"), "openai"),
)


class Route:
    """Where one request goes. `api` names the body shape tokenpak understands ("openai"
    chat completions, "responses" or "anthropic" messages) or is None: forward the body
    untouched."""

    __slots__ = ("provider", "url", "host", "api")

    def __init__(self, provider, url, host, api):
        self.provider = provider
        self.url = url
        self.host = host
        self.api = api

    def __repr__(self):
        return "Route(%s, %s, api=%s)" % (self.provider, self.url, self.api)


class NoRoute(Exception):
    """No rule matched and no passthrough URL is configured."""


# Headers that carry a credential, as providers and gateways use them. Authorization counts
# with any scheme (Bearer, Basic, Token, ...): the whole value is the credential.
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "api-key", "x-goog-api-key")
CREDENTIAL_PARAMS = ("key", "api_key", "api-key")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*[ \t]+")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:key|api[_-]?key|access_token|token|sig)=)[^&#\s\"']*")
# No word boundary: a key glued to other text (after an escape sequence, "Bearersk-...") is
# still a key; redacting a little too much of an error message costs nothing.
_SECRET_TEXT = re.compile(r"(?:sk-[A-Za-z0-9_-]{6,}|AIza[0-9A-Za-z_-]{8,})")


def credential(headers, path=""):
    """Everything in the request that identifies the caller to a provider, as one string,
    or None when the request carries no credential at all.

    `headers` is a mapping with lower-case names; `path` the request target (Gemini's
    `?key=`). Every form counts: a Bearer token is its bare token (the same key as in
    x-api-key), any other Authorization scheme its whole value (`Basic abc` is not the key
    `abc`); several different values are all part of it. So two requests share a cache
    scope only when they carry the very same credentials. The value is only ever used
    (hashed) to scope the cache: it is never logged or stored."""
    values = []
    for name in CREDENTIAL_HEADERS:
        value = (headers.get(name) or "").strip()
        if value:
            if name == "authorization" and value[:6].lower() == "bearer" \
                    and value[6:7] in (" ", "\t"):
                value = value[7:].strip(" \t")
            values.append(value)
    query = path.partition("?")[2]
    if query:
        values.extend(value for name, value in parse_qsl(query) if name in CREDENTIAL_PARAMS)
    values = sorted(set(v for v in values if v))
    return "\n".join(values) if values else None


def api_key(headers, path=""):
    """The bare key or token the client sent (for routing by its prefix), or None."""
    for name in CREDENTIAL_HEADERS:
        value = (headers.get(name) or "").strip()
        if value:
            if name == "authorization":
                value = _SCHEME.sub("", value, count=1)
            return value
    query = path.partition("?")[2]
    for name, value in parse_qsl(query) if query else ():
        if name in CREDENTIAL_PARAMS:
            return value
    return None


def redact(text):
    """`text` with anything that looks like a credential replaced by ***: query parameters
    such as `?key=` and API keys (sk-..., AIza...). For error messages and log lines."""
    if not text:
        return text
    return _SECRET_TEXT.sub("***", _SECRET_PARAM.sub(r"\1***", text))


def check_target(target):
    """None if the request target is a plain origin-form path (RFC 9112 3.2.1), else why
    not. Refused: anything not starting with a single `/` (absolute-form, `@host`, `:port`,
    `.domain`, `//host`), a backslash, a fragment, and `.`/`..` segments, encoded or not,
    which upstream servers would resolve out of a provider's base path."""
    if not target.startswith("/") or target.startswith("//"):
        return "the request target must be a path starting with a single /"
    path = target.partition("?")[0]
    if "\\" in path or "#" in target:
        return "backslashes and fragments are not allowed in the request target"
    decoded = unquote(unquote(path))  # twice: some servers decode %252e to %2e to .
    if "\\" in decoded or any(seg in (".", "..") for seg in re.split(r"[/\\]", decoded)):
        return "dot segments are not allowed in the request target"
    return None


def api_of(path):
    """The body shape for a path: "openai", "responses", "anthropic" or None (unknown: pass
    it through). Only the create endpoints count: `/v1/responses/{id}` and its sub-paths
    (retrieve, cancel, input_items) are plain pass-through."""
    bare = path.split("?", 1)[0].rstrip("/")
    if bare.endswith("/chat/completions"):
        return "openai"
    if bare.endswith("/responses"):
        return "responses"
    if bare.endswith("/v1/messages") or bare == "/messages":
        return "anthropic"
    return None


def custom_provider_for_model(model, providers):
    """The provider whose configured `models` prefixes match the model name, or None."""
    if not isinstance(model, str) or not model:
        return None
    for name, spec in providers.items():
        for prefix in spec.get("models") or ():
            if model.startswith(prefix):
                return name
    return None


def provider_for_model(model):
    """The provider a well-known model family belongs to; None when the name says nothing."""
    if not isinstance(model, str) or not model:
        return None
    for pattern, name in _MODEL_RULES:
        if pattern.match(model):
            return name
    return None


def _provider_for_key(key):
    if not key:
        return None
    if key.startswith("sk-ant-"):
        return "anthropic"
    if key.startswith("AIza"):
        return "google"
    if key.startswith("sk-"):
        return "openai"
    return None


def choose(path, headers, model_of, providers, passthrough_url):
    """Pick the provider name for a request (rules 1-5 of the module docstring).

    `model_of` is a function returning the body's model name: the body is only parsed
    when the credential and the path have not decided already."""
    explicit = headers.get(PROVIDER_HEADER)
    if explicit:
        if explicit not in providers:
            raise NoRoute("unknown provider %r in X-TokenPak-Provider (configured: %s)"
                          % (explicit, ", ".join(sorted(providers))))
        return explicit
    custom = {n: s for n, s in providers.items() if s.get("models")}
    if custom:
        name = custom_provider_for_model(model_of(), custom)
        if name:
            return name
    name = _provider_for_key(api_key(headers, path))
    if name:
        return name
    if api_of(path) == "anthropic" or path.startswith("/v1/messages"):
        return "anthropic"
    name = provider_for_model(model_of())
    if name:
        return name
    if passthrough_url:
        return "passthrough"
    raise NoRoute("cannot tell which provider this request is for: no recognisable API key, "
                  "path or model name, and proxy.passthrough_url is not set")


def upstream_url(base_url, path):
    """Join a provider URL and the client's path.

    A provider URL with a base path (Gemini's https://.../v1beta/openai) takes the place of
    the client's leading /v1, so `/v1/chat/completions` becomes
    `.../v1beta/openai/chat/completions`; a bare host gets the path as it came. The path
    must have passed check_target: the result's scheme, host and port are the base's."""
    if check_target(path) is not None:
        raise NoRoute("invalid request target")
    base = base_url.rstrip("/")
    base_path = urlsplit(base).path
    if base_path and base_path != "/":
        if path == "/v1" or path.startswith(("/v1/", "/v1?")):
            path = path[3:]
    return base + path


class Router:
    """The routing table built from the config; cheap to call once per request."""

    def __init__(self, providers, passthrough_url=""):
        self.providers = providers
        self.passthrough_url = passthrough_url
        self._hosts = {}

    @classmethod
    def from_config(cls, config):
        return cls(config.providers(), config.get("proxy.passthrough_url"))

    def route(self, path, headers, model_of):
        name = choose(path, headers, model_of, self.providers, self.passthrough_url)
        base = self.passthrough_url if name == "passthrough" else self.providers[name]["url"]
        if not base:
            raise NoRoute("provider %r has no URL: set proxy.providers.%s.url" % (name, name))
        host = self._hosts.get(base)
        if host is None:
            host = self._hosts[base] = urlsplit(base).netloc
        return Route(name, upstream_url(base, path), host, api_of(path))
