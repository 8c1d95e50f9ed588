"""Talking to systemd without libsystemd: readiness, watchdog, socket activation, journald.

tokenpak runs under systemd as `Type=notify`: the service is "started" only when the proxy is
listening, because the main process says so over `$NOTIFY_SOCKET` (a datagram socket, often in
the abstract namespace, written as `@name`). The watchdog needs the same socket: systemd
restarts a service that stops saying `WATCHDOG=1` within `WatchdogSec`, so a wedged proxy is
replaced instead of silently refusing traffic. Socket activation hands us listening sockets as
fds 3.. (`LISTEN_FDS`), which lets `systemctl restart` refuse no connection. Each of these is a
few lines of protocol (see sd_notify(3), sd_listen_fds(3)); a C dependency would cost more than
it saves, and every function is a no-op when systemd is not there. Only the protocol lives
here: the unit `tokenpak service install` writes is service.py's.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("tokenpak")

SD_LISTEN_FDS_START = 3  # the first inherited fd, as sd_listen_fds(3) defines it


def notify(message: str) -> bool:
    """Send one sd_notify(3) datagram; True when it was sent, False when not under systemd.

    Never raises: a failing notification must not take the proxy down with it.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if len(address) < 2 or address[0] not in "/@":
        return False  # unset, or a transport we do not speak (vsock: needs systemd >= 253)
    if address[0] == "@":
        address = "\0" + address[1:]  # Linux abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message, exc)
        return False


def ready(status: str | None = None) -> bool:
    """Tell systemd the proxy is listening (call once the socket accepts connections)."""
    # MAINPID is redundant from the main process but makes a misplaced READY easy to spot
    lines = ["READY=1", "MAINPID=%d" % os.getpid()]
    if status:
        lines.append("STATUS=" + status.replace("\n", " "))
    return notify("\n".join(lines))


def stopping(status: str | None = None) -> bool:
    """Tell systemd a graceful shutdown has begun (in-flight requests are draining)."""
    return notify("STOPPING=1" + ("\nSTATUS=" + status if status else ""))


def reloading() -> bool:
    """Tell systemd a config reload (SIGHUP) has begun; call `ready()` again when it is done.

    MONOTONIC_USEC lets systemd >= 253 match this message to the reload it asked for
    (`Type=notify-reload`); older versions ignore the field.
    """
    usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
    return notify("RELOADING=1\nMONOTONIC_USEC=%d" % usec)


class _Watchdog(threading.Thread):
    """Pets the systemd watchdog every `interval` seconds while `healthy()` says so."""

    def __init__(self, interval, healthy):
        super().__init__(name="tokenpak-watchdog", daemon=True)
        self.interval = interval
        self.healthy = healthy
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval):
            try:
                ok = self.healthy()
            except Exception:  # a broken check means "not healthy", never a dead thread
                log.exception("watchdog health check raised")
                ok = False
            if ok:
                notify("WATCHDOG=1")
            else:
                log.warning("watchdog: health check failed, not notifying systemd")

    def stop(self):
        """Stop petting (at shutdown); the thread ends within one interval."""
        self._stop_event.set()


def start_watchdog(healthy=None):
    """Start the watchdog thread when systemd asked for one (`WatchdogSec=` sets WATCHDOG_USEC).

    `healthy` is a callable returning True while the server still serves (e.g. "the accept
    loop ran recently"); while it returns False the thread stops petting and systemd restarts
    the service after WatchdogSec. Returns the started thread (with a `stop()` method), or None
    when no watchdog is wanted for this process.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted_pid = os.environ.get("WATCHDOG_PID")
    if wanted_pid and wanted_pid != str(os.getpid()):
        return None  # the watchdog belongs to another process (we were forked or exec'd)
    thread = _Watchdog(usec / 2 / 1_000_000, healthy or (lambda: True))
    notify("WATCHDOG=1")  # the first ping at once: the interval restarts from now
    thread.start()
    return thread


def listen_sockets() -> list:
    """Return the sockets systemd passed us (socket activation), as socket.socket objects.

    Reads LISTEN_PID/LISTEN_FDS (LISTEN_FDNAMES is informative only: tokenpak listens on one
    kind of socket) and removes them from the environment, so a child process never believes
    they are its own. Returns [] when nothing was passed to this process.
    """
    env_pid = os.environ.pop("LISTEN_PID", None)
    env_fds = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if not env_fds:
        return []
    try:
        count = int(env_fds)
        if env_pid is not None and int(env_pid) != os.getpid():
            return []
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID/LISTEN_FDS")
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        # systemd passes them inheritable; nothing tokenpak spawns should hold them open
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))  # family and type are read from the fd
    return sockets


def under_journal() -> bool:
    """True when stderr is connected to journald (then log lines need no timestamps).

    systemd sets JOURNAL_STREAM=<device>:<inode> of the stream it connected; checking stderr
    against it avoids misfiring when the variable was merely inherited by a shell.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == device and st.st_ino == inode
