"""Who spent what: the X-TokenPak-Tag header and the per-credential key id, through a real
tokenpak and the real SDKs, and the schema 3 migration that added the `tag` column."""

import json
import re
import sqlite3
import time

import anthropic
import openai
import pytest

from helpers import (ANTHROPIC_KEY, OPENAI_KEY, accounting_rows, anthropic_client,
                     openai_client, raw_request)
from tokenpak import accounting, cli, pricing, stats
from tokenpak.accounting import Recorder
from tokenpak.cache import load_secret, scope_id

MESSAGES = [{"role": "user", "content": "who pays for this"}]
OTHER_KEY = "sk-test-second"  # in helpers.OTHER_SECRETS: the credentials check looks for it


def tagged_headers(fake):
    """Every X-TokenPak-Tag header the fake provider received, over all requests."""
    return [(n, v) for r in fake.requests for n, v in r.headers if n.lower() == "x-tokenpak-tag"]


def test_tag_is_recorded_and_never_forwarded(proxy, fake):
    """A tag sent by each SDK's own ways (default_headers, extra_headers) lands in the row
    and never reaches the provider."""
    client = openai_client(proxy, default_headers={"X-TokenPak-Tag": "project-a"})
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    anthropic_client(proxy).messages.create(
        model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES,
        extra_headers={"X-TokenPak-Tag": "project-b"})
    openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    rows = accounting_rows(proxy, 4)
    assert [r["tag"] for r in rows] == ["project-a", "project-a", "project-b", None]
    assert fake.count() == 4 and tagged_headers(fake) == []


def test_tag_is_not_forwarded_on_a_pass_through_route_either(make_proxy, fake):
    """A body tokenpak does not parse, to an upstream it knows nothing about: the tag is
    still recorded and still dropped."""
    proxy = make_proxy(proxy__passthrough_url=fake.url + "/up")
    response, _ = raw_request(proxy, "POST", "/anything", b"\x00binary",
                              {"X-TokenPak-Tag": "batch-job", "X-Other": "kept"})
    assert response.status == 200
    assert fake.last().path == "/up/anything" and tagged_headers(fake) == []
    assert fake.last().header("X-Other") == "kept"
    assert accounting_rows(proxy, 1)[0]["tag"] == "batch-job"


def test_tag_is_cut_to_64_characters_and_reads_utf8(proxy, fake):
    raw_request(proxy, "POST", "/v1/chat/completions",
                json.dumps({"model": "gpt-4o", "messages": MESSAGES}),
                {"Authorization": "Bearer " + OPENAI_KEY, "X-TokenPak-Tag": "\t  spaced out \t"})
    raw_request(proxy, "POST", "/v1/chat/completions",
                json.dumps({"model": "gpt-4o", "messages": MESSAGES}),
                {"Authorization": "Bearer " + OPENAI_KEY, "Content-Type": "application/json",
                 "X-TokenPak-Tag": "x" * 100})
    raw_request(proxy, "POST", "/v1/chat/completions",
                json.dumps({"model": "gpt-4o", "messages": MESSAGES}),
                {"Authorization": "Bearer " + OPENAI_KEY, "Content-Type": "application/json",
                 "X-TokenPak-Tag": "caf\u00e9".encode("utf-8").decode("latin-1")})
    rows = accounting_rows(proxy, 3)
    assert [r["tag"] for r in rows] == ["spaced out", "x" * 64, "caf\u00e9"]


# HTTP framing already refuses most control characters in any header (400 before
# routing); a tab and the C1 controls (CSI, 0x9b, starts a terminal escape) reach the tag.
@pytest.mark.parametrize("path,key_header,api,tag", [
    ("/v1/chat/completions", ("Authorization", "Bearer " + OPENAI_KEY), "openai", "a\tb"),
    ("/v1/messages", ("x-api-key", ANTHROPIC_KEY), "anthropic", "\x9b31mred"),
])
def test_tag_with_control_characters_is_refused_in_the_provider_shape(proxy, fake, path,
                                                                      key_header, api, tag):
    body = {"model": "gpt-4o" if api == "openai" else "claude-sonnet-4-6",
            "max_tokens": 20, "messages": MESSAGES}
    response, data = raw_request(proxy, "POST", path, json.dumps(body),
                                 {key_header[0]: key_header[1], "X-TokenPak-Tag": tag,
                                  "Content-Type": "application/json"})
    assert response.status == 400
    error = json.loads(data)
    if api == "anthropic":
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert "X-TokenPak-Tag" in error["error"]["message"]
    else:
        assert error["error"]["type"] == "invalid_request_error"
        assert "X-TokenPak-Tag" in error["error"]["message"]
    assert fake.count() == 0
    assert accounting_rows(proxy, 1)[0]["status"] == 400


def test_sdk_sees_the_refusal_as_a_bad_request(proxy, fake):
    client = openai_client(proxy, default_headers={"X-TokenPak-Tag": "tab\there"})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "X-TokenPak-Tag" in str(info.value)
    client = anthropic_client(proxy, default_headers={"X-TokenPak-Tag": "a\tb"})
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES)
    assert fake.count() == 0


def test_tag_is_not_part_of_the_cache_key(make_proxy, fake):
    """The same request with the same key under two tags is one upstream call: the second
    is a hit, recorded under its own tag."""
    proxy = make_proxy(cache__enabled=True)
    for tag in ("alpha", "beta"):
        response = openai_client(proxy, default_headers={"X-TokenPak-Tag": tag}) \
            .chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        assert response.parse().choices[0].message.content
    assert response.headers["X-TokenPak-Cache"] == "hit"
    assert fake.count() == 1
    rows = accounting_rows(proxy, 2)
    assert [(r["tag"], r["cache"]) for r in rows] == [("alpha", "miss"), ("beta", "hit")]


def test_migration_from_schema_2_adds_the_tag_column(tmp_path):
    db = str(tmp_path / "v2.db")
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '2');
        CREATE TABLE requests (id INTEGER PRIMARY KEY, ts REAL NOT NULL, provider TEXT,
            model TEXT, path TEXT, status INTEGER, streamed INTEGER, cache TEXT,
            input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER,
            cache_write_tokens INTEGER, tokens_before INTEGER, tokens_after INTEGER,
            cost_usd REAL, saved_usd REAL, latency_ms REAL, ttfb_ms REAL, key_id TEXT,
            error TEXT, complete INTEGER, method TEXT, compression_saved_usd REAL);
        INSERT INTO requests (ts, model, path, status, cost_usd, saved_usd,
            compression_saved_usd) VALUES (1, 'gpt-4o', '/v1/chat/completions', 200, 0.5,
            0.25, 0.25);
    """)
    conn.close()
    # `tokenpak stats --by tag` reads a DB the daemon has not upgraded yet: all untagged
    assert [(r["tag"], r["requests"]) for r in stats.report(db, None, "tag")] == [
        ("(untagged)", 1)]
    r = Recorder(db)
    r.start()
    r.record({"ts": 2, "model": "gpt-4o", "method": "POST", "status": 200, "tag": "t1",
              "cost_usd": 1.0, "saved_usd": 0.0, "compression_saved_usd": 0.0})
    r.close()
    conn = sqlite3.connect(db)
    got = conn.execute("SELECT tag, cost_usd, saved_usd FROM requests ORDER BY id").fetchall()
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert got == [(None, 0.5, 0.25), ("t1", 1.0, 0.0)]  # old rows untouched, not re-priced
    assert version == ("3",) and accounting.SCHEMA_VERSION == 3


def test_key_id_names_each_credential_with_the_cache_off(proxy, fake, tmp_path):
    """Every request with a credential carries its key id, cached or not: the install's
    HMAC of the key, cut to 12 characters; a request without one carries none."""
    openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    openai_client(proxy, key=OTHER_KEY).chat.completions.create(model="gpt-4o",
                                                                messages=MESSAGES)
    anthropic_client(proxy).messages.create(model="claude-sonnet-4-6", max_tokens=20,
                                            messages=MESSAGES)
    raw_request(proxy, "POST", "/v1/chat/completions",
                json.dumps({"model": "gpt-4o", "messages": MESSAGES}))
    rows = accounting_rows(proxy, 4)
    secret = load_secret(str(tmp_path / "state" / "secret"))
    assert [r["key_id"] for r in rows] == [scope_id(OPENAI_KEY, secret)[:12],
                                           scope_id(OTHER_KEY, secret)[:12],
                                           scope_id(ANTHROPIC_KEY, secret)[:12], None]
    assert len(set(r["key_id"] for r in rows)) == 4


def test_key_id_is_the_same_with_the_cache_on(make_proxy, fake, tmp_path):
    proxy = make_proxy(cache__enabled=True, cache__anonymous=True)
    openai_client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    raw_request(proxy, "POST", "/v1/chat/completions",
                json.dumps({"model": "gpt-4o", "messages": MESSAGES}))
    rows = accounting_rows(proxy, 2)
    secret = load_secret(str(tmp_path / "state" / "secret"))
    # an anonymous request has a cache scope of its own, but no key id
    assert [r["key_id"] for r in rows] == [scope_id(OPENAI_KEY, secret)[:12], None]


# -- who spent what: /stats?by= and `tokenpak stats --by` over recorded traffic -------------
# (tag, key, model, stream) of each request, in the order they are sent.
TRAFFIC = [("alpha", OPENAI_KEY, "gpt-4o", False), ("alpha", OPENAI_KEY, "gpt-4o", True),
           ("beta", OTHER_KEY, "gpt-4o-mini", False),
           ("beta", ANTHROPIC_KEY, "claude-sonnet-4-6", False),
           (None, OPENAI_KEY, "gpt-4o", False)]


def send_traffic(proxy):
    for i, (tag, key, model, stream) in enumerate(TRAFFIC):
        headers = {"X-TokenPak-Tag": tag} if tag else {}
        messages = [{"role": "user", "content": "request number %d " % i + "word " * i}]
        if model.startswith("claude"):
            anthropic_client(proxy, key=key, default_headers=headers).messages.create(
                model=model, max_tokens=50, messages=messages)
        else:
            answer = openai_client(proxy, key=key, default_headers=headers) \
                .chat.completions.create(model=model, messages=messages, stream=stream)
            if stream:
                list(answer)
    accounting_rows(proxy, len(TRAFFIC))


def expected_by(fake, field):
    """{group: (requests, input, output, cost)} from what the fake provider answered and
    the shipped prices: what tokenpak's figures must equal."""
    assert len(fake.requests) == len(TRAFFIC)
    out = {}
    for (tag, key, model, _), seen in zip(TRAFFIC, fake.requests):
        usage = seen.usage
        if "prompt_tokens" in usage:
            tokens = {"input": usage["prompt_tokens"], "output": usage["completion_tokens"]}
        else:
            tokens = {"input": usage["input_tokens"], "output": usage["output_tokens"]}
        group = {"tag": tag, "key": key, "model": model}[field]
        n, inp, outp, cost = out.get(group, (0, 0, 0, 0.0))
        out[group] = (n + 1, inp + tokens["input"], outp + tokens["output"],
                      cost + pricing.cost(model, tokens))
    return out


def figures_of(rows, field):
    return {r[field]: (r["requests"], r["input"], r["output"], r["cost_usd"]) for r in rows}


def approx_equal(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name][:3] == want[name][:3], name
        assert got[name][3] == pytest.approx(want[name][3], rel=1e-9), name


@pytest.fixture
def attributed(make_proxy, fake, tmp_path):
    """A tokenpak that has answered TRAFFIC, with the first key named "laptop"."""
    secret = load_secret(str(tmp_path / "state" / "secret"))  # the proxy reads this one
    laptop = scope_id(OPENAI_KEY, secret)[:12]
    proxy = make_proxy(**{"keys__%s__name" % laptop: "laptop"})
    send_traffic(proxy)
    proxy.ids = {key: scope_id(key, secret)[:12] for key in (OPENAI_KEY, OTHER_KEY,
                                                             ANTHROPIC_KEY)}
    return proxy


def test_stats_groups_equal_the_providers_usage_and_prices(attributed, fake):
    ids = attributed.ids
    status, _, body = attributed.get("/stats?by=tag,key&by=model,provider,day,hour")
    assert status == 200
    doc = json.loads(body)
    groups = doc["groups"]
    assert list(groups) == ["tag", "key", "model", "provider", "day", "hour"]
    want = expected_by(fake, "tag")
    approx_equal(figures_of(groups["tag"], "tag"),
                 {"(untagged)" if k is None else k: v for k, v in want.items()})
    # most expensive first
    costs = [r["cost_usd"] for r in groups["tag"]]
    assert costs == sorted(costs, reverse=True)
    approx_equal(figures_of(groups["key"], "key"),
                 {ids[k]: v for k, v in expected_by(fake, "key").items()})
    assert {r["key"]: r["name"] for r in groups["key"]} == {
        ids[OPENAI_KEY]: "laptop", ids[OTHER_KEY]: None, ids[ANTHROPIC_KEY]: None}
    approx_equal(figures_of(groups["model"], "model"), expected_by(fake, "model"))
    assert {r["provider"]: r["requests"] for r in groups["provider"]} == {"openai": 4,
                                                                         "anthropic": 1}
    today = time.strftime("%Y-%m-%d")
    assert [(r["day"], r["requests"]) for r in groups["day"]] == [(today, 5)]
    hours = [r["hour"] for r in groups["hour"]]
    assert hours == sorted(hours) and all(h.startswith(today[:4]) for h in hours)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:00", h) for h in hours)
    assert sum(r["requests"] for r in groups["hour"]) == 5
    total = sum(v[3] for v in want.values())
    assert doc["cost_usd"] == pytest.approx(total)
    assert sum(r["cost_usd"] for r in groups["tag"]) == pytest.approx(total)


def test_stats_since_and_bad_queries(attributed, fake):
    _, _, body = attributed.get("/stats?by=tag&since=1h")
    assert sum(r["requests"] for r in json.loads(body)["groups"]["tag"]) == 5
    _, _, body = attributed.get("/stats?by=tag&since=%s" % time.strftime(
        "%Y-%m-%d", time.localtime(time.time() + 2 * 86400)))
    assert json.loads(body)["groups"]["tag"] == []
    _, _, body = attributed.get("/stats")
    assert "groups" not in json.loads(body)
    for query in ("by=week", "by=tag,nope", "since=yesterday"):
        response, data = raw_request(attributed, "GET", "/stats?" + query)
        assert response.status == 400, query
        assert json.loads(data)["error"]["type"] == "invalid_request_error"


def test_stats_cli_by_tag_and_key(attributed, fake, capsys, monkeypatch):
    monkeypatch.setenv("TOKENPAK_DB", attributed.app.db_path)
    ids = attributed.ids
    assert cli.main(["config", "set", "keys.%s.name" % ids[OPENAI_KEY], "laptop"]) == 0
    capsys.readouterr()
    assert cli.main(["stats", "--by", "tag"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["Tag", "Requests"]
    want = expected_by(fake, "tag")
    table = {line.split()[0]: line.split() for line in lines[2:-2]}
    assert set(table) == {"alpha", "beta", "(untagged)"}
    assert table["alpha"][1] == "2" and table["beta"][1] == "2"
    cost = want["alpha"][3]
    assert ("$%.4f" % cost if cost < 0.01 else "${:,.2f}".format(cost)) in table["alpha"]
    assert cli.main(["stats", "--by", "key", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    approx_equal(figures_of(rows, "key"), {ids[k]: v for k, v in expected_by(fake, "key").items()})
    assert {r["key"]: r["name"] for r in rows}[ids[OPENAI_KEY]] == "laptop"
    assert cli.main(["stats", "--by", "key"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^%s\s+laptop\s+3\s" % ids[OPENAI_KEY], text, re.M), text
    for key in (OPENAI_KEY, OTHER_KEY, ANTHROPIC_KEY):
        assert key not in text


def test_keys_id_prints_the_recorded_id_without_the_key(attributed, capsys, monkeypatch):
    import io
    monkeypatch.setenv("TOKENPAK_DB", attributed.app.db_path)  # the secret lives beside it
    for key in (OTHER_KEY, "Bearer " + OTHER_KEY + "\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(key))
        assert cli.main(["keys", "id"]) == 0
        out, err = capsys.readouterr()
        assert out.split() == [attributed.ids[OTHER_KEY]]
        assert OTHER_KEY not in out + err
    monkeypatch.setattr("sys.stdin", io.StringIO(OPENAI_KEY))
    assert cli.main(["config", "set", "keys.%s.name" % attributed.ids[OPENAI_KEY], "laptop"]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "id"]) == 0
    assert capsys.readouterr().out.split() == [attributed.ids[OPENAI_KEY], "laptop"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["keys", "id"]) == 2
