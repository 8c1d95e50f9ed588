"""Throughput with 1 vs N worker processes (`proxy.workers`), against direct, interleaved.

    python bench/workers.py [--workers 2] [--rounds 3] [--seconds 5] [--connections 16]
                            [--load wrk|python]

Each round measures direct, then tokenpak with 1 worker, then with N, back to back, so the
three see the same machine state; small non-stream requests with unique bodies (no cache
hit, nothing coalesced) on keep-alive connections.

The load generator and the fake provider share the cores with tokenpak, so what they cost
is taken from the workers: both are made as cheap as they come. The fake provider is
bench/fakeserver.py (one epoll thread, a canned answer), the load is `wrk` (C, from Debian;
a Lua script makes every body unique), one wrk thread. `--load python` uses
bench/overhead.py's client processes instead (when wrk is missing; they cost far more CPU).
Each line also says how many cores each party used during tokenpak's runs, which is what
decides the scaling on a small machine: N workers can only use what the others leave; and
how much more work N pure-Python CPU-bound processes do than one on this machine at that
moment, the ceiling for any N-process server (a VM's vCPUs may share a physical core, or
be taken by the host: /proc/stat's steal column).
"""

import argparse
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from overhead import throughput  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# One Lua state per wrk thread; the thread's number, a counter and a random number make
# every body unique across threads and runs.
WRK_SCRIPT = r"""
local counter, seed = 0, 0
function setup(thread) seed = seed + 1; thread:set("id", seed) end
function init(args) math.randomseed(os.time() * 1000 + (id or 0)) end
function request()
  counter = counter + 1
  local body = string.format(
    '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "wrk %d %d %d"}]}',
    id or 0, counter, math.random(1, 2000000000))
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench"}, body)
end
"""


def burn(seconds, queue):
    """Pure-Python work for `seconds`; puts how many loops it did."""
    deadline, loops = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        for _ in range(10000):
            pass
        loops += 1
    queue.put(loops)


def machine_scaling(processes, seconds=3.0):
    """How much more pure-Python work `processes` processes do than one, on this machine
    now: the ceiling for N workers (a VM's cores may share a physical core or be stolen)."""
    def run(n):
        queue = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=burn, args=(seconds, queue)) for _ in range(n)]
        for proc in procs:
            proc.start()
        total = sum(queue.get() for _ in procs)
        for proc in procs:
            proc.join()
        return total
    return run(processes) / run(1)


def start_lean_fake():
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "fakeserver.py")],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def wrk(url, seconds, connections, script):
    """(requests per second, errors, wrk's CPU seconds) of one wrk run against `url`."""
    process = subprocess.Popen(
        ["wrk", "-t1", "-c%d" % connections, "-d%ds" % max(1, round(seconds)), "-s", script,
         url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status) if hasattr(
        os, "waitstatus_to_exitcode") else status
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not rate:
        raise SystemExit("wrk failed:\n" + out)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return float(rate.group(1)), errors, usage.ru_utime + usage.ru_stime


def measure(fake, fake_url, workers, args, script):
    """Throughput through a fresh tokenpak with `workers` workers, and the cores used."""
    with tempfile.TemporaryDirectory() as state:
        process, url = common.start_tokenpak(
            fake_url, state, extra_env={"TOKENPAK_FOOTER": "false"},
            args=("--workers", str(workers)))
        try:
            load(url, 1.0, args, script)  # warm: pools, imports, every worker's connections
            before = (time.monotonic(), common.cpu_seconds(process.pid, children=True),
                      common.cpu_seconds(fake.pid))
            rate, errors, client_cpu = load(url, args.seconds, args, script)
            wall = time.monotonic() - before[0]
            cores = ((common.cpu_seconds(process.pid, children=True) - before[1]) / wall,
                     (common.cpu_seconds(fake.pid) - before[2]) / wall,
                     client_cpu / wall if client_cpu is not None else float("nan"))
            return rate, errors, cores
        finally:
            common.stop_tokenpak(process)


def load(url, seconds, args, script):
    if args.load == "wrk":
        return wrk(url, seconds, args.connections, script)
    return throughput(url, args.connections, seconds), 0, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--load", choices=("wrk", "python"),
                        default="wrk" if shutil.which("wrk") else "python")
    args = parser.parse_args()
    fake, fake_url = start_lean_fake()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(WRK_SCRIPT)
        script = handle.name
    print("load: %s, %d connections, %.0f s per run, %d cores here"
          % (args.load, args.connections, args.seconds, os.cpu_count()), flush=True)
    try:
        for r in range(args.rounds):
            direct = load(fake_url, args.seconds, args, script)[0]
            one = measure(fake, fake_url, 1, args, script)
            many = measure(fake, fake_url, args.workers, args, script)
            ceiling = machine_scaling(args.workers)
            print("round %d: direct %.0f req/s | 1 worker %.0f req/s (%d errors) | %d workers "
                  "%.0f req/s (%d errors): %.2fx; %d CPU-bound processes here do %.2fx one's "
                  "work" % (r + 1, direct, one[0], one[1], args.workers, many[0], many[1],
                            many[0] / one[0], args.workers, ceiling), flush=True)
            for name, result in (("1 worker", one), ("%d workers" % args.workers, many)):
                print("  cores used with %s: tokenpak %.2f, fake provider %.2f, load %.2f"
                      % ((name,) + result[2]), flush=True)
    finally:
        os.unlink(script)
        common.stop(fake)


if __name__ == "__main__":
    main()
