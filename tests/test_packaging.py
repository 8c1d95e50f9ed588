"""packaging/: the systemd units pass systemd's own checks, the Debian spec says what the
issue asks, and (opt-in, TOKENPAK_BUILD_DEB=1) the .deb really builds and holds it.

`systemd-analyze verify` exits 0 even on unknown directives, so any output at all fails.
The nspawn boot test is packaging/test-deb.sh, run by hand (it needs root and a mirror).
"""

import configparser
import json
import os
import re
import shutil
import subprocess

import pytest

from tokenpak import config, service

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "packaging")
SYSTEM_UNIT = os.path.join(PKG, "systemd", "tokenpak.service")
SOCKET_UNIT = os.path.join(PKG, "systemd", "tokenpak.socket")
USER_UNIT = os.path.join(PKG, "systemd", "user", "tokenpak.service")
DEBIAN = os.path.join(PKG, "debian")
MAX_EXPOSURE = 2.0
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _directives(path):
    """[(section, key, value)] in file order (repeated keys kept)."""
    found, section = [], None
    for line in _read(path).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def _get(path, key):
    return [value for _, k, value in _directives(path) if k == key]


@pytest.fixture
def analyze_env(tmp_path):
    """Units as installed: /usr/bin/tokenpak (a stub when not installed here) and the man
    page findable, since verify checks ExecStart= binaries and Documentation=man: pages."""
    mandir = tmp_path / "man" / "man1"
    mandir.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "man", "tokenpak.1"), mandir / "tokenpak.1")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    exe = "/usr/bin/tokenpak"
    if not os.access(exe, os.X_OK):
        exe = str(tmp_path / "bin" / "tokenpak")
        os.makedirs(os.path.dirname(exe))
        with open(exe, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(exe, 0o755)

    def copy(unit):
        text = _read(unit).replace("/usr/bin/tokenpak", exe)
        if shutil.which("man") is None:  # verify looks Documentation=man: pages up with man(1)
            text = re.sub(r"(?m)^Documentation=.*\n", "", text)
        target = tmp_path / "units" / os.path.basename(unit)
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        return str(target)

    env = dict(os.environ, MANPATH=str(tmp_path / "man"), XDG_RUNTIME_DIR=str(runtime),
               SYSTEMD_LOG_LEVEL="notice")
    return copy, env, str(tmp_path)


def _analyze(args, env, cwd):
    done = subprocess.run(["systemd-analyze"] + args, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)
    return done.returncode, (done.stdout + done.stderr).strip()


@needs_analyze
def test_system_units_verify_without_output(analyze_env):
    copy, env, cwd = analyze_env
    code, output = _analyze(["verify", copy(SYSTEM_UNIT), copy(SOCKET_UNIT)], env, cwd)
    assert (code, output) == (0, "")


@needs_analyze
def test_user_unit_verifies_without_output(analyze_env):
    copy, env, cwd = analyze_env
    code, output = _analyze(["--user", "verify", copy(USER_UNIT)], env, cwd)
    assert (code, output) == (0, "")


@needs_analyze
def test_system_unit_exposure_is_at_most_2(analyze_env):
    copy, env, cwd = analyze_env
    code, output = _analyze(["security", "--offline=yes", "--no-pager", copy(SYSTEM_UNIT)],
                            env, cwd)
    match = re.search(r"Overall exposure level for tokenpak\.service: (\d+\.\d+)", output)
    assert match, output[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, output[-1500:]


@needs_analyze
def test_user_unit_exposure_is_at_most_6_5(analyze_env):
    """A user manager cannot apply the mount-namespace options without PrivateUsers= (not
    available everywhere); the seccomp, umask and no-new-privileges ones take 9.6 to 6.3."""
    copy, env, cwd = analyze_env
    code, output = _analyze(["security", "--user", "--offline=yes", "--no-pager",
                             copy(USER_UNIT)], env, cwd)
    match = re.search(r"Overall exposure level for tokenpak\.service: (\d+\.\d+)", output)
    assert match, output[-2000:]
    assert float(match.group(1)) <= 6.5, output[-1500:]


def test_user_unit_is_sandboxed_as_far_as_a_user_manager_allows():
    for key, value in {"UMask": "0077", "NoNewPrivileges": "yes", "RestrictSUIDSGID": "yes",
                       "RestrictNamespaces": "yes", "LockPersonality": "yes",
                       "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert _get(USER_UNIT, key) == [value], key
    assert "@system-service" in _get(USER_UNIT, "SystemCallFilter")
    # namespace options would make the unit fail where unprivileged user namespaces are off
    assert not _get(USER_UNIT, "PrivateTmp") and not _get(USER_UNIT, "ProtectSystem")


def test_system_unit_cannot_reach_link_local_or_multicast():
    # 169.254.169.254 is the cloud metadata service: the machine's credentials.
    assert _get(SYSTEM_UNIT, "IPAddressDeny") == ["link-local multicast"]
    assert _get(SYSTEM_UNIT, "IPAddressAllow") == ["localhost"]
    assert _get(SYSTEM_UNIT, "UMask") == ["0077"]


def test_system_unit_runs_the_foreground_server_hardened():
    unit = SYSTEM_UNIT
    assert _get(unit, "Type") == ["notify"]
    assert _get(unit, "ExecStart") == ["/usr/bin/tokenpak serve"]  # never --daemon
    assert _get(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _get(unit, "Restart") == ["on-failure"]
    assert _get(unit, "WatchdogSec") == ["30"]
    assert _get(unit, "User") == ["tokenpak"]
    env = " ".join(_get(unit, "Environment"))
    for assignment in ("TOKENPAK_CONFIG=/etc/tokenpak/config.json",
                       "TOKENPAK_DB=/var/lib/tokenpak/tokenpak.db", "HOME=/var/lib/tokenpak"):
        assert assignment in env.split()
    expected = {"StateDirectory": "tokenpak", "ConfigurationDirectory": "tokenpak",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
                "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                "SystemCallArchitectures": "native", "MemoryDenyWriteExecute": "yes",
                "LockPersonality": "yes", "ProtectKernelTunables": "yes",
                "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
                "RestrictNamespaces": "yes"}
    for key, value in expected.items():
        assert value in _get(unit, key), "%s=%s missing" % (key, value)
    assert "@system-service" in _get(unit, "SystemCallFilter")
    # the stop timeout must outlast the default shutdown grace period
    grace = config.SCHEMA["proxy.shutdown_grace_seconds"].default
    assert float(_get(unit, "TimeoutStopSec")[0]) > grace


def test_socket_listens_on_the_default_loopback_port():
    port = config.SCHEMA["proxy.port"].default
    assert _get(SOCKET_UNIT, "ListenStream") == ["127.0.0.1:%d" % port]
    assert _get(SOCKET_UNIT, "WantedBy") == ["sockets.target"]


def test_packaged_user_unit_is_what_service_install_writes():
    written = [line for line in service.user_unit_text(["/usr/bin/tokenpak"]).splitlines()
               if line and not line.startswith("#")]
    shipped = [line for line in _read(USER_UNIT).splitlines()
               if line and not line.startswith("#")]
    assert shipped == written


def test_default_system_config_is_valid_and_loopback():
    path = os.path.join(PKG, "config.json")
    values = config.read_file(path)  # raises on an unknown key or a bad value
    assert values["proxy.host"] == "127.0.0.1"
    assert values["proxy.port"] == config.SCHEMA["proxy.port"].default
    assert json.loads(_read(path))


def _control():
    paragraphs = _read(os.path.join(DEBIAN, "control")).split("\n\n")
    parsed = []
    for text in paragraphs:
        cp = configparser.ConfigParser(interpolation=None, delimiters=(":",))
        cp.optionxform = str
        cp.read_string("[p]\n" + text)
        parsed.append({k: " ".join(v.split()) for k, v in cp["p"].items()})
    return parsed


def test_debian_control():
    source, binary = _control()[:2]
    assert "debhelper-compat (= 13)" in source["Build-Depends"]
    assert "dh-python" in source["Build-Depends"]
    depends = binary["Depends"]
    for dep in ("python3-requests", "${python3:Depends}", "${misc:Depends}", "adduser"):
        assert dep in depends
    assert "tiktoken" not in depends
    assert binary["Architecture"] == "all"


def test_tiktoken_is_not_translated_into_a_debian_dependency():
    setup_cfg = _read(os.path.join(REPO, "setup.cfg"))
    overrides = [line.split() for line in _read(os.path.join(DEBIAN, "py3dist-overrides"))
                 .splitlines() if line.strip() and not line.startswith("#")]
    if "tiktoken" in setup_cfg:
        assert ["tiktoken"] in overrides  # a name alone: dh_python3 ignores it


def test_rules_ship_socket_and_user_unit_disabled():
    rules = _read(os.path.join(DEBIAN, "rules"))
    assert "dh_installsystemduser --no-enable" in rules
    assert "dh_installsystemd --no-enable --no-start tokenpak.socket" in rules
    assert re.search(r"^\tdh_installsystemd tokenpak\.service$", rules, re.M)
    assert "--buildsystem=pybuild" in rules


def test_maintainer_scripts():
    postinst = _read(os.path.join(DEBIAN, "tokenpak.postinst"))
    postrm = _read(os.path.join(DEBIAN, "tokenpak.postrm"))
    assert "adduser --quiet --system --group" in postinst
    assert postinst.index("adduser") < postinst.index("#DEBHELPER#")  # user before start
    purge = postrm[postrm.index('"$1" = purge'):]
    for needle in ("rm -rf /var/lib/tokenpak /etc/tokenpak", "deluser", "delgroup"):
        assert needle in purge
    for script in ("tokenpak.postinst", "tokenpak.postrm"):
        assert subprocess.run(["sh", "-n", os.path.join(DEBIAN, script)]).returncode == 0
    for script in ("build-deb.sh", "test-deb.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(PKG, script)]).returncode == 0
    assert _read(os.path.join(DEBIAN, "tokenpak.install")).split() == [
        "packaging/config.json", "etc/tokenpak/"]
    assert _read(os.path.join(DEBIAN, "tokenpak.manpages")).split() == ["man/tokenpak.1"]


@pytest.mark.skipif(os.environ.get("TOKENPAK_BUILD_DEB") != "1",
                    reason="set TOKENPAK_BUILD_DEB=1 to build the .deb (about 20 s)")
def test_the_deb_builds_and_holds_what_it_should(tmp_path):
    done = subprocess.run([os.path.join(PKG, "build-deb.sh"), "--worktree", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    import tokenpak
    deb = tmp_path / ("tokenpak_%s_all.deb" % tokenpak.__version__)
    assert deb.exists()
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for path in ("./usr/bin/tokenpak", "./lib/systemd/system/tokenpak.service",
                 "./lib/systemd/system/tokenpak.socket",
                 "./usr/lib/systemd/user/tokenpak.service", "./etc/tokenpak/config.json",
                 "./usr/share/man/man1/tokenpak.1.gz",
                 "./usr/lib/python3/dist-packages/tokenpak/data/prices.json",
                 "./usr/lib/python3/dist-packages/tokenpak/dashboard.html"):
        assert path in listing
    extracted = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(extracted)], check=True)
    control = _read(extracted / "DEBIAN" / "control")
    assert "tiktoken" not in control and "python3-requests" in control
    assert _read(extracted / "DEBIAN" / "conffiles").split() == ["/etc/tokenpak/config.json"]
    postinst = _read(extracted / "DEBIAN" / "postinst")
    assert "deb-systemd-helper enable 'tokenpak.service'" in postinst
    assert "deb-systemd-invoke $_dh_action 'tokenpak.service'" in postinst
    # the socket and the user unit: only re-enabled if an admin enabled them before
    assert "deb-systemd-invoke $_dh_action 'tokenpak.socket'" not in postinst
    assert "--global" not in postinst
