"""A TCP relay for tests and benchmarks, so a link between two servers can be cut, healed and
slowed for real.

``Relay(target_port)`` listens on 127.0.0.1 (an ephemeral port, ``relay.port``) and forwards every
connection it accepts to 127.0.0.1:``target_port``, both ways. A server told to join through it
(``-rh 127.0.0.1 -rp <relay.port>``) talks to its peer as if directly, and its dialler redials
through the relay after a break, so the whole repair path is exercised. ``UP`` is the direction
from the side that dialled the relay to the target, ``DOWN`` the other.

- ``cut()`` resets every relayed connection (both ends get an RST, in-flight bytes are lost) and
  resets each new one as soon as it is accepted, until ``heal()``: a cable pulled out.
- ``blackhole()`` keeps every TCP connection open but silently drops every byte, both ways, and
  new connections are accepted and swallowed: a dead peer or a cut cable that TCP does not notice,
  which only the heartbeat can detect. ``heal()`` resets the black-holed connections (their
  streams lost bytes, so they cannot resume) and forwards new ones again.
- ``shape(direction, policy)`` splits and delays what each *new* connection carries in that
  direction, as a lossy network does with TCP segments: part of what the relay read goes on at
  once, the rest later. Bytes are never reordered, lost or duplicated, only held back: a byte is
  sent no earlier than any byte before it. Policies: ``HoldAfterLines(n, seconds)`` (deliver up
  to the n-th message line at once, hold the rest), ``RandomSegments(seed, max_delay, ...)``
  (random split points, random delays), ``Latency(seconds)`` (everything, that much later).
  ``shape(direction, None)`` stops shaping new connections.
- ``stall(seconds)`` holds back what the target sends on each *new* connection for ``seconds``
  after it was accepted, then delivers it in order: a peer slow to answer while a link comes up.
- ``Relay(..., record=True)`` keeps every line it delivered, with the time and direction
  (``relay.trace``), so a test can show the wire in its failure message.
- Counters: ``accepted``, ``relayed`` (connections), ``accepted_at`` (``perf_counter`` of each
  relayed connection), ``bytes_relayed()`` (both ways, as delivered), so a benchmark can see
  when a dialler came back and how much recovery sent.

Design: one accept thread, and two pump threads per relayed connection (one per direction), all
daemons. Each pump is the only writer of its destination and keeps a queue of held segments with
their release times; it waits for whichever comes first, more bytes or the next release. It is
bounded: at most ``max_pairs`` connections at once (more are reset), fixed-size reads, and it
closes itself after ``lifetime`` seconds if a test forgot to. Only 127.0.0.1.
"""

import contextlib
import itertools
import logging
import random
import select
import socket
import struct
import threading
import time
from collections import deque

from ..protocol import HEARTBEAT_LINE

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024
OPEN, CUT, BLACKHOLE = "open", "cut", "blackhole"
UP, DOWN = "up", "down"  # dialler -> target, target -> dialler


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


# --- shaping policies ---------------------------------------------------------------------------
#
# A policy makes one *cutter* per connection and direction: ``cutter(data, now)`` returns the
# pieces of ``data`` (in order, joined they are ``data``) with the monotonic time at which each
# may be sent. The pump never sends a piece before an earlier one, so a cutter need not care.

class HoldAfterLines:
    """Deliver a connection's bytes up to and including its ``lines``-th message line (``h``
    heartbeats do not count) as they come, and hold everything after it for ``seconds`` from the
    moment that line passed: the second TCP segment of an opening arriving late.

    ``held`` is set when a hold begins on some connection; ``holds`` lists (began, until) in
    monotonic time for each hold, so a test can act inside the window and check it did."""

    def __init__(self, lines, seconds):
        self.lines = lines
        self.seconds = seconds
        self.held = threading.Event()
        self.holds = []

    def __repr__(self):
        return f"HoldAfterLines({self.lines}, {self.seconds})"

    def cutter(self, _pair_number, _direction):
        counted = 0
        until = None
        partial = b""  # the unfinished line at the end of the previous read

        def cut(data, now):
            nonlocal counted, until, partial
            if until is not None:
                return [(until, data)]
            start = 0
            text = partial + data
            offset = len(partial)  # where ``data`` begins in ``text``
            while True:
                end = text.find(b"\n", start)
                if end < 0:
                    partial = text[start:]
                    return [(now, data)]
                if text[start:end].strip(b"\r") not in (HEARTBEAT_LINE, b""):  # not a message
                    counted += 1
                start = end + 1
                if counted == self.lines:
                    until = now + self.seconds
                    self.holds.append((now, until))
                    self.held.set()
                    split = start - offset
                    return [(now, data[:split]), (until, data[split:])]

        return cut


class Latency:
    """Hold every byte ``seconds`` after it was read: a long, slow path (the order stays)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __repr__(self):
        return f"Latency({self.seconds})"

    def cutter(self, _pair_number, _direction):
        return lambda data, now: [(now + self.seconds, data)]


class RandomSegments:
    """Split reads at random points and hold each piece for a random time up to ``max_delay``
    seconds (``chance``: how often a piece is delayed at all). With ``window``, only the first
    ``window`` seconds of each connection are shaped (a link's opening); later bytes pass at once,
    behind whatever is still held. Each connection's choices come from ``seed``, its number and
    the direction, so a run can be replayed (thread timing aside)."""

    def __init__(self, seed, max_delay, window=None, chance=0.5, max_splits=3):
        self.seed = seed
        self.max_delay = max_delay
        self.window = window
        self.chance = chance
        self.max_splits = max_splits
        self.delayed = 0  # pieces held back, over all connections (a plain counter)

    def __repr__(self):
        return f"RandomSegments({self.seed!r}, {self.max_delay}, window={self.window})"

    def cutter(self, pair_number, direction):
        rng = random.Random(f"{self.seed}/{pair_number}/{direction}")
        started = time.monotonic()

        def cut(data, now):
            if self.window is not None and now - started > self.window:
                return [(now, data)]
            splits = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, self.max_splits))))
            pieces = []
            for begin, end in zip([0, *splits], [*splits, len(data)]):
                delay = rng.uniform(0, self.max_delay) if rng.random() < self.chance else 0.0
                self.delayed += delay > 0
                pieces.append((now + delay, data[begin:end]))
            return pieces

        return cut


class _Stall:
    """Hold everything until a fixed time (``Relay.stall``)."""

    def __init__(self, release_at):
        self.release_at = release_at

    def cutter(self, _pair_number, _direction):
        return lambda data, now: [(max(now, self.release_at), data)]


# --- the relay ----------------------------------------------------------------------------------

class _Pair:
    """One relayed connection: ``client`` (accepted) and ``upstream`` (to the target, or None
    when accepted into a black hole), with a cutter per direction (None: pass bytes at once)."""

    def __init__(self, relay, number, client, upstream, blackholed, cutters):
        self.relay = relay
        self.number = number
        self.client = client
        self.upstream = upstream
        self.blackholed = blackholed  # bytes are dropped; set once (under the relay lock)
        self.cutters = cutters  # {UP: cutter or None, DOWN: cutter or None}
        self.done = False  # reset or closed; a plain flag, read by the pumps

    def start(self):
        threading.Thread(target=self._pump, args=(self.client, self.upstream, UP),
                         name=f"relay-{self.relay.port}-up", daemon=True).start()
        if self.upstream is not None:
            threading.Thread(target=self._pump, args=(self.upstream, self.client, DOWN),
                             name=f"relay-{self.relay.port}-down", daemon=True).start()

    def _pump(self, src, dst, direction):
        """Copy ``src`` to ``dst`` until either ends; only this thread writes to ``dst``. Bytes
        the cutter holds wait in ``queue`` (release time, bytes), in order; release times only
        grow, so nothing overtakes what was read before it."""
        cut = self.cutters.get(direction)
        queue = deque()
        last_release = 0.0
        recorder = self.relay._recorder(self.number, direction)
        eof = False
        try:
            while not self.done:
                now = time.monotonic()
                while queue and queue[0][0] <= now:
                    self._deliver(dst, queue.popleft()[1], recorder)
                if eof:
                    if not queue:
                        break
                    time.sleep(queue[0][0] - now)
                    continue
                if queue:
                    readable, _, _ = select.select([src], [], [], queue[0][0] - now)
                    if not readable:
                        continue
                data = src.recv(CHUNK)
                now = time.monotonic()  # recv may have blocked
                if not data:
                    eof = True  # what is held still goes out, then the close
                    continue
                if self.blackholed or dst is None:
                    continue  # swallowed
                if cut is None and not queue:
                    self._deliver(dst, data, recorder)
                    continue
                for release, piece in (cut(data, now) if cut else [(now, data)]):
                    last_release = max(last_release, release)
                    if piece:
                        queue.append((last_release, piece))
        except (OSError, ValueError):  # reset under our feet, or the far side is gone
            pass
        self._ended()

    def _deliver(self, dst, data, recorder):
        if self.blackholed:
            return
        if recorder is not None:  # before the send, so a reader of the trace never lags the peer
            recorder(data)
        dst.sendall(data)
        self.relay._delivered(len(data))

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
    """A cuttable, shapeable TCP relay from 127.0.0.1:``port`` to 127.0.0.1:``target_port``
    (module doc)."""

    def __init__(self, target_port, max_pairs=64, lifetime=1800.0, record=False):
        self.target_port = target_port
        self.max_pairs = max_pairs
        self._lock = threading.Lock()  # guards _mode, _pairs, _stall, _policies and the counters
        self._mode = OPEN
        self._pairs = set()
        self._stall = 0.0
        self._policies = {UP: None, DOWN: None}
        self._numbers = itertools.count(1)
        self.accepted = 0  # connections accepted (whatever happened to them)
        self.relayed = 0  # connections forwarded to the target
        self.accepted_at = []  # perf_counter of each connection forwarded to the target
        self._bytes = 0  # delivered, both ways
        self.resets = 0  # connections reset by cut(), heal() or while cut
        self.record = record
        self.trace = []  # (monotonic time, connection number, direction, line), if record
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

    def shape(self, direction, policy):
        """Split and delay the bytes of each new connection in ``direction`` (UP or DOWN) by
        ``policy`` (a ``HoldAfterLines``, a ``RandomSegments``, or None to stop); returns it."""
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, not {direction!r}")
        with self._lock:
            self._policies[direction] = policy
        return policy

    def policies(self):
        """The shaping policies in force for new connections (for reports)."""
        with self._lock:
            return [policy for policy in self._policies.values() if policy is not None]

    def stall(self, seconds):
        """Hold the target's bytes on each new connection for ``seconds`` after it is accepted
        (0 to stop stalling new connections). A ``shape(DOWN, ...)`` policy takes precedence."""
        with self._lock:
            self._stall = seconds

    def connections(self):
        """How many relayed connections are open now."""
        with self._lock:
            return len(self._pairs)

    def lines(self, direction=None, since=0.0):
        """The recorded lines (``record=True``) as (time, connection number, direction, line),
        optionally of one direction and from monotonic time ``since`` on."""
        return [entry for entry in list(self.trace)
                if entry[0] >= since and (direction is None or entry[2] == direction)]

    def bytes_relayed(self):
        with self._lock:
            return self._bytes

    def _delivered(self, count):
        with self._lock:
            self._bytes += count

    def close(self):
        """Stop accepting and reset every connection. Idempotent."""
        self._stopping.set()
        self._reset_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # --- internals -------------------------------------------------------------------------

    def _forget(self, pair):
        with self._lock:
            self._pairs.discard(pair)

    def _recorder(self, number, direction):
        """A function recording the complete lines of what one pump delivers, or None."""
        if not self.record:
            return None
        partial = b""

        def record(data):
            nonlocal partial
            *complete, partial = (partial + data).split(b"\n")
            now = time.monotonic()
            for line in complete:
                self.trace.append((now, number, direction, line))
        return record

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
        self._reset_all()

    def _reset_all(self):
        """Reset every connection and close the listener (both are idempotent)."""
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
            policies = dict(self._policies)
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
        number = next(self._numbers)
        if stall and policies[DOWN] is None:
            policies[DOWN] = _Stall(time.monotonic() + stall)
        cutters = {direction: policy.cutter(number, direction) if policy is not None else None
                   for direction, policy in policies.items()}
        pair = _Pair(self, number, client, upstream, blackholed=(mode == BLACKHOLE), cutters=cutters)
        with self._lock:
            if self._mode != mode or self._stopping.is_set():  # a fault raced with us
                pair.reset()
                return
            self._pairs.add(pair)
            if upstream is not None:
                self.relayed += 1
                self.accepted_at.append(time.perf_counter())
        pair.start()
