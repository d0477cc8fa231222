"""The limits that keep one hostile or greedy peer from hurting anyone else (issue 11).

Every piece here is plain bookkeeping with an injectable clock, unit-tested without sockets;
the server decides where each is consulted. None of them ever blocks another connection: a
limit that slows a peer down does so by making *that peer's own reader thread* wait.

- ``TokenBucket``: flood control for one client connection. ``take(cost)`` says how long the
  reader must sleep before reading on. Nothing is dropped or reordered: while the reader sleeps
  its kernel buffer fills and TCP stalls the flooder (what EMQX does; solanum queues instead).
- ``LoginThrottle``: failed LOGINs per (address, username) and failed AUTHENTICATEs per address.
  Past ``FREE_FAILURES`` within a minute each further failure reply is delayed, growing, capped.
- ``Admission``: ``--max-connections`` and ``--max-pending-per-address``, counted with tickets.
- ``Deadlines``: one thread for every login deadline (``--login-timeout``), not one per connection.
- ``SlowConsumerRule``: when a reader with a long outbox is cut (see its docstring).
- ``LimitLog``: one log line per address per minute when a limit bites, not one per message.

Defaults, and why
-----------------
``--rate-limit 500`` activities a second and ``--rate-burst 1000``, per client connection (not
per address: marking scripts run every client from 127.0.0.1). A script sending 5,000 activities
as fast as it can has 1,000 handled at once and the other 4,000 at 500 a second: all delivered in
about 8 s, well inside the 30 s the issue allows. A person never comes close (IRC networks allow
~2 lines/s), nor does a bot posting a few a second. A flooder gets 500/s: about 1% of what one
server relays (57,000/s measured), so it cannot take more than a fair share until dozens of
connections flood at once, and ``--max-pending-per-address`` / ``--max-connections`` bound
those. An activity costs one token per started ``COST_UNIT`` (1,600 bytes) of its line: a
flooder sending big activities gets no more bytes than one sending small ones, at most 800 KB/s
in steady state, which a reader taking 1 MB/s keeps up with.

``--max-pending-per-address 2048``: marking scripts open 1,000 clients from one address at once
(and test servers dial from the same address), so 1,024 would leave almost no margin; 2,048
bounds an attacker at about 70 MiB (2,003 threads took 66 MiB) until the login deadline closes
them. ``--max-connections``: the open-files limit less ``FD_RESERVE`` descriptors kept for the
listener, the poller, logs, a store and links being dialled (``default_max_connections``).
``--login-timeout 30``: solanum's registration timeout; counted from accept, so trickling bytes
does not extend it.
"""

import heapq
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

DEFAULT_RATE = 500.0  # activities per second per client connection
DEFAULT_BURST = 1000
COST_UNIT = 1600  # an activity line costs one token per started COST_UNIT bytes (see above)
DEFAULT_LOGIN_TIMEOUT = 30.0
DEFAULT_MAX_PENDING_PER_ADDRESS = 2048
FD_RESERVE = 128


def activity_cost(line_bytes):
    """Tokens an activity line of ``line_bytes`` bytes costs: one per started ``COST_UNIT``."""
    return max(1, -(-line_bytes // COST_UNIT))


def default_max_connections(open_files_limit):
    """``--max-connections`` when not given: one descriptor per connection, less a reserve."""
    return max(1, open_files_limit - FD_RESERVE)


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; ``rate == 0`` turns it off.

    ``take`` always succeeds and may leave the bucket in debt; it returns the seconds until the
    debt is paid, which the caller sleeps before reading more. Taking first and paying after
    keeps the reader simple: what it has already read is handled in order, then it waits.
    Used by one reader thread only, so it has no lock."""

    __slots__ = ("rate", "burst", "tokens", "updated", "clock", "paused")

    def __init__(self, rate=DEFAULT_RATE, burst=DEFAULT_BURST, clock=time.monotonic):
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self.clock = clock
        self.updated = clock()
        self.paused = 0  # how many times take() asked for a pause (for the log and counters)

    def take(self, cost=1):
        """Spend ``cost`` tokens; returns the seconds to wait before reading on (0.0: none)."""
        if self.rate == 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate) - cost
        self.updated = now
        if self.tokens >= 0:
            return 0.0
        self.paused += 1
        return -self.tokens / self.rate


class LoginThrottle:
    """Failed logins per key, forgiven at ``FREE_FAILURES`` per ``WINDOW`` seconds.

    Each key holds one "level": +1 per failure, draining at ``free`` per ``window`` (a leaky
    bucket, so "5 failures within a minute" needs no list of timestamps). A failure that lifts
    the level above ``free`` is delayed ``first_delay`` seconds, doubling with each further one,
    at most ``max_delay``. A success forgets the key. Keys are (address, username) for LOGIN and
    (address,) for AUTHENTICATE. At most ``max_keys`` are kept (least recently failed dropped
    first) and a key whose level has drained to zero is gone: memory stays bounded whatever an
    attacker sends; a level stops at ``ceiling``, so an attacker who gives up is forgiven within
    minutes. Shared by every reader thread, so it has its own small lock; the caller
    sleeps the returned delay in its own thread before replying."""

    FREE_FAILURES = 5
    WINDOW = 60.0

    def __init__(self, free=FREE_FAILURES, window=WINDOW, first_delay=0.25, max_delay=2.0,
                 max_keys=100_000, clock=time.monotonic):
        self.free = free
        self.leak = free / window  # level drained per second
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_keys = max_keys
        # The level stops a few failures past the one reaching max_delay: an attacker who stops
        # is forgiven within minutes, and the delay's arithmetic cannot overflow.
        self.ceiling = free + 4 + math.ceil(math.log2(max(max_delay / first_delay, 1)))
        self.clock = clock
        self._lock = threading.Lock()  # guards _levels
        self._levels = OrderedDict()  # key -> (level, updated), least recently failed first

    def failed(self, key):
        """Record a failure for ``key``; returns the seconds to wait before sending the reply."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            level, updated = self._levels.pop(key, (0.0, now))
            level = min(max(0.0, level - (now - updated) * self.leak) + 1, self.ceiling)
            self._levels[key] = (level, now)
            if len(self._levels) > self.max_keys:
                self._levels.popitem(last=False)
        excess = level - self.free
        if excess <= 0:
            return 0.0
        return min(self.max_delay, self.first_delay * 2 ** (excess - 1))

    def succeeded(self, key):
        with self._lock:
            self._levels.pop(key, None)

    def __len__(self):
        with self._lock:
            self._expire(self.clock())
            return len(self._levels)

    def _expire(self, now):
        """Drop drained keys from the least recently failed end, stopping at the first live one
        (a newer drained key waits for the older ones; ``max_keys`` bounds them meanwhile)."""
        while self._levels:
            key, (level, updated) = next(iter(self._levels.items()))
            if level - (now - updated) * self.leak > 0:
                return
            del self._levels[key]


class Refused(Exception):
    """A new connection is over a limit; ``str()`` is the ``info`` of its INVALID_MESSAGE."""


class Ticket:
    """One admitted connection; ``settle`` when it logs in or authenticates, ``release`` when it
    closes. Both are idempotent, so a close racing a login cannot count twice."""

    __slots__ = ("admission", "address", "pending", "released")

    def __init__(self, admission, address, pending):
        self.admission = admission
        self.address = address
        self.pending = pending
        self.released = False

    def settle(self):
        self.admission._settle(self)

    def release(self):
        self.admission._release(self)


class Admission:
    """Counts open connections and, per source address, those not logged in yet.

    ``admit`` is called by the accept loop and never blocks; a connection past a limit is refused
    before it costs a thread. Links we dial are counted (they hold a descriptor) but never
    refused. Addresses with nothing pending are forgotten, so the table is bounded by
    ``max_connections``."""

    def __init__(self, max_connections, max_pending_per_address=DEFAULT_MAX_PENDING_PER_ADDRESS):
        self.max_connections = max_connections
        self.max_pending_per_address = max_pending_per_address
        self._lock = threading.Lock()  # guards the counts
        self.open = 0
        self._pending = {}  # address -> connections from it not yet logged in

    def admit(self, address, dialled=False):
        """A Ticket for a new connection from ``address`` (a host string); raises Refused."""
        with self._lock:
            if dialled:
                self.open += 1
                return Ticket(self, address, pending=False)
            if self.open >= self.max_connections:
                raise Refused(f"this server is at its limit of {self.max_connections} connections; "
                              "try again later or connect to another server of the network")
            pending = self._pending.get(address, 0)
            if pending >= self.max_pending_per_address:
                raise Refused(f"too many connections from {address} have not logged in yet (limit "
                              f"{self.max_pending_per_address}); log in on those or close them first")
            self.open += 1
            self._pending[address] = pending + 1
            return Ticket(self, address, pending=True)

    def pending(self, address=None):
        """Connections not logged in yet, from ``address`` or from everywhere."""
        with self._lock:
            if address is not None:
                return self._pending.get(address, 0)
            return sum(self._pending.values())

    def _settle(self, ticket):
        with self._lock:
            if ticket.pending and not ticket.released:
                ticket.pending = False
                self._unpend(ticket.address)

    def _release(self, ticket):
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self.open -= 1
            if ticket.pending:
                ticket.pending = False
                self._unpend(ticket.address)

    def _unpend(self, address):
        left = self._pending[address] - 1
        if left:
            self._pending[address] = left
        else:
            del self._pending[address]


class Deadlines:
    """One thread calling ``expire(item)`` for every item whose deadline passed uncancelled.

    For ``--login-timeout``: the accept loop ``add``s each connection with its deadline, a login
    ``cancel``s it, and ``expire`` (run on this thread, so it must not block: queue the
    INVALID_MESSAGE and close) ends the overdue ones. A heap ordered by time plus a dict of the
    live entries: ``cancel`` is O(1) and frees the item at once; the heap's stale entries are
    dropped when they come due, or all at once when they outnumber the live ones."""

    def __init__(self, expire, clock=time.monotonic, name="deadlines"):
        self.expire = expire
        self.clock = clock
        self._cond = threading.Condition()  # guards _heap, _live, _closed
        self._heap = []  # (when, seq, key)
        self._live = {}  # key -> (when, seq, item)
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()

    def add(self, key, when, item):
        """Call ``expire(item)`` at monotonic time ``when`` unless ``key`` is cancelled first."""
        with self._cond:
            seq = next(self._seq)
            self._live[key] = (when, seq, item)
            heapq.heappush(self._heap, (when, seq, key))
            if len(self._heap) > 2 * len(self._live) + 1024:
                self._heap = [(w, s, k) for k, (w, s, _item) in self._live.items()]
                heapq.heapify(self._heap)
            if self._heap[0][1] == seq:  # the new entry is the next one due: wake the thread
                self._cond.notify()

    def cancel(self, key):
        with self._cond:
            self._live.pop(key, None)

    def __len__(self):
        with self._cond:
            return len(self._live)

    def due(self, now):
        """Remove and return the items due at ``now`` (the thread's step; public for tests)."""
        items = []
        with self._cond:
            while self._heap and self._heap[0][0] <= now:
                _when, seq, key = heapq.heappop(self._heap)
                entry = self._live.get(key)
                if entry is not None and entry[1] == seq:  # not cancelled, nor added again since
                    del self._live[key]
                    items.append(entry[2])
        return items

    def close(self):
        """Stop the thread; returns the items still waiting (not expired), for the caller."""
        with self._cond:
            self._closed = True
            items = [item for _when, _seq, item in self._live.values()]
            self._live.clear()
            self._heap.clear()
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        return items

    def _run(self):
        while True:
            with self._cond:
                if self._closed:
                    return
                timeout = self._heap[0][0] - self.clock() if self._heap else None
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)
                    continue
            for item in self.due(self.clock()):
                try:
                    self.expire(item)
                except Exception:  # one bad item must not end every other deadline
                    log.exception("ending %r at its deadline failed", item)


class SlowConsumerRule:
    """Whether a reader with a long outbox is too slow, or only drowned by others' traffic.

    ``--max-outbox`` alone cannot tell a reader that never reads from one that reads 1 MB/s while
    a burst passes through. So past ``limit`` queued bytes the reader is *watched*: over each
    ``window`` seconds the bytes the kernel took from its outbox are counted, and it is cut only
    when it drained less than ``min_rate`` bytes a second over a whole window, or when the outbox
    passes ``hard_factor`` times ``limit`` (memory must stay bounded whatever happens). A reader
    back under ``limit`` is no longer watched. ``judge`` is pure: the watch is a small tuple kept
    on the connection, and the counters it reads (bytes queued, bytes the kernel took since
    start) are ones the outbox keeps anyway. Judging happens when bytes are queued, so a reader
    nobody sends to is never cut (its outbox does not grow). One rule serves every connection;
    each passes its own ``limit`` (servers are trusted with a larger one)."""

    def __init__(self, min_rate=1_000_000, window=5.0, hard_factor=4):
        self.min_rate = min_rate
        self.window = window
        self.hard_factor = hard_factor

    def judge(self, limit, queued, drained, now, watch):
        """Returns ``(reason or None, watch)``: ``reason`` (a sentence for the log) when the
        reader must be cut; ``watch`` to keep on the connection for the next call (None when
        not watched). ``drained`` counts every byte the kernel ever took from this outbox."""
        if queued <= limit:
            return None, None
        hard_limit = limit * self.hard_factor
        if queued > hard_limit:
            return (f"{queued} bytes queued, more than the hard limit of {hard_limit}"), watch
        if watch is None:
            return None, (now, drained)
        since, drained_then = watch
        elapsed = now - since
        if elapsed < self.window:
            return None, watch
        rate = (drained - drained_then) / elapsed
        if rate < self.min_rate:
            return (f"{queued} bytes queued and reading only {rate / 1e6:.2f} MB/s over the last "
                    f"{elapsed:.1f} s (at least {self.min_rate / 1e6:.2f} MB/s keeps a reader on)"), watch
        return None, (now, drained)  # keeping up: judge the next window on its own


class LimitLog:
    """Says whether a limit that bit for ``key`` (an address) should be logged now: the first time,
    then at most once per ``interval``, with how many bites went unlogged in between. Bounded to
    ``max_keys`` keys, oldest forgotten first."""

    def __init__(self, interval=60.0, max_keys=10_000, clock=time.monotonic):
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()  # guards _seen
        self._seen = OrderedDict()  # key -> [last logged at, bites since]

    def bite(self, key):
        """Record one bite; returns None (stay quiet) or the number of quiet bites before it."""
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return None
            quiet = entry[1] if entry is not None else 0
            self._seen.pop(key, None)
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return quiet

