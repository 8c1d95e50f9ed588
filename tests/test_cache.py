"""The cache: keys, scopes, the sqlite3 store, and failing open when the DB misbehaves."""

import glob
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import wait_for
from tokenpak import cache
from tokenpak.cache import CacheStore, Entry, cache_key, load_secret, scope_id
from tokenpak import db as dbmod
from tokenpak.db import DbFile

WAIT = 10.0  # upper bound for background recovery; only reached when something is broken
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi ✓"}],
        "temperature": 0.2, "max_tokens": 50}


@pytest.fixture(autouse=True)
def fast_maintenance(monkeypatch):
    """Let the writer thread check the file often and give up on locks quickly."""
    monkeypatch.setattr(dbmod, "CHECK_SECONDS", 0.05)
    monkeypatch.setattr(dbmod, "BUSY_TIMEOUT", 0.1)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "state" / "tokenpak.db")


@pytest.fixture
def store(db):
    s = CacheStore(db, ttl_seconds=3600, max_mb=16)
    yield s
    s.close()


def entry(body=b'{"answer": 42}', created=None, **kw):
    return Entry(status=kw.get("status", 200), headers=[("content-type", "application/json"), ("x-id", "1")],
                 body=body, streamed=kw.get("streamed", False),
                 created=time.time() if created is None else created,
                 usage={"input": 10, "output": 2, "cache_read": 0, "cache_write": 0}, model="gpt-4o")


def roundtrip_works(s, scope="s", key="probe"):
    """A put becomes readable from the DB (not just from memory)."""
    s.put(scope, key, entry(b"probe"))
    s.flush()
    got = s.get(scope, key)
    return got is not None and got.body == b"probe" and key not in {k for _, k in s._pending}


# ------------------------------------------------------------------ keys

def test_key_ignores_fields_that_cannot_change_the_answer():
    base = cache_key("openai", "/v1/chat/completions", BODY)
    for extra in ({"stream": True}, {"stream_options": {"include_usage": True}},
                  {"metadata": {"user_id": "u1"}}, {"user": "alice"}):
        assert cache_key("openai", "/v1/chat/completions", dict(BODY, **extra)) == base


@pytest.mark.parametrize("change", [
    {"model": "gpt-4o-mini"}, {"temperature": 0.3}, {"top_p": 0.9}, {"max_tokens": 51},
    {"stop": ["\n"]}, {"seed": 1}, {"n": 2}, {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "auto"},
    {"system": "be brief"}, {"messages": [{"role": "user", "content": "Hi ✗"}]},
])
def test_key_changes_with_every_answer_changing_field(change):
    assert cache_key("openai", "/v1/chat/completions", dict(BODY, **change)) != \
        cache_key("openai", "/v1/chat/completions", BODY)


def test_key_depends_on_provider_and_path_not_on_field_order():
    base = cache_key("openai", "/v1/chat/completions", BODY)
    assert cache_key("anthropic", "/v1/chat/completions", BODY) != base
    assert cache_key("openai", "/v1/messages", BODY) != base
    assert cache_key("openai", "/v1/chat/completions", dict(reversed(list(BODY.items())))) == base
    assert re.fullmatch("[0-9a-f]{64}", base)  # a SHA-256 hex digest, as the DB stores it


def test_key_ignores_per_call_labels_of_agents():
    base = cache_key("openai", "/v1/responses", BODY)
    for extra in ({"prompt_cache_key": "conv-1234"}, {"safety_identifier": "h"},
                  {"prompt_cache_retention": "24h"},
                  {"client_metadata": {"x": "y"}}):
        assert cache_key("openai", "/v1/responses", dict(BODY, **extra)) == base


def test_key_includes_answer_changing_headers_normalised():
    path = "/v1/messages"
    none = cache_key("anthropic", path, BODY)
    assert cache_key("anthropic", path, BODY, {}) == none  # no header: the old key
    beta = cache_key("anthropic", path, BODY, {"anthropic-beta": "context-1m-2025-08-07"})
    assert beta != none
    two = cache_key("anthropic", path, BODY, {"anthropic-beta": "a-1,b-2"})
    assert cache_key("anthropic", path, BODY, {"anthropic-beta": " b-2 , a-1,a-1"}) == two
    assert cache_key("anthropic", path, BODY, {"anthropic-beta": "a-1"}) != two
    assert cache_key("anthropic", path, BODY, {"anthropic-version": "2023-06-01"}) != none
    assert cache_key("openai", path, BODY, {"openai-beta": "assistants=v2"}) != \
        cache_key("openai", path, BODY)


def test_key_ignores_per_call_headers():
    base = cache_key("anthropic", "/v1/messages", BODY, {"anthropic-version": "2023-06-01"})
    noisy = {"anthropic-version": "2023-06-01", "x-request-id": "r1", "idempotency-key": "i",
             "x-stainless-retry-count": "1", "user-agent": "claude-cli/2.1", "traceparent": "t",
             "x-claude-code-session-id": "s", "x-client-request-id": "c", "session_id": "x",
             "openai-organization": "org", "openai-project": "p", "x-api-key": "sk-ant-x"}
    assert cache_key("anthropic", "/v1/messages", BODY, noisy) == base


def test_key_survives_lone_surrogates():
    """A lone surrogate (valid JSON text, not encodable as UTF-8) neither raises nor is
    collapsed into a replacement character that another prompt would share."""
    def key(text):
        return cache_key("openai", "/v1/chat/completions", {"messages": text})
    assert re.fullmatch("[0-9a-f]{64}", key("\ud800"))
    assert key("\ud800") == key("\ud800")
    assert len({key("\ud800"), key("\udc00"), key("\ufffd"), key("?"), key("")}) == 5


# ------------------------------------------------------------------ secret and scope

def test_secret_is_created_private_and_reused(tmp_path):
    path = str(tmp_path / "new" / "secret")
    first = load_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert load_secret(path) == first
    assert os.listdir(os.path.dirname(path)) == ["secret"]  # no temporary left behind


def test_secret_creation_race_gives_everyone_the_same_secret(tmp_path):
    path = str(tmp_path / "secret")
    barrier, got = threading.Barrier(8), []

    def worker():
        barrier.wait()
        got.append(load_secret(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(got) == 8 and len(set(got)) == 1


def test_secret_across_processes_is_the_same(tmp_path):
    path = str(tmp_path / "secret")
    code = "import sys; from tokenpak.cache import load_secret; sys.stdout.write(load_secret(sys.argv[1]).hex())"
    procs = [subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                              cwd=os.path.dirname(os.path.dirname(cache.__file__))) for _ in range(4)]
    outs = {p.communicate(timeout=WAIT)[0] for p in procs}
    assert outs == {load_secret(path).hex().encode()}


def test_truncated_secret_is_a_user_error(tmp_path):
    from tokenpak.errors import TokenpakError
    path = tmp_path / "secret"
    path.write_bytes(b"")
    with pytest.raises(TokenpakError):
        load_secret(str(path))


def test_scope_is_an_hmac_of_the_credential():
    secret = b"s" * 32
    a, b = scope_id("sk-aaa", secret), scope_id("sk-bbb", secret)
    assert a != b and len(a) == 64 and "sk-aaa" not in a
    assert scope_id("sk-aaa", b"t" * 32) != a  # depends on the per-install secret
    assert scope_id(None, secret) == scope_id("", secret) != scope_id("anonymous", secret)
    assert scope_id(b"sk-aaa", secret) == a


# ------------------------------------------------------------------ the store

def test_put_is_readable_at_once_and_after_commit(store):
    e = entry()
    store.put("scope-a", "k1", e)
    assert store.get("scope-a", "k1") is e  # from memory, before the writer commits
    assert store.flush()
    got = store.get("scope-a", "k1")
    assert got is not e and got == e
    assert got.headers == [("content-type", "application/json"), ("x-id", "1")]


def test_a_recheck_asks_the_database_only_after_this_process_committed(store, monkeypatch):
    """get(since=version()) after a miss: what this process put since is found, from memory
    or, once committed, from the file; while nothing was committed no SELECT runs."""
    selects = []
    real_select = store._select
    monkeypatch.setattr(store, "_select", lambda *a: selects.append(a) or real_select(*a))
    version = store.version()
    assert store.get("s", "k") is None and len(selects) == 1
    assert store.get("s", "k", since=version) is None and len(selects) == 1  # no SQL
    e = entry()
    store.put("s", "k", e)
    assert store.get("s", "k", since=version) is e  # from memory
    assert store.flush()
    assert store.version() != version
    got = store.get("s", "k", since=version)  # from the file
    assert got == e and got is not e and len(selects) == 2
    assert store.get("s", "other", since=store.version()) is None and len(selects) == 2


def test_other_scope_never_sees_an_entry(store):
    store.put("scope-a", "k1", entry())
    assert store.get("scope-b", "k1") is None
    store.flush()
    assert store.get("scope-b", "k1") is None
    assert store.get("scope-a", "k2") is None


def test_streamed_entry_roundtrips(store):
    sse = b"data: {\"x\": 1}\n\ndata: [DONE]\n\n"
    store.put("s", "k", entry(sse, streamed=True))
    store.flush()
    got = store.get("s", "k")
    assert got.streamed is True and got.body == sse and got.model == "gpt-4o"
    assert got.usage == {"input": 10, "output": 2, "cache_read": 0, "cache_write": 0}


def test_cache_survives_reopen(db):
    s = CacheStore(db, 3600, 16)
    s.put("s", "k", entry(b"kept"))
    s.close()
    s2 = CacheStore(db, 3600, 16)
    try:
        assert s2.get("s", "k").body == b"kept"
    finally:
        s2.close()


def test_ttl_expiry_with_an_injected_clock(db):
    now = [1_000_000.0]
    s = CacheStore(db, ttl_seconds=60, max_mb=16, clock=lambda: now[0])
    try:
        s.put("s", "k", entry(created=now[0]))
        now[0] += 59
        assert s.get("s", "k") is not None  # pending, still fresh
        s.flush()
        assert s.get("s", "k") is not None  # stored, still fresh
        now[0] += 2
        assert s.get("s", "k") is None
        s.purge_expired()  # (the writer's own periodic purge may have been first)
        assert s.stats()["entries"] == 0
    finally:
        s.close()


def test_lru_eviction_at_the_size_cap(db):
    now = [1000.0]
    s = CacheStore(db, ttl_seconds=10 ** 9, max_mb=1, clock=lambda: now[0])
    try:
        chunk = b"x" * (100 * 1024)
        for i in range(8):
            now[0] += 1
            s.put("s", "k%d" % i, entry(chunk, created=now[0]))
            s.flush()
        now[0] += 1
        assert s.get("s", "k0") is not None  # k0 becomes the most recently used
        for i in range(8, 14):
            now[0] += 1
            s.put("s", "k%d" % i, entry(chunk, created=now[0]))
            s.flush()
        st = s.stats()
        assert st["bytes"] <= 1024 * 1024
        assert s.get("s", "k0") is not None  # recently read: kept
        assert s.get("s", "k1") is None and s.get("s", "k2") is None  # least recently used: gone
        assert s.get("s", "k13") is not None  # newest: kept
    finally:
        s.close()


def test_entry_bigger_than_the_cap_is_not_stored(db):
    s = CacheStore(db, 3600, max_mb=0.01)
    try:
        s.put("s", "big", entry(b"x" * 20000))
        assert s.get("s", "big") is None and s.dropped == 1
    finally:
        s.close()


def test_stats_and_clear(store):
    store.put("a" * 64, "k1", entry())
    store.put("a" * 64, "k2", entry())
    store.put("b" * 64, "k1", entry())
    store.flush()
    st = store.stats()
    assert st["entries"] == 3 and st["bytes"] > 0
    assert st["scopes"] == {"a" * 12: 2, "b" * 12: 1}
    assert st["oldest"] <= st["newest"]
    assert store.clear() == 3
    assert store.stats()["entries"] == 0
    assert store.get("a" * 64, "k1") is None


def test_files_are_private_and_in_wal_mode(store, db):
    store.put("s", "k", entry())
    store.flush()
    assert stat.S_IMODE(os.stat(os.path.dirname(db)).st_mode) == 0o700
    for path in [db] + glob.glob(db + "-*"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_db_bytes_never_contain_a_credential(db, tmp_path):
    secret = load_secret(str(tmp_path / "state" / "secret"))
    credentials = ["sk-proj-SECRETkeyAAAA1111", "sk-ant-api03-SECRETkeyBBBB2222", "AIzaSECRETkeyCCCC3333"]
    s = CacheStore(db, 3600, 16)
    try:
        for cred in credentials + [None]:
            scope = scope_id(cred, secret)
            s.put(scope, cache_key("openai", "/v1/chat/completions", BODY), entry())
        s.flush()
        for cred in credentials:
            assert s.get(scope_id(cred, secret), cache_key("openai", "/v1/chat/completions", BODY))
        files = [db] + glob.glob(db + "-*")
        assert any(f.endswith("-wal") for f in files)  # checked while the WAL is live
        blobs = [open(f, "rb").read() for f in files]
    finally:
        s.close()
    blobs += [open(f, "rb").read() for f in [db] + glob.glob(db + "-*")]
    for cred in credentials:
        for blob in blobs:
            assert cred.encode() not in blob
            assert cred.encode("utf-16-le") not in blob


def test_concurrent_gets_and_puts(store):
    errors = []

    def worker(n):
        try:
            for i in range(40):  # 320 puts in all: under the pending-queue bound
                store.put("s", "k%d-%d" % (n, i % 10), entry(b"%d" % i))
                store.get("s", "k%d-%d" % (n, (i + 5) % 10))
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert store.flush()
    assert (store.stats()["entries"], store.dropped) == (80, 0)


# ------------------------------------------------------------------ failing open

def test_db_deleted_while_open_is_recreated(store, db):
    store.put("s", "old", entry())
    store.flush()
    for path in [db] + glob.glob(db + "-*"):
        os.unlink(path)
    store.get("s", "old")  # must not raise (a hit from the unlinked file is fine)
    store.put("s", "new", entry())
    assert wait_for(lambda: os.path.exists(db) and roundtrip_works(store))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM cache_entries WHERE key = 'probe'").fetchone()[0] == 1
    conn.close()


def test_corrupt_file_at_start_is_moved_aside(db):
    os.makedirs(os.path.dirname(db))
    with open(db, "wb") as fh:
        fh.write(b"this is not a database" * 300)
    s = CacheStore(db, 3600, 16)
    try:
        assert s.get("s", "k") is None
        assert roundtrip_works(s)
        assert len(glob.glob(db + ".corrupt-*")) == 1
    finally:
        s.close()


def test_corrupted_while_open_is_moved_aside_and_recovers(store, db):
    store.put("s", "k", entry())
    store.flush()
    with open(db, "r+b") as fh:
        fh.write(b"\x00garbage" * 64)
    store.get("s", "k")  # no exception, whatever it returns
    store.put("s", "k2", entry())
    assert wait_for(lambda: glob.glob(db + ".corrupt-*"))
    assert wait_for(lambda: roundtrip_works(store))


def test_corrupt_pages_behind_a_valid_header_are_detected(db):
    s = CacheStore(db, 3600, 16)
    for i in range(50):
        s.put("s", "k%d" % i, entry(b"y" * 3000))
    s.close()
    with open(db, "r+b") as fh:  # keep page 1 (header + schema), smash the rest
        fh.seek(4096)
        fh.write(b"\xff" * 4096 * 8)
    s = CacheStore(db, 3600, 16)
    try:
        for i in range(50):
            s.get("s", "k%d" % i)  # misses or hits, never an exception
        assert wait_for(lambda: roundtrip_works(s))
        moved = [f for f in glob.glob(db + ".corrupt-*") if not f.endswith(("-wal", "-shm"))]
        assert len(moved) == 1  # the fresh file is never mistaken for the corrupt one
    finally:
        s.close()


def test_reader_errors_are_misses_logged_once(store, monkeypatch, caplog):
    store.put("s", "k", entry())
    store.flush()

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_readers", [])
    monkeypatch.setattr(store.db, "connect_reader", locked)
    with caplog.at_level("WARNING", logger="tokenpak.cache"):
        for _ in range(20):
            store._read_retry_at = 0.0  # defeat the back-off so every get tries the DB
            assert store.get("s", "k") is None
    assert len([r for r in caplog.records if "busy" in r.getMessage()]) == 1


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO meta (key, value) VALUES ('locker', 'x')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_db_locked_by_another_process(store, db):
    store.put("s", "before", entry(b"before"))
    store.flush()
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, db], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        got = store.get("s", "before")  # WAL readers may still read; either way no exception
        assert got is None or got.body == b"before"
        store.put("s", "during", entry(b"during"))
        assert store.get("s", "during") is not None  # served from memory meanwhile
        assert store.flush()  # the writer gives up on the lock instead of hanging
        assert store.dropped == 1
    finally:
        proc.communicate("\n", timeout=WAIT)
    assert wait_for(lambda: roundtrip_works(store, key="after"))
    assert store.get("s", "before").body == b"before"


def test_read_your_writes_while_the_writer_waits_for_a_lock(store, db, monkeypatch):
    """An entry queued for the writer answers the next identical request, also while the
    writer cannot commit it (another process holds the write lock), and is committed, not
    dropped, once the lock is released."""
    monkeypatch.setattr(dbmod, "BUSY_RETRIES", 10 ** 6)
    store.put("s", "before", entry(b"before"))
    assert store.flush()
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, db], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        store.put("s", "queued", entry(b"queued"))
        assert wait_for(lambda: store._w.health.state == "busy")  # a commit failed already
        assert store.get("s", "queued").body == b"queued"
        assert wait_for(lambda: store._w.failures >= 3)  # ... and its retries too
        assert store.get("s", "queued").body == b"queued"
    finally:
        proc.communicate("\n", timeout=WAIT)
    assert store.flush()
    assert store.dropped == 0
    other = CacheStore(db, 3600, 16)  # reads the file, not this store's memory
    try:
        assert other.get("s", "queued").body == b"queued"
    finally:
        other.close()


def test_unusable_directory_then_recovery(tmp_path):
    blocker = tmp_path / "notadir"
    blocker.write_text("a file where the DB directory should be")
    db = str(blocker / "tokenpak.db")
    s = CacheStore(db, 3600, 16)
    try:
        assert s.get("s", "k") is None
        s.put("s", "k", entry())
        assert s.flush()
        assert "error" in s.stats()
        assert s.dropped == 1  # the entry could not be written: counted, not hidden
        assert s.clear() == 0  # nothing was stored; clearing an unusable DB does not raise
        blocker.unlink()  # the directory becomes creatable: the cache comes back
        assert wait_for(lambda: roundtrip_works(s))
        assert os.path.exists(db)
    finally:
        s.close()


def _as_unprivileged_user(func, *args):
    """Run func(*args) in a forked child without root's powers; returns its printed lines."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)  # nobody: directory and file permissions now apply
            os.write(write_fd, "\n".join(func(*args)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        out = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0, out
    return out.splitlines()


def _try_cache_at(*paths):
    lines = []
    for path in paths:
        s = CacheStore(path, 3600, 16)
        got = s.get("s", "before")
        s.put("s", "k", entry(b"x"))
        assert s.flush()
        lines.append("%s %s %d" % (got is not None and got.body == b"before",
                                   s.get("s", "k") is not None, s.dropped))
        s.close()
    return lines


def test_read_only_directory_and_file():
    """A DB in a directory the user cannot write, and a DB file the user cannot write."""
    import tempfile
    base = tempfile.mkdtemp(dir="/tmp")  # tmp_path's parents may not be traversable by nobody
    try:
        os.chmod(base, 0o755)
        os.mkdir(os.path.join(base, "ro"), 0o555)
        theirs = os.path.join(base, "theirs")
        os.mkdir(theirs, 0o755)
        existing = CacheStore(os.path.join(theirs, "tokenpak.db"), 3600, 16)
        existing.put("s", "before", entry(b"before"))
        existing.close()
        os.chmod(os.path.join(theirs, "tokenpak.db"), 0o644)
        os.chmod(theirs, 0o555)
        lines = _as_unprivileged_user(_try_cache_at, os.path.join(base, "ro", "tokenpak.db"),
                                      os.path.join(theirs, "tokenpak.db"))
        # nothing stored and nothing raised; the readable file may still serve its entry
        assert lines[0] == "False False 1"
        assert lines[1].split()[1:] == ["False", "1"]
    finally:
        subprocess.run(["chmod", "-R", "u+w", base])
        subprocess.run(["rm", "-rf", base])


def test_disk_full_drops_writes_then_recovers(db, monkeypatch):
    real_connect = DbFile.connect_writer
    full = [True]

    def connect_on_a_full_disk(self, timeout=5.0):
        conn = real_connect(self, timeout)
        if full[0]:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute("PRAGMA max_page_count=%d" % (pages + 2))
        return conn

    monkeypatch.setattr(DbFile, "connect_writer", connect_on_a_full_disk)
    s = CacheStore(db, 3600, 16)
    try:
        s.put("s", "big", entry(b"z" * 200000))
        assert s.flush()
        assert s.dropped == 1
        assert s.get("s", "big") is None
        full[0] = False  # space freed: the writer reconnects after its back-off
        assert wait_for(lambda: roundtrip_works(s))
    finally:
        s.close()


def test_no_exception_escapes_after_close(store):
    store.close()
    store.put("s", "k", entry())
    assert store.get("s", "k") is None
