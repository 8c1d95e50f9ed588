"""Reporting: `/stats` and `tokenpak stats` (`/metrics` is metrics.py).

`summary()` and `report()` read the accounting table directly, opening the DB read-only: they
work while the daemon runs (WAL lets readers in beside the writer) and while it is down, and
they never create the file.

Token vocabulary (the same everywhere here):
- "input": every prompt token sent to a provider, including those it read from its own
  prompt cache ("cache_read" is that subset), for requests that went upstream;
- "output": completion tokens of those requests;
- "cached": tokens of requests tokenpak answered itself (cache hits and coalesced
  followers), i.e. tokens no provider was paid for;
- "tokens_saved": "cached" plus the prompt tokens compression removed.

Dollars: "cost_usd" is what the providers billed (at the shipped or configured prices);
"saved_usd" what tokenpak saved, priced so it is never overstated (accounting.py's module
doc): a cache hit saved the request's cost, a token compression removed is worth the
cache-read price whenever the provider read or wrote its prompt cache for that request, and
the input price only when it cached nothing. "compression_saved_usd" is compression's part.
"""

from __future__ import annotations

import datetime
import os
import re
import sqlite3
import time
import urllib.parse

from tokenpak.accounting import SERVED_LOCALLY_SQL
from tokenpak.errors import ExitStatus, TokenpakError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LOCAL = "cache IN %s" % SERVED_LOCALLY_SQL
_PROMPT = "COALESCE(input_tokens, 0) + COALESCE(cache_read_tokens, 0) + COALESCE(cache_write_tokens, 0)"
# One pass over the rows of a group. Requests answered locally ("hit", "coalesced") paid no
# provider, so their tokens count as "cached" and not as input/output; a NULL cost with
# tokens answered locally or free is 0, so a NULL cost is a request whose price is unknown
# (its model has none, or its usage is unknown): "unpriced".
_AGGREGATES = """
    COUNT(*),
    COALESCE(SUM(cache = 'hit'), 0),
    COALESCE(SUM(cache = 'coalesced'), 0),
    COALESCE(SUM(tokens_after < tokens_before), 0),
    COALESCE(SUM(CASE WHEN {local} THEN 0 ELSE {prompt} END), 0),
    COALESCE(SUM(CASE WHEN {local} THEN 0 ELSE COALESCE(output_tokens, 0) END), 0),
    COALESCE(SUM(CASE WHEN {local} THEN 0 ELSE COALESCE(cache_read_tokens, 0) END), 0),
    COALESCE(SUM(CASE WHEN {local} THEN {prompt} + COALESCE(output_tokens, 0) ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN tokens_after < tokens_before THEN tokens_before - tokens_after
                 ELSE 0 END), 0),
    SUM(cost_usd),
    COALESCE(SUM(saved_usd), 0),
    COALESCE(SUM(cost_usd IS NULL), 0),
    MIN(ts),
    COALESCE(SUM({{compression_saved}}), 0)
""".format(local=_LOCAL, prompt=_PROMPT)
_NAMES = ("requests", "cached", "coalesced", "compressed_requests", "input", "output",
          "cache_read", "cached_tokens", "compression_saved", "cost_usd", "saved_usd",
          "unpriced", "first_ts", "compression_saved_usd")
# What `--by` and `/stats?by=` group on, each as the SQL of its label. Days and hours are
# local time, as a user reads a day; a tag or key nobody sent gets a label, not a NULL.
UNTAGGED, NO_KEY = "(untagged)", "(no key)"
_GROUPS = {
    "tag": "COALESCE(NULLIF(tag, ''), '%s')" % UNTAGGED,
    "key": "COALESCE(NULLIF(key_id, ''), '%s')" % NO_KEY,
    "model": "COALESCE(NULLIF(model, ''), '(unknown)')",
    "provider": "COALESCE(NULLIF(provider, ''), '(unknown)')",
    "day": "date(ts, 'unixepoch', 'localtime')",
    "hour": "strftime('%Y-%m-%d %H:00', ts, 'unixepoch', 'localtime')",
}
GROUPS = tuple(_GROUPS)
_IN_TIME_ORDER = ("day", "hour")


def parse_since(text: str) -> float:
    """"90s", "30m", "24h", "7d", "2w" or a date "2026-11-01" → the epoch-seconds cutoff."""
    value = str(text or "").strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", value)
    if match and float(match.group(1)) > 0:
        return time.time() - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%d"))
    except ValueError:
        pass
    raise TokenpakError("invalid --since value %r" % text,
                        hint="use a duration like 90s, 30m, 24h, 7d, 2w, or a date like 2026-11-01",
                        status=ExitStatus.USAGE)


def describe_since(text: str, cutoff: float) -> str:
    """How a --since value reads in a sentence: "in the last 7d", "since 2026-11-01"."""
    value = str(text).strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        later = " (a date in the future)" if cutoff > time.time() else ""
        return "since %s%s" % (value, later)
    return "in the last %s" % value


def cache_info(db_path: str):
    """Entries, bytes, oldest/newest and key count of the answer cache, read-only: None
    when there is no database. Unlike the server, it never creates a file or moves a
    corrupt one aside; it reports it."""
    empty = (0, 0, None, None, 0)  # a DB that accounting made before anything was cached
    try:
        conn = _connect(db_path)
        if conn is None:
            return None
        try:
            n, size, oldest, newest, scopes = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created), MAX(created),"
                " COUNT(DISTINCT scope) FROM cache_entries").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            n, size, oldest, newest, scopes = empty
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise unreadable(db_path, exc) from None
    return {"entries": n, "bytes": size, "oldest": oldest, "newest": newest, "scopes": scopes}


def unreadable(db_path, exc):
    """The error a read-only command (stats, cache stats, logs) gives for a DB it cannot
    read, with what the user can do about it."""
    return TokenpakError("cannot read the database %s: %s" % (db_path, exc),
                         hint="`tokenpak serve` moves a corrupt database aside when it "
                              "starts; or move it away yourself")


def _connect(db_path):
    """A read-only connection, or None when there is no DB yet."""
    path = os.path.abspath(os.path.expanduser(db_path))
    if not os.path.exists(path):
        return None
    uri = "file:%s?mode=ro" % urllib.parse.quote(path)
    return sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None)


def _query(db_path, dims, since):
    """{grouping: [(label, aggregates)]} for every grouping in `dims`, from one pass over the
    rows since `since`: the rows are grouped by all the groupings at once (a few thousand
    groups for a month), and each grouping is summed from those. /stats wants the totals by
    model and, for the dashboard, by day, tag and key: one scan instead of one each."""
    conn = _connect(db_path)
    if conn is None:
        return {dim: [] for dim in dims}
    try:
        # A DB the running daemon has not migrated yet lacks the newer columns.
        columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        aggregates = _AGGREGATES.format(compression_saved="compression_saved_usd"
                                        if "compression_saved_usd" in columns else "NULL")
        labels = ["%s AS g%d" % (_GROUPS[d] if d != "tag" or "tag" in columns
                                 else "'%s'" % UNTAGGED, i) for i, d in enumerate(dims)]
        values = ", ".join("%s(a%d)" % ("MIN" if name == "first_ts" else "SUM", i)
                           for i, name in enumerate(_NAMES))
        fine = "SELECT %s, %s FROM requests WHERE %s >= ? GROUP BY %s" % (
            ", ".join(labels), _aliased(aggregates), _ts_column(conn, since),
            ", ".join("g%d" % i for i in range(len(dims))))
        sql = "WITH fine AS (%s) %s" % (fine, " UNION ALL ".join(
            "SELECT %d, g%d, %s FROM fine GROUP BY g%d" % (i, i, values, i)
            for i in range(len(dims))))
        out = {dim: [] for dim in dims}
        for row in conn.execute(sql, (since or 0.0,)):
            out[dims[row[0]]].append((row[1], row[2:]))
        return out
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {dim: [] for dim in dims}  # a DB the cache made before any request
        raise
    finally:
        conn.close()


def _aliased(aggregates):
    """The aggregates' SQL with each one named a0, a1, ... (in _NAMES order)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(aggregates):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(aggregates[start:i])
            start = i + 1
    parts.append(aggregates[start:])
    return ", ".join("%s AS a%d" % (part.strip(), i) for i, part in enumerate(parts))


def _ts_column(conn, since):
    """"ts", or "+ts" (no index) when the cutoff keeps most rows: walking the ts index
    then reads every row through it, twice the work of reading the table in order (a
    month of 100,000 rows: 0.51 s of CPU against 0.26 s). The oldest row, from the index,
    says which: a cutoff within the newest quarter of the data keeps the index."""
    if not since:
        return "+ts"
    oldest = conn.execute("SELECT MIN(ts) FROM requests").fetchone()[0]
    if oldest is None:
        return "ts"
    now = time.time()
    return "ts" if now - since < 0.25 * (now - oldest) else "+ts"


def _empty():
    return {"cached": 0, "compressed_requests": 0,
            "token_usage": {"input": 0, "output": 0, "cached": 0},
            "requests": 0, "coalesced": 0, "tokens_saved": 0, "cost_usd": 0.0,
            "saved_usd": 0.0, "compression_saved_usd": 0.0, "unpriced_requests": 0,
            "since": None, "by_model": {}}


def summary(db_path: str, since: float | None = None, by=(), names=None) -> dict:
    """The /stats document: the seed's shape plus totals and a per-model breakdown, and
    with `by` (names from GROUPS) a "groups" object: {group: report(...) rows}.
    `names` ({key id: display name}) names the keys of a "key" group.

    Never raises but for an unknown group (a usage error): a missing DB gives zeros, an
    unreadable one zeros and an "error" text.
    """
    check_groups(by)
    out = _empty()
    dims = ["model"] + [name for name in by if name != "model"]
    try:
        rows = _query(db_path, dims, since)
    except sqlite3.Error as exc:
        out["error"] = "accounting database unreadable: %s" % exc
        return out
    if by:
        out["groups"] = {name: _rows(rows[name], name, names) for name in by}
    first = None
    for model, values in rows["model"]:
        d = dict(zip(_NAMES, values))
        saved_tokens = d["cached_tokens"] + d["compression_saved"]
        out["by_model"][model] = {
            "requests": d["requests"], "cached": d["cached"], "coalesced": d["coalesced"],
            "compressed_requests": d["compressed_requests"], "input": d["input"],
            "output": d["output"], "cache_read": d["cache_read"],
            "cached_tokens": d["cached_tokens"], "tokens_saved": saved_tokens,
            "cost_usd": d["cost_usd"], "saved_usd": d["saved_usd"],
            "compression_saved_usd": d["compression_saved_usd"], "unpriced": d["unpriced"]}
        for name in ("requests", "cached", "coalesced", "compressed_requests"):
            out[name] += d[name]
        out["token_usage"]["input"] += d["input"]
        out["token_usage"]["output"] += d["output"]
        out["token_usage"]["cached"] += d["cached_tokens"]
        out["tokens_saved"] += saved_tokens
        out["cost_usd"] += d["cost_usd"] or 0.0
        out["saved_usd"] += d["saved_usd"]
        out["compression_saved_usd"] += d["compression_saved_usd"]
        out["unpriced_requests"] += d["unpriced"]
        if d["first_ts"] is not None and (first is None or d["first_ts"] < first):
            first = d["first_ts"]
    if first is not None:
        out["since"] = datetime.datetime.fromtimestamp(first).astimezone().isoformat(timespec="seconds")
    return out


def report(db_path: str, since: float | None, by: str, names=None) -> list:
    """Rows for `tokenpak stats --by tag|key|model|provider|day|hour`: days and hours in
    time order, the others most expensive first.

    Each row: {by, requests, cached, input, output, cache_read, tokens_saved, cost_usd,
    saved_usd} plus "unpriced" when some requests had no known price. cost_usd is None
    when no request in the group had a known price. Grouped by key, a row also has
    "name": the key id's name from `names` ({key id: name}, keys.<id>.name), or None.
    """
    check_groups([by])
    try:
        rows = _query(db_path, [by], since)[by]
    except sqlite3.Error as exc:
        raise TokenpakError("cannot read the accounting database %s: %s" % (db_path, exc),
                            hint="check the file; tokenpak moves a corrupt DB aside when it starts") from None
    return _rows(rows, by, names)


def _rows(groups, by, names):
    """report()'s rows from [(label, aggregates)]."""
    any_unpriced = any(dict(zip(_NAMES, values))["unpriced"] for _, values in groups)
    out = []
    for label, values in groups:
        d = dict(zip(_NAMES, values))
        item = {by: label}
        if by == "key":
            item["name"] = (names or {}).get(label)
        item.update({"requests": d["requests"], "cached": d["cached"],
                     "input": d["input"], "output": d["output"], "cache_read": d["cache_read"],
                     "tokens_saved": d["cached_tokens"] + d["compression_saved"],
                     "cost_usd": d["cost_usd"], "saved_usd": d["saved_usd"]})
        if any_unpriced:
            item["unpriced"] = d["unpriced"]
        out.append(item)
    if by in _IN_TIME_ORDER:
        out.sort(key=lambda r: r[by])
    else:
        out.sort(key=lambda r: (-(r["cost_usd"] or 0.0), -r["requests"], r[by]))
    return out


def check_groups(names) -> list:
    """`names` if each is a grouping report() knows; else a usage error naming them."""
    for name in names:
        if name not in _GROUPS:
            raise TokenpakError("cannot group by %r" % name,
                                hint="use one of %s" % ", ".join(GROUPS),
                                status=ExitStatus.USAGE)
    return list(names)


_LABELS = {"tag": "Tag", "key": "Key", "name": "Name", "hour": "Hour",
           "model": "Model", "provider": "Provider", "day": "Day", "requests": "Requests",
           "cached": "Cached", "input": "Input tok", "output": "Output tok",
           "cache_read": "Prompt-cached", "tokens_saved": "Tokens saved", "cost_usd": "Cost",
           "saved_usd": "Saved", "unpriced": "Unpriced"}


# Characters that a terminal or a log viewer interprets rather than shows: C0 and C1
# controls (ESC starts colour and cursor sequences, CR/LF forge lines), DEL, and the Unicode
# line separators and bidirectional overrides that reorder what is displayed.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\\\]")


def _escape_char(match):
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def printable(text) -> str:
    """`text` safe to show a person: controls escaped as \\xNN (and a backslash doubled,
    so an escape cannot be faked). Client-chosen strings (model names, paths) pass here
    before they reach a terminal or a log line."""
    text = str(text)
    return _UNPRINTABLE.sub(_escape_char, text) if _UNPRINTABLE.search(text) else text


def _money(value):
    if value is None:
        return "unknown"
    if 0 < abs(value) < 0.01:  # a cheap model's day is real money, not "$0.00"
        return "$%.4f" % value
    return "${:,.2f}".format(value)


def _cell(column, value):
    if column.endswith("_usd"):
        return _money(value)
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return "{:,}".format(value)
    if isinstance(value, float):
        return "{:,.2f}".format(value)
    return printable(value)


def budget_report(db_path: str, budgets) -> list:
    """Each configured budget's state, from the DB, as /stats has it (budget.Ledger): the
    proxy keeps it in memory, and a user who got a 429 asks the CLI, not the daemon. The
    spend is that of the current local day and month, whatever --since says. [] without
    budgets; zero spend without a database yet."""
    from .budget import Ledger
    if budgets is None:
        return []
    ledger = Ledger()
    conn = _connect(db_path)
    if conn is not None:
        try:
            ledger.seed(conn)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):  # a DB with a cache and no requests yet
                raise unreadable(db_path, exc) from None
        except sqlite3.Error as exc:
            raise unreadable(db_path, exc) from None
        finally:
            conn.close()
    return ledger.report(budgets)


def format_budgets(rows: list) -> str:
    """The budgets as a text table: which, its period, limit, spend, share used and when
    it resets (local time); an exhausted one says that requests under it are refused."""
    from .budget import Limit, label
    table = [["Budget", "Period", "Limit", "Spent", "Used", "Resets"]]
    for r in rows:
        table.append([printable(label(Limit(r["scope"], r["name"], r["period"], 0))),
                      r["period"], _money(r["limit_usd"]), _money(r["spent_usd"]),
                      "%.0f%%" % (r["used"] * 100), r["resets_at"].replace("T", " ")[:16]
                      + ("  exhausted: refusing" if r["exhausted"] else "")])
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    lines = ["  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1])]
                       + [v.rjust(w) for v, w in zip(line[2:5], widths[2:5])] + [line[5]])
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(lines)


def format_table(rows: list) -> str:
    """Rows of dicts as an aligned text table with a totals row (first column is the label)."""
    if not rows:
        return "No requests recorded yet."
    columns = list(rows[0])
    totals = {columns[0]: "Total"}
    for col in columns[1:]:
        values = [r.get(col) for r in rows]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if col.endswith("_usd"):
            totals[col] = sum(numbers) if numbers else None
        elif numbers:
            totals[col] = sum(numbers)
        else:
            totals[col] = None
    table = [[_LABELS.get(c, c.replace("_", " ").capitalize()) for c in columns]]
    table += [[_cell(c, r.get(c)) for c in columns] for r in rows]
    footer = [_cell(c, totals[c]) for c in columns]
    widths = [max(len(line[i]) for line in table + [footer]) for i in range(len(columns))]
    # Labels (the first column, a key's name) align left; numbers and money right.
    left = [i == 0 or (not c.endswith("_usd") and all(
        isinstance(r.get(c), str) or r.get(c) is None for r in rows))
        for i, c in enumerate(columns)]

    def fmt(line):
        cells = [v.ljust(w) if is_left else v.rjust(w)
                 for v, w, is_left in zip(line, widths, left)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(table[0]), rule] + [fmt(line) for line in table[1:]] + [rule, fmt(footer)])
