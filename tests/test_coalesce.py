"""Coalescing: one leader per key, followers see the head and every chunk as it arrives."""

import json
import threading

import pytest

from helpers import open_stream, wait_for
from tokenpak.coalesce import Coalescer, Flight, FlightFailed, FlightTimeout

WAIT = 10.0  # generous: only reached when the code under test is broken


def test_eight_threads_one_leader_all_get_the_answer():
    co = Coalescer()
    barrier = threading.Barrier(8)
    joined = threading.Barrier(8)
    results, leaders = [None] * 8, []

    def worker(i):
        barrier.wait()
        flight, leader = co.join("k")
        joined.wait()
        if leader:
            leaders.append(i)
            flight.set_head(200, [("content-type", "application/json")])
            flight.push(b'{"ok":')
            flight.push(b"true}")
            flight.finish(True)
            co.done("k", flight)
            results[i] = b'{"ok":true}'
        else:
            head = flight.wait_head(WAIT)
            results[i] = (head, b"".join(flight.chunks(WAIT)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(leaders) == 1
    followers = [r for i, r in enumerate(results) if i not in leaders]
    assert len(followers) == 7
    for head, body in followers:
        assert head == (200, [("content-type", "application/json")])
        assert body == b'{"ok":true}'
    assert len(co) == 0


def test_follower_gets_chunk_one_before_leader_pushes_chunk_two():
    co = Coalescer()
    flight, leader = co.join("s")
    assert leader
    follower_flight, follower_leads = co.join("s")
    assert follower_flight is flight and not follower_leads and flight.followers == 1
    got_first = threading.Event()
    received = []

    def follower():
        assert flight.wait_head(WAIT) == (200, [])
        for chunk in flight.chunks(WAIT):
            received.append(chunk)
            if chunk == b"data: 1\n\n":
                got_first.set()

    t = threading.Thread(target=follower)
    t.start()
    flight.set_head(200, [])
    flight.push(b"data: 1\n\n")
    # the leader does not push chunk 2 until the follower has chunk 1 in hand
    assert got_first.wait(WAIT)
    assert received == [b"data: 1\n\n"]
    flight.push(b"data: 2\n\n")
    flight.finish(True)
    t.join(WAIT)
    assert received == [b"data: 1\n\n", b"data: 2\n\n"]
    assert flight.body() == b"data: 1\n\ndata: 2\n\n"


def test_late_follower_replays_from_the_start():
    flight = Flight()
    flight.set_head(200, [])
    for i in range(5):
        flight.push(b"%d" % i)
    flight.finish(True)
    assert list(flight.chunks(WAIT)) == [b"0", b"1", b"2", b"3", b"4"]


def test_leader_failure_before_head():
    co = Coalescer()
    flight, _ = co.join("k")
    _, leads = co.join("k")
    assert not leads
    flight.finish(False)
    assert flight.wait_head(WAIT) is None
    with pytest.raises(FlightFailed):
        list(flight.chunks(WAIT))


def test_leader_failure_mid_stream_delivers_what_arrived_then_raises():
    flight = Flight()
    flight.set_head(200, [])
    flight.push(b"a")
    flight.push(b"b")
    flight.finish(False)
    got = []
    with pytest.raises(FlightFailed) as err:
        for chunk in flight.chunks(WAIT):
            got.append(chunk)
    assert got == [b"a", b"b"]
    assert not isinstance(err.value, FlightTimeout)


def test_follower_timeouts():
    flight = Flight()
    assert flight.wait_head(0.05) is None
    flight.set_head(200, [])
    flight.push(b"x")
    it = flight.chunks(0.05)
    assert next(it) == b"x"
    with pytest.raises(FlightTimeout):
        next(it)


def test_failed_flight_is_not_joined_again_but_a_good_finished_one_is():
    co = Coalescer()
    failed, _ = co.join("k")
    failed.finish(False)
    fresh, leads = co.join("k")
    assert leads and fresh is not failed
    fresh.set_head(200, [])
    fresh.finish(True)
    again, leads = co.join("k")
    assert again is fresh and not leads
    co.done("k", fresh)
    _, leads = co.join("k")
    assert leads


def test_done_by_a_stale_leader_does_not_remove_a_newer_flight():
    co = Coalescer()
    old, _ = co.join("k")
    old.finish(False)
    new, leads = co.join("k")
    assert leads
    co.done("k", old)
    same, leads = co.join("k")
    assert same is new and not leads


def test_stale_flight_is_abandoned_for_new_arrivals():
    co = Coalescer(stale_after=0.0)
    first, _ = co.join("k")
    second, leads = co.join("k")
    assert leads and second is not first


def test_different_keys_do_not_share():
    co = Coalescer()
    a, la = co.join("a")
    b, lb = co.join("b")
    assert la and lb and a is not b


def test_upstream_stops_when_the_last_reader_leaves_in_either_order():
    stopped = []
    # the leader's client leaves first: the stop waits for the follower
    co = Coalescer()
    flight, _ = co.join("k")
    co.join("k")
    assert flight.leader_left(lambda: stopped.append("late")) is False
    assert stopped == []
    flight.leave()
    assert stopped == ["late"] and flight.abandoned
    # the follower leaves first: the leader is told to stop at once
    flight, _ = co.join("j")
    co.join("j")
    flight.leave()
    assert flight.leader_left(lambda: stopped.append("never")) is True
    assert stopped == ["late"] and flight.abandoned


def test_a_follower_finishing_after_a_complete_answer_stops_nothing():
    stopped = []
    co = Coalescer()
    flight, _ = co.join("k")
    co.join("k")
    flight.leader_left(lambda: stopped.append(1))
    flight.finish(True)  # the leader relayed the whole answer for the follower
    flight.leave()
    assert stopped == [] and not flight.abandoned


def test_an_abandoned_flight_is_not_joined():
    co = Coalescer()
    flight, _ = co.join("k")
    assert flight.leader_left(lambda: None) is True
    fresh, leads = co.join("k")
    assert leads and fresh is not flight
    co.done("k", flight)  # the old leader unwinding does not remove the new flight
    assert co.join("k") == (fresh, False)


def test_a_follower_whose_client_left_stops_waiting():
    flight = Flight()
    flight.set_head(200, [])
    flight.push(b"a")
    gone = threading.Event()
    got = []

    def follower():
        for chunk in flight.chunks(WAIT, gone):
            got.append(chunk)

    t = threading.Thread(target=follower)
    t.start()
    assert wait_for(lambda: got == [b"a"], timeout=WAIT)
    gone.set()
    flight.wake()
    t.join(WAIT)
    assert not t.is_alive() and got == [b"a"]


# -- through a real tokenpak: the shared upstream call lives as long as someone reads it ------
def read_stream(sock, data=b""):
    """Everything until the chunked body's last chunk (or the peer closing)."""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("last", ["follower", "leader"])
def test_upstream_call_stops_once_leader_and_followers_have_all_gone(make_proxy, fake, last):
    """Two identical streams share one upstream call that goes silent after its first event
    (a model thinking). When both clients have hung up, in either order, tokenpak closes
    the upstream connection; with read_timeout at 60 s and the fake holding for 20 s, a
    close within the wait can only come from tokenpak noticing nobody reads any more."""
    proxy = make_proxy(cache__enabled=True, proxy__read_timeout=60)
    leader, _ = open_stream(proxy, "hold")
    follower, head = open_stream(proxy, "hold")
    assert b"X-TokenPak-Cache: hit" in head  # it shares the leader's call...
    assert fake.count("/chat/completions") == 1  # ...which is the only one upstream
    first, second = (leader, follower) if last == "follower" else (follower, leader)
    first.close()
    second.close()
    assert wait_for(lambda: fake.closed_by_peer == 1)
    assert wait_for(lambda: proxy.app.active == 0)


def test_follower_keeps_receiving_after_the_leader_leaves(make_proxy, fake):
    """The leader's client hangs up after the first event; the upstream call goes on for
    the follower still reading, which gets the whole answer, and it is cached."""
    proxy = make_proxy(cache__enabled=True, proxy__read_timeout=60)
    words = " ".join("w%d" % i for i in range(30))
    # The fake sends the first event, waits for the gate, then the rest 50 ms apart.
    headers = {"x-fake-delay": "0.05"}
    leader, _ = open_stream(proxy, "gate", text=words, headers=headers)
    follower, data = open_stream(proxy, "gate", text=words, headers=headers)
    assert b"X-TokenPak-Cache: hit" in data and fake.count("/chat/completions") == 1
    leader.close()
    fake.gate.set()
    with follower:
        body = read_stream(follower, data)
    assert body.endswith(b"0\r\n\r\n")  # a complete chunked body, not a cut-off one
    events = [json.loads(line[6:]) for line in body.split(b"\n")
              if line.startswith(b"data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))
    assert text == "Echo: " + words
    assert b"data: [DONE]" in body and b'"error"' not in body
    # The leader's relay ran to the end for the follower: the answer is in the cache.
    again, data = open_stream(proxy, "", text=words, headers=headers)
    with again:
        assert b"X-TokenPak-Cache: hit" in read_stream(again, data)
    assert fake.count("/chat/completions") == 1
