"""tokenpak.systemd against the real protocols: datagrams on a socket the test binds, a
listening socket really inherited as fd 3, unit files that systemd-analyze accepts."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid

import pytest

from tokenpak import service, systemd
from tokenpak.errors import TokenpakError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN_PAGE = os.path.join(REPO, "man", "tokenpak.1")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def _fields(datagram):
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_stopping_reloading(notify_socket):
    assert systemd.ready("listening on 127.0.0.1:8766")
    fields = _fields(notify_socket.recv(4096))
    assert fields["READY"] == "1"
    assert fields["MAINPID"] == str(os.getpid())
    assert fields["STATUS"] == "listening on 127.0.0.1:8766"
    assert systemd.stopping()
    assert _fields(notify_socket.recv(4096)) == {"STOPPING": "1"}
    assert systemd.reloading()
    fields = _fields(notify_socket.recv(4096))
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0


def test_abstract_namespace_socket(monkeypatch):
    name = "tokenpak-test-%s" % uuid.uuid4().hex
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "@", "/nonexistent/notify"])
def test_notify_without_systemd_is_false_and_quiet(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False


def test_watchdog_pets_while_healthy(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    thread = systemd.start_watchdog(lambda: True)
    try:
        assert thread is not None and thread.daemon
        pets = [notify_socket.recv(4096) for _ in range(3)]  # the first at once, then periodic
        assert pets == [b"WATCHDOG=1"] * 3
    finally:
        thread.stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("check", ["false", "raises"])
def test_watchdog_stops_petting_when_unhealthy(notify_socket, monkeypatch, check):
    import threading
    calls = []
    checked = threading.Event()

    def healthy():
        calls.append(1)
        if len(calls) >= 3:
            checked.set()
        if check == "raises":
            raise RuntimeError("wedged")
        return False

    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    thread = systemd.start_watchdog(healthy)
    try:
        assert notify_socket.recv(4096) == b"WATCHDOG=1"  # the initial ping
        assert checked.wait(10)
        notify_socket.setblocking(False)
        with pytest.raises(BlockingIOError):  # three failed checks, not one ping more
            notify_socket.recv(4096)
    finally:
        thread.stop()
        thread.join(10)


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "junk"},
                                 {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}])
def test_no_watchdog_when_not_asked(monkeypatch, env):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert systemd.start_watchdog(lambda: True) is None


CHILD = r"""
import json, os, sys
from tokenpak import systemd
socks = systemd.listen_sockets()
left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps({"count": len(socks), "fd": socks[0].fileno() if socks else None,
                  "family": int(socks[0].family) if socks else None,
                  "inheritable": os.get_inheritable(3) if socks else None, "left": left}),
      flush=True)
if socks:
    conn, _ = socks[0].accept()
    conn.sendall(b"served by the activated child")
    conn.close()
"""


LAUNCHER = r"""
import os, sys
fd, pid, child = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.dup2(fd, 3)  # as systemd does: the sockets from fd 3 on, LISTEN_PID = the pid that execs
os.close(fd)
os.environ.update(LISTEN_PID=pid or str(os.getpid()), LISTEN_FDS="1",
                  LISTEN_FDNAMES="tokenpak.socket")
os.execv(sys.executable, [sys.executable, "-c", child])
"""


def _activated_child(listener, listen_pid=""):
    """Start CHILD with `listener` as fd 3 and LISTEN_PID=<its own pid> (or `listen_pid`)."""
    fd = listener.fileno()
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(fd), listen_pid, CHILD],
                            pass_fds=(fd,), stdout=subprocess.PIPE, env=env, text=True)


def test_listen_sockets_takes_the_inherited_socket():
    import json
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        child = _activated_child(listener)
        try:
            report = json.loads(child.stdout.readline())
            assert report == {"count": 1, "fd": 3, "family": int(socket.AF_INET),
                              "inheritable": False, "left": []}
            with socket.create_connection(listener.getsockname(), timeout=10) as conn:
                conn.settimeout(10)
                assert conn.recv(100) == b"served by the activated child"
        finally:
            child.stdout.close()
            assert child.wait(10) == 0


def test_listen_sockets_ignores_fds_meant_for_another_pid():
    import json
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        child = _activated_child(listener, listen_pid="1")
        report = json.loads(child.stdout.readline())
        child.stdout.close()
        assert child.wait(10) == 0
    assert report["count"] == 0 and report["left"] == []


def test_listen_sockets_without_activation(monkeypatch):
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert systemd.listen_sockets() == []


def test_under_journal_matches_stderr(tmp_path, monkeypatch):
    stream = open(tmp_path / "stderr", "w")
    try:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino))
        assert systemd.under_journal()
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino + 1))
        assert not systemd.under_journal()  # inherited by a shell whose stderr is elsewhere
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not systemd.under_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not systemd.under_journal()
    finally:
        stream.close()


# --- tokenpak service install / uninstall -------------------------------------------------


class FakeRun:
    """Records the commands install/uninstall run; answers like a user manager would."""

    def __init__(self, returncode=0, stderr=""):
        self.calls = []
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(argv, self.returncode, "", self.stderr)


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A PATH on which `systemctl` exists (the fake `run` answers instead of it)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "systemctl"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ.get("PATH", "")))
    return tool


def _stub_tokenpak(directory, name="tokenpak"):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o755)
    return path


def _unit_path(home):
    return os.path.join(home, ".config", "systemd", "user", "tokenpak.service")


def _directives(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_install_writes_the_unit_and_reloads(tmp_path, fake_systemctl):
    home = str(tmp_path / "home")
    exe = _stub_tokenpak(str(tmp_path / "venv" / "bin"))
    run = FakeRun()
    text = service.install_user_unit(home=home, exe=exe, run=run)
    unit = open(_unit_path(home)).read()
    assert "ExecStart=%s serve" % exe in _directives(unit)
    for line in ("Type=notify", "Restart=on-failure", "WantedBy=default.target",
                 "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30"):
        assert line in _directives(unit)
    assert "--daemon" not in unit
    assert run.calls == [["systemctl", "--user", "daemon-reload"]]
    assert _unit_path(home) in text
    assert "systemctl --user enable --now tokenpak" in text


def test_install_without_a_user_manager_still_writes_and_says_so(tmp_path, fake_systemctl):
    home = str(tmp_path / "home")
    run = FakeRun(1, "Failed to connect to bus: No medium found\n")
    text = service.install_user_unit(home=home, exe=_stub_tokenpak(str(tmp_path)), run=run)
    assert os.path.exists(_unit_path(home))
    assert "Failed to connect to bus" in text
    assert "systemctl --user daemon-reload" in text


def test_install_without_systemd_refuses_plainly(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    run = FakeRun()
    with pytest.raises(TokenpakError) as err:
        service.install_user_unit(home=str(tmp_path / "home"), exe="/usr/bin/tokenpak", run=run)
    assert "systemd is not available" in err.value.message
    assert "--daemon" in err.value.hint
    assert run.calls == [] and not os.path.exists(_unit_path(str(tmp_path / "home")))


def test_install_finds_this_tokenpak(tmp_path, fake_systemctl, monkeypatch):
    script = _stub_tokenpak(str(tmp_path / "pipx" / "bin"))
    monkeypatch.setattr(sys, "argv", [script, "service", "install"])
    service.install_user_unit(home=str(tmp_path / "h1"), run=FakeRun())
    assert "ExecStart=%s serve" % script in open(_unit_path(str(tmp_path / "h1"))).read()
    # `python -m tokenpak`: the same interpreter, importing this very package
    monkeypatch.setattr(sys, "argv", [os.path.join(REPO, "tokenpak", "__main__.py")])
    service.install_user_unit(home=str(tmp_path / "h2"), run=FakeRun())
    unit = _directives(open(_unit_path(str(tmp_path / "h2"))).read())
    assert "ExecStart=%s -m tokenpak serve" % sys.executable in unit
    assert "Environment=PYTHONPATH=%s" % REPO in unit


def test_exec_start_quoting():
    text = service.user_unit_text(["/opt/my tools/tokenpak"], {"X": "100%"})
    assert 'ExecStart="/opt/my tools/tokenpak" serve' in text
    assert "Environment=X=100%%" in text
    assert "ExecStart=/a$$b serve" in service.user_unit_text(["/a$b"])


def _verify_user_unit(path, tmp_path):
    """`systemd-analyze --user verify` with the man page findable; returns its output."""
    mandir = tmp_path / "man" / "man1"
    mandir.mkdir(parents=True, exist_ok=True)
    shutil.copy(MAN_PAGE, mandir / "tokenpak.1")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), MANPATH=str(tmp_path / "man"),
               SYSTEMD_LOG_LEVEL="notice")
    if shutil.which("man") is None:  # verify looks Documentation=man: pages up with man(1)
        with open(path) as f:
            text = "".join(line for line in f if not line.startswith("Documentation="))
        path = str(tmp_path / "no-man" / os.path.basename(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    done = subprocess.run(["systemd-analyze", "--user", "verify", path], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


@needs_analyze
def test_installed_unit_passes_systemd_analyze_verify(tmp_path, fake_systemctl):
    home = str(tmp_path / "home")
    exe = _stub_tokenpak(str(tmp_path / "with space" / "bin"))
    service.install_user_unit(home=home, exe=exe, run=FakeRun())
    code, output = _verify_user_unit(_unit_path(home), tmp_path)
    assert (code, output) == (0, "")


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a unit with a typo'd directive produces output."""
    exe = _stub_tokenpak(str(tmp_path / "bin"))
    broken = service.user_unit_text([exe]).replace("Restart=", "Restrat=")
    path = tmp_path / "tokenpak.service"
    path.write_text(broken)
    code, output = _verify_user_unit(str(path), tmp_path)
    assert "Restrat" in output


def test_uninstall_removes_unit_and_enablement(tmp_path, fake_systemctl):
    home = str(tmp_path / "home")
    service.install_user_unit(home=home, exe=_stub_tokenpak(str(tmp_path)), run=FakeRun())
    wants = os.path.join(os.path.dirname(_unit_path(home)), "default.target.wants")
    os.makedirs(wants)
    os.symlink(_unit_path(home), os.path.join(wants, "tokenpak.service"))
    run = FakeRun(1, "Failed to connect to bus")  # no user manager: the links go anyway
    text = service.uninstall_user_unit(home=home, run=run)
    assert not os.path.exists(_unit_path(home))
    assert not os.path.lexists(os.path.join(wants, "tokenpak.service"))
    assert ["systemctl", "--user", "disable", "--now", "tokenpak.service"] in run.calls
    assert "Removed %s" % _unit_path(home) in text
    again = service.uninstall_user_unit(home=home, run=FakeRun())
    assert "nothing to uninstall" in again


def test_unit_file_is_written_whole(tmp_path, fake_systemctl):
    home = str(tmp_path / "home")
    service.install_user_unit(home=home, exe=_stub_tokenpak(str(tmp_path)), run=FakeRun())
    unit_dir = os.path.dirname(_unit_path(home))
    assert os.listdir(unit_dir) == ["tokenpak.service"]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(_unit_path(home)).st_mode) & 0o022 == 0
