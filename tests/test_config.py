"""`tokenpak config` and the settings precedence: CLI > environment > file > default."""

import json
import os
import stat

import pytest

from helpers import config_file, run_cli as run
from tokenpak import config as configmod
from tokenpak.errors import TokenpakError




def test_set_creates_dir_and_private_file(capsys, isolated_env):
    status, out, _ = run(capsys, "config", "set", "proxy.port", "9001")
    assert status == 0
    path = config_file()
    assert json.load(open(path)) == {"proxy": {"port": 9001}}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert run(capsys, "config", "get", "proxy.port")[1] == "9001\n"


def test_set_keeps_an_existing_files_mode(capsys):
    run(capsys, "config", "set", "proxy.port", "9001")
    os.chmod(config_file(), 0o640)
    run(capsys, "config", "set", "proxy.port", "9002")
    assert stat.S_IMODE(os.stat(config_file()).st_mode) == 0o640
    assert json.load(open(config_file())) == {"proxy": {"port": 9002}}


def test_set_writes_nested_json_and_keeps_other_keys(capsys):
    run(capsys, "config", "set", "compression.level", "aggressive")
    run(capsys, "config", "set", "compression.threshold_tokens", "2000")
    run(capsys, "config", "set", "pricing.gpt-4.1.input", "2.5")
    run(capsys, "config", "set", "proxy.providers.local.url", "http://127.0.0.1:11434/v1")
    data = json.load(open(config_file()))
    assert data["compression"] == {"level": "aggressive", "threshold_tokens": 2000}
    assert data["pricing"] == {"gpt-4.1": {"input": 2.5}}
    assert data["proxy"]["providers"]["local"]["url"] == "http://127.0.0.1:11434/v1"
    config = configmod.load()
    assert config.pricing_overrides() == {"gpt-4.1": {"input": 2.5}}
    assert config.providers()["local"]["url"] == "http://127.0.0.1:11434/v1"


def test_unknown_key_exits_2_with_suggestion(capsys):
    status, _, err = run(capsys, "config", "set", "compresion.level", "strict")
    assert status == 2
    assert "unknown config key 'compresion.level'" in err
    assert "did you mean 'compression.level'?" in err
    assert not os.path.exists(config_file())


@pytest.mark.parametrize("key,value", [
    ("proxy.port", "eighty"), ("compression.enabled", "maybe"),
    ("compression.level", "extreme"), ("cache.ttl_seconds", "-5"),
    ("proxy.providers.openai.url", "ftp://nope"),
])
def test_wrong_type_exits_2_and_leaves_file_untouched(capsys, key, value):
    run(capsys, "config", "set", "proxy.port", "9001")
    before = open(config_file(), "rb").read()
    status, _, err = run(capsys, "config", "set", key, value)
    assert status == 2
    assert err.startswith("tokenpak: error: invalid value for %s" % key)
    assert open(config_file(), "rb").read() == before


def test_corrupt_file_is_one_clear_line(capsys):
    os.makedirs(os.path.dirname(config_file()), exist_ok=True)
    with open(config_file(), "w") as handle:
        handle.write('{"proxy": {"port": 80,}}')
    status, _, err = run(capsys, "config", "list")
    assert status == 1
    first = err.splitlines()[0]
    assert first.startswith("tokenpak: error: config file %s is not valid JSON: " % config_file())
    assert "line 1 column" in first
    assert "Traceback" not in err


def test_unset(capsys):
    run(capsys, "config", "set", "footer.enabled", "false")
    assert configmod.load().get("footer.enabled") is False
    status, out, _ = run(capsys, "config", "unset", "footer.enabled")
    assert status == 0
    assert configmod.load().get("footer.enabled") is True
    assert json.load(open(config_file())) == {}


def test_list_shows_value_and_source(capsys, monkeypatch):
    run(capsys, "config", "set", "proxy.port", "9001")
    monkeypatch.setenv("TOKENPAK_MODE", "strict")
    status, out, _ = run(capsys, "config", "list", "--json")
    data = json.loads(out)
    assert data["proxy.port"] == {"value": 9001, "source": "file"}
    assert data["compression.level"] == {"value": "strict", "source": "env"}
    assert data["cache.enabled"] == {"value": True, "source": "default"}
    status, out, _ = run(capsys, "config", "list")
    line = [l for l in out.splitlines() if l.startswith("proxy.port ")][0]
    assert line.split() == ["proxy.port", "9001", "file"]


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"proxy": {"port": 1111, "host": "127.0.0.2"},
                                "compression": {"threshold_tokens": 100}}))
    env = {"TOKENPAK_PORT": "2222", "TOKENPAK_COMPACT_THRESHOLD_TOKENS": "200"}
    config = configmod.load({"proxy.port": 3333}, environ=env, path=str(path))
    assert (config.get("proxy.port"), config.source("proxy.port")) == (3333, "cli")
    assert config.get("compression.threshold_tokens") == 200
    assert config.source("compression.threshold_tokens") == "env"
    assert (config.get("proxy.host"), config.source("proxy.host")) == ("127.0.0.2", "file")
    assert config.source("cache.max_mb") == "default"


@pytest.mark.parametrize("variable,key,raw,value", [
    ("TOKENPAK_COMPACT", "compression.enabled", "0", False),
    ("TOKENPAK_FOOTER", "footer.enabled", "0", False),
    ("TOKENPAK_CACHE", "cache.enabled", "1", True),
    ("TOKENPAK_MODE", "compression.level", "aggressive", "aggressive"),
    ("TOKENPAK_HOST", "proxy.host", "0.0.0.0", "0.0.0.0"),
    ("TOKENPAK_OPENAI_URL", "proxy.providers.openai.url", "http://x:1", "http://x:1"),
    ("TOKENPAK_PASSTHROUGH_URL", "proxy.passthrough_url", "http://y:2", "http://y:2"),
    ("TOKENPAK_DB", "db.path", "/tmp/x.db", "/tmp/x.db"),
])
def test_environment_variables(tmp_path, variable, key, raw, value):
    config = configmod.load(environ={variable: raw}, path=str(tmp_path / "none.json"))
    assert config.get(key) == value
    assert config.source(key) == "env"


def test_bad_environment_value_is_a_usage_error(tmp_path):
    with pytest.raises(TokenpakError, match=r"\$TOKENPAK_PORT"):
        configmod.load(environ={"TOKENPAK_PORT": "abc"}, path=str(tmp_path / "n.json"))


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"proxy": {"prot": 1}}')
    with pytest.raises(TokenpakError) as caught:
        configmod.load(environ={}, path=str(path))
    assert str(path) in caught.value.message
    assert "proxy.port" in caught.value.hint


def test_every_schema_key_has_type_default_and_help():
    for key in configmod.SCHEMA.values():
        assert key.type in ("str", "int", "float", "bool", "path", "choice", "list")
        assert key.help and len(key.help) < 120
        if "<" not in key.name:
            assert configmod.parse_value(key.name, key.default if key.type != "bool"
                                         else str(key.default)) == key.default


def test_design_contract_keys_and_variables_exist():
    names = set(configmod.SCHEMA)
    for key in ("proxy.host", "proxy.port", "proxy.providers.<name>.url", "proxy.passthrough_url",
                "proxy.max_request_bytes", "compression.enabled", "compression.level",
                "compression.threshold_tokens", "compression.preserve_code",
                "compression.preserve_json", "cache.enabled", "cache.ttl_seconds",
                "cache.max_mb", "footer.enabled", "db.path"):
        assert key in names
    env = {k.env for k in configmod.SCHEMA.values() if k.env} | set(configmod.EXTRA_ENV)
    for variable in ("TOKENPAK_PORT", "TOKENPAK_HOST", "TOKENPAK_MODE", "TOKENPAK_COMPACT",
                     "TOKENPAK_COMPACT_THRESHOLD_TOKENS", "TOKENPAK_DB", "TOKENPAK_CONFIG",
                     "TOKENPAK_FOOTER", "TOKENPAK_CACHE", "TOKENPAK_OPENAI_URL",
                     "TOKENPAK_ANTHROPIC_URL", "TOKENPAK_GOOGLE_URL", "TOKENPAK_PASSTHROUGH_URL"):
        assert variable in env
