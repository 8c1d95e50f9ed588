"""db.Writer, the fail-open write lifecycle the cache and accounting share."""

import logging
import os
import sqlite3

import pytest

from tokenpak import db

SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"


def put(conn, key):
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 'x')", (key,))


@pytest.fixture
def writer(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.05)
    monkeypatch.setattr(db, "BACKOFF_SECONDS", 0.0)  # reopen at once: no waiting in tests
    w = db.Writer(db.DbFile(str(tmp_path / "state" / "t.db"), SCHEMA, ("meta",)),
                  logging.getLogger("tokenpak.test"), "test")
    yield w
    w.close()


def keys(w):
    conn = w.db.connect_reader(timeout=1.0)
    try:
        return [k for (k,) in conn.execute("SELECT key FROM meta ORDER BY key")]
    finally:
        conn.close()


def test_busy_keeps_the_connection_and_is_retried_a_few_times(writer):
    assert writer.write(put, "a") is None
    other = writer.db.connect_writer(track=False)
    other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    try:
        for attempt in range(1, db.BUSY_RETRIES + 2):
            assert writer.write(put, "b") == "busy"
            assert writer.conn is not None and writer.health.state == "busy"
            assert writer.should_retry("busy") == (attempt <= db.BUSY_RETRIES)
        assert not writer.should_retry("busy", final=True)
        assert not writer.should_retry("unavailable")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert writer.write(put, "b") is None  # rolled back each time, commits now
    assert writer.failures == 0 and writer.health.state is None
    assert keys(writer) == ["a", "b"]


def test_a_failed_batch_is_rolled_back_whole(writer):
    def half(conn):
        put(conn, "half")
        raise sqlite3.OperationalError("database is locked")
    assert writer.write(half) == "busy"
    assert writer.conn is not None  # kept open: the next batch uses it, in a new transaction
    assert writer.write(put, "next") is None
    assert keys(writer) == ["next"]


def test_other_failures_close_and_reopen(writer):
    assert writer.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)")) \
        == "unavailable"
    assert writer.conn is None and writer.failures == 1
    assert writer.write(put, "next") is None and writer.failures == 0


def test_unusable_then_usable_again(tmp_path, writer):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the DB directory should be")
    assert writer.write(put, "a") == "unavailable" and writer.conn is None
    assert writer.failures == 1 and writer.health.state == "unavailable"
    blocker.unlink()
    assert writer.write(put, "a") is None
    assert keys(writer) == ["a"] and writer.health.state is None


def test_deleted_and_corrupt_files_are_let_go_of(writer, monkeypatch):
    monkeypatch.setattr(db, "CHECK_SECONDS", 0.0)
    assert writer.write(put, "a") is None
    gen = writer.gen
    os.unlink(writer.db.path)
    assert writer.maintain() and writer.conn is None
    assert writer.write(put, "b") is None and keys(writer) == ["b"]  # a fresh file
    assert writer.gen > gen  # pooled readers reconnect
    with open(writer.db.path, "r+b") as fh:
        fh.write(b"\x00broken" * 64)
    assert writer.maintain() and writer.conn is None
    assert writer.write(put, "c") is None and keys(writer) == ["c"]
    assert [n for n in os.listdir(os.path.dirname(writer.db.path)) if ".corrupt-" in n]
