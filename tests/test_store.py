"""The durable store (activitynet/store.py) on its own: what survives a restart, what a bad
data directory gets, how a failing disk is survived, and that recovery reads from disk follow
the same rule as recovery from memory."""

import hashlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from array import array

import pytest
from hypothesis import given, settings, strategies as st

from activitynet import protocol, recovery, store as store_module
from activitynet.state import History
from activitynet.store import SCHEMA_VERSION, Store, StoreError

ORIGIN_B = "b" * 16
ORIGIN_C = "c" * 16


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def open_store(data_dir):
    """``open_store(**options)`` -> a Store on ``data_dir``, closed after the test."""
    opened = []

    def open_(**options):
        store = Store.open(data_dir, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def line_for(activity_id, text="hello"):
    return protocol.encode(protocol.activity_broadcast({"message": text}, activity_id))


def own_id(store, sent_ms=1_700_000_000_000):
    return protocol.make_id(store.origin, store.next_seq(), sent_ms)


def record(store, position, activity_id, line=None):
    """add_activity as the server calls it: with the id parsed once, by protocol.parse_id."""
    origin, seq, _sent = protocol.parse_id(activity_id) or (None, None, None)
    store.add_activity(position, activity_id, line_for(activity_id) if line is None else line, origin, seq)


def fingerprint(path):
    """Everything that could show a file was touched: its bytes, size and mtime, and any
    SQLite side files next to it."""
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    stat = os.stat(path)
    side_files = sorted(p for p in os.listdir(os.path.dirname(path)) if p.startswith(os.path.basename(path) + "-"))
    return digest, stat.st_size, stat.st_mtime_ns, side_files


# --- restart keeps everything ----------------------------------------------------------------

def test_a_new_directory_is_created_and_a_restart_keeps_origin_users_blocked_names_and_history(data_dir, open_store):
    store = open_store()
    assert data_dir.is_dir()
    assert store.add_user("alice", "s1").wait(timeout=10)
    assert store.add_user("bob", "s2").wait(timeout=10)
    store.block_name("bob")  # a conflict deleted bob: gone from users, blocked for good
    store.block_name("mallory")
    ids = [own_id(store) for _ in range(5)]
    for position, activity_id in enumerate(ids, start=1):
        record(store, position, activity_id)
    store.set_peer_mark("10.0.0.2:3780", ids[2])
    store.set_peer_mark("10.0.0.2:3780", ids[3])  # only the latest value counts
    origin = store.origin
    store.close()

    again = open_store()
    loaded = again.load(history=3)
    assert loaded.origin == again.origin == origin
    assert loaded.users == {"alice": "s1"}
    assert loaded.blocked == {"bob", "mallory"}
    assert loaded.history == [(p, i, line_for(i)) for p, i in list(enumerate(ids, start=1))[2:]]
    assert loaded.last_position == 5
    assert loaded.marks == {origin: protocol.parse_id(ids[-1])[1]}
    assert loaded.peer_marks == {"10.0.0.2:3780": ids[3]}


def test_sequence_numbers_are_never_reused_across_restarts(open_store):
    store = open_store()
    handed_out = [store.next_seq() for _ in range(10)]  # some never used in an activity
    assert handed_out == list(range(1, 11))
    store.close()
    again = open_store()
    assert again.next_seq() > handed_out[-1]


def test_the_reservation_moves_ahead_of_the_numbers_handed_out(open_store, monkeypatch):
    monkeypatch.setattr(store_module, "SEQ_BLOCK", 100)
    store = open_store()
    last = 0
    for _ in range(7):  # 7 x 40 numbers: past the first reservation of 100
        for _ in range(40):
            last = store.next_seq()
        assert store.flush(timeout=10)
    with sqlite3.connect(store.path) as db:
        reserved = int(db.execute("SELECT value FROM meta WHERE key = 'seq_reserved'").fetchone()[0])
    assert reserved >= last + 50  # what a kill -9 now would restart above


def test_what_must_survive_a_power_cut_is_fsynced_and_a_stream_within_sync_every_s(open_store, monkeypatch):
    """Registrations, blocked names and flushes are committed with synchronous=FULL (the WAL is
    fsynced, and all of it before them); activities alone with NORMAL (no fsync: a kill -9
    loses nothing, a power cut the last commits), and within SYNC_EVERY_S of an unsynced
    commit the writer fsyncs again, even when the stream has stopped."""
    monkeypatch.setattr(store_module, "SYNC_EVERY_S", 0.5)
    commits = []  # (synchronous in force, what the transaction wrote)
    real_connect = store_module._connect

    def connect(path, synchronous):
        db = real_connect(path, synchronous)
        mode, wrote = [synchronous], {}  # (an ordered set of tables)

        def trace(statement):
            if statement.startswith("PRAGMA synchronous = "):
                mode[0] = statement.split("= ")[1]
            elif statement == "COMMIT":
                commits.append((mode[0], tuple(wrote)))
                wrote.clear()
            elif statement.split()[0] in ("INSERT", "UPDATE", "DELETE"):
                wrote[re.search(r"(?:INTO|UPDATE|FROM) (\w+)", statement).group(1)] = True
        db.set_trace_callback(trace)
        return db

    monkeypatch.setattr(store_module, "_connect", connect)
    store = open_store()
    assert store.add_user("alice", "s").wait(timeout=10)
    assert commits[-1] == ("FULL", ("users",))
    time.sleep(0.6)  # past SYNC_EVERY_S: the next commit fsyncs whatever it holds
    for position in range(1, 21):
        record(store, position, own_id(store))
        time.sleep(0.01)
    wait_for(lambda: sum(1 for _mode, wrote in commits if "segments" in wrote), lambda n: n >= 2)
    streamed = [(mode, wrote) for mode, wrote in commits if "segments" in wrote]
    # The first also brings the origins summary up to date; the rest, within 0.5 s of it, write
    # their segments alone (one page each, whatever the stream's rate).
    assert streamed[0][0] == "FULL" and set(streamed[0][1]) == {"segments", "origins", "meta"}, commits
    assert ("NORMAL", ("segments",)) in streamed[1:], commits
    assert all(wrote == ("segments",) for mode, wrote in streamed if mode == "NORMAL"), commits
    # the stream stopped: the fsync and the summary they left out follow within SYNC_EVERY_S
    wait_for(lambda: commits[-1], lambda last: last == ("FULL", ("origins", "meta")))
    store.block_name("mallory")
    wait_for(lambda: commits[-1], lambda last: last == ("FULL", ("users", "blocked")))


def test_commits_between_fsyncs_leave_the_origins_summary_to_the_next_and_reads_add_them_up(open_store, monkeypatch):
    """Only a commit that fsyncs updates the origins table (and the peer marks); the commits
    in between write their segments alone. What is read back (the marks a restart starts from,
    what a peer lacks) is what was committed all the same: the segments after the summary
    are added to it."""
    monkeypatch.setattr(store_module, "SYNC_EVERY_S", 3600)  # no fsync falls due in this test
    store = open_store()
    mine = [own_id(store) for _ in range(3)]
    record(store, 1, mine[0])
    assert store.flush(timeout=10)  # a flush fsyncs: the summary covers position 1
    record(store, 2, mine[1])
    record(store, 3, protocol.make_id(ORIGIN_B, 7, 1))  # an origin first seen between fsyncs
    record(store, 4, mine[2])
    store.set_peer_mark("h:1", mine[2])
    wait_for(lambda: store.status()["activities_committed"], lambda n: n == 4)
    with sqlite3.connect(store.path) as db:
        summary = dict(db.execute("SELECT origin, high FROM origins"))
        assert db.execute("SELECT count(*) FROM peer_marks").fetchone() == (0,)
    db.close()
    assert summary == {store.origin: protocol.parse_id(mine[0])[1], ORIGIN_B: 0}  # behind
    seqs = [protocol.parse_id(i)[1] for i in mine]
    loaded = store.load(history=10)
    assert loaded.marks == {store.origin: seqs[2], ORIGIN_B: 7}
    assert [e[0] for chunk in store.missing({store.origin: seqs[1], ORIGIN_B: 7}) for e in chunk] == [4]
    assert [e[0] for chunk in store.missing({store.origin: seqs[2], ORIGIN_B: 6}) for e in chunk] == [3]
    store.close()  # a clean stop writes the summary
    with sqlite3.connect(store.path) as db:
        assert dict(db.execute("SELECT origin, high FROM origins")) == loaded.marks
        assert dict(db.execute("SELECT peer, value FROM peer_marks")) == {b"h:1": mine[2].encode()}
    db.close()


def test_positions_must_increase(open_store):
    store = open_store()
    record(store, 5, "x1")
    with pytest.raises(ValueError, match="position 5 is not above 5"):
        record(store, 5, "x2")


def test_the_disk_keeps_at_most_disk_history_activities_and_load_reads_only_the_newest(open_store):
    store = open_store(disk_history=50)
    for position in range(1, 201):
        activity_id = own_id(store)
        record(store, position, activity_id)
        if position % 10 == 0:
            assert store.flush(timeout=10)  # a segment (one commit) of 10
    with sqlite3.connect(store.path) as db:
        stored = db.execute("SELECT sum(count), min(first_pos), max(last_pos) FROM segments").fetchone()
    assert stored == (50, 151, 200)  # whole segments go: here exactly disk_history are left
    loaded = store.load(history=10)
    assert [entry[0] for entry in loaded.history] == list(range(191, 201))
    assert loaded.marks == {store.origin: 200}  # the mark outlives the pruned activities


def test_past_disk_history_a_dropped_segment_is_not_written_again(open_store):
    """Segments dropped past disk_history free their pages without rewriting them (SQLite as
    Debian builds it would zero each freed page and write it to the WAL: twice the bytes)."""
    store = open_store(disk_history=2 * store_module.SEGMENT_MAX)
    wal = store.path + "-wal"
    position, grown = 1, []
    for _segment in range(6):  # a flush per SEGMENT_MAX: a segment per commit, 2.5 MB in all
        seqs = store.take_seqs(store_module.SEGMENT_MAX)
        ids = protocol.make_ids(store.origin, seqs, 1_700_000_000_000)
        data = b"".join(line_for(activity_id, "x" * 150) for activity_id in ids)
        before = os.path.getsize(wal)  # (no checkpoint below 16 MB: the WAL only grows)
        store.record(position, ids, store.origin, seqs[0], data, 1_700_000_000_000)
        assert store.flush(timeout=10)
        grown.append(os.path.getsize(wal) - before)
        position += len(ids)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM segments").fetchone() == (2,)
    db.close()
    filling, dropping = grown[1], max(grown[3:])  # the first commit also builds the tables
    assert dropping < 1.25 * filling, grown


def test_close_commits_everything_queued_and_later_writes_are_refused_loudly(data_dir):
    store = Store.open(data_dir)
    for position in range(1, 1001):
        record(store, position, f"foreign-{position}", b"{}\n")
    store.close()
    ticket = store.add_user("late", "s")
    with pytest.raises(StoreError, match="closed"):
        ticket.wait(timeout=1)
    record(store, 1001, "foreign-1001", b"{}\n")
    assert store.status()["dropped_activities"] == 1
    with Store.open(data_dir) as again:
        assert again.load(history=2000).last_position == 1000


# --- what is acknowledged survives kill -9 -----------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from activitynet import protocol, store as store_module
    store_module.SEQ_BLOCK = 5000
    store = store_module.Store.open(sys.argv[1])
    position = 0
    for n in range(1_000_000):
        for _ in range(1000):
            position += 1
            seq = store.next_seq()
            activity_id = protocol.make_id(store.origin, seq, 0)
            store.add_activity(position, activity_id, b'{"n":%d}\\n' % position, store.origin, seq)
        ticket = store.add_user(f"user{n}", "secret")
        ticket.wait()
        print(f"acked user{n} position {position} seq {seq}", flush=True)
""")


def test_kill_9_loses_no_acknowledged_user_nor_what_was_recorded_before_it_and_reuses_no_id(data_dir):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    acked = []
    try:
        for line in child.stdout:
            acked.append(line.split())
            if len(acked) == 20:
                break
        child.send_signal(signal.SIGKILL)
        acked += [line.split() for line in child.stdout]  # printed before it died
    finally:
        child.kill()
        child.wait()
    assert len(acked) >= 20, "the child died before acknowledging 20 registrations"
    last_user, last_position, last_seq = acked[-1][1], int(acked[-1][3]), int(acked[-1][5])

    with Store.open(data_dir) as store:
        loaded = store.load(history=10)
        assert {name for _, name, *_ in acked} <= set(loaded.users)
        assert last_user in loaded.users
        assert loaded.last_position >= last_position  # all before the last ack is on disk
        assert store.next_seq() > last_seq + 1000  # above anything it could have handed out since
        with sqlite3.connect(store.path) as db:
            assert db.execute("SELECT sum(count), min(first_pos), max(last_pos) FROM segments").fetchone() == (
                loaded.last_position, 1, loaded.last_position)


# --- bad data directories ----------------------------------------------------------------------

def test_a_second_server_on_the_same_directory_is_refused_naming_it(data_dir, open_store):
    open_store()
    with pytest.raises(StoreError) as error:
        Store.open(data_dir)
    assert str(data_dir) in str(error.value)
    assert "in use by another activitynet server" in str(error.value)
    assert f"pid {os.getpid()}" in str(error.value)


def test_the_directory_is_free_again_after_close(data_dir):
    Store.open(data_dir).close()
    Store.open(data_dir).close()


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notadir"
    path.write_text("hello")
    with pytest.raises(StoreError, match=f"data directory {path} is not a directory"):
        Store.open(path)


@pytest.mark.parametrize("content, reason", [
    (b"name,secret\nalice,s1\n" * 20, "not an SQLite file"),
    (b"", "not an SQLite file"),
])
def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(data_dir, content, reason):
    data_dir.mkdir()
    path = data_dir / store_module.DB_NAME
    path.write_bytes(content)
    before = fingerprint(path)
    with pytest.raises(StoreError) as error:
        Store.open(data_dir)
    assert str(path) in str(error.value) and reason in str(error.value)
    assert "left untouched" in str(error.value)
    assert fingerprint(path) == before
    Store.open(data_dir / "elsewhere").close()  # and the lock was released: nothing else broke
    with pytest.raises(StoreError):
        Store.open(data_dir)  # still refused, still the same file


def test_another_programs_sqlite_database_is_refused_and_left_untouched(data_dir):
    data_dir.mkdir()
    path = data_dir / store_module.DB_NAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (n INTEGER)")
        db.execute("INSERT INTO invoices VALUES (42)")
    db.close()
    before = fingerprint(path)
    with pytest.raises(StoreError, match="SQLite database of another program"):
        Store.open(data_dir)
    assert fingerprint(path) == before


def test_a_database_from_a_newer_schema_version_is_refused_and_left_untouched(data_dir):
    with Store.open(data_dir) as store:
        assert store.add_user("alice", "s").wait(timeout=10)
        path = store.path
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = fingerprint(path)
    with pytest.raises(StoreError) as error:
        Store.open(data_dir)
    message = str(error.value)
    assert path in message and f"schema version {SCHEMA_VERSION + 1}" in message
    assert "newer activitynet" in message and "left untouched" in message
    assert fingerprint(path) == before


def test_an_older_schema_is_migrated_forward_keeping_its_data(data_dir, monkeypatch, caplog):
    with Store.open(data_dir) as store:
        assert store.add_user("alice", "s").wait(timeout=10)
        path = store.path
    # A next version of the schema, as a later release would add it.
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS + [
        lambda db: db.execute("CREATE TABLE extra (x INTEGER)")])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    caplog.set_level(logging.WARNING, logger="activitynet.store")
    with Store.open(data_dir) as store:
        assert store.load(history=1).users == {"alice": "s"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT count(*) FROM extra").fetchone() == (0,)
    db.close()
    assert any(f"migrated from schema version {SCHEMA_VERSION}" in r.getMessage() for r in caplog.records)


def test_a_version_1_database_has_its_segments_rewritten_as_runs_and_reads_the_same(data_dir, monkeypatch):
    """Version 1 indexed each activity (position, origin number, seq and length arrays);
    version 2 indexes runs. What a restarting server reads must not change."""
    with monkeypatch.context() as old:
        old.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        old.setattr(store_module, "SCHEMA_VERSION", 1)
        with Store.open(data_dir) as store:
            origin, path = store.origin, store.path
    own = [protocol.make_id(origin, seq, 1000 + seq) for seq in (1, 2, 3)]
    other = protocol.make_id(ORIGIN_B, 7, 2000)
    # positions 1-3 ours, 4 foreign, 6 (5 was dropped) B's, 7 ours again
    entries = [(1, own[0], 1, 1), (2, own[1], 1, 2), (3, own[2], 1, 3), (4, "J1FOREIGN", 0, 0),
               (6, other, 2, 7), (7, protocol.make_id(origin, 4, 1004), 1, 4)]
    lines = [line_for(activity_id) for _, activity_id, _, _ in entries]
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO origins VALUES (?, ?, ?, ?, ?)",
                       [(1, origin, 4, 1, 7), (2, ORIGIN_B, 7, 6, 7)])
        db.execute("INSERT INTO segments VALUES (7, 1, 6, 1, ?, ?, ?, ?, ?, ?, ?)", (
            json.dumps({"1": [1, 4], "2": [7, 7]}),
            array("q", [e[0] for e in entries]), array("i", [e[2] for e in entries]),
            array("q", [e[3] for e in entries]), array("i", map(len, lines)),
            json.dumps([e[1] for e in entries]), b"".join(lines)))
    db.close()

    with Store.open(data_dir) as store:
        loaded = store.load(history=10)
        assert loaded.history == [(e[0], e[1], line) for e, line in zip(entries, lines)]
        assert loaded.marks == {origin: 4, ORIGIN_B: 7} and loaded.last_position == 7
        assert store.position_of(other) == 6 and store.position_of("J1FOREIGN") == 4
        assert [e[0] for chunk in store.missing({origin: 2}, after=4) for e in chunk] == [3, 6, 7]
        more = protocol.make_id(origin, store.next_seq(), 1)
        record(store, 8, more)
        assert store.flush(timeout=10)
        assert store.load(history=1).history == [(8, more, line_for(more))]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        runs = array("q", db.execute("SELECT runs FROM segments WHERE last_pos = 7").fetchone()[0])
    db.close()
    # (first position, count, origin number, first seq, send time: -1, the ids are listed)
    assert list(runs) == [1, 3, 1, 1, -1,  4, 1, 0, 0, -1,  6, 1, 2, 7, -1,  7, 1, 1, 4, -1]


def test_a_batch_is_recorded_in_one_call_and_read_back_activity_by_activity(open_store):
    """The relay records what one read brought (``State._publish_all``) as it is: the ids, the
    lines joined, and for our ids their origin and first seq, and their send time when they
    all have the one ``make_ids`` wrote (then they are not stored, but made again). Lines are
    cut at "\\n" only (a peer's line may hold a "\\r" between its JSON tokens)."""
    store = open_store()
    seqs = [store.next_seq() for _ in range(3)]
    ids = protocol.make_ids(store.origin, seqs, 1_700_000_000_000)
    lines = [line_for(activity_id, text) for activity_id, text in zip(ids, "abc")]
    store.record(1, ids, store.origin, seqs[0], b"".join(lines), 1_700_000_000_000)
    foreign = [b'{"id":"J1",\r"n":1}\n', b'{"id":"J2"}\n']
    store.record(4, ["J1", "J2"], None, None, b"".join(foreign))
    odd = [protocol.make_id(ORIGIN_B, 5, 1), f"{ORIGIN_B}:06:1"]  # as parse_id reads it: seq 6
    store.record(6, odd, ORIGIN_B, 5, b"".join(map(line_for, odd)))
    assert store.flush(timeout=10)
    assert store.status()["activities_committed"] == 7  # activities, not the 3 batches
    loaded = store.load(history=10)
    assert loaded.history == list(zip(range(1, 8), ids + ["J1", "J2"] + odd,
                                      lines + foreign + list(map(line_for, odd))))
    assert loaded.marks == {store.origin: seqs[-1], ORIGIN_B: 6}
    assert [store.position_of(i) for i in (ids[1], "J2", odd[1])] == [2, 5, 7]
    assert store.position_of(protocol.make_id(store.origin, seqs[1], 1_700_000_000_001)) is None
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT ids FROM segments").fetchone() == ('["J1","J2","%s","%s"]' % tuple(odd),)
    db.close()
    with pytest.raises(ValueError, match="one line ending in a newline"):
        store.add_activity(8, "J3", b'{"id":"J3"}', None, None)


# --- a failing disk ----------------------------------------------------------------------------

def limit_writes(db, fault):
    """Make a real SQLite connection fail its writes: ``full`` caps the file at its current size
    (SQLITE_FULL, "database or disk is full"); ``readonly`` refuses every write (SQLITE_READONLY)."""
    if fault == "full":
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
    else:
        db.execute("PRAGMA query_only = ON")


@pytest.mark.parametrize("fault, reason", [("full", "full"), ("readonly", "readonly")])
def test_a_failing_disk_is_reported_bounded_and_survived(open_store, monkeypatch, caplog, fault, reason):
    caplog.set_level(logging.WARNING, logger="activitynet.store")
    store = open_store(max_queue=500, retry_s=0.05)
    assert store.flush(timeout=10)
    faulty = {"on": True}
    real_connect = store_module._connect

    def connect(path, synchronous):  # the writer reconnects after a failure: keep it failing
        db = real_connect(path, synchronous)
        if faulty["on"]:
            limit_writes(db, fault)
        return db

    monkeypatch.setattr(store_module, "_connect", connect)
    limit_writes(store._db, fault)  # the writer is idle (flushed): its connection is free

    big = b'{"command":"ACTIVITY_BROADCAST","activity":{"p":"%s"},"id":"x"}\n' % (b"x" * 2000)
    for position in range(1, 51):  # more than the pages the file has room for
        record(store, position, f"foreign-{position}", big)
    status = wait_for(store.status, lambda s: s["failing"])
    assert reason in status["error"]
    ticket = store.add_user("alice", "s")  # REGISTER_SUCCESS must not be sent: say why
    with pytest.raises(StoreError, match=reason):
        ticket.wait(timeout=30)

    for position in range(51, 5002):  # far more than may wait: the relay never waits for the disk
        record(store, position, f"foreign-{position}", big)
    status = store.status()
    assert status["queued"] <= 2 * 500  # the queue and the writer's batch, each bounded
    # What the writer drained last is counted as dropped when its next attempt fails and it
    # cuts its batch back to max_queue: read right after a drain, fewer are counted yet.
    wait_for(store.status, lambda s: s["dropped_activities"] >= 5001 - 2 * 500)
    wait_for(store.status, lambda s: s["failed_commits"] >= 5)  # retried, and still failing
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "logged once, then only every LOG_EVERY_S"
    assert "cannot write" in errors[0].getMessage() and "keeps relaying" in errors[0].getMessage()

    faulty["on"] = False  # the disk is repaired: the next retry stores what was kept
    assert store.flush(timeout=30)
    status = store.status()
    assert not status["failing"] and status["queued"] == 0
    assert any("writes again" in r.getMessage() for r in caplog.records)
    assert store.add_user("bob", "s").wait(timeout=10)
    record(store, 5002, "foreign-5002", big)
    assert store.flush(timeout=10)
    loaded = store.load(history=10_000)
    assert loaded.users == {"alice": "s", "bob": "s"}  # alice was kept for the retry
    kept = [entry[0] for entry in loaded.history]
    assert kept == sorted(kept) and kept[-1] == 5002
    assert len(kept) == 5002 - store.status()["dropped_activities"]


def wait_for(read, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"condition never held; last value {value}"
        time.sleep(0.01)


# --- recovery reads from disk follow recovery.missing_entries ---------------------------------

def populate(store, history, entries, commit_every=9):
    """The same activities in the store and in an in-memory History, in the same order, stored
    in segments of at most SEGMENT_MAX cut at least every ``commit_every``."""
    for n, activity_id in enumerate(entries, start=1):
        line = line_for(activity_id)
        history.add(activity_id, line)
        record(store, history.last_no, activity_id, line)
        if n % commit_every == 0:
            assert store.flush(timeout=10)
    assert store.flush(timeout=10)


def interleaved_ids(origin_a):
    ids = []
    for n in range(1, 41):
        ids.append(protocol.make_id(origin_a, n, 1000 + n))
        if n % 2 == 0:
            ids.append(protocol.make_id(ORIGIN_B, n // 2, 2000 + n))
        if n % 5 == 0:
            ids.append(f"J{n:03d}FOREIGN")
        if n % 10 == 0:
            ids.append(protocol.make_id(ORIGIN_C, n // 10, 3000 + n))
    return ids


def from_disk(store, after_id, marks, **options):
    """What store.missing gives a peer that sent ``after_id`` and ``marks``: flat, and in chunks."""
    after = store.position_of(after_id) if after_id else None
    chunks = list(store.missing(marks, after=after or 0, **options))
    return [entry for chunk in chunks for entry in chunk], chunks


def test_position_of_finds_own_and_foreign_ids_and_nothing_else(open_store):
    store = open_store()
    history = History(1000)
    ids = interleaved_ids(store.origin)
    populate(store, history, ids)
    for activity_id in (ids[0], ids[17], "J010FOREIGN", protocol.make_id(ORIGIN_C, 4, 3040)):
        assert store.position_of(activity_id) == history.number_of(activity_id)
    assert store.position_of("nobody-sent-this") is None
    assert store.position_of(protocol.make_id(ORIGIN_C, 99, 1)) is None
    assert store.position_of(protocol.make_id("d" * 16, 1, 1)) is None


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One populated store and its in-memory twin, for the property test below."""
    segment_max, store_module.SEGMENT_MAX = store_module.SEGMENT_MAX, 4
    store = Store.open(tmp_path_factory.mktemp("shared"))
    try:
        history = History(1000)
        populate(store, history, interleaved_ids(store.origin))
    finally:
        store_module.SEGMENT_MAX = segment_max
    yield store, history
    store.close()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_missing_from_disk_equals_missing_entries_from_memory(shared, data):
    store, history = shared
    entries = list(history.after_id(None))
    after_id = data.draw(st.one_of(st.just(""), st.just("unknown-id"),
                                   st.sampled_from([entry[1] for entry in entries])))
    origins = [store.origin, ORIGIN_B, ORIGIN_C, "d" * 16]
    marks = data.draw(st.dictionaries(st.sampled_from(origins), st.integers(0, 45)))
    expected = recovery.missing_entries(history, after_id, marks)
    got, chunks = from_disk(store, after_id, marks)
    assert got == expected
    assert all(0 < len(chunk) <= 4 for chunk in chunks)


def test_missing_stops_below_what_memory_holds_and_a_peer_lacking_nothing_costs_no_scan(open_store):
    store = open_store()
    history = History(1000)
    ids = interleaved_ids(store.origin)
    populate(store, history, ids)
    below = 20
    got, _ = from_disk(store, "", {}, below=below)
    assert [entry[0] for entry in got] == list(range(1, below))
    marks = {store.origin: 40, ORIGIN_B: 20, ORIGIN_C: 4}
    last_foreign = [i for i in ids if i.startswith("J")][-1]
    assert from_disk(store, last_foreign, marks) == ([], [])


def test_names_and_ids_with_lone_surrogates_are_stored_like_any_other(open_store):
    """JSON lets a peer send "\\ud800"; SQLite's TEXT would refuse it and fail every commit."""
    store = open_store()
    odd = "mal\ud800lory"
    assert store.add_user(odd, "s\udfff").wait(timeout=10)
    store.block_name("x\ud800")
    record(store, 1, "foreign-\ud800", b'{"id":"foreign-\\ud800"}\n')
    store.set_peer_mark("h:1", "foreign-\ud800")
    assert store.flush(timeout=10)
    loaded = store.load(history=10)
    assert loaded.users == {odd: "s\udfff"} and loaded.blocked == {"x\ud800"}
    assert loaded.history == [(1, "foreign-\ud800", b'{"id":"foreign-\\ud800"}\n')]
    assert loaded.peer_marks == {"h:1": "foreign-\ud800"}
    assert store.position_of("foreign-\ud800") == 1


def test_a_ticket_calls_back_once_committed_so_a_connection_need_not_block(open_store):
    store = open_store()
    calls = []
    tickets = [store.add_user(f"user{n}", "s") for n in range(100)]
    for ticket in tickets:
        ticket.add_done_callback(lambda t: calls.append((t, t.done(), t.error())))
    assert tickets[-1].wait(timeout=10)
    wait_for(lambda: len(calls), lambda n: n == 100)
    assert [c[0] for c in calls] == tickets and all(c[1:] == (True, None) for c in calls)
    late = []
    tickets[0].add_done_callback(late.append)  # already settled: called at once
    assert late == [tickets[0]]
    assert set(store.load(history=0).users) == {f"user{n}" for n in range(100)}


def test_a_damaged_database_gets_a_clear_error_not_a_traceback(data_dir):
    with Store.open(data_dir) as store:
        assert store.add_user("alice", "s").wait(timeout=10)
        path = store.path
    with open(path, "r+b") as file:  # keep our header, scribble over the pages after it
        file.seek(100)
        file.write(b"\xff" * 8000)
    before = fingerprint(path)[:3]
    with pytest.raises(StoreError, match=f"cannot open the data store {path}"):
        Store.open(data_dir)
    assert fingerprint(path)[:3] == before  # (SQLite may leave an empty -wal and -shm beside it)
