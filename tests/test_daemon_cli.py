"""The real CLI as a user runs it: `serve --daemon`, `status`, `stop`, signals."""

import json
import os
import signal
import subprocess
import sys

from helpers import (OPENAI_KEY, REPO, free_port, openai_client, tokenpak_env, wait_for,
                     wait_healthy)


def tokenpak(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tokenpak"] + list(args), env=env,
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def daemon_env(fake, home, port):
    return tokenpak_env(fake.url, home, TOKENPAK_PORT=str(port))


def test_daemon_start_status_stop(fake, isolated_env):
    port = free_port()
    env = daemon_env(fake, isolated_env, port)
    started = tokenpak(env, "serve", "--daemon")
    assert started.returncode == 0, started.stderr
    try:
        pid_file = isolated_env / ".tokenpak" / "tokenpak.pid"
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        # Exit 0 only once listening: the proxy answers right away.
        assert wait_healthy("http://127.0.0.1:%d" % port, timeout=2)["status"] == "ok"
        client = openai_client("http://127.0.0.1:%d" % port)
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "daemon"}])
        # With proxy.workers auto, the worker answering /health adds the others' counts,
        # which they publish every second: poll.
        status = wait_for(lambda: (lambda s: "requests: 1" in s.stdout and s)(
            tokenpak(env, "status")))
        assert status and status.returncode == 0
        assert "pid:      %d" % pid in status.stdout
        assert "127.0.0.1:%d" % port in status.stdout
        again = tokenpak(env, "serve", "--daemon")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = tokenpak(env, "stop")
    assert stopped.returncode == 0
    assert not pid_file.exists()
    assert tokenpak(env, "status").returncode == 3
    log = (isolated_env / ".tokenpak" / "tokenpak.log").read_text()
    assert "POST /v1/chat/completions openai 200" in log
    assert OPENAI_KEY not in log


def test_stale_pid_file_is_detected_not_trusted(fake, isolated_env):
    port = free_port()
    env = daemon_env(fake, isolated_env, port)
    pid_file = isolated_env / ".tokenpak" / "tokenpak.pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file.write_text("%d\n" % dead.pid)
    assert tokenpak(env, "status").returncode == 3
    assert tokenpak(env, "stop").returncode == 3
    started = tokenpak(env, "serve", "--daemon")
    assert started.returncode == 0, started.stderr
    assert tokenpak(env, "stop").returncode == 0


def test_daemon_that_cannot_start_reports_its_error(fake, isolated_env, spawn_tokenpak):
    busy = spawn_tokenpak("serve")
    port = int(busy.url.rsplit(":", 1)[1])
    env = daemon_env(fake, isolated_env, port)
    result = tokenpak(env, "serve", "--daemon")
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:%d" % port in result.stderr
    assert not (isolated_env / ".tokenpak" / "tokenpak.pid").exists()


def test_sigterm_lets_a_slow_stream_finish_and_exits_0(fake, spawn_tokenpak):
    process = spawn_tokenpak("serve")
    client = openai_client(process)
    words = " ".join("w%d" % i for i in range(20))
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": words}], stream=True,
        extra_headers={"x-fake-delay": "0.1"})
    chunks = iter(stream)
    received = [next(chunks)]  # the stream is running...
    process.send_signal(signal.SIGTERM)  # ...when the stop arrives
    received += list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text.startswith("Echo: " + words)  # every event, then the footer
    assert process.wait(30) == 0
    err = process.stderr.read().decode()
    assert "finishing in-flight requests" in err
    assert "Traceback" not in err


def test_sighup_reloads_the_config_file(fake, spawn_tokenpak, isolated_env):
    process = spawn_tokenpak("serve")
    config = isolated_env / ".tokenpak" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"footer": {"enabled": False}, "proxy": {"port": 1}}))
    process.send_signal(signal.SIGHUP)
    client = openai_client(process)

    def answer():
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "reload"}]
        ).choices[0].message.content
    assert wait_for(lambda: "[tokenpak]" not in answer())
    assert answer() == "Echo: reload"  # the footer is off now, without a restart
    process.terminate()
    _, err = process.communicate(timeout=30)
    err = err.decode()
    assert "reload: footer.enabled = False" in err
    assert "reload: proxy.port" not in err  # the port came from --port, which still wins


def test_status_and_stop_find_the_daemon_where_it_listens(fake, isolated_env):
    """--port (not the config) chose the port, and a later `config set proxy.port` plus
    SIGHUP changes the file but not the socket: status and stop still find it."""
    port = free_port()
    env = tokenpak_env(fake.url, isolated_env)  # no TOKENPAK_PORT: the config says 8766
    started = tokenpak(env, "serve", "--daemon", "--port", str(port))
    assert started.returncode == 0, started.stderr
    pid_file = isolated_env / ".tokenpak" / "tokenpak.pid"
    try:
        assert tokenpak(env, "config", "set", "proxy.port", str(free_port())).returncode == 0
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGHUP)
        status = tokenpak(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "address:  http://127.0.0.1:%d" % port in status.stdout
    finally:
        stopped = tokenpak(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "waiting up to" in stopped.stdout and "tokenpak stopped" in stopped.stdout
    assert not pid_file.exists()


def test_status_and_stop_work_when_the_config_breaks_after_the_start(fake, isolated_env):
    port = free_port()
    env = daemon_env(fake, isolated_env, port)
    assert tokenpak(env, "serve", "--daemon").returncode == 0
    (isolated_env / ".tokenpak" / "config.json").write_text("{broken")
    status = tokenpak(env, "status")
    stopped = tokenpak(env, "stop")
    assert status.returncode == 0 and "127.0.0.1:%d" % port in status.stdout
    assert "tokenpak: warning:" in status.stderr and "Traceback" not in status.stderr
    assert stopped.returncode == 0, stopped.stderr


def test_a_second_ctrl_c_exits_at_once(fake, spawn_tokenpak):
    process = spawn_tokenpak("serve")
    client = openai_client(process)
    words = " ".join("w%d" % i for i in range(200))
    stream = client.chat.completions.create(  # 200 events 0.2 s apart: 40 s to drain
        model="gpt-4o", messages=[{"role": "user", "content": words}], stream=True,
        extra_headers={"x-fake-delay": "0.2"})
    next(iter(stream))
    process.send_signal(signal.SIGINT)
    wait_for_line(process, "press Ctrl-C again")
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 1  # a drained stop exits 0
    err = process.stderr.read().decode()
    assert "SIGINT again: exiting now" in err and "Traceback" not in err
    stream.close()


def wait_for_line(process, text):
    """Read the process's stderr until a line holds `text` (it is still running)."""
    seen = []
    for line in iter(process.stderr.readline, b""):
        seen.append(line.decode())
        if text in seen[-1]:
            return
    raise AssertionError("no %r in: %s" % (text, "".join(seen)))


def test_access_line_has_model_and_cache_result_and_debug_adds_detail(fake, isolated_env):
    port = free_port()
    env = daemon_env(fake, isolated_env, port)
    assert tokenpak(env, "config", "set", "log.level", "debug").returncode == 0
    assert tokenpak(env, "serve", "--daemon").returncode == 0
    try:
        client = openai_client("http://127.0.0.1:%d" % port)
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o",
                                           messages=[{"role": "user", "content": "twice"}])
    finally:
        assert tokenpak(env, "stop").returncode == 0
    log = (isolated_env / ".tokenpak" / "tokenpak.log").read_text()
    lines = [l for l in log.splitlines() if "POST /v1/chat/completions openai 200" in l]
    assert len(lines) == 2
    assert "model=gpt-4o cache=miss" in lines[0] and "model=gpt-4o cache=hit" in lines[1]
    assert "upstream=%s/v1/chat/completions" % fake.url in log
    assert "usage=in=" in log
    assert OPENAI_KEY not in log
