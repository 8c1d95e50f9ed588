"""Notice clients that hang up while their stream is still running.

A relay thread spends its time blocked reading the provider. If the client disconnects,
the thread would only find out when it next writes, which for a model that thinks for a
minute before its next token is a minute of upstream tokens nobody reads. One watcher thread
for the whole process polls the client sockets of all running streams; when one reports
end-of-file or a reset, it calls the stream's abort function, which shuts the upstream socket
down so the blocked read returns at once.

Only a client that is *receiving* a response is watched, so any byte it sends is either EOF
or a pipelined next request; the latter is peeked, never consumed, and simply ends the
watch.
"""

import logging
import selectors
import socket
import threading

log = logging.getLogger("tokenpak")
# Selectors whose wait sees a socket registered meanwhile from another thread (the kernel
# keeps the interest list); the poll- and select()-based ones need their wait interrupted.
_LIVE_SELECTORS = tuple(getattr(selectors, name) for name in ("EpollSelector", "KqueueSelector")
                        if hasattr(selectors, name))


class HangupWatcher:
    """One thread, one selector, any number of watched client sockets."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = None
        self._closed = False
        # Waking the watcher thread on every watch() would cost each stream a thread switch
        # (and a GIL handoff) just as its first event is relayed: only when it is needed.
        self._wake_on_watch = not isinstance(self._selector, _LIVE_SELECTORS)

    def watch(self, client_sock, abort):
        """Call `abort()` (from the watcher thread) if `client_sock` hangs up.
        Returns a token for `unwatch`."""
        with self._lock:
            if self._closed:
                return None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokenpak-hangup",
                                                daemon=True)
                self._thread.start()
            try:
                self._selector.register(client_sock, selectors.EVENT_READ, abort)
            except (KeyError, ValueError, OSError):
                return None
        if self._wake_on_watch:
            self._wake()
        return client_sock

    def unwatch(self, token):
        if token is None:
            return
        with self._lock:
            try:
                self._selector.unregister(token)
            except (KeyError, ValueError, OSError):
                pass

    def close(self):
        with self._lock:
            self._closed = True
        self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self):
        while True:
            try:
                events = self._selector.select(timeout=1.0)
            except OSError:
                events = []
            with self._lock:
                if self._closed:
                    self._selector.close()
                    return
            for key, _ in events:
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                    continue
                self._check(key.fileobj, key.data)

    def _check(self, sock, abort):
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by peer, or closed under us
        self.unwatch(sock)
        if data:
            return  # a pipelined request: the client is still there
        try:
            abort()
        except Exception:  # the stream may have just finished; nothing to abort
            log.debug("abort after client hangup failed", exc_info=True)


def shutdown_upstream(response):
    """Shut down the socket under a streaming `requests` response, from any thread, so a
    read blocked on it returns immediately."""
    raw = getattr(response, "raw", None)
    conn = getattr(raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
