"""What tokenpak adds to a big agent request (a 250-350 kB Claude Code turn), against direct.

    python bench/bigrequest.py [--requests 60] [--corpus tests/corpus/agents/019-...json ...]
                               [--before /path/to/another/checkout]

The bodies are real Claude Code requests from tests/corpus/agents, serialised as Claude
Code does (compact JSON, UTF-8 unescaped). For each case the previous turn is sent first,
then the next turn once ("next turn, first"), whose history compression and parsing have
seen, then `--requests` repeats of the next turn that differ only in `max_tokens`, so none
is a cache hit while the whole history is memoised ("memoised turn"). Direct and proxied
requests are interleaved one by one so both see the same machine state; with `--before`,
a second tokenpak runs from that source tree (e.g. `git worktree add /tmp/main main`) and
its requests are interleaved too: direct, before, after, direct, before, after...
tokenpak's CPU per request is read from /proc (one worker, so one process holds it all),
in clock ticks: on a loaded machine that figure is coarse. `--inprocess` measures the part
this bench is about precisely instead: the process CPU (all threads) of exchange.prepare
(parse, footer strip, compression, forwarded bytes, cache key) and the exact token counts
the accounting row reads, per memoised turn, run in a fresh interpreter for each source
tree, rounds interleaved.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

AGENTS = sorted(glob.glob(os.path.join(common.REPO, "tests", "corpus", "agents", "*.json")))
HEADERS = {"x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01",
           "Authorization": None}


def encode(body, max_tokens):
    """The body as Claude Code sends it (JSON.stringify: compact, non-ASCII as UTF-8)."""
    return json.dumps(dict(body, max_tokens=max_tokens, stream=False), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


class Target:
    """One place requests go: direct, or a tokenpak (whose CPU is counted)."""

    def __init__(self, name, url, process=None):
        self.name, self.client, self.process = name, common.Client(url), process
        self.next_first, self.times, self.cpu = [], [], []

    def send(self, path, body):
        before = common.cpu_seconds(self.process.pid) if self.process else 0.0
        started = time.perf_counter()
        status, _ = self.client.request("POST", path, body, HEADERS)
        elapsed = time.perf_counter() - started
        assert status == 200, (self.name, status)
        used = common.cpu_seconds(self.process.pid) - before if self.process else 0.0
        return elapsed, used


def start_from(src, fake_url, state):
    """tokenpak from the source tree `src`. `python -m` puts the working directory first on
    sys.path, so it must start in `src`: from anywhere inside another checkout it would run
    that checkout's code whatever PYTHONPATH says."""
    here = os.getcwd()
    os.chdir(src)
    try:
        return common.start_tokenpak(fake_url, state, {"PYTHONPATH": src}, args=("--workers", "1"))
    finally:
        os.chdir(here)


def run(corpora, n, before_src=None):
    fake, fake_url = common.start_fake()
    started, targets = [], []
    try:
        targets.append(Target("direct", fake_url))
        trees = ([("before", before_src)] if before_src else []) + [("after", common.REPO)]
        for name, src in trees:
            state = tempfile.mkdtemp(prefix="tokenpak-bench-")
            process, url = start_from(src, fake_url, state)
            started.append(process)
            targets.append(Target(name, url, process))
        sizes = []
        for corpus in corpora:
            with open(corpus) as handle:
                case = json.load(handle)
            path = case["path"]
            for target in targets:  # the previous turn: what memoises the history
                target.send(path, encode(case["previous"], 900))
            body = encode(case["body"], 901)
            sizes.append(len(body))
            for target in targets:
                target.next_first.append(target.send(path, body))
            for i in range(n):
                body = encode(case["body"], 1000 + i)
                for target in targets:
                    elapsed, used = target.send(path, body)
                    target.times.append(elapsed)
                    target.cpu.append(used)
        return rows(targets, sizes, n)
    finally:
        for process in started:
            common.stop_tokenpak(process)
        common.stop(fake)


def rows(targets, sizes, n):
    p50 = lambda values: common.percentile(values, 50)  # noqa: E731
    direct = targets[0]
    out = []
    for target in targets[1:]:
        added = p50(target.times) - p50(direct.times)
        first = p50([t for t, _ in target.next_first]) - p50([t for t, _ in direct.next_first])
        out.append(("memoised turn p50, %s" % target.name, common.ms(p50(direct.times)),
                    common.ms(p50(target.times)), "+%.2f ms" % (added * 1000)))
        out.append(("… tokenpak CPU per memoised turn, %s" % target.name, "—",
                    "%.0f µs" % (sum(target.cpu) / len(target.cpu) * 1e6), ""))
        out.append(("next turn, first time (median of %d cases), %s" % (len(sizes), target.name),
                    common.ms(p50([t for t, _ in direct.next_first])),
                    common.ms(p50([t for t, _ in target.next_first])),
                    "+%.2f ms" % (first * 1000)))
        out.append(("… tokenpak CPU, next turn first time, %s" % target.name, "—",
                    "%.0f µs" % (p50([c for _, c in target.next_first]) * 1e6), ""))
    return out, sizes


INPROCESS = r"""
import collections, json, sys, time
from tokenpak import compression, exchange
from tokenpak.providers import Route
from tokenpak.runtime import CachePolicy
sys.path.insert(0, %(bench)r)
from bigrequest import encode
rt = collections.namedtuple("Rt", "compression cache")(
    compression.Settings(), CachePolicy(object(), b"s" * 32, False, False))
out = []
for corpus in %(corpora)r:
    case = json.load(open(corpus))
    def turn(body):
        ex = exchange.Exchange("POST", case["path"], [("x-api-key", "sk-ant-bench"),
                               ("anthropic-version", "2023-06-01")], body)
        ex.route = Route("anthropic", "http://upstream" + case["path"], "upstream", "anthropic")
        started = time.process_time()
        exchange.prepare(rt, ex)
        if ex.compressed is not None:
            ex.compressed.tokens_before, ex.compressed.tokens_after
        return time.process_time() - started
    turn(encode(case["previous"], 900))
    turn(encode(case["body"], 901))
    times = sorted(turn(encode(case["body"], 1000 + i)) for i in range(%(n)d))
    out.append(times[len(times) // 2])
print(json.dumps(out))
"""


def inprocess(corpora, n, trees, rounds=3):
    """{tree name: [median process CPU per memoised turn, per case, per round]}."""
    results = {name: [] for name, _ in trees}
    for _ in range(rounds):
        for name, src in trees:
            code = INPROCESS % {"bench": os.path.dirname(os.path.abspath(__file__)),
                                "corpora": [os.path.abspath(c) for c in corpora], "n": n}
            # In `src`: `python -c` puts the working directory first on sys.path.
            done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True,
                                  env=dict(os.environ, PYTHONPATH=src), text=True, check=True)
            results[name].append(json.loads(done.stdout))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="memoised turns per case")
    parser.add_argument("--corpus", nargs="*", default=AGENTS)
    parser.add_argument("--before", help="another source tree to compare, interleaved")
    parser.add_argument("--inprocess", action="store_true",
                        help="CPU of prepare and counting in-process, not through HTTP")
    args = parser.parse_args()
    if args.inprocess:
        trees = ([("before", args.before)] if args.before else []) + [("after", common.REPO)]
        results = inprocess(args.corpus, args.requests, trees)
        names = [os.path.basename(c)[:3] for c in args.corpus]
        table = []
        for name, rounds in results.items():
            for r, medians in enumerate(rounds):
                table.append(("%s, round %d" % (name, r + 1),) + tuple(
                    "%.2f ms" % (m * 1000) for m in medians))
        print(common.markdown("prepare + counts, process CPU per memoised turn (%s)"
                              % common.machine(), ["tree"] + names, table))
        return
    table, sizes = run(args.corpus, args.requests, args.before)
    title = "Big agent request, %d cases of %d-%d kB (%s)" % (
        len(sizes), min(sizes) // 1024, max(sizes) // 1024, common.machine())
    print(common.markdown(title, ["measure", "direct", "through tokenpak", "difference"], table))


if __name__ == "__main__":
    main()
