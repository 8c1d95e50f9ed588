"""Per-request accounting: one row per proxied request, written off the hot path.

A handler thread calls `Recorder.record(row)` with a plain dict, for an answer with the
provider's usage just before its last bytes go out (proxy.Handler.settle says why), and goes
on; the call prices the row once (`figures`: a memoised price lookup and a few multiplications) and puts it on a
bounded queue (it never blocks and never raises). The priced row is what the DB stores and
what /metrics counts: nothing else computes a request's cost. One writer thread drains the
queue and writes rows in batches, one transaction per batch (`db.Writer`), to the
`requests` table of the shared DB file.

Rows are never what fails a request: when the DB is locked the batch is retried, when it is
full, read-only, deleted or corrupt the rows are dropped and counted (`rows_dropped`), the
problem is logged once, and writing resumes by itself when the DB is usable again.

Row keys (all optional except what you know; missing ones are stored as NULL):
  ts, provider, model, method, path, status, streamed, cache ("hit" | "miss" | "bypass" |
  "coalesced"), usage (normalised: sse.Usage as a dict) or input_tokens,
  output_tokens, cache_read_tokens, cache_write_tokens; tokens_before, tokens_after,
  cost_usd, saved_usd, compression_saved_usd (FIGURES, computed when absent), latency_ms, ttfb_ms,
  key_id (12 chars of the scope HMAC; longer values are cut), tag (the client's
  X-TokenPak-Tag, already checked; longer values are cut to 64), error, complete.

How a row is priced (`figures`):
- cost: the provider's usage at the model's prices. Zero, not unknown, for what no provider
  bills: a request that is not a POST (model listings, retrievals), the free POST endpoints
  (`FREE_PATHS`: token counting, moderation), an answer served locally, and an error answer
  without usage (tokenpak's own 4xx/5xx, a provider's refusal). Unknown (NULL) when a
  billed request's model has no price or its usage is unknown.
- savings, never overstated: a cache hit saved what the request would have cost. A token
  compression removed is worth the cheapest price it could have been billed at: when the
  provider reported prompt-cache activity (cache_read or cache_write > 0) the removed
  tokens may have sat in the prefix it reads from its cache, so they count at the
  cache-read price; only when it cached nothing do they count at the input price.
  `compression_saved_usd` is that part of `saved_usd`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from tokenpak import db, pricing
from tokenpak.db import DbFile

log = logging.getLogger("tokenpak.accounting")

SCHEMA_VERSION = 3
SERVED_LOCALLY = ("hit", "coalesced")  # answered without a provider call of their own
SERVED_LOCALLY_SQL = "(%s)" % ", ".join("'%s'" % c for c in SERVED_LOCALLY)  # for IN
FIGURES = ("cost_usd", "saved_usd", "compression_saved_usd")  # what a row's price is
# POST endpoints the providers do not bill: token counting and moderation.
FREE_PATHS = ("/messages/count_tokens", "/responses/input_tokens", ":countTokens",
              "/moderations")
# Columns added since version 1, with their types and the version that added them.
_ADDED = (("method", "TEXT", 2), ("compression_saved_usd", "REAL", 2), ("tag", "TEXT", 3))
MAX_TAG = 64  # characters of a tag kept (X-TokenPak-Tag)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '%d');
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL, provider TEXT, model TEXT, path TEXT, status INTEGER,
    streamed INTEGER, cache TEXT,
    input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER,
    cache_write_tokens INTEGER, tokens_before INTEGER, tokens_after INTEGER,
    cost_usd REAL, saved_usd REAL, latency_ms REAL, ttfb_ms REAL,
    key_id TEXT, error TEXT, complete INTEGER, method TEXT, compression_saved_usd REAL,
    tag TEXT);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
""" % SCHEMA_VERSION
COLUMNS = ("ts", "provider", "model", "path", "status", "streamed", "cache", "input_tokens",
           "output_tokens", "cache_read_tokens", "cache_write_tokens", "tokens_before",
           "tokens_after", "cost_usd", "saved_usd", "latency_ms", "ttfb_ms", "key_id", "error",
           "complete", "method", "compression_saved_usd", "tag")
_INSERT = "INSERT INTO requests (%s) VALUES (%s)" % (", ".join(COLUMNS), ", ".join("?" * len(COLUMNS)))
_USAGE_COLUMNS = (("input", "input_tokens"), ("output", "output_tokens"),
                  ("cache_read", "cache_read_tokens"), ("cache_write", "cache_write_tokens"))


def _insert(conn, records):
    conn.executemany(_INSERT, records)


def row_usage(row: dict):
    """The normalised usage of a row (from "usage" or the *_tokens keys); None if unknown."""
    usage = row.get("usage")
    if isinstance(usage, dict):
        return usage
    if row.get("input_tokens") is None and row.get("output_tokens") is None:
        return None
    return {short: row.get(col) or 0 for short, col in _USAGE_COLUMNS}


def is_free(row: dict) -> bool:
    """Whether no provider bills this request: not a POST, or a free POST endpoint."""
    method = row.get("method")
    if method and str(method).upper() != "POST":
        return True
    path = str(row.get("path") or "").split("?", 1)[0]
    return path.endswith(FREE_PATHS)


def compression_saving(model, usage, before, after, table=None) -> float:
    """USD compression saved on one request: the tokens it removed at the cheapest price
    they could have been billed at (see the module doc). 0 when nothing was removed or
    the model has no price."""
    if before is None or after is None or before <= after:
        return 0.0
    prices = pricing.price_for(model or "", table)
    if prices is None:
        return 0.0
    price = prices["input"]
    if usage is None or usage.get("cache_read") or usage.get("cache_write"):
        price = min(price, prices["cache_read"])  # unknown usage: assume cached, too
    return (before - after) * price / 1_000_000


def figures(row: dict, table=None) -> dict:
    """{cost_usd, saved_usd, compression_saved_usd} of a row; see the module doc for the rules."""
    usage = row_usage(row)
    model = row.get("model") or ""
    local = row.get("cache") in SERVED_LOCALLY
    status = _as_int(row.get("status"))
    if not local and (is_free(row) or (usage is None and status is not None and status >= 400)):
        return dict.fromkeys(FIGURES, 0.0)
    # what the request cost (or, served locally, would have cost) at the provider
    full = pricing.cost(model, usage, table) if usage is not None else None
    compressed = compression_saving(model, usage, row.get("tokens_before"),
                                    row.get("tokens_after"), table)
    if local:
        return dict(zip(FIGURES, (0.0, compressed + (full or 0.0), compressed)))
    return dict(zip(FIGURES, (full, compressed, compressed)))


def _as_int(value):
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def to_record(row: dict) -> tuple:
    """The INSERT parameters for a priced `row` (see module doc for the keys)."""
    rec = dict(row)
    usage = row_usage(row)
    if isinstance(row.get("usage"), dict):
        for short, col in _USAGE_COLUMNS:
            rec[col] = usage.get(short, 0)
    if rec.get("method") is not None:
        rec["method"] = str(rec["method"])[:16]
    rec["ts"] = rec.get("ts") or time.time()
    # 12 hex characters tell keys apart in a report; the full HMAC is the cache scope
    key_id = rec.get("key_id")
    rec["key_id"] = str(key_id)[:12] if key_id else None
    tag = rec.get("tag")
    rec["tag"] = str(tag)[:MAX_TAG] if tag else None
    error = rec.get("error")
    rec["error"] = str(error)[:200] if error else None
    for col in ("streamed", "complete"):
        if rec.get(col) is not None:
            rec[col] = int(bool(rec[col]))
    for col in ("status", "input_tokens", "output_tokens", "cache_read_tokens",
                "cache_write_tokens", "tokens_before", "tokens_after"):
        rec[col] = _as_int(rec.get(col))
    return tuple(map(rec.get, COLUMNS))


def migrate(conn, table=None) -> None:
    """Bring a DB written by an older tokenpak to SCHEMA_VERSION, in one transaction.

    Version 1 -> 2: adds `method` and `compression_saved_usd`, and re-prices the savings of
    compressed rows by today's rule (version 1 counted every removed token at the input
    price, overstating savings where the provider read the prompt from its cache). Cost
    is left as recorded. Version 2 -> 3: adds `tag` (NULL, untagged, for older rows).
    Safe when several processes open the DB at once: the version is read again under the
    write lock.
    """
    if _version(conn) >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)
        have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        for name, kind, since in _ADDED:
            if version < since and name not in have:
                conn.execute("ALTER TABLE requests ADD COLUMN %s %s" % (name, kind))
        if version < 2:
            _reprice_savings(conn, table)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.info("accounting database upgraded from schema %d to %d", version, SCHEMA_VERSION)


def _version(conn) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row else 1
    except (TypeError, ValueError):
        return 1


def _reprice_savings(conn, table):
    found = conn.execute(
        "SELECT id, model, cache, input_tokens, output_tokens, cache_read_tokens,"
        " cache_write_tokens, tokens_before, tokens_after, saved_usd FROM requests"
        " WHERE tokens_before > tokens_after").fetchall()
    updates = []
    for (rid, model, cache, inp, out, read, write, before, after, saved) in found:
        usage = None if inp is None and out is None else {
            "input": inp or 0, "output": out or 0, "cache_read": read or 0,
            "cache_write": write or 0}
        old = 0.0
        prices = pricing.price_for(model or "", table)
        if prices is not None:
            old = (before - after) * prices["input"] / 1_000_000
        new = compression_saving(model, usage, before, after, table)
        updates.append((max((saved or 0.0) - old, 0.0) + new, new, rid))
    conn.executemany("UPDATE requests SET saved_usd = ?, compression_saved_usd = ? WHERE id = ?",
                     updates)
    # Version 1 left the cost of unbilled requests unknown; they cost nothing.
    conn.execute("UPDATE requests SET cost_usd = 0, saved_usd = COALESCE(saved_usd, 0)"
                 " WHERE cost_usd IS NULL AND (cache IS NULL OR cache NOT IN %s)"
                 " AND ((status >= 400 AND input_tokens IS NULL AND output_tokens IS NULL)"
                 " OR %s)" % (SERVED_LOCALLY_SQL,
                                " OR ".join("path LIKE '%%%s'" % p for p in FREE_PATHS)))


class Recorder:
    """Writes request rows in batches from one writer thread; see the module doc."""

    def __init__(self, db_path: str, batch_size: int = 256, flush_interval: float = 0.5,
                 max_queue: int = 10000, prices=None, busy_timeout: float = 2.0):
        self.db = DbFile(db_path, _SCHEMA, ("meta", "requests"))
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = flush_interval
        self.prices = prices
        self.rows_written = 0
        self.rows_dropped = 0
        self.max_queue = max_queue
        self._queue = collections.deque()  # rows, and the writer's signals (None, Events)
        self._ready = threading.Condition(threading.Lock())
        self._drop_lock = threading.Lock()
        self._w = db.Writer(self.db, log, "accounting", busy_timeout=busy_timeout,
                            on_open=self._opened)
        self.ledger = None  # budget.Ledger: told of every row's cost (set before start())
        self._health = self._w.health
        self._thread = None
        self._stopped = False

    def _opened(self, conn):
        migrate(conn, self.prices)
        if self.ledger is not None:
            try:
                self.ledger.seed(conn)  # the spend so far, from the file just opened
            except Exception:  # budgets must not stop accounting: count from here on
                log.exception("cannot read the spend so far for the budgets")
                self.ledger.seeded.set()

    def start(self) -> None:
        """Start the writer thread (rows recorded before this wait in the queue)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenpak-accounting", daemon=True)
            self._thread.start()

    def record(self, row: dict) -> None:
        """Price `row` (adds FIGURES when any is absent, for the caller's metrics to read
        too) and queue it; never blocks, never raises. Do not mutate `row` afterwards."""
        if not isinstance(row, dict):  # None and Events are the writer's signals
            self._dropped(1)
            return
        try:
            if not all(name in row for name in FIGURES):
                for name, value in figures(row, self.prices).items():
                    row.setdefault(name, value)
            if self.ledger is not None:
                self.ledger.add(row)  # before it is queued: the writer may take it at once
            if self._stopped or len(self._queue) >= self.max_queue:
                self._dropped(1)
                return
            self._queue.append(row)  # atomic; the writer takes rows on its own schedule
            if len(self._queue) >= self.batch_size:
                self._wake()
        except Exception:  # anything: fail open
            self._dropped(1)

    def _wake(self):
        with self._ready:
            self._ready.notify()

    def _signal(self, item):
        """Queue a signal for the writer (None: stop; an Event: flush) and wake it now."""
        self._queue.append(item)
        self._wake()

    def _dropped(self, n):
        with self._drop_lock:
            self.rows_dropped += n

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row recorded before this call is written (or dropped)."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        marker = threading.Event()
        self._signal(marker)
        return marker.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer thread and close the DB."""
        if self._stopped:
            return
        if self._thread is None and self._queue:
            self.start()  # never started: still write what was recorded
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            self._signal(None)
            self._thread.join(timeout)
        else:
            self._w.close()

    # -- writer thread -------------------------------------------------------

    def _run(self):
        pending, markers = [], []  # rows taken from the queue, not yet written; flush() waiters
        if self.ledger is not None:
            self._w.connection()  # opening it seeds the budgets' spend before any request
        while True:
            stop = self._collect(pending, markers)
            self._w.maintain()
            if self.ledger is not None and not pending:
                self._refresh_ledger()
            if pending:
                pending = self._write(pending, final=stop)
            if not pending:
                for marker in markers:
                    marker.set()
                markers = []
            if stop:
                break
        self._w.close()

    def _collect(self, pending, markers) -> bool:
        """Take rows until a batch is full or `flush_interval` has passed since the first of
        them (fewer, larger transactions), or until flush()/close() ask; True on close()."""
        deadline = idle_from = None
        while len(pending) < self.batch_size:
            if not self._queue:
                timeout = self.flush_interval if deadline is None else deadline - time.monotonic()
                if timeout <= 0:
                    return False
                if deadline is None:
                    idle_from = time.monotonic()
                with self._ready:
                    if not self._queue:
                        self._ready.wait(timeout)
                if not self._queue:
                    return False
            item = self._queue.popleft()
            if item is None:
                return True
            if isinstance(item, threading.Event):
                markers.append(item)
                return False
            pending.append(item)
            if deadline is None:
                # A row found after an idle wait has waited since at most its start (rows
                # do not wake the writer): it is written flush_interval after that start,
                # so no row waits longer than flush_interval (`tokenpak logs --follow`).
                deadline = (idle_from or time.monotonic()) + self.flush_interval
        return False

    def _refresh_ledger(self):
        """An idle writer's periodic look at other workers' spend; never raises."""
        conn = self._w.connection()
        if conn is None:
            return
        try:
            self.ledger.refresh(conn)
        except Exception as exc:  # a busy or broken DB: the next look, or the reopen, fixes it
            log.debug("budget refresh failed: %s", exc)

    def _write(self, rows, final=False):
        """Write `rows`; returns the rows to retry (only when the DB is busy)."""
        try:
            records = [to_record(r) for r in rows]
        except Exception:
            log.exception("accounting rows could not be converted; dropping them")
            self._dropped(len(rows))
            return []
        ledger = self.ledger
        if ledger is None:
            kind = self._w.write(_insert, records)
        else:  # the budget ledger reads other processes' new rows in the same transaction
            kind = self._w.write(ledger.write, _insert, records)
        if kind is None:
            self.rows_written += len(rows)
            if ledger is not None:
                ledger.written(rows)
            return []
        if self._w.should_retry(kind, final):
            return rows
        self._dropped(len(rows))
        return []
