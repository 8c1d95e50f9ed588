"""The `tokenpak` command line.

`build_parser()` builds the whole command tree in one place so that tests and the man-page
check can walk it; each subcommand's handler is a plain function taking the parsed
arguments and returning an exit status. `main()` turns a TokenpakError into one line,
`tokenpak: error: ...` plus a hint, never a traceback.
"""

import argparse
import json
import os
import sys

from . import __version__
from . import config as configmod
from .errors import ExitStatus, TokenpakError

APIS = ("openai", "anthropic", "responses")  # the request shapes `compress` knows
# What the Debian package's system service uses (packaging/systemd/tokenpak.service sets
# the same variables): `tokenpak --system ...` acts on that installation.
SYSTEM_ENV = {"TOKENPAK_CONFIG": "/etc/tokenpak/config.json",
              "TOKENPAK_DB": "/var/lib/tokenpak/tokenpak.db"}


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in tokenpak's one-line shape (exit status 2)."""

    def error(self, message):
        raise TokenpakError(message, hint="see `%s --help`" % self.prog,
                            status=ExitStatus.USAGE)


def config_value(name):
    """An argparse type that checks a flag's value as the config key `name` would be."""
    def convert(text):
        try:
            return configmod.parse_value(name, text)
        except TokenpakError as exc:
            raise argparse.ArgumentTypeError(exc.message.split(": ", 1)[-1])
    convert.__name__ = name  # argparse names the type in its message
    return convert


def build_parser():
    parser = Parser(
        prog="tokenpak",
        description="Local proxy for LLM APIs: compresses prompts, caches answers, "
                    "accounts tokens and cost. Point your client's base URL at "
                    "http://localhost:8766.")
    parser.add_argument("--version", action="version", version="tokenpak " + __version__)
    parser.add_argument("--system", action="store_true",
                        help="act on the system service's files (/etc/tokenpak/config.json, "
                             "/var/lib/tokenpak/tokenpak.db) instead of ~/.tokenpak")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    serve = commands.add_parser("serve", help="run the proxy (foreground unless --daemon)")
    serve.add_argument("--host", help="address to listen on (proxy.host, default 127.0.0.1)")
    serve.add_argument("--port", type=config_value("proxy.port"),
                       help="port to listen on (proxy.port, default 8766)")
    serve.add_argument("--mode", choices=configmod.LEVEL_NAMES,
                       help="compression level (compression.level, default hybrid)")
    serve.add_argument("--workers", type=config_value("proxy.workers"),
                       help="worker processes sharing the socket "
                            "(proxy.workers; default auto: one per core)")
    serve.add_argument("--daemon", action="store_true",
                       help="detach and run in the background (pid file, log file)")
    serve.set_defaults(func=cmd_serve)

    stop = commands.add_parser("stop", help="stop the daemon started by `serve --daemon`")
    stop.set_defaults(func=cmd_stop)
    status = commands.add_parser("status", help="is tokenpak running? (exit 3 when not)")
    status.set_defaults(func=cmd_status)

    service = commands.add_parser("service", help="install or remove the systemd user service")
    service_commands = service.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    service_commands.required = True
    service_commands.add_parser(
        "install", help="write ~/.config/systemd/user/tokenpak.service").set_defaults(
        func=cmd_service_install)
    service_commands.add_parser(
        "uninstall", help="stop, disable and remove the user service").set_defaults(
        func=cmd_service_uninstall)

    stats = commands.add_parser("stats", help="tokens, cost and savings from the database")
    stats.add_argument("--since", metavar="AGE", help="only the last AGE: 30m, 24h, 7d")
    stats.add_argument("--by", choices=("tag", "key", "model", "provider", "day", "hour"),
                       default="model", help="group rows by X-TokenPak-Tag, key id, model, "
                                             "provider, local day or hour (default model)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=cmd_stats)

    keys = commands.add_parser("keys", help="the key ids that name API keys in stats")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION",
                                        parser_class=Parser)
    keys_commands.required = True
    keys_commands.add_parser(
        "id", help="print the key id of the API key read from stdin (never echoed)"
    ).set_defaults(func=cmd_keys_id)

    logs = commands.add_parser(
        "logs", help="the recent requests, one line each; --follow prints new ones as they come")
    logs.add_argument("-n", "--limit", type=_count, default=20, metavar="N",
                      help="show the last N requests (default 20; 0 with --follow: only new ones)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing requests as they are recorded, until interrupted")
    logs.add_argument("--json", action="store_true", help="one JSON object per line")
    logs.add_argument("--tag", metavar="TAG", help="only requests with this X-TokenPak-Tag")
    logs.add_argument("--model", metavar="MODEL",
                      help="only this model and its snapshots (gpt-4o takes gpt-4o-2024-08-06), "
                           "or a glob (claude-*)")
    logs.add_argument("--status", metavar="CODES",
                      help="only these statuses: a code (429), a class (5xx) or a list (4xx,5xx)")
    logs.add_argument("--since", metavar="AGE", help="only the last AGE: 30m, 24h, 7d, or a date")
    logs.set_defaults(func=cmd_logs)

    cache = commands.add_parser("cache", help="inspect or empty the answer cache")
    cache_commands = cache.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    cache_commands.required = True
    cache_commands.add_parser("stats", help="entries, size and age of the cache").set_defaults(
        func=cmd_cache_stats)
    cache_commands.add_parser("clear", help="delete every cache entry").set_defaults(
        func=cmd_cache_clear)

    compress = commands.add_parser(
        "compress", help="dry run: what compression does to a request body")
    compress.add_argument("file", metavar="FILE", help="a JSON request body, or - for stdin")
    compress.add_argument("--mode", choices=configmod.LEVEL_NAMES, help="compression level (default: config)")
    compress.add_argument("--api", choices=APIS,
                          help="body shape (default: guessed from the body)")
    compress.add_argument("--output", metavar="FILE", help="write the compressed body here")
    compress.set_defaults(func=cmd_compress)

    cfg = commands.add_parser("config", help="read and change ~/.tokenpak/config.json")
    cfg_commands = cfg.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    cfg_commands.required = True
    cfg_set = cfg_commands.add_parser("set", help="set KEY to VALUE in the config file")
    cfg_set.add_argument("key")
    cfg_set.add_argument("value")
    cfg_set.set_defaults(func=cmd_config_set)
    cfg_get = cfg_commands.add_parser("get", help="print the effective value of KEY")
    cfg_get.add_argument("key")
    cfg_get.set_defaults(func=cmd_config_get)
    cfg_unset = cfg_commands.add_parser("unset", help="remove KEY from the config file")
    cfg_unset.add_argument("key")
    cfg_unset.set_defaults(func=cmd_config_unset)
    cfg_list = cfg_commands.add_parser("list", help="every key, its value and its source")
    cfg_list.add_argument("--json", action="store_true", help="machine-readable output")
    cfg_list.set_defaults(func=cmd_config_list)

    prices = commands.add_parser(
        "prices", help="the effective price table: shipped figures and config overrides")
    prices.add_argument("model", metavar="MODEL", nargs="?",
                        help="only this model (as a client names it, e.g. gpt-4o-2024-08-06), "
                             "a glob (claude-*) or a prefix (claude-opus)")
    prices.add_argument("--json", action="store_true", help="machine-readable output")
    prices.set_defaults(func=cmd_prices)

    doctor = commands.add_parser(
        "doctor", help="check config, database, port, upstreams, tokenizer and service")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def load_config(overrides=None):
    """The effective config, read for a command that needs all of it."""
    return configmod.load(overrides)


def lenient_config(quiet=False):
    """The config for `stop`, `status` and `doctor`, which must work even when the file or
    the environment holds a mistake (that is when a user most needs them): the broken
    source is named on stderr and left out."""
    try:
        return configmod.load()
    except TokenpakError as exc:
        if not quiet:
            sys.stderr.write("tokenpak: warning: %s; using the defaults instead\n"
                             % _one_line(exc.message))
    try:
        return configmod.load(path=os.devnull)
    except TokenpakError:
        return configmod.load(environ={}, path=os.devnull)


def serve_overrides(args):
    """The serve flags as config overrides (the strongest source)."""
    overrides = {}
    if args.host:
        overrides["proxy.host"] = args.host
    if args.port is not None:
        overrides["proxy.port"] = args.port
    if args.workers is not None:
        overrides["proxy.workers"] = args.workers
    if args.mode:
        overrides["compression.level"] = args.mode
    return overrides


def cmd_serve(args):
    """Foreground by default (what systemd and terminals want); --daemon detaches."""
    from . import lifecycle
    return lifecycle.run(serve_overrides(args), detach=args.daemon)


def health_url(config):
    """/health of the daemon started with this config: the address it recorded in its pid
    file when it bound, else the configured one (systemd, a foreground serve)."""
    from . import daemon
    recorded = daemon.read_address(config.get("proxy.pid_file"))
    configured = daemon.base_url(config.get("proxy.host"), config.get("proxy.port"))
    return (recorded or configured) + "/health"


def cmd_stop(args):
    from . import daemon
    config = lenient_config()
    grace = config.get("proxy.shutdown_grace_seconds")
    return daemon.stop(config.get("proxy.pid_file"), timeout=grace + 10,
                       health_url=health_url(config))


def cmd_status(args):
    from . import daemon
    config = lenient_config()
    code, text = daemon.status(config.get("proxy.pid_file"), health_url(config))
    print(text)
    return code


def cmd_service_install(args):
    from . import service
    sys.stdout.write(service.install_user_unit())
    return ExitStatus.OK


def cmd_service_uninstall(args):
    from . import service
    sys.stdout.write(service.uninstall_user_unit())
    return ExitStatus.OK


def cmd_stats(args):
    from . import stats
    since = stats.parse_since(args.since) if args.since else None
    from .budget import Budgets
    config = load_config()
    db = config.get("db.path")
    budgets = stats.budget_report(db, Budgets.from_config(config))
    if not os.path.exists(db) and not args.json:
        print("no accounting database at %s yet: tokenpak has recorded no request" % db)
        hint = _other_db_hint(db)
        if hint:
            print(hint)
    elif args.json:
        print(json.dumps({"summary": stats.summary(db, since), "rows":
                          stats.report(db, since, args.by, config.key_names()),
                          "budgets": budgets}, indent=2))
        return ExitStatus.OK
    else:
        rows = stats.report(db, since, args.by, config.key_names())
        if not rows:
            print("no requests recorded %s in %s" % (stats.describe_since(args.since, since),
                                                     db)
                  if since else "no requests recorded in %s" % db)
        else:
            print(stats.format_table(rows))
    if budgets:
        print()
        print(stats.format_budgets(budgets))
    return ExitStatus.OK


def cmd_keys_id(args):
    """The key id tokenpak records for an API key: the same HMAC with this install's
    secret (next to db.path) that the proxy computes. The key is read from stdin, without
    echo on a terminal, and never printed."""
    import getpass
    from .cache import load_secret, scope_id
    from .providers import credential
    from .stats import printable
    config = load_config()
    try:
        if sys.stdin.isatty():
            text = getpass.getpass("API key (not shown): ")
        else:
            text = sys.stdin.readline()
    except (OSError, EOFError, UnicodeDecodeError, ValueError, AttributeError):
        # AttributeError: stdin closed (None). Never the exception's text: it could quote
        # what was read.
        raise TokenpakError("cannot read an API key from standard input",
                            hint="printf %s \"$OPENAI_API_KEY\" | tokenpak keys id",
                            status=ExitStatus.USAGE) from None
    key = credential({"authorization": text.strip()})  # a pasted "Bearer sk-..." too
    if key is None:
        raise TokenpakError("no API key on stdin",
                            hint="printf %s \"$OPENAI_API_KEY\" | tokenpak keys id",
                            status=ExitStatus.USAGE)
    path = os.path.join(os.path.dirname(config.get("db.path")), "secret")
    try:
        secret = load_secret(path)
    except OSError as exc:
        raise TokenpakError("cannot read or create the install's secret %s: %s"
                            % (path, exc.strerror or exc),
                            hint="key ids are made with it; check db.path's directory") from None
    key_id = scope_id(key, secret)[:12]
    name = config.key_names().get(key_id)
    print(key_id if name is None else "%s  %s" % (key_id, printable(name)))
    return ExitStatus.OK


def _count(text):
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("expected a whole number, 0 or more, got %r" % text)
    return value


def cmd_logs(args):
    """Read-only, like stats: works with the daemon up or down and never creates the DB."""
    from . import logs, stats
    since = stats.parse_since(args.since) if args.since else None
    filters = logs.Filters(args.tag, args.model, args.status, since)
    db = load_config().get("db.path")
    rows, top = logs.read(db, filters, args.limit)
    show = logs.as_json if args.json else logs.as_text
    if not args.follow and not rows:
        if not args.json and (rows is None or args.limit):
            print("no accounting database at %s yet: tokenpak has recorded no request" % db
                  if rows is None else "no requests recorded in %s match" % db
                  if filters.where()[1] else "no requests recorded in %s" % db)
            hint = _other_db_hint(db) if rows is None else None
            if hint:
                print(hint)
        return ExitStatus.OK
    if not args.json:
        print(logs.header())
    for row in rows or ():
        print(show(row))
    if not args.follow:
        return ExitStatus.OK
    sys.stdout.flush()

    def emit(row):
        sys.stdout.write(show(row) + "\n")
        sys.stdout.flush()  # a reader at the other end of a pipe sees each request at once
    try:
        logs.follow(db, filters, top, emit,
                    warn=lambda text: sys.stderr.write("tokenpak: warning: %s\n" % _one_line(text)))
    except KeyboardInterrupt:  # how a follow ends
        pass
    return ExitStatus.OK


def _other_db_hint(db):
    """Point at the system service's database when the user looks at their own."""
    system_db = SYSTEM_ENV["TOKENPAK_DB"]
    if db != system_db and os.path.exists(system_db):
        return "the system service records in %s: `tokenpak --system stats`" % system_db
    return None


def cmd_cache_stats(args):
    """Read-only: never creates the database nor moves a corrupt one aside (only the
    server, which writes, does that)."""
    import time
    from . import stats
    config = load_config()
    db = config.get("db.path")
    info = stats.cache_info(db)
    if info is None:
        print("cache:    %s (no database yet: nothing cached)" % db)
        return ExitStatus.OK
    age = lambda t: "%s (%s ago)" % (time.strftime("%Y-%m-%d %H:%M", time.localtime(t)),  # noqa
                                     _ago(time.time() - t)) if t else "-"
    print("cache:    %s" % db)
    print("entries:  {:,}".format(info["entries"]))
    print("size:     {:,.1f} MB of {:,.0f} MB".format(info["bytes"] / 1048576.0,
                                                      float(config.get("cache.max_mb"))))
    print("oldest:   %s" % age(info["oldest"]))
    print("newest:   %s" % age(info["newest"]))
    print("keys:     %d (entries are scoped per API key)" % info["scopes"])
    return ExitStatus.OK


def _ago(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % max(seconds, 0)


def cmd_cache_clear(args):
    from . import doctor
    from .cache import CacheStore
    config = load_config()
    db = config.get("db.path")
    if not os.path.exists(db):
        print("removed 0 cache entries (no database at %s)" % db)
        return ExitStatus.OK
    doctor.check_db_path(db)
    store = CacheStore(db, config.get("cache.ttl_seconds"), config.get("cache.max_mb"))
    try:
        removed = store.clear()
    finally:
        store.close()
    print("removed {:,} cache entries".format(removed))
    return ExitStatus.OK


def guess_api(body):
    """Responses bodies carry `input` instead of `messages`; Anthropic messages have a
    top-level system or typed content blocks of their own."""
    if "messages" not in body and isinstance(body.get("input"), (str, list)):
        return "responses"
    if "system" in body or body.get("anthropic_version"):
        return "anthropic"
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result", "image",
                                                          "document", "thinking")
                for b in content):
            return "anthropic"
    return "openai"


def read_body(name):
    """The JSON body in file `name` (or stdin for "-"), or a TokenpakError saying why not."""
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as handle:
                text = handle.read()
        return json.loads(text)
    except OSError as exc:
        raise TokenpakError("cannot read %s: %s" % (name, exc.strerror or exc),
                            hint="give a JSON request body, or - for standard input")
    except UnicodeDecodeError:
        raise TokenpakError("%s is not UTF-8 text" % name, hint="give a JSON request body")
    except RecursionError:
        raise TokenpakError("%s nests too deeply to be a request body" % name,
                            hint="give a JSON request body")
    except ValueError as exc:
        raise TokenpakError("%s is not JSON: %s" % (name, exc), hint="give a JSON request body")


def cmd_compress(args):
    from . import compression
    config = load_config({"compression.level": args.mode} if args.mode else None)
    body = read_body(args.file)
    api = args.api
    if isinstance(body, dict) and isinstance(body.get("body"), dict):
        api = api or body.get("api")  # a corpus case: {"api": ..., "body": {...}}
        body = body["body"]
    if not isinstance(body, dict) or not (isinstance(body.get("messages"), list)
                                          or isinstance(body.get("input"), (str, list))):
        raise TokenpakError("%s is not a request body (no \"messages\" or \"input\")"
                            % args.file, hint="give an OpenAI chat completions, OpenAI "
                            "Responses or Anthropic messages body")
    api = api if api in APIS else guess_api(body)
    settings = compression.Settings(
        enabled=True, level=config.get("compression.level"),
        threshold_tokens=config.get("compression.threshold_tokens"),
        preserve_code=config.get("compression.preserve_code"),
        preserve_json=config.get("compression.preserve_json"))
    report = compression.dry_run(api, body, settings)
    print(compression.format_report(report))
    if args.output:
        result = compression.compress_request(api, body, settings)
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump(result.body, handle, ensure_ascii=False)
                handle.write("\n")
        except OSError as exc:
            raise TokenpakError("cannot write %s: %s" % (args.output, exc.strerror or exc),
                                hint="give --output a file in an existing, writable directory")
        print("wrote %s" % args.output)
    return ExitStatus.OK


def cmd_config_set(args):
    """Edits the file's raw entries, so it also repairs a file that holds an unknown key or
    a bad value; a file that is not JSON at all is kept aside and a new one started."""
    path = configmod.config_path()
    value = configmod.parse_value(args.key, args.value)
    try:
        values = configmod.read_raw(path)
    except configmod.BrokenConfig as exc:
        backup = configmod.broken_copy(path)
        try:
            os.replace(path, backup)
        except OSError as err:
            raise TokenpakError("%s; cannot move it aside: %s" % (exc.message, err.strerror),
                                hint="fix or remove it by hand")
        sys.stderr.write("tokenpak: warning: %s; kept it as %s and started a new file\n"
                         % (exc.message, backup))
        values = {}
    for name in list(values):  # a value where a section should be, or the reverse
        if args.key.startswith(name + ".") or name.startswith(args.key + "."):
            del values[name]
    values[args.key] = value
    configmod.write_file(path, values)
    print("%s = %s  (%s)" % (args.key, _show(value), path))
    return ExitStatus.OK


def cmd_config_get(args):
    key = configmod.require_key(args.key)
    if key.name.startswith("pricing.<model>."):
        return _print_price_key(args.key)
    config = load_config()
    if args.key not in config.names():
        raise TokenpakError("%s is not set" % args.key, status=ExitStatus.ERROR,
                            hint="`tokenpak config set %s VALUE` sets it" % args.key)
    print(_show(config.get(args.key)))
    return ExitStatus.OK


def _print_price_key(name):
    """pricing.<model>.<field>: the price in effect and where it comes from."""
    model, field = name[len("pricing."):].rsplit(".", 1)
    found = _price_rows(load_config(), model)
    if not found:
        raise TokenpakError("no price for model %r" % model,
                            hint="`tokenpak prices` lists the known models; "
                                 "`tokenpak config set %s PRICE` adds one" % name)
    row = found[0]
    if field not in row:
        raise TokenpakError("%s has no long-context tier" % row["model"],
                            hint="set pricing.%s.long_context_tokens, .long_input and "
                                 ".long_output to give it one" % model)
    shown = row[field] if field == "long_context_tokens" else _show_price(row[field])
    print("%s  (%s)" % (shown, row["sources"][field]))
    return ExitStatus.OK


def cmd_config_unset(args):
    path = configmod.config_path()
    values = configmod.read_raw(path)
    if args.key not in values:  # an unknown key that is in the file can still be removed
        configmod.require_key(args.key)
        print("%s was not set in %s" % (args.key, path))
        return ExitStatus.OK
    del values[args.key]
    configmod.write_file(path, values)
    print("unset %s  (%s)" % (args.key, path))
    return ExitStatus.OK


SECRET_KEYS = ("proxy.auth_token",)


def cmd_config_list(args):
    config = load_config()
    shown = lambda n: "***" if n in SECRET_KEYS and config.get(n) else config.get(n)  # noqa
    rows = [(name, _show(shown(name)), config.source(name)) for name in config.names()]
    if args.json:
        print(json.dumps({n: {"value": shown(n), "source": s} for n, _, s in rows}, indent=2))
        return ExitStatus.OK
    width = max(len(name) for name, _, _ in rows)
    vwidth = min(48, max(len(value) for _, value, _ in rows))
    for name, value, source in rows:
        print("%-*s  %-*s  %s" % (width, name, vwidth, value, source))
    print("\nconfig file: %s" % config.path)
    return ExitStatus.OK


def _price_rows(config, model=None):
    """[{model, provider, <field>: figure, sources: {field: origin}}]: the table the proxy
    prices requests with, each figure labelled with its origin ("shipped DATE", "config
    pricing.M.F (file)", or how it is derived). `model` picks one model as a client names
    it, a glob (claude-*) or a prefix (claude-opus); None lists all."""
    from . import pricing
    overrides = config.pricing_overrides()
    table = pricing.load_prices(overrides)
    changed = {}
    for raw_name, fields in overrides.items():
        for field in fields:
            changed[(pricing.normalise_model(raw_name), field)] = "pricing.%s.%s" % (
                raw_name, field)
    shipped = "shipped %s" % pricing.PRICES_DATE
    rows = []
    for name in _price_names(pricing, table, model):
        entry = table[name]
        row = {"model": name, "provider": entry.get("provider", ""), "sources": {}}
        for field in pricing.OVERRIDE_FIELDS:
            if field not in entry:
                continue
            row[field] = entry[field]
            origin = changed.get((name, field))
            row["sources"][field] = ("config %s (%s)" % (origin, config.source(origin)) if origin
                                     else entry["derived"].get(field) or shipped)
        rows.append(row)
    return rows


def _price_names(pricing, table, model):
    """The table's names for `prices MODEL`: all; the glob's matches; the model's entry as
    the proxy finds it; else every name that starts with it."""
    import fnmatch
    if model is None:
        return sorted(table)
    wanted = pricing.normalise_model(model)
    if any(c in wanted for c in "*?["):
        return sorted(n for n in table if fnmatch.fnmatchcase(n, wanted))
    match = pricing.price_for(model, table)
    if match is not None:
        return [n for n in table if table[n] is match][:1]
    return sorted(n for n in table if wanted and n.startswith(wanted))


def _show_price(value):
    return "$%g" % value


_PRICE_COLUMNS = (("input", 9), ("output", 9), ("cache_read", 11), ("cache_write", 12),
                  ("cache_write_1h", 15))


def cmd_prices(args):
    """The effective price table, USD per million tokens, each figure with its source. A
    model with a long-context tier gets a second line: its figures over the threshold."""
    from . import pricing
    from .stats import printable
    rows = _price_rows(load_config(), args.model)
    if args.model is not None and not rows:
        raise TokenpakError("no price for model %r" % args.model,
                            hint="`tokenpak prices` lists the known models; set "
                                 "pricing.%s.input and .output to add it" % args.model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitStatus.OK
    labels = {r["model"]: "  over {:,} tokens".format(r[pricing.THRESHOLD])
              for r in rows if pricing.THRESHOLD in r}
    width = max(len(name) for name in [r["model"] for r in rows] + list(labels.values()))
    line = lambda first, cells, source: ("%-*s  " % (width, first) + " ".join(  # noqa: E731
        "%*s" % (w, cell) for (_, w), cell in zip(_PRICE_COLUMNS, cells)) + "  " + source)
    print("USD per 1M tokens; shipped table of %s; "
          "`tokenpak config set pricing.MODEL.FIELD PRICE` overrides a figure" % pricing.PRICES_DATE)
    print(line("model", [c for c, _ in _PRICE_COLUMNS], "source").rstrip())
    for r in rows:
        sources = sorted(set(s for s in r["sources"].values() if s.startswith("config")))
        print(line(printable(r["model"]), [_show_price(r[c]) for c, _ in _PRICE_COLUMNS],
                   "; ".join(sources) or "shipped"))
        if r["model"] in labels:
            print(line(labels[r["model"]], [_show_price(r["long_" + c]) for c, _ in _PRICE_COLUMNS],
                       "long-context tier: the whole request"))
    return ExitStatus.OK


def cmd_doctor(args):
    """doctor reports a broken config as its first finding instead of failing on it."""
    from . import doctor
    try:
        config, error = configmod.load(), None
    except TokenpakError as exc:
        config, error = lenient_config(quiet=True), exc
    return doctor.run(config, error)


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return "" if value is None else str(value)


def main(argv=None):
    """Run one command; returns its exit status and never lets a traceback out."""
    try:
        args = build_parser().parse_args(argv)
        if args.system:
            os.environ.update(SYSTEM_ENV)
        return int(args.func(args) or 0)
    except TokenpakError as exc:
        print("tokenpak: error: %s" % _one_line(exc.message), file=sys.stderr)
        if exc.hint:
            print("tokenpak: hint: %s" % _one_line(exc.hint), file=sys.stderr)
        return int(exc.status)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else ExitStatus.USAGE
    except KeyboardInterrupt:
        return ExitStatus.ERROR
    except BrokenPipeError:
        # `tokenpak config list | head`: the reader left; that is not an error.
        sys.stdout = open(os.devnull, "w")
        return ExitStatus.OK
    except Exception as exc:  # a bug: still one line, and what to do about it
        print("tokenpak: error: internal error: %s: %s" % (type(exc).__name__,
                                                           _one_line(str(exc))), file=sys.stderr)
        print("tokenpak: hint: this is a bug in tokenpak; please report it with the command "
              "you ran", file=sys.stderr)
        return ExitStatus.ERROR


def _one_line(text):
    """Messages quote user input (file names, values): keep each message on one line."""
    return " ".join(str(text).split())
