"""The routing table: which provider and URL each request goes to."""

import pytest

from tokenpak import config as configmod
from tokenpak.providers import NoRoute, Router, api_of, credential, upstream_url

PROVIDERS = {
    "openai": {"url": "https://api.openai.com", "models": []},
    "anthropic": {"url": "https://api.anthropic.com", "models": []},
    "google": {"url": "https://generativelanguage.googleapis.com/v1beta/openai", "models": []},
    "groq": {"url": "https://api.groq.com/openai", "models": ["llama-", "mixtral-"]},
}


def route(path, headers=None, model=None, passthrough=""):
    router = Router(PROVIDERS, passthrough)
    return router.route(path, {k.lower(): v for k, v in (headers or {}).items()},
                        lambda: model)


@pytest.mark.parametrize("headers,path,model,provider,url", [
    # credential prefix decides first
    ({"Authorization": "Bearer sk-ant-api03-x"}, "/v1/messages", None, "anthropic",
     "https://api.anthropic.com/v1/messages"),
    ({"x-api-key": "sk-ant-api03-x"}, "/v1/messages?beta=true", None, "anthropic",
     "https://api.anthropic.com/v1/messages?beta=true"),
    ({"Authorization": "Bearer sk-proj-abc"}, "/v1/chat/completions", "claude-x", "openai",
     "https://api.openai.com/v1/chat/completions"),
    ({"Authorization": "Bearer AIzaSyX"}, "/v1/chat/completions", "gpt-4o", "google",
     "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
    # an Anthropic key on an OpenAI-format path: Anthropic's OpenAI-compatible endpoint
    ({"Authorization": "Bearer sk-ant-api03-x"}, "/v1/chat/completions", "claude-sonnet-4-6",
     "anthropic", "https://api.anthropic.com/v1/chat/completions"),
    # Claude Code's OAuth tokens
    ({"Authorization": "Bearer sk-ant-oat01-x"}, "/v1/models", None, "anthropic",
     "https://api.anthropic.com/v1/models"),
    # then the path
    ({"Authorization": "Bearer opaque-token"}, "/v1/messages/count_tokens", None, "anthropic",
     "https://api.anthropic.com/v1/messages/count_tokens"),
    # then the model name
    ({}, "/v1/chat/completions", "claude-opus-4-6", "anthropic",
     "https://api.anthropic.com/v1/chat/completions"),
    ({}, "/v1/chat/completions", "gemini-2.5-pro", "google",
     "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
    ({}, "/v1/chat/completions", "o3-mini", "openai",
     "https://api.openai.com/v1/chat/completions"),
    ({}, "/v1/chat/completions", "gpt-4o", "openai",
     "https://api.openai.com/v1/chat/completions"),
    # custom providers: explicit model prefixes beat the credential
    ({"Authorization": "Bearer sk-groq"}, "/v1/chat/completions", "llama-3.3-70b", "groq",
     "https://api.groq.com/openai/chat/completions"),
    # and the explicit header beats everything
    ({"X-TokenPak-Provider": "groq", "Authorization": "Bearer sk-x"}, "/v1/models", None,
     "groq", "https://api.groq.com/openai/models"),
])
def test_routing_table(headers, path, model, provider, url):
    chosen = route(path, headers, model)
    assert (chosen.provider, chosen.url) == (provider, url)


def test_passthrough_for_unknown_requests():
    chosen = route("/custom/thing", {"Authorization": "Bearer opaque"}, None,
                   passthrough="http://127.0.0.1:9000/base")
    assert chosen.provider == "passthrough"
    assert chosen.url == "http://127.0.0.1:9000/base/custom/thing"


def test_no_route_without_passthrough_says_what_to_set():
    with pytest.raises(NoRoute, match="proxy.passthrough_url"):
        route("/custom/thing", {}, None)


def test_unknown_explicit_provider_is_an_error():
    with pytest.raises(NoRoute, match="unknown provider 'nope'"):
        route("/v1/models", {"X-TokenPak-Provider": "nope"})


def test_model_is_only_parsed_when_needed():
    calls = []
    router = Router({k: v for k, v in PROVIDERS.items() if k != "groq"})
    router.route("/v1/chat/completions", {"authorization": "Bearer sk-abc"},
                 lambda: calls.append(1))
    assert calls == []


@pytest.mark.parametrize("base,path,expected", [
    ("https://api.openai.com", "/v1/chat/completions", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/", "/v1/models", "https://api.openai.com/v1/models"),
    ("https://h/v1beta/openai", "/v1/chat/completions", "https://h/v1beta/openai/chat/completions"),
    ("https://h/v1beta/openai/", "/v1?x=1", "https://h/v1beta/openai?x=1"),
    ("https://h/base", "/other", "https://h/base/other"),
])
def test_upstream_url_maps_v1_onto_base_path(base, path, expected):
    assert upstream_url(base, path) == expected


def test_credential_sources():
    assert credential({"x-api-key": "k1"}) == "k1"
    assert credential({"authorization": "Bearer k2"}) == "k2"
    assert credential({"authorization": "bearer k3 "}) == "k3"
    # Any other scheme is a credential too, distinct from the bare value.
    assert credential({"authorization": "Basic abc"}) == "Basic abc"
    assert credential({}) is None


def test_api_shape_follows_the_path():
    assert api_of("/v1/chat/completions") == "openai"
    assert api_of("/v1beta/openai/chat/completions") == "openai"
    assert api_of("/v1/messages?beta=true") == "anthropic"
    assert api_of("/v1/messages/count_tokens") is None
    assert api_of("/v1/embeddings") is None


def test_router_from_config_includes_custom_providers(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"proxy": {"providers": {"local": {"url": "http://127.0.0.1:11434/v1",'
                    ' "models": "qwen,llama"}}}}')
    config = configmod.load(environ={}, path=str(path))
    router = Router.from_config(config)
    chosen = router.route("/v1/chat/completions", {}, lambda: "qwen2.5")
    assert chosen.provider == "local"
    assert chosen.url == "http://127.0.0.1:11434/v1/chat/completions"
