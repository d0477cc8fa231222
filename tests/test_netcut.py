"""The test relay itself (``netcut.Relay``): cut, black hole, heal, and split-and-delay shaping.

The recovery and chaos tests trust the relay to do exactly what it says, so it is checked here on
plain sockets: a target that records what arrives and when, and a dialler that writes to it.
"""

import socket
import threading
import time

import pytest

from activitynet.testing.netcut import DOWN, UP, HoldAfterLines, Latency, RandomSegments, Relay

from harness import TIMEOUT, wait_until


class Sink:
    """A target that accepts connections and records (monotonic time, bytes) per connection."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []  # accepted sockets, to answer on
        self.received = []  # per connection: [(time, bytes)]
        self.closed = []  # per connection: EOF or reset seen
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.conns)
                self.conns.append(sock)
                self.received.append([])
                self.closed.append(False)
            threading.Thread(target=self._read, args=(sock, index), daemon=True).start()

    def _read(self, sock, index):
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.closed[index] = True
                return
            with self._lock:
                self.received[index].append((time.monotonic(), data))

    def data(self, index=0):
        """What connection ``index`` received so far (b"" before it was accepted)."""
        return b"".join(chunk for _t, chunk in self.arrivals(index))

    def arrivals(self, index=0):
        with self._lock:
            return list(self.received[index]) if index < len(self.received) else []

    def close(self):
        self.listener.close()
        for sock in self.conns:
            sock.close()


@pytest.fixture
def sink():
    target = Sink()
    yield target
    target.close()


@pytest.fixture
def relay(sink):
    with Relay(sink.port, record=True) as made:
        yield made


def dial(relay):
    return socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)


def read_until(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_bytes_pass_both_ways(sink, relay):
    client = dial(relay)
    client.sendall(b"hello\n")
    wait_until(lambda: sink.data() == b"hello\n", message="the bytes upstream")
    sink.conns[0].sendall(b"world\n")
    assert read_until(client, 6) == b"world\n"
    assert [(d, line) for _t, _n, d, line in relay.lines()] == [(UP, b"hello"), (DOWN, b"world")]
    client.close()


def test_cut_resets_and_refuses_until_heal(sink, relay):
    client = dial(relay)
    client.sendall(b"x")
    wait_until(lambda: sink.data() == b"x", message="the link to work")
    relay.cut()
    with pytest.raises(OSError):  # reset: reading gives ECONNRESET (or EOF on some stacks)
        if client.recv(1) == b"":
            raise ConnectionResetError
    wait_until(lambda: sink.closed and sink.closed[0], message="the target to see the cut")
    with pytest.raises(OSError):  # accepted by the kernel, then reset by the relay (maybe
        refused = dial(relay)     # before connect() even returned)
        if refused.recv(1) == b"":
            raise ConnectionResetError
    relay.heal()
    healed = dial(relay)
    healed.sendall(b"again")
    wait_until(lambda: len(sink.conns) == 2 and sink.data(1) == b"again", message="a new connection after heal")


def test_blackhole_drops_bytes_silently_and_heal_resets(sink, relay):
    client = dial(relay)
    client.sendall(b"a")
    wait_until(lambda: sink.data() == b"a", message="the link to work")
    relay.blackhole()
    client.sendall(b"lost")
    sink.conns[0].sendall(b"lost too")
    client.settimeout(0.5)
    with pytest.raises(socket.timeout):
        client.recv(1)
    assert sink.data() == b"a" and not sink.closed[0]
    relay.heal()
    wait_until(lambda: sink.closed[0], message="the black-holed connection to be reset")


def test_hold_after_lines_delivers_the_first_lines_now_and_the_rest_later(sink, relay):
    hold = relay.shape(UP, HoldAfterLines(2, 1.0))
    client = dial(relay)
    sent_at = time.monotonic()
    # heartbeats do not count as lines; the split falls inside this one write
    client.sendall(b"h\none\nh\ntwo\nthree\nfour")
    assert hold.held.wait(TIMEOUT)
    wait_until(lambda: sink.data() == b"h\none\nh\ntwo\n", message="the first two lines")
    (began, until), = hold.holds
    assert time.monotonic() < until, "the first part arrived while the rest was held"
    client.sendall(b"\nfive\n")  # after the split: held behind the rest, never before it
    wait_until(lambda: sink.data() == b"h\none\nh\ntwo\nthree\nfour\nfive\n", message="the rest")
    arrivals = sink.arrivals()
    assert arrivals[0][0] < until
    late = [t for t, chunk in arrivals if b"three" in chunk or b"five" in chunk]
    assert min(late) >= until and min(late) - sent_at >= 1.0
    # a second connection is shaped the same way (the policy applies to every new connection)
    second = dial(relay)
    second.sendall(b"1\n2\n3\n")
    wait_until(lambda: len(hold.holds) == 2, message="the second connection's hold")
    relay.shape(UP, None)
    third = dial(relay)
    third.sendall(b"1\n2\n3\n")
    wait_until(lambda: len(sink.conns) == 3 and sink.data(2) == b"1\n2\n3\n", message="an unshaped connection")
    assert len(hold.holds) == 2
    for sock in (client, second, third):
        sock.close()


def test_hold_counts_lines_split_over_several_reads(sink, relay):
    hold = relay.shape(DOWN, HoldAfterLines(1, 0.5))
    client = dial(relay)
    wait_until(lambda: sink.conns, message="the connection")
    target = sink.conns[0]
    target.sendall(b"AUTHEN")
    assert read_until(client, 6) == b"AUTHEN"  # no newline yet: passes at once
    target.sendall(b"TICATE\nSYNC_USER\n")
    assert read_until(client, 7) == b"TICATE\n"
    assert hold.held.is_set()
    assert read_until(client, 10) == b"SYNC_USER\n"
    (began, until), = hold.holds
    assert time.monotonic() >= until
    client.close()


def test_random_segments_keep_every_byte_in_order_and_bound_the_delay(sink, relay):
    policy = relay.shape(UP, RandomSegments("unit", max_delay=0.2, chance=1.0))
    client = dial(relay)
    payload = b"".join(b"line %d\n" % n for n in range(2000))
    sends = []
    for offset in range(0, len(payload), 997):
        sends.append((time.monotonic(), offset))
        client.sendall(payload[offset:offset + 997])
        time.sleep(0.001)  # separate reads, so there is something to split
    wait_until(lambda: sink.data() == payload, message="every byte, in order")
    assert policy.delayed > 0
    assert len(sink.arrivals()) > 1
    # nothing was held much longer than max_delay after it was sent (slack for a busy machine)
    last_arrival = sink.arrivals()[-1][0]
    assert last_arrival - sends[-1][0] < 0.2 + 2.0
    client.close()


def test_random_segments_window_shapes_only_the_opening(sink, relay):
    policy = relay.shape(UP, RandomSegments("window", max_delay=0.3, window=0.5, chance=1.0))
    client = dial(relay)
    client.sendall(b"opening\n")
    wait_until(lambda: sink.data() == b"opening\n", message="the opening")
    delayed = policy.delayed
    time.sleep(0.6)  # past the window: the point of this test, not a race
    client.sendall(b"later\n" * 50)
    wait_until(lambda: sink.data() == b"opening\n" + b"later\n" * 50, message="the later bytes")
    assert policy.delayed == delayed
    client.close()


def test_held_bytes_still_go_out_before_the_close(sink, relay):
    relay.shape(UP, HoldAfterLines(1, 0.3))
    client = dial(relay)
    client.sendall(b"first\nsecond\n")
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: sink.closed and sink.closed[0], message="the close")
    assert sink.data() == b"first\nsecond\n"
    client.close()


def test_stall_holds_what_the_target_sends_first(sink, relay):
    relay.stall(0.5)
    client = dial(relay)
    accepted = time.monotonic()
    wait_until(lambda: sink.conns, message="the connection")
    sink.conns[0].sendall(b"late\n")
    assert read_until(client, 5) == b"late\n"
    assert time.monotonic() - accepted >= 0.45
    relay.stall(0)
    client.close()


def test_latency_delays_every_byte_in_order(sink, relay):
    relay.shape(UP, Latency(0.3))
    client = dial(relay)
    sent = time.monotonic()
    client.sendall(b"one\n")
    client.sendall(b"two\n")
    wait_until(lambda: sink.data() == b"one\ntwo\n", message="both lines")
    assert sink.arrivals()[0][0] - sent >= 0.3
    client.close()
