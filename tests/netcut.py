"""A TCP relay for tests, so a link between two servers can be cut and healed for real.

``Relay(target_port)`` listens on 127.0.0.1 (an ephemeral port, ``relay.port``) and forwards every
connection it accepts to 127.0.0.1:``target_port``, both ways. A server told to join through it
(``-rh 127.0.0.1 -rp <relay.port>``) talks to its peer as if directly, and its dialler redials
through the relay after a break, so the whole repair path is exercised.

- ``cut()`` resets every relayed connection (both ends get an RST, in-flight bytes are lost) and
  resets each new one as soon as it is accepted, until ``heal()``: a cable pulled out.
- ``blackhole()`` keeps every TCP connection open but silently drops every byte, both ways, and
  new connections are accepted and swallowed: a dead peer or a cut cable that TCP does not notice,
  which only the heartbeat can detect. ``heal()`` resets the black-holed connections (their
  streams lost bytes, so they cannot resume) and forwards new ones again.
- ``stall(seconds)`` holds back what the target sends on each *new* connection for ``seconds``
  after it was accepted, then delivers it in order: a peer slow to answer while a link comes up.

Design: one accept thread, and two pump threads per relayed connection (one per direction), all
daemons. It is bounded: at most ``max_pairs`` connections at once (more are reset), fixed-size
reads, and it closes itself after ``lifetime`` seconds if a test forgot to. Only 127.0.0.1.
"""

import contextlib
import logging
import select
import socket
import struct
import threading
import time

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024
OPEN, CUT, BLACKHOLE = "open", "cut", "blackhole"


def _reset(sock):
    """Close ``sock`` so that the peer gets an RST (SO_LINGER 0), waking any thread reading it."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes a blocked recv without sending anything
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock):
    """An orderly close (FIN), as the far end did."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One relayed connection: ``client`` (accepted) and ``upstream`` (to the target, or None
    when accepted into a black hole)."""

    def __init__(self, relay, client, upstream, blackholed, release_at):
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.blackholed = blackholed  # bytes are dropped; set once (under the relay lock)
        self.release_at = release_at  # monotonic time before which upstream bytes are held
        self.done = False  # reset or closed; a plain flag, read by the pumps

    def start(self):
        threading.Thread(target=self._pump, args=(self.client, self.upstream, 0.0),
                         name=f"relay-{self.relay.port}-up", daemon=True).start()
        if self.upstream is not None:
            threading.Thread(target=self._pump, args=(self.upstream, self.client, self.release_at),
                             name=f"relay-{self.relay.port}-down", daemon=True).start()

    def _pump(self, src, dst, release_at):
        """Copy ``src`` to ``dst`` until either ends. Bytes read before ``release_at`` are held
        and sent, in order, at that time; only this thread writes to ``dst``."""
        held = []
        try:
            while not self.done:
                if release_at:
                    wait = release_at - time.monotonic()
                    if wait <= 0:
                        release_at = 0.0
                        if held and not self.blackholed:
                            dst.sendall(b"".join(held))
                        held = []
                        continue
                    readable, _, _ = select.select([src], [], [], wait)
                    if not readable:
                        continue
                data = src.recv(CHUNK)
                if not data:
                    break
                if self.blackholed or dst is None:
                    continue  # swallowed
                if release_at:
                    held.append(data)
                else:
                    dst.sendall(data)
        except (OSError, ValueError):  # reset under our feet, or the far side is gone
            pass
        self._ended()

    def _ended(self):
        """One side closed (or a send failed): mirror it to the other side, unless the pair is
        black-holed, where nothing gets through, not even a close."""
        if self.blackholed or self.done:
            return
        self.done = True
        _close(self.client)
        _close(self.upstream)
        self.relay._forget(self)

    def reset(self):
        self.done = True
        _reset(self.client)
        _reset(self.upstream)


class Relay:
    """A cuttable TCP relay from 127.0.0.1:``port`` to 127.0.0.1:``target_port`` (module doc)."""

    def __init__(self, target_port, max_pairs=64, lifetime=1800.0):
        self.target_port = target_port
        self.max_pairs = max_pairs
        self._lock = threading.Lock()  # guards _mode, _pairs, _stall and the counters
        self._mode = OPEN
        self._pairs = set()
        self._stall = 0.0
        self.accepted = 0  # connections accepted (whatever happened to them)
        self.relayed = 0  # connections forwarded to the target
        self.resets = 0  # connections reset by cut(), heal() or while cut
        self._stopping = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)  # to notice close() and the lifetime
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    def __repr__(self):
        return f"<Relay {self.port}->{self.target_port} {self._mode}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def mode(self):
        return self._mode

    # --- faults ----------------------------------------------------------------------------

    def cut(self):
        """Reset every relayed connection and each new one, until ``heal()``."""
        with self._lock:
            self._mode = CUT
            pairs, self._pairs = list(self._pairs), set()
            self.resets += len(pairs)
        for pair in pairs:
            pair.reset()

    def blackhole(self):
        """Keep connections open but drop every byte, until ``heal()``."""
        with self._lock:
            self._mode = BLACKHOLE
            for pair in self._pairs:
                pair.blackholed = True

    def heal(self):
        """Forward again. Black-holed connections are reset: they lost bytes mid-stream."""
        with self._lock:
            self._mode = OPEN
            dead = [pair for pair in self._pairs if pair.blackholed]
            self._pairs.difference_update(dead)
            self.resets += len(dead)
        for pair in dead:
            pair.reset()

    def stall(self, seconds):
        """Hold the target's bytes on each new connection for ``seconds`` after it is accepted
        (0 to stop stalling new connections)."""
        with self._lock:
            self._stall = seconds

    def connections(self):
        """How many relayed connections are open now."""
        with self._lock:
            return len(self._pairs)

    def close(self):
        """Stop accepting and reset every connection. Idempotent."""
        self._stopping.set()
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            pair.reset()
        with contextlib.suppress(OSError):
            self._listener.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # --- internals -------------------------------------------------------------------------

    def _forget(self, pair):
        with self._lock:
            self._pairs.discard(pair)

    def _accept_loop(self):
        while not self._stopping.is_set():
            if time.monotonic() > self._deadline:
                log.warning("relay %d outlived its lifetime; closing it", self.port)
                self._stopping.set()
                break
            try:
                client, _address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            client.settimeout(None)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._take(client)
            except Exception:  # one connection, never the relay
                log.exception("relay %d could not take a connection", self.port)
                _reset(client)
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            pair.reset()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _take(self, client):
        with self._lock:
            self.accepted += 1
            mode, stall, full = self._mode, self._stall, len(self._pairs) >= self.max_pairs
            if mode == CUT or full:
                self.resets += 1
        if mode == CUT or full:
            _reset(client)
            return
        upstream = None
        if mode == OPEN:
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                _reset(client)  # the target is down: the dialler sees the refusal as a reset
                return
            upstream.settimeout(None)
            with contextlib.suppress(OSError):
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(self, client, upstream, blackholed=(mode == BLACKHOLE),
                     release_at=time.monotonic() + stall)
        with self._lock:
            if self._mode != mode or self._stopping.is_set():  # a fault raced with us
                pair.reset()
                return
            self._pairs.add(pair)
            if upstream is not None:
                self.relayed += 1
        pair.start()
