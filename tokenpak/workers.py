"""`proxy.workers` > 1: pre-forked worker processes sharing one listening socket.

One Python process serves on one core (the GIL), so an instance that must use every core
runs several processes, the way gunicorn and nginx do: the parent binds the socket (or
takes the one systemd activated), forks N workers that each run the ordinary threaded
server on it (the kernel hands each connection to one of them), and supervises:

- a worker that dies is replaced (its replacement gets the parent's current config);
- SIGTERM/SIGINT: the parent forwards SIGTERM, every worker drains as a single process
  does, and after proxy.shutdown_grace_seconds (plus a margin) the rest are killed;
- SIGHUP: the parent re-reads the config (a broken file is reported once, here) and
  forwards SIGHUP, so every worker reloads its own runtime snapshot;
- systemd hears only the parent (NotifyAccess=main): READY=1 once every worker said it
  listens (a line each on a pipe), RELOADING=1, then READY=1 once every worker said on
  the same pipe that it applied the reload (so `systemctl reload` returns when the next
  request gets the new settings, whichever worker takes it), STOPPING=1, and WATCHDOG=1
  from the supervising loop while it runs.

The parent never opens the database nor starts a thread before forking: each worker opens
its own sqlite connections and requests Session after the fork (a connection or a pool
shared across fork corrupts both). Workers are in their own process group, so a Ctrl-C on
the terminal reaches the parent alone, which then stops them in order; a worker whose
parent vanished (kill -9) drains and exits by itself.
"""

import errno
import json
import logging
import os
import select
import signal
import socket
import threading
import shutil
import tempfile
import time

from tokenpak import config as configmod, metrics, systemd
from tokenpak.proxy import ProxyServer
from tokenpak.errors import TokenpakError

log = logging.getLogger("tokenpak")

PUBLISH_SECONDS = 1.0  # how often a worker writes its /metrics figures for the others
KILL_MARGIN = 5.0  # seconds past the grace before a draining worker is killed
RELOAD_TIMEOUT = 10.0  # how long a reload waits for every worker to say it applied it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
START_TIMEOUT = 60.0  # every worker must listen within this after its fork
BACKLOG = ProxyServer.request_queue_size  # the same accept queue as one process


def bind(config):
    """The listening socket the workers share. Raises TokenpakError like create_server."""
    host, port = config.get("proxy.host"), config.get("proxy.port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        hint = "stop the other process or pick another port with --port" \
            if exc.errno == errno.EADDRINUSE else None
        raise TokenpakError("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc),
                            hint=hint)
    return sock


class Supervisor:
    """The parent: forks the workers, relays signals, replaces the dead, reports to systemd."""

    def __init__(self, config, sock, serve, reload):
        self.config = config
        self.sock = sock
        # every worker wakes for a new connection and one wins it; a blocking accept() would
        # leave the others stuck in it (and deaf to shutdown) until the next connection
        sock.setblocking(False)
        self.serve = serve  # lifecycle.serve: what a worker runs
        self.reload = reload
        self.count = configmod.worker_count(config)
        self.pids = set()
        self.ready = set()  # workers that said they listen (their pid, on the pipe)
        self.reloaded = set()  # workers that said they applied the last SIGHUP ("r<pid>")
        self.start_error = None  # (message, hint) from a worker that could not start
        self._partial = b""
        self.ready_r, self.ready_w = os.pipe()
        self.stop_signal = None
        self.hangup = False
        self.metrics_dir = _metrics_dir(config.get("db.path"))
        self.forced = False
        self.started = time.time()

    # -- workers ---------------------------------------------------------------------------
    def spawn(self):
        # Signals wait until the child has reset its handlers: a SIGTERM meant for the
        # parent's copy of them would be taken by the child and lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS + (signal.SIGHUP,))
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.pids.add(pid)
            return pid
        code = 1
        try:
            code = self._worker(mask)
        except TokenpakError as exc:
            log.error("worker %d: %s", os.getpid(), exc.message)
            self._tell_parent(exc)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def _tell_parent(self, exc):
        """A worker that cannot start says why on the ready pipe, so the parent fails with
        the worker's own message and hint, as one process would."""
        line = json.dumps({"message": exc.message, "hint": exc.hint})
        try:
            os.write(self.ready_w, b"!" + line.encode() + b"\n")
        except OSError:
            pass  # the parent is gone: the log line above says it

    def _worker(self, mask):
        """In the child: forget the parent's role, serve until SIGTERM, return the exit code."""
        os.setpgid(0, 0)  # a terminal's Ctrl-C is for the parent, which stops us in order
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)  # only the parent talks to systemd
        for signum in STOP_SIGNALS + (signal.SIGCHLD,):
            signal.signal(signum, signal.SIG_DFL)  # stopped before serving: just exit
        # A reload before serve() installs its handler: this worker was forked with the
        # parent's config of that moment; dying of it would only cost a replacement.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(self.ready_r)
        parent = os.getppid()
        ready_w = self.ready_w

        metrics_dir, started = self.metrics_dir, self.started

        def on_ready(server):
            if metrics_dir is not None:
                server.app.peers = Peers(metrics_dir, server.app, parent, started)
            os.write(ready_w, b"%d\n" % os.getpid())
            _watch_parent(parent)

        def on_reload():
            try:
                os.write(ready_w, b"r%d\n" % os.getpid())
            except OSError:
                pass  # the parent is gone; _watch_parent stops us

        return self.serve(self.config, on_ready=on_ready, listen_socket=self.sock,
                          reload=self.reload, worker=True, on_reload=on_reload)

    def reap(self):
        """Collect exited workers; returns the pids of ours that were lost."""
        lost = []
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.pids:
                self.pids.discard(pid)
                lost.append(pid)
                if self.metrics_dir is not None:  # its counters leave with it
                    for suffix in (".prom", ".json"):
                        _remove(os.path.join(self.metrics_dir, "%d%s" % (pid, suffix)))
                if self.stop_signal is None:
                    log.warning("worker %d exited (%s); starting another", pid,
                                _describe(status))
        return lost

    def _signal_all(self, signum):
        for pid in list(self.pids):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                self.pids.discard(pid)

    # -- the parent's loop ---------------------------------------------------------------
    def run(self, on_ready=None):
        """Start the workers, supervise until SIGTERM/SIGINT; returns the exit code."""
        self._install_signals()
        for _ in range(self.count):
            self.spawn()
        self._await_start()
        if self.stop_signal is None:  # else stopped while starting: drain what started
            host, port = self.sock.getsockname()[:2]
            log.info("%d workers listening on http://%s:%d", self.count, host, port)
            if on_ready is not None:
                on_ready((host, port))
            systemd.ready("%d workers listening on %s:%d" % (self.count, host, port))
        watchdog = _watchdog_interval()
        pinged = 0.0
        while self.stop_signal is None:
            select.select([self.ready_r], [], [], 0.5)  # a signal writes to the pipe
            self._read_ready(0)
            self._replace_lost()
            if self.hangup:
                self.hangup = False
                self._reload()
            if watchdog and time.monotonic() - pinged >= watchdog:
                pinged = time.monotonic()
                systemd.notify("WATCHDOG=1")
        return self._stop()

    def _await_start(self):
        """Wait until every worker listens, or a stop signal came; raise TokenpakError if
        one dies before it listened (a worker that cannot start would only die again once
        replaced)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.pids <= self.ready and self.stop_signal is None:
            lost = self.reap()
            failed = [pid for pid in lost if pid not in self.ready]
            self.ready.difference_update(lost)
            if failed or time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL)
                self._wait(5.0)
                if self.metrics_dir is not None:
                    shutil.rmtree(self.metrics_dir, ignore_errors=True)
                self._read_ready(0)  # the failed worker's reason, if it wrote one
                if self.start_error is not None:
                    raise TokenpakError(*self.start_error)
                raise TokenpakError("the workers did not all start",
                                    hint="see the log above, or run `tokenpak doctor`")
            while len(self.pids) < self.count:  # one died after it listened: replace it
                self.spawn()
            self._read_ready(0.2)

    def _read_ready(self, timeout):
        """Note the pids workers wrote on the pipe once listening."""
        if select.select([self.ready_r], [], [], timeout)[0]:
            data = self._partial + os.read(self.ready_r, 4096)
            *lines, self._partial = data.split(b"\n")
            for line in lines:
                if line.startswith(b"!"):
                    said = json.loads(line[1:])
                    self.start_error = (said["message"], said["hint"])
                elif line.startswith(b"r"):
                    self.reloaded.add(int(line[1:]))
                elif line:
                    self.ready.add(int(line))

    def _reload(self):
        systemd.reloading()
        try:
            self.config = self.reload()  # validated here: a broken file is reported once
            self.reloaded = set()
            self._signal_all(signal.SIGHUP)
            log.info("reload: sent to %d workers", len(self.pids))
            self._await_reload()
        except TokenpakError as exc:
            log.error("reload failed, keeping the running settings: %s", exc.message)
        except Exception:
            log.exception("reload failed, keeping the running settings")
        finally:
            systemd.ready()

    def _replace_lost(self):
        """Fork a new worker for each one that exited (none once stopping); returns the new
        workers' pids."""
        new = set()
        for pid in self.reap():
            self.ready.discard(pid)
            if self.stop_signal is None:
                new.add(self.spawn())
        return new

    def _await_reload(self):
        """Wait until every worker has applied the reload (or RELOAD_TIMEOUT passed). One
        that died meanwhile is replaced, and its replacement starts with the new config."""
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while not self.pids <= self.reloaded and time.monotonic() < deadline \
                and self.stop_signal is None:
            self._read_ready(0.1)
            self.reloaded |= self._replace_lost()
        missing = self.pids - self.reloaded
        if missing:
            log.warning("reload: %d of %d workers did not confirm within %.0f s",
                        len(missing), len(self.pids), RELOAD_TIMEOUT)

    def _stop(self):
        systemd.stopping()
        name = signal.Signals(self.stop_signal).name
        log.info("%s: finishing in-flight requests in %d workers, then stopping (press "
                 "Ctrl-C again to exit at once)", name, len(self.pids))
        self._signal_all(signal.SIGTERM)
        grace = float(self.config.get("proxy.shutdown_grace_seconds")) + KILL_MARGIN
        if not self._wait(grace):
            log.warning("workers still running after %.0f s: killing them", grace)
            self._signal_all(signal.SIGKILL)
            self._wait(5.0)
        self.sock.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("tokenpak stopped")
        return 1 if self.forced else 0

    def _wait(self, timeout):
        """Wait until every worker exited; False if `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        while self.pids and time.monotonic() < deadline and not self.forced:
            self.reap()
            time.sleep(0.05)
        self.reap()
        return not self.pids

    def _install_signals(self):
        """Handlers that set a flag and wake the supervising loop: its select() on the ready
        pipe is resumed after a handler returns (PEP 475), so without a byte on the pipe a
        SIGHUP or SIGTERM would wait for the select's timeout."""
        def wake():
            try:
                os.write(self.ready_w, b"\n")  # an empty line: _read_ready skips it
            except OSError:
                pass

        def stop(signum, frame):
            if self.stop_signal is not None:  # a second Ctrl-C: do not wait for the streams
                log.warning("%s again: exiting now, without waiting for in-flight requests",
                            signal.Signals(signum).name)
                self.forced = True
                self._signal_all(signal.SIGKILL)
                return
            self.stop_signal = signum
            wake()

        def hangup(signum, frame):
            self.hangup = True
            wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.reload is not None:
            signal.signal(signal.SIGHUP, hangup)


class Peers:
    """/metrics and /health for the whole instance: every worker writes its figures to
    `<dir>/<pid>.prom` (its exposition) and `<dir>/<pid>.json` (its /health counters) each
    PUBLISH_SECONDS, and the one that answers adds its own fresh figures to the others'.
    The others' figures are at most PUBLISH_SECONDS old; a worker that died takes its
    counters with it (the sum drops, which Prometheus reads as a counter reset)."""

    def __init__(self, directory, app, instance_pid, started):
        self.directory = directory
        self.app = app
        self.instance_pid = instance_pid  # the supervisor: what the pid file and systemd name
        self.started = started
        self.own = os.path.join(directory, "%d" % os.getpid())
        threading.Thread(target=self._publish, name="tokenpak-metrics-publish",
                         daemon=True).start()

    def _publish(self):
        while True:
            try:
                _write(self.own + ".prom", self.app.metrics_text())
                _write(self.own + ".json", json.dumps(self.app.counters()))
            except Exception as exc:  # a full disk must not take the worker down
                log.debug("metrics publish failed: %s", exc)
            time.sleep(PUBLISH_SECONDS)

    def _others(self, suffix):
        """The other live workers' published texts ending in `suffix`."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            names = []
        texts = []
        for name in names:
            path = os.path.join(self.directory, name)
            if name.endswith(suffix) and path != self.own + suffix:
                try:
                    with open(path, encoding="utf-8") as f:
                        texts.append(f.read())
                except OSError:
                    pass  # its worker exited and the parent removed it
        return texts

    def merged(self, own_text):
        return metrics.merge([own_text] + self._others(".prom"))

    def health(self, body):
        """`body` (this worker's /health) made the instance's: the supervisor's pid and
        start, every worker's requests added up, how many workers published lately."""
        workers = 1
        for text in self._others(".json"):
            try:
                counters = json.loads(text)
            except ValueError:
                continue  # caught mid-write by an older kernel's rename: skip this once
            workers += 1
            for name in ("requests", "in_flight"):
                body[name] = body.get(name, 0) + int(counters.get(name, 0))
        body.update(pid=self.instance_pid, workers=workers,
                    uptime_s=round(time.time() - self.started, 3))
        return body


def _write(path, text):
    """Replace `path` by `text` atomically: a reader sees the old figures or the new."""
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)


def _metrics_dir(db_path):
    """A private directory next to the database (writable wherever the database is, also
    under the units' ProtectSystem=strict) for the workers' /metrics files; None if it cannot
    be made: then each worker's /metrics shows its own figures only."""
    try:
        parent = os.path.dirname(os.path.abspath(db_path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=".tokenpak-metrics-", dir=parent)
    except OSError as exc:
        log.warning("/metrics will show one worker at a time: %s", exc)
        return None


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _watch_parent(parent):
    """A worker whose parent died (kill -9) drains and exits instead of serving unsupervised."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("worker %d: the supervising process is gone; stopping", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="tokenpak-parent-watch", daemon=True).start()


def _watchdog_interval():
    """Seconds between WATCHDOG=1 pings when systemd asked for them, else None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    wanted = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (wanted and wanted != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def _describe(status):
    if os.WIFSIGNALED(status):
        return "killed by %s" % signal.Signals(os.WTERMSIG(status)).name
    return "exit code %d" % os.WEXITSTATUS(status)


def run(config, serve, reload=None, listen_socket=None, on_ready=None):
    """Bind (unless systemd did), fork `proxy.workers` workers and supervise them."""
    sock = listen_socket if listen_socket is not None else bind(config)
    return Supervisor(config, sock, serve, reload).run(on_ready)
