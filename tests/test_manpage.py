"""The man page documents every command, option, config key and environment variable.

The lists come from the code (`build_parser()`, `config.SCHEMA`, `config.EXTRA_ENV`), so a
new flag or key without a man-page entry fails here, naming what is missing.
"""

import argparse
import os
import re
import shutil
import subprocess

import pytest

import tokenpak
from tokenpak import config
from tokenpak.cli import build_parser

MAN_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "man", "tokenpak.1")
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "CONFIGURATION",
            "ENVIRONMENT", "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]
# How the man page spells each schema type in a key's entry.
TYPE_WORDS = {"str": "string", "int": "integer", "float": "float", "bool": "boolean",
              "path": "path", "choice": "one of", "list": "list"}


def _plain(line):
    """A roff line as the reader sees its words: macros, fonts and escapes removed."""
    macro = re.match(r"^\.(B|I|BR|BI|IB|RB|IR|RI|TP|SS|SH|PP|IP|EX|EE|br)\b ?", line)
    if macro:  # macro arguments: quotes only group words
        line = line[macro.end():].replace('"', "")
    line = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", line)
    for escape, char in ((r"\-", "-"), (r"\e", "\\"), (r"\(aq", "'"), (r"\(dq", '"'),
                         (r"\&", ""), (r"\ ", " ")):
        line = line.replace(escape, char)
    return line


def _load():
    """{section: [plain lines]}, {(section, .SS title): [plain lines]} ("" before the
    first .SS) and {(section, .TP tag): body text}."""
    sections, subsections, entries = {}, {}, {}
    current, sub = None, ""
    with open(MAN_PAGE, encoding="utf-8") as f:
        raw = [line.rstrip("\n") for line in f if not line.startswith('.\\"')]
    for i, line in enumerate(raw):
        if line.startswith(".SH "):
            current, sub = line[4:].strip().strip('"'), ""
            sections[current] = []
            continue
        if current is None:
            continue
        if line.startswith(".SS "):
            sub = line[4:].strip().strip('"')
        sections[current].append(_plain(line))
        subsections.setdefault((current, sub), []).append(_plain(line))
        if line == ".TP" and i + 1 < len(raw):
            body = []
            for nxt in raw[i + 2:]:
                if nxt.startswith((".TP", ".SH", ".SS", ".PP")):
                    break
                body.append(_plain(nxt))
            entries[(current, _plain(raw[i + 1]).strip())] = " ".join(body)
    return sections, subsections, entries


SECTION_TEXT, SUBSECTIONS, ENTRIES = _load()


def _text(section):
    return "\n".join(SECTION_TEXT.get(section, []))


def _mentions(text, word):
    return re.search(r"(?<![\w.-])%s(?![\w-])" % re.escape(word), text) is not None


def _walk(parser, path=()):
    """Yield (command path, parser) for every subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _walk(sub, path + (name,))


def _long_options(parser, with_help=False):
    """The parser's --options; --help is documented once, for tokenpak and every command."""
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and action.help != argparse.SUPPRESS
            and (with_help or not isinstance(action, argparse._HelpAction))}


def test_sections_present_in_order():
    found = [name for name in SECTION_TEXT if name in SECTIONS]
    assert found == SECTIONS, "man page sections: %s" % list(SECTION_TEXT)


def test_every_command_is_documented():
    missing = [" ".join(path) for path, _ in _walk(build_parser())
               if not _mentions(_text("COMMANDS"), " ".join(path))]
    assert not missing, "COMMANDS in man/tokenpak.1 misses: %s" % ", ".join(missing)


def _option_text(path):
    """Where the options of command `path` are documented: OPTIONS' own subsection for it
    (".SS serve", ".SS config list") or, for the global ones, OPTIONS before any .SS."""
    return "\n".join(SUBSECTIONS.get(("OPTIONS", " ".join(path)), []))


def test_every_long_option_is_documented():
    parser = build_parser()
    wanted = {((), opt) for opt in _long_options(parser, with_help=True)}
    wanted |= {(path, opt) for path, sub in _walk(parser) for opt in _long_options(sub)}
    missing = sorted("%s %s" % (" ".join(("tokenpak",) + path), opt) for path, opt in wanted
                     if not _mentions(_option_text(path), opt))
    assert not missing, "OPTIONS in man/tokenpak.1 misses: %s" % ", ".join(missing)


def test_no_documented_option_is_missing_from_the_cli():
    """The other direction: OPTIONS does not describe flags the CLI does not have."""
    parser = build_parser()
    parsers = {(): parser}
    parsers.update({path: sub for path, sub in _walk(parser)})
    stale = []
    for path, sub in parsers.items():
        known = _long_options(sub, with_help=True)
        for opt in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", _option_text(path))):
            if opt not in known:
                stale.append("%s %s" % (" ".join(("tokenpak",) + path), opt))
    assert not stale, "man/tokenpak.1 documents options the CLI lacks: %s" % ", ".join(stale)


def _default_words(key):
    default = key.default
    if default is None:
        return ["no default"]
    if isinstance(default, bool):
        return ["true" if default else "false"]
    if default == "" or default == []:
        return ["empty"]
    if isinstance(default, float) and default.is_integer():
        return [str(int(default)), str(default)]
    return [str(default)]


@pytest.mark.parametrize("name", sorted(config.SCHEMA))
def test_every_config_key_is_documented_with_type_default_and_env(name):
    key = config.SCHEMA[name]
    body = ENTRIES.get(("CONFIGURATION", name))
    assert body is not None, "CONFIGURATION in man/tokenpak.1 has no entry for %s" % name
    assert TYPE_WORDS[key.type] in body, "%s: type %s not stated" % (name, key.type)
    assert any(_mentions(body, word) or word in body for word in _default_words(key)), \
        "%s: default %r not stated" % (name, key.default)
    if key.env:
        assert _mentions(body, key.env), "%s: its variable %s not named" % (name, key.env)
    for choice in key.choices or ():
        assert _mentions(body, choice), "%s: choice %s not listed" % (name, choice)


def test_every_environment_variable_is_documented():
    names = {key.env for key in config.SCHEMA.values() if key.env} | set(config.EXTRA_ENV)
    environment = _text("ENVIRONMENT")
    missing = sorted(name for name in names if not _mentions(environment, name))
    assert not missing, "ENVIRONMENT in man/tokenpak.1 misses: %s" % ", ".join(missing)


def test_exit_statuses_are_documented():
    from tokenpak.errors import ExitStatus
    documented = {tag for (section, tag) in ENTRIES if section == "EXIT STATUS"}
    missing = [str(int(s)) for s in ExitStatus if str(int(s)) not in documented]
    assert not missing, "EXIT STATUS misses: %s" % ", ".join(missing)


def test_examples_cover_the_client_setups():
    examples = _text("EXAMPLES")
    for needle in ("base_url=\"http://localhost:8766/v1\"", "ANTHROPIC_BASE_URL",
                   "openai/", "curl http://localhost:8766", "systemctl --user",
                   'api_base="http://localhost:8766/v1", api_key="sk-ant-...",'):
        assert needle in examples, "EXAMPLES misses %s" % needle


@pytest.mark.parametrize("name", sorted(n for n, k in config.SCHEMA.items()
                                         if k.type in ("int", "float")))
def test_every_number_states_its_range_and_unit(name):
    """The range the code enforces is the one the page states, and sizes and durations
    say so (they take units)."""
    key = config.SCHEMA[name]
    body = ENTRIES[("CONFIGURATION", name)]
    bounds = "range %s to %s" % (config._plain(key.low), config._plain(key.high))
    assert bounds in body, "%s: %r not stated in %r" % (name, bounds, body)
    word = {"bytes": "size in bytes", "MiB": "size in MiB", "seconds": "duration in seconds",
            None: "USD" if key.type == "float" and name.startswith(("pricing.", "budget."))
            else "integer"}[key.unit]
    assert word in body, "%s: %r not stated" % (name, word)


def test_every_flags_choices_and_default_are_documented():
    parser = build_parser()
    for path, sub in [((), parser)] + list(_walk(parser)):
        text = _option_text(path)
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            for choice in action.choices or ():
                if isinstance(action, argparse._SubParsersAction):
                    continue
                assert _mentions(text, choice), "%s %s: choice %s not documented" % (
                    " ".join(path), action.option_strings[-1], choice)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert re.search(r"%s\W[^\n]*\n?.*the default|default[^.]*%s" % (
                    action.default, action.default), text), \
                    "%s %s: default %s not documented" % (" ".join(path),
                                                         action.option_strings[-1],
                                                         action.default)


def _write_config(text):
    path = os.environ["TOKENPAK_CONFIG"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


# (what happens, how to make it happen, the words the page's entry for its status uses)
EXIT_CASES = [
    ("a bad value on the command line", lambda: ["serve", "--port", "70000"], "command line"),
    ("a bad value in the environment",
     lambda: os.environ.__setitem__("TOKENPAK_PORT", "x") or ["config", "list"], "environment"),
    ("an unknown configuration key", lambda: ["config", "get", "no.such"],
     "configuration key"),
    ("an unknown command", lambda: ["frobnicate"], "unknown command"),
    ("a bad value in the file",
     lambda: _write_config('{"proxy": {"port": 70000}}') or ["config", "list"],
     "bad value in the configuration file"),
    ("a file that cannot be written",
     lambda: ["compress", MAN_PAGE, "--output", "/nonexistent/dir/x.json"],
     "cannot be read or written"),
    ("doctor finding a problem",
     lambda: os.environ.__setitem__("TOKENPAK_DB", MAN_PAGE + "/x.db") or ["doctor"], "doctor"),
    ("status when tokenpak is not running", lambda: ["status"], "status"),
    ("stop when tokenpak is not running", lambda: ["stop"], "stop"),
]


@pytest.mark.parametrize("case", EXIT_CASES, ids=[c[0] for c in EXIT_CASES])
def test_exit_status_is_the_one_the_page_documents(case, capsys, monkeypatch):
    """Run the command and look up the status it returned in EXIT STATUS."""
    from tokenpak import cli
    what, make, words = case
    monkeypatch.setenv("TOKENPAK_PORT", os.environ.get("TOKENPAK_PORT", "8766"))
    monkeypatch.setenv("TOKENPAK_DB", os.environ["TOKENPAK_DB"])
    status = cli.main(make())
    capsys.readouterr()
    body = " ".join(ENTRIES.get(("EXIT STATUS", str(int(status))), "").split())
    assert words in body, "%s exits %d, but EXIT STATUS %d says: %r" % (
        what, status, status, body)


def test_cache_control_and_strict_mode_read_as_in_the_readme():
    readme = " ".join(open(os.path.join(os.path.dirname(MAN_PAGE), os.pardir, "README.md"),
                           encoding="utf-8").read().split())
    description = " ".join(_text("DESCRIPTION").split())
    for words in ("no-cache skips the lookup and refreshes the entry",
                  "no-store neither reads nor writes"):
        assert words.replace("no-", "Cache-Control: no-", 1) in description, words
        assert words.split(" ", 1)[1] in readme, words
    assert "least recently used" in ENTRIES[("CONFIGURATION", "cache.max_mb")]
    assert "least recently used" in readme
    assert "lossless" in ENTRIES[("CONFIGURATION", "compression.level")]
    assert "lossless" in readme


def test_version_matches_the_package():
    with open(MAN_PAGE, encoding="utf-8") as f:
        header = next(line for line in f if line.startswith(".TH "))
    assert '"tokenpak %s"' % tokenpak.__version__ in header, header


def test_mandoc_lint_is_clean():
    """Needs mandoc (`apt-get install mandoc`; .ci/run installs it): a missing linter is a
    failure, not a skip, so CI cannot pass without running it."""
    assert shutil.which("mandoc"), "mandoc is not installed: apt-get install mandoc"
    done = subprocess.run(["mandoc", "-Tlint", "-W", "warning", MAN_PAGE],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr
