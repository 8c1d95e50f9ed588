"""The response cache: keys, per-credential scopes and a fail-open sqlite3 store.

Why it is built this way:
- The key is a SHA-256 over the provider, the path, the JSON text of every body field
  that can change the answer (temperature, top_p, max_tokens, ... all count; as
  forwarded: the proxy hashes the bytes it sends, see key_from_fields, rather than dump a
  300 kB agent request once more) and the request headers that can change it
  (`KEY_HEADERS`). Body fields are in unless listed in `IGNORED_FIELDS`, so a changed
  parameter is a miss, never a wrong answer; headers are out unless listed, because
  clients send fresh ids on every call and would never hit.
- Headers in the key, from the providers' documentation: `anthropic-beta` turns features
  on (1M context, new tools, output formats), `anthropic-version` selects the API version,
  `openai-beta` selects beta API behaviour. Not in the key: per-call ids (`x-request-id`,
  `idempotency-key`, `x-client-request-id`, `traceparent`, Claude Code's
  `x-claude-code-session-id`, Codex's `session_id`/`conversation_id`), client descriptions
  (`user-agent`, `x-stainless-*`, `x-app`, `originator`), and billing or routing headers
  that leave the answer as it is (`openai-organization`, `openai-project`,
  `x-goog-user-project`, `anthropic-dangerous-direct-browser-access`); the credential is
  the scope, not part of the key.
- Body fields left out (`IGNORED_FIELDS`): `stream` (the key gets a :sse/:json suffix
  instead), `stream_options`, and fields that only label a call for the provider's logs or
  routing: `metadata` (Claude Code's per-session `user_id`), `user`, `safety_identifier`,
  `prompt_cache_key` (Codex sends its conversation id there: a hint for the provider's
  prompt cache routing, not an input), `prompt_cache_retention` (how long the provider
  keeps that cache) and `client_metadata`. `store` stays in: it decides
  whether the answer's id can be continued with `previous_response_id`.
- Entries are stored under a *scope*: an HMAC-SHA-256 of the credential with a per-install
  secret. One API key never sees another's answers, and the DB holds no key, only HMACs.
- A proxied request must not wait on disk. `get()` is one prepared SELECT on a pooled
  connection; LRU access times are remembered in memory and written later; `put()` only
  queues the entry for a writer thread (and serves it from memory until it is committed).
- The cache is an optimisation, so it fails open: a locked, deleted, corrupt or full DB
  makes `get()` a miss and `put()` a no-op, is logged once, and is recovered from without
  a restart (a deleted or replaced file is re-created, a corrupt one is moved aside as
  `<db>.corrupt-<ts>`). That machinery is shared with accounting and lives in `tokenpak.db`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tokenpak import db
from tokenpak.db import DbFile, Health, classify, close_quietly

log = logging.getLogger("tokenpak.cache")

IGNORED_FIELDS = frozenset({"stream", "stream_options", "metadata", "user", "safety_identifier",
                            "prompt_cache_key", "prompt_cache_retention", "client_metadata"})
KEY_HEADERS = ("anthropic-beta", "anthropic-version", "openai-beta")  # lower-case names
LIST_HEADERS = frozenset({"anthropic-beta", "openai-beta"})  # comma-separated, order-free
ANONYMOUS = b"\x00tokenpak-anonymous"  # no real credential can equal this
MAX_IDLE_READERS = 8
MAX_PENDING_ENTRIES = 512
MAX_PENDING_BYTES = 64 * 1024 * 1024
BATCH_SECONDS = 0.05
COMMIT_WAIT_SECONDS = 1.0  # how long a put waits for its commit when workers share the DB
PURGE_SECONDS = 60.0


# ---------------------------------------------------------------- keys and scopes

def cache_key(provider: str, path: str, body: dict, headers=None) -> str:
    """SHA-256 hex of provider, path, every answer-changing field of `body` and the
    answer-changing request `headers` ({lower-case name: value}; see KEY_HEADERS)."""
    # ensure_ascii=True is as canonical as False and ~40% faster on a 120 KB agent prompt
    # (escaping keeps the str narrow); it also copes with lone surrogates from "\ud800".
    fields = [(name, json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                check_circular=False).encode("ascii"))
              for name, value in body.items() if name not in IGNORED_FIELDS]
    return key_from_fields(provider, path, fields, headers)


def key_from_fields(provider: str, path: str, fields, headers=None) -> str:
    """The cache key from each body field's JSON bytes as they are at hand: [(name, bytes)].

    The proxy passes the bytes it forwards (jsonbody.serialise: mostly the client's own
    text), so a 300 kB request is hashed once and dumped never. Every byte of every field
    not in IGNORED_FIELDS counts, fields in name order, each framed by its length: a
    changed value is a changed key; the same request (same bytes) is the same key. Two
    spellings of one value (whitespace, escapes, key order inside a field) may differ.
    """
    head = [provider, path]
    key_headers = key_header_values(headers)
    if key_headers:
        head.append(key_headers)
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, ensure_ascii=True).encode("ascii"))
    for name, data in sorted(fields, key=lambda field: field[0]):
        if name in IGNORED_FIELDS:
            continue
        label = name.encode("utf-8", "surrogatepass")
        digest.update(b"\n%d:%s%d:" % (len(label), label, len(data)))
        digest.update(data)
    return digest.hexdigest()


def key_header_values(headers) -> dict:
    """The KEY_HEADERS present in `headers` ({lower-case name: value}), normalised:
    list headers ("a, b,a") become the sorted set of their items ("a,b"), since the
    order in which features are switched on does not change the answer."""
    out = {}
    for name in KEY_HEADERS:
        value = (headers or {}).get(name)
        if value is None:
            continue
        value = str(value).strip()
        if name in LIST_HEADERS:
            value = ",".join(sorted({v.strip() for v in value.split(",") if v.strip()}))
        if value:
            out[name] = value
    return out


def load_secret(path: str) -> bytes:
    """The per-install 32-byte HMAC secret at `path`, created (0600, dir 0700) if missing.

    Creation is race-safe: the secret is written to a private temporary file that is then
    hard-linked into place, so a concurrent process sees either no file or a complete one.
    """
    from tokenpak.errors import TokenpakError

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        _create_secret(path, directory)
    try:
        with open(path, "rb") as fh:
            secret = fh.read()
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("tightened permissions of %s to 0600", path)
    except OSError as exc:
        raise TokenpakError("cannot read the cache secret %s: %s" % (path, exc.strerror),
                            hint="check the file's owner and permissions") from None
    if len(secret) < 16:
        raise TokenpakError("the cache secret %s is truncated" % path,
                            hint="delete it; tokenpak creates a new one (existing cache entries become unreachable)")
    return secret


def _create_secret(path, directory):
    tmp = os.path.join(directory, ".secret-%d-%s" % (os.getpid(), secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its secret
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fd2, "wb") as out, open(tmp, "rb") as src:
                out.write(src.read())
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def scope_id(credential, secret: bytes) -> str:
    """HMAC-SHA-256 hex of `credential`; no credential gets one fixed "anonymous" scope."""
    if credential is None or credential == "" or credential == b"":
        msg = ANONYMOUS
    elif isinstance(credential, bytes):
        msg = credential
    else:
        msg = str(credential).encode("utf-8", "surrogatepass")
    return hmac.digest(secret, msg, "sha256").hex()


# ---------------------------------------------------------------- the store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('cache_schema', '1');
CREATE TABLE IF NOT EXISTS cache_entries (
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL, key TEXT NOT NULL,
    size INTEGER NOT NULL, accessed REAL NOT NULL, created REAL NOT NULL,
    status INTEGER NOT NULL, streamed INTEGER NOT NULL, model TEXT NOT NULL,
    usage TEXT NOT NULL, headers TEXT NOT NULL,
    body BLOB NOT NULL,  -- last, so scans of size/accessed never read overflow pages
    UNIQUE (scope, key));
CREATE INDEX IF NOT EXISTS cache_entries_accessed ON cache_entries (accessed);
CREATE INDEX IF NOT EXISTS cache_entries_created ON cache_entries (created);
"""
_GET = ("SELECT status, headers, body, streamed, created, usage, model FROM cache_entries"
        " WHERE scope = ? AND key = ?")
_PUT = ("INSERT OR REPLACE INTO cache_entries (scope, key, size, accessed, created, status,"
        " streamed, model, usage, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_TOUCH = "UPDATE cache_entries SET accessed = ? WHERE scope = ? AND key = ? AND accessed < ?"


def _apply(conn, rows, touches):
    """One writer batch: new entries and remembered access times (db.Writer.write)."""
    conn.executemany(_PUT, rows)
    conn.executemany(_TOUCH, touches)


@dataclass
class Entry:
    """One cached upstream answer; `usage` is normalised (sse.Usage as a dict, see pricing)."""

    status: int
    headers: list
    body: bytes
    streamed: bool
    created: float
    usage: dict = field(default_factory=dict)
    model: str = ""


class CacheStore:
    """Entries keyed by (scope, key) in sqlite3, with TTL and LRU eviction past `max_mb`.

    Thread-safe. `get` runs in the caller's thread (one SELECT, no write); `put`, access
    times, expiry and eviction are handled by one background writer thread. No method
    raises on a database problem. `clock` is injectable so tests can age entries.
    """

    def __init__(self, db_path: str, ttl_seconds: int, max_mb, clock=time.time):
        self.db = DbFile(db_path, _SCHEMA, ("meta", "cache_entries"))
        self.ttl = float(ttl_seconds)
        self.max_bytes = int(float(max_mb) * 1024 * 1024)
        self.clock = clock
        self.dropped = 0  # puts not stored: queue full, too big, or the DB failing
        # With proxy.workers > 1 another process may get the repeat: a put then returns
        # once the entry is in the database, not only in this process's memory.
        self.wait_for_commit = False
        self._waiters = 0
        # reads and writes fail separately (a full disk still reads): one log line each
        self._read_health = Health(log, "reading the cache database %s" % self.db.path)
        self._w = db.Writer(self.db, log, "cache", on_open=self._opened)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending, self._queue, self._pending_bytes = {}, deque(), 0
        self._writing = False
        self._settled = 0  # writer batches settled: see version()
        self._touched = {}
        self._readers = []
        self._read_retry_at = 0.0
        self._corrupt_gen = None  # generation on which a reader saw corruption
        self._approx_bytes = None  # total entry size as last counted; None: count again
        self._vacuum = False  # eviction freed pages: give them back to the file system
        self._next_purge = 0.0
        self._closed = False
        self._wake = threading.Event()
        self._w.connection()
        self._thread = threading.Thread(target=self._run, name="tokenpak-cache-writer", daemon=True)
        self._thread.start()

    # -- hot path ------------------------------------------------------------

    def get(self, scope: str, key: str, since=None):
        """The fresh Entry for (scope, key), or None (missing, expired, or DB unusable).

        `since`: a version() taken before an earlier get() of the same (scope, key) that
        missed. Only entries this process put since then are looked for: they are in
        memory, or the version moved on and the database is asked. Saves the SELECT of a
        re-check (exchange.run) that almost always misses; entries another worker
        committed in between are not looked for (its identical requests are not
        coalesced with ours either)."""
        try:
            now = self.clock()
            entry = self._pending.get((scope, key))
            if entry is not None:
                return entry if now < entry.created + self.ttl else None
            if since is not None and since == self._settled:  # read after _pending: see _write_batch
                return None
            if self._closed or time.monotonic() < self._read_retry_at:
                return None
            row = self._select(scope, key)
            if self._read_health.state is not None:
                self._read_health.ok()
            if row is None or now >= row[4] + self.ttl:
                return None
            self._touched[(scope, key)] = now  # written by the writer thread
            return Entry(row[0], [tuple(h) for h in json.loads(row[1])], row[2], bool(row[3]),
                         row[4], json.loads(row[5]), row[6])
        except Exception as exc:
            self._read_failed(exc)
            return None

    def version(self) -> int:
        """Grows before any entry put in this process leaves memory for the database
        (see get's `since`)."""
        return self._settled

    def put(self, scope: str, key: str, entry: Entry) -> None:
        """Queue `entry` for the writer thread; readable from memory at once."""
        try:
            size = len(entry.body) + 1024
            if self._closed or size > self.max_bytes or self.ttl <= 0:
                self.dropped += 1
                return
            with self._lock:
                if (len(self._queue) >= MAX_PENDING_ENTRIES
                        or self._pending_bytes + size > MAX_PENDING_BYTES):
                    self.dropped += 1
                    return
                self._pending[(scope, key)] = entry
                self._queue.append((scope, key, entry, size))
                self._pending_bytes += size
                waits = self.wait_for_commit
                self._waiters += waits  # before the wake: the writer must not dawdle
            self._wake.set()
            if waits:
                self._await_commit(scope, key, entry)
        except Exception:
            log.exception("cache put failed; the answer is not cached")

    def _await_commit(self, scope, key, entry):
        """Wait until the writer committed `entry` (or gave up on it), at most
        COMMIT_WAIT_SECONDS: a repeat sent once this answer ended finds it in any worker."""
        deadline = time.monotonic() + COMMIT_WAIT_SECONDS
        with self._lock:
            try:
                while self._pending.get((scope, key)) is entry and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._idle.wait(left)
            finally:
                self._waiters -= 1

    def _select(self, scope, key):
        gen, conn = self._take_reader()
        try:
            row = conn.execute(_GET, (scope, key)).fetchone()
        except BaseException as exc:
            close_quietly(conn)
            if isinstance(exc, sqlite3.Error) and classify(exc) == "corrupt":
                self._corrupt_gen = gen  # the writer moves the file aside if still current
            raise
        if gen == self._w.gen and len(self._readers) < MAX_IDLE_READERS:
            self._readers.append((gen, conn))
        else:
            close_quietly(conn)
        return row

    def _take_reader(self):
        gen = self._w.gen
        while True:
            try:
                item = self._readers.pop()  # list.pop/append are atomic: no lock needed
            except IndexError:
                return gen, self.db.connect_reader()
            if item[0] == gen:
                return item
            close_quietly(item[1])

    def _read_failed(self, exc):
        kind = classify(exc) if isinstance(exc, sqlite3.Error) else "unavailable"
        self._read_health.failed(kind, exc)
        # A miss costs nothing but the saving; stop asking a broken DB for a while.
        self._read_retry_at = time.monotonic() + (0.5 if kind == "busy" else 1.0)
        if kind == "corrupt":
            self._wake.set()

    # -- writer thread -------------------------------------------------------

    def _run(self):
        while True:
            self._wake.wait(db.CHECK_SECONDS)
            if not self._closed and not self._waiters:
                # Let a burst of puts gather into one transaction: pending entries are
                # served from memory meanwhile, so waiting costs no hits. A put waiting
                # for its commit (workers share the DB) is not kept waiting.
                time.sleep(BATCH_SECONDS)
            self._wake.clear()
            stopping = self._closed
            try:
                self._write_batch(final=stopping)
                if not stopping:
                    self._maintain()
            except Exception:
                log.exception("cache writer error")
            if stopping:
                break
        self._w.close()

    def _write_batch(self, final=False):
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
            self._writing = True
        touched, self._touched = self._touched, {}
        retry = False
        try:
            if batch or touched:
                retry = self._commit(batch, touched, final)
        finally:
            with self._lock:
                # Before any entry leaves _pending: a get(since=...) that no longer finds
                # it in memory then sees a new version and asks the database.
                self._settled += 1
                for item in reversed(batch):
                    scope, key, entry, size = item
                    if self._pending.get((scope, key)) is not entry:
                        self._pending_bytes -= size  # replaced or cleared meanwhile
                    elif retry:
                        self._queue.appendleft(item)  # still answered from memory
                    else:
                        del self._pending[(scope, key)]
                        self._pending_bytes -= size
                self._writing = False
                self._idle.notify_all()
        if retry:
            for item, at in touched.items():
                self._touched.setdefault(item, at)  # access times wait with the batch
            self._wake.set()

    def _commit(self, batch, touched, final):
        """Write one batch; True when the DB was busy and the batch should be tried again."""
        now = self.clock()
        rows, added = [], 0
        for scope, key, e, _ in batch:
            headers = json.dumps([list(h) for h in e.headers], ensure_ascii=False)
            usage = json.dumps(e.usage or {})
            size = len(e.body) + len(headers) + len(usage) + len(e.model or "") + 200
            added += size
            rows.append((scope, key, size, now, float(e.created), int(e.status),
                         int(bool(e.streamed)), e.model or "", usage, headers, bytes(e.body)))
        touches = [(t, s, k, t) for (s, k), t in touched.items()]
        kind = self._w.write(_apply, rows, touches)
        if kind is not None:
            if self._w.should_retry(kind, final):
                return True
            self.dropped += len(batch)
            return False
        if self._approx_bytes is not None:
            self._approx_bytes += added
        if self._approx_bytes is None or self._approx_bytes > self.max_bytes:
            if self._w.write(self._evict) is None and self._vacuum:
                self._vacuum = False
                try:
                    self._w.conn.execute("PRAGMA incremental_vacuum")  # outside the transaction
                except sqlite3.Error as exc:
                    self._w.failed(exc)
        return False

    def _evict(self, conn):
        """Delete least-recently-used entries until the total is under 90% of the cap."""
        total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM cache_entries").fetchone()[0]
        if total > self.max_bytes:
            excess = total - int(self.max_bytes * 0.9)
            victims, freed = [], 0
            oldest = conn.execute("SELECT id, size FROM cache_entries ORDER BY accessed, id"
                                  " LIMIT 10000").fetchall()  # the rest at the next write
            for rowid, size in oldest:
                if freed >= excess:
                    break
                victims.append((rowid,))
                freed += size
            conn.executemany("DELETE FROM cache_entries WHERE id = ?", victims)
            total -= freed
            self._vacuum = True
        self._approx_bytes = total

    def _maintain(self):
        """Notice a deleted/replaced/corrupt file (db.Writer.maintain); expire old entries."""
        reported = self._corrupt_gen
        if not self._w.maintain(corrupt=reported is not None and reported == self._w.gen):
            return
        self._corrupt_gen = None
        if self._w.connection() is None:
            return
        now = time.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_SECONDS
            self.purge_expired()

    def _opened(self, conn):
        """A new writer connection, maybe on a new file: count its size, read it again."""
        self._approx_bytes = None
        self._read_retry_at = 0.0

    def purge_expired(self) -> int:
        """Delete expired entries now (the writer does this every minute); returns the count."""
        conn = self._w.connection() if threading.current_thread() is self._thread else None
        own = conn is None
        try:
            if own:
                conn = self.db.connect_writer(track=False)
            cur = conn.execute("DELETE FROM cache_entries WHERE created <= ?", (self.clock() - self.ttl,))
            if cur.rowcount:
                self._approx_bytes = None  # recount at the next write
            return max(cur.rowcount, 0)
        except (sqlite3.Error, OSError) as exc:
            if not own:
                self._w.failed(exc)
            return 0
        finally:
            if own:
                close_quietly(conn)

    # -- management (CLI) ----------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued put is committed (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._lock:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.1))
        return True

    def stats(self) -> dict:
        """entries, bytes, oldest/newest (epoch), per-scope counts (12-char scope ids)."""
        out = {"path": self.db.path, "entries": 0, "bytes": 0, "oldest": None, "newest": None,
               "scopes": {}, "max_bytes": self.max_bytes, "ttl_seconds": self.ttl,
               "pending": len(self._queue), "dropped": self.dropped, "file_bytes": 0}
        try:
            out["file_bytes"] = sum(os.path.getsize(self.db.path + s) for s in ("", "-wal")
                                    if os.path.exists(self.db.path + s))
            conn = self.db.connect_reader(timeout=1.0)
            try:
                n, size, oldest, newest = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created), MAX(created)"
                    " FROM cache_entries").fetchone()
                out.update(entries=n, bytes=size, oldest=oldest, newest=newest)
                for scope, count in conn.execute(
                        "SELECT substr(scope, 1, 12), COUNT(*) FROM cache_entries GROUP BY 1"):
                    out["scopes"][scope] = count
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            out["error"] = str(exc)
        return out

    def clear(self) -> int:
        """Delete every entry (pending ones too); returns how many were stored."""
        with self._lock:
            pending = len(self._pending)
            self._pending.clear()
            self._queue.clear()
            self._pending_bytes = 0
        conn = None
        try:
            conn = self.db.connect_writer(track=False)
            n = conn.execute("DELETE FROM cache_entries").rowcount
            conn.execute("PRAGMA incremental_vacuum")
            self._approx_bytes = None
            return max(n, 0) + pending
        except (sqlite3.Error, OSError) as exc:
            self._w.health.failed(classify(exc) if isinstance(exc, sqlite3.Error) else "unavailable", exc)
            return pending
        finally:
            close_quietly(conn)

    def close(self) -> None:
        """Write what is queued, stop the writer, close every connection."""
        if self._closed:
            return
        self.flush(timeout=5.0)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        self._w.gen += 1
        while self._readers:
            close_quietly(self._readers.pop()[1])
