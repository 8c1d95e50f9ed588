"""What a budget check adds to a request (issue 14's target: <= 5 us), timed in-process.

    python bench/budget.py [--calls 200000] [--rounds 5]

- the check at exchange.forward, as a request that goes upstream pays it: no budget set
  (one attribute test), a global daily budget, and global + tag + key budgets (both periods
  each: six limits, the key id taken from the request's memoised cache scope);
- Ledger.add, which the accounting Recorder calls with every priced row (also when no
  budget is set, so that one added by SIGHUP starts from the right spend);
- the accounting writer's extra work per batch (reading the rows other workers wrote in the
  same transaction), timed against a 100,000-row DB: off the request path.
Each figure is the mean per call in the least disturbed of several rounds, in CPU time of
the timing thread (time.thread_time), so a machine shared with other jobs disturbs it less
than wall-clock time would.
"""

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tokenpak import budget, config as configmod, exchange  # noqa: E402
from tokenpak.accounting import Recorder  # noqa: E402


class App:
    ledger = None

    def key_secret(self):
        return None


class Out:
    def fail(self, status, message, extra=()):
        raise AssertionError("refused: %s" % message)


def runtime(settings, tmp):
    from tokenpak import runtime as rtmod
    from tokenpak.cache import CacheStore, load_secret
    settings = dict(settings, **{"db.path": os.path.join(tmp, "bench.db")})
    config = configmod.load(settings, environ={}, path=os.path.join(tmp, "none.json"))
    return rtmod.build(config, lambda c: (CacheStore(c.get("db.path"), 60, 16),
                                          load_secret(os.path.join(tmp, "secret"))))


def per_call(fn, calls, rounds):
    results = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            fn()
        results.append((time.thread_time() - started) / calls)
    return min(results) * 1e6  # the least disturbed round (timeit's advice)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="tokenpak-bench-budget-")
    app, out = App(), Out()
    key = "sk-bench-0123456789"
    headers = [("Authorization", "Bearer " + key), ("X-TokenPak-Tag", "alpha")]
    ex = exchange.Exchange("POST", "/v1/chat/completions", headers, b"{}")
    ex.tag = "alpha"
    rows = []
    for name, settings in (
            ("no budget set", {}),
            ("a global daily budget", {"budget.daily_usd": 100}),
            ("global + tag + key, daily and monthly (6 limits)", None)):
        if settings is None:
            rt = runtime({}, tmp)
            scope = exchange.cache_scope(rt.cache, key)
            settings = {"budget.daily_usd": 100, "budget.monthly_usd": 1000,
                        "budget.tags.alpha.daily_usd": 10, "budget.tags.alpha.monthly_usd": 50,
                        "budget.keys.%s.daily_usd" % scope[:12]: 10,
                        "budget.keys.%s.monthly_usd" % scope[:12]: 50}
        rt = runtime(settings, tmp)
        app.ledger = budget.Ledger()
        app.ledger.configure(rt.budgets)
        app.ledger.add({"ts": time.time(), "cost_usd": 1.0, "tag": "alpha"})
        ex.scope = exchange.cache_scope(rt.cache, key)

        def check():
            ex.key_id = False  # not known yet: the check computes it (accounting reuses it)
            if rt.budgets is not None and exchange.over_budget(out, app, rt, ex, None):
                raise AssertionError

        rows.append(("the check, %s" % name, per_call(check, args.calls, args.rounds)))

    ledger = app.ledger
    row = {"ts": time.time(), "cost_usd": 1e-9, "tag": "alpha", "key_id": ex.scope[:12]}
    rows.append(("Ledger.add per recorded row (6 limits)",
                 per_call(lambda: ledger.add(row), args.calls, args.rounds)))
    idle = budget.Ledger()  # no budget set: the spend is still counted, for a SIGHUP adding one
    rows.append(("Ledger.add per recorded row (no budget set)",
                 per_call(lambda: idle.add(row), args.calls, args.rounds)))

    # The writer's extra read per batch, on a DB with a month of rows.
    path = os.path.join(tmp, "writer.db")
    recorder = Recorder(path)
    recorder.start()
    for i in range(100000):
        recorder.record({"ts": time.time() - i * 20, "cost_usd": 0.01, "tag": "t%d" % (i % 20),
                         "status": 200, "method": "POST", "path": "/v1/chat/completions"})
    recorder.close(60)
    conn = sqlite3.connect(path, isolation_level=None)
    fresh = budget.Ledger()
    started = time.thread_time()
    fresh.seed(conn)
    seed_ms = (time.thread_time() - started) * 1000

    def batches(with_ledger):
        started = time.thread_time()
        for _ in range(1000):
            conn.execute("BEGIN IMMEDIATE")
            if with_ledger:
                fresh.write(conn, lambda c, r: None, [])
            conn.execute("COMMIT")
            if with_ledger:
                fresh.written([])
        return (time.thread_time() - started) * 1000  # µs per batch

    plain = statistics.median(batches(False) for _ in range(args.rounds))
    batch_us = statistics.median(batches(True) for _ in range(args.rounds)) - plain
    rows.append(("writer: extra read per batch (nothing new)", batch_us))
    print("| measure | per call |\n|---|---|")
    for name, value in rows:
        print("| %s | %.2f µs |" % (name, value))
    print("| seeding the spend from 100,000 rows (once per start) | %.1f ms |" % seed_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
