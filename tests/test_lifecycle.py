"""The process around the server (lifecycle.py): SIGHUP reloads and what systemd hears,
and the import graph of the package, which must have no cycle."""

import ast
import logging
import os
import socket
import threading

import pytest

from tokenpak import config as configmod
from tokenpak import lifecycle

from helpers import WAIT, proxy_settings

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenpak")


def _states(sock):
    """The first line of every datagram sent so far ("RELOADING=1", "READY=1", ...)."""
    sock.settimeout(0.5)
    states = []
    try:
        while True:
            states.append(sock.recv(4096).decode().split("\n", 1)[0])
    except socket.timeout:
        return states


def _loader(fake, tmp_path, **overrides):
    settings = proxy_settings(fake.url, tmp_path)
    settings.update(overrides)
    return lambda: configmod.load(settings, environ={}, path=str(tmp_path / "none.json"))


def test_a_reload_whose_config_is_rejected_still_tells_systemd_ready(
        make_proxy, fake, tmp_path, notify_socket, caplog):
    # The config loads, but its pricing section is refused when the proxy applies it: the
    # half-applied reload of issue 12 left systemd at RELOADING=1 for good.
    proxy = make_proxy()
    load = _loader(fake, tmp_path, **{"pricing.my-model.input": 1.0})
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, load)
    assert _states(notify_socket) == ["RELOADING=1", "READY=1"]
    assert "reload failed, keeping the running settings: pricing.my-model needs both " \
           "input and output prices" in caplog.text
    assert "reload: " not in caplog.text  # nothing is reported as changed
    assert proxy.get("/health")[0] == 200  # and it still serves


def test_a_config_file_that_no_longer_loads_still_tells_systemd_ready(
        make_proxy, tmp_path, notify_socket, caplog):
    proxy = make_proxy()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, lambda: configmod.load(path=str(broken)))
    assert _states(notify_socket) == ["RELOADING=1", "READY=1"]
    assert "reload failed, keeping the running settings" in caplog.text


def test_a_reload_logs_what_changed_and_what_needs_a_restart(
        make_proxy, fake, tmp_path, notify_socket, caplog):
    proxy = make_proxy()
    load = _loader(fake, tmp_path, **{"footer.enabled": True, "proxy.read_timeout": 7,
                                      "proxy.auth_token": "s3cret-token"})
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        lifecycle.reload_config(proxy.server, load)
    assert _states(notify_socket) == ["RELOADING=1", "READY=1"]
    assert "reload: footer.enabled = True\n" in caplog.text + "\n"
    assert "reload: proxy.read_timeout = 7.0 (takes effect after a restart)" in caplog.text
    assert "reload: proxy.auth_token = ***" in caplog.text
    assert "s3cret-token" not in caplog.text
    assert proxy.app.runtime.footer is True


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serve_warns_when_it_listens_beyond_loopback(fake, tmp_path, monkeypatch, caplog,
                                                     host, warned):
    # beyond loopback without a token only when the admin said so (test_exposure.py)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    config = _loader(fake, tmp_path, **{"proxy.host": host,
                                        "proxy.allow_remote_without_auth": True})()
    started = threading.Event()
    servers = []

    def on_ready(server):
        servers.append(server)
        started.set()
    with caplog.at_level(logging.INFO, logger="tokenpak"):
        thread = threading.Thread(target=lifecycle.serve, args=(config, on_ready))
        thread.start()
        assert started.wait(WAIT)
        servers[0].shutdown()
        thread.join(WAIT)
    assert ("anyone who can reach this address can use the proxy" in caplog.text) is warned
    assert "tokenpak stopped" in caplog.text


# --- no import cycle ----------------------------------------------------------------------


def _imports(path, modules):
    """The tokenpak modules `path` imports, at the top or inside a function alike. The
    body of `if __name__ == "__main__":` is left out: it runs only in the module that
    Python executes as `__main__`, a different module object from the imported one, so
    it cannot close a cycle."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tokenpak.")]
            found.update(name.split(".")[1] for name in names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("tokenpak"):
                continue
            module = (node.module or "").split(".")
            module = module[1:] if node.level == 0 else module
            if module and module[0]:
                found.add(module[0])
            else:  # `from . import a, b` / `from tokenpak import a, b`
                found.update(a.name for a in node.names if a.name in modules)
    return found & modules


def import_graph():
    modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py")}
    return {name: _imports(os.path.join(PACKAGE, name + ".py"), modules) - {name}
            for name in modules}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph[name]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert graph["cli"] >= {"lifecycle", "daemon", "service"}  # the walk sees lazy imports
    assert "proxy" in graph["lifecycle"] and "cli" not in graph["proxy"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
