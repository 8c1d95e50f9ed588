"""`proxy.workers` > 1: `tokenpak serve --workers 2` as a real process tree.

The parent binds and supervises, two forked workers serve on the shared socket. Each test
drives the real CLI and observes what a user would: answers from both workers (/health
names the worker that answered in worker_pid), a killed worker replaced, SIGHUP reaching every worker, SIGTERM
draining a stream, READY=1 to systemd only from the parent and only once all listen.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.request

from helpers import (ACTIVATE, REPO, WAIT, free_port, openai_client, tokenpak_env, wait_for,
                     wait_healthy)


def children(pid):
    """The live worker pids of the supervising process `pid`."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def health(url):
    # a new connection each time: the kernel hands it to whichever worker accepts first
    with urllib.request.urlopen(url + "/health", timeout=WAIT) as response:
        return json.loads(response.read())


def answering_pids(url, want):
    """Poll /health until the pids in `want` all answered; returns the pids that did."""
    seen = set()

    def done():
        seen.add(health(url)["worker_pid"])
        return want <= seen
    wait_for(done, interval=0)
    return seen


def ask(url, text):
    return openai_client(url).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}]).choices[0].message.content


def test_two_workers_share_the_socket_and_both_answer(spawn_tokenpak):
    process = spawn_tokenpak("serve", "--workers", "2")
    workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid))
    assert len(workers) == 2 and process.pid not in workers
    assert answering_pids(process.url, workers) == workers  # the parent itself never answers
    for i in range(10):
        assert ask(process.url, "spread %d" % i).startswith("Echo: spread %d" % i)
    process.terminate()
    assert process.wait(30) == 0
    assert not any(children(process.pid))


def test_a_killed_worker_is_replaced(spawn_tokenpak):
    process = spawn_tokenpak("serve", "--workers", "2")
    workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid))
    assert answering_pids(process.url, workers) == workers  # both started
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    now = wait_for(lambda: len(children(process.pid) - {victim}) == 2
                   and children(process.pid))
    assert now and victim not in now and len(now) == 2, process.stderr.read1().decode()
    assert answering_pids(process.url, now) == now  # the replacement serves too
    assert ask(process.url, "after").startswith("Echo: after")
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert "worker %d exited (killed by SIGKILL); starting another" % victim in err.decode()


def test_sighup_reaches_every_worker_before_systemd_hears_ready(
        spawn_tokenpak, notify_socket, fake, isolated_env):
    """`systemctl reload` returns at READY=1: from then on every answer, whichever worker
    gives it, has the new settings (each worker confirms on the ready pipe first)."""
    env = tokenpak_env(fake.url, isolated_env, NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"])
    process = spawn_tokenpak("serve", "--workers", "2", env=env, wait=False)
    assert notify_socket.recv(4096).startswith(b"READY=1")
    wait_healthy(process.url, process=process)
    workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid))
    assert "[tokenpak]" in ask(process.url, "before")  # the footer is on by default
    config = isolated_env / ".tokenpak" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"footer": {"enabled": False}}))
    process.send_signal(signal.SIGHUP)
    assert notify_socket.recv(4096).startswith(b"RELOADING=1")
    assert notify_socket.recv(4096).startswith(b"READY=1")
    # at once, no waiting: every answer has lost its footer, in both workers
    assert [ask(process.url, "r%d" % i) for i in range(20)] == [
        "Echo: r%d" % i for i in range(20)]
    assert children(process.pid) == workers  # reloaded in place, not restarted
    process.terminate()
    _, err = process.communicate(timeout=30)
    err = err.decode()
    assert "reload: sent to 2 workers" in err
    assert err.count("reload: footer.enabled = False") == 2  # each worker applied it


def test_sigterm_drains_a_slow_stream_and_exits_0(spawn_tokenpak):
    process = spawn_tokenpak("serve", "--workers", "2")
    words = " ".join("w%d" % i for i in range(20))
    stream = openai_client(process).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": words}], stream=True,
        extra_headers={"x-fake-delay": "0.1"})
    chunks = iter(stream)
    received = [next(chunks)]  # the stream is running in one of the workers...
    process.send_signal(signal.SIGTERM)  # ...when the parent is told to stop
    received += list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text.startswith("Echo: " + words)
    assert process.wait(30) == 0
    err = process.stderr.read().decode()
    assert "SIGTERM: finishing in-flight requests in 2 workers" in err
    assert "Traceback" not in err


def test_ready_reaches_systemd_from_the_parent_once_every_worker_listens(
        spawn_tokenpak, notify_socket, fake, isolated_env):
    env = tokenpak_env(fake.url, isolated_env, NOTIFY_SOCKET=os.environ["NOTIFY_SOCKET"])
    process = spawn_tokenpak("serve", "--workers", "2", env=env, wait=False)
    message = notify_socket.recv(4096).decode()
    assert message.startswith("READY=1") and "MAINPID=%d" % process.pid in message
    assert "2 workers listening" in message
    wait_healthy(process.url, process=process)
    process.send_signal(signal.SIGHUP)
    assert notify_socket.recv(4096).startswith(b"RELOADING=1")
    assert notify_socket.recv(4096).startswith(b"READY=1")
    process.terminate()
    assert notify_socket.recv(4096).startswith(b"STOPPING=1")
    assert process.wait(30) == 0
    err = process.stderr.read().decode()
    # the parent says it for all of them: one line to start, one to stop, none per worker
    assert [l.split(" INFO ", 1)[1] for l in err.splitlines() if "listening on" in l
            or "stop" in l] == [
        "2 workers listening on %s" % process.url,
        "SIGTERM: finishing in-flight requests in 2 workers, then stopping (press Ctrl-C "
        "again to exit at once)",
        "tokenpak stopped"]
    notify_socket.settimeout(0.2)
    try:
        extra = notify_socket.recv(4096)
    except OSError:
        extra = b""
    assert extra == b""  # no worker spoke to systemd


def test_daemon_with_workers_start_status_stop(fake, isolated_env):
    port = free_port()
    env = tokenpak_env(fake.url, isolated_env, TOKENPAK_PORT=str(port))

    def tokenpak(*args):
        return subprocess.run([sys.executable, "-m", "tokenpak"] + list(args), env=env,
                              cwd=str(REPO), capture_output=True, text=True, timeout=60)
    started = tokenpak("serve", "--daemon", "--workers", "2")
    assert started.returncode == 0, started.stderr
    url = "http://127.0.0.1:%d" % port
    try:
        pid = int((isolated_env / ".tokenpak" / "tokenpak.pid").read_text().split()[0])
        workers = children(pid)
        assert len(workers) == 2  # the pid file is the supervisor's
        assert answering_pids(url, workers) == workers
        assert ask(url, "daemon").startswith("Echo: daemon")
        status = tokenpak("status")
        assert status.returncode == 0 and "pid:      %d" % pid in status.stdout
    finally:
        stopped = tokenpak("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert tokenpak("status").returncode == 3
    assert not any(os.path.exists("/proc/%d" % w) for w in workers)


def test_workers_flag_is_validated():
    result = subprocess.run([sys.executable, "-m", "tokenpak", "serve", "--workers", "0"],
                            cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--workers: expected a whole number from 1" in result.stderr


def test_socket_activation_hands_the_socket_to_every_worker(fake, isolated_env):
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        unused = free_port()  # what the config says; the activated socket wins
        process = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "serve", "--workers", "2",
             "--port", str(unused)],
            pass_fds=(listener.fileno(),), env=tokenpak_env(fake.url, isolated_env),
            cwd=str(REPO), stderr=subprocess.PIPE)
        try:
            wait_healthy(url, process=process)
            workers = wait_for(lambda: len(children(process.pid)) == 2
                               and children(process.pid))
            assert workers and answering_pids(url, workers) == workers
            assert ask(url, "activated").startswith("Echo: activated")
        finally:
            process.terminate()
            assert process.wait(30) == 0
        assert "127.0.0.1:%d" % unused not in process.stderr.read().decode()


def requests_total(text):
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("tokenpak_requests_total{"))


def test_metrics_count_the_requests_of_every_worker(spawn_tokenpak, isolated_env):
    process = spawn_tokenpak("serve", "--workers", "2")
    sent = []

    def per_worker():
        """Each worker's own published count, from the files /metrics adds up."""
        counts = {}
        for path in isolated_env.glob(".tokenpak/.tokenpak-metrics-*/*.prom"):
            counts[path.name] = requests_total(path.read_text())
        return counts

    def both_served():
        sent.append(ask(process.url, "m%d" % len(sent)))
        counts = per_worker()
        return len(counts) == 2 and all(counts.values())
    assert wait_for(both_served, interval=0)

    def scrape():
        with urllib.request.urlopen(process.url + "/metrics", timeout=WAIT) as response:
            return response.read().decode()
    # whichever worker answers the scrape, it adds the other's figures: the instance's total
    assert wait_for(lambda: all(requests_total(scrape()) == len(sent) for _ in range(6)))
    text = scrape()
    assert text.count("# TYPE tokenpak_requests_total counter") == 1
    assert "tokenpak_up 1\n" in text
    process.terminate()
    assert process.wait(30) == 0
    assert not list(isolated_env.glob(".tokenpak/.tokenpak-metrics-*"))  # cleaned up


def test_health_answers_for_the_whole_instance(spawn_tokenpak):
    process = spawn_tokenpak("serve", "--workers", "2")
    workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid))
    assert answering_pids(process.url, workers) == workers
    for i in range(8):
        ask(process.url, "h%d" % i)

    def instance_wide():
        """Every answer, whichever worker gives it, counts every worker's requests."""
        bodies = [health(process.url) for _ in range(6)]
        return all(b["workers"] == 2 and b["pid"] == process.pid
                   and b["requests"] >= 8 for b in bodies) and bodies
    bodies = wait_for(instance_wide)
    assert {b["worker_pid"] for b in bodies} <= workers
    process.terminate()
    assert process.wait(30) == 0


def test_a_worker_that_cannot_start_fails_the_start_with_its_own_reason(isolated_env):
    """As one process would: the worker's message and hint, not a pointer to a log."""
    import pytest
    from tokenpak import config as configmod, workers
    from tokenpak.errors import TokenpakError

    def serve(config, **kwargs):
        raise TokenpakError("cannot open the thing", hint="fix the thing")
    config = configmod.load({"proxy.workers": "2", "proxy.port": "0",
                             "db.path": str(isolated_env / "t.db")})
    sock = workers.bind(config)
    handlers = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    try:
        with pytest.raises(TokenpakError) as caught:
            workers.Supervisor(config, sock, serve, None).run()
    finally:
        sock.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert (caught.value.message, caught.value.hint) == ("cannot open the thing", "fix the thing")


def test_a_repeat_sent_after_the_answer_is_a_hit_in_whichever_worker_takes_it(
        spawn_tokenpak, fake):
    """Each request on a new connection, so the kernel picks the worker: the cached answer
    must be in the database, not only in the memory of the worker that stored it."""
    process = spawn_tokenpak("serve", "--workers", "2")
    workers = wait_for(lambda: len(children(process.pid)) == 2 and children(process.pid))
    assert answering_pids(process.url, workers) == workers
    for i in range(12):
        body = json.dumps({"model": "gpt-4o",
                           "messages": [{"role": "user", "content": "repeat %d" % i}]})
        verdicts = []
        for _ in range(2):
            request = urllib.request.Request(
                process.url + "/v1/chat/completions", body.encode(),
                {"Authorization": "Bearer sk-test-repeat", "Content-Type": "application/json",
                 "Connection": "close"})
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                verdicts.append(response.headers["X-TokenPak-Cache"])
                response.read()
        assert verdicts == ["miss", "hit"], i
    assert len([r for r in fake.requests if b"repeat" in r.body]) == 12
    process.terminate()
    assert process.wait(30) == 0
