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

MODES = ("strict", "hybrid", "balanced", "aggressive")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tokenpak",
        description="Local proxy for LLM APIs: compresses prompts, caches answers, "
                    "accounts tokens and cost. Point your client's base URL at "
                    "http://localhost:8766.")
    parser.add_argument("--version", action="version", version="tokenpak " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the proxy (foreground unless --daemon)")
    serve.add_argument("--host", help="address to listen on (proxy.host, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (proxy.port, default 8766)")
    serve.add_argument("--mode", choices=MODES,
                       help="compression level (compression.level, default hybrid)")
    serve.add_argument("--daemon", action="store_true",
                       help="detach and run in the background (pid file, log file)")
    serve.set_defaults(func=cmd_serve)

    stop = commands.add_parser("stop", help="stop the daemon started by `serve --daemon`")
    stop.set_defaults(func=cmd_stop)
    status = commands.add_parser("status", help="is tokenpak running? (exit 3 when not)")
    status.set_defaults(func=cmd_status)

    service = commands.add_parser("service", help="install or remove the systemd user service")
    service_commands = service.add_subparsers(dest="action", metavar="ACTION")
    service_commands.required = True
    service_commands.add_parser(
        "install", help="write ~/.config/systemd/user/tokenpak.service").set_defaults(
        func=cmd_service_install)
    service_commands.add_parser(
        "uninstall", help="stop, disable and remove the user service").set_defaults(
        func=cmd_service_uninstall)

    stats = commands.add_parser("stats", help="tokens, cost and savings from the database")
    stats.add_argument("--since", metavar="AGE", help="only the last AGE: 30m, 24h, 7d")
    stats.add_argument("--by", choices=("model", "provider", "day"), default="model",
                       help="group rows by (default model)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=cmd_stats)

    cache = commands.add_parser("cache", help="inspect or empty the answer cache")
    cache_commands = cache.add_subparsers(dest="action", metavar="ACTION")
    cache_commands.required = True
    cache_commands.add_parser("stats", help="entries, size and age of the cache").set_defaults(
        func=cmd_cache_stats)
    cache_commands.add_parser("clear", help="delete every cache entry").set_defaults(
        func=cmd_cache_clear)

    compress = commands.add_parser(
        "compress", help="dry run: what compression does to a request body")
    compress.add_argument("file", metavar="FILE", help="a JSON request body, or - for stdin")
    compress.add_argument("--mode", choices=MODES, help="compression level (default: config)")
    compress.add_argument("--api", choices=("openai", "anthropic"),
                          help="body shape (default: guessed from the body)")
    compress.add_argument("--output", metavar="FILE", help="write the compressed body here")
    compress.set_defaults(func=cmd_compress)

    cfg = commands.add_parser("config", help="read and change ~/.tokenpak/config.json")
    cfg_commands = cfg.add_subparsers(dest="action", metavar="ACTION")
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
    return parser


def serve_overrides(args):
    """The serve flags as config overrides (the strongest source)."""
    overrides = {}
    if args.host:
        overrides["proxy.host"] = args.host
    if args.port is not None:
        overrides["proxy.port"] = args.port
    if args.mode:
        overrides["compression.level"] = args.mode
    return overrides


def cmd_serve(args):
    """Foreground by default (what systemd and terminals want); --daemon detaches."""
    from . import daemon, proxy, systemd
    overrides = serve_overrides(args)
    config = configmod.load(overrides)
    reload = lambda: configmod.load(overrides)  # noqa: E731  (SIGHUP keeps the CLI flags)
    level = config.get("log.level")
    if args.daemon:
        log_file = config.get("proxy.log_file")

        def run(ready):
            daemon.setup_logging(log_file, level, journal=False)
            return proxy.serve(config, on_ready=lambda server: ready(), reload=reload)

        return daemon.start(config.get("proxy.pid_file"), log_file, run)
    daemon.setup_logging(None, level, journal=systemd.under_journal())
    sockets = systemd.listen_sockets()
    return proxy.serve(config, listen_socket=sockets[0] if sockets else None, reload=reload)


def health_url(config):
    host = config.get("proxy.host")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = "[%s]" % host
    return "http://%s:%d/health" % (host, config.get("proxy.port"))


def cmd_stop(args):
    from . import daemon
    config = configmod.load()
    grace = config.get("proxy.shutdown_grace_seconds")
    return daemon.stop(config.get("proxy.pid_file"), timeout=grace + 10,
                       health_url=health_url(config))


def cmd_status(args):
    from . import daemon
    config = configmod.load()
    code, text = daemon.status(config.get("proxy.pid_file"), health_url(config))
    print(text)
    return code


def cmd_service_install(args):
    from . import systemd
    sys.stdout.write(systemd.install_user_unit())
    return ExitStatus.OK


def cmd_service_uninstall(args):
    from . import systemd
    sys.stdout.write(systemd.uninstall_user_unit())
    return ExitStatus.OK


def cmd_stats(args):
    from . import stats
    config = configmod.load()
    since = stats.parse_since(args.since) if args.since else None
    db = config.get("db.path")
    rows = stats.report(db, since, args.by)
    if args.json:
        print(json.dumps({"summary": stats.summary(db, since), "rows": rows}, indent=2))
        return ExitStatus.OK
    if not rows:
        print("no requests recorded%s in %s" % (" in the last " + args.since if since else "",
                                                 db))
        return ExitStatus.OK
    print(stats.format_table(rows))
    return ExitStatus.OK


def open_cache(config):
    from .cache import CacheStore
    return CacheStore(config.get("db.path"), config.get("cache.ttl_seconds"),
                      config.get("cache.max_mb"))


def cmd_cache_stats(args):
    import time
    store = open_cache(configmod.load())
    try:
        info = store.stats()
    finally:
        store.close()
    age = lambda t: "%s (%s ago)" % (time.strftime("%Y-%m-%d %H:%M", time.localtime(t)),  # noqa
                                     _ago(time.time() - t)) if t else "-"
    print("cache:    %s" % info["path"])
    print("entries:  {:,}".format(info["entries"]))
    print("size:     {:,.1f} MB of {:,.0f} MB".format(info["bytes"] / 1048576.0,
                                                      info["max_bytes"] / 1048576.0))
    print("oldest:   %s" % age(info["oldest"]))
    print("newest:   %s" % age(info["newest"]))
    print("keys:     %d (entries are scoped per API key)" % len(info["scopes"]))
    return ExitStatus.OK


def _ago(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def cmd_cache_clear(args):
    store = open_cache(configmod.load())
    try:
        removed = store.clear()
    finally:
        store.close()
    print("removed {:,} cache entries".format(removed))
    return ExitStatus.OK


def guess_api(body):
    """Anthropic messages have a top-level system or typed content blocks of their own."""
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


def cmd_compress(args):
    from . import compression
    config = configmod.load({"compression.level": args.mode} if args.mode else None)
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
        body = json.loads(text)
    except OSError as exc:
        raise TokenpakError("cannot read %s: %s" % (args.file, exc.strerror))
    except ValueError as exc:
        raise TokenpakError("%s is not JSON: %s" % (args.file, exc))
    api = args.api
    if isinstance(body, dict) and isinstance(body.get("body"), dict):
        api = api or body.get("api")  # a corpus case: {"api": ..., "body": {...}}
        body = body["body"]
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise TokenpakError("%s is not a chat request body (no \"messages\" list)" % args.file)
    api = api or guess_api(body)
    settings = compression.Settings(
        enabled=True, level=config.get("compression.level"),
        threshold_tokens=config.get("compression.threshold_tokens"),
        preserve_code=config.get("compression.preserve_code"),
        preserve_json=config.get("compression.preserve_json"))
    report = compression.dry_run(api, body, settings)
    print(compression.format_report(report))
    if args.output:
        result = compression.compress_request(api, body, settings)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(result.body, handle, ensure_ascii=False)
            handle.write("\n")
        print("wrote %s" % args.output)
    return ExitStatus.OK


def cmd_config_set(args):
    path = configmod.config_path()
    value = configmod.parse_value(args.key, args.value)
    values = configmod.read_file(path)
    values[args.key] = value
    configmod.write_file(path, values)
    print("%s = %s  (%s)" % (args.key, _show(value), path))
    return ExitStatus.OK


def cmd_config_get(args):
    configmod.require_key(args.key)
    config = configmod.load()
    if args.key not in config.names():
        raise TokenpakError("%s is not set" % args.key, status=ExitStatus.ERROR)
    print(_show(config.get(args.key)))
    return ExitStatus.OK


def cmd_config_unset(args):
    configmod.require_key(args.key)
    path = configmod.config_path()
    values = configmod.read_file(path)
    if args.key not in values:
        print("%s was not set in %s" % (args.key, path))
        return ExitStatus.OK
    del values[args.key]
    configmod.write_file(path, values)
    print("unset %s  (%s)" % (args.key, path))
    return ExitStatus.OK


def cmd_config_list(args):
    config = configmod.load()
    rows = [(name, _show(config.get(name)), config.source(name)) for name in config.names()]
    if args.json:
        print(json.dumps({n: {"value": config.get(n), "source": s} for n, _, s in rows},
                         indent=2))
        return ExitStatus.OK
    width = max(len(name) for name, _, _ in rows)
    vwidth = min(48, max(len(value) for _, value, _ in rows))
    for name, value, source in rows:
        print("%-*s  %-*s  %s" % (width, name, vwidth, value, source))
    print("\nconfig file: %s" % config.path)
    return ExitStatus.OK


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return "" if value is None else str(value)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokenpakError as exc:
        print("tokenpak: error: %s" % exc.message, file=sys.stderr)
        if exc.hint:
            print("tokenpak: hint: %s" % exc.hint, file=sys.stderr)
        return int(exc.status)
    except KeyboardInterrupt:
        return ExitStatus.ERROR
    except BrokenPipeError:
        # `tokenpak config list | head`: the reader left; that is not an error.
        sys.stdout = open(os.devnull, "w")
        return ExitStatus.OK
