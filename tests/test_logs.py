"""`tokenpak logs` against a real tokenpak with recorded traffic: the lines match the rows,
--json parses to the rows, the filters pick the rows they say, it never creates the
database, and `--follow` in its own process sees a request made after it started."""

import datetime
import json
import os
import select
import signal
import subprocess
import sys

import openai
import pytest

from helpers import (OPENAI_KEY, REPO, WAIT, accounting_rows, anthropic_client, openai_client,
                     raw_request, run_cli as run)
from tokenpak.stats import _money

MESSAGES = [{"role": "user", "content": "log this request"}]


@pytest.fixture
def traffic(make_proxy, fake, monkeypatch):
    """A tokenpak with five recorded requests of two tags and three models, a provider's 429
    and tokenpak's own 413; the CLI reads its database."""
    proxy = make_proxy(**{"proxy.max_request_bytes": 4096})
    monkeypatch.setenv("TOKENPAK_DB", proxy.app.db_path)
    tagged = openai_client(proxy, default_headers={"X-TokenPak-Tag": "proj-a"})
    # each row waited for before the next request, so the DB's order (which `logs` shows)
    # is the order they were sent in
    tagged.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    accounting_rows(proxy, 1)
    list(tagged.chat.completions.create(model="gpt-4o-2024-08-06", messages=MESSAGES, stream=True))
    accounting_rows(proxy, 2)
    anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=20,
                                            messages=MESSAGES,
                                            extra_headers={"X-TokenPak-Tag": "proj-b"})
    accounting_rows(proxy, 3)
    with pytest.raises(openai.RateLimitError):
        tagged.chat.completions.create(model="fake-429", messages=MESSAGES)
    accounting_rows(proxy, 4)
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", b"x" * 5000,
                              {"Authorization": "Bearer " + OPENAI_KEY})
    rows = accounting_rows(proxy, 5)
    assert [r["status"] for r in rows] == [200, 200, 200, 429, 413]
    assert rows[-1]["error"]
    return rows


def in_order(line, pieces):
    """Whether each piece occurs in `line`, each after the one before."""
    at = 0
    for piece in pieces:
        found = line.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def test_lines_show_the_recorded_requests_newest_last(traffic, capsys):
    status, out, err = run(capsys, "logs")
    assert status == 0 and err == ""
    header, *lines = out.splitlines()
    assert header.split() == ["time", "tag", "model", "status", "in", "out", "saved", "cost",
                              "cache", "latency", "error"]
    assert len(lines) == len(traffic)
    for row, line in zip(traffic, lines):
        when = datetime.datetime.fromtimestamp(row["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        prompt = row["input_tokens"] or 0
        pieces = [when, row["tag"] or "-", row["model"] or "-", str(row["status"])]
        if row["status"] == 200:
            pieces += ["{:,}".format(prompt + row["cache_read_tokens"] + row["cache_write_tokens"]),
                       "{:,}".format(row["output_tokens"])]
        pieces += [_money(row["cost_usd"]), row["cache"], "%.0f ms" % row["latency_ms"]]
        assert in_order(line, pieces), (line, pieces)
        if row["error"]:
            assert line.endswith(row["error"])  # tokenpak's own error text, last
    assert lines[-2].split()[2:5] == ["proj-a", "fake-429", "429"]
    # -n: the newest N, still newest last
    status, out, _ = run(capsys, "logs", "-n", "2")
    assert [line.split()[4] for line in out.splitlines()[1:]] == ["429", "413"]


def test_json_is_one_object_per_line_with_the_rows_figures(traffic, capsys):
    status, out, _ = run(capsys, "logs", "--json")
    assert status == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert len(objects) == len(traffic)
    for row, obj in zip(traffic, objects):
        for name in ("id", "ts", "tag", "key_id", "provider", "model", "status", "cache",
                     "input_tokens", "output_tokens", "cache_read_tokens", "cost_usd",
                     "saved_usd", "latency_ms", "error"):
            assert obj[name] == row[name], name
        assert datetime.datetime.fromisoformat(obj["time"]).timestamp() == pytest.approx(row["ts"])
        assert obj["streamed"] is bool(row["streamed"])
    assert [o["streamed"] for o in objects][:3] == [False, True, False]


@pytest.mark.parametrize("flags, expected", [
    (["--tag", "proj-b"], [2]),
    (["--tag", "proj-a"], [0, 1, 3]),  # not the 413: tokenpak refused it unread
    (["--tag", "nobody"], []),
    (["--model", "gpt-4o"], [0, 1]),            # a family takes its dated snapshots
    (["--model", "gpt-4o-2024-08-06"], [1]),
    (["--model", "claude-*"], [2]),
    (["--status", "429"], [3]),
    (["--status", "2xx"], [0, 1, 2]),
    (["--status", "4xx,5xx"], [3, 4]),
    (["--status", "413"], [4]),
    (["--status", "5xx"], []),
    (["--since", "1h"], [0, 1, 2, 3, 4]),
    (["--since", "2999-01-01"], []),
    (["--tag", "proj-a", "--status", "2xx", "--model", "gpt-4o"], [0, 1]),
])
def test_filters(traffic, capsys, flags, expected):
    status, out, _ = run(capsys, "logs", "--json", *flags)
    assert status == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [traffic[i]["id"] for i in expected]


@pytest.mark.parametrize("flags, words", [
    (["--status", "7xx"], "invalid --status value '7xx'"),
    (["--status", "abc"], "invalid --status value 'abc'"),
    (["-n", "-3"], "expected a whole number, 0 or more"),
    (["--since", "soon"], "invalid --since value 'soon'"),
])
def test_bad_flags_are_usage_errors(capsys, flags, words):
    status, out, err = run(capsys, "logs", *flags)
    assert status == 2 and out == ""
    assert words in err and "Traceback" not in err


def test_without_a_database_it_says_so_and_creates_nothing(capsys, isolated_env):
    db = isolated_env / ".tokenpak" / "tokenpak.db"
    status, out, _ = run(capsys, "logs")
    assert status == 0
    assert out.startswith("no accounting database at %s yet" % db)
    status, out, _ = run(capsys, "logs", "--json")
    assert status == 0 and out == ""
    assert not db.exists() and not db.parent.exists()


def test_client_chosen_text_is_escaped(make_proxy, fake, capsys, monkeypatch):
    proxy = make_proxy()
    monkeypatch.setenv("TOKENPAK_DB", proxy.app.db_path)
    openai_client(proxy).chat.completions.create(model="gpt-4o\x1b[31m\u202e", messages=MESSAGES)
    assert accounting_rows(proxy, 1)[0]["model"] == "gpt-4o\x1b[31m\u202e"
    status, out, _ = run(capsys, "logs")
    assert "gpt-4o\\x1b[31m\\u202e" in out
    assert "\x1b" not in out and "\u202e" not in out


def read_line(process):
    """The next line `process` prints (the wait only guards against a hang)."""
    ready, _, _ = select.select([process.stdout], [], [], WAIT * 2)
    assert ready, "no line from `tokenpak logs --follow`"
    return process.stdout.readline().decode()


def test_follow_sees_a_request_made_after_it_started(make_proxy, fake, tmp_path):
    """In its own process, started before the daemon has even made its database: it
    creates nothing, then prints the matching request made later, and only that one."""
    db = tmp_path / "later" / "tokenpak.db"
    env = dict(os.environ, TOKENPAK_DB=str(db), PYTHONPATH=str(REPO))
    follower = subprocess.Popen(
        [sys.executable, "-m", "tokenpak", "logs", "--follow", "--tag", "live"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    try:
        assert read_line(follower).split()[:3] == ["time", "tag", "model"]
        assert not db.exists()  # read-only: waiting for the database is not making it
        proxy = make_proxy(**{"db.path": str(db)})
        for tag in ("other", "live"):
            openai_client(proxy, default_headers={"X-TokenPak-Tag": tag}).chat.completions.create(
                model="gpt-4o", messages=MESSAGES)
        line = read_line(follower)
        assert line.split()[2:5] == ["live", "gpt-4o", "200"], line
        [row] = [r for r in accounting_rows(proxy, 2) if r["tag"] == "live"]
        assert _money(row["cost_usd"]) in line
    finally:
        follower.send_signal(signal.SIGINT)  # how a user ends it: Ctrl-C
        _, err = follower.communicate(timeout=WAIT)
    assert follower.returncode == 0
    assert b"Traceback" not in err


def test_follow_with_json_prints_parseable_lines(make_proxy, fake, monkeypatch):
    proxy = make_proxy()
    anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=20,
                                            messages=MESSAGES)
    accounting_rows(proxy, 1)
    env = dict(os.environ, TOKENPAK_DB=proxy.app.db_path, PYTHONPATH=str(REPO))
    follower = subprocess.Popen(
        [sys.executable, "-m", "tokenpak", "logs", "--follow", "--json", "-n", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    try:
        first = json.loads(read_line(follower))  # the last recorded one, then new ones
        assert first["model"] == "claude-sonnet-4-6"
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        second = json.loads(read_line(follower))
        assert second["model"] == "gpt-4o" and second["id"] > first["id"]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.communicate(timeout=WAIT)
    assert follower.returncode == 0
