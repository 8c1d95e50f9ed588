"""What an operator meets at the command line: validation with units and ranges, errors
as one line and a hint (never a traceback), broken or unwritable config files, read-only
commands that stay read-only, prices with their source, and the system service's files.

In-process `main(argv)` calls: each test sees the exit status, stdout and stderr a user
would, and the files the command left behind.
"""

import json
import os
import sqlite3
import time

import pytest

from helpers import config_file, run_cli as run
from tokenpak import cli
from tokenpak import config as configmod
from tokenpak import pricing
from tokenpak.errors import ExitStatus




def assert_one_error(err, *words):
    """Exactly one `tokenpak: error:` line, a hint, the words, and no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("tokenpak: error: ")]
    assert len(errors) == 1, err
    assert any(line.startswith("tokenpak: hint: ") for line in lines), err
    assert "Traceback" not in err and "internal error" not in err, err
    for word in words:
        assert word in errors[0], (word, err)


# -- numbers: ranges, units, plain words -----------------------------------------------------


def test_port_out_of_range_is_refused_by_config_set(capsys):
    status, _, err = run(capsys, "config", "set", "proxy.port", "70000")
    assert status == ExitStatus.USAGE
    assert_one_error(err, "proxy.port", "from 0 to 65535", "70000")
    assert not os.path.exists(config_file())


def test_port_out_of_range_is_refused_on_the_command_line(capsys):
    status, _, err = run(capsys, "serve", "--port", "70000")
    assert status == ExitStatus.USAGE
    assert_one_error(err, "--port", "from 0 to 65535")


def test_port_out_of_range_is_refused_in_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TOKENPAK_PORT", "70000")
    status, _, err = run(capsys, "serve")
    assert status == ExitStatus.USAGE
    assert_one_error(err, "$TOKENPAK_PORT", "from 0 to 65535")


def test_integer_errors_are_plain_words(capsys):
    status, _, err = run(capsys, "config", "set", "compression.threshold_tokens", "lots")
    assert status == ExitStatus.USAGE
    assert_one_error(err, "expected a whole number, got 'lots'")
    assert "literal" not in err and "base 10" not in err


NUMERIC_KEYS = sorted(name for name, key in configmod.SCHEMA.items()
                      if key.type in ("int", "float"))


@pytest.mark.parametrize("name", NUMERIC_KEYS)
def test_every_numeric_key_has_a_range(name):
    key = configmod.SCHEMA[name]
    assert key.high is not None, "%s has no upper bound" % name
    name = name.replace("<model>.<field>", "gpt-4o.input").replace(
        "<tag>", "alpha").replace("<id>", "0123456789ab")
    for bad in (key.high * 2 + 1, key.low - 1, "nan", "inf", "1e999"):
        with pytest.raises(configmod.TokenpakError) as caught:
            configmod.parse_value(name, str(bad))
        assert caught.value.status == ExitStatus.USAGE
    assert configmod.parse_value(name, str(key.high)) == key.high
    if key.default is not None and key.default not in (key.choices or ()):
        assert key.low <= key.default <= key.high
    for word in key.choices or ():  # a number that may also be a word: proxy.workers auto
        assert configmod.parse_value(name, word.upper()) == word


@pytest.mark.parametrize("name, text, value", [
    ("proxy.max_request_bytes", "20MB", 20 * 1024 * 1024),
    ("proxy.max_request_bytes", "512KiB", 512 * 1024),
    ("proxy.max_request_bytes", "1000", 1000),
    ("cache.max_mb", "2GB", 2048),
    ("cache.max_mb", "300", 300),
    ("cache.ttl_seconds", "1d", 86400),
    ("cache.ttl_seconds", "12h", 43200),
    ("proxy.read_timeout", "30s", 30.0),
    ("proxy.read_timeout", "10m", 600.0),
    ("proxy.shutdown_grace_seconds", "1m", 60.0),
])
def test_sizes_and_durations_take_units(capsys, name, text, value):
    status, out, err = run(capsys, "config", "set", name, text)
    assert status == 0, err
    assert configmod.load().get(name) == value


def test_units_work_in_the_file_and_environment_too(capsys, monkeypatch):
    write_config(json.dumps({"cache": {"ttl_seconds": "7d"}}))
    monkeypatch.setenv("TOKENPAK_COMPACT_THRESHOLD_TOKENS", "2_000")
    config = configmod.load()
    assert config.get("cache.ttl_seconds") == 7 * 86400
    assert config.get("compression.threshold_tokens") == 2000


def test_a_unit_that_does_not_fit_the_key_is_refused(capsys):
    status, _, err = run(capsys, "config", "set", "cache.ttl_seconds", "20MB")
    assert status == ExitStatus.USAGE
    assert_one_error(err, "expected 30s, 10m, 1d or a number of seconds")


# -- files that cannot be read or written ----------------------------------------------------


def test_config_set_where_the_directory_cannot_be_made_is_one_line(capsys, monkeypatch,
                                                                  tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("TOKENPAK_CONFIG", str(blocker / "config.json"))
    status, _, err = run(capsys, "config", "set", "proxy.port", "9000")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "cannot write config file", str(blocker / "config.json"))


def test_config_set_in_a_read_only_directory_is_one_line(capsys, monkeypatch, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: make the write itself fail instead
        monkeypatch.setattr(configmod.tempfile, "mkstemp", _read_only_mkstemp)
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o500)
        monkeypatch.setenv("TOKENPAK_CONFIG", str(directory / "config.json"))
    status, _, err = run(capsys, "config", "set", "proxy.port", "9000")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "cannot write config file", "ermission denied")


def _read_only_mkstemp(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_compress_output_into_a_missing_directory_is_one_line(capsys, tmp_path):
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "gpt-4o",
                                "messages": [{"role": "user", "content": "hello"}]}))
    status, _, err = run(capsys, "compress", str(body), "--output",
                         str(tmp_path / "missing" / "dir" / "x.json"))
    assert status == ExitStatus.ERROR
    assert_one_error(err, "cannot write", "No such file or directory")


def test_compress_takes_a_responses_body(capsys, tmp_path):
    """Codex's /v1/responses bodies are compressed by the proxy, so the dry run knows them
    too: the shape is guessed from `input`, and the tool output shrinks."""
    log = "\n".join("2026-01-01 00:00:%02d worker retrying (attempt 3/5)" % (i % 60)
                     for i in range(400))
    body = {"model": "gpt-5", "instructions": "Be brief.", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": log}]}
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    status, out, _ = run(capsys, "compress", str(path), "--mode", "aggressive",
                         "--output", str(tmp_path / "out.json"))
    assert status == ExitStatus.OK
    assert "responses request" in out and "compressed" in out
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["instructions"] == "Be brief."
    assert len(written["input"][2]["output"]) < len(log) / 2


# -- a broken config file: the hint is true, stop and status still work ------------------------


def write_config(text):
    os.makedirs(os.path.dirname(config_file()), exist_ok=True)
    with open(config_file(), "w") as handle:
        handle.write(text)


def test_config_set_repairs_a_file_that_is_not_json(capsys):
    write_config('{"proxy": {"port": 9000,}')
    status, _, err = run(capsys, "config", "list")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "not valid JSON")
    assert "`tokenpak config set KEY VALUE` starts a new file" in err
    status, _, err = run(capsys, "config", "set", "proxy.port", "9001")
    assert status == 0, err
    assert json.load(open(config_file())) == {"proxy": {"port": 9001}}
    with open(configmod.broken_copy(config_file())) as kept:
        assert kept.read() == '{"proxy": {"port": 9000,}'  # nothing the user typed is lost
    assert run(capsys, "config", "get", "proxy.port")[:2] == (0, "9001\n")


def test_config_unset_removes_the_unknown_key_that_broke_the_file(capsys):
    write_config(json.dumps({"proxy": {"prot": 9000, "port": 9002}}))
    status, _, err = run(capsys, "config", "get", "proxy.port")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "unknown config key 'proxy.prot'")
    assert "`tokenpak config unset proxy.prot` removes it" in err
    assert run(capsys, "config", "unset", "proxy.prot")[0] == 0
    assert run(capsys, "config", "get", "proxy.port")[:2] == (0, "9002\n")


def test_config_set_replaces_the_bad_value_that_broke_the_file(capsys):
    write_config(json.dumps({"proxy": {"port": 70000}, "footer": {"enabled": False}}))
    status, _, err = run(capsys, "config", "list")
    assert status == ExitStatus.ERROR
    assert "`tokenpak config set proxy.port VALUE` replaces it" in err
    assert run(capsys, "config", "set", "proxy.port", "8080")[0] == 0
    config = configmod.load()
    assert config.get("proxy.port") == 8080 and config.get("footer.enabled") is False


def test_status_and_stop_work_with_a_broken_config(capsys):
    write_config("{not json")
    status, out, err = run(capsys, "status")
    assert status == ExitStatus.NOT_RUNNING
    assert "tokenpak is not running" in out
    assert "tokenpak: warning:" in err and "Traceback" not in err
    status, out, err = run(capsys, "stop")
    assert status == ExitStatus.NOT_RUNNING
    assert "tokenpak is not running" in out


# -- an unusable db.path ---------------------------------------------------------------------


def test_serve_refuses_an_unusable_db_path(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TOKENPAK_DB", str(blocker / "tokenpak.db"))
    status, _, err = run(capsys, "serve", "--port", "0")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "db.path", "is a file, not a directory")


# -- read-only commands never write ----------------------------------------------------------


def test_cache_stats_creates_no_database_directory(capsys, monkeypatch, tmp_path):
    db = tmp_path / "nowhere" / "tokenpak.db"
    monkeypatch.setenv("TOKENPAK_DB", str(db))
    status, out, _ = run(capsys, "cache", "stats")
    assert status == 0
    assert "nothing cached" in out
    assert not (tmp_path / "nowhere").exists()


def test_cache_stats_reports_a_corrupt_database_and_leaves_it_alone(capsys, monkeypatch,
                                                                   tmp_path):
    db = tmp_path / "tokenpak.db"
    db.write_bytes(b"this is not a database" * 20)
    monkeypatch.setenv("TOKENPAK_DB", str(db))
    status, _, err = run(capsys, "cache", "stats")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "cannot read the database")
    assert sorted(os.listdir(str(tmp_path))) == ["home", "tokenpak.db"]
    assert db.read_bytes() == b"this is not a database" * 20


def test_cache_stats_counts_entries(capsys, proxy_with_cache_entry):
    status, out, _ = run(capsys, "cache", "stats")
    assert status == 0
    assert "entries:  1" in out and "keys:     1" in out


@pytest.fixture
def proxy_with_cache_entry(monkeypatch, tmp_path):
    from tokenpak.cache import CacheStore, Entry
    db = str(tmp_path / "state" / "tokenpak.db")
    monkeypatch.setenv("TOKENPAK_DB", db)
    store = CacheStore(db, 3600, 10)
    try:
        store.put("scope-a", "key-1", Entry(200, [("content-type", "application/json")],
                                            b"{}", False, time.time()))
        store.flush()
    finally:
        store.close()


def test_stats_on_a_missing_database_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPAK_DB", str(tmp_path / "none" / "tokenpak.db"))
    status, out, _ = run(capsys, "stats")
    assert status == 0
    assert "no accounting database at %s" % (tmp_path / "none" / "tokenpak.db") in out
    assert not (tmp_path / "none").exists()


def test_stats_since_a_date_reads_as_a_date(capsys, monkeypatch, tmp_path):
    db = tmp_path / "tokenpak.db"
    sqlite3.connect(str(db)).close()  # an empty database: nothing recorded yet
    monkeypatch.setenv("TOKENPAK_DB", str(db))
    status, out, _ = run(capsys, "stats", "--since", "2099-01-01")
    assert status == 0
    assert out.startswith("no requests recorded since 2099-01-01 (a date in the future)")
    assert "in the last 2099" not in out
    status, out, _ = run(capsys, "stats", "--since", "7d")
    assert out.startswith("no requests recorded in the last 7d")


# -- prices and secrets ----------------------------------------------------------------------


def test_config_get_price_shows_the_shipped_figure_and_its_source(capsys):
    shipped = pricing.default_table()["gpt-4o"]["input"]
    status, out, _ = run(capsys, "config", "get", "pricing.gpt-4o.input")
    assert status == 0
    assert out == "$%g  (shipped %s)\n" % (shipped, pricing.PRICES_DATE)
    run(capsys, "config", "set", "pricing.gpt-4o.input", "3.5")
    status, out, _ = run(capsys, "config", "get", "pricing.gpt-4o.input")
    assert out == "$3.5  (config pricing.gpt-4o.input (file))\n"


def test_prices_lists_the_effective_table_with_sources(capsys):
    run(capsys, "config", "set", "pricing.gpt-4o.output", "11")
    status, out, _ = run(capsys, "prices")
    assert status == 0
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if not line.startswith(" ")}
    assert set(lines) == set(pricing.default_table())
    assert "$11" in lines["gpt-4o"] and "config pricing.gpt-4o.output (file)" in lines["gpt-4o"]
    assert lines["gpt-4o-mini"].rstrip().endswith("shipped")
    status, out, _ = run(capsys, "prices", "gpt-4o-2024-08-06", "--json")
    [row] = json.loads(out)
    assert row["model"] == "gpt-4o" and row["output"] == 11.0
    assert row["sources"]["output"] == "config pricing.gpt-4o.output (file)"
    assert row["sources"]["input"] == "shipped %s" % pricing.PRICES_DATE


def test_prices_show_one_hour_writes_and_long_context_tiers(capsys):
    run(capsys, "config", "set", "pricing.claude-sonnet-4-5.long_output", "30")
    status, out, _ = run(capsys, "prices", "claude-sonnet-4-5-20250929")
    assert status == 0
    header, main, tier = out.splitlines()[1:]
    assert header.split()[:6] == ["model", "input", "output", "cache_read", "cache_write",
                                  "cache_write_1h"]
    assert main.split()[:6] == ["claude-sonnet-4-5", "$3", "$15", "$0.3", "$3.75", "$6"]
    assert "config pricing.claude-sonnet-4-5.long_output (file)" in main
    assert tier.split()[:8] == ["over", "200,000", "tokens", "$6", "$30", "$0.6", "$7.5", "$12"]
    status, out, _ = run(capsys, "prices", "gemini-2.5-pro", "--json")
    [row] = json.loads(out)
    assert row["long_context_tokens"] == 200000 and row["long_input"] == 2.5
    assert row["sources"]["cache_write_1h"] == "defaults to the cache_write price"
    status, out, _ = run(capsys, "config", "get", "pricing.claude-sonnet-4-5.long_context_tokens")
    assert out == "200000  (shipped %s)\n" % pricing.PRICES_DATE
    status, _, err = run(capsys, "config", "get", "pricing.gpt-4o.long_input")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "gpt-4o has no long-context tier")


@pytest.mark.parametrize("pattern, expected", [
    ("claude-opus*", ["claude-opus-4", "claude-opus-4-0", "claude-opus-4-1", "claude-opus-4-5",
                      "claude-opus-4-6", "claude-opus-4-7"]),
    ("gpt-4.1?*", ["gpt-4.1-mini", "gpt-4.1-nano"]),
    ("claude-3-5", ["claude-3-5-haiku", "claude-3-5-sonnet"]),  # a prefix, not a model
    ("claude-3-5-sonnet-20241022", ["claude-3-5-sonnet"]),     # a model: its entry
])
def test_prices_takes_a_glob_or_a_prefix(capsys, pattern, expected):
    status, out, _ = run(capsys, "prices", pattern, "--json")
    assert status == 0
    assert [r["model"] for r in json.loads(out)] == expected


def test_prices_of_an_unknown_model_is_one_line(capsys):
    status, _, err = run(capsys, "prices", "no-such-model")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "no price for model 'no-such-model'")


def test_config_list_masks_the_auth_token(capsys):
    run(capsys, "config", "set", "proxy.auth_token", "masked-token-value")
    status, out, _ = run(capsys, "config", "list")
    assert status == 0
    assert "masked-token-value" not in out
    assert [line.split()[1] for line in out.splitlines()
            if line.startswith("proxy.auth_token")] == ["***"]
    status, out, _ = run(capsys, "config", "list", "--json")
    assert json.loads(out)["proxy.auth_token"] == {"value": "***", "source": "file"}


# -- the system service's files --------------------------------------------------------------


def test_system_flag_uses_the_debian_services_files(capsys, monkeypatch):
    for name in cli.SYSTEM_ENV:  # --system must win over the user's own settings
        monkeypatch.setenv(name, "/tmp/elsewhere/" + name)
    status, out, _ = run(capsys, "--system", "config", "list")
    if status == 0:
        assert out.rstrip().endswith("config file: /etc/tokenpak/config.json")
        assert "/var/lib/tokenpak/tokenpak.db" in out
    assert os.environ["TOKENPAK_DB"] == "/var/lib/tokenpak/tokenpak.db"
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "packaging", "systemd", "tokenpak.service")) as unit:
        environment = [line for line in unit if line.startswith("Environment=")][0]
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "packaging", "debian", "README.Debian")) as readme:
        explained = readme.read()
    for name, value in cli.SYSTEM_ENV.items():
        assert "%s=%s" % (name, value) in environment  # the same files the service uses
        assert "%s=%s" % (name, value) in explained  # and what the admin is told
    assert "tokenpak --system config set" in explained


def test_service_install_into_an_unwritable_place_is_one_line(capsys, monkeypatch, tmp_path):
    from tokenpak import service
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "file"))
    monkeypatch.setattr(service.shutil, "which", lambda name: "/usr/bin/" + name)
    status, _, err = run(capsys, "service", "install")
    assert status == ExitStatus.ERROR
    assert_one_error(err, "cannot write", "tokenpak.service")


def test_health_and_status_report_accounting_that_cannot_be_written(capsys, make_proxy,
                                                                    tmp_path):
    import shutil
    import urllib.request
    from tokenpak import daemon
    running = make_proxy()  # db.path is tmp_path/state/tokenpak.db
    with urllib.request.urlopen(running.url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"
    # a path component becomes a file; the writer re-creates a missing DB (and its directory)
    # on its own, so it may win the race between the two steps: then try again
    for _ in range(50):
        shutil.rmtree(str(tmp_path / "state"), ignore_errors=True)
        try:
            (tmp_path / "state").write_text("")
            break
        except IsADirectoryError:
            continue
    with urllib.request.urlopen(running.url + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "degraded"
    assert "is a file, not a directory" in health["accounting"]
    code, text = daemon.status(str(tmp_path / "no.pid"), running.url + "/health")
    assert text.startswith("tokenpak is running (degraded)")
    assert "problem:  db.path %s" % (tmp_path / "state" / "tokenpak.db") in text
