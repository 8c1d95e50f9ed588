"""Throughput with 1 vs N worker processes (`proxy.workers`), against direct, interleaved.

    python bench/workers.py [--workers 2] [--rounds 3] [--seconds 5] [--clients 8]

Each round measures direct, then tokenpak with 1 worker, then with N, back to back, so the
three see the same machine state; small non-stream requests with unique bodies (no cache
hit), keep-alive clients in separate processes (bench/overhead.py's load generator).
The load generator and the fake provider run on the same cores as tokenpak: on a 2-core
machine they take a share of the cores the workers would use, so this understates scaling.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from overhead import throughput  # noqa: E402


def measure(fake_url, workers, seconds, clients):
    with tempfile.TemporaryDirectory() as state:
        process, url = common.start_tokenpak(
            fake_url, state, extra_env={"TOKENPAK_FOOTER": "false"},
            args=("--workers", str(workers)))
        try:
            throughput(url, clients, 1.0)  # warm: pools, imports
            return throughput(url, clients, seconds)
        finally:
            common.stop_tokenpak(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    fake, fake_url = common.start_fake()
    try:
        for r in range(args.rounds):
            direct = throughput(fake_url, args.clients, args.seconds)
            one = measure(fake_url, 1, args.seconds, args.clients)
            many = measure(fake_url, args.workers, args.seconds, args.clients)
            print("round %d: direct %.0f req/s | 1 worker %.0f req/s | %d workers %.0f req/s"
                  " (%.2fx)" % (r + 1, direct, one, args.workers, many, many / one), flush=True)
    finally:
        common.stop(fake)


if __name__ == "__main__":
    main()
