"""The `tokenpak` command line.

`build_parser()` builds the whole command tree in one place so that tests and the man-page
check can walk it; each subcommand's handler is a plain function taking the parsed
arguments and returning an exit status. `main()` turns a TokenpakError into one line,
`tokenpak: error: ...` plus a hint, never a traceback.
"""

import argparse
import json
import logging
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
    serve.set_defaults(func=cmd_serve)

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


def setup_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger("tokenpak")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def cmd_serve(args):
    from . import proxy
    config = configmod.load(serve_overrides(args))
    setup_logging(config.get("log.level"))
    return proxy.serve(config)


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
