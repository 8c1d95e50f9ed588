"""What the cache saves and what accounting costs, against a direct call in the same run.

    python bench/cache.py [--requests 2000] [--accounting-calls 100000] [--quick]

Client, fake provider and tokenpak (cache on: TOKENPAK_CACHE=1, a temp HOME and DB) each
run in their own process, as in bench/overhead.py.

- End-to-end latency, p50 and p99, of a cache hit, a cache miss and a direct call to the
  fake provider, interleaved one by one (the order rotating) so the three see the same
  machine state; for a small non-stream request and for a streamed one (the whole stream
  read). Hits come from a pool of prompts answered once and committed to sqlite before
  the timed loop, so they are read from the DB as in steady state, not from memory.
  Every proxied answer's X-TokenPak-Cache header is checked: a "hit" that was not one
  would make the figures meaningless.
- tokenpak's CPU per hit and per miss: utime+stime from /proc around each request. The
  background writers' work lands on whichever request was running, as it would in use.
- Accounting on the hot path, in-process: `exchange.row(ex)` + `Recorder.record(row)` +
  `Metrics.observe(row)` for a realistic finished exchange, the work `App.record` does on
  the handler thread, over --accounting-calls calls; and, off the request path, the
  writer thread's CPU per row written to sqlite. There is no switch to turn accounting
  off in a running tokenpak, so this is how its cost is isolated.
Numbers, not pass/fail.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PATH = "/v1/chat/completions"
KEY = {"Authorization": "Bearer sk-bench-cache"}
CACHE_HEADER = "X-TokenPak-Cache"
POOL = 200          # prompts answered once, then served as hits
WARM_UP = 50


class Checked:
    """Counts answers that were not what the benchmark meant to measure."""

    def __init__(self):
        self.problems = []

    def check(self, client, status, data, stream, expect):
        if status != 200:
            self.problems.append("status %d" % status)
        elif stream and not common.stream_ended("openai", data):
            self.problems.append("stream did not end with [DONE]")
        elif expect is not None and client.header(CACHE_HEADER) != expect:
            self.problems.append("%s expected, got %s" % (expect, client.header(CACHE_HEADER)))


def timed(client, body, checked, stream, expect=None, pid=None):
    """(seconds, tokenpak CPU seconds) of one request, its whole answer read."""
    cpu = common.cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    status, data = client.request("POST", PATH, body, KEY)
    elapsed = time.perf_counter() - started
    cpu = common.cpu_seconds(pid) - cpu if pid else 0.0
    checked.check(client, status, data, stream, expect)
    return elapsed, cpu


def end_to_end(fake_url, proxy_url, pid, n, stream):
    """Interleaved direct / miss / hit timings: ({kind: [seconds]}, {kind: CPU per request})."""
    direct, proxied = common.Client(fake_url), common.Client(proxy_url)
    checked = Checked()
    base = (2 if stream else 1) * 10 ** 7
    hot = [common.chat_body(base + 5 * 10 ** 6 + k, stream) for k in range(POOL)]
    for body in hot:
        timed(proxied, body, checked, stream, expect="miss")
    for i in range(WARM_UP):  # pools, imports, sqlite reader connections
        timed(direct, common.chat_body(base - i - 1, stream), checked, stream)
        timed(proxied, common.chat_body(base - WARM_UP - i - 1, stream), checked, stream, "miss")
        timed(proxied, hot[i % POOL], checked, stream, "hit")
    time.sleep(1.0)  # the cache writer commits: the hits below are read from sqlite
    times = {"direct": [], "miss": [], "hit": []}
    cpu = {"miss": 0.0, "hit": 0.0}
    kinds = ("direct", "miss", "hit")
    for i in range(n):
        for j in range(3):
            kind = kinds[(i + j) % 3]
            if kind == "direct":
                elapsed, _ = timed(direct, common.chat_body(base + i, stream), checked, stream)
            elif kind == "miss":
                elapsed, used = timed(proxied, common.chat_body(base + 10 ** 6 + i, stream),
                                      checked, stream, "miss", pid)
                cpu["miss"] += used
            else:
                elapsed, used = timed(proxied, hot[i % POOL], checked, stream, "hit", pid)
                cpu["hit"] += used
            times[kind].append(elapsed)
    direct.close()
    proxied.close()
    if checked.problems:
        raise SystemExit("cache benchmark: %d unexpected answers, e.g. %s"
                         % (len(checked.problems), checked.problems[:3]))
    return times, {kind: total / n for kind, total in cpu.items()}


def realistic_exchange():
    """A finished non-stream OpenAI exchange as App.record sees it: a cache miss, usage
    from the provider, a compression result (below the threshold), a key scope."""
    from tokenpak import compression, exchange, providers, sse
    from tokenpak.cache import scope_id
    raw = common.chat_body(1)
    body = json.loads(raw)
    ex = exchange.Exchange("POST", PATH, [("Content-Type", "application/json"),
                                          ("Authorization", "Bearer sk-bench")], raw)
    ex.route = providers.Route("openai", "http://127.0.0.1:9" + PATH, "127.0.0.1:9", "openai")
    ex.request, ex.model, ex.status, ex.cache = body, "gpt-4o", 200, "miss"
    ex.compressed = compression.compress_request("openai", body, compression.Settings())
    ex.usage, ex.ttfb = sse.Usage(13, 7, 0, 0), 0.0004
    ex.scope = scope_id("sk-bench", os.urandom(32))
    return ex


def per_call(function, n):
    """Seconds per call of `function()`, over n calls."""
    started = time.perf_counter()
    for _ in range(n):
        function()
    return (time.perf_counter() - started) / n


def accounting_cost(n, chunk=10000):
    """Seconds per request of the accounting work on the handler thread (total and by
    part), and the writer thread's CPU seconds per row written."""
    from tokenpak import accounting, exchange, pricing
    from tokenpak.metrics import Metrics
    ex = realistic_exchange()
    prices = pricing.load_prices(None)
    metrics = Metrics()
    db = os.path.join(tempfile.mkdtemp(prefix="tokenpak-bench-acct-"), "tokenpak.db")
    hot = writer = 0.0
    done = 0
    record_only = 0.0
    sample = exchange.row(ex)
    while done < n:
        k = min(chunk, n - done)
        # Not started: rows wait in the queue, so the timed loop shares the GIL with no
        # writer; the queue is drained between chunks, as the writer does in use.
        recorder = accounting.Recorder(db, max_queue=k + 1, prices=prices)
        started = time.perf_counter()
        for _ in range(k):
            row = exchange.row(ex)
            recorder.record(row)
            metrics.observe(row)
        hot += time.perf_counter() - started
        cpu = time.process_time()
        recorder.start()
        recorder.flush(120)
        writer += time.process_time() - cpu
        recorder.close()
        if recorder.rows_written != k:  # a dropped row would make the figure too cheap
            raise SystemExit("accounting benchmark: %d of %d rows written, %d dropped"
                             % (recorder.rows_written, k, recorder.rows_dropped))
        # record() alone, on a fresh queue
        recorder = accounting.Recorder(db, max_queue=k + 1, prices=prices)
        record_only += per_call(lambda: recorder.record(sample), k) * k
        recorder.close()
        done += k
    return {"total": hot / n, "row": per_call(lambda: exchange.row(ex), n),
            "record": record_only / n, "observe": per_call(lambda: metrics.observe(sample), n),
            "writer": writer / n}


def latency_rows(label, times):
    rows = []
    for kind, name in (("hit", "cache hit"), ("miss", "cache miss")):
        for p in (50, 99):
            d, t = common.percentile(times["direct"], p), common.percentile(times[kind], p)
            rows.append(("%s p%d, %s" % (label, p, name), common.ms(d), common.ms(t),
                         "%+.2f ms" % ((t - d) * 1000)))
    return rows


def run(requests=2000, accounting_calls=100000):
    """Start the processes, measure, stop; returns the table rows."""
    fake, fake_url = common.start_fake()
    state = tempfile.mkdtemp(prefix="tokenpak-bench-")
    tokenpak, proxy_url = common.start_tokenpak(fake_url, state, {"TOKENPAK_CACHE": "1"})
    try:
        small, small_cpu = end_to_end(fake_url, proxy_url, tokenpak.pid, requests, False)
        streamed, stream_cpu = end_to_end(fake_url, proxy_url, tokenpak.pid, requests, True)
    finally:
        common.stop_tokenpak(tokenpak)
        common.stop(fake)
    acct = accounting_cost(accounting_calls)
    us = lambda seconds: "%.1f µs" % (seconds * 1e6)  # noqa: E731
    direct_p50 = common.percentile(small["direct"], 50)
    rows = latency_rows("non-stream", small) + latency_rows("streamed", streamed)
    rows += [
        ("tokenpak CPU per non-stream request", "—", "hit %s, miss %s" % (
            us(small_cpu["hit"]), us(small_cpu["miss"])),
            "hit = %.0f%% of miss" % (100.0 * small_cpu["hit"] / small_cpu["miss"])
            if small_cpu["miss"] else ""),
        ("tokenpak CPU per streamed request", "—", "hit %s, miss %s" % (
            us(stream_cpu["hit"]), us(stream_cpu["miss"])),
            "hit = %.0f%% of miss" % (100.0 * stream_cpu["hit"] / stream_cpu["miss"])
            if stream_cpu["miss"] else ""),
        ("accounting on the handler thread (row + record + observe), %s calls"
         % "{:,}".format(accounting_calls), common.ms(direct_p50) + " (a direct call, p50)",
         us(acct["total"]) + " per request", "%.1f%% of a direct call" % (
             100.0 * acct["total"] / direct_p50)),
        ("… of which row() / record() / observe(), each timed alone", "—", " / ".join(
            us(acct[part]) for part in ("row", "record", "observe")), ""),
        ("accounting writer thread, off the request path", "—",
         us(acct["writer"]) + " CPU per row", "batched sqlite inserts"),
    ]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="timed requests of each kind (direct, hit, miss) per shape")
    parser.add_argument("--accounting-calls", type=int, default=100000)
    parser.add_argument("--quick", action="store_true", help="300 requests, 20,000 calls")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.accounting_calls = 300, 20000
    rows = run(args.requests, args.accounting_calls)
    print(common.markdown("Cache and accounting (%s)" % common.machine(),
                          ("measure", "direct", "through tokenpak", "difference"), rows))


if __name__ == "__main__":
    main()
