"""`tokenpak logs`: the recent requests, one line each, from the accounting table.

Like `stats`, it reads the database directly and read-only (`stats._connect`): it works while
the daemon runs (WAL lets a reader in beside the writer) and while it is down, and it never
creates the file. The rows are the accounting rows (accounting.py), so a line shows exactly
what /stats and the bill-side figures are summed from.

`--follow` polls for rows with a larger id every POLL_SECONDS, opening the file afresh each
time, so it keeps working when the daemon starts later, restarts, or moves a corrupt
database aside. How late a request shows: the daemon records a row when the answer has
gone out and its writer thread writes rows in batches, at most `flush_interval` (0.5 s)
after the first row of a batch is queued; a poll then sees it within POLL_SECONDS. A
request therefore shows within about 0.7 s of its end.

Everything a client chose (tag, model, error text) goes through `stats.printable` before it
reaches the terminal, so a control character cannot move the cursor or forge a line.
"""

from __future__ import annotations

import datetime
import json
import re
import sqlite3
import time

from tokenpak.errors import ExitStatus, TokenpakError
from tokenpak import stats
from tokenpak.stats import _connect, _money, printable

POLL_SECONDS = 0.2
DEFAULT_LIMIT = 20
# What a line or a JSON object holds, in the table's own names ("prompt_tokens" is derived).
_FIELDS = ("id", "ts", "tag", "key_id", "provider", "model", "method", "path", "status",
           "streamed", "cache", "input_tokens", "output_tokens", "cache_read_tokens",
           "cache_write_tokens", "tokens_before", "tokens_after", "cost_usd", "saved_usd",
           "latency_ms", "ttfb_ms", "complete", "error")
_STATUS = re.compile(r"^([1-5])(?:xx|\d\d)$")
# (header, width, right-aligned) of the text columns; the error takes the rest of the line.
_COLUMNS = (("time", 19, False), ("tag", 12, False), ("model", 22, False), ("status", 6, True),
            ("in", 9, True), ("out", 7, True), ("saved", 9, True), ("cost", 9, True),
            ("cache", 9, False), ("latency", 9, True), ("error", 0, False))


class Filters:
    """Which rows to show: all of them match (None: no condition)."""

    def __init__(self, tag=None, model=None, status=None, since=None):
        self.tag, self.model, self.since = tag, model, since
        self.status = parse_status(status) if status else None

    def where(self):
        """(SQL conditions joined by AND, parameters)."""
        sql, params = [], []
        if self.since is not None:
            sql.append("ts >= ?")
            params.append(self.since)
        if self.tag is not None:
            sql.append("tag = ?")
            params.append(self.tag)
        if self.model is not None:
            if any(c in self.model for c in "*?["):
                sql.append("model GLOB ?")
                params.append(self.model)
            else:  # a family takes its snapshots: gpt-4o matches gpt-4o-2024-08-06
                sql.append("(model = ? OR model GLOB ?)")
                params += [self.model, self.model + "-*"]
        if self.status:
            parts = []
            for low, high in self.status:
                parts.append("status BETWEEN ? AND ?")
                params += [low, high]
            sql.append("(%s)" % " OR ".join(parts))
        return " AND ".join(sql) or "1", params


def parse_status(text: str) -> list:
    """"429", "5xx", "2xx,429" → [(low, high), ...] inclusive ranges of status codes."""
    ranges = []
    for part in str(text).lower().replace(" ", "").split(","):
        match = _STATUS.match(part)
        if not match:
            raise TokenpakError("invalid --status value %r" % text,
                                hint="use a code like 429, a class like 5xx, or a list: 4xx,5xx",
                                status=ExitStatus.USAGE)
        if part.endswith("xx"):
            low = int(match.group(1)) * 100
            ranges.append((low, low + 99))
        else:
            ranges.append((int(part), int(part)))
    return ranges


def _select(conn):
    """The SELECT list for this DB: a column an older schema lacks (tag before schema 3,
    method before 2) reads as NULL."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    return ", ".join(f if f in have else "NULL AS %s" % f for f in _FIELDS)


def read(db_path: str, filters: Filters, limit=None):
    """(the newest `limit` matching rows (all with None) as dicts, oldest first; the largest
    id in the table, where a follow goes on from). The rows are None when there is no
    database yet, [] when it holds no request table yet."""
    top = [0]

    def query(conn, select, where, params):
        top[0] = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
        sql = ("SELECT %s FROM requests WHERE id <= ? AND %s ORDER BY id DESC LIMIT ?"
               % (select, where))
        return conn.execute(sql, [top[0]] + params + [-1 if limit is None else limit]
                            ).fetchall()[::-1]
    found = _read(db_path, filters, query)
    return (None if found is None else [dict(zip(_FIELDS, r)) for r in found]), top[0]


def newer(db_path: str, filters: Filters, after: int):
    """(matching rows with an id above `after`, oldest first, at most 1000; the id to go
    on from). The id is the last one looked at, matching or not, so a filtered follow does
    not look at the same rows again; it is 0 when the database is gone or has started afresh
    with smaller ids (then everything in it is new)."""
    top = [after]

    def query(conn, select, where, params):
        top[0] = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
        if top[0] < after:
            return []
        sql = ("SELECT %s FROM requests WHERE id > ? AND id <= ? AND %s ORDER BY id LIMIT 1000"
               % (select, where))
        rows = conn.execute(sql, [after, top[0]] + params).fetchall()
        if len(rows) == 1000:
            top[0] = rows[-1][0]
        return rows
    found = _read(db_path, filters, query)
    rows = [dict(zip(_FIELDS, r)) for r in found or ()]
    return rows, (0 if found is None or top[0] < after else top[0])


def _read(db_path, filters, query):
    """query(conn, select list, where, params) on a read-only connection; None without a
    database, [] without a request table; a TokenpakError when the file is unreadable."""
    try:
        conn = _connect(db_path)
        if conn is None:
            return None
        try:
            where, params = filters.where()
            return query(conn, _select(conn), where, params)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise stats.unreadable(db_path, exc) from None


def prompt_tokens(row):
    """Every prompt token the provider was sent: uncached, read from and written to its cache."""
    parts = [row.get(c) for c in ("input_tokens", "cache_read_tokens", "cache_write_tokens")]
    return None if all(p is None for p in parts) else sum(p or 0 for p in parts)


def as_json(row) -> str:
    """One JSON object per line: every field, the time also in ISO 8601 with its offset."""
    obj = dict(row)
    obj["time"] = _when(row["ts"]).isoformat(timespec="milliseconds")
    obj["prompt_tokens"] = prompt_tokens(row)
    for name in ("streamed", "complete"):
        if obj[name] is not None:
            obj[name] = bool(obj[name])
    return json.dumps(obj, ensure_ascii=True)


def _when(ts):
    return datetime.datetime.fromtimestamp(ts or 0).astimezone()


def header() -> str:
    return _line([(name, width, right) for name, width, right in _COLUMNS])


def as_text(row) -> str:
    """One aligned line; empty cells for what is unknown, "unknown" for an unknown cost."""
    cells = [
        _when(row["ts"]).strftime("%Y-%m-%d %H:%M:%S"),
        printable(row["tag"]) if row["tag"] is not None else "-",
        printable(row["model"]) if row["model"] else "-",
        str(row["status"]) if row["status"] is not None else "-",
        _count(prompt_tokens(row)),
        _count(row["output_tokens"]),
        _money(row["saved_usd"]) if row["saved_usd"] else "",
        _money(row["cost_usd"]),
        printable(row["cache"] or "-"),
        "%.0f ms" % row["latency_ms"] if row["latency_ms"] is not None else "",
        printable(row["error"]) if row["error"] else "",
    ]
    return _line([(cell, width, right) for cell, (_, width, right) in zip(cells, _COLUMNS)])


def _count(value):
    return "" if value is None else "{:,}".format(value)


def _line(cells):
    text = "  ".join(cell.rjust(width) if right else cell.ljust(width)
                     for cell, width, right in cells)
    return text.rstrip()


def follow(db_path, filters, start_id, emit, warn, poll=POLL_SECONDS, sleep=time.sleep):
    """Emit each matching row written after `start_id`, as it is written, until interrupted.

    A database that does not exist yet is waited for; one whose ids went backwards (moved
    aside and started afresh by the daemon) is followed from its start; one that cannot be
    read is reported once (`warn`) and tried again, as the daemon may be replacing it.
    """
    seen, failing = start_id, None
    while True:
        try:
            rows, seen = newer(db_path, filters, seen)
            failing = None
        except TokenpakError as exc:
            if exc.message != failing:
                warn(exc.message)
            rows, failing = [], exc.message
        for row in rows:
            emit(row)
        if len(rows) < 1000:
            sleep(poll)
