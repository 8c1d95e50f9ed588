"""Runs last (file order): no API key used anywhere in the suite appears in any artefact.

The artefacts are everything the run left under pytest's temporary directory: every
tokenpak log record (conftest's log_to_artefacts), the stdout and stderr of every tokenpak
process the tests started, daemon log files, config files, the sqlite databases with their
WAL files, and cache secrets."""

from helpers import ALL_KEYS, OTHER_SECRETS


def test_no_credential_in_any_artefact(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    secrets = [key.encode() for key in ALL_KEYS + OTHER_SECRETS]
    scanned, found = 0, []
    for path in base.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        scanned += 1
        found += ["%s: %s" % (path.relative_to(base), key.decode())
                  for key in secrets if key in data]
    assert scanned > 50  # the suite's logs, databases and process outputs are there
    assert found == []
