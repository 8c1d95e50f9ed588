"""Shared plumbing for the benchmarks: processes for the fake provider and tokenpak, a lean
keep-alive HTTP client, percentiles and a process's CPU counters.

Client, fake provider and tokenpak each run in their own process, as they would for real,
so the figures include the kernel's loopback and scheduling costs and tokenpak's CPU can be
read from its own /proc counters.
"""

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

FAKE_MAIN = """
import sys, time
sys.path.insert(0, %r)
from fakeprovider import FakeProvider
fake = FakeProvider()
fake.server.server_address
print(fake.url, flush=True)
fake.thread.run()
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_fake():
    """The fake provider in its own process; returns (process, url)."""
    process = subprocess.Popen([sys.executable, "-c", FAKE_MAIN % os.path.join(REPO, "tests")],
                               stdout=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()
    return process, url


def start_tokenpak(fake_url, state_dir, extra_env=None, args=()):
    """`python -m tokenpak serve` pointed at the fake provider; returns (process, url).

    One process unless `args` says --workers: the per-request figures (CPU from
    /proc/<pid>/stat, RSS) are one process's, and proxy.workers defaults to one per core."""
    port = free_port()
    if "--workers" not in args:
        args = ("--workers", "1") + tuple(args)
    env = dict(os.environ, PYTHONPATH=REPO, HOME=state_dir,
               TOKENPAK_CONFIG=os.path.join(state_dir, "config.json"),
               TOKENPAK_DB=os.path.join(state_dir, "tokenpak.db"),
               TOKENPAK_OPENAI_URL=fake_url, TOKENPAK_ANTHROPIC_URL=fake_url)
    env.update(extra_env or {})
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "tokenpak", "serve", "--port", str(port)]
                               + list(args), env=env, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None:
                raise SystemExit("tokenpak exited with %s" % process.returncode)
            time.sleep(0.005)
    process.startup_s = time.monotonic() - started
    return process, url


def cpu_seconds(pid, children=False):
    """utime + stime of a process, from /proc/<pid>/stat; with `children`, plus those of
    its live child processes (the workers of `serve --workers N`)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if children:
        try:
            with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
                kids = [int(k) for k in handle.read().split()]
        except OSError:
            kids = []
        for kid in kids:
            try:
                total += cpu_seconds(kid)
            except OSError:
                pass  # exited meanwhile
    return total


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def threads_and_fds(pid):
    with open("/proc/%d/status" % pid) as handle:
        threads = [int(l.split()[1]) for l in handle if l.startswith("Threads:")][0]
    return threads, len(os.listdir("/proc/%d/fd" % pid))


def peak_rss_mb(pid):
    """VmHWM: the highest RSS the process has had."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop_tokenpak(process, timeout=30):
    """SIGTERM, as `tokenpak stop` and systemd do: tokenpak finishes in-flight requests and
    flushes accounting before it exits. Returns the exit code (None if it had to be killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return None


def stop(process):
    """Stop a helper process (the fake provider)."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Client:
    """A minimal keep-alive HTTP/1.1 client: the cheapest honest way to drive a server."""

    def __init__(self, url, keep_alive=True):
        host, port = url.split("//")[1].split(":")
        self.address = (host, int(port))
        self.keep_alive = keep_alive
        self.conn = None
        self.response = None

    def header(self, name):
        """A header of the last answer `request()` read, or None."""
        return self.response.getheader(name) if self.response is not None else None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method, path, body=b"", headers=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(*self.address, timeout=30)
        hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        hdrs.update(headers or {})
        hdrs = {name: value for name, value in hdrs.items() if value is not None}
        if not self.keep_alive:
            hdrs["Connection"] = "close"
        self.conn.request(method, path, body=body, headers=hdrs)
        response = self.conn.getresponse()
        data = response.read()
        self.response = response  # its headers stay readable (e.g. X-TokenPak-Cache)
        if not self.keep_alive:
            self.conn.close()
            self.conn = None
        return response.status, data

    def first_byte(self, path, body, headers=None):
        """Seconds from sending a request to the first body byte of its answer."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(*self.address, timeout=30)
        hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        hdrs.update(headers or {})
        started = time.perf_counter()
        self.conn.request("POST", path, body=body, headers=hdrs)
        response = self.conn.getresponse()
        response.read1(1) if hasattr(response, "read1") else response.read(1)
        elapsed = time.perf_counter() - started
        response.read()
        return elapsed


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


def chat_body(i, stream=False, size=1):
    text = "request %d %s" % (i, "lorem ipsum " * size)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def messages_body(i, stream=False, text=None, model="claude-sonnet-4-6"):
    """A small Anthropic /v1/messages body, like chat_body()."""
    body = {"model": model, "max_tokens": 64,
            "messages": [{"role": "user", "content": text or "request %d lorem ipsum" % i}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def stream_ended(api, data):
    """True when an SSE body ends the way the provider's SDK expects: `data: [DONE]` for
    OpenAI, a `message_stop` event for Anthropic, and no error event on the way."""
    if b"event: error" in data or b'data: {"error"' in data:
        return False
    tail = data.rstrip()
    if api == "openai":
        return tail.endswith(b"data: [DONE]")
    last = tail.rsplit(b"\n\n", 1)[-1]
    return last.startswith(b"event: message_stop")


def ms(seconds):
    """Seconds as a figure in milliseconds."""
    return "%.2f ms" % (seconds * 1000)


def markdown(title, header, rows):
    """A titled Markdown table (the format bench/run.py collects into RESULTS.md)."""
    lines = ["#### %s" % title, "", "| %s |" % " | ".join(header),
             "|%s|" % "|".join("---" for _ in header)]
    lines += ["| %s |" % " | ".join(str(cell) for cell in row) for row in rows]
    return "\n".join(lines)


def machine():
    """One line describing where the figures were measured."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s, %d cores, Python %s, %s" % (cpu, os.cpu_count(), platform.python_version(),
                                            time.strftime("%Y-%m-%d"))
