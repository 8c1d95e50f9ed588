"""Shared fixtures: a real fake-provider server and real tokenpak servers pointed at it.

Every test runs with HOME, the config file and the database in its own temporary folder and
with no TOKENPAK_* variables from the developer's environment, so no test reads or writes
~/.tokenpak.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fakeprovider import FakeProvider
from tokenpak import config as configmod
from tokenpak import proxy as proxymod

REPO = Path(__file__).resolve().parents[1]
# The API keys tests use. test_no_credentials greps every artefact for all of them.
OPENAI_KEY = "sk-test-openai-0123456789abcdefSECRET"
ANTHROPIC_KEY = "sk-ant-api03-test-anthropic-SECRET-0123456789"
GOOGLE_KEY = "AIzaTestGoogleKeySECRET0123456789"
ALL_KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GOOGLE_KEY)
# Every other credential a test sends; test_zz_credentials greps the artefacts for all.
OTHER_SECRETS = ("sk-test-another-key-0000", "sk-test-second", "sk-ant-oat01-test-oauth-token",
                 "local-secret-token", "sk-bad-unverified")


@pytest.fixture(scope="session", autouse=True)
def log_to_artefacts(tmp_path_factory):
    """Every tokenpak log record of the run goes to a file among the artefacts, so the
    credentials check at the end of the suite reads what any log line said."""
    import logging
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


class RunningProxy:
    """A tokenpak server running in this process on a free port."""

    def __init__(self, config):
        self.server = proxymod.create_server(config)
        self.app = self.server.app
        self.config = config
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def get(self, path, headers=None):
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


def proxy_settings(fake_url, tmp_path, **overrides):
    """Config overrides for a tokenpak pointed at the fake provider. Cache and footer are
    off unless a test turns them on, so forwarding tests see the provider's exact bytes."""
    settings = {
        "proxy.host": "127.0.0.1", "proxy.port": 0,
        "proxy.providers.openai.url": fake_url,
        "proxy.providers.anthropic.url": fake_url,
        "proxy.providers.google.url": fake_url + "/v1beta/openai",
        "proxy.read_timeout": 5, "proxy.connect_timeout": 2,
        "cache.enabled": False, "footer.enabled": False,
        "db.path": str(tmp_path / "state" / "tokenpak.db"),
    }
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return settings


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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url, timeout=10.0, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError("tokenpak exited with %s" % process.returncode)
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError("tokenpak did not become healthy at %s" % url)


def tokenpak_env(fake_url, home, **extra):
    """Environment for a tokenpak subprocess pointed at the fake provider."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPAK_")}
    env.update({
        "HOME": str(home), "PYTHONPATH": str(REPO),
        "TOKENPAK_CONFIG": str(Path(home) / ".tokenpak" / "config.json"),
        "TOKENPAK_DB": str(Path(home) / ".tokenpak" / "tokenpak.db"),
        "TOKENPAK_OPENAI_URL": fake_url, "TOKENPAK_ANTHROPIC_URL": fake_url,
        "TOKENPAK_GOOGLE_URL": fake_url + "/v1beta/openai",
    })
    env.update(extra)
    return env


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
