"""Configuration: one schema, four sources, one precedence.

Every setting tokenpak reads is declared once in SCHEMA below, with its type, default,
environment variable and a one-line help. The CLI (`tokenpak config ...`), the man page and
the tests all read this table, so a key cannot exist in one place and not the others.

Sources, strongest first: command-line flags > environment > the JSON file at
~/.tokenpak/config.json (or $TOKENPAK_CONFIG) > defaults. The file is nested JSON, as the
seed docs show (`{"proxy": {"port": 8766}}`); dotted names (`proxy.port`) address it.
Some families of keys carry a user-chosen name in the middle: `proxy.providers.<name>.url`
(custom providers), `pricing.<model>.<field>`, `keys.<id>.name` (a display name for a
key id), `budget.tags.<tag>.*` and `budget.keys.<id>.*` (model names and tags may
contain dots, so those name segments are opaque).
"""

import difflib
import json
import os
import re
import tempfile

from .errors import ExitStatus, TokenpakError

# The compression levels, mildest first, and other names for them. Defined here, not in
# compression.py (which imports them), so reading a config does not load the compressor.
LEVELS = ("strict", "hybrid", "aggressive")
LEVEL_ALIASES = {"balanced": "hybrid"}
LEVEL_NAMES = tuple(name for level in LEVELS for name in
                    (level,) + tuple(a for a, to in LEVEL_ALIASES.items() if to == level))


class Key:
    """One setting: its dotted name, type, default, environment variable and help."""

    __slots__ = ("name", "type", "default", "help", "env", "choices", "unit", "low", "high")

    def __init__(self, name, type, default, help, env=None, choices=None, unit=None,
                 low=0, high=None):
        self.name = name
        self.type = type  # "str" | "int" | "float" | "bool" | "path" | "choice" | "list"
        self.default = default
        self.help = help
        self.env = env
        self.choices = choices
        # Numbers: "bytes" or "MiB" (a size: 20MB, 512KB), "seconds" (a duration: 30s, 1d)
        # or None (a plain count); every number has a range, checked wherever it is set.
        self.unit = unit
        self.low = low
        self.high = high

    def __repr__(self):
        return "Key(%r)" % self.name


_KEYS = [
    Key("proxy.host", "str", "127.0.0.1", "address to listen on; non-loopback exposes the proxy",
        env="TOKENPAK_HOST"),
    Key("proxy.port", "int", 8766,
        "TCP port to listen on (0: any free port; `status` finds it in the pid file)",
        env="TOKENPAK_PORT", high=65535),
    Key("proxy.providers.openai.url", "str", "https://api.openai.com",
        "upstream URL for OpenAI", env="TOKENPAK_OPENAI_URL"),
    Key("proxy.providers.anthropic.url", "str", "https://api.anthropic.com",
        "upstream URL for Anthropic", env="TOKENPAK_ANTHROPIC_URL"),
    Key("proxy.providers.google.url", "str",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "upstream URL for Gemini's OpenAI-compatible API", env="TOKENPAK_GOOGLE_URL"),
    Key("proxy.providers.<name>.url", "str", None,
        "upstream URL of a custom provider (a base path replaces the client's /v1)"),
    Key("proxy.providers.<name>.models", "list", None,
        "comma-separated model-name prefixes routed to the custom provider <name>"),
    Key("proxy.passthrough_url", "str", "",
        "upstream for requests no rule recognises (empty: answer 400)",
        env="TOKENPAK_PASSTHROUGH_URL"),
    Key("proxy.max_request_bytes", "int", 10 * 1024 * 1024,
        "largest request body accepted (a size: 10MB); larger ones get 413 unread",
        unit="bytes", low=1, high=1 << 34),
    Key("proxy.connect_timeout", "float", 10.0,
        "seconds to wait for an upstream connection (a duration: 10s)",
        unit="seconds", low=0.001, high=3600),
    Key("proxy.read_timeout", "float", 600.0,
        "seconds to wait for upstream data before answering 504 (a duration: 10m)",
        unit="seconds", low=0.001, high=86400),
    Key("proxy.client_timeout", "float", 120.0,
        "seconds a client connection may sit idle or trickle a request before it is closed "
        "(0: never)", unit="seconds", high=86400),
    Key("proxy.auth_token", "str", "",
        "token clients must send in X-TokenPak-Auth (required to listen beyond loopback)",
        env="TOKENPAK_AUTH_TOKEN"),
    Key("proxy.allow_remote_without_auth", "bool", False,
        "listen beyond loopback without proxy.auth_token (else serve refuses: whoever "
        "reaches it can use it and read /stats)"),
    Key("proxy.allowed_hosts", "list", [],
        "extra Host names (comma-separated) /stats and /metrics answer on loopback"),
    Key("proxy.shutdown_grace_seconds", "float", 30.0,
        "on SIGTERM, how long in-flight requests and streams may finish (a duration: 30s)",
        unit="seconds", high=86400),
    Key("proxy.workers", "int", "auto",
        "worker processes sharing the listening socket (auto: one per usable core; 1: one "
        "process; 2+: pre-forked workers)", env="TOKENPAK_WORKERS", choices=("auto",),
        low=1, high=1024),
    Key("proxy.pid_file", "path", "~/.tokenpak/tokenpak.pid", "pid file of `serve --daemon`"),
    Key("proxy.log_file", "path", "~/.tokenpak/tokenpak.log",
        "log file of `serve --daemon` (rotated)"),
    Key("compression.enabled", "bool", True, "master switch for prompt compression",
        env="TOKENPAK_COMPACT"),
    Key("compression.level", "choice", "hybrid",
        "strict (lossless), hybrid (= balanced; adds references), aggressive (adds elision)",
        env="TOKENPAK_MODE", choices=LEVEL_NAMES),
    Key("compression.threshold_tokens", "int", 4500,
        "strict and hybrid leave prompts below this many tokens untouched",
        env="TOKENPAK_COMPACT_THRESHOLD_TOKENS", high=10 ** 9),
    Key("compression.preserve_code", "bool", True, "keep fenced code and code-like output exact"),
    Key("compression.preserve_json", "bool", False, "do not minify JSON text"),
    Key("cache.enabled", "bool", True, "serve identical requests from the local cache",
        env="TOKENPAK_CACHE"),
    Key("cache.ttl_seconds", "int", 86400,
        "how long a cached answer stays valid (a duration: 1d, 12h)",
        unit="seconds", high=10 * 366 * 86400),
    Key("cache.max_mb", "int", 256,
        "cache size cap in MiB (a size: 256MB, 2GB); least recently used entries go first",
        unit="MiB", high=1 << 20),
    Key("cache.scope", "choice", "key",
        "key: entries belong to the API key that made them; shared: one cache for all keys",
        choices=("key", "shared")),
    Key("cache.anonymous", "bool", False,
        "also cache requests without any API key (they all share one scope)"),
    Key("footer.enabled", "bool", True, "append the one-line [tokenpak] stats footer to answers",
        env="TOKENPAK_FOOTER"),
    Key("db.path", "path", "~/.tokenpak/tokenpak.db", "sqlite3 database: cache and accounting",
        env="TOKENPAK_DB"),
    Key("pricing.<model>.<field>", "float", None,
        "price override, USD per 1M tokens: input, output, cache_read, cache_write, "
        "cache_write_1h, or long_<one of those>",
        high=10 ** 6),
    Key("pricing.<model>.long_context_tokens", "int", None,
        "prompt tokens above which the model's long_* prices apply to the whole request",
        high=10 ** 9),
    Key("keys.<id>.name", "str", None,
        "display name of the key id <id> (12 hex digits: `tokenpak keys id`) in stats"),
    Key("budget.daily_usd", "float", 0.0,
        "USD all requests together may cost per local day; then 429 until midnight (0: none)",
        high=10 ** 9),
    Key("budget.monthly_usd", "float", 0.0,
        "USD all requests together may cost per calendar month (0: none)", high=10 ** 9),
    Key("budget.tags.<tag>.daily_usd", "float", None,
        "USD the requests tagged <tag> (X-TokenPak-Tag) may cost per local day", high=10 ** 9),
    Key("budget.tags.<tag>.monthly_usd", "float", None,
        "USD the requests tagged <tag> may cost per calendar month", high=10 ** 9),
    Key("budget.keys.<id>.daily_usd", "float", None,
        "USD the requests with the API key whose key id is <id> may cost per local day",
        high=10 ** 9),
    Key("budget.keys.<id>.monthly_usd", "float", None,
        "USD the requests with the API key <id> may cost per calendar month", high=10 ** 9),
    Key("log.level", "choice", "info", "log verbosity",
        choices=("debug", "info", "warning", "error")),
]

SCHEMA = {key.name: key for key in _KEYS}

# Environment variables that are not a key's value source.
EXTRA_ENV = {
    "TOKENPAK_CONFIG": "path of the config file (default ~/.tokenpak/config.json)",
}

DEFAULT_CONFIG_PATH = "~/.tokenpak/config.json"
PRICE_FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
PRICE_FIELDS += tuple("long_" + f for f in PRICE_FIELDS) + ("long_context_tokens",)
_PROVIDER_KEY = re.compile(r"^proxy\.providers\.([A-Za-z0-9_-]+)\.(url|models)$")
_PRICING_KEY = re.compile(r"^pricing\.(.+)\.(%s)$" % "|".join(PRICE_FIELDS))
_KEY_NAME = re.compile(r"^keys\.([0-9a-f]{12})\.name$")
_BUDGET_KEY = re.compile(r"^budget\.(tags|keys)\.(.+)\.(daily_usd|monthly_usd)$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")  # what accounting records as key_id
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def schema_key(name):
    """The Key that governs `name`, resolving the <name>/<model> families; None if unknown."""
    key = SCHEMA.get(name)
    if key is not None and "<" not in name:
        return key
    match = _PROVIDER_KEY.match(name)
    if match:
        return SCHEMA["proxy.providers.<name>." + match.group(2)]
    match = _PRICING_KEY.match(name)
    if match:
        field = match.group(2)
        return SCHEMA["pricing.<model>.long_context_tokens" if field == "long_context_tokens"
                      else "pricing.<model>.<field>"]
    if _KEY_NAME.match(name):
        return SCHEMA["keys.<id>.name"]
    match = _BUDGET_KEY.match(name)
    if match:
        return SCHEMA["budget.%s.%s.%s" % (match.group(1), "<tag>" if match.group(1) == "tags"
                                           else "<id>", match.group(3))]
    return None


def require_key(name):
    """schema_key() that raises a usage error with a "did you mean" for unknown names."""
    key = schema_key(name)
    if key is None:
        known = [k for k in SCHEMA if "<" not in k]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = "did you mean %r?" % close[0] if close else "see `tokenpak config list`"
        if name.startswith("keys."):
            hint = "a key id is 12 hex digits, as `tokenpak keys id` prints it: keys.<id>.name"
        raise TokenpakError("unknown config key %r" % name, hint=hint, status=ExitStatus.USAGE)
    return key


def parse_value(name, value):
    """Check and convert `value` (a string from the CLI or environment, or a JSON value from
    the file) to the type the schema gives `name`."""
    key = require_key(name)
    match = _BUDGET_KEY.match(name)
    if match and match.group(1) == "keys" and not _KEY_ID.match(match.group(2)):
        raise TokenpakError("invalid config key %s: %r is not a key id" % (name, match.group(2)),
                            hint="a key id is the 12 hex digits `tokenpak keys id` prints for "
                                 "an API key", status=ExitStatus.USAGE)
    if match and not 1 <= len(match.group(2)) <= 64:
        raise TokenpakError("invalid config key %s: a tag has 1 to 64 characters" % name,
                            status=ExitStatus.USAGE)
    try:
        return _convert(key, value)
    except (TypeError, ValueError) as exc:
        raise TokenpakError("invalid value for %s: %s" % (name, exc),
                            hint=key.help, status=ExitStatus.USAGE)


_SIZES = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_DURATIONS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400,
              "w": 604800}  # the units `stats --since` takes
_AMOUNT = re.compile(r"^([0-9][0-9_]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*([a-z]*)$")
_EXAMPLES = {"bytes": "10MB, 512KB or a number of bytes",
             "MiB": "256MB, 2GB or a number of MiB",
             "seconds": "30s, 10m, 1d or a number of seconds"}


def _number(key, value):
    """A number from a JSON number or text, in the key's unit; ValueError in plain words."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number, got %r" % (value,))
    if isinstance(value, (int, float)):
        number, with_unit = value, False
    else:
        match = _AMOUNT.match(value.strip().lower())
        units = {"bytes": _SIZES, "MiB": _SIZES, "seconds": _DURATIONS}.get(key.unit, {"": 1})
        if not match or match.group(2) not in units:
            wanted = _EXAMPLES.get(key.unit) or (
                "a whole number" if key.type == "int" else "a number")
            raise ValueError("expected %s, got %r" % (wanted, value))
        text, factor = match.group(1).replace("_", ""), units[match.group(2)]
        if len(text) > 30:  # beyond any range here (and int() refuses 4300+ digits)
            raise ValueError("expected %s, got a %d-digit number" % (_range(key), len(text)))
        if key.unit == "MiB":  # a bare number is MiB already
            factor = factor / float(1 << 20) if match.group(2) else 1
        plain = factor == 1 and "." not in text and "e" not in text
        number = int(text) if plain else float(text) * factor
        with_unit = bool(match.group(2))
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("expected a number, got %r" % (value,))
    if key.type == "int":
        if isinstance(number, float):
            if not number.is_integer() and not with_unit:
                raise ValueError("expected a whole number, got %r" % (value,))
            number = int(-(-number // 1))  # a unit that leaves a fraction rounds up
    else:
        number = float(number)
    if not key.low <= number <= key.high:
        raise ValueError("expected %s, got %s" % (_range(key), _plain(number)))
    return number


def _range(key):
    return "%s from %s to %s" % ("a whole number" if key.type == "int" else "a number",
                                 _plain(key.low), _plain(key.high))


def _plain(number):
    """A number as a person writes it: 65535, 0.001, 1e+26."""
    if isinstance(number, int):
        return "%d" % number if abs(number) < 10 ** 30 else "a %d-digit number" % len(
            str(abs(number)))
    return "%d" % number if number.is_integer() and abs(number) < 1e18 else "%g" % number


def _convert(key, value):
    kind = key.type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true/false (or 1/0), got %r" % (value,))
    if kind in ("int", "float"):
        if key.choices and str(value).strip().lower() in key.choices:
            return str(value).strip().lower()  # a word the number may also be: "auto"
        try:
            return _number(key, value)
        except ValueError as exc:
            if key.choices:
                raise ValueError("%s, or %s" % (exc, " or ".join(key.choices))) from None
            raise
    if kind == "choice":
        text = str(value).strip().lower()
        if text not in key.choices:
            raise ValueError("expected one of %s, got %r" % (", ".join(key.choices), value))
        return text
    if kind == "list":
        items = value if isinstance(value, list) else str(value).split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("expected text, got %r" % (value,))
    text = str(value)
    if key.name.endswith(".url") and text and not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("expected an http:// or https:// URL, got %r" % text)
    return text


def config_path(environ=None):
    """Where the config file lives: $TOKENPAK_CONFIG or ~/.tokenpak/config.json."""
    environ = os.environ if environ is None else environ
    return os.path.expanduser(environ.get("TOKENPAK_CONFIG") or DEFAULT_CONFIG_PATH)


def _flatten(tree, prefix=""):
    """Nested JSON -> {"dotted.name": value}; provider and model names stay whole."""
    flat = {}
    for name, value in tree.items():
        dotted = prefix + str(name)
        opaque_parent = prefix in ("proxy.providers.", "pricing.", "budget.tags.",
                                   "budget.keys.")
        if isinstance(value, dict) and (value or opaque_parent):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _nest(flat):
    """{"dotted.name": value} -> nested JSON, the inverse of _flatten for schema keys."""
    tree = {}
    for name, value in sorted(flat.items()):
        match = _PROVIDER_KEY.match(name) or _PRICING_KEY.match(name)
        budget = _BUDGET_KEY.match(name)
        if budget:
            parts = ["budget", budget.group(1), budget.group(2), budget.group(3)]
        elif match:
            head = "proxy.providers" if name.startswith("proxy.") else "pricing"
            parts = head.split(".") + [match.group(1), match.group(2)]
        else:
            parts = name.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


class BrokenConfig(TokenpakError):
    """The config file is not a JSON object at all (as opposed to holding one bad key)."""


def read_raw(path):
    """The file's entries as {dotted name: JSON value}, unchecked; {} when there is no file.

    `config set` and `config unset` edit this, so they can repair a file that holds an
    unknown key or a bad value (which read_file refuses)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except IsADirectoryError:
        raise TokenpakError("config file %s is a directory" % path,
                            hint="remove it, or set TOKENPAK_CONFIG to a file")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenpakError("cannot read config file %s: %s" % (
            path, getattr(exc, "strerror", None) or exc),
            hint="check its permissions, or set TOKENPAK_CONFIG to another file")
    if not text.strip():
        return {}
    repair = ("fix it in an editor; or `tokenpak config set KEY VALUE` starts a new file "
              "and keeps this one as %s" % broken_copy(path))
    try:
        tree = json.loads(text)
        flat = _flatten(tree) if isinstance(tree, dict) else None
    except RecursionError:
        raise BrokenConfig("config file %s nests too deeply to be a tokenpak config" % path,
                           hint=repair)
    except ValueError as exc:
        raise BrokenConfig("config file %s is not valid JSON: %s" % (path, exc),
                           hint=repair)
    if not isinstance(tree, dict):
        raise BrokenConfig("config file %s must hold a JSON object" % path,
                           hint=repair)
    return flat


def broken_copy(path):
    """Where `config set` keeps a config file it could not parse."""
    return path + ".broken"


def read_file(path):
    """The file's settings as {dotted name: typed value}; {} when the file does not exist.

    A file that is not valid JSON, or holds an unknown key or a badly typed value, is an
    error naming the file and the command that repairs it: silently ignoring a typo would
    run with settings the user did not choose."""
    values = {}
    for name, value in read_raw(path).items():
        if schema_key(name) is None:
            close = difflib.get_close_matches(name, [k for k in SCHEMA if "<" not in k], n=1,
                                              cutoff=0.5)
            raise TokenpakError(
                "config file %s: unknown config key %r" % (path, name),
                hint="`tokenpak config unset %s` removes it%s" % (
                    name, "; did you mean %r?" % close[0] if close else ""))
        try:
            values[name] = parse_value(name, value)
        except TokenpakError as exc:
            raise TokenpakError("config file %s: %s" % (path, exc.message),
                                hint="`tokenpak config set %s VALUE` replaces it: %s" % (
                                    name, exc.hint))
    return values


def write_file(path, values):
    """Atomically replace the config file with `values` (temp file + rename).

    A new file is private (0600). An existing one keeps its mode and group, so that
    `sudo tokenpak config set` on /etc/tokenpak/config.json (0640 root:tokenpak) leaves it
    readable by the service. An unwritable place is a TokenpakError, not a traceback."""
    try:
        _write_file(path, values)
    except OSError as exc:
        where = os.path.dirname(path) or "."
        hint = ("run it with sudo" if path.startswith("/etc/") else
                "check the permissions of %s, or set TOKENPAK_CONFIG to a writable file" % where)
        raise TokenpakError("cannot write config file %s: %s" % (
            path, exc.strerror or exc), hint=hint) from None


def _write_file(path, values):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    fd, temp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_nest(values), handle, indent=2, sort_keys=True)
            handle.write("\n")
        if existing is None:
            os.chmod(temp, 0o600)
        else:
            os.chmod(temp, existing.st_mode & 0o777)
            if existing.st_gid != os.getegid():
                try:
                    os.chown(temp, -1, existing.st_gid)
                except PermissionError:
                    pass
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _env_values(environ):
    values = {}
    for key in _KEYS:
        if key.env and environ.get(key.env, "") != "":
            try:
                values[key.name] = _convert(key, environ[key.env])
            except (TypeError, ValueError) as exc:
                raise TokenpakError("invalid value in $%s: %s" % (key.env, exc),
                                    hint=key.help, status=ExitStatus.USAGE)
    return values


class Config:
    """Effective settings with the source of each: "cli", "env", "file" or "default"."""

    def __init__(self, values, sources, path):
        self._values = values
        self._sources = sources
        self.path = path

    def get(self, name):
        value = self._values[name]
        if value is not None and SCHEMA.get(name) is not None and SCHEMA[name].type == "path":
            return os.path.expanduser(value)
        return value

    __getitem__ = get

    def source(self, name):
        return self._sources[name]

    def names(self):
        return sorted(self._values)

    def providers(self):
        """{name: {"url": ..., "models": [...]}} for built-in and custom providers."""
        found = {}
        for name, value in self._values.items():
            match = _PROVIDER_KEY.match(name)
            if match and value is not None:
                found.setdefault(match.group(1), {"url": "", "models": []})[match.group(2)] = value
        return found

    def key_names(self):
        """{key id: display name} from keys.<id>.name keys."""
        names = {}
        for name, value in self._values.items():
            match = _KEY_NAME.match(name)
            if match and value:
                names[match.group(1)] = value
        return names

    def pricing_overrides(self):
        """{model: {field: usd_per_million}} from pricing.<model>.<field> keys."""
        prices = {}
        for name, value in self._values.items():
            match = _PRICING_KEY.match(name)
            if match:
                prices.setdefault(match.group(1), {})[match.group(2)] = value
        return prices


    def tag_budgets(self):
        """{tag: {"daily_usd": USD, "monthly_usd": USD}} from budget.tags.<tag>.* keys."""
        return self._budgets("tags")

    def key_budgets(self):
        """{key id: {"daily_usd": USD, ...}} from budget.keys.<id>.* keys."""
        return self._budgets("keys")

    def _budgets(self, kind):
        found = {}
        for name, value in self._values.items():
            match = _BUDGET_KEY.match(name)
            if match and match.group(1) == kind and value is not None:
                found.setdefault(match.group(2), {})[match.group(3)] = value
        return found


def worker_count(config):
    """How many processes serve: proxy.workers, with "auto" one per core this process may
    run on (its CPU affinity, which taskset and systemd's CPUAffinity= narrow)."""
    value = config.get("proxy.workers")
    if value != "auto":
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load(overrides=None, environ=None, path=None):
    """Build the effective Config: defaults < file < environment < `overrides` (CLI flags)."""
    environ = os.environ if environ is None else environ
    path = path or config_path(environ)
    values, sources = {}, {}
    for key in _KEYS:
        if "<" not in key.name:
            values[key.name], sources[key.name] = key.default, "default"
    for origin, layer in (("file", read_file(path)), ("env", _env_values(environ)),
                          ("cli", {n: parse_value(n, v) for n, v in (overrides or {}).items()})):
        for name, value in layer.items():
            values[name], sources[name] = value, origin
    return Config(values, sources, path)
