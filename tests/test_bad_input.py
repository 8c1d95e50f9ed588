"""Bad input and the optional client token: tokenpak answers a clear 4xx (or forwards
untouched, where that is the transparent choice) and stays healthy."""

import json
import socket
import urllib.error

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (RunningProxy, assert_healthy, openai_client, proxy_settings,
                     raw_request, send_raw)


def test_slow_loris_client_is_cut_off(make_proxy, fake):
    proxy = make_proxy(proxy__client_timeout=0.5)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    # ...and then nothing more: the per-connection timeout closes it.
    assert sock.recv(100) == b""
    sock.close()
    assert_healthy(proxy)
    assert fake.requests == []


def test_content_length_that_lies_is_not_forwarded(make_proxy, fake):
    proxy = make_proxy(proxy__client_timeout=0.5)
    answer = send_raw(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer sk-x\r\nContent-Length: 500\r\n\r\n"
                             b'{"model": "gpt-4o"}')
    assert answer == b""  # the rest never came: closed, nothing sent upstream
    assert fake.requests == []
    assert_healthy(proxy)


def test_endless_header_line_gets_431(proxy, fake):
    answer = send_raw(proxy, b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    assert_healthy(proxy)


def test_invalid_utf8_in_a_prompt_is_forwarded_untouched(proxy, fake):
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", body,
                              {"Authorization": "Bearer sk-x"})
    assert fake.last().body == body
    assert response.status in (200, 400)


def test_deeply_nested_json_is_forwarded_untouched(proxy, fake):
    depth = 100000
    body = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": '
            + b"[" * depth + b"]" * depth + b"}]}")
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", body,
                              {"Authorization": "Bearer sk-x"})
    assert response.status != 500
    assert fake.last().body == body
    assert_healthy(proxy)


@pytest.mark.parametrize("body", [
    {"model": "gpt-4o"},
    {"model": "gpt-4o", "messages": "not a list"},
    {"model": "gpt-4o", "messages": [None, 3, "x", {"role": "user"}]},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": {"odd": True}}]},
    {"model": 12, "messages": [{"role": "tool", "content": [{"type": "weird"}]}]},
    [1, 2, 3],
])
def test_valid_json_of_the_wrong_shape_is_forwarded(make_proxy, fake, body):
    proxy = make_proxy(footer__enabled=True, cache__enabled=True,
                       compression__level="aggressive")
    raw = json.dumps(body).encode()
    response, _ = raw_request(proxy, "POST", "/v1/chat/completions", raw,
                              {"Authorization": "Bearer sk-x"})
    assert response.status < 500
    assert fake.last().body == raw


# -- the whole request path never turns a request into a 500 --------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "tool_use_id", "id",
                                       "name", "input", "cache_control", "image_url", "x"]),
                      children, max_size=4),
    max_leaves=20)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system", "developer", 3]),
     "content": json_values}), max_size=5)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "claude-sonnet-4-6", None, 5]),
     "messages": messages},
    optional={"stream": st.booleans(), "system": json_values, "tools": json_values,
              "stream_options": json_values, "response_format": json_values,
              "temperature": json_values})


@pytest.fixture(scope="module")
def hypothesis_proxy(fake_server, tmp_path_factory):
    from tokenpak import config as configmod
    tmp = tmp_path_factory.mktemp("hyp")
    settings_ = proxy_settings(fake_server.url, tmp, footer__enabled=True, cache__enabled=True,
                               compression__level="aggressive",
                               compression__threshold_tokens=0)
    running = RunningProxy(configmod.load(settings_, environ={}, path=str(tmp / "n.json")))
    yield running
    running.stop()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/messages"]))
def test_no_request_body_becomes_a_500(hypothesis_proxy, body, path):
    key = "sk-ant-x" if path == "/v1/messages" else "sk-x"
    response, data = raw_request(hypothesis_proxy, "POST", path, json.dumps(body).encode(),
                                 {"Authorization": "Bearer " + key})
    assert response.status < 500, data[:300]


# -- optional client token when listening beyond loopback -----------------------------------
def test_auth_token_required_and_stripped_before_forwarding(make_proxy, fake):
    proxy = make_proxy(proxy__auth_token="local-secret-token")
    client = openai_client(proxy)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "x"}])
    assert "X-TokenPak-Auth" in caught.value.message
    assert fake.requests == []
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"X-TokenPak-Auth": "wrong"})
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}],
        extra_headers={"X-TokenPak-Auth": "local-secret-token"})
    assert answer.choices[0].message.content.startswith("Echo: x")
    assert fake.last().header("X-TokenPak-Auth") is None
    # /health stays open for monitoring; /stats and /metrics need the token.
    assert proxy.get("/health")[0] == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        proxy.get("/stats")
    assert caught.value.code == 401
    assert "X-TokenPak-Auth" in json.loads(caught.value.read())["error"]["message"]
    assert proxy.get("/stats", {"X-TokenPak-Auth": "local-secret-token"})[0] == 200
