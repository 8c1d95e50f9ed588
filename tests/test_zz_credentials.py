"""No credential a client sends ever lands in an artefact tokenpak leaves behind.

The artefacts are every file under pytest's temporary directory: every tokenpak log record
of the run (conftest's log_to_artefacts, at debug level), the stdout and stderr of tokenpak
processes, daemon log files, config files, the sqlite databases with their WAL files, and
cache secrets.

The test is self-contained: it first sends every test credential through the paths where
one could leak (answers, streams, cache hits, the provider's 401/429/500, an upstream reset,
an unreachable upstream, tokenpak's own 401, a key in the query string), to a tokenpak in this
process and to a `tokenpak serve` process at log level debug, and then greps. In a full run
the same directory also holds what every other test left (this file runs last by name), so
the grep covers the whole suite as well.
"""

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import anthropic
import openai
import pytest

from helpers import (ALL_KEYS, GOOGLE_KEY, OTHER_SECRETS, REPO, anthropic_client, free_port, openai_client, raw_request, tokenpak_env,
                     wait_for, wait_healthy)

SECRETS = ALL_KEYS + OTHER_SECRETS
MESSAGES = [{"role": "user", "content": "keep my key secret"}]


def every_path(target, auth=None):
    """Send each credential through answers, streams, hits and errors of `target`."""
    headers = {"X-TokenPak-Auth": auth} if auth else {}
    oa = openai_client(target, default_headers=headers)
    for _ in range(2):  # the second is a cache hit where the cache is on
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        list(oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    with anthropic_client(target, default_headers=headers).messages.stream(
            model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES) as stream:
        list(stream.text_stream)
    oauth = anthropic.Anthropic(auth_token="sk-ant-oat01-test-oauth-token", max_retries=0,
                                base_url=target.url, default_headers=headers)
    oauth.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES)
    openai_client(target, key=GOOGLE_KEY, default_headers=headers).chat.completions.create(
        model="gemini-2.0-flash", messages=MESSAGES)
    for key in ("sk-bad-unverified", "sk-ant-bad-key"):  # the provider answers 401
        with pytest.raises(openai.AuthenticationError):
            openai_client(target, key=key, default_headers=headers).chat.completions.create(
                model="gpt-4o", messages=MESSAGES)
    # Provider errors and an upstream reset mid-stream (own prompts: never a cache hit)
    for scenario, error in (("429", openai.RateLimitError), ("500", openai.InternalServerError)):
        with pytest.raises(error):
            oa.chat.completions.create(model="gpt-4o", extra_headers={"x-fake": scenario},
                                       messages=[{"role": "user", "content": scenario}])
    with pytest.raises(openai.APIError):
        list(oa.chat.completions.create(model="gpt-4o", stream=True,
                                        extra_headers={"x-fake": "reset"},
                                        messages=[{"role": "user", "content": "a b c d e"}]))
    # Gemini clients may put the key in the URL.
    raw_request(target, "POST", "/v1beta/openai/chat/completions?key=" + GOOGLE_KEY,
                json.dumps({"model": "gemini-2.0-flash", "messages": MESSAGES}).encode(),
                dict(headers, Authorization="Bearer " + GOOGLE_KEY))


def in_process_traffic(make_proxy):
    """Cache, footer, debug logging and a client token on; plus an unreachable upstream."""
    proxy = make_proxy(cache__enabled=True, footer__enabled=True,
                       proxy__auth_token="local-secret-token")
    every_path(proxy, auth="local-secret-token")
    for wrong in ("sk-test-second", ""):  # tokenpak's own 401, a key sent as the token
        with pytest.raises(openai.AuthenticationError):
            openai_client(proxy, default_headers={"X-TokenPak-Auth": wrong}
                          ).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    closed = make_proxy(cache__enabled=True, proxy__providers__openai__url="http://127.0.0.1:%d"
                        % free_port())
    with pytest.raises(openai.APIStatusError):  # 502: nothing listens there
        openai_client(closed, key="sk-test-another-key-0000").chat.completions.create(
            model="gpt-4o", messages=MESSAGES)
    for running in (proxy, closed):
        assert wait_for(lambda: not running.app.active)
        running.app.recorder.flush()
        if running.app.runtime.cache.store is not None:
            running.app.runtime.cache.store.flush()
    return proxy


def process_traffic(fake, home, out_dir):
    """`tokenpak serve` as a process at log level debug; its stdout and stderr become
    artefacts, and so do `tokenpak stats` and `cache stats` on the same DB."""
    config = home / ".tokenpak" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"log": {"level": "debug"}}))
    port = free_port()
    env = tokenpak_env(fake.url, home)
    out, err = (out_dir / "serve.stdout").open("wb"), (out_dir / "serve.stderr").open("wb")
    with out, err:
        process = subprocess.Popen([sys.executable, "-m", "tokenpak", "serve", "--port",
                                    str(port)], env=env, cwd=str(REPO), stdout=out, stderr=err)
        try:
            target = SimpleNamespace(url="http://127.0.0.1:%d" % port, port=port)
            wait_healthy(target.url, process=process)
            every_path(target)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    assert process.returncode == 0
    for argv in (["stats"], ["cache", "stats"]):
        result = subprocess.run([sys.executable, "-m", "tokenpak"] + argv, env=env,
                                cwd=str(REPO), capture_output=True, timeout=60)
        name = "-".join(argv)
        (out_dir / (name + ".stdout")).write_bytes(result.stdout)
        (out_dir / (name + ".stderr")).write_bytes(result.stderr)


def leaks(base):
    """(files scanned, ["file: secret", ...]) for every regular file under `base`."""
    scanned, found = [], []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        scanned.append(path)
        found += ["%s: %s" % (path.relative_to(base), secret)
                  for secret in SECRETS if secret.encode() in data]
    return scanned, found


def test_no_credential_in_any_artefact(make_proxy, fake, isolated_env, tmp_path,
                                       tmp_path_factory, log_to_artefacts):
    proxy = in_process_traffic(make_proxy)
    process_traffic(fake, isolated_env, tmp_path)
    # What is grepped holds the traffic above: the proof the check reads real artefacts.
    log = log_to_artefacts.read_text()
    for line in ("/v1/chat/completions openai 200", "/v1/chat/completions anthropic 401",
                 "/v1/chat/completions openai 429", "/v1/chat/completions openai 502"):
        assert line in log
    assert b"/v1/messages anthropic 200" in (tmp_path / "serve.stderr").read_bytes()
    assert b"gpt-4o" in (tmp_path / "stats.stdout").read_bytes()
    scanned, found = leaks(tmp_path_factory.getbasetemp())
    names = {path.name for path in scanned}
    assert {"tokenpak-test.log", "serve.stderr", "tokenpak.db"} <= names
    assert proxy.app.db_path in {str(path) for path in scanned}
    assert found == []
