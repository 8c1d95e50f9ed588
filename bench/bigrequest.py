"""What tokenpak adds to a big agent request (a ~300 kB Claude Code turn), against direct.

    python bench/bigrequest.py [--requests 100] [--corpus tests/corpus/agents/019-...json]

The body is a real Claude Code request from tests/corpus/agents. Each request differs only in
`max_tokens`, so none is a cache hit while its long history is the same every time: what is
measured is a memoised turn (compression memoises per block). Direct and proxied requests are
interleaved one by one so both see the same machine state; tokenpak's CPU is read from /proc.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT = os.path.join(common.REPO, "tests", "corpus", "agents", "019-claude-code-19.json")
HEADERS = {"x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01",
           "Authorization": None}


def bodies(corpus, n):
    with open(corpus) as handle:
        sample = json.load(handle)
    body = sample["body"]
    path = sample["path"]
    for i in range(n):
        yield path, json.dumps(dict(body, max_tokens=1000 + i, stream=False)).encode()


def run(corpus, n, warm=10):
    fake, fake_url = common.start_fake()
    state = tempfile.mkdtemp(prefix="tokenpak-bench-")
    tokenpak, proxy_url = common.start_tokenpak(fake_url, state)
    try:
        direct, proxied = common.Client(fake_url), common.Client(proxy_url)
        d_times, p_times, cpu, size = [], [], 0.0, 0
        for i, (path, body) in enumerate(bodies(corpus, n + warm)):
            size = len(body)
            started = time.perf_counter()
            status, _ = direct.request("POST", path, body, HEADERS)
            elapsed_d = time.perf_counter() - started
            before = common.cpu_seconds(tokenpak.pid)
            started = time.perf_counter()
            status, _ = proxied.request("POST", path, body, HEADERS)
            elapsed_p = time.perf_counter() - started
            used = common.cpu_seconds(tokenpak.pid) - before
            assert status == 200, status
            if i >= warm:  # the first turns fill compression's per-block memo
                d_times.append(elapsed_d)
                p_times.append(elapsed_p)
                cpu += used
        p50 = lambda values: common.percentile(values, 50)  # noqa: E731
        return [
            ("latency p50, %d kB agent request" % (size // 1024), common.ms(p50(d_times)),
             common.ms(p50(p_times)), "+%.2f ms" % ((p50(p_times) - p50(d_times)) * 1000)),
            ("tokenpak CPU per request", "—", "%.0f µs" % (cpu / n * 1e6), ""),
        ]
    finally:
        common.stop_tokenpak(tokenpak)
        common.stop(fake)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--corpus", default=DEFAULT)
    args = parser.parse_args()
    rows = run(args.corpus, args.requests)
    print(common.markdown("Big agent request (%s)" % common.machine(),
                          ["measure", "direct", "through tokenpak", "difference"], rows))


if __name__ == "__main__":
    main()
