"""What tokenpak adds to a request, measured against a direct call in the same run.

    python bench/overhead.py [--requests 2000] [--seconds 5] [--markdown]

- added latency p50/p99: small non-stream requests with unique bodies (no cache hit),
  direct and proxied interleaved one by one, so both see the same machine state;
- CPU per proxied request: tokenpak's utime+stime from /proc over the proxied requests;
- the same without keep-alive (a new connection per request);
- throughput with 8 keep-alive clients (separate processes), direct vs proxied;
- time to the first streamed byte, direct vs proxied.
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
    tokenpak, proxy_url = common.start_tokenpak(fake_url, state)
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
    args = parser.parse_args()
    rows = run(args.requests, args.seconds, args.clients)
    print(markdown("Proxy overhead (%s)" % common.machine(), rows))


if __name__ == "__main__":
    main()
