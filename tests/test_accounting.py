"""Accounting: rows written in batches off the hot path, priced, and never lost to a hiccup."""

import glob
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from tokenpak import accounting, cache
from tokenpak.accounting import Recorder, price_row
from tokenpak.cache import CacheStore, Entry, load_secret, scope_id
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


def until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


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


def test_cache_hit_costs_nothing_and_saves_what_it_would_have_cost():
    usage = {"input": 1_000_000, "output": 0, "cache_read": 0, "cache_write": 0}
    cost, saved = price_row({"model": "gpt-4o", "cache": "hit", "usage": usage})
    assert cost == 0.0 and saved == pytest.approx(2.5)
    cost, saved = price_row({"model": "gpt-4o", "cache": "coalesced", "usage": usage})
    assert cost == 0.0 and saved == pytest.approx(2.5)


def test_compression_saving_is_input_price_times_tokens_removed():
    row = {"model": "gpt-4o", "cache": "miss", "tokens_before": 3_000_000, "tokens_after": 1_000_000,
           "usage": {"input": 1_000_000, "output": 0}}
    cost, saved = price_row(row)
    assert cost == pytest.approx(2.5) and saved == pytest.approx(5.0)
    assert price_row(dict(row, model="unknown-x")) == (None, 0.0)


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
        assert until(lambda: (r.record(request_row(path="/after")), r.flush())
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

    assert until(lands)


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
    monkeypatch.setattr(accounting, "_BUSY_RETRIES", 10 ** 6)
    recorder.record(request_row())
    recorder.flush()
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, db], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        for _ in range(5):
            recorder.record(request_row(path="/during-lock"))  # returns at once
        assert until(lambda: recorder._health.state == "busy")
    finally:
        proc.communicate("\n", timeout=WAIT)
    assert recorder.flush()
    assert len(rows(db, "path = '/during-lock'")) == 5
    assert recorder.rows_dropped == 0


def test_cache_and_accounting_share_a_file_that_is_deleted_then_corrupted(db, monkeypatch):
    monkeypatch.setattr(cache, "MAINTENANCE_SECONDS", 0.05)
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
                assert until(lambda: glob.glob(db + ".corrupt-*"))  # noticed and moved aside
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

            assert until(both_work), damage
    finally:
        r.close()
        store.close()
