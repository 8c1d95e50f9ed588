"""Accounting: rows written in batches off the hot path, priced, and never lost to a hiccup."""

import glob
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import wait_for
from tokenpak import accounting, stats
from tokenpak.accounting import Recorder, figures
from tokenpak.cache import CacheStore, Entry, load_secret, scope_id
from tokenpak import db as dbmod
from tokenpak.db import DbFile

WAIT = 10.0


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "state" / "tokenpak.db")


@pytest.fixture
def recorder(db):
    r = Recorder(db, batch_size=50, flush_interval=0.05, busy_timeout=0.1)
    r.start()
    yield r
    r.close()


def rows(db, where="1"):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM requests WHERE %s ORDER BY id" % where)]
    finally:
        conn.close()


def request_row(**kw):
    row = {"ts": 1_700_000_000.0, "provider": "anthropic", "model": "claude-sonnet-4-6",
           "path": "/v1/messages", "status": 200, "streamed": True, "cache": "miss",
           "usage": {"input": 1000, "output": 100, "cache_read": 2000, "cache_write": 0},
           "tokens_before": 1000, "tokens_after": 1000, "latency_ms": 812.5, "ttfb_ms": 120.0,
           "key_id": "0123456789abcdef", "error": None, "complete": True}
    row.update(kw)
    return row


def test_a_row_is_written_with_every_column(recorder, db):
    recorder.record(request_row())
    assert recorder.flush()
    (row,) = rows(db)
    expected_cost = (1000 * 3 + 100 * 15 + 2000 * 0.30) / 1e6
    assert row["provider"] == "anthropic" and row["model"] == "claude-sonnet-4-6"
    assert row["path"] == "/v1/messages" and row["status"] == 200
    assert row["streamed"] == 1 and row["complete"] == 1 and row["cache"] == "miss"
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"]) == (1000, 100, 2000, 0)
    assert row["cost_usd"] == pytest.approx(expected_cost)
    assert row["saved_usd"] == 0.0
    assert row["latency_ms"] == 812.5 and row["ttfb_ms"] == 120.0
    assert row["key_id"] == "0123456789ab"  # never more than 12 characters of the HMAC
    assert row["error"] is None
    assert recorder.rows_written == 1 and recorder.rows_dropped == 0


def test_unknown_model_costs_null_not_zero(recorder, db):
    recorder.record(request_row(model="some-local-model"))
    recorder.flush()
    assert rows(db)[0]["cost_usd"] is None


def test_explicit_token_columns_and_missing_usage(recorder, db):
    recorder.record(request_row(usage=None, input_tokens=10, output_tokens=5, model="gpt-4o"))
    recorder.record({"provider": "passthrough", "path": "/v1/models", "status": 200})
    recorder.flush()
    first, second = rows(db)
    assert first["cost_usd"] == pytest.approx((10 * 2.5 + 5 * 10) / 1e6)
    assert second["input_tokens"] is None and second["cost_usd"] is None and second["ts"] > 0


def price_row(row):
    """(cost_usd, saved_usd) of a row, as stored and shown in the footer."""
    priced = figures(row)
    return priced["cost_usd"], priced["saved_usd"]


def test_cache_hit_costs_nothing_and_saves_what_it_would_have_cost():
    usage = {"input": 1_000_000, "output": 0, "cache_read": 0, "cache_write": 0}
    cost, saved = price_row({"model": "gpt-4o", "cache": "hit", "usage": usage})
    assert cost == 0.0 and saved == pytest.approx(2.5)
    cost, saved = price_row({"model": "gpt-4o", "cache": "coalesced", "usage": usage})
    assert cost == 0.0 and saved == pytest.approx(2.5)


def test_compression_saving_is_input_price_when_the_provider_cached_nothing():
    row = {"model": "gpt-4o", "cache": "miss", "tokens_before": 3_000_000, "tokens_after": 1_000_000,
           "usage": {"input": 1_000_000, "output": 0, "cache_read": 0, "cache_write": 0}}
    cost, saved = price_row(row)
    assert cost == pytest.approx(2.5) and saved == pytest.approx(2 * 2.5)
    assert price_row(dict(row, model="unknown-x")) == (None, 0.0)


@pytest.mark.parametrize("usage", [
    {"input": 1_000, "output": 0, "cache_read": 900_000, "cache_write": 0},
    {"input": 1_000, "output": 0, "cache_read": 0, "cache_write": 900_000},  # written now
    None,                                                                   # usage unknown
])
def test_compression_saving_is_cache_read_price_when_the_provider_caches(usage):
    """A removed token may have sat in the prefix the provider reads from its cache: it
    is worth the cache-read price, never more (claude-sonnet-4-6: $3 input, $0.30 read)."""
    row = {"model": "claude-sonnet-4-6", "cache": "miss", "usage": usage,
           "tokens_before": 2_000_000, "tokens_after": 1_000_000}
    cost, saved = price_row(row)
    assert saved == pytest.approx(0.30)
    cost, saved = price_row(dict(row, cache="hit"))
    full = 0.0 if usage is None else accounting.pricing.cost("claude-sonnet-4-6", usage)
    assert cost == 0.0 and saved == pytest.approx(0.30 + full)


@pytest.mark.parametrize("extra", [
    {"method": "POST", "path": "/v1/messages/count_tokens"},
    {"method": "POST", "path": "/v1/responses/input_tokens"},
    {"method": "POST", "path": "/v1beta/models/gemini-2.5-pro:countTokens"},
    {"method": "GET", "path": "/v1/models"},
    {"method": "GET", "path": "/v1/models/claude-sonnet-4-6"},
    {"method": "HEAD", "path": "/"},
    {"method": "POST", "path": "/v1/messages", "status": 401, "usage": None},
    {"method": "POST", "path": "/v1/messages", "status": 502, "usage": None, "model": None},
])
def test_free_requests_cost_zero_not_unknown(extra):
    row = dict(request_row(model="no-such-model", tokens_before=None, tokens_after=None), **extra)
    assert price_row(row) == (0.0, 0.0)


def test_billed_request_with_unknown_price_or_usage_is_unknown():
    assert price_row(request_row(model="no-such-model"))[0] is None
    assert price_row(request_row(usage=None, method="POST"))[0] is None  # usage unknown


def test_migration_from_schema_1(tmp_path):
    """An accounting DB written by tokenpak 0.1 gains the new columns, its compression
    savings re-priced by the cache-aware rule and its free/error rows costed at 0."""
    db = str(tmp_path / "old.db")
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE requests (id INTEGER PRIMARY KEY, ts REAL NOT NULL, provider TEXT,
            model TEXT, path TEXT, status INTEGER, streamed INTEGER, cache TEXT,
            input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER,
            cache_write_tokens INTEGER, tokens_before INTEGER, tokens_after INTEGER,
            cost_usd REAL, saved_usd REAL, latency_ms REAL, ttfb_ms REAL, key_id TEXT,
            error TEXT, complete INTEGER);
        -- compressed, provider read 900k from its cache: saved 1M tokens at $3 then
        INSERT INTO requests (ts, model, path, status, cache, input_tokens, output_tokens,
            cache_read_tokens, cache_write_tokens, tokens_before, tokens_after, cost_usd,
            saved_usd) VALUES (1, 'claude-sonnet-4-6', '/v1/messages', 200, 'miss', 1000, 0,
            900000, 0, 2000000, 1000000, 0.273, 3.0);
        -- a tokenpak 401 and a count_tokens call, both 'unknown' in schema 1
        INSERT INTO requests (ts, path, status, cache, error) VALUES
            (2, '/v1/messages', 401, 'bypass', 'missing X-TokenPak-Auth');
        INSERT INTO requests (ts, model, path, status, cache) VALUES
            (3, 'claude-sonnet-4-6', '/v1/messages/count_tokens', 200, 'bypass');
    """)
    conn.close()
    old = stats.summary(db)  # `tokenpak stats` reads a DB the daemon has not upgraded yet
    assert old["requests"] == 3 and old["compression_saved_usd"] == 0
    r = Recorder(db)
    r.start()
    r.record(request_row(method="POST"))
    r.close()
    got = rows(db)
    assert got[0]["saved_usd"] == pytest.approx(0.30)
    assert got[0]["compression_saved_usd"] == pytest.approx(0.30)
    assert got[0]["cost_usd"] == pytest.approx(0.273)  # cost stays as recorded
    assert (got[1]["cost_usd"], got[2]["cost_usd"]) == (0.0, 0.0)
    assert got[3]["method"] == "POST" and got[3]["cost_usd"] > 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(accounting.SCHEMA_VERSION),)
    conn.close()
    r = Recorder(db)  # a second open: nothing to do, nothing re-priced twice
    r.start()
    r.record(request_row(method="POST"))
    r.close()
    assert len(rows(db)) == 5 and rows(db)[0]["saved_usd"] == pytest.approx(0.30)
    assert stats.summary(db)["compression_saved_usd"] == pytest.approx(0.30)


def test_explicit_cost_is_kept(recorder, db):
    recorder.record(request_row(cost_usd=1.5, saved_usd=0.25))
    recorder.flush()
    row = rows(db)[0]
    assert (row["cost_usd"], row["saved_usd"]) == (1.5, 0.25)


def test_error_text_is_short(recorder, db):
    recorder.record(request_row(error="upstream reset " * 100, complete=False))
    recorder.flush()
    row = rows(db)[0]
    assert len(row["error"]) <= 200 and row["complete"] == 0


def test_many_rows_in_batches(recorder, db):
    for i in range(1000):
        recorder.record(request_row(status=200 + i % 3))
    assert recorder.flush()
    assert recorder.rows_written == 1000
    assert len(rows(db)) == 1000


def test_record_never_blocks_or_raises_when_the_queue_is_full(db):
    r = Recorder(db, max_queue=3)  # not started: nothing drains the queue
    for _ in range(10):
        r.record(request_row())
    r.record(None)
    r.record("not a row")
    assert r.rows_dropped == 9
    r.start()
    assert r.flush()
    assert r.rows_written == 3
    r.close()


def test_close_writes_what_is_queued(db):
    r = Recorder(db, flush_interval=5.0)
    r.start()
    for _ in range(7):
        r.record(request_row())
    r.close()
    assert len(rows(db)) == 7
    r.record(request_row())  # after close: dropped, not raised
    assert r.rows_dropped == 1


def test_schema_is_idempotent_and_shared_with_the_cache(db):
    store = CacheStore(db, 3600, 16)
    store.put("s", "k", Entry(200, [], b"x", False, time.time(), {}, "m"))
    store.flush()
    for _ in range(2):
        r = Recorder(db)
        r.start()
        r.record(request_row())
        r.close()
    store.close()
    conn = sqlite3.connect(db)
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(accounting.SCHEMA_VERSION)
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM cache_entries").fetchone()[0] == 1
    conn.close()


def test_no_credential_reaches_the_db(db, tmp_path):
    secret = load_secret(str(tmp_path / "state" / "secret"))
    cred = "sk-proj-VERYSECRETkey0000111122223333"
    r = Recorder(db)
    r.start()
    r.record(request_row(key_id=scope_id(cred, secret)))
    r.flush()
    blobs = [open(f, "rb").read() for f in [db] + glob.glob(db + "-*")]
    r.close()
    assert rows(db)[0]["key_id"] == scope_id(cred, secret)[:12]
    assert all(cred.encode() not in b for b in blobs)


def test_disk_full_drops_rows_logs_once_and_recovers(db, monkeypatch, caplog):
    real_connect = DbFile.connect_writer
    full = [True]

    def connect_on_a_full_disk(self, timeout=5.0):
        conn = real_connect(self, timeout)
        if full[0]:
            conn.execute("PRAGMA max_page_count=%d" % conn.execute("PRAGMA page_count").fetchone()[0])
        return conn

    monkeypatch.setattr(DbFile, "connect_writer", connect_on_a_full_disk)
    r = Recorder(db, flush_interval=0.05, busy_timeout=0.1)
    r.start()
    try:
        with caplog.at_level("WARNING", logger="tokenpak.accounting"):
            for _ in range(3):
                for _ in range(100):  # more than the free space in the file
                    r.record(request_row(error="x" * 150))
                r.flush()
        assert r.rows_dropped >= 1
        assert len([x for x in caplog.records if "full" in x.getMessage()]) == 1
        full[0] = False
        assert wait_for(lambda: (r.record(request_row(path="/after")), r.flush())
                     and rows(db, "path = '/after'"))
    finally:
        r.close()


def test_db_deleted_while_running_is_recreated(recorder, db):
    recorder.record(request_row())
    recorder.flush()
    for path in [db] + glob.glob(db + "-*"):
        os.unlink(path)

    def lands():
        recorder.record(request_row(path="/after-delete"))
        recorder.flush()
        return os.path.exists(db) and rows(db, "path = '/after-delete'")

    assert wait_for(lands)


def test_corrupt_db_at_start_is_moved_aside(db):
    os.makedirs(os.path.dirname(db))
    with open(db, "wb") as fh:
        fh.write(b"garbage" * 1000)
    r = Recorder(db)
    r.start()
    r.record(request_row())
    r.flush()
    r.close()
    assert len(rows(db)) == 1
    assert glob.glob(db + ".corrupt-*")


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_locked_db_rows_wait_and_are_written_after(recorder, db, monkeypatch):
    monkeypatch.setattr(dbmod, "BUSY_RETRIES", 10 ** 6)
    recorder.record(request_row())
    recorder.flush()
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, db], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        for _ in range(5):
            recorder.record(request_row(path="/during-lock"))  # returns at once
        assert wait_for(lambda: recorder._health.state == "busy")
    finally:
        proc.communicate("\n", timeout=WAIT)
    assert recorder.flush()
    assert len(rows(db, "path = '/during-lock'")) == 5
    assert recorder.rows_dropped == 0


def test_cache_and_accounting_share_a_file_that_is_deleted_then_corrupted(db, monkeypatch):
    monkeypatch.setattr(dbmod, "CHECK_SECONDS", 0.05)
    store = CacheStore(db, 3600, 16)
    r = Recorder(db, flush_interval=0.05, busy_timeout=0.1)
    r.start()
    try:
        for damage in ("delete", "corrupt"):
            if damage == "delete":
                for path in [db] + glob.glob(db + "-*"):
                    os.unlink(path)
            else:
                with open(db, "r+b") as fh:
                    fh.write(b"\x00broken" * 64)
                assert wait_for(lambda: glob.glob(db + ".corrupt-*"))  # noticed and moved aside
            tag = "/after-" + damage

            def both_work():
                r.record(request_row(path=tag))
                r.flush()
                store.put("s", tag, Entry(200, [], b"x", False, time.time(), {}, "m"))
                store.flush()
                try:
                    return bool(rows(db, "path = '%s'" % tag)) and store.get("s", tag) is not None
                except sqlite3.Error:
                    return False

            assert wait_for(both_work), damage
    finally:
        r.close()
        store.close()


def test_a_row_is_priced_once_and_carries_its_figures(db):
    """record() prices the row with the Recorder's prices and leaves the figures in it, so
    /metrics (which observes the same dict) counts what the DB stores."""
    r = Recorder(db, prices=accounting.pricing.load_prices(
        {"claude-sonnet-4-6": {"input": 100, "output": 0, "cache_read": 0}}))
    r.start()
    try:
        row = request_row(tokens_before=1500)
        r.record(row)
        assert row["cost_usd"] == pytest.approx(1000 * 100 / 1e6)
        assert row["saved_usd"] == row["compression_saved_usd"] == 0.0  # cached: read price 0
        assert r.flush()
        stored = rows(db)[0]
        assert [stored[k] for k in accounting.FIGURES] == [row[k] for k in accounting.FIGURES]
    finally:
        r.close()
