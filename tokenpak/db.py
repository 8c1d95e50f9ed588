"""The sqlite3 file shared by the response cache and accounting, and how it fails open.

Why a module of its own: the cache (`cache.CacheStore`) and accounting (`accounting.Recorder`)
keep their tables in one DB file (db.path), so opening it, watching it and repairing it is
done once, here, for both. Neither owner depends on the other for it.

Fail-open: the DB is never what fails a request. A locked, missing, deleted, replaced,
corrupt or full DB makes the caller skip its read or write; `classify()` says which kind
of failure it was ("busy" is retried, "corrupt" moves the file aside), `Health` logs each
kind once and the recovery once, and `DbFile` notices a deleted, replaced or corrupt file
(`check()`), moves a corrupt one aside as `<db>.corrupt-<ts>` (`quarantine()`) and creates
a fresh one on the owner's next `connect_writer()`, all without a restart.

`Writer` is that lifecycle for one store's writer thread, written once for both stores:
open (moving a corrupt file aside), one transaction per batch with rollback, classify a
failure, keep a busy batch for a few retries, back off and reopen after anything else,
notice a deleted, replaced or corrupt file. Each store only says how to apply its batch.

The same-process lock trap: sqlite's locks are POSIX advisory locks, which belong to the
process, not the descriptor, and closing *any* descriptor of the file drops all of them.
So an existing DB file is never open()ed and close()d from Python (`DbFile._prepare` only
creates it with O_EXCL), and `_read_header` keeps its probe descriptors open for good;
otherwise another process could take the lock and delete a WAL our connections still use.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse

log = logging.getLogger("tokenpak.db")

SQLITE_MAGIC = b"SQLite format 3\x00"


def classify(exc) -> str:
    """"busy" (locked, try again), "corrupt" (move the file aside) or "unavailable"."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        primary = code & 0xFF
        if primary in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
            return "busy"
        if primary in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
            return "corrupt"
        return "unavailable"
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "busy"
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return "corrupt"
    return "unavailable"


class Health:
    """Logs a failure once per kind and the recovery once, instead of once per request."""

    def __init__(self, logger, what):
        self.log, self.what, self.state = logger, what, None

    def failed(self, kind, exc):
        if self.state != kind:
            self.state = kind
            self.log.warning("%s failed (%s; %s: %s); continuing without it", self.what, kind,
                             type(exc).__name__, exc)

    def ok(self):
        if self.state is not None:
            self.state = None
            self.log.info("%s works again", self.what)


class DbFile:
    """One sqlite3 file shared by the cache and accounting: opening it with the right
    modes and pragmas, noticing it was deleted, replaced or corrupted, moving a corrupt
    file aside."""

    def __init__(self, path: str, schema: str, tables: tuple):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.schema = schema
        self.tables = tables  # when these exist the schema is not re-run (that needs a write lock)
        self.identity = None  # (st_dev, st_ino) of the file the writer has open

    # Never open() and close() an existing DB file from Python: closing any descriptor of a
    # file drops every POSIX lock this process holds on it, including sqlite's, and another
    # process may then delete a WAL that our connections still use.
    def _prepare(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            if os.stat(self.path).st_mode & 0o077:
                os.chmod(self.path, 0o600)  # it holds prompts and answers
        return os.stat(self.path)

    def connect_writer(self, timeout: float = 5.0, track: bool = True) -> sqlite3.Connection:
        """A read-write autocommit connection; creates the file and the schema.

        track=True: this is the owner's long-lived writer, whose file `check()` watches.
        """
        st = self._prepare()
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective on a new file only
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            found = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN (%s)"
                                 % ",".join("?" * len(self.tables)), self.tables).fetchone()[0]
            if found < len(self.tables):
                conn.executescript(self.schema)
        except BaseException:
            conn.close()
            raise
        if track:
            self.identity = (st.st_dev, st.st_ino)
        return conn

    def connect_reader(self, timeout: float = 0.02, readonly: bool = False) -> sqlite3.Connection:
        """A connection that never creates the file (a missing file is an error)."""
        uri = "file:%s?mode=%s" % (urllib.parse.quote(self.path), "ro" if readonly else "rw")
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)

    def check(self) -> str:
        """"ok", "moved" (deleted or replaced since the writer opened it) or "corrupt"."""
        try:
            st = os.stat(self.path)
        except OSError:
            return "moved"
        if self.identity is not None and (st.st_dev, st.st_ino) != self.identity:
            return "moved"
        if st.st_size >= 100 and _read_header((st.st_dev, st.st_ino), self.path) not in (SQLITE_MAGIC, None):
            return "corrupt"
        return "ok"

    def quarantine(self) -> None:
        """Move a corrupt file (and its -wal/-shm) aside as `<db>.corrupt-<ts>`."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if self.identity is not None and (st.st_dev, st.st_ino) != self.identity:
            return  # someone (the other writer) already moved it
        stamp = "%s-%s" % (time.strftime("%Y%m%d-%H%M%S"), secrets.token_hex(3))
        for suffix in ("", "-wal", "-shm"):
            try:
                os.rename(self.path + suffix, "%s.corrupt-%s%s" % (self.path, stamp, suffix))
            except OSError:
                pass
        log.warning("moved the corrupt database %s aside as %s.corrupt-%s; starting a fresh one",
                    self.path, self.path, stamp)


_PROBES = {}  # (st_dev, st_ino) -> a read-only descriptor kept open for good (see _prepare)
_PROBES_LOCK = threading.Lock()


def _read_header(identity, path):
    """The first 16 bytes of the file `identity`, or None if it cannot be read."""
    with _PROBES_LOCK:
        fd = _PROBES.get(identity)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != identity:
                _PROBES[(st.st_dev, st.st_ino)] = fd  # raced with a replacement: keep it anyway
                return None
            _PROBES[identity] = fd
    try:
        return os.pread(fd, 16, 0)
    except OSError:
        return None


def close_quietly(conn) -> None:
    """Close `conn` (None is fine), ignoring any error: used on paths that already failed."""
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


BUSY_TIMEOUT = 2.0  # seconds a writer waits for another connection's write lock
CHECK_SECONDS = 1.0  # how often a writer checks its file is still there and sane
BACKOFF_SECONDS, BACKOFF_MAX = 0.25, 10.0  # reopen after 0.5 s, 1 s, 2 s ... at most 10 s
BUSY_RETRIES = 5  # busy writes in a row after which a batch is dropped


class Writer:
    """The write connection of one store's writer thread (the cache's, accounting's), and
    its fail-open lifecycle, written once for both.

    `write(apply, *args)` runs `apply(conn, *args)` in one BEGIN IMMEDIATE transaction and
    returns None when it committed, else the kind of failure (see `classify`) after rolling
    back: "busy" leaves the connection open (the owner may retry), "corrupt" moves the file
    aside, anything else (full, read-only, I/O error, missing table) closes the connection
    and reopens it after a growing back-off. `maintain()` notices a deleted, replaced or
    corrupt file. Each failure kind is logged once, and the recovery once (`Health`).
    `gen` grows whenever the connection may be on another file: pooled readers reconnect.
    """

    def __init__(self, db: DbFile, logger, what: str, on_open=None, busy_timeout=None):
        self.db, self.log, self.what = db, logger, what
        self.health = Health(logger, "writing the %s database %s" % (what, db.path))
        self.on_open = on_open  # runs on every new connection (a migration, a recount)
        self.busy_timeout = busy_timeout  # None: BUSY_TIMEOUT
        self.conn = None
        self.gen = 0
        self.failures = 0  # consecutive failed writes or opens; 0 after a success
        self._retry_at = 0.0
        self._next_check = 0.0

    def connection(self):
        """The open connection, opened now if the back-off allows; None while unusable."""
        if self.conn is None and time.monotonic() >= self._retry_at:
            self._open()
        return self.conn

    def _open(self):
        for attempt in (1, 2):
            previous = self.db.identity
            conn = None
            try:
                timeout = BUSY_TIMEOUT if self.busy_timeout is None else self.busy_timeout
                conn = self.db.connect_writer(timeout=timeout)
                if self.on_open is not None:
                    self.on_open(conn)
            except (sqlite3.Error, OSError) as exc:
                close_quietly(conn)
                if attempt == 1 and isinstance(exc, sqlite3.Error) and classify(exc) == "corrupt":
                    self.db.quarantine()
                    continue
                self._back_off(exc)
                return
            if self.db.identity != previous:
                self.gen += 1
            self.conn = conn
            return

    def write(self, apply, *args):
        """Run `apply(conn, *args)` in one transaction: None on commit, else the failure kind."""
        conn = self.connection()
        if conn is None:
            return "unavailable"
        try:
            conn.execute("BEGIN IMMEDIATE")  # one transaction per batch: one WAL append
            apply(conn, *args)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return self.failed(exc)
        self.failures = 0
        self.health.ok()
        return None

    def failed(self, exc) -> str:
        """Log and act on a failed write (see the class doc); returns its kind."""
        kind = classify(exc) if isinstance(exc, sqlite3.Error) else "unavailable"
        if kind == "corrupt":
            self.health.failed(kind, exc)
            self.failures += 1
            self.reset(quarantine=True)
        elif kind == "busy":
            self.health.failed(kind, exc)
            self.failures += 1
        else:
            self._back_off(exc)
        return kind

    def should_retry(self, kind, final=False) -> bool:
        """Whether a batch that failed with `kind` is worth another try: another process
        holding the lock (a `sqlite3` shell, a backup) usually lets go soon, so a busy
        batch is kept for a few rounds; nothing else fixes itself by retrying."""
        return kind == "busy" and not final and self.failures <= BUSY_RETRIES

    def _back_off(self, exc):
        self.health.failed(classify(exc) if isinstance(exc, sqlite3.Error) else "unavailable", exc)
        close_quietly(self.conn)
        self.conn = None
        self.failures += 1
        self._retry_at = time.monotonic() + min(BACKOFF_SECONDS * 2 ** self.failures, BACKOFF_MAX)

    def reset(self, quarantine: bool) -> None:
        """Let go of the file (moving it aside if corrupt); the next write opens a fresh one."""
        close_quietly(self.conn)
        self.conn = None
        if quarantine:
            self.db.quarantine()
        self.gen += 1
        self._retry_at = 0.0

    def maintain(self, corrupt: bool = False) -> bool:
        """At most once per CHECK_SECONDS: let go of a deleted or replaced file, move a corrupt
        one aside (`corrupt`: a reader already saw it is). True when the check ran."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_SECONDS
        state = "corrupt" if corrupt else self.db.check()
        if state == "corrupt" or (state == "moved" and self.conn is not None):
            if state == "moved":
                self.log.warning("the %s database %s was deleted or replaced; re-creating it",
                                 self.what, self.db.path)
            self.reset(quarantine=state == "corrupt")
        return True

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn = None
