"""Coalescing: one leader per key, followers see the head and every chunk as it arrives."""

import threading

import pytest

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
