"""Who spent what: the X-TokenPak-Tag header and the per-credential key id, through a real
tokenpak and the real SDKs, and the schema 3 migration that added the `tag` column."""

import json
import sqlite3

import anthropic
import openai
import pytest

from helpers import (ANTHROPIC_KEY, OPENAI_KEY, accounting_rows, anthropic_client,
                     openai_client, raw_request)
from tokenpak import accounting
from tokenpak.accounting import Recorder

MESSAGES = [{"role": "user", "content": "who pays for this"}]


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
