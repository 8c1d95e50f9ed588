"""tokenpak.daemon with a tiny real server: detach, pid file, readiness over the pipe, the
daemon's own error in the parent, stop/status, stale pid files, log setup.

Each start runs in a subprocess (it forks twice and must not fork pytest). The helper
script's name contains "tokenpak", as a real daemon's command line does: read_pid() checks
/proc/<pid>/cmdline for it, so a recycled pid is not mistaken for the daemon.
"""

import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys

import pytest

from tokenpak import daemon, lifecycle
from tokenpak.errors import ExitStatus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELPER = r'''
import http.server, json, os, signal, socket, sys, threading, time
from tokenpak import daemon
from tokenpak.errors import TokenpakError

mode, pid_file, log_file, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def run(ready_cb):
    if mode == "config-error":
        raise TokenpakError("invalid value for proxy.port: expected a whole number",
                            hint="tokenpak config set proxy.port 8766")
    if mode == "returns-early":
        return 4
    started = time.time()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "version": "9.9", "requests": 7,
                               "uptime_s": time.time() - started}).encode()
            # Printed before answering, so it is in the log when the client has the answer.
            print("daemon stdout goes to the log", flush=True)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)  # may raise
    stop = lambda *a: threading.Thread(target=server.shutdown).start()
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else stop)
    ready_cb("listening on 127.0.0.1:%d" % server.server_address[1])
    server.serve_forever(poll_interval=0.05)
    return 0

try:
    sys.exit(daemon.start(pid_file, log_file, run))
except TokenpakError as exc:
    print("tokenpak: error: %s" % exc.message, file=sys.stderr)
    sys.exit(1)
'''


@pytest.fixture
def env(tmp_path):
    helper = tmp_path / "tokenpak_daemon_helper.py"
    helper.write_text(HELPER)
    started = []

    class Env:
        pid_file = str(tmp_path / "run" / "tokenpak.pid")
        log_file = str(tmp_path / "log" / "tokenpak.log")

        def start(self, mode="serve", port=0):
            done = subprocess.run(
                [sys.executable, str(helper), mode, self.pid_file, self.log_file, str(port)],
                capture_output=True, text=True, timeout=60,
                env=dict(os.environ, PYTHONPATH=REPO))
            pid = daemon.read_pid(self.pid_file)
            if pid:
                started.append(pid)
            return done

        def url(self, done):
            port = int(done.stdout.rsplit(":", 1)[1])
            return "http://127.0.0.1:%d/health" % port

    yield Env()
    for pid in started:  # never leave a daemon behind, whatever the test did
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gone(pid):
    return not daemon._alive(pid)


def test_start_status_stop(env, capsys):
    done = env.start()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("listening on 127.0.0.1:")  # the daemon's own ready text
    pid = daemon.read_pid(env.pid_file)
    assert pid is not None and pid != os.getpid()
    assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        assert b"tokenpak_daemon_helper.py" in f.read()

    code, text = daemon.status(env.pid_file, env.url(done))
    assert code == ExitStatus.OK
    assert "pid:      %d" % pid in text
    assert "address:  %s" % env.url(done)[: -len("/health")] in text
    assert "requests: 7" in text and "version:  9.9" in text and "uptime:" in text
    with open(env.log_file) as f:  # stdout of the daemon went to its log file
        assert "daemon stdout goes to the log" in f.read()

    again = env.start()  # the pid file is taken: a second daemon must not start
    assert again.returncode == 1
    assert "already running (pid %d" % pid in again.stderr

    assert daemon.stop(env.pid_file, timeout=30) == ExitStatus.OK
    assert "tokenpak stopped (pid %d)" % pid in capsys.readouterr().out
    assert _gone(pid)
    assert not os.path.exists(env.pid_file)
    assert daemon.status(env.pid_file, env.url(done)) == (ExitStatus.NOT_RUNNING,
                                                          "tokenpak is not running")
    assert daemon.stop(env.pid_file) == ExitStatus.NOT_RUNNING


def test_port_in_use_is_reported_by_the_parent(env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        done = env.start(port=taken.getsockname()[1])
    assert done.returncode == 1
    assert done.stdout == ""
    assert "tokenpak: error: address already in use" in done.stderr
    assert not os.path.exists(env.pid_file)  # the daemon cleaned up after itself
    with open(env.log_file) as f:
        assert "Address already in use" in f.read()  # the traceback is in the log


def test_the_daemons_own_error_and_hint_reach_the_parent(env):
    done = env.start("config-error")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "tokenpak: error: invalid value for proxy.port: expected a whole number",
        "tokenpak: hint: tokenpak config set proxy.port 8766"]
    assert not os.path.exists(env.pid_file)


def test_run_returning_before_ready_is_an_error(env):
    done = env.start("returns-early")
    assert done.returncode == 1
    assert "stopped before it was ready (exit 4)" in done.stderr


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_pid_file_is_detected_and_replaced(env):
    os.makedirs(os.path.dirname(env.pid_file))
    with open(env.pid_file, "w") as f:
        f.write("%d\n" % _dead_pid())
    assert daemon.read_pid(env.pid_file) is None
    assert not os.path.exists(env.pid_file)  # removed, not trusted

    with open(env.pid_file, "w") as f:  # a crash left it behind: start anyway
        f.write("%d\n" % _dead_pid())
    done = env.start()
    assert done.returncode == 0, done.stderr
    pid = daemon.read_pid(env.pid_file)
    assert pid is not None
    assert daemon.stop(env.pid_file) == ExitStatus.OK
    assert _gone(pid)


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-5\n"])
def test_garbled_pid_file_is_stale(env, content):
    os.makedirs(os.path.dirname(env.pid_file))
    with open(env.pid_file, "w") as f:
        f.write(content)
    assert daemon.read_pid(env.pid_file) is None
    assert not os.path.exists(env.pid_file)


def test_recycled_pid_is_not_signalled(env):
    """A pid file naming a live process that is not tokenpak: stale, and left alone."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(os.path.dirname(env.pid_file))
        with open(env.pid_file, "w") as f:
            f.write("%d\n" % other.pid)
        assert daemon.stop(env.pid_file, timeout=1) == ExitStatus.NOT_RUNNING
        assert other.poll() is None  # not killed
        assert not os.path.exists(env.pid_file)
    finally:
        other.kill()
        other.wait()


def test_stop_gives_up_after_the_timeout(env):
    done = env.start("stubborn")  # ignores SIGTERM
    assert done.returncode == 0, done.stderr
    pid = daemon.read_pid(env.pid_file)
    assert daemon.stop(env.pid_file, timeout=0.3) == ExitStatus.ERROR
    assert not _gone(pid)
    assert daemon.read_pid(env.pid_file) == pid  # still its pid file
    os.kill(pid, signal.SIGKILL)


def test_status_of_a_daemon_that_does_not_answer(env):
    done = env.start()
    pid = daemon.read_pid(env.pid_file)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = "http://127.0.0.1:%d/health" % closed.getsockname()[1]
    code, text = daemon.status(env.pid_file, dead_url)
    assert code == ExitStatus.ERROR
    assert "pid %d" % pid in text and "does not answer" in text
    assert daemon.stop(env.pid_file) == ExitStatus.OK
    assert done.returncode == 0


def test_status_and_stop_without_a_pid_file_but_answering(env, capsys):
    """A tokenpak started by systemd (no pid file) is running, but not ours to stop."""
    done = env.start()
    pid = daemon.read_pid(env.pid_file)
    hidden = env.pid_file + ".elsewhere"
    os.rename(env.pid_file, hidden)
    try:
        code, text = daemon.status(env.pid_file, env.url(done))
        assert code == ExitStatus.OK and "no pid file" in text
        assert daemon.stop(env.pid_file, health_url=env.url(done)) == ExitStatus.ERROR
        assert "not started with --daemon" in capsys.readouterr().err
        assert not _gone(pid)
    finally:
        os.rename(hidden, env.pid_file)
    assert daemon.stop(env.pid_file) == ExitStatus.OK


# --- logging ----------------------------------------------------------------------------------


@pytest.fixture
def tokenpak_logger():
    logger = logging.getLogger("tokenpak")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


def test_daemon_logs_to_a_rotating_file(tmp_path, tokenpak_logger):
    path = str(tmp_path / "logs" / "tokenpak.log")
    lifecycle.setup_logging(path, "warning", journal=False)
    lifecycle.setup_logging(path, "warning", journal=False)  # again (SIGHUP): not twice
    handlers = [h for h in tokenpak_logger.handlers if getattr(h, "_tokenpak", False)]
    assert len(handlers) == 1
    handler = handlers[0]
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 10 * 1024 * 1024 and handler.backupCount == 5
    tokenpak_logger.info("not at warning level")
    tokenpak_logger.warning("upstream slow")
    handler.flush()
    text = open(path).read()
    assert "WARNING upstream slow" in text and "not at warning level" not in text
    assert text[:4].isdigit()  # a timestamp: a file has no journald to add one


def test_journal_lines_have_a_priority_and_no_timestamp(tmp_path, tokenpak_logger,
                                                        monkeypatch):
    stream = open(tmp_path / "stderr", "w")
    monkeypatch.setattr(sys, "stderr", stream)
    lifecycle.setup_logging(None, "info", journal=True)
    tokenpak_logger.error("cannot reach upstream")
    tokenpak_logger.info("listening")
    stream.flush()
    lines = open(tmp_path / "stderr").read().splitlines()
    assert lines == ["<3>ERROR: cannot reach upstream", "<6>INFO: listening"]
    stream.close()


def test_terminal_lines_have_timestamps(tmp_path, tokenpak_logger, monkeypatch):
    stream = open(tmp_path / "stderr", "w")
    monkeypatch.setattr(sys, "stderr", stream)
    lifecycle.setup_logging(None, "debug", journal=False)
    tokenpak_logger.debug("detail")
    stream.flush()
    line = open(tmp_path / "stderr").read().strip()
    assert line.endswith("DEBUG detail") and line[:4].isdigit()
    stream.close()
