"""The whole benchmark suite in one go, written as one Markdown document for the README.

    python bench/run.py [--output bench/RESULTS.md] [--quick] [--only overhead,cache,...]

Runs bench/overhead.py, bench/cache.py, bench/compression.py and bench/soak.py one after
another (never at the same time: they would measure each other) through their run
functions, and writes their tables under one header line naming the machine, CPU, cores,
Python version, tokenpak version and date. Each proxied figure stands beside the direct
call to the fake provider measured in the same run, where there is one. --quick uses each
benchmark's quick settings (about a minute in all). The document is printed too.
"""

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SECTIONS = ("overhead", "cache", "compression", "soak")
# (full, quick) keyword arguments of each benchmark's run function
SETTINGS = {
    "overhead": ({"requests": 2000, "seconds": 5.0, "clients": 8},
                 {"requests": 500, "seconds": 2.0, "clients": 8}),
    "cache": ({"requests": 2000, "accounting_calls": 100000},
              {"requests": 300, "accounting_calls": 20000}),
    "compression": ({"repeat": 5}, {"repeat": 1}),
    "soak": ({"requests": 20000, "clients": 16}, {"requests": 2000, "clients": 16}),
}
HEADERS = ("measure", "direct", "through tokenpak", "difference")


def load(name):
    """bench/<name>.py as a module of its own name (bench/cache.py is not tokenpak.cache)."""
    spec = importlib.util.spec_from_file_location("bench_" + name, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overhead(settings):
    rows = load("overhead").run(**settings)
    return common.markdown("Proxy overhead", HEADERS, rows) + (
        "\n\nSmall non-stream requests with unique bodies (no cache hit), direct and proxied "
        "interleaved; throughput with %d keep-alive client processes." % settings["clients"])


def cache(settings):
    rows = load("cache").run(**settings)
    return common.markdown("Cache and accounting", HEADERS, rows) + (
        "\n\nCache on. Direct, miss and hit interleaved one by one, %s timed requests of "
        "each per shape; a streamed figure is the whole stream read. Accounting is timed "
        "in-process (there is no switch to turn it off in a running tokenpak)."
        % "{:,}".format(settings["requests"]))


def compression(settings):
    module = load("compression")
    cases = module.load_cases(module.DEFAULT_CORPUS)
    if not cases:
        return "#### Prompt compression\n\nNo corpus found at %s." % module.DEFAULT_CORPUS
    module.tokens.warm_up()
    return "#### Prompt compression (in-process, no direct call)\n\n" + module.report(
        cases, settings["repeat"], True)


def soak(settings):
    rows = load("soak").run(**settings)
    return common.markdown("Soak", ("measure", "value", "note"), rows)


def revision():
    """tokenpak's version and the git commit measured (marked when the tree had changes)."""
    from tokenpak import __version__
    try:
        sha = subprocess.run(["git", "-C", common.REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", common.REPO, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    text = "tokenpak %s" % __version__
    if sha:
        text += ", git %s%s" % (sha, " with uncommitted changes" if dirty else "")
    return text


def document(parts, quick, took):
    header = ["# tokenpak benchmark results", "",
              "Measured on %s (%s); %s; %s settings; %.0f s in all." % (
                  common.machine(), platform.platform(terse=True), revision(),
                  "quick" if quick else "full", took), "",
              "Client, fake provider and tokenpak each ran in their own process on this "
              "machine; \"direct\" is the same request sent straight to the fake provider in "
              "the same run. Produced by `python bench/run.py%s`." % (" --quick" if quick else "")]
    return "\n".join(header) + "\n\n" + "\n\n".join(parts) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick settings")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated subset of: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error("unknown benchmark(s): %s" % ", ".join(unknown))
    started = time.monotonic()
    parts = []
    for name in SECTIONS:
        if name in chosen:
            print("running %s ..." % name, file=sys.stderr, flush=True)
            parts.append(globals()[name](SETTINGS[name][1 if args.quick else 0]))
    text = document(parts, args.quick, time.monotonic() - started)
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    print("written to %s" % args.output, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
