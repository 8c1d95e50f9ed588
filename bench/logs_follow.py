"""How soon `tokenpak logs --follow` shows a request after its answer has been read.

    python bench/logs_follow.py [--requests 30]

The fake provider, tokenpak (`serve`, a temp HOME and DB) and `tokenpak logs --follow -n 0`
each run in their own process. The client sends one small request at a time, at random
gaps (0.1-1.2 s, so requests land anywhere in the accounting writer's batching window),
reads the whole answer, and times until the follower prints the request's line. What the
delay is made of: the row is queued as the answer goes out, the writer thread writes it at
most `flush_interval` (0.5 s) later, and the follower polls every 0.2 s.
Numbers, not pass/fail.
"""

import argparse
import os
import random
import select
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run(requests=30):
    fake, fake_url = common.start_fake()
    state = tempfile.mkdtemp(prefix="tokenpak-bench-logs-")
    tokenpak, url = common.start_tokenpak(fake_url, state)
    env = dict(os.environ, PYTHONPATH=common.REPO, HOME=state,
               TOKENPAK_CONFIG=os.path.join(state, "config.json"),
               TOKENPAK_DB=os.path.join(state, "tokenpak.db"))
    follower = subprocess.Popen([sys.executable, "-m", "tokenpak", "logs", "--follow", "-n", "0"],
                                env=env, stdout=subprocess.PIPE)
    delays = []
    try:
        follower.stdout.readline()  # the header: it is following
        client = common.Client(url)
        for i in range(requests):
            time.sleep(random.uniform(0.1, 1.2))
            status, _ = client.request("POST", "/v1/chat/completions", common.chat_body(i),
                                       {"Authorization": "Bearer sk-bench-logs"})
            done = time.monotonic()
            if not select.select([follower.stdout], [], [], 10)[0]:
                raise SystemExit("no line within 10 s of request %d" % i)
            follower.stdout.readline()
            delays.append(time.monotonic() - done)
    finally:
        follower.terminate()
        follower.wait(10)
        common.stop_tokenpak(tokenpak)
        common.stop(fake)
    return {"requests": len(delays), "p50": common.percentile(delays, 50),
            "p90": common.percentile(delays, 90), "max": max(delays)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    figures = run(parser.parse_args().requests)
    print("logs --follow, request end to its line, %(requests)d requests: p50 %(p50).2f s, "
          "p90 %(p90).2f s, max %(max).2f s" % figures)


if __name__ == "__main__":
    main()
