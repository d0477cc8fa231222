"""Late joins, crashes, partitions and frozen peers, with real server processes (issue 3).

Links are cut and healed for real through ``netcut.Relay``: the server that dials joins *through*
the relay, so after a heal its own dialler finds the way back and the recovery routine runs on
the new link. Processes are killed with SIGKILL and frozen with SIGSTOP. Every check waits on a
condition; after the wait, what each client received is checked exactly: every activity once,
in each sender's order, nothing else.

The last part unit-tests the pure pieces of recovery and the merge rules on a ``State`` whose
sessions have fake outboxes (no sockets).
"""

import json
import random
import threading
import time

import pytest

from activitynet import protocol, recovery
from activitynet.history import History
from activitynet.state import State
from harness import LineClient, wait_until
from recorder import log_in_here, sequences, try_login, try_register

LONG = 60.0  # generous: recovery on a slow, busy 2-core machine
# The relay in these tests is the one cable between two halves. On 127.0.0.1 every server can
# also reach every other directly, where a real partition would leave no other way, so the servers
# are told to wait for their cable (a lost parent is redialled, and a lone root waits, an hour)
# instead of re-attaching around the cut; test_self_healing.py shows that healing.
CABLE = ["--grace", "3600"]
SILENCE_DETECTED = 8.0  # heartbeat silence (3 s) + one heartbeat period + scheduling slack


def join(recorders, port, name, **kwargs):
    recorder = log_in_here(port, name, **kwargs)
    recorders.append(recorder)
    return recorder


def send_numbered(recorder, seqs, sender=None):
    for seq in seqs:
        assert recorder.send_activity({"sender": sender or recorder.name, "seq": seq}), \
            f"{recorder.name} lost its connection"


def has_all(expected):
    """Predicate: a recorder received every (sender, seq) of ``expected`` {sender: [seq, ...]}."""
    def check(recorder):
        got = sequences(recorder.bodies())
        return all(set(seqs) <= set(got.get(sender, ())) for sender, seqs in expected.items())
    return check


def assert_exactly(recorder, expected):
    """``recorder`` received exactly ``expected`` {sender: [seq, ...]}: every activity once, in
    each sender's order, nothing else numbered, and no id twice."""
    assert not recorder.errors, recorder.errors
    ids = [m["id"] for m in recorder.broadcasts()]
    assert len(ids) == len(set(ids)), f"{recorder.name} received an activity id twice"
    got = sequences(recorder.bodies())
    assert got == expected, f"{recorder.name} received {got}, expected {expected}"


def link_works(recorders, senders_and_receivers, tag):
    """Each sender sends one activity tagged ``tag``; wait until all receivers have all of them."""
    for sender in senders_and_receivers:
        assert sender.send_activity({"sender": sender.name, "probe": tag})
    for receiver in senders_and_receivers:
        receiver.wait(lambda r: {b.get("sender") for b in r.bodies() if b.get("probe") == tag}
                      >= {s.name for s in senders_and_receivers}, LONG, f"probes {tag}")


def wait_log(process, pattern, since=0, timeout=LONG):
    return wait_until(lambda: process.find_log(pattern, since=since), timeout,
                      message=f"{pattern!r} in the log of server {process.port}")


def log_mark(process):
    """Where the log of ``process`` ends now, for ``find_log(..., since=)``."""
    return process.log_mark()


# --- late join ----------------------------------------------------------------------------------

def test_late_join_learns_every_user(make_process, recorders):
    a = make_process()
    rng = random.Random(1000)
    users = {f"user{i:04d}": f"{rng.getrandbits(64):016x}" for i in range(1000)}
    registrar = LineClient(a.port)  # one connection may REGISTER many times before any LOGIN
    registrar.send_raw(b"".join(json.dumps({"command": "REGISTER", "username": u, "secret": s}).encode()
                                + b"\n" for u, s in users.items()))
    for username in users:
        registrar.expect("REGISTER_SUCCESS", info=f"register success for {username}")
    registrar.close()

    b = make_process(remote_port=a.port)  # joins after all 1,000 registrations
    c = make_process(remote_port=b.port)  # and one more behind it, taught by b
    for server in (b, c):
        sample = rng.sample(sorted(users), 12)
        first = sample[0]
        wait_until(lambda: try_login(server.port, first, users[first]) == "LOGIN_SUCCESS", LONG,
                   message=f"server {server.port} to learn the users")
        for username in sample:
            assert try_login(server.port, username, users[username]) == "LOGIN_SUCCESS", username
        assert try_login(server.port, first, "not-the-secret") == "LOGIN_FAILED"
        assert try_register(server.port, first, "another-secret") == "REGISTER_FAILED"

    # A random one of them logs in on the newest server and is heard on the oldest.
    someone = rng.choice(sorted(users))
    on_c = join(recorders, c.port, "on-c", username=someone, secret=users[someone])
    on_a = join(recorders, a.port, "on-a")
    link_works(recorders, [on_a, on_c], "late-join")
    assert [b["authenticated_user"] for b in on_a.bodies() if b["sender"] == "on-c"] == [someone]


# --- crash and restart of a middle server -------------------------------------------------------

def test_killed_middle_server_halves_keep_serving_and_restart_reattaches(make_process, recorders):
    a = make_process()
    b = make_process(remote_port=a.port)
    c = make_process(remote_port=b.port)
    ca = join(recorders, a.port, "ca")
    cc = join(recorders, c.port, "cc")
    link_works(recorders, [ca, cc], "before")

    b.kill()
    # Both halves keep serving their own clients: register, log in, send, receive.
    side_users = {}
    for name, server, neighbour in (("ua", a, ca), ("uc", c, cc)):
        assert try_register(server.port, name, f"pw-{name}") == "REGISTER_SUCCESS"
        user = join(recorders, server.port, name, username=name, secret=f"pw-{name}")
        send_numbered(user, range(1, 6))
        for receiver in (user, neighbour):
            receiver.wait(has_all({name: [1, 2, 3, 4, 5]}), LONG, f"{name}'s activities on its own side")
        side_users[name] = user
    assert sequences(ca.bodies()).get("uc") is None  # the far side is out of reach
    assert sequences(cc.bodies()).get("ua") is None

    mark_a, mark_c = log_mark(a), log_mark(c)
    b.start()  # same port: its neighbours re-attach it
    wait_log(b, rf"connected to server 127\.0\.0\.1:{a.port}")  # b dials a
    wait_log(c, rf"connected to server 127\.0\.0\.1:{b.port}", since=mark_c)  # c redials b
    wait_log(a, rf"is 127\.0\.0\.1:{b.port}", since=mark_a)  # a heard b announce itself

    # b was refilled: users from both halves, and the activities each half missed flow on.
    for name in ("ua", "uc"):
        wait_until(lambda: try_login(b.port, name, f"pw-{name}") == "LOGIN_SUCCESS", LONG,
                   message=f"restarted server to learn {name}")
    ca.wait(has_all({"uc": [1, 2, 3, 4, 5]}), LONG, "the other half's activities")
    cc.wait(has_all({"ua": [1, 2, 3, 4, 5]}), LONG, "the other half's activities")
    # and end to end again
    send_numbered(ca, [1])
    send_numbered(cc, [1])
    for receiver in (ca, cc, *side_users.values()):
        receiver.wait(has_all({"ca": [1], "cc": [1]}), LONG, "end-to-end activities after the restart")
    expected = {"ua": [1, 2, 3, 4, 5], "uc": [1, 2, 3, 4, 5], "ca": [1], "cc": [1]}
    for recorder in (ca, cc, *side_users.values()):
        assert_exactly(recorder, expected)


# --- partitions ---------------------------------------------------------------------------------

def test_partition_heals_with_every_activity_once_in_order(make_process, make_relay, recorders):
    """a1 <- a2 <-relay- b1 <- b2: the relay is the cable between the two halves."""
    a1 = make_process(extra=CABLE)
    a2 = make_process(remote_port=a1.port, extra=CABLE)
    relay = make_relay(a2.port)
    b1 = make_process(remote_port=relay.port, extra=CABLE)
    b2 = make_process(remote_port=b1.port, extra=CABLE)
    clients = [join(recorders, server.port, name) for name, server in
               (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2))]
    side_a, side_b = clients[:2], clients[2:]
    for client in clients:
        send_numbered(client, [0])
    for client in clients:
        client.wait(has_all({c.name: [0] for c in clients}), LONG, "activities before the cut")

    relay.cut()
    during = list(range(1, 31))
    senders = [threading.Thread(target=send_numbered, args=(c, during)) for c in clients]
    for thread in senders:
        thread.start()
    assert try_register(a1.port, "only-a", "pw-a") == "REGISTER_SUCCESS"
    assert try_register(b2.port, "only-b", "pw-b") == "REGISTER_SUCCESS"
    for thread in senders:
        thread.join()
    for side in (side_a, side_b):  # each half serves on, within itself
        for client in side:
            client.wait(has_all({c.name: during for c in side}), LONG, "own side during the cut")
    wait_until(lambda: try_login(a2.port, "only-a", "pw-a") == "LOGIN_SUCCESS", LONG, message="only-a on a2")
    wait_until(lambda: try_login(b1.port, "only-b", "pw-b") == "LOGIN_SUCCESS", LONG, message="only-b on b1")
    assert try_login(b1.port, "only-a", "pw-a") == "LOGIN_FAILED"  # really cut

    relay.heal()
    everything = {c.name: [0, *during] for c in clients}
    for client in clients:
        client.wait(has_all(everything), LONG, "the other side's activities after the heal")
    for client in clients:
        send_numbered(client, [31])
    everything = {c.name: [0, *during, 31] for c in clients}
    for client in clients:
        client.wait(has_all(everything), LONG, "activities after the heal")
    for client in clients:
        assert_exactly(client, everything)
    for server in (a1, a2, b1, b2):
        for username, secret in (("only-a", "pw-a"), ("only-b", "pw-b")):
            wait_until(lambda: try_login(server.port, username, secret) == "LOGIN_SUCCESS", LONG,
                       message=f"{username} known on {server.port}")


def test_conflicting_registration_across_partition_is_deleted_everywhere(make_process, make_relay, recorders):
    """a <-relay- b <- c: "x" is registered with one secret on a and another on c while cut."""
    a = make_process(extra=CABLE)
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port, extra=CABLE)
    c = make_process(remote_port=b.port, extra=CABLE)
    probe_a, probe_c = join(recorders, a.port, "probe-a"), join(recorders, c.port, "probe-c")
    link_works(recorders, [probe_a, probe_c], "up")

    relay.cut()
    assert try_register(a.port, "x", "secret-on-a") == "REGISTER_SUCCESS"
    assert try_register(c.port, "x", "secret-on-c") == "REGISTER_SUCCESS"
    assert try_register(a.port, "y", "y-on-a") == "REGISTER_SUCCESS"
    assert try_register(c.port, "z", "z-on-c") == "REGISTER_SUCCESS"
    x_on_a = join(recorders, a.port, "x-on-a", username="x", secret="secret-on-a")
    wait_until(lambda: try_login(b.port, "x", "secret-on-c") == "LOGIN_SUCCESS", LONG, message="x on b")
    x_on_b = join(recorders, b.port, "x-on-b", username="x", secret="secret-on-c")
    x_on_c = join(recorders, c.port, "x-on-c", username="x", secret="secret-on-c")

    relay.heal()
    for client in (x_on_a, x_on_b, x_on_c):
        client.wait_closed(LONG)
        last = client.received()[-1]
        assert last["command"] == "AUTHENTICATION_FAIL", last
    for server in (a, b, c):
        for secret in ("secret-on-a", "secret-on-c"):
            assert try_login(server.port, "x", secret) == "LOGIN_FAILED"
        # the name stays blocked network-wide (state.py: tombstones)
        assert try_register(server.port, "x", "a-third-secret") == "REGISTER_FAILED"
        for username, secret in (("y", "y-on-a"), ("z", "z-on-c")):
            wait_until(lambda: try_login(server.port, username, secret) == "LOGIN_SUCCESS", LONG,
                       message=f"{username} known on {server.port}")
    assert probe_a.open and probe_c.open  # only the clients of the deleted name were disconnected


def test_new_activities_racing_recovered_ones_keep_sender_order(make_process, make_relay, recorders):
    """Both sides send a steady stream while the cable is cut and healed three times, so new
    activities race with the recovered ones on every fresh link."""
    a = make_process(extra=CABLE)
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port, extra=CABLE)
    ra, rb = join(recorders, a.port, "ra"), join(recorders, b.port, "rb")
    link_works(recorders, [ra, rb], "up")

    stop = threading.Event()
    sent = {"ra": 0, "rb": 0}

    def stream(recorder):
        while not stop.is_set():
            assert recorder.send_activity({"sender": recorder.name, "seq": sent[recorder.name]})
            sent[recorder.name] += 1
            stop.wait(0.01)

    threads = [threading.Thread(target=stream, args=(r,)) for r in (ra, rb)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            target = sent["rb"]
            ra.wait(lambda r: max(sequences(r.bodies()).get("rb", [-1])) >= target, LONG,
                    "the stream to flow end to end")
            relay.cut()
            stop.wait(0.7)  # a partition of a few hundred activities
            before = relay.relayed
            relay.heal()
            wait_until(lambda: relay.relayed > before, LONG, message="b to redial through the relay")
            stop.wait(0.3)  # keep streaming while the new link recovers
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    expected = {name: list(range(count)) for name, count in sent.items()}
    for recorder in (ra, rb):
        recorder.wait(has_all(expected), LONG, "both streams complete")
    for recorder in (ra, rb):
        got = sequences(recorder.bodies())
        assert_exactly_streams(recorder, got, expected)


def assert_exactly_streams(recorder, got, expected):
    assert not recorder.errors, recorder.errors
    ids = [m["id"] for m in recorder.broadcasts()]
    assert len(ids) == len(set(ids)), f"{recorder.name} received an activity id twice"
    for sender, seqs in expected.items():
        mine = got.get(sender, [])
        assert mine == seqs, (f"{recorder.name} received {sender}'s stream out of order, with gaps or "
                              f"duplicates: first difference at {first_difference(mine, seqs)}")


def first_difference(got, expected):
    for index, (x, y) in enumerate(zip(got, expected)):
        if x != y:
            return f"position {index}: got {x}, expected {y}"
    return f"lengths {len(got)} and {len(expected)}"


def test_peer_slow_to_answer_on_a_new_link_loses_nothing(make_process, make_relay, recorders):
    """Regression: a dialler whose peer took more than a second to send its ACTIVITY_RETRIEVE went
    live on its own timer, sent the newest activities first, and its peer then dropped the older
    ones of the partition as already seen (per-origin high-water marks)."""
    a = make_process(extra=CABLE)
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port, extra=CABLE)
    ra, rb = join(recorders, a.port, "ra"), join(recorders, b.port, "rb")
    link_works(recorders, [ra, rb], "up")

    relay.cut()
    send_numbered(rb, range(1, 6))  # only b has these
    rb.wait(has_all({"rb": [1, 2, 3, 4, 5]}), LONG, "own activities during the cut")
    relay.stall(2.2)  # a's side of the new link (its SYNC_USER, ACTIVITY_RETRIEVE...) comes late
    mark = log_mark(b)
    relay.heal()
    wait_log(b, rf"connected to server 127\.0\.0\.1:{relay.port}", since=mark)
    for seq in range(6, 11):  # new activities while the link recovers
        send_numbered(rb, [seq])
        time.sleep(0.1)  # spread over the recovery, not hiding a race: creating one
    expected = {"rb": list(range(1, 11))}
    ra.wait(has_all(expected), 20, "every activity of the partition and after")
    got = sequences(ra.bodies())
    assert got["rb"] == list(range(1, 11))
    relay.stall(0)


def test_restarted_server_cut_off_at_first_sends_what_its_clients_sent(make_process, make_relay, recorders):
    """Regression: a restarted server answered its neighbour's ACTIVITY_RETRIEVE from the position
    of ``after`` in its new history. ``after`` was the last id that neighbour had from the old
    process at that address; the new process had just received it back in the neighbour's own
    answer, *after* the activities its clients sent while it was cut off, so those were skipped,
    and the neighbour's de-duplication then dropped them for good."""
    a = make_process(extra=CABLE)
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port, extra=CABLE)
    ra, rb = join(recorders, a.port, "ra"), join(recorders, b.port, "rb")
    link_works(recorders, [ra, rb], "up")  # a's last id from b's address: rb's probe

    relay.cut()
    b.kill()
    b.start()  # a new process on the same address, cut off at first
    rb2 = join(recorders, b.port, "rb2")
    send_numbered(rb2, range(1, 6))
    rb2.wait(has_all({"rb2": [1, 2, 3, 4, 5]}), LONG, "own activities while cut off")
    relay.heal()
    ra.wait(has_all({"rb2": [1, 2, 3, 4, 5]}), LONG, "what the restarted server's client sent")
    send_numbered(rb2, [6])
    send_numbered(ra, [1])
    rb2.wait(has_all({"ra": [1]}), LONG, "the link to work both ways")
    ra.wait(has_all({"rb2": [1, 2, 3, 4, 5, 6]}), LONG, "everything from the restarted server")
    assert_exactly(ra, {"rb2": [1, 2, 3, 4, 5, 6], "ra": [1]})
    assert_exactly(rb2, {"rb2": [1, 2, 3, 4, 5, 6], "ra": [1]})


# --- dead links ---------------------------------------------------------------------------------

def test_frozen_peer_is_detected_and_link_comes_back(make_process, recorders):
    a = make_process()
    b = make_process(remote_port=a.port)
    ra, rb = join(recorders, a.port, "ra"), join(recorders, b.port, "rb")
    link_works(recorders, [ra, rb], "up")
    expected = {"ra": [], "rb": []}

    for frozen, other, watcher in ((b, a, ra), (a, b, rb)):  # the dialler frozen, then the acceptor
        mark = log_mark(other)
        started = time.monotonic()
        frozen.freeze()
        try:
            wait_log(other, r"silent", since=mark, timeout=SILENCE_DETECTED + 10)
            took = time.monotonic() - started
            assert took <= SILENCE_DETECTED, f"a frozen peer took {took:.1f} s to be detected"
            seqs = [len(expected[watcher.name]) + i for i in range(3)]
            send_numbered(watcher, seqs)  # the live side keeps serving
            expected[watcher.name] += seqs
            watcher.wait(has_all({watcher.name: seqs}), LONG, "own activities while the peer is frozen")
        finally:
            frozen.thaw()
        for recorder in (ra, rb):
            recorder.wait(has_all(expected), LONG, "activities sent while frozen, after the thaw")
    link_works(recorders, [ra, rb], "after")
    for recorder in (ra, rb):
        assert_exactly(recorder, expected)


def test_blackholed_link_is_detected_by_heartbeat_and_recovers(make_process, make_relay, recorders):
    a = make_process()
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port)
    ra, rb = join(recorders, a.port, "ra"), join(recorders, b.port, "rb")
    link_works(recorders, [ra, rb], "up")

    mark_a, mark_b = log_mark(a), log_mark(b)
    relay.blackhole()  # TCP stays open, nothing gets through
    send_numbered(ra, [1, 2, 3])
    send_numbered(rb, [1, 2, 3])
    wait_log(a, r"silent", since=mark_a, timeout=SILENCE_DETECTED + 10)
    wait_log(b, r"silent", since=mark_b, timeout=SILENCE_DETECTED + 10)
    relay.heal()
    expected = {"ra": [1, 2, 3], "rb": [1, 2, 3]}
    for recorder in (ra, rb):
        recorder.wait(has_all(expected), LONG, "activities sent into the black hole")
    send_numbered(ra, [4])
    send_numbered(rb, [4])
    expected = {"ra": [1, 2, 3, 4], "rb": [1, 2, 3, 4]}
    for recorder in (ra, rb):
        recorder.wait(has_all(expected), LONG, "activities after the heal")
        assert_exactly(recorder, expected)


# --- unit tests: the pure parts -----------------------------------------------------------------

ORIGIN_A = "a" * 16
ORIGIN_B = "b" * 16


# One send time, so the same (origin, seq) is the same id; a day ahead, so every client a test logs
# in counts as connected when these were sent (see the test of recovered history below).
SENT_MS = int((time.time() + 86400) * 1000)


def own(origin, seq):
    return protocol.make_id(origin, seq, SENT_MS)


def history_of(ids, size=100):
    history = History(size)
    for activity_id in ids:
        history.add(activity_id, protocol.encode(protocol.activity_broadcast({}, activity_id)))
    return history


def ids_of(entries):
    return [entry[1] for entry in entries]


def test_missing_entries_after_an_id_or_everything():
    ids = [own(ORIGIN_A, 1), own(ORIGIN_B, 1), "FOREIGN1", own(ORIGIN_A, 2), own(ORIGIN_B, 2)]
    history = history_of(ids)
    assert ids_of(recovery.missing_entries(history, "", None)) == ids
    assert ids_of(recovery.missing_entries(history, "FOREIGN1", None)) == ids[3:]
    assert ids_of(recovery.missing_entries(history, own(ORIGIN_B, 2), {})) == []
    # an id the history does not hold (never, or no longer): the whole cache
    assert ids_of(recovery.missing_entries(history, "unknown-id", None)) == ids


def test_missing_entries_less_what_the_marks_say_is_held():
    ids = [own(ORIGIN_A, 1), own(ORIGIN_B, 1), "FOREIGN1", own(ORIGIN_A, 2), own(ORIGIN_B, 2), own(ORIGIN_A, 3)]
    history = history_of(ids)
    marks = {ORIGIN_A: 2}
    # foreign ids cannot be judged by marks and are always sent (the receiver de-duplicates them)
    assert ids_of(recovery.missing_entries(history, "", marks)) == \
        [own(ORIGIN_B, 1), "FOREIGN1", own(ORIGIN_B, 2), own(ORIGIN_A, 3)]
    assert ids_of(recovery.missing_entries(history, "FOREIGN1", {ORIGIN_A: 3, ORIGIN_B: 1})) == [own(ORIGIN_B, 2)]


def test_missing_entries_trust_marks_not_the_position_of_after_for_our_ids():
    """A restarted peer's history is in another order than what the asker was sent: the asker's
    ``after`` id (from the old process) can sit after entries the asker never saw. Our ids are
    judged by the marks alone; only foreign ids by position."""
    new = "c" * 16
    ids = [own(new, 1), own(new, 2), "FOREIGN-EARLY", own(ORIGIN_A, 7), "FOREIGN-LATE", own(new, 3)]
    history = history_of(ids)
    # the asker's last id from this address is A:7, received from the old process
    assert ids_of(recovery.missing_entries(history, own(ORIGIN_A, 7), {ORIGIN_A: 7})) == \
        [own(new, 1), own(new, 2), "FOREIGN-LATE", own(new, 3)]
    # without marks (another implementation asking), the position is all there is
    assert ids_of(recovery.missing_entries(history, own(ORIGIN_A, 7), None)) == ["FOREIGN-LATE", own(new, 3)]


def test_missing_entries_after_eviction_sends_the_whole_cache():
    history = history_of([own(ORIGIN_A, n) for n in range(1, 11)], size=4)
    assert ids_of(recovery.missing_entries(history, own(ORIGIN_A, 2), None)) == \
        [own(ORIGIN_A, n) for n in range(7, 11)]
    assert ids_of(recovery.missing_entries(history, own(ORIGIN_A, 8), None)) == \
        [own(ORIGIN_A, 9), own(ORIGIN_A, 10)]


class FakeOutbox:
    """What ``State`` needs of a connection (a session's outbox), with what it was sent kept
    as messages so a test can read them."""

    def __init__(self):
        self.lines = []
        self.heartbeats = 0
        self.closed_with = None
        self.last_heard = time.monotonic()

    def send(self, data):
        if data == protocol.HEARTBEAT:
            self.heartbeats += 1
        elif self.closed_with is None:
            self.lines += [json.loads(line) for line in data.splitlines()]  # a chunk holds many

    def send_last(self, data, reason):
        self.send(data)
        self.closed_with = reason

    def queued_bytes(self):
        return 0

    def take(self, command=None):
        lines, self.lines = self.lines, []
        return [m for m in lines if command is None or m["command"] == command]


def new_session(state, name):
    return state.open_session(FakeOutbox(), name)


def take(session, command=None):
    """What ``session`` was sent since the last take (only ``command`` messages, if given)."""
    return session.outbox.take(command)


def new_state():
    return State("127.0.0.1", 4000, history_size=100, origin=ORIGIN_A)


def accept_peer(state, name, port):
    """A server link the fake peer ``name`` dialled: authenticated and announced (busy: no
    redirects), so forwarded to at once."""
    session = new_session(state, name)
    state.accept_link(session)
    state.peer_announced(session, 100, "127.0.0.1", port)
    return session


def linked_state(*peers):
    """A State with live server links to fake peers (acceptor side, announced)."""
    state = new_state()
    sessions = []
    for index, name in enumerate(peers):
        sessions.append(accept_peer(state, name, 5000 + index))
    for session in sessions:  # each new link changed our network map: announced to every link
        take(session)
    return state, sessions


def logged_in_client(state, username, secret):
    client = new_session(state, f"client-{username}")
    if username != "anonymous" and username not in users_of(state):
        state.register_user(client, username, secret)
    assert state.login(client, username, secret) is None
    take(client)
    return client


def users_of(state):
    return state.user_directory()[0]


def blocked_of(state):
    return state.user_directory()[1]


def test_retrieve_request_asks_after_the_last_id_from_that_peer_with_marks():
    state = new_state()
    peer = accept_peer(state, "peer", 5000)
    # empty marks are sent all the same: they tell the peer we de-duplicate (recovery rule 5)
    assert take(peer, "ACTIVITY_RETRIEVE") == [{"command": "ACTIVITY_RETRIEVE", "after": "", "marks": {}}]
    state.server_activity(peer, {"n": 1}, own(ORIGIN_B, 1))
    state.server_activity(peer, {"n": 2}, own(ORIGIN_B, 2))
    # keyed by the peer's address, so it survives the link: a new link to it asks the same
    state.close_session(peer)
    again = new_session(state, "again")
    state.dial_link(again, "127.0.0.1:5000", "secret")
    assert take(again, "ACTIVITY_RETRIEVE") == [{
        "command": "ACTIVITY_RETRIEVE", "after": own(ORIGIN_B, 2), "marks": {ORIGIN_B: 2},
        "lineage": [0, 0, ["127.0.0.1:4000"], []]}]  # the dialler's lineage: the acceptor judges it


def test_activities_deduplicated_by_origin_sequence_and_by_foreign_id():
    state, (left, right) = linked_state("left", "right")
    watcher = logged_in_client(state, "anonymous", None)
    assert state.server_activity(left, {"n": 1}, own(ORIGIN_B, 1))
    assert state.server_activity(left, {"n": 2}, own(ORIGIN_B, 2))
    assert not state.server_activity(right, {"n": 2}, own(ORIGIN_B, 2))  # the same, other path
    assert not state.server_activity(right, {"n": 1}, own(ORIGIN_B, 1))  # older than held
    assert state.server_activity(left, {"n": "f"}, "FOREIGN-1")
    assert not state.server_activity(right, {"n": "f"}, "FOREIGN-1")
    assert [m["id"] for m in take(watcher)] == [own(ORIGIN_B, 1), own(ORIGIN_B, 2), "FOREIGN-1"]
    # forwarded once, never back where it came from
    assert [m["id"] for m in take(right, "ACTIVITY_BROADCAST")] == \
        [own(ORIGIN_B, 1), own(ORIGIN_B, 2), "FOREIGN-1"]
    assert take(left, "ACTIVITY_BROADCAST") == []
    # our own activities coming back are dropped too
    state.client_activity(watcher, "anonymous", None, {"mine": True})
    mine = take(watcher)[0]["id"]
    assert not state.server_activity(left, {"mine": True}, mine)


def test_answer_retrieve_sends_what_is_missing_then_goes_live_in_order():
    state, (old,) = linked_state("old")
    for seq in range(1, 4):
        state.server_activity(old, {"seq": seq}, own(ORIGIN_B, seq))
    fresh = new_session(state, "fresh")
    state.accept_link(fresh)
    state.server_activity(old, {"seq": 4}, own(ORIGIN_B, 4))  # arrives before the peer asks
    assert take(fresh, "ACTIVITY_BROADCAST") == []  # not live yet: nothing may overtake the answer
    state.peer_asked(fresh, "", {ORIGIN_B: 1})
    state.server_activity(old, {"seq": 5}, own(ORIGIN_B, 5))
    assert [m["id"] for m in take(fresh, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, n) for n in (2, 3, 4, 5)]


def test_a_quiet_dialled_peer_gets_the_whole_history_in_order_before_live():
    """The regression of test_peer_slow_to_answer_on_a_new_link_loses_nothing, in one State: when
    a peer we dialled has not asked for history after ``LIVE_AFTER``, it may just be slow. It
    gets the whole history in order, then live activities; what its late ACTIVITY_RETRIEVE
    brings again is a duplicate it drops. Never a newer activity before an older one."""
    state, (old,) = linked_state("old")
    for seq in range(1, 4):
        state.server_activity(old, {"seq": seq}, own(ORIGIN_B, seq))
    dialled = new_session(state, "dialled")
    state.dial_link(dialled, "127.0.0.1:6000", "secret")
    take(dialled)
    state.server_activity(old, {"seq": 4}, own(ORIGIN_B, 4))
    assert take(dialled, "ACTIVITY_BROADCAST") == []  # not live before it asks or the timer fires
    state.tick(time.monotonic() + recovery.LIVE_AFTER, silence=3600)  # the heartbeat's timer
    state.server_activity(old, {"seq": 5}, own(ORIGIN_B, 5))
    assert [m["id"] for m in take(dialled, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, n) for n in range(1, 6)]
    state.peer_asked(dialled, "", {})  # its request, late: only repeats, which it drops
    assert [m["id"] for m in take(dialled, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, n) for n in range(1, 6)]
    state.server_activity(old, {"seq": 6}, own(ORIGIN_B, 6))  # and live after them
    assert [m["id"] for m in take(dialled, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, 6)]


def test_sync_user_adds_unknown_users_and_forwards_only_them():
    state, (left, right) = linked_state("left", "right")
    state.new_user(left, "known", "k")
    take(right)
    state.merge_users(left, {"known": "k", "new1": "s1", "new2": "s2"})
    assert users_of(state) == {"known": "k", "new1": "s1", "new2": "s2"}
    assert take(right) == [{"command": "SYNC_USER", "users": {"new1": "s1", "new2": "s2"}}]
    assert take(left) == []  # not back to the sender
    state.merge_users(left, {"known": "k"})  # nothing new: the flood ends
    assert take(right) == [] and take(left) == []


def test_sync_user_conflict_deletes_the_user_disconnects_its_clients_and_tells_everyone():
    state, (left, right) = linked_state("left", "right")
    x_client = logged_in_client(state, "x", "mine")
    take(left), take(right)
    other = logged_in_client(state, "anonymous", None)
    state.merge_users(left, {"x": "theirs", "y": "sy"})
    assert "x" not in users_of(state) and "x" in blocked_of(state)
    assert users_of(state)["y"] == "sy"
    assert x_client.outbox.closed_with is not None
    assert take(x_client)[-1]["command"] == "AUTHENTICATION_FAIL"
    assert other.outbox.closed_with is None
    for session in (left, right):  # the whole network learns it, the sender included
        assert {"command": "USER_CONFLICT", "username": "x"} in take(session)


def test_new_user_rules():
    state, (left, right) = linked_state("left", "right")
    state.new_user(left, "u", "s")
    assert users_of(state)["u"] == "s"
    assert take(right) == [{"command": "NEW_USER", "username": "u", "secret": "s"}]
    state.new_user(left, "u", "s")  # known with the same secret: nothing
    assert take(right) == [] and take(left) == []
    state.new_user(right, "u", "other")  # a conflict
    assert "u" not in users_of(state) and "u" in blocked_of(state)
    assert take(left) == take(right) == [{"command": "USER_CONFLICT", "username": "u"}]
    state.new_user(left, "u", "s")  # a stale NEW_USER for a deleted name: tell the sender only
    assert take(left) == [{"command": "USER_CONFLICT", "username": "u"}]
    assert take(right) == [] and "u" not in users_of(state)
    state.new_user(left, "anonymous", "s")
    assert "anonymous" not in users_of(state)


def test_user_conflict_deletes_once_and_forwards_once():
    state, (left, right) = linked_state("left", "right")
    state.new_user(left, "x", "s")
    take(right)
    state.user_conflict(left, "x")
    assert "x" not in users_of(state)
    assert take(right) == [{"command": "USER_CONFLICT", "username": "x"}] and take(left) == []
    state.user_conflict(right, "x")  # heard again: the flood ends here
    assert take(right) == [] and take(left) == []
    state.user_conflict(left, "never-known")  # unknown names are blocked as well
    assert "never-known" in blocked_of(state)


def test_tombstoned_names_cannot_be_registered_again():
    state, (peer,) = linked_state("peer")
    state.user_conflict(peer, "x")
    with pytest.raises(protocol.RegisterFailed):
        state.register_user(new_session(state, "client"), "x", "fresh")
    state.merge_users(peer, {"x": "again"})
    assert "x" not in users_of(state)
    assert take(peer) == [{"command": "USER_CONFLICT", "username": "x"}]


# --- the per-link machine alone (recovery.Link): plain data, no State, no sockets ----------------

Step = recovery.Step


def test_the_initiator_opens_with_its_whole_half_and_waits_for_the_peer():
    link = recovery.Link.dialled("127.0.0.1:5000", start_no=7, now=100.0)
    assert link.open() == (Step.AUTHENTICATE, Step.ASK, Step.USERS, Step.ANNOUNCE)
    assert (link.asked, link.live, link.phase) == (True, False, "asked")
    assert link.tick(100.0 + recovery.LIVE_AFTER / 2) == ()  # too early to give up on the peer
    assert link.peer_asked("", {ORIGIN_B: 1}) == (Step.ANSWER,)
    assert (link.live, link.phase, link.request) == (False, "catching-up", ("", {ORIGIN_B: 1}, None))
    link.caught_up()  # State sent the answer's last chunk
    assert (link.live, link.phase) == (True, "live")
    assert link.peer_announced(3, "peer.example", 4000) == []  # already live: nothing to do
    assert (link.load, link.peer_key) == (3, "127.0.0.1:5000")  # the dialled address stays the key


def test_the_acceptor_takes_its_turn_on_the_peers_first_announce():
    link = recovery.Link.accepted(start_no=7, now=100.0)
    assert link.open() == (Step.USERS,)
    assert link.phase == "authenticated"
    assert link.peer_asked("", {ORIGIN_B: 1}) == (Step.ANSWER,)  # the initiator's ACTIVITY_RETRIEVE comes first
    link.caught_up()
    assert link.phase == "answered"
    assert link.peer_announced(0, "peer.example", 4000) == [Step.ASK, Step.ANNOUNCE]
    assert (link.peer_key, link.phase) == ("peer.example:4000", "live")
    assert link.peer_announced(1, "peer.example", 4000) == []  # a load change: only the load
    assert link.load == 1


def test_a_quiet_peer_is_caught_up_by_the_clock():
    dialled = recovery.Link.dialled("127.0.0.1:5000", start_no=7, now=100.0)
    dialled.open()
    assert dialled.tick(100.0 + recovery.LIVE_AFTER) == (Step.REPLAY,)  # the whole history
    assert dialled.phase == "catching-up" and dialled.tick(200.0) == ()
    accepted = recovery.Link.accepted(start_no=7, now=100.0)
    accepted.open()
    # an acceptor's peer may be just as slow (its opening held up): the whole history too
    assert accepted.tick(100.0 + recovery.LIVE_AFTER) == (Step.ASK, Step.ANNOUNCE, Step.REPLAY)
    assert accepted.peer_announced(0, "late.example", 1) == []  # its turn was taken once


def test_no_load_announce_before_our_half_of_the_routine_is_out():
    """Issue 14: an acceptor's load announce sent before its ACTIVITY_RETRIEVE would be taken by
    the initiator for the routine's announce."""
    dialled = recovery.Link.dialled("127.0.0.1:5000", start_no=0, now=0.0)
    assert not dialled.may_announce_load
    dialled.open()
    assert dialled.may_announce_load  # its opening, announce included, went out in one step
    accepted = recovery.Link.accepted(start_no=0, now=0.0)
    accepted.open()
    assert not accepted.may_announce_load
    accepted.peer_asked("", {ORIGIN_B: 1})
    assert not accepted.may_announce_load, "answering is not our half: the ASK is"
    accepted.peer_announced(0, "peer.example", 4000)
    assert accepted.may_announce_load


def test_only_the_first_announce_can_make_a_link_live():
    """Later announces are load changes: they never catch a peer up (only its own request, or
    the clock, does)."""
    dialled = recovery.Link.dialled("127.0.0.1:5000", start_no=3, now=0.0)
    dialled.open()
    assert dialled.peer_announced(0, "java.example", 4000) == [Step.CATCH_UP]  # a Java acceptor
    assert dialled.backlog and dialled.foreign  # announced before asking: not one of ours
    again = recovery.Link.dialled("127.0.0.1:5000", start_no=3, now=0.0)
    again.open()
    again.hostname, again.port = "seen.example", 4000  # as if it had announced before
    assert again.peer_announced(1, "seen.example", 4000) == [] and not again.backlog


def test_a_peer_still_sending_activities_is_not_quiet():
    """Our acceptor's ACTIVITY_RETRIEVE follows its answer to ours: while that answer streams
    in, the clock waits; it runs out LIVE_AFTER after the last activity, or at QUIET_LIMIT."""
    link = recovery.Link.dialled("127.0.0.1:5000", start_no=0, now=100.0)
    link.open()
    at = 100.0
    while at < 100.0 + 3 * recovery.LIVE_AFTER:
        at += recovery.LIVE_AFTER / 2
        link.peer_sent_activity(at)
        assert link.tick(at + recovery.LIVE_AFTER / 2) == ()
    assert link.activities_received == 6
    assert link.tick(at + recovery.LIVE_AFTER) == (Step.REPLAY,)
    busy = recovery.Link.accepted(start_no=0, now=0.0)
    busy.open()
    busy.peer_sent_activity(recovery.QUIET_LIMIT - 0.1)
    assert busy.tick(recovery.QUIET_LIMIT) == (Step.ASK, Step.ANNOUNCE, Step.REPLAY)


def test_a_refused_link_is_marked_not_by_a_string():
    link = recovery.Link.dialled("127.0.0.1:5000", start_no=0, now=0.0)
    link.open()
    link.peer_refused()
    assert link.refused and link.phase == "refused"
    assert link.tick(10.0) == ()


def test_peer_memory_asks_after_the_last_id_heard_from_an_address():
    memory = recovery.PeerMemory()
    assert memory.last_from(None) == "" and memory.last_from("a:1") == ""
    memory.heard("a:1", "x")
    memory.heard("a:1", "y")
    assert memory.last_from("a:1") == "y"


def test_a_request_without_marks_on_an_accepted_link_waits_for_the_announce():
    """Rule 5: a peer asking without marks may not de-duplicate; what not to send back is known
    by its address, which an acceptor learns only from the announce after the request."""
    link = recovery.Link.accepted(start_no=0, now=0.0)
    link.open()
    assert link.peer_asked("after-id", None) == ()
    assert link.foreign and link.request == ("after-id", None, None)
    assert link.peer_announced(1, "java.example", 4000) == [Step.ASK, Step.ANNOUNCE, Step.ANSWER]
    never = recovery.Link.accepted(start_no=0, now=0.0)
    never.open()
    never.peer_asked("", None)
    assert never.tick(recovery.LIVE_AFTER) == (Step.ASK, Step.ANNOUNCE, Step.ANSWER)  # no announce came


def test_a_java_acceptor_is_pushed_what_arrived_after_what_it_held_less_its_own():
    """We dial a peer that announces before asking (the Java acceptor): on the first link it gets
    what arrives from then on; after a cut, what arrived after the last entry it held when the
    live link broke, never the activities it sent us."""
    state, (old,) = linked_state("old")
    java = new_session(state, "java")
    state.dial_link(java, "127.0.0.1:7000", "secret")
    state.server_activity(old, {"n": 1}, own(ORIGIN_B, 1))  # before it announced: not pushed
    state.peer_announced(java, 0, "127.0.0.1", 7000)
    assert java.link.foreign and java.link.live
    take(java)
    state.server_activity(java, {"j": 1}, "J1")
    state.server_activity(old, {"n": 2}, own(ORIGIN_B, 2))
    assert [m["id"] for m in take(java, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, 2)]
    state.close_session(java)  # the cut: it held everything up to B:2
    state.server_activity(old, {"n": 3}, own(ORIGIN_B, 3))
    again = new_session(state, "again")
    state.dial_link(again, "127.0.0.1:7000", "secret")
    take(again)
    state.peer_announced(again, 0, "127.0.0.1", 7000)  # it answers AUTHENTICATE with it at once
    state.server_activity(again, {"j": 2}, "J2")  # then its answer to our request
    state.server_activity(old, {"n": 4}, own(ORIGIN_B, 4))
    assert [m["id"] for m in take(again, "ACTIVITY_BROADCAST")] == [own(ORIGIN_B, 3), own(ORIGIN_B, 4)]
