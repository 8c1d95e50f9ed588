"""The CLI under wrong, missing, huge and hostile arguments and files.

Hypothesis builds command lines from the real parser (every command, every flag, every
choice) and mixes in junk: unknown flags, missing values, huge numbers, control
characters, paths that are directories or missing or binary, config files and databases
that are not what they should be. Whatever it builds, `main(argv)`:
- returns a status the man page documents (0, 1, 2, 3) and never raises;
- prints no traceback and no "internal error" (that would be a bug caught by the last
  resort in main);
- on failure prints exactly one `tokenpak: error:` line followed by a hint;
- exits 2 exactly when the error is a usage error (argparse, an unknown key, a bad value on
  the command line or in the environment).

In-process calls keep it fast. `serve` is stubbed where it would listen or set up logging,
systemctl where it would run; everything before that (parsing, config, db.path checks) is
the real code.
"""

import argparse
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tokenpak import cli, daemon, doctor, lifecycle, logs, service, workers
from tokenpak.errors import ExitStatus

from conftest import free_port

PARSER = cli.build_parser()


def _commands(parser, path=()):
    """[(command path, subparser)] for every leaf command."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                leaves = _commands(sub, path + (name,))
                found += leaves or [(path + (name,), sub)]
    return found


COMMANDS = _commands(PARSER)

HOSTILE = st.sampled_from([
    "", " ", "-", "--", "-1", "0", "1e999", "nan", "inf", "9" * 400, "-9" * 50, "0x10",
    "1.5", "20MB", "1d", "true", "null", "{}", "[]", '{"a":', "\x1b[31mred", "a\nb",
    "é😀", "../../../etc/passwd", "/", "/dev/null", "/nonexistent/dir/file",
    "proxy.port", "pricing..input", "pricing.x.bogus", "proxy.providers..url",
    "proxy.providers.a b.url", "http://", "ftp://x", "strict", "aggressive", "model",
    "2099-01-01", "1970-01-01", "7d", "0s",
])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\x00"), max_size=40)
VALUE = st.one_of(HOSTILE, TEXT, st.integers(-2 ** 70, 2 ** 70).map(str))


@st.composite
def command_lines(draw, paths):
    """A command path, then a shuffle of its real flags (with good, bad or no values),
    junk flags and positional words."""
    path, sub = draw(st.sampled_from(COMMANDS))
    argv = list(path)
    if draw(st.booleans()):
        argv.insert(0, "--system") if draw(st.booleans()) else argv.insert(0, "--bogus")
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if not draw(st.booleans()):
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif action.choices and draw(st.booleans()):
            argv += [flag, draw(st.sampled_from(sorted(action.choices)))]
        elif draw(st.integers(0, 5)) == 0:
            argv.append(flag)  # missing value
        else:
            argv += [flag, draw(st.one_of(VALUE, st.sampled_from(paths)))]
    positionals = [a for a in sub._actions if not a.option_strings]
    for action in positionals:
        if draw(st.integers(0, 5)):
            if action.dest == "key":
                argv.append(draw(st.one_of(HOSTILE, st.sampled_from(_KEYS))))
            else:
                argv.append(draw(st.one_of(VALUE, st.sampled_from(paths))))
    for _ in range(draw(st.integers(0, 2))):
        argv.append(draw(st.one_of(HOSTILE, st.just("--unknown-flag"))))
    return argv


_KEYS = sorted(k for k in cli.configmod.SCHEMA if "<" not in k) + [
    "pricing.gpt-4o.input", "proxy.providers.local.url", "proxy.auth_token"]

CONFIG_FILES = st.one_of(
    st.none(), st.just(""), st.just("{not json"), st.just("[]"), st.just('"x"'),
    st.just('{"proxy": {"port": 70000}}'), st.just('{"proxy": {"prot": 1}}'),
    st.just('{"proxy": "flat"}'), st.just('{"cache": {"max_mb": "2GB"}}'),
    st.just('{"pricing": {"gpt-4o": {"input": -1}}}'), st.just("[" * 5000),
    st.just('{"log": {"level": "debug"}}'),
    st.builds(lambda k, v: json.dumps(_nested(k, v)), st.sampled_from(_KEYS),
              st.one_of(VALUE, st.integers(), st.booleans(), st.none(), st.floats())),
)
DB_FILES = st.sampled_from([None, b"", b"garbage" * 40, b"SQLite format 3\x00" + b"\x00" * 200])


def _nested(key, value):
    tree = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


@pytest.fixture
def sandbox(isolated_env, monkeypatch, tmp_path):
    """Files for the arguments, and no real listening, systemctl or network."""
    files = tmp_path / "files"
    files.mkdir()
    # A relative `--output NAME` lands three levels below tmp_path: never in the checkout,
    # and `../../../etc/passwd` (a HOSTILE value, written as root) not in /etc.
    cwd = tmp_path / "cwd" / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    (files / "binary.json").write_bytes(b"\xff\xfe\x00\x01" * 64)
    (files / "body.json").write_text(json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello " * 20}]}))
    (files / "nested.json").write_text("[" * 100000 + "]" * 100000)
    (files / "list.json").write_text("[1, 2]")
    (files / "a_file").write_text("x")
    paths = [str(files / name) for name in ("binary.json", "body.json", "nested.json",
                                            "list.json", "a_file")]
    paths += [str(files), str(files / "missing.json"), str(files / "a_file" / "below"),
              str(files / "out.json")]
    monkeypatch.setattr(lifecycle, "serve", lambda *a, **k: 0)
    monkeypatch.setattr(workers, "run", lambda *a, **k: 0)  # proxy.workers auto: 2+ cores
    monkeypatch.setattr(logs, "follow", lambda *a, **k: None)  # `logs -f` runs until Ctrl-C
    # serve would point the "tokenpak" logger at this test's captured stderr, which is
    # closed once the test ends: later tests would log into a closed file
    monkeypatch.setattr(lifecycle, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr(daemon, "start", lambda *a, **k: 0)
    monkeypatch.setattr(service.subprocess, "run", _no_systemctl)
    monkeypatch.setattr(service.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(doctor, "CONNECT_TIMEOUT", 0.2)
    closed = "http://127.0.0.1:%d" % free_port()
    for name in ("OPENAI", "ANTHROPIC", "GOOGLE"):
        monkeypatch.setenv("TOKENPAK_%s_URL" % name, closed)
    monkeypatch.setenv("TOKENPAK_PORT", str(free_port()))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_env / ".config"))
    for name in cli.SYSTEM_ENV:  # --system rewrites these; monkeypatch restores them
        monkeypatch.setenv(name, os.environ[name])
    return paths


def _no_systemctl(argv, **kwargs):
    raise FileNotFoundError(2, "No such file or directory", argv[0])


def check(argv, status, out, err):
    where = "argv=%r\nstatus=%r\nstdout=%s\nstderr=%s" % (argv, status, out, err)
    assert isinstance(status, int) and status in {int(s) for s in ExitStatus}, where
    assert "Traceback" not in out + err and "internal error" not in err, where
    errors = [line for line in err.splitlines() if line.startswith("tokenpak: error: ")]
    assert len(errors) <= 1, where
    if status in (ExitStatus.ERROR, ExitStatus.USAGE) and errors:
        lines = err.splitlines()
        at = lines.index(errors[0])
        assert at + 1 < len(lines) and lines[at + 1].startswith("tokenpak: hint: "), where
    if status == ExitStatus.USAGE:
        assert errors, where  # a usage error always says what was wrong
    if errors and status not in (ExitStatus.ERROR, ExitStatus.USAGE):
        raise AssertionError("an error line with exit status %d\n%s" % (status, where))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_command_line_ever_produces_a_traceback(sandbox, capsys, data):
    config_path, db_path = os.environ["TOKENPAK_CONFIG"], os.environ["TOKENPAK_DB"]
    for path, content in ((config_path, data.draw(CONFIG_FILES, "config file")),
                          (db_path, data.draw(DB_FILES, "database"))):
        if content is None:
            if os.path.exists(path):
                os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(content if isinstance(content, bytes) else content.encode())
    argv = data.draw(command_lines(sandbox), "argv")
    status = cli.main(argv)
    out, err = capsys.readouterr()
    check(argv, status, out, err)
    os.environ.update({"TOKENPAK_CONFIG": config_path, "TOKENPAK_DB": db_path})


@pytest.mark.parametrize("argv, status", [
    ([], ExitStatus.USAGE),
    (["--bogus"], ExitStatus.USAGE),
    (["serve", "--port"], ExitStatus.USAGE),
    (["serve", "--port", "9" * 400], ExitStatus.USAGE),
    (["serve", "--mode", "turbo"], ExitStatus.USAGE),
    (["stats", "--since", "yesterday"], ExitStatus.USAGE),
    (["stats", "--by", "week"], ExitStatus.USAGE),
    (["config", "set", "proxy.port"], ExitStatus.USAGE),
    (["config", "set", "proxy.port", "-5"], ExitStatus.USAGE),
    (["config", "get", "\x1b[31m"], ExitStatus.USAGE),
    (["compress"], ExitStatus.USAGE),
    (["compress", "/"], ExitStatus.ERROR),
    (["compress", "/nonexistent"], ExitStatus.ERROR),
    (["cache"], ExitStatus.USAGE),
    (["cache", "flush"], ExitStatus.USAGE),
    (["prices", "a", "b"], ExitStatus.USAGE),
    (["doctor", "--fix"], ExitStatus.USAGE),
])
def test_each_kind_of_mistake_has_its_documented_status(sandbox, capsys, argv, status):
    got = cli.main(argv)
    out, err = capsys.readouterr()
    check(argv, got, out, err)
    assert got == status, err
