"""/dashboard with a month of 100,000 recorded requests: how long until the figures show?

    python bench/dashboard.py [--rows 100000] [--runs 5]

Issue 14's target: the dashboard renders a month of 100,000 requests in <= 1 s in headless
Chromium. This fills a fresh accounting DB with --rows requests spread over the last 30 days
(six tags and untagged, four models, four keys, 15% cache hits, some compressed), starts
`tokenpak serve` on it, and loads /dashboard in Debian's headless Chromium for each range
(24 hours, 7 days, 30 days), --runs times each, in a new navigation every time.

The time reported is the page's own: performance.now() when the last table is filled in
(the page writes it to <body data-rendered-ms>), counted from the navigation's start, so it
holds the page load, the /stats request (its SQL over the rows is most of it: shown apart,
from the Resource Timing entry) and the rendering; and the CPU tokenpak spent per load (from
/proc), which a busy machine does not inflate as it does wall time. Chromium is driven over the DevTools
protocol on a pipe (--remote-debugging-pipe, stdlib only): its --dump-dom mode runs on
virtual time, which does not count the time spent waiting for /stats.
Numbers, not pass/fail; the figures go in the README.
"""

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, cpu_seconds, start_fake, start_tokenpak, stop  # noqa: E402

sys.path.insert(0, REPO)
from tokenpak import accounting  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TAGS = ("project-a", "project-b", "agent-claude", "agent-codex", "ci", "nightly", None)
MODELS = (("anthropic", "claude-sonnet-4-6", 3.0, 15.0), ("anthropic", "claude-haiku-4-5", 1.0, 5.0),
          ("openai", "gpt-4o", 2.5, 10.0), ("openai", "gpt-4o-mini", 0.15, 0.6))
KEYS = ("a1b2c3d4e5f6", "0f9e8d7c6b5a", "1234abcd5678", None)


def fill(db_path, rows, seed=14):
    """`rows` requests over the last 30 days, written as the accounting writer writes them."""
    rnd = random.Random(seed)
    now = time.time()
    conn = sqlite3.connect(db_path)
    conn.executescript(accounting._SCHEMA)
    batch = []
    for _ in range(rows):
        provider, model, price_in, price_out = rnd.choice(MODELS)
        hit = rnd.random() < 0.15
        before = rnd.randint(200, 60000)
        after = int(before * rnd.uniform(0.5, 0.9)) if before > 4500 else before
        out = rnd.randint(20, 2000)
        cost = 0.0 if hit else (after * price_in + out * price_out) / 1e6
        saved = (before * price_in + out * price_out) / 1e6 if hit \
            else (before - after) * price_in / 1e6
        row = {"ts": now - rnd.uniform(0, 30 * 86400), "provider": provider, "model": model,
               "path": "/v1/messages" if provider == "anthropic" else "/v1/chat/completions",
               "status": 200, "streamed": rnd.random() < 0.6, "cache": "hit" if hit else "miss",
               "input_tokens": after, "output_tokens": out, "cache_read_tokens": 0,
               "cache_write_tokens": 0, "tokens_before": before, "tokens_after": after,
               "cost_usd": cost, "saved_usd": saved, "latency_ms": rnd.uniform(200, 9000),
               "ttfb_ms": rnd.uniform(100, 900), "key_id": rnd.choice(KEYS), "error": None,
               "complete": 1, "method": "POST",
               "compression_saved_usd": 0.0 if hit else saved, "tag": rnd.choice(TAGS)}
        batch.append(tuple(row[c] for c in accounting.COLUMNS))
        if len(batch) == 5000:
            conn.executemany(accounting._INSERT, batch)
            batch = []
    conn.executemany(accounting._INSERT, batch)
    conn.commit()
    conn.close()


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL,
    commands on the child's fd 3, answers and events on its fd 4."""

    def __init__(self, browser, profile):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds():  # in the child: the pipe ends as fds 3 and 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)
        self.process = subprocess.Popen(
            [browser, "--headless=new", "--disable-gpu", "--no-sandbox",
             "--remote-debugging-pipe", "--user-data-dir=%s" % profile, "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-extensions", "--window-size=1280,900", "about:blank"],
            # 3 and 4 kept too: close_fds runs after preexec_fn, by number
            preexec_fn=fds, pass_fds=(3, 4, to_child, from_child), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=profile))
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 16)
                if not chunk:
                    raise SystemExit("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise SystemExit("%s: %s" % (method, answer["error"]))
                return answer["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression,
                           returnByValue=True)
        return result["result"].get("value")

    def close(self):
        self.process.terminate()
        self.process.wait(30)


def load(devtools, url):
    """Open `url` afresh; (ms to the figures shown, ms of the /stats request) or None."""
    devtools.call("Page.navigate", session=devtools.session, url="about:blank")
    devtools.call("Page.navigate", session=devtools.session, url=url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = devtools.evaluate("document.body && document.body.getAttribute('data-state')")
        if state == "ready":
            return devtools.evaluate(
                "[+document.body.getAttribute('data-rendered-ms'), performance"
                ".getEntriesByType('resource').filter(e => e.name.includes('/stats?'))"
                ".map(e => e.responseEnd - e.startTime)[0]]")
        if state in ("error", "auth"):
            raise SystemExit("the dashboard says: %s" % devtools.evaluate(
                "document.getElementById('status').textContent"))
        time.sleep(0.02)
    raise SystemExit("the dashboard did not render within 60 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    browser = next(filter(None, (shutil.which(b) for b in BROWSERS)), None)
    if browser is None:
        raise SystemExit("no headless Chromium: apt-get install chromium")
    state = tempfile.mkdtemp(prefix="tokenpak-bench-dashboard-")
    fake = tokenpak = devtools = None
    try:
        began = time.monotonic()
        fill(os.path.join(state, "tokenpak.db"), args.rows)
        print("%d rows over 30 days written in %.1f s" % (args.rows, time.monotonic() - began))
        fake, fake_url = start_fake()
        tokenpak, url = start_tokenpak(fake_url, state)
        devtools = DevTools(browser, os.path.join(state, "profile"))
        print("range  shown after (ms: median, min-max of %d)  /stats (ms, median)  "
              "tokenpak CPU per load (ms)" % args.runs)
        for window in ("24h", "7d", "30d"):
            load(devtools, url + "/dashboard#range=" + window)  # warm: sqlite's page cache
            runs, cpu = [], []
            for _ in range(args.runs):
                before = cpu_seconds(tokenpak.pid)
                runs.append(load(devtools, url + "/dashboard#range=" + window))
                cpu.append((cpu_seconds(tokenpak.pid) - before) * 1000)
            shown = [r[0] for r in runs]
            fetch = [r[1] for r in runs if r[1] is not None]
            print("%-6s %6.0f (%5.0f-%5.0f)%28s%28.0f" % (
                window, statistics.median(shown), min(shown), max(shown),
                "%.0f" % statistics.median(fetch) if fetch else "-", statistics.median(cpu)))
    finally:
        if devtools is not None:
            devtools.close()
        for process in (tokenpak, fake):
            if process is not None:
                stop(process)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
