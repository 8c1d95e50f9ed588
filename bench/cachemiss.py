"""What the cache costs a request it cannot answer: CPU per request with the cache off and on
(every request a miss), under wrk load and sequentially, interleaved.

    python bench/cachemiss.py [--rounds 3] [--seconds 5] [--connections 16]
                              [--baseline <another checkout>]

One tokenpak process (`--workers 1`) per run on the lean fake provider (bench/fakeserver.py);
wrk (bench/workers.py's Lua script) sends small non-stream requests with unique bodies, then
one client sends 1,000 of them one after another on one keep-alive connection. Each line
gives the requests per second, the tokenpak process's CPU per request (/proc/<pid>/stat)
under load and sequentially, and its context switches per request under load (summed over
its threads, /proc/<pid>/task/*/status): the cost of a miss under load is mostly threads
handing the GIL to each other, which shows there first. With --baseline, the other checkout's
tokenpak runs with the cache on in the same rounds (before/after).
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import workers  # noqa: E402


def switches(pid):
    """Voluntary + involuntary context switches of every live thread of `pid`."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as handle:
                total += sum(int(line.split()[1]) for line in handle if "ctxt_switches" in line)
        except OSError:
            pass  # the thread ended meanwhile
    return total


def sequential(url, count=1000):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    for i in range(count):
        body = json.dumps({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "sequential %d %f" % (i, time.time())}]})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"})
        conn.getresponse().read()
    conn.close()
    return count


def run(fake_url, repo, cache, args, script):
    """(req/s under wrk, CPU µs per request under wrk, switches per request, sequential CPU µs)."""
    common.REPO = repo
    with tempfile.TemporaryDirectory() as state:
        process, url = common.start_tokenpak(
            fake_url, state, extra_env={"TOKENPAK_FOOTER": "false", "TOKENPAK_CACHE": cache})
        try:
            workers.wrk(url, 1.0, args.connections, script)  # warm
            cpu, ctx, started = common.cpu_seconds(process.pid), switches(process.pid), time.monotonic()
            rate = workers.wrk(url, args.seconds, args.connections, script)[0]
            done = rate * (time.monotonic() - started)
            # Handler threads that ended took their switches with them: a lower bound.
            load = (rate, (common.cpu_seconds(process.pid) - cpu) / done * 1e6,
                    (switches(process.pid) - ctx) / done)
            cpu = common.cpu_seconds(process.pid)
            count = sequential(url)
            return load + ((common.cpu_seconds(process.pid) - cpu) / count * 1e6,)
        finally:
            common.stop_tokenpak(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--baseline", help="another checkout of tokenpak, run with the cache on")
    args = parser.parse_args()
    variants = [("cache off", common.REPO, "false"), ("cache on", common.REPO, "true")]
    if args.baseline:
        variants.append(("baseline on", os.path.abspath(args.baseline), "true"))
    fake, fake_url = workers.start_lean_fake()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(workers.WRK_SCRIPT)
        script = handle.name
    results = {label: [] for label, _, _ in variants}
    line = "%-12s %6.0f req/s  CPU %5.0f µs/req  %5.1f switches/req | sequential CPU %5.0f µs/req"
    try:
        for _ in range(args.rounds):
            for label, repo, cache in variants:
                figures = run(fake_url, repo, cache, args, script)
                results[label].append(figures)
                print(line % ((label,) + figures), flush=True)
        print("medians:")
        for label, rows in results.items():
            print(line % ((label,) + tuple(statistics.median(col) for col in zip(*rows))))
    finally:
        common.stop(fake)
        os.unlink(script)


if __name__ == "__main__":
    main()
