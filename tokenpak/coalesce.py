"""Request coalescing: identical requests in flight at once make one upstream call.

The first handler thread to `join()` a key becomes the *leader* and makes the upstream call;
the others are *followers* and read the leader's answer from a shared `Flight`: the status
and headers as soon as they are known, then every body chunk from the start, blocking for new
ones as they arrive. Followers of a stream therefore see events as the leader receives them,
not after it finishes.

Contract for followers:
- `wait_head(timeout)` returns (status, headers), or None when the leader failed before a
  response head arrived or `timeout` passed: the follower then makes its own upstream call.
- `chunks(timeout)` yields every chunk from the first; it ends normally after a successful
  `finish(True)`, and raises `FlightFailed` after the last chunk received when the leader
  finished with ok=False (upstream reset, incomplete stream), or `FlightTimeout` when no
  chunk and no finish arrived within `timeout` seconds. A follower that has already sent
  bytes to its client ends that response the way the leader does on an upstream failure.

Every wait is a `threading.Condition` wait with a timeout: no busy loop, and no thread waits
forever on a leader that died. A flight keeps its own chunks only; it is dropped when the
leader calls `done()` and the last follower lets go of it.

The upstream call lives as long as someone reads it. When the leader's own client hangs up,
`leader_left(stop)` says whether a follower still reads; if one does, the leader keeps
relaying for it and `stop` runs when the last follower `leave()`s. A flight nobody reads
any more is *abandoned*: later arrivals start their own call instead of joining it.
"""

from __future__ import annotations

import threading
import time


class FlightFailed(Exception):
    """The leader's upstream call failed or ended incomplete."""


class FlightTimeout(FlightFailed):
    """Nothing arrived from the leader within the follower's timeout."""


class Flight:
    """One upstream call shared by a leader (writes) and any number of followers (read)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self.head = None  # (status, headers)
        self._chunks = []
        self.done = False
        self.ok = False
        self.followers = 0  # followers still reading (joined, not yet left)
        self.leader_gone = False  # the leader's own client hung up
        self.abandoned = False  # nobody reads the upstream call any more
        self._stop = None  # what leader_left() was given, run when the last follower leaves
        self.started = time.monotonic()

    # -- leader --------------------------------------------------------------

    def set_head(self, status: int, headers: list) -> None:
        """The upstream response status and headers are known."""
        with self._cond:
            self.head = (status, list(headers))
            self._cond.notify_all()

    def push(self, chunk: bytes) -> None:
        """A body chunk arrived from upstream (call in arrival order)."""
        if chunk:
            with self._cond:
                self._chunks.append(chunk)
                self._cond.notify_all()

    def finish(self, ok: bool) -> None:
        """The upstream call is over; ok=False when it failed or ended incomplete."""
        with self._cond:
            if not self.done:
                self.done, self.ok = True, bool(ok)
            self._cond.notify_all()

    def body(self) -> bytes:
        """Every chunk pushed so far, joined (the leader uses it to fill the cache)."""
        with self._cond:
            return b"".join(self._chunks)

    def leader_left(self, stop) -> bool:
        """The leader's client hung up. True when no follower reads either: the caller
        stops the upstream call now. Otherwise `stop()` runs when the last one leaves."""
        with self._cond:
            self.leader_gone = True
            if self.followers > 0:
                self._stop = stop
                return False
            self.abandoned = True
            return True

    # -- followers -----------------------------------------------------------

    def add_follower(self) -> bool:
        """Join as a follower; False if the flight is abandoned (start a new call)."""
        with self._cond:
            if self.abandoned:
                return False
            self.followers += 1
            return True

    def leave(self) -> None:
        """A follower stops reading (finished, failed, or its client hung up). The last
        one out after the leader's client stops the upstream call."""
        stop = None
        with self._cond:
            self.followers -= 1
            if self.followers == 0 and self.leader_gone and not self.done:
                self.abandoned = True
                stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def wake(self) -> None:
        """Wake followers waiting in chunks() so they re-check their `gone` event."""
        with self._cond:
            self._cond.notify_all()

    def wait_head(self, timeout: float):
        """(status, headers) once known; None if the leader failed first or on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self.head is not None or self.done, timeout)
            return self.head

    def chunks(self, timeout: float, gone=None):
        """Iterate the body from its first chunk; see the module doc for how it ends.

        `timeout` bounds the wait for each next chunk (an idle timeout, like a read
        timeout), not the whole body. The iteration also ends, quietly, once the
        threading.Event `gone` is set (the follower's client hung up; call wake()).
        """
        index = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: index < len(self._chunks) or self.done
                                           or (gone is not None and gone.is_set()), timeout):
                    raise FlightTimeout("no data from the leading request for %.1f s" % timeout)
                if gone is not None and gone.is_set():
                    return
                fresh = self._chunks[index:]
                finished, ok = self.done, self.ok
            index += len(fresh)
            # yield outside the lock: a slow client must not stall the leader
            for chunk in fresh:
                yield chunk
            if not fresh and finished:
                if ok:
                    return
                raise FlightFailed("the leading request failed")


class Coalescer:
    """The flights in progress, by key. Thread-safe.

    `stale_after` (seconds) protects against a leader that never calls `finish`/`done`:
    after it, new arrivals start a fresh flight instead of joining the old one.
    """

    def __init__(self, stale_after: float = 900.0):
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._flights = {}

    def join(self, key: str):
        """(flight, is_leader): the first caller for `key` leads, later ones follow."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None and self._joinable(flight) and flight.add_follower():
                return flight, False
            flight = Flight()
            self._flights[key] = flight
            return flight, True

    def _joinable(self, flight):
        # A leader that finished but has not called done() yet still holds a whole answer.
        if flight.done:
            return flight.ok  # a finished good answer is still complete; a failed one is not
        return time.monotonic() - flight.started < self.stale_after

    def done(self, key: str, flight) -> None:
        """The leader is finished with `key`: later arrivals start anew (or hit the cache)."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def __len__(self):
        with self._lock:
            return len(self._flights)
