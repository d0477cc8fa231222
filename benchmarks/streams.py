"""The measuring instrument: numbered activities out, and a lean receiver that checks them.

Every scenario sends one stream of activities ``{"n": 0, 1, 2, ..., "t": send time, "p": padding}``
(about 100 bytes each) from one client. Each receiving client gets a ``Tally`` that checks the
stream arrived complete, once and in order, and when; ``Receiver`` is one thread that reads the
sockets of any number of logged-in clients with epoll and feeds their tallies.

Why not the client library's ``recv()`` for receiving: at these rates the benchmark process shares
the machine's two cores with the servers it measures, and decoding every line into a dict costs
more than the servers' own work per delivery (see BENCHMARKS.rst). The tally instead finds the
sequence numbers of a whole ``recv`` at once with one regular expression, compares them with the
ones expected next in one step, and falls back to full JSON parsing of each line whenever a chunk
holds anything else, so nothing goes unchecked. For the same reason ``activity_lines`` writes a
batch of the stream's ACTIVITY_MESSAGE lines from a template, not a dict and an encoder call each.
"""

import json
import math
import re
import selectors
import socket
import threading
import time

from activitynet import protocol

PAD = "x" * 60  # makes an activity about 100 bytes of JSON
_SEQ = re.compile(rb'"n":\s*(\d+)')
_TIME = re.compile(rb'"t":\s*([0-9.eE+-]+)')
_BROADCAST = b'"command":"ACTIVITY_BROADCAST"'  # as our servers encode it; anything else: _slow


_NUMBERS = []  # b"0", b"1", ...: the stream's numbers as they are written, made before it starts


def _number_up_to(count):
    """Make ``_NUMBERS`` hold at least ``count`` numbers (one list, shared by every tally)."""
    if len(_NUMBERS) < count:
        _NUMBERS.extend([b"%d" % n for n in range(len(_NUMBERS), count)])


def activity(n, now=None):
    return {"n": n, "t": round(time.perf_counter() if now is None else now, 6), "p": PAD}


class ActivityLines:
    """The ACTIVITY_MESSAGE lines a client (``username``, ``secret``) sends for ``activity(n,
    now)``, n from ``start`` to ``stop`` - 1: the same JSON as the client library's
    ``send_activities``, a template filled per line (a sixth of the encoding cost)."""

    def __init__(self, username, secret=None):
        head = protocol.activity_message(username, secret, None)
        del head["activity"]
        body = protocol.encode({"n": 0, "t": 0.5, "p": PAD})[:-1]  # {"n":0,"t":0.5,"p":"xx..."}
        prefix, rest = body.split(b"0", 1)
        middle, suffix = rest.split(b"0.5", 1)
        start = protocol.encode(head)[:-2] + b',"activity":' + prefix
        self.template = (start.replace(b"%", b"%%") + b"%d" + middle + b"%s"
                         + suffix.replace(b"%", b"%%") + b"}\n")

    def __call__(self, start, stop, now):
        stamp = protocol.encode(round(now, 6))[:-1]
        template = self.template
        return b"".join([template % (n, stamp) for n in range(start, stop)])


class Tally:
    """One client's view of the stream: what arrived, how often, in which order, and when.

    ``perf_counter`` is CLOCK_MONOTONIC on Linux, so send times stamped by the sender and receive
    times taken here are on one clock."""

    __slots__ = ("name", "expected", "received", "highest", "duplicates", "out_of_order",
                 "unexpected", "unexpected_lines", "seen", "first_at", "done_at", "bytes",
                 "latencies", "sample_latency", "pending", "closed")

    def __init__(self, name, expected, latencies=False, sample_latency=False):
        self.name = name
        self.expected = expected  # the stream is n = 0 .. expected-1
        self.received = 0  # distinct activities of the stream
        self.highest = -1
        self.duplicates = 0
        self.out_of_order = 0  # arrived after a higher n
        self.unexpected = 0  # lines that are not one of our activity broadcasts
        self.unexpected_lines = []
        self.seen = None  # bytearray, made once anything arrives out of line
        self.first_at = None
        self.done_at = None
        self.bytes = 0
        self.latencies = [] if latencies or sample_latency else None
        self.sample_latency = sample_latency and not latencies  # one figure per recv, not per line
        self.pending = b""
        self.closed = False
        _number_up_to(expected)

    @property
    def done(self):
        return self.received >= self.expected

    @property
    def lost(self):
        return max(0, self.expected - self.received)

    @property
    def extra(self):
        """Activities of the stream beyond what was sent: should never happen."""
        return max(0, self.received - self.expected)

    @property
    def errors(self):
        return self.lost + self.extra + self.duplicates + self.out_of_order + self.unexpected

    def expect(self, count):
        """The stream is now ``count`` long (it is sent in phases)."""
        self.expected = count
        _number_up_to(count)
        self.done_at = None
        if self.received >= count:
            self.done_at = time.perf_counter()

    def feed(self, data, now):
        self.bytes += len(data)
        if self.pending:
            data = self.pending + data
        end = data.rfind(b"\n")
        if end < 0:
            self.pending = data
            return
        body = data if end == len(data) - 1 else data[:end + 1]
        self.pending = data[end + 1:]
        if self.first_at is None:
            self.first_at = now
        seqs = _SEQ.findall(body)
        lines = body.count(b"\n")
        if len(seqs) != lines or body.count(_BROADCAST) != lines:
            self._slow(body, now)
        else:
            first = self.highest + 1
            if self.seen is None and seqs == _NUMBERS[first:first + len(seqs)]:  # the next ones
                self.highest += len(seqs)
                self.received += len(seqs)
            else:
                for n in map(int, seqs):
                    self._one(n)
            if self.latencies is not None:
                if self.sample_latency:
                    stamp = _TIME.search(body, body.rfind(b"\n", 0, len(body) - 1) + 1)
                    if stamp:
                        self.latencies.append(now - float(stamp.group(1)))
                else:
                    self.latencies.extend(now - float(t) for t in _TIME.findall(body))
        if self.done_at is None and self.received >= self.expected:
            self.done_at = now

    def _slow(self, body, now):
        """Line by line, fully parsed: for chunks holding anything but our broadcasts."""
        for line in body.split(b"\n")[:-1]:
            line = line.rstrip(b"\r")
            if not line:
                continue
            try:
                message = json.loads(line)
                n = message["activity"]["n"] if message.get("command") == "ACTIVITY_BROADCAST" else None
            except (ValueError, TypeError, KeyError, AttributeError):
                n = None
            if not isinstance(n, int):
                self.unexpected += 1
                if len(self.unexpected_lines) < 5:
                    self.unexpected_lines.append(line[:300].decode(errors="replace"))
                continue
            self._one(n)
            if self.latencies is not None:
                stamp = message["activity"].get("t")
                if isinstance(stamp, (int, float)):
                    self.latencies.append(now - stamp)

    def _one(self, n):
        if self.seen is None:
            self.seen = bytearray(max(self.expected, n + 1, self.highest + 1))
            self.seen[:self.highest + 1] = b"\x01" * (self.highest + 1)
        if n >= len(self.seen):
            self.seen.extend(bytes(n + 1 - len(self.seen)))
        if self.seen[n]:
            self.duplicates += 1
            return
        self.seen[n] = 1
        self.received += 1
        if n < self.highest:
            self.out_of_order += 1
        else:
            self.highest = n

    def summary(self):
        return {"client": self.name, "expected": self.expected, "received": self.received,
                "lost": self.lost, "extra": self.extra, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order,
                "unexpected": self.unexpected, "unexpected_lines": self.unexpected_lines}


_STREAM_SEQ = re.compile(rb'"s":(\d+),"n":(\d+)')


class MultiTally:
    """One client's view of several senders' streams at once: activities ``{"s": sender,
    "n": 0, 1, ...}``; each sender's stream must arrive complete, once and in order (streams may
    interleave). The same interface as ``Tally`` for ``Receiver`` and the checks."""

    def __init__(self, name, senders, per_sender):
        self.name = name
        self.senders = senders
        self.per_sender = per_sender
        self.expected = senders * per_sender
        self.highest = [-1] * senders
        self.counts = [0] * senders
        self.received = 0
        self.duplicates = self.out_of_order = self.unexpected = self.extra = 0
        self.unexpected_lines = []
        self.done_at = None
        self.bytes = 0
        self.pending = b""
        self.closed = False
        self.latencies = None

    @property
    def done(self):
        return self.received >= self.expected

    @property
    def lost(self):
        return sum(max(0, self.per_sender - c) for c in self.counts)

    @property
    def errors(self):
        return self.lost + self.extra + self.duplicates + self.out_of_order + self.unexpected

    def received_of(self, sender):
        return self.counts[sender]

    def feed(self, data, now):
        self.bytes += len(data)
        data = self.pending + data if self.pending else data
        end = data.rfind(b"\n") + 1
        body, self.pending = data[:end], data[end:]
        pairs = _STREAM_SEQ.findall(body)
        if len(pairs) != body.count(b"\n"):
            for line in body.split(b"\n")[:-1]:
                if not _STREAM_SEQ.search(line) and len(self.unexpected_lines) < 5:
                    self.unexpected_lines.append(line[:300].decode(errors="replace"))
            self.unexpected += body.count(b"\n") - len(pairs)
        highest, counts = self.highest, self.counts
        for s, n in pairs:
            s, n = int(s), int(n)
            if s >= self.senders or n >= self.per_sender:
                self.extra += 1
            elif n == highest[s] + 1:
                highest[s] = n
                counts[s] += 1
                self.received += 1
            elif n <= highest[s]:
                self.duplicates += 1  # in order per sender: anything at or below is a repeat
            else:
                self.out_of_order += 1  # a gap: something before it is missing or late
                highest[s] = n
                counts[s] += 1
                self.received += 1
        if self.done_at is None and self.received >= self.expected:
            self.done_at = now

    def summary(self):
        return {"client": self.name, "expected": self.expected, "received": self.received,
                "lost": self.lost, "extra": self.extra, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "unexpected": self.unexpected,
                "unexpected_lines": self.unexpected_lines}


class Receiver:
    """One thread reading many client sockets (epoll) into their tallies until stopped."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # guards tallies (the list) and _new
        self.tallies = []
        self._new = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receiver", daemon=True)
        self.error = None

    def add(self, sock, tally, buffered=b""):
        """Read ``sock`` into ``tally`` from now on; ``buffered`` is what was read already."""
        if buffered:
            tally.feed(buffered, time.perf_counter())
        with self._lock:
            self.tallies.append(tally)
            self._new.append((sock, tally))
        return tally

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._selector.close()
        if self.error is not None:
            raise self.error

    def received(self, tallies=None):
        return sum(t.received for t in (tallies or self.tallies))

    def wait(self, tallies, timeout, progress=None, label="received", at_least=None):
        """Wait until every tally is done (or has ``at_least`` activities), the time is up, or the
        receiver failed; True if done."""
        deadline = time.monotonic() + timeout
        total = sum(t.expected if at_least is None else at_least for t in tallies)
        while True:
            if all(t.done if at_least is None else t.received >= at_least for t in tallies):
                return True
            if self.error is not None or time.monotonic() > deadline or not self._thread.is_alive():
                return False
            if progress is not None:
                progress.update(f"{label} {sum(t.received for t in tallies):,} of {total:,}")
            time.sleep(0.005)

    def _run(self):
        recv_size = 1 << 20
        flags = socket.MSG_DONTWAIT
        perf_counter = time.perf_counter
        try:
            while not self._stop.is_set():
                if self._new:
                    with self._lock:
                        new, self._new = self._new, []
                    for sock, tally in new:
                        self._selector.register(sock, selectors.EVENT_READ, tally)
                for key, _mask in self._selector.select(0.05):
                    tally = key.data
                    try:
                        data = key.fileobj.recv(recv_size, flags)
                    except (BlockingIOError, InterruptedError, TimeoutError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        tally.closed = True
                        self._selector.unregister(key.fileobj)
                        continue
                    tally.feed(data, perf_counter())
        except BaseException as exc:  # reported by stop(); the scenario fails, loudly
            self.error = exc


def percentile(values, fraction):
    """The nearest-rank percentile of ``values`` (unsorted is fine), or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


def totals(tallies):
    """Totals of what went wrong over some tallies, by kind."""
    return {
        "lost": sum(t.lost for t in tallies),
        "extra": sum(t.extra for t in tallies),
        "duplicates": sum(t.duplicates for t in tallies),
        "out_of_order": sum(t.out_of_order for t in tallies),
        "unexpected": sum(t.unexpected for t in tallies),
    }
