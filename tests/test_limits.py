"""Process limits a server holding thousands of streams needs (issue 13, many long streams).

Each stream holds two descriptors in tokenpak (the client's and the upstream's), and the
usual soft limit on open files is 1024; `tokenpak serve` raises it to the hard limit at
start, so a tokenpak started from a plain shell keeps accepting past a few hundred streams.
"""

import resource
import socket
import subprocess
import sys
import urllib.request

import pytest

from helpers import REPO, free_port, tokenpak_env, wait_healthy

LOW_SOFT_LIMIT = 64


def _low_soft_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard))


def _limits(pid):
    """(soft, hard) 'Max open files' of a process, as /proc shows them."""
    with open("/proc/%d/limits" % pid) as handle:
        for line in handle:
            if line.startswith("Max open files"):
                return tuple(line.split()[3:5])
    raise AssertionError("no open files limit for %d" % pid)


@pytest.fixture
def low_limit_tokenpak(fake, isolated_env):
    """`python -m tokenpak serve` started with a soft open-files limit of 64."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * LOW_SOFT_LIMIT:
        pytest.skip("the hard open-files limit here is too low to show a raise")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tokenpak", "serve", "--port", str(port)],
                               env=tokenpak_env(fake.url, isolated_env), cwd=str(REPO),
                               preexec_fn=_low_soft_limit, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    process.url = "http://127.0.0.1:%d" % port
    try:
        wait_healthy(process.url, process=process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_serve_raises_the_soft_open_files_limit_to_the_hard_one(low_limit_tokenpak):
    soft, hard = _limits(low_limit_tokenpak.pid)
    assert soft == hard
    assert soft == "unlimited" or int(soft) > LOW_SOFT_LIMIT


def test_more_clients_than_the_inherited_soft_limit_are_all_served(low_limit_tokenpak):
    port = int(low_limit_tokenpak.url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * LOW_SOFT_LIMIT)]
    try:
        # tokenpak accepted every one of them (a thread each, waiting for a request line),
        # and still accepts another and answers it
        with urllib.request.urlopen(low_limit_tokenpak.url + "/health", timeout=10) as answer:
            assert answer.status == 200
        held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        held[-1].settimeout(10)
        assert held[-1].recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
