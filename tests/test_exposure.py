"""tokenpak refuses to listen beyond loopback without proxy.auth_token (issue 14).

/stats, /metrics and /dashboard say who spent what on which models, and whoever reaches the
proxy can spend through it: on an address other than loopback, `serve` starts only with a
token, or with the admin's explicit proxy.allow_remote_without_auth (then it warns). Every
way of starting is checked — foreground, --daemon, pre-forked workers, a socket systemd
activated — and so is SIGHUP, which must not take the token away from a server that keeps
listening where it does.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from helpers import (ACTIVATE, REPO, config_file, free_port, proxy_settings, tokenpak_env,
                     wait_healthy)
from tokenpak import config as configmod
from tokenpak import lifecycle
from tokenpak.errors import TokenpakError

REFUSED = "tokenpak: error: refusing to listen on %s without proxy.auth_token"
FIX = "proxy.allow_remote_without_auth true"


def write_config(settings):
    path = config_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(settings, handle)


def run_tokenpak(fake, home, *args, **kw):
    return subprocess.run([sys.executable, "-m", "tokenpak"] + list(args),
                          env=tokenpak_env(fake.url, home), cwd=str(REPO),
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("how", [(), ("--daemon",), ("--workers", "2")],
                         ids=["foreground", "daemon", "workers"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "proxy.example.internal"])
def test_every_start_refuses_beyond_loopback_without_a_token(fake, isolated_env, how, host):
    result = run_tokenpak(fake, isolated_env, "serve", "--host", host,
                          "--port", str(free_port()), *how)
    assert result.returncode == 1, result.stderr
    assert REFUSED % host in result.stderr
    assert "proxy.auth_token SECRET" in result.stderr and FIX in result.stderr
    assert "Traceback" not in result.stderr
    # nothing was left behind: no daemon, no pid file
    assert not os.path.exists(isolated_env / ".tokenpak" / "tokenpak.pid")


def test_loopback_needs_no_token(spawn_tokenpak):
    process = spawn_tokenpak("serve", "--host", "127.0.0.1")
    assert wait_healthy(process.url)["status"] == "ok"


def test_a_token_lets_it_listen_beyond_loopback(spawn_tokenpak, fake, isolated_env):
    port = free_port()
    env = tokenpak_env(fake.url, isolated_env, TOKENPAK_AUTH_TOKEN="local-secret-token")
    process = spawn_tokenpak("serve", "--host", "0.0.0.0", "--port", str(port), env=env,
                             port=port)
    with pytest.raises(urllib.error.HTTPError) as caught:  # the token is now required
        urllib_get(process.url + "/stats")
    assert caught.value.code == 401
    process.terminate()
    _, err = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"listening on 0.0.0.0: anyone who can reach this address" in err
    assert b"local-secret-token" not in err


def test_the_admin_may_allow_it_explicitly(spawn_tokenpak, fake, isolated_env):
    write_config({"proxy": {"allow_remote_without_auth": True}})
    process = spawn_tokenpak("serve", "--host", "0.0.0.0")
    process.terminate()
    _, err = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"anyone who can reach this address can use the proxy and the cache; " \
           b"set proxy.auth_token to require a token" in err


def activated(fake, home, listener, *args):
    """`tokenpak ARGS` started the way systemd's socket activation starts it."""
    return subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(listener.fileno())] + list(args),
        pass_fds=(listener.fileno(),), env=tokenpak_env(fake.url, home), cwd=str(REPO),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_activated_socket_beyond_loopback_is_refused(fake, isolated_env):
    # The config says loopback; the socket systemd bound is what tokenpak would serve on.
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(8)
        process = activated(fake, isolated_env, listener, "serve", "--host", "127.0.0.1")
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert REFUSED % "0.0.0.0" in err and FIX in err


def test_an_activated_loopback_socket_wins_over_the_configured_host(fake, isolated_env):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        process = activated(fake, isolated_env, listener, "serve", "--host", "0.0.0.0")
        try:
            assert wait_healthy(url, process=process)["status"] == "ok"
        finally:
            process.terminate()
            _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err


def test_a_reload_cannot_take_the_token_away_beyond_loopback(make_proxy, caplog):
    proxy = make_proxy(proxy__host="0.0.0.0", proxy__auth_token="local-secret-token")
    write_config({"footer": {"enabled": True}})  # no token any more
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, lifecycle.reloader({}, "0.0.0.0"))
    assert "reload failed, keeping the running settings: refusing to listen on 0.0.0.0 " \
           "without proxy.auth_token" in caplog.text
    assert proxy.app.runtime.auth_token == "local-secret-token"
    assert proxy.app.runtime.footer is False  # nothing of the refused config was applied
    # On loopback the same reload is fine.
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, lifecycle.reloader({}, "127.0.0.1"))
    assert proxy.app.runtime.auth_token == "" and proxy.app.runtime.footer is True


def test_serve_itself_checks_the_address(fake, tmp_path):
    config = configmod.load(proxy_settings(fake.url, tmp_path, proxy__host="0.0.0.0"),
                            environ={}, path=str(tmp_path / "none.json"))
    with pytest.raises(TokenpakError) as caught:
        lifecycle.serve(config)
    assert "refusing to listen on 0.0.0.0" in caught.value.message
    assert FIX in caught.value.hint


def urllib_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()
