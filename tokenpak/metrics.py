"""`GET /metrics`: in-memory counters in the Prometheus text format (0.0.4).

The proxy bumps them once per finished request (`observe`, the same row the accounting
writer queues) and renders them on demand, so a scrape never touches the database and a
busy scraper cannot slow the writer. Label values come from clients (model names): they
are escaped, and their number is bounded.
"""

from __future__ import annotations

import re
import sys
import threading
import time

from tokenpak import __version__
from tokenpak.accounting import SERVED_LOCALLY, row_usage
from tokenpak.pricing import FIELDS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Per configured budget (budget.py), labelled {scope, name, period}: name is the tag or key
# id, empty for the global budgets.
BUDGET_GAUGES = (
    ("tokenpak_budget_limit_usd", "limit_usd", "A budget's limit in USD."),
    ("tokenpak_budget_spent_usd", "spent_usd", "What a budget's requests cost so far this period."),
    ("tokenpak_budget_used_ratio", "used", "Spent over limit; at 1 requests under it are refused."))
MAX_MODELS = 200  # model names come from clients: bound the label cardinality (and memory)


def escape_label(value) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped as the text
    format says; other controls (CR, ESC, ...) become a literal \\xNN, so a model name a
    client chose cannot break a scraper's line parsing or a terminal showing the page."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return _CONTROL.sub(lambda m: "\\\\x%02x" % ord(m.group()), text)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _labels(names, values):
    return "{%s}" % ",".join('%s="%s"' % (n, escape_label(v)) for n, v in zip(names, values))


def _number(value):
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class Metrics:
    """In-memory counters for GET /metrics (Prometheus text exposition format 0.0.4)."""

    def __init__(self):
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests = {}
        self._tokens = {}
        self._cost = {}
        self._saved = {}
        self._hist = {}  # (provider, cache) -> [bucket counts..., sum, count]
        self._models = set()

    def observe(self, row: dict) -> None:
        """Count one finished request (the same dict as Recorder.record). Never raises."""
        try:
            provider = str(row.get("provider") or "")
            model = str(row.get("model") or "")
            status = str(row.get("status") if row.get("status") is not None else "error")
            cache = str(row.get("cache") or "")
            cost, saved = row.get("cost_usd"), row.get("saved_usd")  # priced by Recorder.record
            usage = None if cache in SERVED_LOCALLY else row_usage(row)  # billed tokens only
            latency = row.get("latency_ms")
            with self._lock:
                if model not in self._models:
                    if len(self._models) >= MAX_MODELS:
                        model = "other"
                    else:
                        self._models.add(model)
                key = (provider, model, status, cache)
                self._requests[key] = self._requests.get(key, 0) + 1
                if usage:
                    for kind in FIELDS:
                        n = usage.get(kind) or 0
                        if n > 0:
                            tkey = (provider, model, kind)
                            self._tokens[tkey] = self._tokens.get(tkey, 0) + int(n)
                if cost:
                    self._cost[(provider, model)] = self._cost.get((provider, model), 0.0) + cost
                if saved:
                    self._saved[(provider, model)] = self._saved.get((provider, model), 0.0) + saved
                if latency is not None:
                    self._observe_latency((provider, cache), float(latency) / 1000.0)
        except Exception:
            pass  # metrics must never cost a request its answer

    def _observe_latency(self, key, seconds):
        hist = self._hist.get(key)
        if hist is None:
            hist = self._hist[key] = [0] * len(BUCKETS) + [0.0, 0]
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                hist[i] += 1
                break
        hist[-2] += seconds
        hist[-1] += 1

    def render(self, gauges: dict | None = None, budgets=()) -> str:
        """The exposition text. `gauges` adds {name: (help, value)} (e.g. dropped rows);
        `budgets` is the /stats "budgets" list, rendered as labelled gauges."""
        with self._lock:  # copy, then format without holding up observe()
            requests, tokens = dict(self._requests), dict(self._tokens)
            cost, saved = dict(self._cost), dict(self._saved)
            hists = {k: list(v) for k, v in self._hist.items()}
        out = []

        def family(name, kind, help_text):
            out.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", "\\n")))
            out.append("# TYPE %s %s" % (name, kind))

        family("tokenpak_up", "gauge", "1 while tokenpak is serving.")
        out.append("tokenpak_up 1")
        family("tokenpak_build_info", "gauge", "tokenpak version and Python version.")
        out.append("tokenpak_build_info%s 1" % _labels(
            ("version", "python"), (__version__, "%d.%d.%d" % sys.version_info[:3])))
        family("tokenpak_start_time_seconds", "gauge", "Start time of the process (Unix epoch).")
        out.append("tokenpak_start_time_seconds %s" % _number(self.started))
        family("tokenpak_requests_total", "counter", "Proxied requests by provider, model, status and cache result.")
        for key in sorted(requests):
            out.append("tokenpak_requests_total%s %d" % (
                _labels(("provider", "model", "status", "cache"), key), requests[key]))
        family("tokenpak_tokens_total", "counter",
               "Tokens the providers reported for requests that went upstream, by kind.")
        for key in sorted(tokens):
            out.append("tokenpak_tokens_total%s %d" % (_labels(("provider", "model", "kind"), key), tokens[key]))
        family("tokenpak_cost_usd_total", "counter", "Spend in USD at the shipped or configured prices.")
        for key in sorted(cost):
            out.append("tokenpak_cost_usd_total%s %s" % (_labels(("provider", "model"), key), _number(cost[key])))
        family("tokenpak_saved_usd_total", "counter", "USD saved by cache hits, coalescing and compression.")
        for key in sorted(saved):
            out.append("tokenpak_saved_usd_total%s %s" % (_labels(("provider", "model"), key), _number(saved[key])))
        family("tokenpak_request_duration_seconds", "histogram", "Request latency through tokenpak.")
        for key in sorted(hists):
            self._render_histogram(out, key, hists[key])
        for name, (help_text, value) in sorted((gauges or {}).items()):
            family(name, "gauge", help_text)
            out.append("%s %s" % (name, _number(value)))
        for name, field, help_text in BUDGET_GAUGES if budgets else ():
            family(name, "gauge", help_text)
            for entry in budgets:
                out.append("%s%s %s" % (name, _labels(("scope", "name", "period"), (
                    entry["scope"], entry["name"] or "", entry["period"])), _number(entry[field])))
        return "\n".join(out) + "\n"

    @staticmethod
    def _render_histogram(out, key, hist):
        name = "tokenpak_request_duration_seconds"
        running = 0  # Prometheus buckets are cumulative: each counts everything up to `le`
        for bound, n in zip(BUCKETS, hist):
            running += n
            out.append("%s_bucket%s %d" % (name, _labels(("provider", "cache", "le"), key + (repr(bound),)), running))
        out.append("%s_bucket%s %d" % (name, _labels(("provider", "cache", "le"), key + ("+Inf",)), hist[-1]))
        out.append("%s_sum%s %s" % (name, _labels(("provider", "cache"), key), _number(hist[-2])))
        out.append("%s_count%s %d" % (name, _labels(("provider", "cache"), key), hist[-1]))


# Gauges that are not a sum over worker processes (proxy.workers > 1): the earliest start,
# the longest uptime, the freshest budget figures; every other gauge (in-flight requests, "up", build info) and every
# counter and histogram series adds up across workers.
_MERGE_MIN = ("tokenpak_start_time_seconds",)
_MERGE_MAX = ("tokenpak_uptime_seconds", "tokenpak_up", "tokenpak_build_info") + tuple(
    name for name, _, _ in BUDGET_GAUGES)  # each worker sees the same spend, some sooner


def merge(texts) -> str:
    """One exposition from several workers' expositions (proxy.workers > 1): the same series
    added up (or the min/max for the gauges above), families kept in their first order."""
    families, order = {}, []
    for text in texts:
        name = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                if name not in families:
                    families[name] = ([], {})
                    order.append(name)
                header, _ = families[name]
                if line not in header:
                    header.append(line)
                continue
            if not line or line.startswith("#") or name is None:
                continue
            series, _, value = line.rpartition(" ")
            samples = families[name][1]
            number = int(value) if value.lstrip("-").isdigit() else float(value)
            if series not in samples:
                samples[series] = number
            elif name in _MERGE_MIN:
                samples[series] = min(samples[series], number)
            elif name in _MERGE_MAX:
                samples[series] = max(samples[series], number)
            else:
                samples[series] += number
    out = []
    for name in order:
        header, samples = families[name]
        out += header
        out += ["%s %s" % (series, _number(v)) for series, v in samples.items()]
    return "\n".join(out) + "\n"
