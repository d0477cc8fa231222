"""Server <-> server, row by row (PROTOCOL.md sections 3, 4 and 5), with fake servers.

A fake server is a raw socket that AUTHENTICATEs and then speaks the server protocol by hand, so
each test sees exactly what a real server sends its neighbours and can send anything back,
including what no well-behaved server would. Fakes send the heartbeat line ``h`` themselves,
or the real server would close them as dead after about 3 silent seconds.

Two details of the recovery routine (section 4) shape these tests. A peer that AUTHENTICATEs
receives SYNC_USER at once; when it then sends its SERVER_ANNOUNCE it receives our
ACTIVITY_RETRIEVE and SERVER_ANNOUNCE and is forwarded activities from then on. A peer that
never announces itself nor asks for history is caught up and forwarded activities after about
``recovery.LIVE_AFTER`` (1 s): tests wait for that with generous timeouts, never with sleeps.
"""

import json
import logging
import socket
import threading
import time
import types

import pytest

from activitynet import recovery
from harness import SECRET, TIMEOUT, LineClient, activity, login, register, wait_until


class FakeServer(LineClient):
    """A raw connection playing a neighbour server."""

    def __init__(self, port=None, sock=None):
        if sock is None:
            super().__init__(port)
        else:  # a connection our server dialled (we are the acceptor)
            sock.settimeout(TIMEOUT)
            self.sock, self.timeout, self._buffer, self.eof = sock, TIMEOUT, b"", False
        self._send_lock = threading.Lock()
        self._stopped = threading.Event()
        self._beating = None

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        with self._send_lock:
            self.sock.sendall(data)

    def heartbeat(self, every=0.5):
        """Send ``h`` about every ``every`` seconds, as a live server does."""
        def beat():
            while not self._stopped.wait(every):
                try:
                    self.send_raw(b"h\n")
                except OSError:
                    return
        self._beating = threading.Thread(target=beat, daemon=True, name="fake-heartbeat")
        self._beating.start()
        return self

    def authenticate(self, secret=SECRET):
        """AUTHENTICATE; returns the users of the SYNC_USER reply."""
        self.send({"command": "AUTHENTICATE", "secret": secret})
        users = self.expect("SYNC_USER")["users"]
        self.heartbeat()
        return users

    def announce(self, load=0, hostname="fake.example", port=4000):
        self.send({"command": "SERVER_ANNOUNCE", "load": load, "hostname": hostname, "port": port})

    def until(self, command, timeout=TIMEOUT, **fields):
        """Receive up to the first ``command`` message with ``fields``; returns (it, skipped)."""
        skipped = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"no {command} {fields} within {timeout} s; got {skipped}"
            message = self.recv()
            assert message is not None, f"link closed while waiting for {command}; got {skipped}"
            if message["command"] == command and all(message.get(k) == v for k, v in fields.items()):
                return message, skipped
            skipped.append(message)

    def next_not_announce(self):
        """The next message other than a SERVER_ANNOUNCE (load changes come any time)."""
        while True:
            message = self.recv()
            if message is None or message["command"] != "SERVER_ANNOUNCE":
                return message

    def close(self):
        self._stopped.set()
        super().close()


def broadcast(activity_id, **body):
    return {"command": "ACTIVITY_BROADCAST", "activity": body, "id": activity_id}


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def fakes():
    """``fakes(port)`` -> a FakeServer closed after the test."""
    made = []

    def make(port):
        fake = FakeServer(port)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def live_fake(fakes, server):
    """An authenticated, announced fake: forwarded activities at once."""
    fake = fakes(server.port)
    fake.authenticate()
    fake.announce(hostname=f"fake-{id(fake)}.example")
    fake.until("SERVER_ANNOUNCE")  # after our ACTIVITY_RETRIEVE: the acceptor's half of recovery
    return fake


# --- AUTHENTICATE -----------------------------------------------------------------------------

def test_wrong_secret_is_an_authentication_failure(server, fakes):
    """Wrong secret: AUTHENTICATION_FAIL with the customary info, then close; no link."""
    fake = fakes(server.port)
    fake.send({"command": "AUTHENTICATE", "secret": "guess"})
    fake.expect("AUTHENTICATION_FAIL", info="the supplied secret is incorrect: guess")
    fake.expect_closed()
    assert not server.links()


def test_authenticate_twice_is_invalid(server, fakes):
    """AUTHENTICATE on an authenticated link: INVALID_MESSAGE and close."""
    fake = fakes(server.port)
    fake.authenticate()
    fake.send({"command": "AUTHENTICATE", "secret": SECRET})
    message, skipped = fake.until("INVALID_MESSAGE")
    assert "already authenticated" in message["info"]
    assert {m["command"] for m in skipped} <= {"SERVER_ANNOUNCE"}
    fake.expect_closed()
    wait_until(lambda: not server.links(), message="the link to be forgotten")


def test_authenticate_is_answered_with_every_user(server, fakes):
    """AUTHENTICATE's success reply is SYNC_USER with every local user."""
    register(server.port, "alice", "a").close()
    register(server.port, "bob", "b").close()
    assert fakes(server.port).authenticate() == {"alice": "a", "bob": "b"}


def test_authenticate_with_no_users_still_gets_sync_user(server, fakes):
    """Even with no users there is a SYNC_USER: it is the success reply."""
    assert fakes(server.port).authenticate() == {}


def test_authenticate_needs_a_secret(server, fakes):
    """AUTHENTICATE without a secret is an INVALID_MESSAGE."""
    fake = fakes(server.port)
    fake.send({"command": "AUTHENTICATE"})
    fake.expect("INVALID_MESSAGE")
    fake.expect_closed()


def test_heartbeats_are_ignored_before_authenticate(server, fakes):
    """Section 4: ``h`` is ignored, also before AUTHENTICATE."""
    fake = fakes(server.port)
    fake.send_raw(b"h\nh\r\n\nh\n")
    assert fake.authenticate() == {}


def test_heartbeat_before_login_is_ignored_too(server):
    """A fresh connection does not know yet whether it is a client: ``h`` is ignored."""
    client = LineClient(server.port)
    client.send_raw(b'h\n{"command":"LOGIN","username":"anonymous"}\n')
    client.expect("LOGIN_SUCCESS")


def test_client_commands_on_a_server_link_are_invalid(server, fakes):
    """A server link cannot LOGIN: client commands on it are INVALID_MESSAGE."""
    fake = fakes(server.port)
    fake.authenticate()
    fake.send({"command": "LOGIN", "username": "anonymous"})
    message, _ = fake.until("INVALID_MESSAGE")
    assert "client command" in message["info"]
    fake.expect_closed()


@pytest.mark.parametrize("message, words", [
    ({"command": "SERVER_ANNOUNCE", "load": "3", "hostname": "h", "port": 1}, ["'load'", "integer"]),
    ({"command": "SERVER_ANNOUNCE", "load": 3, "hostname": "h"}, ["'port'"]),
    ({"command": "ACTIVITY_BROADCAST", "activity": {}}, ["'id'"]),
    ({"command": "ACTIVITY_BROADCAST", "activity": [], "id": "x"}, ["'activity'", "object"]),
    ({"command": "SYNC_USER", "users": ["alice"]}, ["'users'", "object"]),
    ({"command": "NEW_USER", "username": "carol"}, ["'secret'"]),
    ({"command": "USER_CONFLICT"}, ["'username'"]),
    ({"command": "ACTIVITY_RETRIEVE"}, ["'after'"]),
    ({"command": "BUNDLE", "messages": {}}, ["'messages'", "array"]),
    ({"command": "LOCK_REQUEST", "username": "a", "secret": "b"}, ["LOCK_REQUEST"]),
    ({"command": "REDIRECT", "hostname": "h", "port": 1}, ["REDIRECT"]),
])
def test_malformed_server_messages_are_invalid(server, fakes, message, words):
    """Missing or ill-typed fields on a server link: INVALID_MESSAGE naming them, close."""
    fake = fakes(server.port)
    fake.authenticate()
    fake.send(message)
    reply, _ = fake.until("INVALID_MESSAGE")
    for word in words:
        assert word in reply["info"], reply["info"]
    fake.expect_closed()


def test_a_peer_reporting_invalid_message_is_closed_without_reply(server, fakes, caplog):
    """Section 2: the receiver of INVALID_MESSAGE closes too, and logs the reason."""
    fake = fakes(server.port)
    fake.authenticate()
    with caplog.at_level(logging.ERROR):
        fake.send({"command": "INVALID_MESSAGE", "info": "I did not like that"})
        while (message := fake.recv()) is not None:
            assert message["command"] == "SERVER_ANNOUNCE"
    assert "I did not like that" in caplog.text, "the peer's complaint is logged for people"


# --- what a neighbour is sent -----------------------------------------------------------------

def test_load_changes_are_announced(server, fakes):
    """SERVER_ANNOUNCE goes to neighbours whenever the client load changes."""
    fake = fakes(server.port)
    fake.authenticate()
    client = login(server.port)
    fake.until("SERVER_ANNOUNCE", load=1, hostname="127.0.0.1", port=server.port)
    second = login(server.port)
    fake.until("SERVER_ANNOUNCE", load=2)
    client.send({"command": "LOGOUT"})
    fake.until("SERVER_ANNOUNCE", load=1)
    second.close()  # a vanished client counts as a load change too
    fake.until("SERVER_ANNOUNCE", load=0)


def test_announce_is_answered_with_retrieve_and_announce(server, fakes):
    """The acceptor's half of recovery starts once it knows who dialled it."""
    client = login(server.port)  # noqa: F841 (kept open: the load is 1)
    fake = fakes(server.port)
    fake.authenticate()
    fake.announce(load=3, hostname="peer.example", port=4100)
    retrieve = fake.next_not_announce()
    assert retrieve["command"] == "ACTIVITY_RETRIEVE"
    assert retrieve["after"] in ("", None), "nothing was ever received from this peer"
    fake.until("SERVER_ANNOUNCE", load=1, hostname="127.0.0.1", port=server.port)
    wait_until(lambda: [(link["load"], link["peer"]) for link in server.links()]
               == [(3, "peer.example:4100")], message="the peer's announced load to be kept")


def test_announcements_are_not_forwarded(server, fakes):
    """SERVER_ANNOUNCE is neighbour-local: never forwarded."""
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    a.announce(load=9, hostname="a.example", port=4001)
    register(server.port, "sentinel", "pw").close()
    _, skipped = b.until("NEW_USER", username="sentinel")
    assert not [m for m in skipped if m.get("hostname") == "a.example"]


def test_register_sends_new_user_to_every_neighbour(server, fakes):
    """A local REGISTER sends NEW_USER to every neighbour."""
    a, b = fakes(server.port), fakes(server.port)
    a.authenticate()
    b.authenticate()
    register(server.port, "bob", "pw").close()
    for fake in (a, b):
        assert fake.next_not_announce() == {"command": "NEW_USER", "username": "bob", "secret": "pw"}


def test_client_activity_reaches_a_peer_that_never_announces(server, fakes):
    """A silent peer (another implementation, a raw test) is caught up after LIVE_AFTER."""
    fake = fakes(server.port)
    fake.authenticate()
    client = login(server.port)
    activity(client, {"n": 1})
    mine = client.expect("ACTIVITY_BROADCAST")
    got, _ = fake.until("ACTIVITY_BROADCAST")
    assert got == mine
    activity(client, {"n": 2})
    got, skipped = fake.until("ACTIVITY_BROADCAST")
    assert got["activity"]["n"] == 2 and not [m for m in skipped if m["command"] != "SERVER_ANNOUNCE"]
    assert recovery.LIVE_AFTER < TIMEOUT


def test_client_activity_reaches_an_announced_peer_at_once(server, fakes):
    """Once a peer announced itself, activities are forwarded as they happen, in order."""
    fake = live_fake(fakes, server)
    client = login(server.port)
    for n in range(20):
        activity(client, {"n": n})
    got = [fake.until("ACTIVITY_BROADCAST")[0] for _ in range(20)]
    assert [m["activity"] for m in got] == [{"n": n, "authenticated_user": "anonymous"} for n in range(20)]
    assert len({m["id"] for m in got}) == 20


def test_heartbeat_goes_to_servers_never_to_clients(server, fakes):
    """Section 4: about one ``h`` a second on server links; clients never get one."""
    fake = fakes(server.port)
    fake.authenticate()
    client = login(server.port)
    beats = 0
    while beats < 2:  # about two seconds
        line = fake.recv_line()
        assert line is not None
        beats += line == b"h"
    activity(client, {"after": "heartbeats"})
    assert client.recv_line().startswith(b'{"command":"ACTIVITY_BROADCAST"'), "no h for clients"


def test_a_silent_link_is_closed(server):
    """Section 4: a link silent for about 3 s is dead (a frozen peer, a cut cable)."""
    fake = FakeServer(server.port)
    fake.send({"command": "AUTHENTICATE", "secret": SECRET})
    fake.expect("SYNC_USER")
    # no heartbeat from us: the server must give up on the link (having finished its half of
    # the recovery routine for a quiet peer), and send nothing else
    while (message := fake.recv(timeout=15)) is not None:
        assert message["command"] in ("ACTIVITY_RETRIEVE", "SERVER_ANNOUNCE"), message
    wait_until(lambda: not server.links(), message="the dead link to be forgotten")
    fake.close()


# --- activities from a neighbour ----------------------------------------------------------------

def test_broadcast_from_a_peer_is_delivered_once(server, fakes):
    """De-duplication: the same id twice is delivered and kept once."""
    fake = live_fake(fakes, server)
    client = login(server.port)
    fake.send(broadcast("dup-1", text="first"))
    fake.send(broadcast("dup-1", text="first"))  # the same id again: dropped
    fake.send(broadcast("dup-2", text="second"))
    assert client.expect("ACTIVITY_BROADCAST") == broadcast("dup-1", text="first")
    assert client.expect("ACTIVITY_BROADCAST") == broadcast("dup-2", text="second")
    assert server.state.has_activity("dup-1") and server.snapshot()["history"]["entries"] == 2


def test_broadcast_is_relayed_as_received_unless_it_must_change(server, fakes):
    """A broadcast goes on as the bytes it came in (whitespace and escapes included: still one
    valid JSON object), except where they must change: a carriage return (a Java peer's
    ``readLine`` would end the line there), a leading BOM, or fields other than command, activity
    and id are encoded again, compactly, as a broadcast we build."""
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    client = login(server.port)
    lines = [
        (b'{ "command" : "ACTIVITY_BROADCAST", "activity": {"t": "\\u00e9\\ud800", "n": 1.50}, "id": "r-1" }', None),
        (b'{"command":"ACTIVITY_BROADCAST",\r"activity":{"n":2},"id":"r-2"}',
         b'{"command":"ACTIVITY_BROADCAST","activity":{"n":2},"id":"r-2"}'),
        (b'\xef\xbb\xbf{"command":"ACTIVITY_BROADCAST","activity":{"n":3},"id":"r-3"}',
         b'{"command":"ACTIVITY_BROADCAST","activity":{"n":3},"id":"r-3"}'),
        (b'{"command":"ACTIVITY_BROADCAST","activity":{"n":4},"id":"r-4","extra":[1]}',
         b'{"command":"ACTIVITY_BROADCAST","activity":{"n":4},"id":"r-4"}'),
    ]
    for line, _ in lines:
        a.send_raw(line + b"\n")
    for line, expected in lines:
        for peer in (client, b):
            got = peer.recv_line()
            while b"ACTIVITY_BROADCAST" not in got:  # heartbeats, b's SERVER_ANNOUNCEs
                got = peer.recv_line()
            assert got == (expected or line)
            assert json.loads(got)["command"] == "ACTIVITY_BROADCAST"


def test_broadcast_is_forwarded_to_other_neighbours_not_back(server, fakes):
    """Flooding: to every other neighbour once, never back to where it came from."""
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    client = login(server.port)
    a.send(broadcast("fw-1", n=1))
    assert b.until("ACTIVITY_BROADCAST")[0] == broadcast("fw-1", n=1)
    b.send(broadcast("fw-1", n=1))  # arriving on a second path: harmless
    a.send(broadcast("fw-2", n=2))
    assert b.until("ACTIVITY_BROADCAST")[0]["id"] == "fw-2", "fw-1 went to b once"
    assert [client.expect("ACTIVITY_BROADCAST")["id"] for _ in range(2)] == ["fw-1", "fw-2"]
    activity(client, {"n": 3})
    mine = client.expect("ACTIVITY_BROADCAST")
    assert a.until("ACTIVITY_BROADCAST")[0] == mine, "a never gets its own activities back"


def test_foreign_ids_are_opaque(server, fakes):
    """Ids from other implementations are random strings: any non-empty string works."""
    fake = live_fake(fakes, server)
    client = login(server.port)
    ids = ["7k2m9q4r1v8x3z6b0c5n", "with:colons:9", "0123456789abcdef:7", "ünï", "9"]
    for activity_id in ids:
        fake.send(broadcast(activity_id, x=1))
    assert [client.expect("ACTIVITY_BROADCAST")["id"] for _ in ids] == ids


# --- users from a neighbour ---------------------------------------------------------------------

def test_new_user_is_stored_and_forwarded(server, fakes):
    """NEW_USER for an unknown user: store it, forward it to the other neighbours."""
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    a.send({"command": "NEW_USER", "username": "carol", "secret": "pw"})
    assert b.next_not_announce() == {"command": "NEW_USER", "username": "carol", "secret": "pw"}
    assert server.users()["carol"] == "pw"
    login(server.port, "carol", "pw")  # a user registered elsewhere logs in here


def test_known_new_user_with_the_same_secret_changes_nothing(server, fakes):
    """NEW_USER for a user known with the same secret: nothing, not even a forward."""
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    register(server.port, "carol", "pw").close()
    assert b.next_not_announce()["username"] == "carol"
    assert a.next_not_announce()["username"] == "carol"
    a.send({"command": "NEW_USER", "username": "carol", "secret": "pw"})
    a.send({"command": "NEW_USER", "username": "dave", "secret": "pw"})
    assert b.next_not_announce()["username"] == "dave", "carol was not forwarded again"
    register(server.port, "erin", "pw").close()
    assert a.next_not_announce()["username"] == "erin", "nothing was sent back to a"
    assert server.users()["carol"] == "pw"


def test_new_user_with_a_different_secret_is_a_conflict(server, fakes):
    """Delete the user, disconnect its clients, USER_CONFLICT to every neighbour (the sender
    included: PROTOCOL.md's decision, so the whole network learns it)."""
    register(server.port, "frank", "mine").close()
    client = login(server.port, "frank", "mine")
    bystander = login(server.port)
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    a.send({"command": "NEW_USER", "username": "frank", "secret": "theirs"})
    assert a.next_not_announce() == {"command": "USER_CONFLICT", "username": "frank"}
    assert b.next_not_announce() == {"command": "USER_CONFLICT", "username": "frank"}
    assert "frank" not in server.users()
    while (message := client.recv()) is not None:  # disconnected, maybe told why first
        assert message["command"] == "AUTHENTICATION_FAIL"
    refused = LineClient(server.port)
    refused.send({"command": "LOGIN", "username": "frank", "secret": "mine"})
    refused.expect("LOGIN_FAILED")
    refused.expect_closed()
    activity(bystander, {"still": "here"})
    bystander.expect("ACTIVITY_BROADCAST")


def test_user_conflict_deletes_disconnects_and_forwards_once(server, fakes):
    """USER_CONFLICT: delete, disconnect the user's clients, forward; the flood ends."""
    register(server.port, "gina", "pw").close()
    client = login(server.port, "gina", "pw")
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    a.send({"command": "USER_CONFLICT", "username": "gina"})
    assert b.next_not_announce() == {"command": "USER_CONFLICT", "username": "gina"}
    while (message := client.recv()) is not None:
        assert message["command"] == "AUTHENTICATION_FAIL"
    assert "gina" not in server.users()
    # the flood ends: the same conflict again is not forwarded (b's lines are handled in order,
    # so a's next message shows whether the repeated conflict went anywhere)
    b.send({"command": "USER_CONFLICT", "username": "gina"})
    b.send({"command": "NEW_USER", "username": "sentinel", "secret": "pw"})
    assert a.next_not_announce() == {"command": "NEW_USER", "username": "sentinel", "secret": "pw"}, \
        "neither the first conflict went back to a nor the repeated one was forwarded"


def test_sync_user_merges_and_forwards_what_was_new(server, fakes):
    """SYNC_USER: unknown users are added and passed on to the other neighbours."""
    register(server.port, "hana", "pw").close()
    a = live_fake(fakes, server)
    b = live_fake(fakes, server)
    a.send({"command": "SYNC_USER", "users": {"hana": "pw", "ivan": "iv", "jo": "jj"}})
    forwarded = b.next_not_announce()
    assert forwarded["command"] == "SYNC_USER" and forwarded["users"] == {"ivan": "iv", "jo": "jj"}
    assert {u: server.users()[u] for u in ("hana", "ivan", "jo")} == {"hana": "pw", "ivan": "iv", "jo": "jj"}
    login(server.port, "jo", "jj")


def test_sync_user_with_a_different_secret_is_a_conflict(server, fakes):
    """SYNC_USER with a different secret for a known user is a conflict."""
    register(server.port, "kim", "pw").close()
    client = login(server.port, "kim", "pw")
    a = live_fake(fakes, server)
    a.send({"command": "SYNC_USER", "users": {"kim": "other"}})
    assert a.next_not_announce() == {"command": "USER_CONFLICT", "username": "kim"}
    while (message := client.recv()) is not None:
        assert message["command"] == "AUTHENTICATION_FAIL"
    assert "kim" not in server.users()


# --- ACTIVITY_RETRIEVE --------------------------------------------------------------------------

def test_activity_retrieve_replies_from_the_history(server, fakes):
    """ACTIVITY_RETRIEVE: a known id gets what came after it; an unknown id the whole cache."""
    client = login(server.port)
    for n in range(3):
        activity(client, {"n": n})
    ids = [client.expect("ACTIVITY_BROADCAST")["id"] for _ in range(3)]
    fake = fakes(server.port)
    fake.authenticate()

    def retrieve(after):
        fake.send({"command": "ACTIVITY_RETRIEVE", "after": after})
        # the link is handled in order: once this NEW_USER is stored, the reply is queued
        fake.send({"command": "NEW_USER", "username": f"sync-{after}", "secret": "x"})
        wait_until(lambda: f"sync-{after}" in server.users(), message="the request handled")

    def received_until_live(marker):
        """ids received, up to the live activity ``marker`` sent after the request."""
        activity(client, {"n": marker})
        live = client.expect("ACTIVITY_BROADCAST")["id"]
        got = []
        while True:
            message, _ = fake.until("ACTIVITY_BROADCAST")
            if message["id"] == live:
                return got, live
            got.append(message["id"])

    retrieve(ids[0])  # a known id: everything after it
    got, live = received_until_live("a")
    assert got == ids[1:]
    ids.append(live)
    retrieve("no-such-id")  # an unknown id: the whole cache
    got, live = received_until_live("b")
    assert got == ids
    ids.append(live)
    retrieve(ids[-1])  # the newest id: nothing
    got, live = received_until_live("c")
    assert got == []
    ids.append(live)
    retrieve(None)  # null: the whole cache
    got, _ = received_until_live("d")
    assert got == ids


# --- BUNDLE (the Java implementation's envelope) -------------------------------------------------

def test_bundle_is_handled_in_order(server, fakes):
    """Section 5: a BUNDLE's messages are handled in order, as if sent one by one."""
    fake = live_fake(fakes, server)
    client = login(server.port)
    fake.send({"command": "BUNDLE", "messages": [
        {"command": "NEW_USER", "username": "lena", "secret": "pw"},
        broadcast("b-1", n=1),
        broadcast("b-2", n=2),
        broadcast("b-1", n=1),
        {"command": "BUNDLE", "messages": [broadcast("b-3", n=3)]},
    ]})
    assert [client.expect("ACTIVITY_BROADCAST")["id"] for _ in range(3)] == ["b-1", "b-2", "b-3"]
    assert server.users()["lena"] == "pw"


def test_bundle_with_a_bad_message_handles_what_came_before_then_fails(server, fakes):
    """A bad message inside a BUNDLE fails like a bad line: earlier ones stand."""
    fake = live_fake(fakes, server)
    client = login(server.port)
    fake.send({"command": "BUNDLE", "messages": [
        broadcast("ok-1", n=1),
        {"command": "NEW_USER", "username": "max"},
        broadcast("never", n=2),
    ]})
    assert client.expect("ACTIVITY_BROADCAST")["id"] == "ok-1"
    message, _ = fake.until("INVALID_MESSAGE")
    assert "NEW_USER" in message["info"] and "'secret'" in message["info"]
    fake.expect_closed()
    assert not server.state.has_activity("never")


def test_java_reconnect_bundle_on_a_fresh_connection(server, fakes):
    """Section 5: the Java implementation sends its whole reconnect sequence (AUTHENTICATE,
    ACTIVITY_RETRIEVE, SYNC_USER, SERVER_ANNOUNCE, then broadcasts) as one BUNDLE."""
    register(server.port, "local", "pw").close()
    client = login(server.port)
    activity(client, {"n": "before"})
    before = client.expect("ACTIVITY_BROADCAST")
    fake = fakes(server.port)
    fake.send({"command": "BUNDLE", "messages": [
        {"command": "AUTHENTICATE", "secret": SECRET},
        {"command": "ACTIVITY_RETRIEVE", "after": "unknown-to-you"},
        {"command": "SYNC_USER", "users": {"java-user": "jpw"}},
        {"command": "SERVER_ANNOUNCE", "load": 0, "hostname": "java.example", "port": 3790},
        broadcast("java-1", text="from java"),
    ]})
    fake.heartbeat()
    assert fake.expect("SYNC_USER")["users"] == {"local": "pw"}
    # the answer (streamed by the link's catch-up thread) and our half of the routine, in any order
    seen = []
    while not ({"ACTIVITY_BROADCAST", "ACTIVITY_RETRIEVE", "SERVER_ANNOUNCE"} <= {m["command"] for m in seen}):
        message = fake.recv(timeout=TIMEOUT)
        assert message is not None, f"link closed; got {seen}"
        seen.append(message)
    assert [m for m in seen if m["command"] == "ACTIVITY_BROADCAST"][0] == before, "the retrieve was answered"
    assert client.expect("ACTIVITY_BROADCAST")["id"] == "java-1"
    assert server.users()["java-user"] == "jpw"


def test_bundle_cannot_smuggle_commands_past_authentication(server, fakes):
    """A BUNDLE is no way around AUTHENTICATE."""
    fake = fakes(server.port)
    fake.send({"command": "BUNDLE", "messages": [{"command": "NEW_USER", "username": "x", "secret": "y"}]})
    fake.expect("INVALID_MESSAGE")
    fake.expect_closed()
    fake2 = fakes(server.port)
    fake2.send({"command": "BUNDLE", "messages": [{"command": "AUTHENTICATE", "secret": "wrong"},
                                                  {"command": "NEW_USER", "username": "x", "secret": "y"}]})
    fake2.expect("AUTHENTICATION_FAIL")
    fake2.expect_closed()
    assert "x" not in server.users()


def test_bundle_from_a_client_is_invalid(server):
    """Clients cannot send BUNDLE."""
    client = login(server.port)
    client.send({"command": "BUNDLE", "messages": [{"command": "LOGOUT"}]})
    client.expect("INVALID_MESSAGE")
    client.expect_closed()


# --- our server as the initiator (it dials -rh/-rp) ----------------------------------------------

@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def test_initiator_opens_with_authenticate_retrieve_sync_announce(make_server, listener):
    """Section 4, the initiator's half: AUTHENTICATE, ACTIVITY_RETRIEVE, SYNC_USER, SERVER_ANNOUNCE."""
    remote = types.SimpleNamespace(port=listener.getsockname()[1])
    server = make_server(remote=remote, secret=SECRET)
    sock, _ = listener.accept()
    peer = FakeServer(sock=sock)
    try:
        assert peer.recv() == {"command": "AUTHENTICATE", "secret": SECRET}
        assert peer.recv()["command"] == "ACTIVITY_RETRIEVE"
        assert peer.recv() == {"command": "SYNC_USER", "users": {}}
        announce = peer.recv()
        me = f"127.0.0.1:{server.port}"
        # the Project 1 fields, then our optional ones (issue 9): a joining root, and its map
        assert {k: announce.pop(k) for k in ("command", "load", "hostname", "port")} == \
            {"command": "SERVER_ANNOUNCE", "load": 0, "hostname": "127.0.0.1", "port": server.port}
        assert announce["lineage"][0] == 2 and announce["lineage"][2:] == [[me], []]
        assert list(announce["map"]) == [me] and announce["map"][me]["up"] is None
        # answer as an acceptor would, then check the link works both ways
        peer.heartbeat()
        peer.send({"command": "SYNC_USER", "users": {"olga": "pw"}})
        peer.announce(load=0, hostname="acceptor.example", port=4200)
        wait_until(lambda: server.users().get("olga") == "pw", message="the users to arrive")
        client = login(server.port, "olga", "pw")
        activity(client, {"n": 1}, "olga", "pw")
        assert peer.until("ACTIVITY_BROADCAST")[0] == client.expect("ACTIVITY_BROADCAST")
    finally:
        peer.close()


def test_initiator_forwards_to_a_peer_that_never_answers(make_server, listener):
    """A peer we dialled that only listens (a marking script's fake server) still receives every
    activity, in order, once ``recovery.LIVE_AFTER`` has passed without it asking."""
    remote = types.SimpleNamespace(port=listener.getsockname()[1])
    server = make_server(remote=remote, secret=SECRET)
    sock, _ = listener.accept()
    peer = FakeServer(sock=sock).heartbeat()  # it only keeps the link alive
    try:
        client = login(server.port)
        activity(client, {"n": 1})  # before the link is live: it comes from the history
        first = peer.until("ACTIVITY_BROADCAST")[0]
        activity(client, {"n": 2})
        second = peer.until("ACTIVITY_BROADCAST")[0]
        assert [first["activity"]["n"], second["activity"]["n"]] == [1, 2]
    finally:
        peer.close()


def test_initiator_refused_by_its_peer_gives_up(make_server, listener, caplog):
    """AUTHENTICATION_FAIL from the server we dialled: we stop redialling (wrong secret)."""
    remote = types.SimpleNamespace(port=listener.getsockname()[1])
    server = make_server(remote=remote, secret="not-theirs")
    sock, _ = listener.accept()
    peer = FakeServer(sock=sock)
    assert peer.recv()["command"] == "AUTHENTICATE"
    peer.send({"command": "AUTHENTICATION_FAIL", "info": "the supplied secret is incorrect: not-theirs"})
    while peer.recv() is not None:
        pass
    address = f"127.0.0.1:{remote.port}"
    wait_until(lambda: address in server.server.state.seeker.excluded, message="the peer to be excluded")
    assert "refused our secret" in caplog.text
    peer.close()
    listener.settimeout(2.0)  # a failed dial is retried within 1 s: this would catch a redial
    with pytest.raises(socket.timeout):
        listener.accept()
