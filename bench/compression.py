"""Benchmark prompt compression over tests/corpus (a copy of ../shared/corpus): tokens saved, facts kept, time.

    python bench/compression.py [--corpus DIR] [--agents DIR] [--markdown] [--repeat N]

For each mode (strict, hybrid, aggressive) and case kind (the corpus name without its
number: agent-session, json-tools, ...) it reports prompt tokens before and after (exact
o200k_base counts), needles and verbatim blocks kept, tokens saved per transform, and the
CPU time of compress_request per 100k prompt tokens: cold (empty memo) and for a new turn
appended to a memoised history (the steady state of an agent session). Times are process
CPU time, best of --repeat runs, so other load on the machine distorts them less.
The agents corpus (tests/corpus/agents: Claude Code requests with their previous turn) is
reported on its own: tokens saved, needles kept, and whether each previous turn was
forwarded as a byte-identical prefix of the next one (cache_control markers aside).
Numbers, not pass/fail: the figures go in the README.
"""

import argparse
import collections
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenpak import compression, tokens  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "tests" / "corpus"
MODES = compression.LEVELS
TARGET_KINDS = ("agent-session", "json-tools", "code-review")


def load_cases(folder):
    cases = []
    for path in sorted(Path(folder).glob("*.json")):
        case = json.loads(path.read_text())
        case["kind"] = case["name"].rsplit("-", 1)[0]
        cases.append(case)
    return cases


def strings(value):
    """Every string in a decoded JSON value: what the provider reads."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def clear_memos():
    for memo in (compression._memo, compression._elements_memo, compression._savings_memo,
                 tokens._count_memo):
        memo.clear()


def cpu_ms(function, repeat, setup=None):
    """Best process-CPU time of `function()` over `repeat` runs, in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return best * 1000


def with_new_turn(case):
    body = copy.deepcopy(case["body"])
    if case["api"] == "anthropic":
        body["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "Done."}]})
    else:
        body["messages"].append({"role": "assistant", "content": "Done."})
    body["messages"].append({"role": "user", "content": "Thanks. Now summarise what changed."})
    return body


def unmarked(value):
    """`value` without cache_control fields: where Claude Code's marker sits is not content."""
    if isinstance(value, dict):
        return {k: unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [unmarked(v) for v in value]
    return value


def prefix_stable(case, settings):
    """Is compress(previous) a byte-identical prefix of compress(body), markers aside?"""
    if "previous" not in case:
        return None
    old = unmarked(compression.compress_request(case["api"], case["previous"], settings).body)
    new = unmarked(compression.compress_request(case["api"], case["body"], settings).body)
    old_bytes = json.dumps(old["messages"]).encode()
    return json.dumps(new["messages"]).encode().startswith(old_bytes[:-1])


def measure(cases, mode, repeat):
    """Per-kind totals and timings for one mode."""
    settings = compression.Settings(level=mode)
    kinds = collections.OrderedDict()
    transforms = collections.Counter()
    cold_ms = warm_ms = prompt_tokens = 0.0
    warm_turns = []
    for case in cases:
        api, body = case["api"], case["body"]
        clear_memos()
        result = compression.compress_request(api, body, settings)
        text = "\n".join(strings(json.loads(json.dumps(result.body))))
        row = kinds.setdefault(case["kind"], collections.Counter())
        row["cases"] += 1
        row["before"] += result.tokens_before
        row["after"] += result.tokens_after
        row["needles"] += len(case["needles"])
        row["needles_kept"] += sum(1 for n in case["needles"] if n in text)
        row["verbatim"] += len(case["verbatim"])
        row["verbatim_kept"] += sum(1 for v in case["verbatim"] if v in text)
        stable = prefix_stable(case, settings)
        if stable is not None:
            row["prefixes"] += 1
            row["prefixes_kept"] += stable
        transforms.update(result.saved_by_transform)
        prompt_tokens += result.tokens_before
        cold_ms += cpu_ms(lambda: compression.compress_request(api, body, settings), repeat,
                          setup=clear_memos)
        grown = with_new_turn(case)
        compression.compress_request(api, body, settings)  # the history, memoised
        turn = cpu_ms(lambda: compression.compress_request(api, grown, settings), repeat)
        warm_ms += turn
        warm_turns.append(turn)
    return {"kinds": kinds, "transforms": transforms,
            "cold_per_100k": cold_ms * 1e5 / prompt_tokens,
            "warm_per_100k": warm_ms * 1e5 / prompt_tokens,
            "warm_max_ms": max(warm_turns)}


def pct(before, after):
    return "%.1f%%" % (100.0 * (before - after) / before) if before else "-"


def table(header, rows, markdown, left=1):
    """Rows as a Markdown table, or as aligned text (the first `left` columns left-aligned)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(":--" if i < left else "--:" for i in range(len(header))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(header)] + [line(r) for r in rows])


def agents_table(agents, repeat, markdown):
    """Claude Code requests: savings, needles and prefix stability per mode."""
    rows = []
    for mode in MODES:
        res = measure(agents, mode, repeat)
        c = sum(res["kinds"].values(), collections.Counter())
        rows.append([mode, "{:,}".format(c["before"]), "{:,}".format(c["after"]),
                     pct(c["before"], c["after"]), "%d/%d" % (c["needles_kept"], c["needles"]),
                     "%d/%d" % (c["prefixes_kept"], c["prefixes"]),
                     "%.1f" % res["cold_per_100k"], "%.2f" % res["warm_per_100k"]])
    return table(["mode", "tokens before", "after", "saved", "needles kept",
                  "previous turn a prefix", "cold ms/100k", "new turn ms/100k"], rows, markdown)


def report(cases, repeat, markdown, agents=()):
    results = {mode: measure(cases, mode, repeat) for mode in MODES}
    out = ["tokenizer: %s; %d cases" % (tokens.backend(), len(cases)), ""]
    rows = []
    for mode, res in results.items():
        groups = list(res["kinds"].items())
        groups.append(("target kinds", sum((c for k, c in res["kinds"].items() if k in TARGET_KINDS),
                                           collections.Counter())))
        groups.append(("all", sum(res["kinds"].values(), collections.Counter())))
        for kind, c in groups:
            rows.append([mode, kind, "{:,}".format(c["before"]), "{:,}".format(c["after"]),
                         pct(c["before"], c["after"]), "%d/%d" % (c["needles_kept"], c["needles"]),
                         "%d/%d" % (c["verbatim_kept"], c["verbatim"])])
    out.append(table(["mode", "kind", "tokens before", "after", "saved", "needles kept",
                      "verbatim kept"], rows, markdown, left=2))
    out.append("")
    total = sum(c["before"] for c in results["hybrid"]["kinds"].values())
    names = sorted({n for r in results.values() for n in r["transforms"]},
                   key=lambda n: -results["aggressive"]["transforms"][n])
    rows = [[name] + ["{:,} ({:.1f}%)".format(results[m]["transforms"][name],
                                              100.0 * results[m]["transforms"][name] / total)
                      for m in MODES] for name in names]
    out.append(table(["transform"] + ["saved in %s" % m for m in MODES], rows, markdown))
    out.append("")
    rows = [[mode, "%.1f" % r["cold_per_100k"], "%.2f" % r["warm_per_100k"], "%.2f" % r["warm_max_ms"]]
            for mode, r in results.items()]
    out.append(table(["mode", "cold ms/100k tokens", "new turn ms/100k tokens",
                      "slowest new turn (ms)"], rows, markdown))
    if agents:
        out += ["", "agents corpus (Claude Code requests): %d cases" % len(agents), ""]
        out.append(agents_table(agents, repeat, markdown))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="folder of corpus *.json")
    parser.add_argument("--agents", default=str(DEFAULT_CORPUS / "agents"),
                        help="folder of Claude Code *.json cases with a previous turn")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per case (best kept)")
    args = parser.parse_args(argv)
    cases = load_cases(args.corpus)
    if not cases:
        parser.error("no *.json cases in %s" % args.corpus)
    agents = load_cases(args.agents) if Path(args.agents).is_dir() else []
    tokens.warm_up()
    print(report(cases, args.repeat, args.markdown, agents))
    return 0


if __name__ == "__main__":
    sys.exit(main())
