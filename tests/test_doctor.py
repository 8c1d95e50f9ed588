"""`tokenpak doctor`: every check finds the problem it is for, says how to fix it, and the
exit status is 1 exactly when something failed. Upstreams are the fake provider (reachable)
or a closed local port (unreachable): no real provider is contacted."""

import json
import os
import socket

import pytest

from tokenpak import cli
from tokenpak.errors import ExitStatus

from conftest import free_port


@pytest.fixture
def healthy(fake, monkeypatch, isolated_env):
    """Everything fine: upstreams are the fake provider, the port is free."""
    for name in ("OPENAI", "ANTHROPIC"):
        monkeypatch.setenv("TOKENPAK_%s_URL" % name, fake.url)
    monkeypatch.setenv("TOKENPAK_GOOGLE_URL", fake.url + "/v1beta/openai")
    monkeypatch.setenv("TOKENPAK_PORT", str(free_port()))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_env / ".config"))
    return isolated_env


def doctor(capsys):
    status = cli.main(["doctor"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    return status, {line.split(":", 1)[0]: line for line in lines if ":" in line}, out


def test_all_well_exits_0(capsys, healthy):
    status, found, out = doctor(capsys)
    assert status == ExitStatus.OK, out
    for what in ("ok    config", "ok    database", "ok    port", "ok    upstream openai",
                 "ok    upstream anthropic", "ok    upstream google", "ok    service"):
        assert what in found, out
    assert out.rstrip().endswith("no problem found") or "warning" in out.splitlines()[-1]


def test_a_broken_config_is_a_finding_with_its_fix(capsys, healthy):
    path = os.environ["TOKENPAK_CONFIG"]
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        json.dump({"proxy": {"prot": 1}}, handle)
    status, found, out = doctor(capsys)
    assert status == ExitStatus.ERROR
    assert "unknown config key 'proxy.prot'" in found["fail  config"]
    assert "fix: `tokenpak config unset proxy.prot` removes it" in out


def test_an_unusable_db_path_fails(capsys, healthy, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TOKENPAK_DB", str(tmp_path / "file" / "tokenpak.db"))
    status, found, out = doctor(capsys)
    assert status == ExitStatus.ERROR
    assert "is a file, not a directory" in found["fail  database"]


def test_a_corrupt_database_is_a_warning_the_server_repairs(capsys, healthy, monkeypatch,
                                                           tmp_path):
    db = tmp_path / "tokenpak.db"
    db.write_bytes(b"garbage" * 100)
    monkeypatch.setenv("TOKENPAK_DB", str(db))
    status, found, out = doctor(capsys)
    assert status == ExitStatus.OK
    assert "warn  database" in found and "moves it aside" in out
    assert db.read_bytes() == b"garbage" * 100  # the doctor only looks


def test_a_port_taken_by_another_program_fails(capsys, healthy, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        monkeypatch.setenv("TOKENPAK_PORT", str(busy.getsockname()[1]))
        status, found, out = doctor(capsys)
    assert status == ExitStatus.ERROR
    assert "cannot listen on 127.0.0.1:" in found["fail  port"]
    assert "fix: stop what uses it" in out


def test_a_port_taken_by_tokenpak_itself_is_fine(capsys, healthy, monkeypatch, proxy):
    monkeypatch.setenv("TOKENPAK_PORT", str(proxy.port))
    status, found, out = doctor(capsys)
    assert status == ExitStatus.OK, out
    assert "answers at http://127.0.0.1:%d" % proxy.port in found["ok    port"]


def test_an_unreachable_upstream_is_a_warning(capsys, healthy, monkeypatch):
    closed = "http://127.0.0.1:%d" % free_port()
    monkeypatch.setenv("TOKENPAK_OPENAI_URL", closed)
    status, found, out = doctor(capsys)
    assert status == ExitStatus.OK
    assert found["warn  upstream openai"].startswith("warn  upstream openai: %s: " % closed)
    assert "proxy.providers.openai.url" in out


def test_a_user_unit_that_starts_a_missing_program_fails(capsys, healthy):
    unit = healthy / ".config" / "systemd" / "user" / "tokenpak.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/nonexistent/bin/tokenpak serve\n")
    status, found, out = doctor(capsys)
    assert status == ExitStatus.ERROR
    assert "/nonexistent/bin/tokenpak" in found["fail  service"]
    assert "fix: `tokenpak service install` rewrites the user unit" in out


@pytest.mark.parametrize("allowed, status, finding", [
    (False, ExitStatus.ERROR, "fail  config"), (True, ExitStatus.OK, "warn  config")])
def test_listening_beyond_loopback_without_a_token(capsys, healthy, monkeypatch,
                                                   allowed, status, finding):
    # `serve` refuses it (test_exposure.py) unless the admin allowed it: doctor says the same
    monkeypatch.setenv("TOKENPAK_HOST", "0.0.0.0")
    path = os.environ["TOKENPAK_CONFIG"]
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        json.dump({"proxy": {"allow_remote_without_auth": allowed}}, handle)
    got, found, out = doctor(capsys)
    assert got == status, out
    assert "proxy.host 0.0.0.0 exposes the proxy" in found[finding]
    assert ("refuses to start" in found[finding]) is not allowed
