"""Reporting: /stats summary, `tokenpak stats` report and table, and /metrics text."""

import datetime
import os
import re
import time

import pytest

from tokenpak import metrics, stats
from tokenpak.accounting import Recorder, figures
from tokenpak.cache import CacheStore
from tokenpak.errors import ExitStatus, TokenpakError

NOW = time.time()
USAGE = {"input": 1000, "output": 100, "cache_read": 500, "cache_write": 0}


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "tokenpak.db")


def write(db, rows):
    r = Recorder(db)
    r.start()
    for row in rows:
        r.record(row)
    assert r.flush()
    r.close()


def row(**kw):
    base = {"ts": NOW - 60, "provider": "openai", "model": "gpt-4o", "path": "/v1/chat/completions",
            "status": 200, "streamed": False, "cache": "miss", "usage": dict(USAGE),
            "tokens_before": 1500, "tokens_after": 1500, "latency_ms": 100.0}
    base.update(kw)
    return base


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                           ("2w", 1209600), (" 1.5h ", 5400), ("12H", 43200)])
def test_parse_since_durations(text, seconds):
    assert abs(stats.parse_since(text) - (time.time() - seconds)) < 5


def test_parse_since_date():
    assert stats.parse_since("2026-01-02") == time.mktime((2026, 1, 2, 0, 0, 0, 0, 0, -1))


@pytest.mark.parametrize("text", ["", "24", "h", "-5m", "0d", "7 days", "yesterday", "2026-13-01", None])
def test_parse_since_rejects_bad_input(text):
    with pytest.raises(TokenpakError) as err:
        stats.parse_since(text)
    assert err.value.status == ExitStatus.USAGE and err.value.hint


def test_summary_of_a_missing_db_is_zeros_and_creates_nothing(db):
    out = stats.summary(db)
    assert out["cached"] == 0 and out["compressed_requests"] == 0 and out["requests"] == 0
    assert out["token_usage"] == {"input": 0, "output": 0, "cached": 0}
    assert out["since"] is None and out["by_model"] == {}
    assert not os.path.exists(db)
    assert stats.report(db, None, "model") == []


def test_summary_of_a_cache_only_db_is_zeros(db):
    CacheStore(db, 60, 1).close()
    assert stats.summary(db)["requests"] == 0
    assert stats.report(db, None, "day") == []


def test_summary_counts_what_happened(db):
    write(db, [
        row(),                                                   # a plain miss
        row(tokens_before=3000, tokens_after=1500),              # compressed
        row(cache="hit"),                                        # served from cache
        row(cache="coalesced"),                                  # shared an in-flight call
        row(model="mystery-model", provider="custom"),           # unknown price
        row(ts=NOW - 10 * 86400),                                # old
    ])
    out = stats.summary(db)
    assert out["requests"] == 6
    assert out["cached"] == 1 and out["coalesced"] == 1
    assert out["compressed_requests"] == 1
    prompt = USAGE["input"] + USAGE["cache_read"]
    assert out["token_usage"]["input"] == 4 * prompt  # upstream requests only
    assert out["token_usage"]["output"] == 4 * USAGE["output"]
    assert out["token_usage"]["cached"] == 2 * (prompt + USAGE["output"])
    assert out["tokens_saved"] == 2 * (prompt + USAGE["output"]) + 1500
    one = (1000 * 2.5 + 100 * 10 + 500 * 1.25) / 1e6
    assert out["cost_usd"] == pytest.approx(3 * one)
    # the compressed request read 500 tokens from the provider's cache: the 1,500 tokens
    # compression removed may have been among them, so they count at the cache-read price
    assert out["saved_usd"] == pytest.approx(2 * one + 1500 * 1.25 / 1e6)
    assert out["compression_saved_usd"] == pytest.approx(1500 * 1.25 / 1e6)
    assert out["unpriced_requests"] == 1
    assert out["by_model"]["mystery-model"]["cost_usd"] is None
    assert out["by_model"]["gpt-4o"]["requests"] == 5
    since = datetime.datetime.fromisoformat(out["since"])
    assert abs(since.timestamp() - (NOW - 10 * 86400)) < 2

    recent = stats.summary(db, since=NOW - 86400)
    assert recent["requests"] == 5


def test_summary_while_the_writer_is_running(db):
    r = Recorder(db)
    r.start()
    r.record(row())
    r.flush()
    try:
        assert stats.summary(db)["requests"] == 1
    finally:
        r.close()


def test_unreadable_db_summary_reports_an_error_report_raises(db):
    with open(db, "wb") as fh:
        fh.write(b"not sqlite" * 500)
    out = stats.summary(db)
    assert out["requests"] == 0 and "error" in out
    with pytest.raises(TokenpakError):
        stats.report(db, None, "model")


def test_report_by_model_provider_day(db):
    write(db, [row(), row(), row(model="claude-haiku-4-5", provider="anthropic"),
               row(ts=NOW - 3 * 86400), row(model="mystery", provider="custom")])
    by_model = stats.report(db, None, "model")
    assert [r["model"] for r in by_model] == ["gpt-4o", "claude-haiku-4-5", "mystery"]
    assert by_model[0]["requests"] == 3 and by_model[2]["cost_usd"] is None
    assert all("unpriced" in r for r in by_model)
    by_provider = stats.report(db, None, "provider")
    assert {r["provider"]: r["requests"] for r in by_provider} == {"openai": 3, "anthropic": 1, "custom": 1}
    by_day = stats.report(db, NOW - 86400, "day")
    assert len(by_day) == 1 and by_day[0]["requests"] == 4
    assert by_day[0]["day"] == time.strftime("%Y-%m-%d", time.localtime(NOW - 60))
    with pytest.raises(TokenpakError):
        stats.report(db, None, "week")


def test_format_table_aligns_and_totals():
    rows = [{"model": "gpt-4o", "requests": 1234, "input": 1234567, "cost_usd": 1234.5, "saved_usd": 0.004},
            {"model": "mystery", "requests": 5, "input": 10, "cost_usd": None, "saved_usd": 0.0}]
    text = stats.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["Model", "Requests", "Input", "tok", "Cost", "Saved"]
    assert "1,234,567" in lines[2] and "$1,234.50" in lines[2] and "$0.0040" in lines[2]
    assert "unknown" in lines[3]
    assert lines[-1].startswith("Total") and "1,239" in lines[-1] and "1,234,577" in lines[-1]
    assert "$1,234.50" in lines[-1]
    # right-aligned numbers: every data line ends at the same column
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1
    assert stats.format_table([]) == "No requests recorded yet."


def test_format_table_unknown_total():
    text = stats.format_table([{"model": "x", "requests": 1, "cost_usd": None}])
    assert text.splitlines()[-1].split() == ["Total", "1", "unknown"]


# ------------------------------------------------------------------ metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_metrics(text):
    """Parse exposition text strictly; returns ({(name, labels): value}, {name: type})."""
    samples, types, helped = {}, {}, set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, "bad sample line: %r" % line
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types and family in helped, "sample before its TYPE: %r" % line
        float(value)
        labels = tuple(LABEL.findall(labels))
        assert (name, labels) not in samples
        samples[(name, labels)] = float(value)
    return samples, types


def test_metrics_render_parses_and_counts():
    m = metrics.Metrics()
    for r in (row(latency_ms=30.0), row(latency_ms=700.0), row(cache="hit", latency_ms=0.5),
              row(status=429, usage=None, latency_ms=20.0)):
        m.observe(dict(r, **figures(r)))  # priced once, as Recorder.record does
    samples, types = parse_metrics(m.render({"tokenpak_accounting_rows_dropped": ("Rows dropped.", 3)}))
    assert types["tokenpak_requests_total"] == "counter"
    assert types["tokenpak_request_duration_seconds"] == "histogram"
    base = (("provider", "openai"), ("model", "gpt-4o"))
    assert samples[("tokenpak_requests_total", base + (("status", "200"), ("cache", "miss")))] == 2
    assert samples[("tokenpak_requests_total", base + (("status", "200"), ("cache", "hit")))] == 1
    assert samples[("tokenpak_requests_total", base + (("status", "429"), ("cache", "miss")))] == 1
    # tokens billed by the provider: the two misses with usage, not the cache hit
    assert samples[("tokenpak_tokens_total", base + (("kind", "input"),))] == 2000
    assert samples[("tokenpak_tokens_total", base + (("kind", "cache_read"),))] == 1000
    assert samples[("tokenpak_tokens_total", base + (("kind", "output"),))] == 200
    one = (1000 * 2.5 + 100 * 10 + 500 * 1.25) / 1e6
    assert samples[("tokenpak_cost_usd_total", base)] == pytest.approx(2 * one)
    assert samples[("tokenpak_saved_usd_total", base)] == pytest.approx(one)
    assert samples[("tokenpak_up", ())] == 1
    assert samples[("tokenpak_accounting_rows_dropped", ())] == 3
    miss = (("provider", "openai"), ("cache", "miss"))
    buckets = [(float(dict(k[1])["le"]), v) for k, v in samples.items()
               if k[0] == "tokenpak_request_duration_seconds_bucket" and k[1][:2] == miss]
    buckets.sort()
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert buckets[-1] == (float("inf"), 3)
    assert dict(buckets)[0.025] == 1 and dict(buckets)[0.05] == 2 and dict(buckets)[1.0] == 3
    assert samples[("tokenpak_request_duration_seconds_count", miss)] == 3
    assert samples[("tokenpak_request_duration_seconds_sum", miss)] == pytest.approx(0.75)


def test_metrics_escape_label_values():
    m = metrics.Metrics()
    nasty = 'gpt-"4o"\\x\nnext'
    m.observe(row(model=nasty))
    text = m.render()
    samples, _ = parse_metrics(text)
    assert 'model="gpt-\\"4o\\"\\\\x\\nnext"' in text
    assert any(dict(k[1]).get("model") == 'gpt-\\"4o\\"\\\\x\\nnext' for k in samples)


def test_metrics_bound_model_cardinality():
    m = metrics.Metrics()
    for i in range(metrics.MAX_MODELS + 50):
        m.observe(row(model="m%d" % i, latency_ms=None))
    samples, _ = parse_metrics(m.render())
    models = {dict(k[1])["model"] for k in samples if k[0] == "tokenpak_requests_total"}
    assert len(models) == metrics.MAX_MODELS + 1 and "other" in models


def test_metrics_observe_never_raises_and_keeps_counting():
    m = metrics.Metrics()
    m.observe({})
    m.observe({"provider": "openai", "model": "gpt-4o", "latency_ms": "slow", "usage": "weird"})
    good = row(latency_ms=30.0)  # a good request after the malformed ones
    m.observe(dict(good, **figures(good)))
    samples, _ = parse_metrics(m.render())
    base = (("provider", "openai"), ("model", "gpt-4o"))
    # The good request is counted in full; the malformed rows added no tokens, cost or
    # latency, and did not break the text a Prometheus server scrapes.
    assert samples[("tokenpak_requests_total", base + (("status", "200"), ("cache", "miss")))] == 1
    assert samples[("tokenpak_tokens_total", base + (("kind", "input"),))] == 1000
    assert samples[("tokenpak_tokens_total", base + (("kind", "output"),))] == 100
    one = (1000 * 2.5 + 100 * 10 + 500 * 1.25) / 1e6
    assert samples[("tokenpak_cost_usd_total", base)] == pytest.approx(one)
    counts = [v for k, v in samples.items() if k[0] == "tokenpak_request_duration_seconds_count"]
    assert counts == [1]
    assert samples[("tokenpak_up", ())] == 1


def _naive(rows, dim, since):
    """What a grouping must hold, computed from the rows themselves: requests and cost."""
    label = {"model": lambda r: r["model"], "tag": lambda r: r.get("tag") or stats.UNTAGGED,
             "provider": lambda r: r["provider"],
             "day": lambda r: time.strftime("%Y-%m-%d", time.localtime(r["ts"])),
             "hour": lambda r: time.strftime("%Y-%m-%d %H:00", time.localtime(r["ts"]))}[dim]
    out = {}
    for r in rows:
        if r["ts"] >= since:
            count, cost = out.get(label(r), (0, 0.0))
            out[label(r)] = (count + 1, cost + figures(r)["cost_usd"])
    return out


@pytest.mark.parametrize("age", [3 * 3600, 10 * 86400, 40 * 86400])
def test_one_pass_for_every_grouping_adds_up_as_each_alone(db, age):
    """/stats reads the rows once for the totals and all its groupings: each grouping
    must hold what grouping by it alone gives, whether the cutoff keeps a few rows (the
    ts index is used) or most (it is not)."""
    import random
    rng = random.Random(7)
    rows = [row(ts=NOW - rng.uniform(0, 30 * 86400), model=rng.choice(["gpt-4o", "gpt-4o-mini"]),
                provider=rng.choice(["openai", "azure"]), tag=rng.choice(["a", "b", None]),
                usage={"input": rng.randint(1, 5000), "output": rng.randint(1, 500),
                       "cache_read": 0, "cache_write": 0})
            for _ in range(400)]
    write(db, rows)
    since = NOW - age
    by = ["tag", "day", "hour", "provider", "model"]
    out = stats.summary(db, since, by=by)
    for dim in by:
        alone = stats.report(db, since, dim)

        def rounded(items):  # the same sums, added in another order
            return [{k: round(v, 9) if isinstance(v, float) else v for k, v in r.items()}
                    for r in items]
        assert rounded(out["groups"][dim]) == rounded(alone)
        want = _naive(rows, dim, since)
        got = {r[dim]: (r["requests"], r["cost_usd"]) for r in alone}
        assert set(got) == set(want)
        for name, (count, cost) in want.items():
            assert got[name][0] == count and got[name][1] == pytest.approx(cost)
    assert out["requests"] == sum(1 for r in rows if r["ts"] >= since)
