"""The settings a request runs with, as one immutable snapshot.

Every setting that SIGHUP can change lives in a `Runtime`, built and validated in full from
a Config before anything uses it. The App swaps snapshots with one assignment and a
handler reads `app.runtime` once per request, so a request never sees half of an old
config and half of a new one, and a reload that fails (say a rejected pricing section)
changes nothing at all.

The cache store is the one resource a snapshot points to rather than owns: it is opened
the first time a config enables the cache and stays open until the process stops, so a
request still holding an older snapshot can always use the store that snapshot names.
"""

import collections

from . import pricing
from .budget import Budgets
from .compression import Settings
from .providers import Router

# Settings that only a restart applies (SIGHUP says so when they change).
RESTART_KEYS = ("proxy.host", "proxy.port", "db.path", "proxy.pid_file", "proxy.log_file",
                "proxy.workers",
                "proxy.connect_timeout", "proxy.read_timeout")

# The cache as one request sees it: `store` None when the cache is off (or failed to open),
# `shared` when all credentials read one scope, `anonymous` when keyless requests cache.
CachePolicy = collections.namedtuple("CachePolicy", "store secret shared anonymous")

Runtime = collections.namedtuple("Runtime", (
    "config", "router", "compression", "prices", "footer", "cache", "max_body",
    "client_timeout", "auth_token", "allowed_hosts", "budgets"))


def build(config, open_cache):
    """The snapshot for `config`; raises TokenpakError on anything invalid. `open_cache(config)`
    returns (store, secret) and is called only once every other setting is valid, so a
    rejected config opens nothing."""
    router = Router.from_config(config)
    prices = pricing.load_prices(config.pricing_overrides())
    budgets = Budgets.from_config(config)  # None: no budget set, nothing to check
    compression = Settings(enabled=config.get("compression.enabled"),
                           level=config.get("compression.level"),
                           threshold_tokens=config.get("compression.threshold_tokens"),
                           preserve_code=config.get("compression.preserve_code"),
                           preserve_json=config.get("compression.preserve_json"))
    store = secret = None
    if config.get("cache.enabled"):
        store, secret = open_cache(config)
    return Runtime(
        config=config, router=router, compression=compression, prices=prices,
        footer=config.get("footer.enabled"),
        cache=CachePolicy(store, secret, config.get("cache.scope") == "shared",
                          config.get("cache.anonymous")),
        max_body=config.get("proxy.max_request_bytes"),
        client_timeout=config.get("proxy.client_timeout") or None,
        auth_token=config.get("proxy.auth_token"),
        allowed_hosts=frozenset(host_name(h) for h in config.get("proxy.allowed_hosts") or ()),
        budgets=budgets)


def changed(old, new):
    """The names of the settings whose value differs between two Configs."""
    return [n for n in sorted(set(old.names()) | set(new.names()))
            if value(old, n) != value(new, n)]


def value(config, name):
    return config.get(name) if name in config.names() else None


def host_name(host):
    """The name part of a Host header, lower-case, without the port or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = name
    return host.rstrip(".")
