"""Soak: many mixed requests at steady concurrency; does tokenpak lose, leak or fail any?

    python bench/soak.py [--requests 20000] [--clients 16] [--repeat 0.3] [--quick]

Client, fake provider and tokenpak (cache on, temp HOME and DB) run in their own processes.
The client runs --clients threads, each with its own keep-alive http.client connection,
sending a fixed, seeded plan of requests: OpenAI /v1/chat/completions (Bearer sk-...) and
Anthropic /v1/messages (x-api-key sk-ant-...), streamed and not, with a few API keys, and
about --repeat of them repeating an earlier request exactly (a cache hit, or a coalesced
one while the first is still in flight). Every answer is checked: status 2xx, the prompt's
unique word echoed back, and for streams the whole SSE body read and ending properly
([DONE] / message_stop, no error event). Anything else is an error.

It reports errors, tokenpak's RSS when idle, at the start of the load, after warm-up (the
first 10% of requests) and at the end, threads and open fds before and after the load (the
client's connections closed, one second to settle), startup time to a healthy /health, the
CPU each process used (so a client bottleneck would show), and, after a graceful SIGTERM,
the rows in the accounting DB's `requests` table against the requests sent.
Numbers, not pass/fail.
"""

import argparse
import itertools
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPENAI_PATH, ANTHROPIC_PATH = "/v1/chat/completions", "/v1/messages"
MODELS = {"openai": ("gpt-4o", "gpt-4o-mini"), "anthropic": ("claude-sonnet-4-6",
                                                             "claude-haiku-4-5")}
SETTLE = 1.0      # seconds after the load (or the start) before threads/fds are read
SAMPLE = 0.25     # seconds between RSS/thread/fd samples during the load


def plan(n, repeat, keys, seed=20240601):
    """n request specs (api, model, stream, key index, unique word); a `repeat` share of
    them are exact repeats of an earlier spec, so the cache answers them."""
    rng = random.Random(seed)
    specs, seen = [], []
    for i in range(n):
        if seen and rng.random() < repeat:
            # any earlier spec: a recent one may still be in flight (coalesced), an old
            # one is read back from the cache DB
            specs.append(rng.choice(seen))
            continue
        api = rng.choice(("openai", "anthropic"))
        spec = (api, rng.choice(MODELS[api]), rng.random() < 0.5, rng.randrange(keys),
                "w%dz" % i)
        seen.append(spec)
        specs.append(spec)
    return specs


def build(spec):
    """(path, body, headers) of one spec."""
    api, model, stream, key, word = spec
    messages = [{"role": "user", "content": "soak %s answer briefly" % word}]
    if api == "openai":
        body = {"model": model, "messages": [{"role": "system", "content": "Be brief."}]
                + messages}
        headers = {"Authorization": "Bearer sk-soak-openai-%d" % key}
        path = OPENAI_PATH
    else:
        body = {"model": model, "max_tokens": 64, "system": "Be brief.", "messages": messages}
        headers = {"Authorization": None, "x-api-key": "sk-ant-soak-%d" % key,
                   "anthropic-version": "2023-06-01"}
        path = ANTHROPIC_PATH
    if stream:
        body["stream"] = True
    return path, json.dumps(body).encode(), headers


def problem(spec, status, data):
    """Why an answer is wrong, or None."""
    api, _, stream, _, word = spec
    if not 200 <= status < 300:
        return "status %d: %s" % (status, data[:120])
    if word.encode() not in data:  # the fake echoes the prompt: a crossed answer shows
        return "answer does not echo the prompt"
    if stream:
        return None if common.stream_ended(api, data) else "stream did not end properly"
    try:
        json.loads(data)
    except ValueError:
        return "answer is not JSON"
    return None


class Load:
    """The client side: threads working through the plan, counting and checking."""

    def __init__(self, url, specs, clients):
        self.url, self.specs, self.clients = url, specs, clients
        self.next = itertools.count()
        self.done = [0] * clients
        self.latencies = [[] for _ in range(clients)]
        self.errors = []
        self.headers = {}
        self.lock = threading.Lock()

    def worker(self, index):
        client = common.Client(self.url)
        while True:
            i = next(self.next)  # itertools.count is atomic under the GIL
            if i >= len(self.specs):
                break
            spec = self.specs[i]
            path, body, headers = build(spec)
            started = time.perf_counter()
            try:
                status, data = client.request("POST", path, body, headers)
                why = problem(spec, status, data)
                cache = client.header("X-TokenPak-Cache")
            except Exception as exc:  # a reset or timeout is an error too; start afresh
                why, cache = "%s: %s" % (exc.__class__.__name__, exc), None
                client.close()
            self.latencies[index].append(time.perf_counter() - started)
            with self.lock:
                if why:
                    self.errors.append("request %d %s: %s" % (i, spec[:3], why))
                self.headers[cache] = self.headers.get(cache, 0) + 1
            self.done[index] += 1
        client.close()

    def run(self, on_sample):
        threads = [threading.Thread(target=self.worker, args=(k,), daemon=True)
                   for k in range(self.clients)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            on_sample(sum(self.done))
            time.sleep(SAMPLE)
        for thread in threads:
            thread.join()


def process_state(pid):
    threads, fds = common.threads_and_fds(pid)
    return {"rss": common.rss_mb(pid), "threads": threads, "fds": fds}


def fd_kinds(pid):
    """Open fds of a process by kind: socket, the DB's files, other."""
    kinds = {}
    folder = "/proc/%d/fd" % pid
    for name in os.listdir(folder):
        try:
            target = os.readlink(os.path.join(folder, name))
        except OSError:
            continue
        kind = ("socket" if target.startswith("socket:") else "db" if "tokenpak.db" in target
                else "pipe" if target.startswith("pipe:") else "other")
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join("%s %d" % item for item in sorted(kinds.items()))


def read_db(path):
    """Rows of the `requests` table: total, by cache result, and the troubled ones."""
    conn = sqlite3.connect(path)
    try:
        total = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        by_cache = dict(conn.execute("SELECT cache, count(*) FROM requests GROUP BY cache"))
        bad = conn.execute("SELECT count(*) FROM requests WHERE status NOT BETWEEN 200 AND 299"
                           " OR error IS NOT NULL OR complete = 0").fetchone()[0]
        unpriced = conn.execute("SELECT count(*) FROM requests WHERE input_tokens IS NULL"
                                " OR output_tokens IS NULL").fetchone()[0]
        entries = conn.execute("SELECT count(*) FROM cache_entries").fetchone()[0]
    finally:
        conn.close()
    return {"total": total, "by_cache": by_cache, "bad": bad, "no_usage": unpriced,
            "entries": entries}


def restarts(fake_url, state, n=3):
    """Startup times and idle RSS of tokenpak started on the soak's populated DB."""
    times, rss = [], []
    for _ in range(n):
        process, _ = common.start_tokenpak(fake_url, state, {"TOKENPAK_CACHE": "1"})
        times.append(process.startup_s)
        rss.append(common.rss_mb(process.pid))
        common.stop_tokenpak(process)
    return times, rss


def soak(requests, clients, repeat, keys):
    """Run the soak; returns a dict of everything measured."""
    specs = plan(requests, repeat, keys)
    fake, fake_url = common.start_fake()
    state = tempfile.mkdtemp(prefix="tokenpak-soak-")
    out = {"requests": requests, "clients": clients, "distinct": len(set(specs))}
    try:
        tokenpak, url = common.start_tokenpak(fake_url, state, {"TOKENPAK_CACHE": "1"})
        pid = tokenpak.pid
        out["startup_s"] = tokenpak.startup_s
        out["idle_rss"] = common.rss_mb(pid)       # right after /health answered
        # serve() loads the BPE tables in a thread after /health answers; the baseline for
        # growth and leaks is taken once that is done
        time.sleep(SETTLE + 0.5)
        out["start"] = process_state(pid)
        out["start_fds"] = fd_kinds(pid)
        load = Load(url, specs, clients)
        samples = []
        cpu = (time.process_time(), common.cpu_seconds(fake.pid), common.cpu_seconds(pid))
        started = time.monotonic()
        load.run(lambda done: samples.append(dict(process_state(pid), done=done)))
        wall = time.monotonic() - started
        out["cpu"] = {"client": (time.process_time() - cpu[0]) / wall,
                      "fake": (common.cpu_seconds(fake.pid) - cpu[1]) / wall,
                      "tokenpak": (common.cpu_seconds(pid) - cpu[2]) / wall}
        out["wall"] = wall
        out["samples"] = samples
        out["warm"] = next((s for s in samples if s["done"] >= requests // 10), samples[-1])
        out["peak_rss"] = common.peak_rss_mb(pid)
        out["loaded"] = process_state(pid)  # the clients' connections just closed
        time.sleep(SETTLE)
        out["end"] = process_state(pid)
        out["end_fds"] = fd_kinds(pid)
        out["errors"], out["headers"] = load.errors, load.headers
        out["latencies"] = [x for part in load.latencies for x in part]
        # SIGTERM lets tokenpak flush its accounting queue: only then are the rows final
        out["exit"] = common.stop_tokenpak(tokenpak)
        out["db"] = read_db(os.path.join(state, "tokenpak.db"))
        out["restarts"] = restarts(fake_url, state)
    finally:
        if "exit" not in out and "tokenpak" in locals():
            common.stop_tokenpak(tokenpak)
        common.stop(fake)
    return out


def timeline(out):
    """RSS at 10%, 25%, 50%, 75% and 100% of the requests."""
    points = []
    for share in (10, 25, 50, 75, 100):
        goal = out["requests"] * share // 100
        sample = next((s for s in out["samples"] if s["done"] >= goal), out["samples"][-1])
        points.append("%d%%: %.1f" % (share, sample["rss"]))
    return " · ".join(points) + " MB"


def rows_of(out):
    """The report table: (measure, value, note)."""
    start, warm, end = out["start"], out["warm"], out["end"]
    # growth is measured from the warm-up point: pools, reader connections and caches fill
    # during the first requests, a leak keeps growing after them
    growth = 100.0 * (end["rss"] - warm["rss"]) / warm["rss"]
    lat = out["latencies"]
    db = out["db"]
    cache_mix = ", ".join("%s %s" % (k or "none", "{:,}".format(v))
                          for k, v in sorted(db["by_cache"].items(), key=lambda kv: str(kv[0])))
    restart_times, restart_rss = out["restarts"]
    return [
        ("requests, clients", "{:,} at {} concurrent keep-alive clients".format(
            out["requests"], out["clients"]),
         "{:,} distinct; OpenAI + Anthropic, stream + non-stream, 4 keys each".format(
             out["distinct"])),
        ("errors (non-2xx, wrong answer, incomplete stream)", str(len(out["errors"])),
         "; ".join(out["errors"][:3])),
        ("throughput under load", "%.0f req/s" % (out["requests"] / out["wall"]),
         "%.1f s for the load" % out["wall"]),
        ("latency under load p50 / p99", "%s / %s" % (
            common.ms(common.percentile(lat, 50)), common.ms(common.percentile(lat, 99))),
         "whole answer, streams read to the end"),
        ("CPU during the load (cores)", "client %.2f, fake %.2f, tokenpak %.2f" % (
            out["cpu"]["client"], out["cpu"]["fake"], out["cpu"]["tokenpak"]),
         "of %d; the client (one process, GIL) would cap at 1.00" % os.cpu_count()),
        ("startup to healthy /health", "%.2f s" % out["startup_s"],
         "fresh state; %s with the soak's DB" % " / ".join("%.2f s" % t for t in restart_times)),
        ("idle RSS right after /health", "%.1f MB" % out["idle_rss"],
         "%s on the soak's DB" % " / ".join("%.1f MB" % r for r in restart_rss)),
        ("RSS before the load (tokenizer loaded)", "%.1f MB" % start["rss"],
         "%.1f s after /health" % (SETTLE + 0.5)),
        ("RSS after warm-up (10%)", "%.1f MB" % warm["rss"], ""),
        ("RSS at the end", "%.1f MB" % end["rss"], "peak %.1f MB" % out["peak_rss"]),
        ("RSS growth after warm-up", "%+.1f%%" % growth, timeline(out)),
        ("threads: before / during / after the load", "%d / %d / %d" % (
            start["threads"], max(s["threads"] for s in out["samples"]), end["threads"]),
         "after = %.0f s after the clients closed" % SETTLE),
        ("open fds: before / after warm-up / after the load", "%d / %d / %d" % (
            start["fds"], warm["fds"], end["fds"]),
         "before: %s; after: %s" % (out["start_fds"], out["end_fds"])),
        ("X-TokenPak-Cache headers seen", ", ".join(
            "%s %s" % (k, "{:,}".format(v)) for k, v in sorted(out["headers"].items(),
                                                              key=lambda kv: str(kv[0]))), ""),
        ("DB rows in `requests` vs requests sent", "{:,} / {:,}".format(
            db["total"], out["requests"]), "after SIGTERM (exit %s); by cache: %s" % (
                out["exit"], cache_mix)),
        ("repeats that made their own upstream call", "{:,}".format(
            db["by_cache"].get("miss", 0) - out["distinct"]),
         "DB misses minus distinct requests; each distinct one misses once"),
        ("DB rows with an error / without usage", "%d / %d" % (db["bad"], db["no_usage"]),
         "{:,} cache entries".format(db["entries"])),
    ]


def run(requests=20000, clients=16, repeat=0.3, keys=4):
    """Run the soak and return the table rows."""
    return rows_of(soak(requests, clients, repeat, keys))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeat", type=float, default=0.3,
                        help="share of requests repeating an earlier one exactly")
    parser.add_argument("--keys", type=int, default=4, help="API keys per provider")
    parser.add_argument("--quick", action="store_true", help="2,000 requests")
    args = parser.parse_args()
    if args.quick:
        args.requests = 2000
    rows = run(args.requests, args.clients, args.repeat, args.keys)
    print(common.markdown("Soak (%s)" % common.machine(), ("measure", "value", "note"), rows))


if __name__ == "__main__":
    main()
