"""Reloading the config (SIGHUP) is all or nothing: runtime.py builds the whole snapshot
before App.reload swaps it in, so a config that loads but is rejected later changes no
setting at all, and a good one changes them all at once."""

import logging

import pytest

from helpers import openai_client, proxy_settings
from tokenpak import config as configmod
from tokenpak import lifecycle
from tokenpak.errors import TokenpakError


def load(fake, tmp_path, **overrides):
    settings = proxy_settings(fake.url, tmp_path, **overrides)
    return configmod.load(settings, environ={}, path=str(tmp_path / "none.json"))


def ask(proxy, text):
    reply = openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}])
    return reply.headers, reply.parse().choices[0].message.content


def test_a_rejected_pricing_section_changes_nothing(make_proxy, fake, tmp_path, caplog):
    """The half-apply of issue 12: the config loads, but a model priced without an output
    price is rejected when the price table is built. Nothing of it may take effect."""
    proxy = make_proxy(cache__enabled=True)
    app = proxy.app
    before = app.runtime
    store = before.cache.store
    assert store is not None and ask(proxy, "warm")[0]["x-tokenpak-cache"] == "miss"
    bad = load(fake, tmp_path, cache__enabled=False, footer__enabled=True,
               proxy__max_request_bytes=10, proxy__auth_token="new-token",
               compression__enabled=False, **{"pricing.new-model.input": 1.0})
    with pytest.raises(TokenpakError, match="output"):
        app.reload(bad)
    with caplog.at_level(logging.ERROR, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, lambda: bad)
    assert "reload failed, keeping the running settings" in caplog.text
    now = app.runtime
    assert now is before
    assert now.config is proxy.config and now.max_body == proxy.config.get(
        "proxy.max_request_bytes")
    assert now.cache.store is store and now.footer is False and not now.auth_token
    assert now.compression == before.compression and now.prices is before.prices
    assert app.recorder.prices is before.prices
    # The process still answers, with the old settings: no auth token, the cache on.
    headers, text = ask(proxy, "warm")
    assert (headers["x-tokenpak-cache"], text) == ("hit", "Echo: warm")
    assert fake.count("/chat/completions") == 1


def test_a_good_reload_swaps_everything_and_names_what_needs_a_restart(make_proxy, fake,
                                                                       tmp_path):
    proxy = make_proxy(cache__enabled=True)
    app = proxy.app
    store = app.runtime.cache.store
    good = load(fake, tmp_path, cache__enabled=False, proxy__read_timeout=9,
                proxy__max_request_bytes=4096, **{"pricing.new-model.input": 1.0,
                                                  "pricing.new-model.output": 2.0})
    assert app.reload(good) == ["proxy.read_timeout"]
    assert app.runtime.config is good and app.runtime.max_body == 4096
    assert app.runtime.cache.store is None and "new-model" in app.runtime.prices
    headers, text = ask(proxy, "after")
    assert (headers["x-tokenpak-cache"], text) == ("bypass", "Echo: after")
    # Turned on again, the cache is the same store: it was never closed under a request.
    assert app.reload(load(fake, tmp_path, cache__enabled=True)) == ["proxy.read_timeout"]
    assert app.runtime.cache.store is store
