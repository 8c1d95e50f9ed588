"""Budgets that block (issue 14): through a real tokenpak, the fake provider and the SDKs.

Prices are overridden to $1 per token, so one small request costs several dollars and a
$5 budget is spent by the first request: the second is refused with 429, in the shape of
the provider the client speaks, naming the budget, and is never forwarded.
"""

import json
import logging
import re
import time

import anthropic
import openai
import pytest

from helpers import (ANTHROPIC_KEY, OPENAI_KEY, RunningProxy, accounting_rows,
                     anthropic_client, open_stream, openai_client, proxy_settings, raw_request,
                     run_cli, wait_for)
from tokenpak import budget, config as configmod
from tokenpak.cache import load_secret, scope_id
from tokenpak.errors import TokenpakError

DEAR = {"pricing.gpt-4o.input": 1000000, "pricing.gpt-4o.output": 1000000,
        "pricing.claude-sonnet-4-6.input": 1000000, "pricing.claude-sonnet-4-6.output": 1000000}
MESSAGES = [{"role": "user", "content": "hello there"}]
REFUSED = re.compile(r"tokenpak budget (.+) (daily|monthly): \$(\d+\.\d\d) limit, "
                     r"\$(\d+\.\d\d) spent, resets (\S+); the request was not forwarded")


def chat(proxy, tag=None, key=OPENAI_KEY, **kw):
    headers = {"X-TokenPak-Tag": tag} if tag else {}
    return openai_client(proxy, key=key).chat.completions.create(
        model="gpt-4o", messages=kw.pop("messages", MESSAGES), extra_headers=headers, **kw)


def refusal_of(caught):
    """(budget named, period, limit, spent, resets) from a refused request's message."""
    match = REFUSED.search(str(caught.value))
    assert match, str(caught.value)
    return match.groups()


def key_id(proxy, key):
    secret = load_secret(str(proxy.app.db_path).rsplit("/", 1)[0] + "/secret")
    return scope_id(key, secret)[:12]


def test_tagged_project_is_refused_once_its_daily_budget_is_spent(make_proxy, fake):
    proxy = make_proxy(**DEAR, **{"budget.tags.alpha.daily_usd": 5})
    first = chat(proxy, tag="alpha")  # under the limit when it starts: forwarded
    assert first.choices[0].message.content.startswith("Echo:")
    forwarded = fake.count("/chat/completions")
    with pytest.raises(openai.RateLimitError) as caught:
        chat(proxy, tag="alpha")
    assert fake.count("/chat/completions") == forwarded  # not forwarded
    named, period, limit, spent, resets = refusal_of(caught)
    assert (named, period, limit) == ("tag 'alpha'", "daily", "5.00")
    assert float(spent) >= 5
    response = caught.value.response
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    # Retry-After: the seconds until local midnight, which `resets` names.
    retry = int(response.headers["Retry-After"])
    midnight = budget._period_starts(time.time())[1]
    assert abs(retry - (midnight - time.time())) <= 5
    assert resets == budget.iso_local(midnight)
    assert response.headers["x-should-retry"] == "false"
    # The other project, and untagged traffic, are not under alpha's budget.
    assert chat(proxy, tag="beta").choices
    assert chat(proxy).choices
    rows = accounting_rows(proxy)
    refused = [r for r in rows if r["status"] == 429]
    assert len(refused) == 1 and refused[0]["cost_usd"] == 0
    assert refused[0]["tag"] == "alpha" and "tokenpak budget tag 'alpha'" in refused[0]["error"]


def test_sdk_does_not_retry_a_refusal(make_proxy, fake):
    """x-should-retry: false — an SDK with its default retries sends the request once."""
    proxy = make_proxy(**DEAR, **{"budget.daily_usd": 1})
    chat(proxy)
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url=proxy.url + "/v1", max_retries=2)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert [r["status"] for r in accounting_rows(proxy, 2)] == [200, 429]


def test_key_budget_in_anthropic_shape(make_proxy, fake, tmp_path):
    proxy = make_proxy(**DEAR)
    mine = key_id(proxy, ANTHROPIC_KEY)
    proxy.stop()
    proxy = make_proxy(**DEAR, **{"budget.keys.%s.monthly_usd" % mine: 3})  # cache off
    client = anthropic_client(proxy)
    client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)
    assert accounting_rows(proxy, 1)[0]["key_id"] == mine
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=50,
                               messages=[{"role": "user", "content": "and another"}])
    body = caught.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    named, period, limit, _, resets = refusal_of(caught)
    assert (named, period, limit) == ("key %r" % mine, "monthly", "3.00")
    assert resets == budget.iso_local(budget._period_starts(time.time())[3])
    # Another key is not under this key's budget.
    other = anthropic_client(proxy, key="sk-ant-api03-test-second")
    assert other.messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                 messages=MESSAGES).content


def test_global_budget_caps_every_route_pass_through_included(make_proxy, fake):
    proxy = make_proxy(**DEAR, **{"budget.daily_usd": 2,
                                  "proxy.passthrough_url": fake.url})
    headers = {"Authorization": "Bearer " + OPENAI_KEY, "Content-Type": "application/json"}
    response, _ = raw_request(proxy, "POST", "/v1/embeddings",
                              json.dumps({"model": "text-embedding-3-small",
                                          "input": "x"}).encode(), headers)
    assert response.status == 200  # nothing spent yet
    chat(proxy, tag="anything")
    before = len(fake.requests)
    for method, path in (("POST", "/v1/embeddings"), ("POST", "/v1/some/unknown/path")):
        response, data = raw_request(proxy, method, path, b"{}", headers)
        assert response.status == 429, (path, data)
        assert "tokenpak budget global daily: $2.00 limit" in json.loads(data)["error"]["message"]
        assert int(response.getheader("Retry-After")) > 0
    response, data = raw_request(proxy, "POST", "/v1/messages", b"{}",
                                 {"x-api-key": ANTHROPIC_KEY})
    assert response.status == 429 and json.loads(data)["error"]["type"] == "rate_limit_error"
    assert len(fake.requests) == before
    # What costs nothing cannot run over a budget: a model list, a token count.
    response, _ = raw_request(proxy, "GET", "/v1/models", None, headers)
    assert response.status == 200
    count = json.dumps({"model": "claude-sonnet-4-6", "messages": MESSAGES}).encode()
    response, data = raw_request(proxy, "POST", "/v1/messages/count_tokens", count,
                                 {"x-api-key": ANTHROPIC_KEY, "content-type": "application/json"})
    assert response.status == 200 and json.loads(data)["input_tokens"] > 0
    assert len(fake.requests) == before + 2


def test_cache_hit_is_still_served_when_the_budget_is_spent(make_proxy, fake):
    proxy = make_proxy(**DEAR, **{"budget.daily_usd": 1, "cache.enabled": True})
    first = chat(proxy)
    forwarded = len(fake.requests)
    again = openai_client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES)
    assert again.headers["X-TokenPak-Cache"] == "hit"
    assert again.parse().choices[0].message.content == first.choices[0].message.content
    with pytest.raises(openai.RateLimitError):
        chat(proxy, messages=[{"role": "user", "content": "something new"}])
    assert len(fake.requests) == forwarded
    assert [r["status"] for r in accounting_rows(proxy, 3)] == [200, 200, 429]


def test_a_coalesced_follower_is_answered_after_the_budget_is_spent(make_proxy, fake):
    """A request that joins an identical one already in flight costs nothing: it shares
    that call's answer even when the budget ran out meanwhile."""
    proxy = make_proxy(**DEAR, **{"budget.daily_usd": 1, "cache.enabled": True,
                                  "proxy.read_timeout": 60})
    leader, _ = open_stream(proxy, "gate")  # forwarded while nothing is spent
    chat(proxy)  # another request spends the budget meanwhile
    assert wait_for(lambda: proxy.app.ledger.check(proxy.app.runtime.budgets, None, None))
    follower, head = open_stream(proxy, "gate")
    assert b" 200 " in head.split(b"\r\n", 1)[0] and b"X-TokenPak-Cache: hit" in head
    fake.gate.set()
    leader.close()
    follower.close()
    assert fake.count("/chat/completions") == 2  # the leader's call and the other request
    with pytest.raises(openai.RateLimitError):
        chat(proxy, messages=[{"role": "user", "content": "a new question"}])


def test_stream_that_crosses_the_limit_completes_and_the_next_is_refused(make_proxy, fake):
    """The streams caveat: a stream's cost is known at its end, so the one that crosses
    the limit is relayed whole (its usage is accounted); the next request is refused."""
    proxy = make_proxy(**DEAR, **{"budget.tags.agent.daily_usd": 5})
    client = openai_client(proxy)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                            extra_headers={"X-TokenPak-Tag": "agent"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Echo:")
    row = accounting_rows(proxy, 1)[0]
    assert row["streamed"] == 1 and row["cost_usd"] > 5  # crossed in one go, completed
    with pytest.raises(openai.RateLimitError):
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                            extra_headers={"X-TokenPak-Tag": "agent"}))


def test_a_restart_keeps_the_spend(fake, tmp_path):
    settings = proxy_settings(fake.url, tmp_path, **DEAR, **{"budget.daily_usd": 4})
    config = configmod.load(settings, environ={}, path=str(tmp_path / "none.json"))
    proxy = RunningProxy(config)
    try:
        chat(proxy)
    finally:
        proxy.stop()  # writes the row
    proxy = RunningProxy(config)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            chat(proxy)
        assert float(refusal_of(caught)[3]) >= 4
    finally:
        proxy.stop()


def test_reload_applies_budget_changes(make_proxy, fake, tmp_path):
    proxy = make_proxy(**DEAR)
    chat(proxy, tag="alpha")  # spent before any budget exists: still counted
    accounting_rows(proxy, 1)

    def reload(**budgets):
        settings = proxy_settings(fake.url, tmp_path, **DEAR, **budgets)
        proxy.app.reload(configmod.load(settings, environ={}, path=str(tmp_path / "n.json")))

    reload(**{"budget.tags.alpha.daily_usd": 1})
    with pytest.raises(openai.RateLimitError):
        chat(proxy, tag="alpha")
    reload(**{"budget.tags.alpha.daily_usd": 1000})
    assert chat(proxy, tag="alpha").choices


def test_stats_metrics_and_the_warning_at_80_percent(make_proxy, fake, caplog):
    proxy = make_proxy(**DEAR, **{"budget.tags.alpha.daily_usd": 100,
                                  "budget.monthly_usd": 1000})
    status, _, body = proxy.get("/stats")
    entries = json.loads(body)["budgets"]
    assert [(e["scope"], e["name"], e["period"], e["spent_usd"]) for e in entries] == [
        ("global", None, "monthly", 0.0), ("tag", "alpha", "daily", 0.0)]
    caplog.set_level(logging.WARNING, logger="tokenpak")
    spent = 0.0
    while spent < 80:  # until the tag's budget is 80% used
        chat(proxy, tag="alpha")
        spent = accounting_rows(proxy)[-1]["cost_usd"] + spent
    if spent < 100:
        chat(proxy, tag="alpha")  # past 80% already: no second warning
    warnings = [r.getMessage() for r in caplog.records if "tokenpak budget tag 'alpha'" in
                r.getMessage()]
    assert len([w for w in warnings if "% used" in w]) == 1  # once per budget and period
    entries = {(e["scope"], e["period"]): e for e in json.loads(proxy.get("/stats")[2])["budgets"]}
    tag = entries[("tag", "daily")]
    assert tag["limit_usd"] == 100 and tag["spent_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in accounting_rows(proxy)))
    assert tag["used"] == pytest.approx(tag["spent_usd"] / 100)
    assert tag["exhausted"] == (tag["spent_usd"] >= 100)
    assert tag["resets_at"] == budget.iso_local(budget._period_starts(time.time())[1])
    metrics = proxy.get("/metrics")[2].decode()
    assert 'tokenpak_budget_limit_usd{scope="tag",name="alpha",period="daily"} 100.0' in metrics
    assert 'tokenpak_budget_limit_usd{scope="global",name="",period="monthly"} 1000.0' in metrics
    used = re.search(r'tokenpak_budget_used_ratio\{scope="tag",name="alpha",period="daily"\} '
                     r'(\S+)', metrics)
    assert float(used.group(1)) == pytest.approx(tag["used"])


def test_stats_command_shows_the_budgets_the_proxy_enforces(make_proxy, fake, capsys,
                                                           monkeypatch):
    """`tokenpak stats` reads the budgets' spend from the database: the same figures the
    running proxy refuses by, so a user who got a 429 sees why without the daemon."""
    settings = {"budget.tags.alpha.daily_usd": 5, "budget.monthly_usd": 1000}
    proxy = make_proxy(**DEAR, **settings)
    chat(proxy, tag="alpha")
    with pytest.raises(openai.RateLimitError):
        chat(proxy, tag="alpha")
    chat(proxy, tag="beta")
    expected = json.loads(proxy.get("/stats")[2])["budgets"]  # and the rows are written
    assert [e["exhausted"] for e in expected] == [False, True]
    monkeypatch.setenv("TOKENPAK_DB", proxy.app.db_path)
    for key, value in settings.items():
        assert run_cli(capsys, "config", "set", key, str(value))[0] == 0
    status, out, err = run_cli(capsys, "stats", "--json")
    assert status == 0 and err == ""
    assert json.loads(out)["budgets"] == expected
    status, out, err = run_cli(capsys, "stats", "--by", "tag")
    assert status == 0 and err == ""
    header, rule, *lines = out.split("\n\n")[-1].splitlines()
    assert header.split() == ["Budget", "Period", "Limit", "Spent", "Used", "Resets"]
    (glob, tag) = expected
    assert lines[0].split()[:5] == ["global", "monthly", "$1,000.00",
                                    "${:,.2f}".format(glob["spent_usd"]),
                                    "%.0f%%" % (glob["used"] * 100)]
    assert lines[1].split()[:6] == ["tag", "'alpha'", "daily", "$5.00",
                                    "${:,.2f}".format(tag["spent_usd"]),
                                    "%.0f%%" % (tag["used"] * 100)]
    assert lines[1].endswith("exhausted: refusing") and not lines[0].endswith("refusing")
    assert tag["resets_at"].replace("T", " ")[:16] in lines[1]
    # no database yet: the budgets, nothing spent
    monkeypatch.setenv("TOKENPAK_DB", str(proxy.app.db_path) + ".none")
    status, out, _ = run_cli(capsys, "stats")
    assert status == 0 and "no accounting database" in out
    assert [line.split()[-4] for line in out.split("\n\n")[-1].splitlines()[2:]] == [
        "$0.00", "$0.00"]  # spent, before used and the reset's date and time


def test_another_process_spend_is_seen_without_a_request(make_proxy, fake, tmp_path):
    """proxy.workers: each process keeps its own ledger; the accounting writer reads what
    the others wrote, so a budget spent through one is refused by the other."""
    one = make_proxy(**DEAR, **{"budget.daily_usd": 30})
    two = make_proxy(**DEAR, **{"budget.daily_usd": 30})
    assert two.app.db_path == one.app.db_path
    day = two.app.runtime.budgets.limits[0]

    def in_step(total):
        """Both processes see exactly the DB's total: none missed, none counted twice."""
        return all(p.app.ledger.spent(day) == pytest.approx(total) for p in (one, two))

    for proxy in (one, two, one):
        chat(proxy)
        accounting_rows(proxy)
        total = sum(r["cost_usd"] for r in accounting_rows(one))
        assert wait_for(lambda: in_step(total))
    while total < 30:  # spend the rest through one; two refuses without having seen a row
        chat(one)
        total = sum(r["cost_usd"] for r in accounting_rows(one))
    assert wait_for(lambda: two.app.ledger.check(two.app.runtime.budgets, None, None))
    with pytest.raises(openai.RateLimitError):
        chat(two)


def test_workers_all_refuse_once_the_budget_is_spent(spawn_tokenpak, isolated_env):
    """proxy.workers 2, as a real process tree: once the budget is spent, every request is
    refused, whichever worker it reaches. (That a worker sees the others' spend without
    spending itself is test_another_process_spend_is_seen_without_a_request's proof.)"""
    path = isolated_env / ".tokenpak" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"budget": {"daily_usd": 3}, "cache": {"enabled": False},
                                "pricing": {"gpt-4o": {"input": 1000000, "output": 1000000}}}))
    process = spawn_tokenpak("serve", "--workers", "2")
    assert chat(process).choices  # one worker spends it all
    sent = [0]

    def every_one_refused():
        answered = []
        for _ in range(8):  # new connections: the kernel spreads them over both workers
            sent[0] += 1
            try:
                chat(process, messages=[{"role": "user", "content": "n%d" % sent[0]}])
                answered.append(200)
            except openai.RateLimitError:
                answered.append(429)
        return set(answered) == {429}

    assert wait_for(every_one_refused, interval=0.1)
    process.terminate()
    assert process.wait(30) == 0


# -- units -----------------------------------------------------------------------------------
def test_budget_keys_in_the_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"budget": {
        "daily_usd": 10, "tags": {"team.alpha": {"daily_usd": 2, "monthly_usd": 20}},
        "keys": {"0123456789ab": {"monthly_usd": 50}}}}))
    config = configmod.load(environ={}, path=str(path))
    assert config.tag_budgets() == {"team.alpha": {"daily_usd": 2.0, "monthly_usd": 20.0}}
    budgets = budget.Budgets.from_config(config)
    assert [tuple(l) for l in budgets.applying("team.alpha", "0123456789ab")] == [
        ("global", None, "daily", 10.0), ("tag", "team.alpha", "daily", 2.0),
        ("tag", "team.alpha", "monthly", 20.0), ("key", "0123456789ab", "monthly", 50.0)]
    assert budgets.applying("other", None) == budgets.limits[:1]
    configmod.write_file(str(path), configmod.read_file(str(path)))  # round trip
    assert configmod.load(environ={}, path=str(path)).tag_budgets() == config.tag_budgets()
    with pytest.raises(TokenpakError) as caught:
        configmod.parse_value("budget.keys.sk-live-oops.daily_usd", "5")
    assert "key id" in caught.value.message
    assert budget.Budgets.from_config(configmod.load(environ={}, path=str(tmp_path / "x"))) \
        is None


def test_ledger_rolls_over_at_local_midnight_and_on_the_first():
    ledger = budget.Ledger()
    budgets = budget.Budgets([budget.Limit("global", None, "daily", 1.0),
                              budget.Limit("global", None, "monthly", 2.0)])
    ledger.configure(budgets)
    ledger.add({"ts": time.time(), "cost_usd": 1.5})
    limit, spent = ledger.check(budgets, None, None)
    assert (limit.period, spent) == ("daily", 1.5)
    tomorrow = ledger.next_day + 1
    ledger.add({"ts": time.time(), "cost_usd": 0.6})  # month: 2.1, over its limit too
    found = ledger.check(budgets, None, None, now=tomorrow)
    if ledger.month_start == budget._period_starts(tomorrow)[2]:  # the same month
        assert found[0].period == "monthly" and found[1] == pytest.approx(2.1)
    else:
        assert found is None
    assert ledger.spent(budgets.limits[0]) == 0.0
    assert ledger.check(budgets, None, None, now=ledger.next_month + 1) is None
