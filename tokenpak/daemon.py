"""`tokenpak serve --daemon`, `tokenpak stop`, `tokenpak status`: a classic Unix daemon, done right.

The parent must not say "started" before the proxy listens, and must show the daemon's own
error when it cannot start (port in use, bad config): so the grandchild reports over a pipe,
and the parent exits only when it hears "ready" or an error (or the pipe closes).

The pid file is claimed with O_EXCL *before* forking, so two concurrent starts cannot both win;
a pid file left by a crash is detected (`os.kill(pid, 0)` plus a look at /proc/<pid>/cmdline,
because pids are reused) and replaced, never trusted. Under systemd none of this is used:
units run `tokenpak serve` in the foreground, where READY=1 must come from the main pid.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import sys
import time
import traceback
import urllib.error
import urllib.request

from tokenpak.errors import ExitStatus, TokenpakError

log = logging.getLogger("tokenpak")

READY_TIMEOUT = 60.0  # seconds the parent waits for the daemon to listen
HEALTH_TIMEOUT = 2.0
_MARK = "tokenpak"  # a live pid whose command line lacks this is a reused pid, not ours


# --- pid files ----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True when `pid` runs (a zombie does not count: it has exited, only its parent lags)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            # the state letter follows the parenthesised command name, which may hold spaces
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def _is_tokenpak(pid: int) -> bool:
    """True when `pid` runs tokenpak (checked by its command line where /proc exists)."""
    if not _alive(pid):
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # no /proc at all: trust kill(0)
    except OSError:
        return True  # unreadable (hidepid): do not call a live process stale
    if _MARK.encode() in cmdline:
        return True
    try:  # the same program as ours (a daemon forked from a script that embeds tokenpak)
        with open("/proc/self/cmdline", "rb") as f:
            return f.read() == cmdline
    except OSError:
        return False


def _read_raw(pid_file: str):
    """The pid on the pid file's first line, or None (missing, garbled, unreadable)."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            return int(f.readline().strip() or "0") or None
    except (OSError, ValueError):
        return None


def record_address(pid_file: str, url: str) -> None:
    """Add the address the daemon actually bound as the pid file's second line.

    `status` and `stop` must reach the daemon where it listens, which the config file no
    longer tells once --port, $TOKENPAK_PORT or a later `config set proxy.port` differ from
    what it was started with. Replaced atomically: a reader sees the old or the new file."""
    temp = pid_file + ".tmp"
    with open(temp, "w", encoding="ascii") as f:
        f.write("%d\n%s\n" % (os.getpid(), url))
    os.chmod(temp, 0o644)
    os.replace(temp, pid_file)


def base_url(host, port) -> str:
    """http://host:port, with a wildcard address replaced by loopback (where to connect)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = "[%s]" % host
    return "http://%s:%d" % (host, port)


def read_address(pid_file: str):
    """The base URL a running daemon recorded in its pid file, or None."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    url = lines[1].strip() if len(lines) > 1 else ""
    return url if url.startswith("http://") else None


def _remove(pid_file: str, pid=None) -> None:
    """Remove the pid file (only if it still names `pid`, when given)."""
    if pid is not None and _read_raw(pid_file) != pid:
        return
    try:
        os.unlink(pid_file)
    except FileNotFoundError:
        pass


def read_pid(pid_file: str):
    """The pid of the running daemon, or None; a stale or garbled pid file is removed."""
    if not os.path.exists(pid_file):
        return None
    pid = _read_raw(pid_file)
    if pid is not None and _is_tokenpak(pid):
        return pid
    log.info("removing stale pid file %s (pid %s is not running)", pid_file, pid)
    _remove(pid_file)
    return None


def _claim(pid_file: str) -> int:
    """Create the pid file exclusively and return its fd; TokenpakError if a daemon runs."""
    directory = os.path.dirname(os.path.abspath(pid_file))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for _ in range(3):
        try:
            # O_EXCL also refuses a symlink planted at the path, dangling or not.
            fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pid = read_pid(pid_file)  # removes a stale file, then we try again
            if pid is not None:
                raise TokenpakError(
                    "tokenpak is already running (pid %d, pid file %s)" % (pid, pid_file),
                    hint="`tokenpak status` shows it; `tokenpak stop` stops it",
                ) from None
            continue
        except OSError as exc:
            raise TokenpakError("cannot create pid file %s: %s" % (pid_file, exc.strerror),
                                hint="set proxy.pid_file to a writable path") from None
        # our own pid at once, so a concurrent start sees a live tokenpak, not an empty file
        os.write(fd, b"%d\n" % os.getpid())
        return fd
    raise TokenpakError("cannot claim pid file %s: it keeps reappearing" % pid_file)


# --- start ------------------------------------------------------------------------------


def _format_error(message: str, hint) -> str:
    """One error line (and a hint line), as `tokenpak.cli.main` prints a TokenpakError."""
    return "tokenpak: error: %s%s" % (message, "\ntokenpak: hint: %s" % hint if hint else "")


def start(pid_file: str, log_file: str, run, ready_timeout: float = READY_TIMEOUT) -> int:
    """Start `run` as a detached daemon; return 0 once it listens, 1 when it could not start.

    `run(ready_cb)` binds the server, calls `ready_cb()` (or `ready_cb("text to print")`) once
    it accepts connections, serves until shutdown and returns an exit code. If it raises
    before that, its error (a TokenpakError's message and hint, or the exception text) is
    printed here, on the caller's stderr. Call before any thread is started: it forks.
    """
    # the daemon runs in /, so relative paths must be resolved while we still know the cwd
    pid_file, log_file = os.path.abspath(pid_file), os.path.abspath(log_file)
    pid_fd = _claim(pid_file)
    read_end, write_end = os.pipe()  # grandchild -> parent: "READY text" or "ERROR {json}"
    first = os.fork()
    if first == 0:  # the first child: leave the session, fork again, vanish
        os.close(read_end)
        os.setsid()  # no controlling terminal: a closing terminal cannot SIGHUP us
        if os.fork() != 0:
            os._exit(0)
        _daemon_main(pid_file, pid_fd, log_file, write_end, run)  # never returns
    os.close(write_end)
    os.close(pid_fd)
    os.waitpid(first, 0)
    return _await_daemon(read_end, pid_file, log_file, ready_timeout)


def _await_daemon(read_end: int, pid_file: str, log_file: str, timeout: float) -> int:
    """The parent's half: wait for the daemon's report on the pipe and relay it."""
    data = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                pid = _read_raw(pid_file)
                if pid and pid != os.getpid():  # not our own pid, written before the fork
                    os.kill(pid, signal.SIGTERM)
                sys.stderr.write(_format_error(
                    "the daemon did not start listening within %d s; stopped it" % timeout,
                    "see %s" % log_file) + "\n")
                return ExitStatus.ERROR
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    kind, _, rest = data.decode("utf-8", "replace").partition(" ")
    if kind == "READY":
        sys.stdout.write(rest if rest.strip() else "tokenpak started\n")
        return ExitStatus.OK
    if kind == "ERROR":
        report = json.loads(rest)
        sys.stderr.write(_format_error(report["message"], report.get("hint")) + "\n")
    else:  # killed before it could say anything
        sys.stderr.write(_format_error("the daemon exited before it was ready",
                                       "see %s" % log_file) + "\n")
    pid = _read_raw(pid_file)
    if pid and not _alive(pid):
        _remove(pid_file, pid)
    return ExitStatus.ERROR


def open_log(path: str) -> int:
    """An append-only fd on the log file, mode 0600. O_NOFOLLOW: a symlink planted at the
    path (a log directory another user can write) must not make tokenpak append to
    whatever file it points at."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise TokenpakError("refusing to write the log file %s: it is a symbolic link" % path,
                            hint="set proxy.log_file to a path in a directory only you can "
                                 "write") from None
    try:
        os.fchmod(fd, 0o600)  # an older log may have been created with a wider mode
    except OSError:
        pass
    return fd


def _redirect_stdio(log_file: str) -> None:
    """stdin from /dev/null; stdout and stderr (stray prints, tracebacks) to the log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o700, exist_ok=True)
    null = os.open(os.devnull, os.O_RDONLY)
    out = open_log(log_file)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def _daemon_main(pid_file, pid_fd, log_file, write_end, run):
    """The grandchild: become the daemon, run the server, report to the parent, exit."""
    code = ExitStatus.ERROR
    reported = []

    def report(line: str) -> None:
        if not reported:
            reported.append(line)
            try:
                os.write(write_end, line.encode("utf-8"))
                os.close(write_end)
            except OSError:
                pass  # the parent went away (killed); keep serving anyway

    def ready_cb(message=None):
        text = message or "tokenpak started (pid %d), logging to %s" % (os.getpid(), log_file)
        report("READY %s\n" % text.rstrip("\n").replace("\n", " "))

    try:
        os.chdir("/")
        os.umask(0o077)
        os.ftruncate(pid_fd, 0)
        os.pwrite(pid_fd, b"%d\n" % os.getpid(), 0)
        os.close(pid_fd)
        _redirect_stdio(log_file)
        code = run(ready_cb)
        code = ExitStatus.OK if code is None else int(code)
    except SystemExit as exc:  # sys.exit() inside run(): honour its code
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except TokenpakError as exc:
        report("ERROR %s\n" % json.dumps({"message": exc.message, "hint": exc.hint}))
        log.error("%s", exc.message)
    except BaseException as exc:  # the daemon's last word goes to the log and the parent
        traceback.print_exc()
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            text = "address already in use"
        report("ERROR %s\n" % json.dumps({"message": text, "hint": "see %s" % log_file}))
    finally:
        if not reported:  # returned without ever listening
            report("ERROR %s\n" % json.dumps({
                "message": "the server stopped before it was ready (exit %s)" % code,
                "hint": "see %s" % log_file}))
        _remove(pid_file, os.getpid())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --- stop and status ----------------------------------------------------------------------


def stop(pid_file: str, timeout: float = 30, health_url=None) -> int:
    """SIGTERM the daemon and wait for it to exit; prints what happened.

    Returns 0 when it stopped, 1 when it would not (timeout, no permission), 3 when it was
    not running (a stale pid file is removed). `timeout` should exceed the shutdown grace
    period. With `health_url`, a tokenpak that answers but has no pid file (started by
    systemd or in a terminal) is reported instead of being called "not running".
    """
    pid = read_pid(pid_file)
    if pid is None:
        if health_url and _health(health_url) is not None:
            sys.stderr.write(_format_error(
                "tokenpak at %s was not started with --daemon (no pid file %s)"
                % (_address(health_url), pid_file),
                "stop it where it was started, e.g. `systemctl --user stop tokenpak`") + "\n")
            return ExitStatus.ERROR
        sys.stdout.write("tokenpak is not running\n")
        return ExitStatus.NOT_RUNNING
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        sys.stderr.write(_format_error("not permitted to stop pid %d" % pid,
                                       "it runs as another user") + "\n")
        return ExitStatus.ERROR
    sys.stdout.write("stopping tokenpak (pid %d): waiting up to %g s for in-flight requests "
                     "and streams to finish...\n" % (pid, timeout))
    sys.stdout.flush()
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            sys.stderr.write(_format_error(
                "tokenpak (pid %d) did not exit within %g s" % (pid, timeout),
                "it may still be draining streams; `kill -KILL %d` ends it at once" % pid) + "\n")
            return ExitStatus.ERROR
        time.sleep(0.05)
    _remove(pid_file, pid)  # normally the daemon removed it itself
    sys.stdout.write("tokenpak stopped (pid %d)\n" % pid)
    return ExitStatus.OK


def _health(health_url: str):
    """GET /health as a dict, or None when nothing (or nothing sensible) answers."""
    try:
        with urllib.request.urlopen(health_url, timeout=HEALTH_TIMEOUT) as resp:
            body = json.loads(resp.read(65536).decode("utf-8"))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return body if isinstance(body, dict) and "status" in body else None


def _address(health_url: str) -> str:
    return health_url[: -len("/health")] if health_url.endswith("/health") else health_url


def _duration(seconds) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = ["%d%s" % (n, unit) for n, unit in parts if n] or ["0s"]
    return " ".join(shown[:2])


def status(pid_file: str, health_url: str):
    """(exit code, text) for `tokenpak status`: 0 running, 3 not running, 1 not answering.

    The pid file says whether the daemon runs; /health says whether it serves, and supplies
    version, uptime and request count. A tokenpak that answers without a pid file (under
    systemd, or `serve` in a terminal) counts as running.
    """
    pid = read_pid(pid_file)
    health = _health(health_url)
    if pid is None and health is None:
        return ExitStatus.NOT_RUNNING, "tokenpak is not running"
    if health is None:
        return ExitStatus.ERROR, (
            "tokenpak (pid %d) is running but does not answer at %s" % (pid, health_url))
    lines = ["tokenpak is running (%s)" % health.get("status", "?")]
    shown_pid = pid or health.get("pid")
    lines.append("  pid:      %s"
                 % (shown_pid or "unknown (no pid file: not started with --daemon)"))
    lines.append("  address:  %s" % _address(health_url))
    if health.get("accounting"):  # status "degraded": say what is lost
        lines.append("  problem:  %s" % health["accounting"])
    if "version" in health:
        lines.append("  version:  %s" % health["version"])
    if isinstance(health.get("uptime_s"), (int, float)):
        lines.append("  uptime:   %s" % _duration(health["uptime_s"]))
    if "requests" in health:
        lines.append("  requests: %s" % health["requests"])
    return ExitStatus.OK, "\n".join(lines)
