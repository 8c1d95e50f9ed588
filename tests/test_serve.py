"""`tokenpak serve` and `python -m tokenpak.proxy` as real processes."""

import signal
import subprocess
import sys

from helpers import OPENAI_KEY, REPO, free_port, openai_client, tokenpak_env, wait_healthy


def test_python_m_tokenpak_proxy_serves_and_exits_cleanly_on_ctrl_c(fake, isolated_env):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tokenpak.proxy", "--port", str(port)],
                               env=tokenpak_env(fake.url, isolated_env), cwd=str(REPO),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = "http://127.0.0.1:%d" % port
        assert wait_healthy(url, process=process)["status"] == "ok"
        client = openai_client(url)
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "via subprocess"}])
        # Defaults, no config: the answer carries the stats footer after a blank line.
        text, line = answer.choices[0].message.content.split("\n\n")
        assert text == "Echo: via subprocess"
        assert line.startswith("[tokenpak] ") and "cache miss" in line
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    err = err.decode()
    assert "Traceback" not in err
    assert "listening on http://127.0.0.1:%d" % port in err
    assert "POST /v1/chat/completions openai 200" in err
    assert OPENAI_KEY not in err + out.decode()


def test_binding_beyond_loopback_warns(spawn_tokenpak, fake, isolated_env):
    # allowed explicitly (without it tokenpak refuses: test_exposure.py)
    env = tokenpak_env(fake.url, isolated_env)
    config = isolated_env / ".tokenpak" / "config.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text('{"proxy": {"allow_remote_without_auth": true}}')
    process = spawn_tokenpak("serve", "--host", "0.0.0.0", env=env)
    process.terminate()
    _, err = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"listening on 0.0.0.0" in err
    assert b"set proxy.auth_token" in err


def test_port_in_use_is_one_clear_error(spawn_tokenpak, fake, isolated_env):
    first = spawn_tokenpak("serve")
    port = first.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "tokenpak", "serve", "--port", port],
                            env=tokenpak_env(fake.url, isolated_env), cwd=str(REPO),
                            capture_output=True, timeout=30)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "tokenpak: error: cannot listen on 127.0.0.1:%s" % port in err
    assert "Traceback" not in err


def test_mode_flag_sets_compression_level():
    from tokenpak import cli
    args = cli.build_parser().parse_args(["serve", "--mode", "strict", "--port", "1"])
    assert cli.serve_overrides(args) == {"compression.level": "strict", "proxy.port": 1}


def test_version(fake, isolated_env):
    """`tokenpak --version` as a user runs it: the version on stdout and exit status 0,
    whether the CLI exits through argparse or returns from main()."""
    from tokenpak import __version__
    result = subprocess.run([sys.executable, "-m", "tokenpak", "--version"],
                            env=tokenpak_env(fake.url, isolated_env), cwd=str(REPO),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "tokenpak " + __version__
    assert result.stderr == b""
