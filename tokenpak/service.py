"""`tokenpak service install|uninstall`: the per-user systemd unit.

The unit runs `tokenpak serve` in the foreground as `Type=notify` (systemd.py speaks the
protocol), sandboxed as far as a user manager allows without privileges, and is the same
text the Debian package ships as its user unit (tests/test_packaging.py compares them).
Installing never needs a running user manager: the file is written, and the text printed
says what to run once one answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tokenpak.errors import TokenpakError

UNIT_NAME = "tokenpak.service"
WATCHDOG_SEC = 30  # WatchdogSec= of the units we write and ship


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
        # SIGTERM to the main process only: with proxy.workers > 1 it drains its workers
        "KillMode=mixed\n"
        "ExecStart=%s\n"
        "%s"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        "WatchdogSec=%d\n"
        # the default 30 s shutdown grace period plus a margin to flush accounting
        "TimeoutStopSec=45\n"
        # room for thousands of streams, two descriptors each (setrlimit is filtered below)
        "LimitNOFILE=65536\n"
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
