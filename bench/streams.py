"""Many long streams at once: does one tokenpak instance hold them, and what do they cost?

    python bench/streams.py [--streams 5000] [--events 30] [--interval 1.0] [--open 32]
                            [--clients 4] [--workers 1,2] [--quick]

Slow OpenAI streams (one event every --interval seconds, --events of them: ~30 s each) are
opened --open at a time (a new one as soon as one in the opening state has its first event)
until --streams are open together, first straight to the fake provider, then through
tokenpak with each --workers count (`proxy.workers`), in the same run. All along, a probe sends small non-stream requests, each on a
new connection, one after another; those sent while at least 90% of the most streams held at
once were held give the latency a new user sees under that load.

Neither side of tokenpak caps the figure: the fake provider is bench/fakeserver.py (one
epoll thread, a timer per stream), and the streams are driven by --clients processes, each
one thread on `selectors` with raw sockets. Loopback only; every phase is bounded in time.

Reported per target: the most streams held at once (the figure that matters: a target
that opens streams slower than they end never holds them all), streams that ended properly
([DONE] and the chunked terminator), errors (refused, reset, a non-200 status, a stream cut
short), streams still going at the bench's time limit, the seconds it took to open them all,
the probe's p50/p99, for tokenpak its peak RSS, threads and open fds and the CPU per stream
and per relayed event (all of its processes summed: with workers, the supervisor and every
worker), and, before the load, the first streamed byte's p50 on an idle target (direct and
each tokenpak interleaved). Numbers, not pass/fail.
"""

import argparse
import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Every stream's prompt differs, as real conversations do: identical bodies in flight at
# the same time would be coalesced onto one upstream call (coalesce.py), another benchmark.
BODY = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "%s"}]}'
SAMPLE = 0.5  # seconds between samples of the counters and tokenpak's RSS
# the shared counters each client process adds to: opened, held now, ended well, failed,
# still going at the bench's time limit
OPENED, HELD, DONE, ERRORS, LATE = range(5)


def stream_request(address, events, interval, name):
    body = BODY % name.encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n"
            b"Authorization: Bearer sk-bench\r\nContent-Type: application/json\r\n"
            b"x-fake-events: %d\r\nx-fake-interval: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (address[0].encode(), address[1], events, str(interval).encode(), len(body), body))


def drive(address, count, concurrency, events, interval, deadline, counters, prefix):
    """One client process: open `count` streams, at most `concurrency` still opening at a
    time, and read each to its end. Adds to `counters` as streams open, end and fail."""
    selector = selectors.DefaultSelector()
    state = {}  # socket -> [bytes read, held?, its number]
    started = opening = 0

    def add(index, n=1):
        with counters.get_lock():
            counters[index] += n

    def finish(sock, ok, outcome=ERRORS):
        held = state.pop(sock)[1]
        selector.unregister(sock)
        sock.close()
        add(DONE if ok else outcome)
        if held:
            add(HELD, -1)
        return 0 if held else 1  # one fewer opening

    while (started < count or state) and time.monotonic() < deadline:
        while started < count and opening < concurrency:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(address)
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                add(ERRORS)
                started += 1
                continue
            selector.register(sock, selectors.EVENT_WRITE)
            state[sock] = [b"", False, started]
            started += 1
            opening += 1
            add(OPENED)
        for key, mask in selector.select(0.5):
            sock = key.fileobj
            if mask & selectors.EVENT_WRITE:
                try:
                    # small: fits the fresh socket's buffer
                    sock.sendall(stream_request(address, events, interval,
                                                "%s stream %d" % (prefix, state[sock][2])))
                except OSError:
                    opening -= finish(sock, False)
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            entry = state[sock]
            if not data:
                opening -= finish(sock, False)
                continue
            entry[0] = (entry[0] + data)[-256:] if entry[1] else entry[0] + data
            if not entry[1]:
                if not entry[0].startswith(b"HTTP/1.1 200"):
                    if b"\r\n\r\n" in entry[0]:
                        opening -= finish(sock, False)
                    continue
                if b"data: " not in entry[0]:
                    continue
                entry[1] = True  # the first event arrived: held
                opening -= 1
                add(HELD)
            if entry[0].endswith(b"0\r\n\r\n") and b"data: [DONE]" in entry[0]:
                finish(sock, True)
    for sock in list(state):  # out of time
        finish(sock, False, LATE)


def probe(url, held, stop, results):
    """Small non-stream requests on fresh connections, one after another, until `stop` is
    set; appends (seconds or None for an error, streams held when it was sent)."""
    body = common.chat_body(0)
    while not stop.is_set():
        client = common.Client(url, keep_alive=False)
        now_held = held()
        started = time.perf_counter()
        try:
            status, _ = client.request("POST", "/v1/chat/completions", body)
        except OSError:
            status = 0
        results.append((time.perf_counter() - started if status == 200 else None, now_held))
        stop.wait(0.05)


def family(pid):
    """`pid` and its children: tokenpak with workers is a supervisor and its workers."""
    pids = [pid]
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as handle:
                pids.extend(int(child) for child in handle.read().split())
    except OSError:
        pass
    return pids


def summed(pids, read):
    """`read(pid)` summed over the processes still there."""
    total = 0
    for pid in pids:
        try:
            total += read(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(url, streams, events, interval, concurrency, clients, pid=None):
    """Hold `streams` slow streams through `url`; returns a dict of figures."""
    address = tuple(url.split("//")[1].split(":"))
    address = (address[0], int(address[1]))
    counters = multiprocessing.Array("l", 5)
    budget = streams / float(concurrency) * 0.5 + events * interval * 2 + 60
    deadline = time.monotonic() + budget
    shares = [streams // clients + (1 if i < streams % clients else 0) for i in range(clients)]
    per = max(1, concurrency // clients)
    workers = [multiprocessing.Process(target=drive, args=(
        address, share, per, events, interval, deadline, counters, "%s client %d" % (url, i)))
        for i, share in enumerate(shares)]
    started = time.monotonic()
    pids = family(pid) if pid is not None else []
    cpu = summed(pids, common.cpu_seconds)
    for worker in workers:
        worker.start()
    figures = {"held": 0, "open_s": None}
    if pid is not None:
        figures.update(rss=0.0, threads=0, fds=0)
    results, stop = [], threading.Event()
    prober = threading.Thread(target=probe, args=(url, lambda: counters[HELD], stop, results))
    prober.start()
    while any(w.is_alive() for w in workers):
        now = counters[:]
        figures["held"] = max(figures["held"], now[HELD])
        if figures["open_s"] is None and now[OPENED] >= streams and now[HELD] + now[DONE] \
                + now[ERRORS] >= streams:
            figures["open_s"] = time.monotonic() - started
        if pid is not None:
            figures["rss"] = max(figures["rss"], summed(pids, common.rss_mb))
            figures["threads"] = max(figures["threads"],
                                     summed(pids, lambda p: common.threads_and_fds(p)[0]))
            figures["fds"] = max(figures["fds"],
                                 summed(pids, lambda p: common.threads_and_fds(p)[1]))
        time.sleep(SAMPLE)
    stop.set()
    prober.join()
    for worker in workers:
        worker.join()
    # what a new user sees while the load is at its height: probes sent while at least 90%
    # of the most streams held at once were held
    loaded = [seconds for seconds, held in results if held >= 0.9 * figures["held"]]
    figures.update(done=counters[DONE], errors=counters[ERRORS] + (streams - counters[OPENED]),
                   late=counters[LATE], probes=len(loaded),
                   probe_errors=sum(1 for seconds in loaded if seconds is None),
                   p50=common.percentile([s for s in loaded if s is not None], 50),
                   p99=common.percentile([s for s in loaded if s is not None], 99))
    if pid is not None:
        # the CPU each stream cost, from its accept to its end (the probes' share is small),
        # and per event the provider sent (the role chunk, `events` words, the finish
        # chunk, the usage chunk and [DONE])
        figures["cpu_stream"] = (summed(pids, common.cpu_seconds) - cpu) / max(1, counters[DONE])
        figures["cpu_event"] = figures["cpu_stream"] / (events + 4)
    return figures


def first_bytes(urls, rounds):
    """The first streamed byte's p50 for each target, measured in turn round after round
    (so that each sees the same machine), one keep-alive client each, on idle targets."""
    clients = [common.Client(url) for url in urls]
    times = [[] for _ in urls]
    headers = {"x-fake-events": "1", "x-fake-interval": "0.001"}
    for i in range(rounds):
        for n, client in enumerate(clients):
            body = common.chat_body(i * len(urls) + n + 10 ** 8, stream=True)
            times[n].append(client.first_byte("/v1/chat/completions", body, headers))
    return [common.percentile(t, 50) for t in times]


def start_fake():
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "fakeserver.py")],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def run(streams=5000, events=30, interval=1.0, concurrency=32, clients=4, workers=(1,),
        rounds=200):
    """Direct, then through tokenpak with each worker count, in one run; returns the
    table's header and rows. Every tokenpak starts before the first measurement and idles
    while the others are measured."""
    fake, fake_url = start_fake()
    targets = []
    try:
        with tempfile.TemporaryDirectory() as state:
            for count in workers:
                home = os.path.join(state, str(count))
                os.mkdir(home)
                targets.append(common.start_tokenpak(fake_url, home,
                                                     args=("--workers", str(count))))
            firsts = first_bytes([fake_url] + [url for _, url in targets], rounds)
            results = [measure(fake_url, streams, events, interval, concurrency, clients)]
            for process, url in targets:
                results.append(measure(url, streams, events, interval, concurrency, clients,
                                       pid=process.pid))
            for process, _ in targets:
                common.stop_tokenpak(process)
    finally:
        for process, _ in targets:
            if process.poll() is None:
                process.kill()
        common.stop(fake)
    for result, first in zip(results, firsts):
        result["first_byte"] = first

    def row(name, key, fmt=str):
        return [name] + [fmt(r[key]) if key in r else "-" for r in results]

    count = "{:,}".format
    seconds = lambda s: "-" if s is None else "%.1f s" % s  # noqa: E731
    header = ["measure", "direct"] + ["tokenpak, %d worker%s" % (n, "s" if n > 1 else "")
                                      for n in workers]
    return header, [
        row("streams held at once", "held", count),
        row("streams ended properly", "done", count),
        row("stream errors", "errors", count),
        row("streams unfinished at the time limit", "late", count),
        row("time to open them all", "open_s", seconds),
        row("small request p50, >= 90% of peak held", "p50", common.ms),
        row("small request p99, >= 90% of peak held", "p99", common.ms),
        row("small request errors", "probe_errors", count),
        row("small requests timed at that load", "probes", count),
        row("tokenpak peak RSS", "rss", lambda v: "%.0f MB" % v),
        row("tokenpak peak threads", "threads", count),
        row("tokenpak peak open fds", "fds", count),
        row("tokenpak CPU per stream", "cpu_stream", common.ms),
        row("tokenpak CPU per upstream event", "cpu_event", lambda v: "%.0f µs" % (v * 1e6)),
        row("first streamed byte p50, idle (%d rounds)" % rounds, "first_byte", common.ms)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--open", type=int, default=32, dest="concurrency",
                        help="streams opening at a time")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--workers", default="1,2",
                        help="tokenpak worker counts to measure, comma-separated")
    parser.add_argument("--rounds", type=int, default=200,
                        help="first-byte rounds before the load")
    parser.add_argument("--quick", action="store_true", help="500 streams of 10 events")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.events = 500, 10
    workers = [int(n) for n in args.workers.split(",") if n.strip()]
    header, rows = run(args.streams, args.events, args.interval, args.concurrency,
                       args.clients, workers, args.rounds)
    print(common.markdown("%s slow streams (%d events, %.1f s apart), %d opening at a time"
                          % ("{:,}".format(args.streams), args.events, args.interval,
                             args.concurrency), header, rows))


if __name__ == "__main__":
    main()
