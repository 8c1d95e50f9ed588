"""Budgets that block: daily and monthly USD limits, global, per tag and per key.

A budget is a limit on what tokenpak has seen spent in the current local day or month
(`budget.daily_usd`, `budget.monthly_usd`, and the same under `budget.tags.<tag>.` and
`budget.keys.<key id>.`). Once the spend of any budget that applies to a request has reached
its limit, the request is not forwarded: exchange.forward answers 429 in the provider's own
error shape instead (`refusal`). The check sits just before the upstream call, so cache
hits and coalesced followers, which cost nothing, are still answered.

The check costs a few dictionary look-ups, never a DB query (`check`). The spend lives in
a `Ledger`, one per process:
- seeded from the DB with one query when the accounting writer opens it (at start, and
  again whenever it reopens the file);
- incremented by every row the Recorder records (`add`), as soon as its cost is known;
- kept in step with the DB on the accounting writer thread: each batch it writes first
  reads the rows other processes (proxy.workers) wrote since its last look (under the same
  write lock, so none is missed or counted twice), and an idle writer looks every
  REFRESH_SECONDS;
- rolled over at local midnight, and on the 1st of the month.
Totals are kept as "written" (in the DB, as of the writer's last look) plus "pending"
(recorded here, not yet written), so a row is counted once whichever side holds it.

What the budget can see is what tokenpak prices: a stream's cost is known only at its end,
so the request that crosses a limit completes and the next one is refused; requests with
an unknown price (a model without a price, a pass-through body tokenpak does not parse)
add nothing. The README's "Budgets" section says so for users.
"""

import collections
import datetime
import logging
import math
import sqlite3
import threading
import time

log = logging.getLogger("tokenpak")

PERIODS = ("daily", "monthly")
SCOPES = ("global", "tag", "key")
WARN_AT = 0.8            # the share of a limit at which the log warns (once per period)
REFRESH_SECONDS = 2.0    # an idle accounting writer reads other workers' spend this often
MAX_NAMES = 10000        # tags and keys tracked per month beyond the configured ones
# A day's and a month's spend of one (scope, name); index 0 daily, 1 monthly.
DAY, MONTH = 0, 1

# One configured limit: scope "global" | "tag" | "key", name None | tag | key id,
# period "daily" | "monthly", usd the limit.
Limit = collections.namedtuple("Limit", "scope name period usd")


class Budgets:
    """The budgets a config sets (immutable; part of the runtime snapshot). Each limit is
    kept as a "probe" with what the check needs, in the order it reads them: (its ledger
    key, the period's index in the ledger's [day, month], the limit in USD, the Limit, the
    spend at which the log warns)."""

    __slots__ = ("limits", "probes", "everyone", "tags", "keys")

    def __init__(self, limits):
        self.limits = tuple(limits)
        self.probes = tuple(((limit.scope, limit.name), DAY if limit.period == "daily"
                             else MONTH, limit.usd, limit, WARN_AT * limit.usd)
                            for limit in self.limits)
        self.everyone = ()
        self.tags, self.keys = {}, {}
        for probe in self.probes:
            limit = probe[3]
            if limit.scope == "global":
                self.everyone += (probe,)
            else:
                found = self.tags if limit.scope == "tag" else self.keys
                found[limit.name] = found.get(limit.name, ()) + (probe,)

    @classmethod
    def from_config(cls, config):
        """The budgets of `config`, or None when it sets none (then nothing is checked)."""
        limits = []
        for period in PERIODS:
            usd = config.get("budget.%s_usd" % period)
            if usd:
                limits.append(Limit("global", None, period, float(usd)))
        for scope, per_name in (("tag", config.tag_budgets()), ("key", config.key_budgets())):
            for name in sorted(per_name):
                for period in PERIODS:
                    usd = per_name[name].get(period + "_usd")
                    if usd:
                        limits.append(Limit(scope, name, period, float(usd)))
        return cls(limits) if limits else None

    def applying(self, tag, key_id):
        """The limits a request with this tag and key id is under."""
        return tuple(probe[3] for probe in self.probes_for(tag, key_id))

    def probes_for(self, tag, key_id):
        found = self.everyone
        if tag and tag in self.tags:
            found = found + self.tags[tag]
        if key_id and key_id in self.keys:
            found = found + self.keys[key_id]
        return found


def _period_starts(now):
    """(day start, next day, month start, next month) as epoch seconds, in local time: a
    day starts at local midnight, a month at local midnight on the 1st."""
    today = datetime.date.fromtimestamp(now)
    first = today.replace(day=1)
    following = (first.replace(year=first.year + 1, month=1) if first.month == 12
                 else first.replace(month=first.month + 1))
    return tuple(time.mktime(d.timetuple()) for d in
                 (today, today + datetime.timedelta(days=1), first, following))


def iso_local(ts):
    """ISO 8601 in local time with its offset: 2026-11-24T00:00:00+01:00."""
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat()


class Ledger:
    """This process's view of the spend per (scope, name), per day and month; see the
    module doc. Handler threads call `add`, `check` and `report`; the accounting writer
    thread calls `seed`, `write`, `written` and `refresh`."""

    def __init__(self):
        self.budgets = None
        self._lock = threading.Lock()
        self._total = {}     # (scope, name) -> [day, month]: what check reads
        self._written = {}   # the part of _total that is in the DB, as of the last look
        self._last_id = 0    # the highest row id the writer has looked at
        self._staged = None  # other processes' rows read in the write transaction
        self._warned = set()  # (limit, period start, level) already logged
        self._refresh_at = 0.0
        self.seeded = threading.Event()
        self._roll(time.time())

    def configure(self, budgets):
        """The budgets in effect (start, SIGHUP); warnings are re-checked against them."""
        self.budgets = budgets
        with self._lock:
            self._warn()

    # -- periods ----------------------------------------------------------------------------
    def _roll(self, now):
        """Start the period `now` is in: a new day zeroes the daily spend, a new month all."""
        day, next_day, month, next_month = _period_starts(now)
        new_month = getattr(self, "month_start", None) != month
        self.day_start, self.next_day, self.month_start, self.next_month = \
            day, next_day, month, next_month
        for totals in (self._total, self._written):
            if new_month:
                totals.clear()
            else:
                for spent in totals.values():
                    spent[DAY] = 0.0
        self._warned = {w for w in self._warned if w[1] >= day}

    def _current(self, now):
        if now >= self.next_day:
            with self._lock:
                if now >= self.next_day:
                    self._roll(now)

    def resets(self, limit):
        return self.next_day if limit.period == "daily" else self.next_month

    # -- the check (hot path) -----------------------------------------------------------
    def spent(self, limit):
        found = self._total.get((limit.scope, limit.name))
        return found[DAY if limit.period == "daily" else MONTH] if found else 0.0

    def check(self, budgets, tag, key_id, now=None):
        """None, or (limit, spent) of the exhausted budget that resets last among those
        that apply to a request with this tag and key id."""
        now = time.time() if now is None else now
        if now >= self.next_day:
            self._current(now)
        total, worst = self._total, None
        for probes in (budgets.everyone, budgets.tags.get(tag) if tag else None,
                       budgets.keys.get(key_id) if key_id else None):
            for key, index, usd, limit, _ in probes or ():
                spent = total.get(key)
                if spent is not None and spent[index] >= usd and (
                        worst is None or index > worst[0]):  # a month outlasts a day
                    worst = (index, limit, spent[index])
        return None if worst is None else worst[1:]

    # -- spend coming in ----------------------------------------------------------------------
    def _shares(self, ts):
        """(counts for the day, counts for the month) for a row written at `ts`."""
        return ts >= self.day_start, ts >= self.month_start

    def _bump(self, totals, scope, name, cost, day):
        spent = totals.get((scope, name))
        if spent is None:
            if scope != "global" and len(totals) >= MAX_NAMES and not self._budgeted(scope, name):
                return
            spent = totals[(scope, name)] = [0.0, 0.0]
        if day:
            spent[DAY] += cost
        spent[MONTH] += cost

    def _budgeted(self, scope, name):
        budgets = self.budgets
        return budgets is not None and name in (budgets.tags if scope == "tag" else budgets.keys)

    def _count(self, totals, ts, tag, key_id, cost):
        """Add one row's cost to `totals` under every scope it belongs to."""
        day, month = self._shares(ts)
        if not month or not cost or cost <= 0:
            return
        self._bump(totals, "global", None, cost, day)
        if tag:
            self._bump(totals, "tag", tag, cost, day)
        if key_id:
            self._bump(totals, "key", key_id, cost, day)

    def add(self, row):
        """A row the Recorder just priced (any thread): its cost counts from now on.
        Never raises: the ledger must not cost a row its place in the DB."""
        cost = row.get("cost_usd")
        if not cost:
            return
        try:
            now = time.time()
            if now >= self.next_day:
                self._current(now)
            tag, key_id = row.get("tag"), _key(row.get("key_id"))
            with self._lock:
                self._count(self._total, row.get("ts") or now, tag, key_id, cost)
                if self.budgets is not None:
                    self._warn(self.budgets.probes_for(tag, key_id))
        except Exception:
            log.exception("budget ledger: a row's cost was not counted")

    # -- the accounting writer thread -----------------------------------------------------------
    _SUMS = ("SELECT tag, key_id, SUM(CASE WHEN ts >= ? THEN cost_usd ELSE 0 END), SUM(cost_usd)"
             " FROM requests WHERE ts >= ? AND cost_usd > 0 GROUP BY tag, key_id")
    _NEW = "SELECT ts, tag, key_id, cost_usd FROM requests WHERE id > ? AND cost_usd > 0"

    def seed(self, conn):
        """Replace what is known to be written with the DB's own totals (one query): when
        the writer opens the file. Rows recorded but not yet written stay counted."""
        self._current(time.time())
        # One read transaction: the sums and the last id from the same snapshot.
        conn.execute("BEGIN")
        try:
            groups = conn.execute(self._SUMS, (self.day_start, self.month_start)).fetchall()
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        written = {}
        for tag, key_id, day, month in groups:
            for scope, name in (("global", None), ("tag", tag), ("key", key_id)):
                if scope == "global" or name:
                    spent = written.setdefault((scope, name), [0.0, 0.0])
                    spent[DAY] += day or 0.0
                    spent[MONTH] += month or 0.0
        with self._lock:
            pending = self._pending()
            self._written = written
            self._total = {k: list(v) for k, v in written.items()}
            for k, (day, month) in pending.items():
                spent = self._total.setdefault(k, [0.0, 0.0])
                spent[DAY] += day
                spent[MONTH] += month
            self._last_id = last
            self._warn()
        self._refresh_at = time.monotonic() + REFRESH_SECONDS
        self.seeded.set()

    def _pending(self):
        """What is recorded but not yet written: total minus written, per name."""
        pending = {}
        for k, spent in self._total.items():
            done = self._written.get(k, (0.0, 0.0))
            day, month = spent[DAY] - done[DAY], spent[MONTH] - done[MONTH]
            if day or month:
                pending[k] = (day, month)
        return pending

    def write(self, conn, insert, records):
        """The write transaction of one accounting batch: first the rows other processes
        wrote since the last look, then ours, then where the table ends now. Under the
        write lock, so nothing lands in between; applied by `written` once committed."""
        self._staged = None
        try:
            fresh = conn.execute(self._NEW, (self._last_id,)).fetchall()
        except sqlite3.Error as exc:  # never what fails the batch; the next look retries
            log.debug("budget ledger: cannot read new rows (%s)", exc)
            fresh = None
        insert(conn, records)
        if fresh is not None:
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
            self._staged = (fresh, last)

    def written(self, rows):
        """The batch `write` staged is committed: other processes' rows count as written,
        and so do ours (which `add` counted already)."""
        staged, self._staged = self._staged, None
        try:
            self._current(time.time())
            with self._lock:
                if staged is not None:
                    self._take(staged)
                for row in rows:
                    self._count(self._written, row.get("ts") or 0.0, row.get("tag"),
                                _key(row.get("key_id")), row.get("cost_usd"))
                self._warn()
        except Exception:
            log.exception("budget ledger: a written batch was not counted")
        if staged is not None:
            self._refresh_at = time.monotonic() + REFRESH_SECONDS

    def _take(self, staged):
        fresh, last = staged
        for ts, tag, key_id, cost in fresh:
            self._count(self._written, ts, tag, key_id, cost)
            self._count(self._total, ts, tag, key_id, cost)
        self._last_id = max(self._last_id, last)

    def refresh(self, conn):
        """An idle writer's look at what other processes wrote (every REFRESH_SECONDS)."""
        if time.monotonic() < self._refresh_at:
            return
        self._refresh_at = time.monotonic() + REFRESH_SECONDS
        self._current(time.time())
        conn.execute("BEGIN")
        try:
            fresh = conn.execute(self._NEW, (self._last_id,)).fetchall()
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
        finally:
            conn.execute("COMMIT")
        with self._lock:
            self._take((fresh, last))
            self._warn()

    # -- warnings and reports -------------------------------------------------------------
    def _warn(self, probes=None):
        """Log once per budget and period when its spend reaches 80% and 100% of its limit
        (under the lock); `probes` None: every budget's."""
        if probes is None:
            probes = self.budgets.probes if self.budgets is not None else ()
        total = self._total
        for key, index, usd, limit, warn_at in probes:
            spent = total.get(key)
            if spent is None or spent[index] < warn_at:
                continue
            spent = spent[index]
            start = self.day_start if index == DAY else self.month_start
            level = "exhausted" if spent >= usd else "80%"
            if (limit, start, level) in self._warned:
                continue
            self._warned.add((limit, start, level))
            if level == "exhausted":
                log.warning("%s; requests under it are refused until then", describe(
                    limit, spent, self.resets(limit)))
            else:
                log.warning("%s (%.0f%% used)", describe(limit, spent, self.resets(limit)),
                            spent * 100.0 / usd)

    def report(self, budgets):
        """The /stats "budgets" list (see the README): one entry per configured limit."""
        if budgets is None:
            return []
        self._current(time.time())
        rows = []
        for limit in budgets.limits:
            spent = self.spent(limit)
            rows.append({"scope": limit.scope, "name": limit.name, "period": limit.period,
                         "limit_usd": limit.usd, "spent_usd": round(spent, 6),
                         "used": round(spent / limit.usd, 6),
                         "resets_at": iso_local(self.resets(limit)),
                         "exhausted": spent >= limit.usd})
        return rows


def _key(key_id):
    return str(key_id)[:12] if key_id else None


def label(limit):
    """How a message names a budget: global, tag 'alpha', key 'a1b2c3d4e5f6'."""
    return "global" if limit.scope == "global" else "%s %r" % (limit.scope, limit.name)


def describe(limit, spent, resets):
    return "tokenpak budget %s %s: $%.2f limit, $%.2f spent, resets %s" % (
        label(limit), limit.period, limit.usd, spent, iso_local(resets))


def refusal(ledger, budgets, tag, key_id):
    """None, or (message, Retry-After seconds) for a request no budget lets through."""
    found = ledger.check(budgets, tag, key_id)
    if found is None:
        return None
    limit, spent = found
    resets = ledger.resets(limit)
    retry = max(1, int(math.ceil(resets - time.time())))
    return describe(limit, spent, resets) + "; the request was not forwarded", retry
