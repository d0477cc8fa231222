"""A mixed network heals: our server linked with a server of the seed authors' Java implementation
(issue 13 item 4, PROTOCOL.md section 5), played by ``javapeer.JavaPeer``.

That implementation cannot de-duplicate, and as the acceptor of a link it never asks for what it
missed: the side that dialled must push it exactly what it lacks. So after a cut and a heal,
with nothing in flight at the cut, every client on either side must get every activity of the
other side exactly once, in order, whichever side dialled.

The first tests pin down the fake itself, on raw sockets, so a reader can see what the other
implementation sends; then both directions of a real link, cut and healed through a
``netcut.Relay``.
"""

import socket
import time
from collections import Counter

import pytest

from activitynet.testing.netcut import UP, Latency

from harness import SECRET, LineClient, wait_until
from javapeer import JavaPeer, java_id
from recorder import log_in_here, sequences

LONG = 60.0
@pytest.fixture
def java():
    """A fake Java server, closed after the test."""
    peer = JavaPeer()
    yield peer
    peer.close()


def join(recorders, port, name):
    recorder = log_in_here(port, name)
    recorders.append(recorder)
    return recorder


# --- the fake, as the other implementation behaves -----------------------------------------------

def test_java_acceptor_answers_authenticate_without_asking_for_history(java):
    """As acceptor: SERVER_ANNOUNCE (SYNC_USER only once it has users), never ACTIVITY_RETRIEVE;
    our ACTIVITY_RETRIEVE is answered with one BUNDLE, its numbers as floats."""
    java.send_activity({"n": 1})
    java.send_activity({"n": 2, "nested": [3, {"x": 4}]})
    us = LineClient(java.port)
    us.send({"command": "AUTHENTICATE", "secret": SECRET})
    announce = us.expect("SERVER_ANNOUNCE", port=java.port)
    us.send({"command": "ACTIVITY_RETRIEVE", "after": "", "marks": {"ours": 3}})  # marks are ignored
    bundle = us.expect("BUNDLE")
    assert [m["activity"] for m in bundle["messages"]] == [
        {"n": 1.0, "authenticated_user": "anonymous"},
        {"n": 2.0, "nested": [3.0, {"x": 4.0}], "authenticated_user": "anonymous"}]
    assert all(isinstance(m["activity"]["n"], float) for m in bundle["messages"])
    us.send({"command": "NEW_USER", "username": "u", "secret": "s"})
    wait_until(lambda: "u" in java.users, message="the fake to store the new user")  # its own thread
    second = LineClient(java.port)
    second.send({"command": "AUTHENTICATE", "secret": SECRET})
    assert second.expect("SYNC_USER")["users"] == {"u": "s"}  # now it has a user
    second.expect("SERVER_ANNOUNCE", hostname=announce["hostname"])
    assert us.recv_line(timeout=2.5) == b"h", "a heartbeat about every second"
    for client in (us, second):
        client.close()


def test_java_dialler_opens_with_one_bundle_and_pushes_what_it_holds_after_its_last_id(java, make_relay):
    """As dialler: one BUNDLE; after a break, it asks after the last id it had and pushes what
    its clients sent since. It closes the link on a command it does not know."""
    listener = socket.create_server(("127.0.0.1", 0))
    relay = make_relay(listener.getsockname()[1])
    java.dial(relay.port)
    first = LineClient.accepted(listener)
    bundle = first.expect("BUNDLE")
    assert [m["command"] for m in bundle["messages"]] == [
        "AUTHENTICATE", "ACTIVITY_RETRIEVE", "SYNC_USER", "SERVER_ANNOUNCE"]
    assert bundle["messages"][1]["after"] == ""  # it holds nothing yet: everything
    first.send({"command": "SYNC_USER", "users": {}})  # a word from us: a working link
    wait_until(lambda: java.live_links() == 1, message="the link to work")
    had = java.send_activity({"n": 1})
    assert first.expect("ACTIVITY_BROADCAST")["id"] == had  # live at once, no "go live" step

    relay.cut()  # the link breaks; its redials are reset before a word, which moves nothing
    wait_until(lambda: java.live_links() == 0, message="the break to be noticed")
    missed = [java.send_activity({"n": n}) for n in (2, 3)]
    relay.heal()
    second = LineClient.accepted(listener)
    messages = second.expect("BUNDLE")["messages"]
    assert messages[1] == {"command": "ACTIVITY_RETRIEVE", "after": had}
    assert [m["command"] for m in messages[4:]] == ["ACTIVITY_BROADCAST"] * 2
    assert [m["id"] for m in messages[4:]] == missed
    second.send({"command": "LOCK_REQUEST", "username": "x", "secret": "y"})  # unknown to it
    assert second.recv() is None, "it closes the link on a command it does not know"
    assert java.unknown == ["LOCK_REQUEST"]
    for client in (first, second):
        client.close()
    listener.close()


def test_java_ids_are_random_base32():
    ids = {java_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(set(i) <= set("0123456789abcdefghijklmnopqrstuv") and 20 <= len(i) <= 26 for i in ids)


# --- a mixed link, cut and healed ---------------------------------------------------------------

def send_both(java, ours, tag, count, start):
    """Each side's client sends ``count`` numbered activities; returns the seqs."""
    seqs = list(range(start, start + count))
    for seq in seqs:
        java.send_activity({"sender": "java", "seq": seq, "phase": tag})
        assert ours.send_activity({"sender": "ours", "seq": seq, "phase": tag})
    return seqs


def wait_delivered(java, ours, expected):
    """Wait until the Java side's clients and ours hold every activity of ``expected``
    ({sender: [seq]}): both sides' own and the other's."""
    def has(got):
        return all(set(seqs) <= set(got.get(sender, ())) for sender, seqs in expected.items())
    wait_until(lambda: has(sequences(java.received())), LONG,
               message=f"the Java side's clients to get {expected}")
    ours.wait(lambda r: has(sequences(r.bodies())), LONG, f"our client to get {expected}")


def wait_own(java, ours, expected):
    """Wait until each side's clients hold their own side's activities (while cut)."""
    wait_until(lambda: set(expected["java"]) <= set(sequences(java.received()).get("java", ())), LONG,
               message="the Java side's own activities")
    ours.wait(lambda r: set(expected["ours"]) <= set(sequences(r.bodies()).get("ours", ())), LONG,
              "our own activities")


def exactly_once_failures(java, ours, expected):
    """What is wrong with what each side's clients got ({sender: [seq]} each, exactly, in
    order; the Java side's seqs come back as floats, which compare equal)."""
    failures = []
    for who, got in (("the Java side's clients", sequences(java.received())), ("our client", sequences(ours.bodies()))):
        for sender, seqs in expected.items():
            mine = got.get(sender, [])
            if mine != seqs:
                counts = Counter(mine)
                lost = [s for s in seqs if s not in counts]
                twice = sorted(s for s, n in counts.items() if n > 1)
                failures.append(f"{who} got {len(mine)} of {sender}'s {len(seqs)} activities: "
                                f"lost {len(lost)} {lost[:8]}, twice {len(twice)} {twice[:8]}"
                                f"{'' if lost or twice else ', out of order'}")
    ids = [m["id"] for m in ours.broadcasts()]
    if len(ids) != len(set(ids)):
        failures.append("our client received an id twice")
    if java.unknown:
        failures.append(f"the Java side closed links on unknown commands {java.unknown}")
    return failures


def cut_and_heal(java, ours, ours_server, relay):
    """Both sides exchange activities before the cut (nothing in flight when it comes), 20 each
    while cut, one each after the heal; returns what each side's clients must hold. Before the
    cut one side sends after the other has been heard everywhere, so both histories hold them in
    the same order (the other order is the test after this one's)."""
    for seq in range(3):
        java.send_activity({"sender": "java", "seq": seq, "phase": "before"})
    wait_delivered(java, ours, {"java": [0, 1, 2]})
    for seq in range(3):
        assert ours.send_activity({"sender": "ours", "seq": seq, "phase": "before"})
    wait_delivered(java, ours, {"java": [0, 1, 2], "ours": [0, 1, 2]})

    relay.cut()
    wait_until(lambda: java.live_links() == 0 and not ours_server.links(), LONG,
               message="both sides to notice the cut")
    during = send_both(java, ours, "during", 20, 3)
    wait_own(java, ours, {"java": during, "ours": during})
    relay.heal()
    wait_until(lambda: java.live_links() == 1 and ours_server.live_links() == 1, LONG,
               message="the link to come back")
    send_both(java, ours, "after", 1, 23)  # live: they come after whatever is recovered
    wait_until(lambda: 23 in sequences(java.received()).get("ours", ()), LONG,
               message="our activity sent after the heal to reach the Java side")
    ours.wait(lambda r: 23 in sequences(r.bodies()).get("java", ()), LONG, "the Java side's activity after the heal")
    wait_own(java, ours, {"java": [23], "ours": [23]})  # each side's echo of its own last one too
    return {sender: list(range(24)) for sender in ("java", "ours")}


def assert_heal_exactly_once(java, ours_server, relay, recorders):
    """With the link between ``java`` and ``ours_server`` through ``relay`` coming up: cut it,
    heal it, and every activity reaches every client exactly once, in order."""
    ours = join(recorders, ours_server.port, "ours")
    wait_until(lambda: java.live_links() == 1 and ours_server.live_links() == 1, LONG,
               message="the link to come up")
    expected = cut_and_heal(java, ours, ours_server, relay)
    failures = exactly_once_failures(java, ours, expected)
    assert not failures, "; ".join(failures)


def test_our_dialler_and_a_java_acceptor_heal_exactly_once(java, make_server, make_relay, recorders):
    """We dial the Java server; it never asks for what it missed: we must push it."""
    relay = make_relay(java.port)
    ours_server = make_server(remote=relay)
    assert_heal_exactly_once(java, ours_server, relay, recorders)


def test_a_java_dialler_and_our_acceptor_heal_exactly_once(java, make_server, make_relay, recorders):
    """The Java server dials us: its one BUNDLE pushes its missed activities and asks for ours."""
    ours_server = make_server()
    relay = make_relay(ours_server.port)
    java.dial(relay.port)
    assert_heal_exactly_once(java, ours_server, relay, recorders)


def test_a_quiet_mixed_link_stays_up_on_heartbeats(java, make_server):
    """Both sides send ``h`` about every second and close a link silent for about 3 s: an idle
    mixed link must stay up well past that."""
    ours_server = make_server(remote=java)
    wait_until(lambda: java.live_links() == 1 and ours_server.live_links() == 1, LONG,
               message="the link to come up")
    time.sleep(5.0)  # idle on purpose: longer than either side's silence limit
    assert java.live_links() == 1 and ours_server.live_links() == 1
    assert java.closed == [] and java.unknown == []


def test_a_java_dialler_whose_history_is_in_another_order_gets_nothing_twice(java, make_server, make_relay,
                                                                             recorders):
    """Histories need not be in the same order on both sides: the Java side sends J0 over a slow
    path (0.3 s) and our client sends O0 meanwhile, so the Java side holds J0, O0 and we hold
    O0, J0. Nothing is in flight at the cut. The Java side then asks after O0 (the last id it
    had), and what follows O0 in our history is J0, its own: sending it back would reach its
    clients twice. It must get our activities of the cut, and nothing it already has."""
    ours_server = make_server()
    relay = make_relay(ours_server.port)
    relay.shape(UP, Latency(0.3))  # the Java side's bytes to us, on the first link
    java.dial(relay.port)
    ours = join(recorders, ours_server.port, "ours")
    wait_until(lambda: java.live_links() == 1 and ours_server.live_links() == 1, LONG,
               message="the link to come up")
    java.send_activity({"sender": "java", "seq": 0})
    assert ours.send_activity({"sender": "ours", "seq": 0})
    expected = {"java": [0], "ours": [0]}
    wait_delivered(java, ours, expected)
    assert [a["sender"] for a in java.received()] == ["java", "ours"]
    assert [b["sender"] for b in ours.bodies()] == ["ours", "java"], "the histories differ in order"
    relay.shape(UP, None)

    relay.cut()
    wait_until(lambda: java.live_links() == 0 and not ours_server.links(), LONG,
               message="both sides to notice the cut")
    assert ours.send_activity({"sender": "ours", "seq": 1})
    java.send_activity({"sender": "java", "seq": 1})
    wait_own(java, ours, {"java": [1], "ours": [1]})
    relay.heal()
    wait_until(lambda: java.live_links() == 1 and ours_server.live_links() == 1, LONG,
               message="the link to come back")
    java.send_activity({"sender": "java", "seq": 2})
    assert ours.send_activity({"sender": "ours", "seq": 2})
    expected = {"java": [0, 1, 2], "ours": [0, 1, 2]}
    wait_delivered(java, ours, expected)
    failures = exactly_once_failures(java, ours, expected)
    assert not failures, "; ".join(failures)
