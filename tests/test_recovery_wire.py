"""Issue 14 at the level of two ``State``s and their handlers, with the wire in the test's hands.

Two servers, A (acceptor) and B (initiator), are wired by queues the test delivers from one
message at a time, so it can hold back any message (a delayed TCP segment) and do anything in
between (a login on A). No sockets, no threads, no timing: the exact cases of issue 14 replay the
same way every run.
"""

import random
import time

import pytest

from activitynet import handlers, protocol, recovery
from activitynet.state import State
from test_recovery import FakeOutbox

SECRET = "s"


class Server:
    """A ``State`` plus the context its handlers get."""

    def __init__(self, name, port):
        self.name = name
        self.port = port
        self.state = State("127.0.0.1", port, origin=name * 16)
        self.context = handlers.Context(self.state, SECRET, trust_as_server=lambda session: None)

    def client(self):
        """A logged-in anonymous client session (its outbox records what it receives), or None
        when the login was redirected to the other server (its load was 2 lower)."""
        session = self.state.open_session(FakeOutbox(), f"client-of-{self.name}")
        try:
            handlers.dispatch_message(self.context, session, protocol.login("anonymous"))
        except handlers.Goodbye:
            self.state.close_session(session)
            return None
        session.outbox.take()
        return session

    def say(self, client, n):
        """``client`` sends activity number ``n``."""
        handlers.dispatch_message(self.context, client, protocol.activity_message("anonymous", None, {"n": n}))


class Wire:
    """A server link between B (which dials) and A; what each side sent waits in its outbox."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.at_a = a.state.open_session(FakeOutbox(), "link-at-a")  # A's end: sends to B
        self.at_b = b.state.open_session(FakeOutbox(), "link-at-b")  # B's end: sends to A
        b.state.dial_link(self.at_b, f"127.0.0.1:{a.port}", SECRET)
        self.to_a = []  # sent by B, not yet delivered to A
        self.to_b = []

    def _collect(self):
        self.to_a += self.at_b.outbox.take()
        self.to_b += self.at_a.outbox.take()

    def pending(self, side):
        self._collect()
        return [m["command"] for m in (self.to_a if side == "a" else self.to_b)]

    def deliver_to_a(self, count=None):
        self._deliver(self.to_a, self.a, self.at_a, count)

    def deliver_to_b(self, count=None):
        self._deliver(self.to_b, self.b, self.at_b, count)

    def _deliver(self, queue, server, session, count):
        """Deliver ``count`` messages (all, by default), and whatever they cause, in order."""
        self._collect()
        for _ in range(len(queue) if count is None else count):
            handlers.dispatch_message(server.context, session, queue.pop(0))
            self._collect()

    def settle(self):
        """Deliver both ways until nothing is in flight."""
        while self.pending("a") or self.pending("b"):
            self.deliver_to_a()
            self.deliver_to_b()

    def cut(self):
        self.a.state.close_session(self.at_a)
        self.b.state.close_session(self.at_b)


def numbers(client):
    return [m["activity"]["n"] for m in client.outbox.take("ACTIVITY_BROADCAST")]


def by_sender(got):
    """(B's sender's numbers, A's sender's numbers [100 and up]), each in the order received."""
    return [n for n in got if n < 100], [n for n in got if n >= 100]



@pytest.fixture
def partitioned():
    """A and B were linked, then cut; B's client sent 1..50 during the cut; A's watcher saw 0."""
    a, b = Server("a", 4000), Server("b", 4001)
    watcher, sender = a.client(), b.client()
    wire = Wire(a, b)
    wire.settle()
    b.say(sender, 0)
    wire.settle()
    assert numbers(watcher) == [0]
    wire.cut()
    for n in range(1, 51):
        b.say(sender, n)
    return a, b, watcher, sender


def test_a_load_announce_during_the_opening_costs_no_backlog(partitioned):
    """The issue's wire: B's opening reaches A up to SYNC_USER, a client logs in to A, B's
    SERVER_ANNOUNCE comes later (a delayed segment), B's client keeps sending meanwhile."""
    a, b, watcher, sender = partitioned
    wire = Wire(a, b)
    assert wire.pending("a") == ["AUTHENTICATE", "ACTIVITY_RETRIEVE", "SYNC_USER", "SERVER_ANNOUNCE"]
    wire.deliver_to_a(3)  # up to SYNC_USER; the announce is held back
    a.client()  # A's load changes during the opening
    assert "SERVER_ANNOUNCE" not in wire.pending("b"), "A announced its load before its ACTIVITY_RETRIEVE"
    wire.deliver_to_b()
    for n in range(51, 76):  # new activities while A's half is still to come
        b.say(sender, n)
    assert "ACTIVITY_BROADCAST" not in wire.pending("a"), "B forwarded new activities before A's backlog"
    wire.settle()
    assert numbers(watcher) == list(range(1, 76))
    b.say(sender, 76)
    wire.settle()
    assert numbers(watcher) == [76]


def test_the_mirror_case_a_login_on_the_initiator_during_the_opening(partitioned):
    """B dials while its own load changes: its opening is one step, so nothing comes between
    AUTHENTICATE and its ACTIVITY_RETRIEVE; A's backlog reaches B's clients too."""
    a, b, watcher, sender = partitioned
    a_sender = a.client()
    for n in range(100, 110):  # A's side of the partition
        a.say(a_sender, n)
    wire = Wire(a, b)
    b.client()  # B's load changes right after its opening
    assert wire.pending("a") == ["AUTHENTICATE", "ACTIVITY_RETRIEVE", "SYNC_USER", "SERVER_ANNOUNCE",
                                 "SERVER_ANNOUNCE"]
    wire.deliver_to_a(2)
    wire.deliver_to_b()  # A's SYNC_USER and its answer to B's request
    for n in range(51, 61):
        b.say(sender, n)
    wire.settle()
    assert by_sender(numbers(watcher)) == (list(range(1, 61)), list(range(100, 110)))
    assert by_sender(numbers(sender)) == (list(range(0, 61)), list(range(100, 110)))


@pytest.mark.parametrize("seed", range(40))
def test_any_delivery_order_of_the_opening_loses_nothing(partitioned, seed):
    """Random interleavings of deliveries, logins, logouts, the recovery clock and new
    activities on both sides during the opening: every activity reaches the clients of the
    other side once, in its sender's order."""
    rng = random.Random(seed)
    a, b, watcher, sender = partitioned
    a_sender = a.client()
    wire = Wire(a, b)
    extra = []
    sent_b, sent_a = list(range(1, 51)), []
    for step in range(80):
        action = rng.choice(["to_a", "to_b", "login_a", "login_b", "logout", "say_b", "say_a", "clock"])
        if action == "to_a" and wire.pending("a"):
            wire.deliver_to_a(1)
        elif action == "to_b" and wire.pending("b"):
            wire.deliver_to_b(1)
        elif action in ("login_a", "login_b"):
            client = (a if action == "login_a" else b).client()
            if client is not None:
                extra.append(client)
        elif action == "logout" and extra:
            gone = extra.pop(rng.randrange(len(extra)))
            (a if gone.address.endswith("-of-a") else b).state.close_session(gone)
        elif action == "say_b":
            sent_b.append(100 + step)
            b.say(sender, sent_b[-1])
        elif action == "say_a":
            sent_a.append(1000 + step)
            a.say(a_sender, sent_a[-1])
        elif action == "clock":  # LIVE_AFTER passed on one side
            side = rng.choice([a, b])
            side.state.tick(time.monotonic() + recovery.LIVE_AFTER, silence=3600)
    wire.settle()
    got = numbers(watcher)
    assert [n for n in got if n < 1000] == sent_b
    assert [n for n in got if n >= 1000] == sent_a
    got = numbers(sender)
    assert [n for n in got if n < 1000] == [0, *sent_b]
    assert [n for n in got if n >= 1000] == sent_a
