"""What tokenpak adds to a request, measured against a direct call in the same run.

    python bench/overhead.py [--requests 2000] [--seconds 5] [--markdown]
    python bench/overhead.py --baseline /path/to/other/checkout [--rounds 4]

- added latency p50/p99: small non-stream requests with unique bodies (no cache hit),
  direct and proxied interleaved one by one, so both see the same machine state;
- CPU per proxied request: tokenpak's utime+stime from /proc over the proxied requests;
- the same without keep-alive (a new connection per request);
- throughput with 8 keep-alive clients (separate processes), direct vs proxied;
- time to the first streamed byte, direct vs proxied.

With `--baseline PATH`, a second tokenpak runs from another checkout (say `git worktree add
/tmp/before main`) beside this one, and each round interleaves direct, baseline and this
tree request by request, then loads each in turn: before/after on the same machine state,
which on a shared machine moves more between runs than a change does. CPU per request is
read from each process's /proc counters, sequentially and under the 8-client load (the
steadier figure of the two).
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PATH = "/v1/chat/completions"
# One process, whatever proxy.workers defaults to: its CPU is read from its own /proc entry
# (bench/workers.py measures the worker model).
ONE_PROCESS = ("--workers", "1")


def interleaved(direct_url, proxy_url, pid, n, keep_alive=True):
    direct, proxied = common.Client(direct_url, keep_alive), common.Client(proxy_url, keep_alive)
    for i in range(50):  # warm both paths: pools, imports, caches
        direct.request("POST", PATH, common.chat_body(-i))
        proxied.request("POST", PATH, common.chat_body(-i - 1000))
    d_times, p_times, cpu = [], [], 0.0
    for i in range(n):
        body = common.chat_body(i + (0 if keep_alive else 10 ** 6))
        started = time.perf_counter()
        direct.request("POST", PATH, body)
        d_times.append(time.perf_counter() - started)
        before = common.cpu_seconds(pid)
        started = time.perf_counter()
        status, _ = proxied.request("POST", PATH, body + b" ")
        p_times.append(time.perf_counter() - started)
        cpu += common.cpu_seconds(pid) - before
        assert status == 200, status
    return d_times, p_times, cpu / n


def _worker(url, seconds, start_at, queue):
    client = common.Client(url)
    while time.time() < start_at:
        time.sleep(0.001)
    done, i = 0, os.getpid() * 10 ** 6
    deadline = start_at + seconds
    while time.time() < deadline:
        client.request("POST", PATH, common.chat_body(i + done))
        done += 1
    queue.put(done)


def throughput(url, clients, seconds):
    queue = multiprocessing.Queue()
    start_at = time.time() + 0.5
    workers = [multiprocessing.Process(target=_worker, args=(url, seconds, start_at, queue))
               for _ in range(clients)]
    for worker in workers:
        worker.start()
    total = sum(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def first_byte(direct_url, proxy_url, n):
    direct, proxied = common.Client(direct_url), common.Client(proxy_url)
    d, p = [], []
    for i in range(n):
        d.append(direct.first_byte(PATH, common.chat_body(i, stream=True)))
        p.append(proxied.first_byte(PATH, common.chat_body(i + 10 ** 7, stream=True)))
    return d, p


def run(requests=2000, seconds=5.0, clients=8):
    fake, fake_url = common.start_fake()
    state = tempfile.mkdtemp(prefix="tokenpak-bench-")
    tokenpak, proxy_url = common.start_tokenpak(fake_url, state, args=ONE_PROCESS)
    try:
        d, p, cpu = interleaved(fake_url, proxy_url, tokenpak.pid, requests)
        d_close, p_close, cpu_close = interleaved(fake_url, proxy_url, tokenpak.pid,
                                                  requests // 4, keep_alive=False)
        direct_rps = throughput(fake_url, clients, seconds)
        proxy_rps = throughput(proxy_url, clients, seconds)
        ttfb_d, ttfb_p = first_byte(fake_url, proxy_url, 200)
        ms = lambda seconds: seconds * 1000  # noqa: E731
        rows = [
            ("latency p50, keep-alive", "%.2f ms" % ms(common.percentile(d, 50)),
             "%.2f ms" % ms(common.percentile(p, 50)),
             "+%.2f ms" % ms(common.percentile(p, 50) - common.percentile(d, 50))),
            ("latency p99, keep-alive", "%.2f ms" % ms(common.percentile(d, 99)),
             "%.2f ms" % ms(common.percentile(p, 99)),
             "+%.2f ms" % ms(common.percentile(p, 99) - common.percentile(d, 99))),
            ("latency p50, new connection each", "%.2f ms" % ms(common.percentile(d_close, 50)),
             "%.2f ms" % ms(common.percentile(p_close, 50)),
             "+%.2f ms" % ms(common.percentile(p_close, 50) - common.percentile(d_close, 50))),
            ("tokenpak CPU per request", "—", "%.0f µs" % (cpu * 1e6),
             "%.0f µs without keep-alive" % (cpu_close * 1e6)),
            ("throughput, %d keep-alive clients" % clients, "%.0f req/s" % direct_rps,
             "%.0f req/s" % proxy_rps, "%.0f%% of direct" % (100.0 * proxy_rps / direct_rps)),
            ("first streamed byte p50", "%.2f ms" % ms(common.percentile(ttfb_d, 50)),
             "%.2f ms" % ms(common.percentile(ttfb_p, 50)),
             "+%.2f ms" % ms(common.percentile(ttfb_p, 50) - common.percentile(ttfb_d, 50))),
            ("startup to healthy /health", "—", "%.2f s" % tokenpak.startup_s, ""),
        ]
        return rows
    finally:
        tokenpak.terminate()
        tokenpak.wait(10)
        fake.terminate()
        fake.wait(10)


def start_checkout(fake_url, path):
    """tokenpak from another checkout: its directory first on the path, and run from an
    empty directory so that `python -m tokenpak` does not find this tree's package."""
    state = tempfile.mkdtemp(prefix="tokenpak-bench-")
    cwd = os.getcwd()
    os.chdir(state)
    try:
        return common.start_tokenpak(fake_url, state, {"PYTHONPATH": os.path.abspath(path)},
                                     ONE_PROCESS)
    finally:
        os.chdir(cwd)


def sequential(direct, proxies, n, base):
    """One round of direct and each tokenpak, request by request: the direct p50 and, per
    tokenpak, (p50, CPU seconds per request)."""
    d_times, times, cpu = [], [[] for _ in proxies], [0.0] * len(proxies)
    for i in range(n):
        body = common.chat_body(base + i)
        started = time.perf_counter()
        direct.request("POST", PATH, body)
        d_times.append(time.perf_counter() - started)
        for k, (client, pid) in enumerate(proxies):
            before = common.cpu_seconds(pid)
            started = time.perf_counter()
            status, _ = client.request("POST", PATH, body + b" " * (k + 1))
            times[k].append(time.perf_counter() - started)
            cpu[k] += common.cpu_seconds(pid) - before
            assert status == 200, status
    return common.percentile(d_times, 50), [(common.percentile(t, 50), c / n)
                                            for t, c in zip(times, cpu)]


def loaded_cpu(url, pid, clients, seconds):
    """(req/s, CPU seconds per request) of one tokenpak under `clients` keep-alive clients."""
    before = common.cpu_seconds(pid)
    rps = throughput(url, clients, seconds)
    used = common.cpu_seconds(pid) - before
    # throughput() counts requests from its start signal; the CPU also covers the clients'
    # start-up (~0.5 s of an idle server), which is small against the load.
    return rps, used / max(1, rps * seconds)


def compare(baseline, requests=1000, seconds=4.0, clients=8, rounds=4):
    """Rows of a before/after table: baseline checkout vs this tree, medians over rounds."""
    fake, fake_url = common.start_fake()
    procs = [start_checkout(fake_url, baseline),
             common.start_tokenpak(fake_url, tempfile.mkdtemp(prefix="tokenpak-bench-"),
                                   args=ONE_PROCESS)]
    try:
        direct = common.Client(fake_url)
        proxies = [(common.Client(url), process.pid) for process, url in procs]
        for i in range(100):  # warm both: pools, imports, caches
            direct.request("POST", PATH, common.chat_body(-i))
            for client, _ in proxies:
                client.request("POST", PATH, common.chat_body(-i - 1000))
        added, cpu, load_cpu, rps, direct_rps = [[], []], [[], []], [[], []], [[], []], []
        for r in range(rounds):
            d50, results = sequential(direct, proxies, requests, r * 10 ** 6)
            for k, (p50, c) in enumerate(results):
                added[k].append(p50 - d50)
                cpu[k].append(c)
            direct_rps.append(throughput(fake_url, clients, seconds))
            for k, (process, url) in enumerate(procs):
                got, per_request = loaded_cpu(url, process.pid, clients, seconds)
                rps[k].append(got)
                load_cpu[k].append(per_request)
        med = lambda values: common.percentile(values, 50)  # noqa: E731
        return [
            ("added latency p50, sequential", "+%.2f ms" % (med(added[0]) * 1000),
             "+%.2f ms" % (med(added[1]) * 1000)),
            ("CPU per request, sequential", "%.0f µs" % (med(cpu[0]) * 1e6),
             "%.0f µs" % (med(cpu[1]) * 1e6)),
            ("CPU per request, %d clients" % clients, "%.0f µs" % (med(load_cpu[0]) * 1e6),
             "%.0f µs" % (med(load_cpu[1]) * 1e6)),
            ("throughput, %d clients (direct %.0f req/s)" % (clients, med(direct_rps)),
             "%.0f req/s" % med(rps[0]), "%.0f req/s" % med(rps[1])),
        ], {"added": added, "cpu": cpu, "load_cpu": load_cpu, "rps": rps,
            "direct_rps": direct_rps}
    finally:
        for process, _ in procs:
            process.terminate()
            process.wait(10)
        fake.terminate()
        fake.wait(10)


def markdown(title, rows):
    lines = ["#### %s" % title, "", "| measure | direct | through tokenpak | difference |",
             "|---|---|---|---|"]
    lines += ["| %s |" % " | ".join(row) for row in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--baseline", metavar="PATH",
                        help="another checkout to measure against, interleaved (before/after)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds with --baseline")
    args = parser.parse_args()
    if args.baseline:
        rows, raw = compare(args.baseline, args.requests, args.seconds, args.clients,
                            args.rounds)
        print("#### Before/after (%s), medians of %d rounds\n" % (common.machine(), args.rounds))
        print("| measure | baseline (%s) | this tree |\n|---|---|---|" % args.baseline)
        for row in rows:
            print("| %s |" % " | ".join(row))
        for name, values in sorted(raw.items()):
            print("rounds, %s: %s" % (name, values))
        return
    rows = run(args.requests, args.seconds, args.clients)
    print(markdown("Proxy overhead (%s)" % common.machine(), rows))


if __name__ == "__main__":
    main()
