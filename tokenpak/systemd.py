"""Talking to systemd without libsystemd: readiness, watchdog, socket activation, journald.

tokenpak runs under systemd as `Type=notify`: the service is "started" only when the proxy is
listening, because the main process says so over `$NOTIFY_SOCKET` (a datagram socket, often in
the abstract namespace, written as `@name`). The watchdog needs the same socket: systemd
restarts a service that stops saying `WATCHDOG=1` within `WatchdogSec`, so a wedged proxy is
replaced instead of silently refusing traffic. Socket activation hands us listening sockets as
fds 3.. (`LISTEN_FDS`), which lets `systemctl restart` refuse no connection. Each of these is a
few lines of protocol (see sd_notify(3), sd_listen_fds(3)); a C dependency would cost more than
it saves, and every function is a no-op when systemd is not there.

`install_user_unit()` writes the per-user unit behind `tokenpak service install`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from tokenpak.errors import TokenpakError

log = logging.getLogger("tokenpak")

UNIT_NAME = "tokenpak.service"
SD_LISTEN_FDS_START = 3  # the first inherited fd, as sd_listen_fds(3) defines it
WATCHDOG_SEC = 30  # WatchdogSec= of the units we write and ship


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


# --- the per-user unit behind `tokenpak service install` --------------------------------


def _quote_arg(arg: str, exec_line: bool = True) -> str:
    """Quote one ExecStart= (or Environment=) word by systemd's rules.

    `%` starts a specifier everywhere; `$` expands a variable only on Exec lines.
    """
    escaped = arg.replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    if escaped and not any(c in escaped for c in ' \t"\'\\;'):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def user_unit_text(exe_argv: list, environment: dict | None = None) -> str:
    """The text of the user unit that runs `<exe_argv> serve` in the foreground."""
    exec_start = " ".join(_quote_arg(a) for a in list(exe_argv) + ["serve"])
    env_lines = "".join("Environment=%s\n" % _quote_arg("%s=%s" % item, exec_line=False)
                        for item in sorted((environment or {}).items()))
    return (
        "# Written by `tokenpak service install`; `tokenpak service uninstall` removes it.\n"
        "[Unit]\n"
        "Description=tokenpak LLM API proxy (compression, cache, accounting)\n"
        "Documentation=man:tokenpak(1)\n"
        "\n"
        "[Service]\n"
        # notify: started means listening; tokenpak stays in the foreground (never --daemon)
        "Type=notify\n"
        "NotifyAccess=main\n"
        "ExecStart=%s\n"
        "%s"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "WatchdogSec=%d\n"
        # the default 30 s shutdown grace period plus a margin to flush accounting
        "TimeoutStopSec=45\n"
        # Sandboxing a user manager can apply without privileges or user namespaces (the
        # mount-namespace options need PrivateUsers=, unavailable on some kernels): files
        # private to the user, no privilege gain, only the syscalls and sockets a network
        # daemon uses. See SECURITY.md.
        "UMask=0077\n"
        "NoNewPrivileges=yes\n"
        "RestrictSUIDSGID=yes\n"
        "RestrictNamespaces=yes\n"
        "RestrictRealtime=yes\n"
        "LockPersonality=yes\n"
        "MemoryDenyWriteExecute=yes\n"
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n"
        "SystemCallArchitectures=native\n"
        "SystemCallFilter=@system-service\n"
        "SystemCallFilter=~@privileged @resources\n"
        "SystemCallErrorNumber=EPERM\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n" % (exec_start, env_lines, WATCHDOG_SEC)
    )


def _tokenpak_argv(exe: str | None):
    """How to start this very tokenpak: (argv, extra environment) for ExecStart=."""
    if exe:
        return [os.path.abspath(exe)], {}
    argv0 = sys.argv[0] if sys.argv else ""
    # `tokenpak ...` via its console script (also pipx's symlink: keep it, it survives upgrades)
    if os.path.basename(argv0).startswith("tokenpak") and os.path.isfile(argv0):
        return [os.path.abspath(argv0)], {}
    if os.path.basename(argv0) != "__main__.py":
        found = shutil.which("tokenpak")
        if found:
            return [os.path.abspath(found)], {}
    # `python -m tokenpak`: the same interpreter, and the same import path for a source checkout
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-m", "tokenpak"], {"PYTHONPATH": package_parent}


def _user_unit_dir(home: str | None) -> str:
    # the user manager reads $XDG_CONFIG_HOME/systemd/user, which defaults to ~/.config
    if home is None:
        base = (os.environ.get("XDG_CONFIG_HOME")
                or os.path.join(os.path.expanduser("~"), ".config"))
    else:
        base = os.path.join(home, ".config")
    return os.path.join(base, "systemd", "user")


def _systemctl_user(run, *args):
    """Run `systemctl --user ARGS`; returns (ok, one line of error text)."""
    try:  # a hung bus must not hang the CLI: give up after 30 s
        done = run(["systemctl", "--user"] + list(args), capture_output=True, text=True,
                   timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    err = (getattr(done, "stderr", "") or "").strip().splitlines()
    return done.returncode == 0, (err[0] if err else "exit status %d" % done.returncode)


def _require_systemd():
    # no systemctl at all: a unit file would be dead weight, so say so instead of writing one
    if shutil.which("systemctl") is None:
        raise TokenpakError(
            "systemd is not available here (no systemctl): there is no user service to install",
            hint="run `tokenpak serve --daemon` instead, or start `tokenpak serve` from your "
                 "own init system",
        )


def install_user_unit(home: str | None = None, exe: str | None = None, run=subprocess.run) -> str:
    """Write ~/.config/systemd/user/tokenpak.service and reload the user manager.

    Returns the text to print: where the unit went and the commands that start it. Raises
    TokenpakError when systemd is not installed at all. When systemctl exists but no user
    manager answers (a container, an ssh session without a login manager), the unit is still
    written and the text says what to run once a user manager is there.
    """
    _require_systemd()
    argv, environment = _tokenpak_argv(exe)
    unit_dir = _user_unit_dir(home)
    path = os.path.join(unit_dir, UNIT_NAME)
    tmp = path + ".tmp"
    try:
        os.makedirs(unit_dir, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(user_unit_text(argv, environment))
        os.replace(tmp, path)  # never leave a half-written unit behind
    except OSError as exc:
        raise TokenpakError("cannot write %s: %s" % (path, exc.strerror or exc),
                            hint="check the permissions of %s (or $XDG_CONFIG_HOME)"
                                 % unit_dir) from None
    reloaded, error = _systemctl_user(run, "daemon-reload")
    lines = ["Wrote %s" % path]
    if reloaded:
        lines.append("Reloaded the systemd user manager.")
    else:
        lines.append("The systemd user manager did not answer (%s);" % error)
        lines.append("run `systemctl --user daemon-reload` in a login session first.")
    lines += [
        "Start it now and at every login:",
        "  systemctl --user enable --now tokenpak",
        "Check it:",
        "  systemctl --user status tokenpak",
        "  journalctl --user -u tokenpak",
        "To keep it running while you are logged out: loginctl enable-linger",
    ]
    return "\n".join(lines) + "\n"


def uninstall_user_unit(home: str | None = None, run=subprocess.run) -> str:
    """Stop and disable the user service, remove its unit file, reload; returns text to print.

    Removing a unit that is not there is not an error (the text says so).
    """
    _require_systemd()
    unit_dir = _user_unit_dir(home)
    path = os.path.join(unit_dir, UNIT_NAME)
    if not os.path.exists(path):
        return "No user unit at %s: nothing to uninstall.\n" % path
    _systemctl_user(run, "disable", "--now", UNIT_NAME)
    # `disable` needs a user manager; remove the enablement links ourselves in case none answered
    for entry in os.listdir(unit_dir):
        link = os.path.join(unit_dir, entry, UNIT_NAME)
        if entry.endswith(".wants") and os.path.islink(link):
            os.unlink(link)
    os.unlink(path)
    reloaded, _ = _systemctl_user(run, "daemon-reload")
    return "Removed %s%s\n" % (path, "; reloaded the systemd user manager." if reloaded else ".")
