"""The durable store (``--data-dir``, issue 10) with real server processes.

Servers are killed with SIGKILL (no goodbye, nothing flushed) and restarted on the same port with
the same data directory. What a test checks is what clients and peers see: logins, activities,
REGISTER_FAILED for a blocked name, the SYNC_USER a server sends a peer. Where a test must know
that something reached the disk before it kills a server, it waits on the database itself
(a read-only SQLite query, which WAL allows beside the running server), never on a sleep.
"""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request

from activitynet import protocol, store
from activitynet.state import State
from activitynet.store import Store
from harness import ROOT, SECRET, LineClient, wait_until
from recorder import log_in_here, sequences, try_login, try_register

LONG = 60.0  # generous: restarts and recovery on a slow, busy 2-core machine


def data_dir(tmp_path, name):
    return str(tmp_path / name)


def stored(directory, sql):
    """One value read from a server's database, read-only, beside the running server."""
    path = os.path.join(directory, store.DB_NAME)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def stored_activities(directory):
    return stored(directory, "SELECT coalesce(sum(count), 0) FROM segments")


def stored_users(directory):
    return stored(directory, "SELECT count(*) FROM users")


def with_dir(directory, *more):
    return ["--data-dir", directory, *more]


def restart(process):
    """Start a killed server again on its port, with its arguments (and so its data dir);
    returns where its log of this run starts (for ``wait_log``)."""
    assert not process.alive()
    mark = process.log_mark()
    process.start(timeout=LONG)
    return mark


def wait_log(process, pattern, since=0):
    return wait_until(lambda: process.find_log(pattern, since=since), LONG,
                      message=f"{pattern!r} in the log of server {process.port}")


def send(recorder, tag, count, first=1):
    for seq in range(first, first + count):
        assert recorder.send_activity({"sender": recorder.name, "tag": tag, "seq": seq})


def tagged(recorder, tag):
    """{sender: [seq, ...]} of what ``recorder`` received with ``tag``, in arrival order."""
    return sequences([b for b in recorder.bodies() if b.get("tag") == tag])


def user_directory_of(port):
    """The users a server sends a peer that authenticates to it (SYNC_USER, in chunks), read
    as a server would: AUTHENTICATE, SERVER_ANNOUNCE, then everything up to its own announce."""
    peer = LineClient(port, timeout=LONG)
    try:
        peer.send({"command": "AUTHENTICATE", "secret": SECRET})
        peer.send({"command": "SERVER_ANNOUNCE", "id": "test-peer", "load": 0,
                   "hostname": "127.0.0.1", "port": 1})
        users = {}
        while True:
            message = peer.recv()
            assert message is not None, f"server {port} closed the link"
            if message["command"] == "SYNC_USER":
                users.update(message["users"])
            elif message["command"] == "SERVER_ANNOUNCE":
                return users
    finally:
        peer.close()


def marks_of(port):
    """The per-origin marks a server asks a new peer with (its ACTIVITY_RETRIEVE): the highest
    sequence number it holds of each origin, as a peer that holds nothing sees them."""
    peer = LineClient(port, timeout=LONG)
    try:
        peer.send({"command": "AUTHENTICATE", "secret": SECRET})
        peer.send({"command": "SERVER_ANNOUNCE", "id": "test-peer", "load": 0,
                   "hostname": "127.0.0.1", "port": 1})
        peer.send({"command": "ACTIVITY_RETRIEVE", "after": "", "marks": {}})
        while True:
            message = peer.recv()
            assert message is not None, f"server {port} closed the link"
            if message["command"] == "ACTIVITY_RETRIEVE":
                return message["marks"]
    finally:
        peer.close()


# --- a whole network killed and restarted -------------------------------------------------------

def test_full_network_restart_keeps_users_blocked_names_and_relays_anew(make_process, tmp_path, recorders):
    dirs = [data_dir(tmp_path, name) for name in "abc"]
    a = make_process(extra=with_dir(dirs[0]))
    b = make_process(remote_port=a.port, extra=with_dir(dirs[1]))
    c = make_process(remote_port=b.port, extra=with_dir(dirs[2]))
    servers = (a, b, c)
    wait_log(c, rf"connected to server 127\.0\.0\.1:{b.port}")
    wait_log(a, rf"is 127\.0\.0\.1:{b.port}")

    # A user registered on each server, and a name blocked by a conflict (a peer announcing
    # the same name with another secret).
    users = {f"user-{i}": f"pw-{i}" for i in range(3)}
    for (name, secret), server in zip(users.items(), servers):
        assert try_register(server.port, name, secret) == "REGISTER_SUCCESS"
    assert try_register(a.port, "eve", "eve-a") == "REGISTER_SUCCESS"
    rogue = LineClient(c.port)
    rogue.send({"command": "AUTHENTICATE", "secret": SECRET})
    rogue.send({"command": "NEW_USER", "username": "eve", "secret": "eve-elsewhere"})
    for server in servers:
        wait_until(lambda: try_register(server.port, "eve", "eve-a") == "REGISTER_FAILED", LONG,
                   message=f"eve blocked on {server.port}")
    rogue.close()
    # Activities before the crash, on disk everywhere before the kill. In two bursts: the
    # second is committed without fsync (under a second after the first) and so is not yet in
    # the per-origin summary when the servers are killed; the marks must count it all the same.
    before = log_in_here(a.port, "before")
    recorders.append(before)
    for burst in (10, 20):
        send(before, "before", 10, first=burst - 9)
        for directory in dirs:
            wait_until(lambda: stored_activities(directory) >= burst, LONG,
                       message=f"{burst} activities in {directory}")
    for directory in dirs:  # learned users and the blocked name are committed within a group commit
        wait_until(lambda: stored(directory, "SELECT count(*) FROM blocked") == 1
                   and stored_users(directory) == len(users), LONG, message=f"users in {directory}")

    origin, _seq, _sent = protocol.parse_id(before.broadcasts()[-1]["id"])
    last_seq = max(protocol.parse_id(m["id"])[1] for m in before.broadcasts())

    for server in servers:
        server.kill()
    for directory in dirs:  # what a restart starts from, before any peer can send it anything
        alone = make_process(extra=with_dir(directory))
        assert marks_of(alone.port).get(origin) == last_seq, directory
        alone.kill()
    marks = [restart(server) for server in servers]
    wait_log(c, rf"connected to server 127\.0\.0\.1:{b.port}", since=marks[2])
    wait_log(b, rf"connected to server 127\.0\.0\.1:{a.port}", since=marks[1])

    for server in servers:
        for name, secret in users.items():
            assert try_login(server.port, name, secret) == "LOGIN_SUCCESS", (name, server.port)
        assert try_register(server.port, "eve", "eve-a") == "REGISTER_FAILED"
        assert try_login(server.port, "eve", "eve-a") == "LOGIN_FAILED"

    clients = []
    for (name, secret), server in zip(users.items(), servers):
        client = log_in_here(server.port, name, username=name, secret=secret)
        recorders.append(client)
        clients.append(client)
    for client in clients:  # new ids must not be mistaken for old ones (origin and sequence kept)
        send(client, "after", 10)
    expected = {client.name: list(range(1, 11)) for client in clients}
    for client in clients:
        client.wait(lambda r: tagged(r, "after") == expected, LONG, "every activity sent after the restart")
    for client in clients:
        ids = [m["id"] for m in client.broadcasts()]
        assert len(ids) == len(set(ids)), f"{client.name} received an id twice"
        assert tagged(client, "after") == expected
        assert not client.errors, client.errors


# --- recovery beyond the in-memory history ------------------------------------------------------

def test_restarted_server_gets_from_a_peers_disk_what_left_its_memory(make_process, tmp_path, recorders):
    """B is down while A's clients send 10x more than A's --history holds; restarted, B gets
    every one of them, in order, from A's disk and memory."""
    dir_a, dir_b = data_dir(tmp_path, "a"), data_dir(tmp_path, "b")
    a = make_process(extra=with_dir(dir_a, "--history", "30"))
    b = make_process(remote_port=a.port, extra=with_dir(dir_b, "--history", "30"))
    wait_log(a, rf"is 127\.0\.0\.1:{b.port}")
    sender = log_in_here(a.port, "sender")
    recorders.append(sender)
    send(sender, "early", 5)
    wait_until(lambda: stored_activities(dir_b) >= 5, LONG, message="B to store the first activities")

    b.kill()
    send(sender, "outage", 300)
    wait_until(lambda: stored_activities(dir_a) >= 305, LONG, message="A to store all 305")
    mark = restart(b)
    wait_log(b, rf"connected to server 127\.0\.0\.1:{a.port}", since=mark)
    wait_until(lambda: stored_activities(dir_b) >= 305, LONG, message="B to store all 305")
    # what A's memory no longer held (6..275), and half of what it holds (276..290: the disk range
    # reaches half-way into memory, see recovery.CatchUp.on_disk)
    assert a.find_log(r"sent \S+ 285 activities from disk")
    send(sender, "later", 3)
    wait_until(lambda: stored_activities(dir_b) >= 308, LONG, message="B to store the later ones")
    b.stop()

    with Store.open(dir_b) as kept:
        history = kept.load(10_000).history
    bodies = [json.loads(line)["activity"] for _position, _id, line in history]
    ids = [activity_id for _position, activity_id, _line in history]
    assert len(ids) == len(set(ids)), "B stored an activity twice"
    got = sequences([body for body in bodies if body.get("sender") == "sender"])
    assert got == {"sender": list(range(1, 6)) + list(range(1, 301)) + list(range(1, 4))}
    assert [body["tag"] for body in bodies] == ["early"] * 5 + ["outage"] * 300 + ["later"] * 3
    origin_seqs = [protocol.parse_id(activity_id)[1] for activity_id in ids]
    assert origin_seqs == sorted(origin_seqs)


# --- acknowledged registrations survive kill -9 -------------------------------------------------

def test_kill_during_a_burst_of_registrations_loses_none_that_were_acknowledged(make_process, tmp_path):
    directory = data_dir(tmp_path, "a")
    server = make_process(extra=with_dir(directory))
    client = LineClient(server.port, timeout=LONG)
    total = 20_000
    burst = b"".join(json.dumps({"command": "REGISTER", "username": f"u{i}", "secret": f"s{i}"}).encode()
                     + b"\n" for i in range(total))

    def pipeline():
        try:
            client.sock.sendall(burst)
        except OSError:
            pass  # the server died under our feet: what matters is what it acknowledged
    sender = threading.Thread(target=pipeline, daemon=True)
    sender.start()
    acknowledged = []
    while len(acknowledged) < 2000:
        reply = client.recv()
        assert reply is not None and reply["command"] == "REGISTER_SUCCESS", reply
        acknowledged.append(reply["info"].rsplit(" ", 1)[1])
    server.kill()
    while True:  # what was already on its way to us is acknowledged too
        try:
            reply = client.recv(timeout=5)
        except OSError:
            break
        if reply is None:
            break
        assert reply["command"] == "REGISTER_SUCCESS", reply
        acknowledged.append(reply["info"].rsplit(" ", 1)[1])
    client.close()
    sender.join(LONG)
    assert acknowledged == [f"u{i}" for i in range(len(acknowledged))]  # replies in order
    assert len(acknowledged) < total, "the server finished the burst before it was killed"

    restart(server)
    known = user_directory_of(server.port)
    lost = [name for name in acknowledged if name not in known]
    assert not lost, f"{len(lost)} acknowledged registrations lost, e.g. {lost[:5]}"
    last = acknowledged[-1]
    assert try_login(server.port, last, "s" + last[1:]) == "LOGIN_SUCCESS"


# --- bad data directories -----------------------------------------------------------------------

def run_server(*args, timeout=LONG):
    """Run the server command to its end; (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-m", "activitynet.server", "-lp", "0", "--bind", "127.0.0.1",
                           "-s", SECRET, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT))
    return done.returncode, done.stderr


def test_two_servers_on_one_data_dir_second_exits_naming_it(make_process, tmp_path):
    directory = data_dir(tmp_path, "shared")
    first = make_process(extra=with_dir(directory))
    code, err = run_server("--data-dir", directory)
    assert code == 1
    assert f"data directory {directory} is in use by another activitynet server (pid {first.proc.pid})" in err
    assert "Traceback" not in err
    assert try_register(first.port, "still", "works") == "REGISTER_SUCCESS"


def test_a_file_that_is_not_our_database_is_refused_and_untouched(tmp_path):
    directory = tmp_path / "notours"
    directory.mkdir()
    path = directory / store.DB_NAME
    path.write_bytes(b"my thesis, chapter 1\n" * 50)
    code, err = run_server("--data-dir", str(directory))
    assert code == 1
    assert f"{path} is not an activitynet database (not an SQLite file)" in err
    assert "left untouched" in err and "Traceback" not in err
    assert path.read_bytes() == b"my thesis, chapter 1\n" * 50


def test_a_database_of_a_newer_schema_is_refused_and_untouched(tmp_path):
    directory = str(tmp_path / "newer")
    Store.open(directory).close()
    path = os.path.join(directory, store.DB_NAME)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    db.close()
    with open(path, "rb") as file:
        before = file.read()
    code, err = run_server("--data-dir", directory)
    assert code == 1
    assert f"{path} was written by a newer activitynet (schema version {store.SCHEMA_VERSION + 1}" in err
    assert "Traceback" not in err
    with open(path, "rb") as file:
        assert file.read() == before


def test_data_dir_flags_are_checked():
    code, err = run_server("--data-dir", "")
    assert code == 2 and "--data-dir must not be empty" in err
    code, err = run_server("--disk-history", "0")
    assert code == 2 and "--disk-history" in err


# --- in one process: reply order, a failing disk -----------------------------------------------

def test_pipelined_register_then_login_get_their_replies_in_order(make_server, tmp_path, lock_rule):
    """... and the wait for the commit happens outside the state lock (the batch hold too)."""
    server = make_server(data_dir=data_dir(tmp_path, "a"))
    state = server.server.state
    depths = []
    send_held = state.send_held

    def watched(session, *args):
        depths.append(lock_rule.depth())
        return send_held(session, *args)
    state.send_held = watched
    client = LineClient(server.port)
    client.send_raw(b"".join(json.dumps(m).encode() + b"\n" for m in [
        {"command": "REGISTER", "username": "ann", "secret": "x"},
        {"command": "REGISTER", "username": "bob", "secret": "y"},
        {"command": "LOGIN", "username": "ann", "secret": "x"},
        {"command": "ACTIVITY_MESSAGE", "username": "ann", "secret": "x", "activity": {"n": 1}},
    ]))
    assert [client.recv()["command"] for _ in range(4)] == [
        "REGISTER_SUCCESS", "REGISTER_SUCCESS", "LOGIN_SUCCESS", "ACTIVITY_BROADCAST"]
    assert server.server.store_status()["users_committed"] == 2
    assert depths and not any(depths), depths
    client.close()


def healthz(server):
    """(status, body) of the server's monitor /healthz."""
    host, port = server.server.monitor.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=LONG) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_a_failing_disk_is_reported_and_the_server_keeps_relaying(make_server, tmp_path, caplog):
    server = make_server(data_dir=data_dir(tmp_path, "a"), monitor_port=0)
    assert healthz(server) == (200, {"status": "ok"})
    receiver = LineClient(server.port)
    receiver.send({"command": "LOGIN", "username": "anonymous"})
    receiver.expect("LOGIN_SUCCESS")

    def broken(*args):
        raise sqlite3.OperationalError("disk I/O error")
    server.server.store._commit = broken  # every commit from now on fails, as on a broken disk
    receiver.send({"command": "ACTIVITY_MESSAGE", "username": "anonymous", "activity": {"n": 1}})
    assert receiver.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 1
    wait_until(lambda: server.server.store_status()["failing"], message="the store to report failure")
    status = server.server.store_status()
    assert "disk I/O error" in status["error"]
    assert any("cannot write" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    code, body = healthz(server)
    assert code == 503 and body["status"] == "failing" and "disk I/O error" in body["error"]
    # still relaying; a registration is refused, not acknowledged without being stored
    receiver.send({"command": "ACTIVITY_MESSAGE", "username": "anonymous", "activity": {"n": 2}})
    assert receiver.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 2
    client = LineClient(server.port)
    client.send({"command": "REGISTER", "username": "zed", "secret": "z"})
    reply = client.expect("REGISTER_FAILED")
    assert "disk is failing" in reply["info"]
    del server.server.store._commit  # the disk heals: writes resume
    wait_until(lambda: not server.server.store_status()["failing"], message="the store to recover")
    assert try_register(server.port, "zed", "z") == "REGISTER_SUCCESS"
    assert healthz(server) == (200, {"status": "ok"})
    receiver.close()
    client.close()


# --- the answer from disk, in one State (fake outboxes, a real store) ---------------------------

class FakeOutbox:
    """What State needs of a connection; keeps the ids of the activities it was sent."""

    def __init__(self):
        self.ids = []
        self.last_heard = 0.0

    def send(self, data):
        for line in data.splitlines():  # a catch-up chunk holds many
            message = json.loads(line) if line.strip() else {}
            if message.get("command") == "ACTIVITY_BROADCAST":
                self.ids.append(message["id"])

    def send_last(self, data, reason):
        self.send(data)

    def queued_bytes(self):
        return 0


ORIGIN_B = "b0b0b0b0b0b0b0b0"


def own(seq):
    return protocol.make_id(ORIGIN_B, seq, 1_700_000_000_000 + seq)


def test_answer_from_disk_then_memory_also_what_memory_evicted_meanwhile(tmp_path):
    """Memory holds 10; the store all. A peer asking with marks gets everything above its mark,
    streamed by the link's catch-up worker (run here by the test, outside the lock, as the
    server's thread would): the disk part, then (since 15 more arrived while the disk was read,
    evicting what the first pass did not cover) a second disk pass, then memory, then live:
    each once, in order."""
    with Store.open(str(tmp_path / "s")) as kept:
        workers = []  # the sessions whose catch-up worker the server would start now
        state = State("127.0.0.1", 4000, history_size=10, store=kept, catch_up_runner=workers.append)
        source = state.open_session(FakeOutbox(), "source")
        state.accept_link(source)
        state.peer_announced(source, 100, "127.0.0.1", 5000)
        state.catch_up(workers.pop())  # it never asked: caught up with what arrived since (nothing)
        for seq in range(1, 101):
            assert state.server_activity(source, {"seq": seq}, own(seq))
        asking = state.open_session(FakeOutbox(), "asking")
        state.accept_link(asking)
        passes = []
        first_pass = state._send_stored

        def arrivals_during_the_read(*args):
            sent = first_pass(*args)
            passes.append(args[2:])  # (first, below)
            if len(passes) == 1:
                for seq in range(101, 116):
                    state.server_activity(source, {"seq": seq}, own(seq))
            return sent
        state._send_stored = arrivals_during_the_read
        state.peer_asked(asking, "", {ORIGIN_B: 5})
        assert workers == [asking] and asking.outbox.ids == []  # nothing under the lock
        state.catch_up(workers.pop())
        assert asking.link.live
        state.server_activity(source, {"seq": 116}, own(116))
        assert passes == [(1, 96), (96, 111)]  # each reaches half-way into memory (on_disk)
        assert asking.outbox.ids == [own(seq) for seq in range(6, 117)]

        # A peer without marks (another implementation): after an id only the disk still holds
        # it gets what follows it (its number looked up on disk by the worker); after an unknown
        # id, what memory holds (as without a store). It is answered once it has announced.
        state._send_stored = first_pass
        for port, (after, expected) in enumerate(((own(50), range(51, 117)), ("unknown", range(107, 117)))):
            peer = state.open_session(FakeOutbox(), f"plain-{after}")
            state.accept_link(peer)
            state.peer_asked(peer, after, None)
            assert workers == []
            state.peer_announced(peer, 0, "127.0.0.1", 6000 + port)
            state.catch_up(workers.pop())
            assert peer.outbox.ids == [own(seq) for seq in expected]


class AnnounceOutbox(FakeOutbox):
    """Keeps the maps of the SERVER_ANNOUNCEs it was sent."""

    def __init__(self):
        super().__init__()
        self.maps = []

    def send(self, data):
        super().send(data)
        message = json.loads(data) if data.strip() else {}
        if message.get("command") == "SERVER_ANNOUNCE" and "map" in message:
            self.maps.append(message["map"])


def test_a_restarted_server_tells_its_peers_where_its_sequence_resumes(tmp_path):
    """A restart continues our sequence above the reservation, skipping numbers no peer will
    ever see: our map entry says "resumes" from the first announce on, so peers do not hold our
    activities waiting for them (``dedup.Reorder.resume``). A first start resumes nothing."""
    directory = str(tmp_path / "s")
    with Store.open(directory) as kept:
        state = State("127.0.0.1", 4000, store=kept)
        assert kept.first_seq == 1 and state.resumes is None
    with Store.open(directory) as kept:
        state = State("127.0.0.1", 4000, store=kept)
        assert kept.first_seq == store.SEQ_BLOCK + 1
        assert state.resumes == (kept.origin, kept.first_seq)
        peer = state.open_session(AnnounceOutbox(), "peer")
        state.accept_link(peer)
        state.peer_announced(peer, 0, "127.0.0.1", 5000)
        maps = peer.outbox.maps
        assert maps and all(m["127.0.0.1:4000"]["resumes"] == [kept.origin, store.SEQ_BLOCK + 1] for m in maps)
        assert kept.next_seq() == store.SEQ_BLOCK + 1  # the first number of this run, as said
