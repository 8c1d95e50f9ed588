"""Shared fixtures: a real fake-provider server and real tokenpak servers pointed at it.

Every test runs with HOME, the config file and the database in its own temporary folder and
with no TOKENPAK_* variables from the developer's environment, so no test reads or writes
~/.tokenpak.

Only fixtures live here; what tests import by name is in helpers.py.
"""

import logging
import os
import socket
import subprocess
import sys

import pytest

from fakeprovider import FakeProvider
from helpers import REPO, RunningProxy, free_port, proxy_settings, tokenpak_env, wait_healthy
from tokenpak import config as configmod


@pytest.fixture(scope="session", autouse=True)
def log_to_artefacts(tmp_path_factory):
    """Every tokenpak log record of the run goes to a file among the artefacts, so the
    credentials check at the end of the suite reads what any log line said."""
    path = tmp_path_factory.getbasetemp() / "tokenpak-test.log"
    handler = logging.FileHandler(str(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("tokenpak")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield path
    logger.removeHandler(handler)
    handler.close()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("TOKENPAK_") or name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                                                    "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TOKENPAK_CONFIG", str(home / ".tokenpak" / "config.json"))
    monkeypatch.setenv("TOKENPAK_DB", str(home / ".tokenpak" / "tokenpak.db"))
    return home


@pytest.fixture(scope="session")
def fake_server():
    server = FakeProvider().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    fake_server.reset_state()
    return fake_server


@pytest.fixture
def make_proxy(fake, tmp_path):
    started = []

    def start(**overrides):
        settings = proxy_settings(fake.url, tmp_path, **overrides)
        config = configmod.load(settings, environ={}, path=str(tmp_path / "none.json"))
        running = RunningProxy(config)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket standing in for systemd's; NOTIFY_SOCKET points at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


@pytest.fixture
def spawn_tokenpak(fake, isolated_env):
    """Start `python -m tokenpak ...` as a real process; stopped at teardown."""
    processes = []

    def spawn(*args, env=None, wait=True, port=None):
        port = port or free_port()
        argv = [sys.executable, "-m", "tokenpak"] + list(args or ("serve",))
        if "serve" in argv and "--port" not in argv:
            argv += ["--port", str(port)]
        process = subprocess.Popen(argv, env=env or tokenpak_env(fake.url, isolated_env),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
        processes.append(process)
        process.url = "http://127.0.0.1:%d" % port
        if wait:
            wait_healthy(process.url, process=process)
        return process

    yield spawn
    for i, process in enumerate(processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        # Keep what it printed among the artefacts the credentials check greps.
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr)):
            if stream:
                try:
                    data = stream.read() if not stream.closed else b""
                except ValueError:
                    data = b""
                (isolated_env.parent / ("tokenpak-%d.%s" % (i, name))).write_bytes(data)
                stream.close()
