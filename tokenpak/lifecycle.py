"""The process around the HTTP server: config, logging, signals, reload, systemd, daemon.

`tokenpak serve` and `python -m tokenpak.proxy` both end up in `run()`, so every way of
starting tokenpak behaves the same. proxy.py serves HTTP and knows nothing of processes;
this module decides how the process lives:

- config: loaded once at start with the CLI flags as overrides, and again on SIGHUP with
  the same flags (a reload must not silently drop `--port`);
- logging, set up here for every mode: a rotating 0600 file for `--daemon`, `<prio>`-prefixed
  lines without timestamps when stderr is the journal, timestamped lines on a terminal;
- signals: SIGTERM or SIGINT stop accepting and let in-flight requests and streams finish
  (up to proxy.shutdown_grace_seconds); a second Ctrl-C exits at once; SIGHUP reloads;
- systemd (systemd.py speaks the protocol): READY=1 once listening, RELOADING=1 and READY=1
  around every reload, failed or not, STOPPING=1, watchdog pings while the accept loop runs,
  and a socket systemd already bound (socket activation);
- `--daemon` (daemon.py): fork, pid file, the parent waiting until the child listens;
- proxy.workers > 1 (workers.py): the same process becomes a supervisor of N forked
  workers, each of which runs `serve()` below on the shared socket.
"""

import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
import threading
import time

from tokenpak import __version__, daemon, doctor, runtime, systemd, tokens, workers
from tokenpak import config as configmod
from tokenpak.errors import TokenpakError
from tokenpak.providers import redact
from tokenpak.proxy import create_server
from tokenpak.proxy import _is_loopback as is_loopback

log = logging.getLogger("tokenpak")

# Open files wanted when the hard limit is unlimited: a stream holds two (client, upstream).
NOFILE_WANTED = 65536
LOG_MAX_BYTES = 10 * 1024 * 1024  # rotate the daemon's log at 10 MiB...
LOG_BACKUPS = 5  # ...keeping five old files
_JOURNAL_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# Libraries whose records may carry a credential (urllib3 logs a retried request's URL).
_LIBRARY_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.poolmanager")


def run(overrides, detach=False):
    """`tokenpak serve`: load the config, then serve in the foreground (a terminal, systemd)
    or as a daemon; returns the exit code. Raises TokenpakError before anything started."""
    raise_open_files_limit()
    config = configmod.load(overrides)
    level = config.get("log.level")
    doctor.check_db_path(config.get("db.path"))
    sockets = [] if detach else systemd.listen_sockets()
    listen_socket = sockets[0] if sockets else None
    host = listening_host(config, listen_socket)
    check_exposure(config, host)
    load = reloader(overrides, host)
    if not detach:
        setup_logging(None, level, journal=systemd.under_journal())
        if configmod.worker_count(config) > 1:
            warn_if_exposed(config, host)
            return workers.run(config, serve, reload=load, listen_socket=listen_socket)
        return serve(config, listen_socket=listen_socket, reload=load)
    log_file = config.get("proxy.log_file")
    pid_file = os.path.abspath(config.get("proxy.pid_file"))

    def run_daemon(ready):
        setup_logging(log_file, level, journal=False)

        def on_ready(address):
            # status and stop find the daemon where it listens, whatever the config says
            daemon.record_address(pid_file, daemon.base_url(*address[:2]))
            ready()
        if configmod.worker_count(config) > 1:
            warn_if_exposed(config, host)
            return workers.run(config, serve, reload=load, on_ready=on_ready)
        return serve(config, on_ready=lambda server: on_ready(server.server_address),
                     reload=load)

    return daemon.start(pid_file, log_file, run_daemon)


def reloader(overrides, host):
    """What SIGHUP loads: the config file again with the same CLI flags (a reload must not
    silently drop `--port`), refused as a whole if it would leave `host`, where we keep
    listening, without the token it needs (check_exposure)."""
    return lambda: check_exposure(configmod.load(overrides), host)


def listening_host(config, listen_socket=None):
    """The address tokenpak will listen on: the socket systemd passed, else proxy.host."""
    if listen_socket is not None and listen_socket.family in (socket.AF_INET, socket.AF_INET6):
        return listen_socket.getsockname()[0]
    return config.get("proxy.host") if listen_socket is None else "localhost"  # AF_UNIX


def check_exposure(config, host):
    """Refuse to listen beyond loopback without proxy.auth_token; returns `config`.

    Whoever reaches a tokenpak can spend through it (with their own key, or with none on a
    keyless route) and read /stats, /metrics and /dashboard: who spent what, on which
    models. So an address other than loopback needs the token, or the admin's explicit
    proxy.allow_remote_without_auth (then serve() warns). A host name other than
    "localhost" counts as beyond loopback: what it resolves to can change."""
    if is_loopback(host) or config.get("proxy.auth_token") \
            or config.get("proxy.allow_remote_without_auth"):
        return config
    raise TokenpakError(
        "refusing to listen on %s without proxy.auth_token: anyone who can reach it could "
        "send requests through it and read /stats, /metrics and /dashboard" % (host or "*"),
        hint="set a token (`tokenpak config set proxy.auth_token SECRET`; clients send it in "
             "X-TokenPak-Auth), listen on 127.0.0.1, or accept the exposure with "
             "`tokenpak config set proxy.allow_remote_without_auth true`")


def raise_open_files_limit():
    """Raise the soft limit on open files to the hard one, as a server holding thousands of
    streams needs (two descriptors each). The usual soft limit, 1024, would stop accepting
    at about 500 streams. Under systemd, LimitNOFILE= in the unit sets both limits and the
    syscall filter refuses setrlimit, so a refusal is quietly kept as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            pass


def serve(config, on_ready=None, listen_socket=None, reload=None, worker=False,
          on_reload=None):
    """Run the proxy in the foreground until SIGTERM/SIGINT; returns the exit code.

    `reload()` returns the config to apply on SIGHUP (None: SIGHUP keeps its default), and
    `on_reload()` is called once a reload is over, applied or refused. A `worker` of
    proxy.workers logs its start and stop at the debug level: the supervisor says it once
    for all of them."""
    check_exposure(config, listening_host(config, listen_socket))
    server = create_server(config, listen_socket)
    host, port = server.server_address[:2]
    announce = logging.DEBUG if worker else logging.INFO
    if not worker:
        warn_if_exposed(config, host)  # for workers, run() said it before they started
    if threading.current_thread() is threading.main_thread():
        install_signal_handlers(server, reload, announce, on_reload)
    log.log(announce, "tokenpak %s listening on http://%s:%d", __version__, host, port)
    if on_ready is not None:
        on_ready(server)
    systemd.ready("listening on %s:%d" % (host, port))
    # The tokenizer's ranks take 0.4-2 s to load; loaded here, off the request path, the
    # first requests do not wait for them (every request counts tokens for its row).
    threading.Thread(target=tokens.warm_up, name="tokenpak-tokenizer", daemon=True).start()
    watchdog = systemd.start_watchdog(lambda: time.monotonic() - server.last_loop < 10)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        systemd.stopping()
        server.server_close()
        grace = server.app.runtime.config.get("proxy.shutdown_grace_seconds")
        if not server.app.wait_idle(grace):
            log.warning("stopping with requests still in flight after %.0f s", grace)
        if watchdog is not None:
            watchdog.stop()
        server.app.close()
        log.log(announce, "tokenpak stopped")
    return 0


def warn_if_exposed(config, host):
    """Say so when the address is beyond loopback (check_exposure let it through)."""
    if not is_loopback(host):
        log.warning("listening on %s: anyone who can reach this address can use the proxy "
                    "and the cache%s", host, "" if config.get("proxy.auth_token")
                    else "; set proxy.auth_token to require a token")


def install_signal_handlers(server, reload, announce=logging.INFO, on_reload=None):
    stopping = []

    def stop(signum, frame):
        name = signal.Signals(signum).name
        if stopping:  # a second Ctrl-C: the user will not wait for the streams to drain
            log.warning("%s again: exiting now, without waiting for in-flight requests", name)
            logging.shutdown()
            os._exit(1)
        stopping.append(signum)
        log.log(announce, "%s: finishing in-flight requests, then stopping (press Ctrl-C "
                "again to exit at once)", name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    def hangup(signum, frame):
        threading.Thread(target=reload_config, args=(server, reload, on_reload),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if reload is not None:
        signal.signal(signal.SIGHUP, hangup)


def reload_config(server, load, done=None):
    """SIGHUP: apply the config file again; log what changed and what needs a restart.

    `server.app.reload(config)` applies it whole or raises TokenpakError and changes
    nothing. Whatever happens, systemd hears READY=1 again (after RELOADING=1 it would
    otherwise show the service as reloading for good), and `done()` is called: a worker
    tells its supervisor, which tells systemd once every worker has."""
    systemd.reloading()
    try:
        old, new = server.app.runtime.config, load()
        server.app.reload(new)
        log_changes(old, new)
    except TokenpakError as exc:
        log.error("reload failed, keeping the running settings: %s", exc.message)
    except Exception:  # a bug must not leave systemd waiting either
        log.exception("reload failed, keeping the running settings")
    finally:
        systemd.ready()
        if done is not None:
            done()


def log_changes(old, new):
    changed = runtime.changed(old, new)
    if not changed:
        log.info("reload: no setting changed")
    for name in changed:
        later = " (takes effect after a restart)" if name in runtime.RESTART_KEYS else ""
        shown = "***" if name == "proxy.auth_token" else runtime.value(new, name)
        log.info("reload: %s = %s%s", name, shown, later)


# --- logging ------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Redacts credentials from records of the libraries tokenpak calls: urllib3 logs the
    URL of a retried or failed request, query string included, so a Gemini `?key=` would
    reach stderr (and the journal) through it."""

    def filter(self, record):
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class _JournalFormatter(logging.Formatter):
    """`<priority>level: message`: journald reads the prefix and stamps the time itself."""

    def format(self, record):
        prio = _JOURNAL_PRIORITY.get(record.levelname, 6)
        return "<%d>%s" % (prio, super().format(record))


class _LogFile(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose file is opened with daemon.open_log (no symlinks, 0600)."""

    def _open(self):
        return os.fdopen(daemon.open_log(self.baseFilename), "a", encoding=self.encoding,
                         errors=self.errors)


def setup_logging(log_file, level: str, journal: bool) -> None:
    """Configure the "tokenpak" logger: rotating file (daemon), journald, or plain stderr.

    Safe to call again: it replaces the handlers it installed before."""
    logger = logging.getLogger("tokenpak")
    for handler in list(logger.handlers):
        if getattr(handler, "_tokenpak", False):
            logger.removeHandler(handler)
            handler.close()
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o700, exist_ok=True)
        handler = _LogFile(
            log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if journal:
            handler.setFormatter(_JournalFormatter("%(levelname)s: %(message)s"))
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler._tokenpak = True
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logger.propagate = False
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in library.filters):
            library.addFilter(RedactingFilter())
