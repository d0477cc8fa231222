"""The durable store of one server (``--data-dir``): an SQLite database in WAL mode.

It keeps what a server must not forget when it restarts: its origin identity and a reservation
of its sequence numbers, registered users, blocked names, the activity history (up to
``disk_history`` entries, far more than the in-memory ``--history``), the highest sequence
number stored per origin, and per-peer bookkeeping for recovery.

Never on the relay's critical path
----------------------------------
The recording verbs (``record``, ``add_user``, ``block_name``, ``set_peer_mark``, ``take_seqs``)
are called by the server under its state lock, so they do no I/O: each appends to an in-memory
queue (or sets a dict item) in O(1). ``record`` is called once per relayed *batch* (the
activities of one read of a connection, already joined into the bytes every connection is sent)
and queues it as it is: nothing runs per activity on the relay's side. One writer thread sleeps
until something is queued (an idle server's writer does not wake), gathers for ``GATHER_S``
(not when a registration or a flush waits) and commits everything it found in one transaction
(group commit), so an activity is committed within about ``GATHER_S`` plus two commit times of
its arrival (under 100 ms), and a registration within one or two commit times. ``add_user``
returns a ``Ticket``: the server waits on it *outside* the lock and sends REGISTER_SUCCESS only
once the user is committed.

Activities are stored a commit at a time, as segments (see ``_SEGMENTS_2``) indexed by the
batches recorded, not by activity, in 16 KiB pages; ids that ``make_ids`` wrote from one send
time are not stored but made again when read. Inside a server under the durable-chain benchmark
the writer thread costs about 0.6-1.0 us of CPU per activity on this 2-core virtual machine
(2.0-2.3 us when segments were built from a tuple per activity, schema version 1; a row per
activity cost 5-7 us). Three quarters of it is the kernel's: copying the bytes into the page
cache, for the WAL and again for the database at each checkpoint (about 400 bytes written per
activity of 200), and writing them out; the rest is SQLite and each commit's fixed cost.
A commit that does not fsync writes only its segments (the per-origin summary waits for the
next fsync, see ``_ORIGINS_COVERED_3``): under a trickle (one activity per commit) that is one
16 KiB page, about 15 KB written per activity.

Reads (``load`` at start-up, ``position_of`` and ``missing`` for recovery) open their own
connection: under WAL they never block the writer, nor it them. ``missing`` reads in chunks, each
its own short read transaction, so a long refill neither holds memory nor pins the WAL.

How the server uses it (issue 10): ``Store.open(dir, disk_history)`` at start-up (``Server``),
``load(history)`` to seed the user directory, blocked names, history, de-duplication marks and
per-peer marks (``State._restore``); ``take_seqs(n)`` for own ids; under the state lock
``add_user`` (``users.DurableUsers``; the connection's reader thread sends REGISTER_SUCCESS once
the ticket is settled, ``State.send_held``), ``block_name``, ``record`` with the history position
(``State._publish_all``, ``State._publish``), the peer marks through a shared dict
(``share_peer_marks``); outside it
``missing(marks, after, below=first position in memory)`` to refill a peer from disk before the
in-memory part (``State.peer_asked``); ``status()`` for health checks (``Server.store_status``);
``close()`` after the last connection.

What a crash can lose (journal_mode=WAL; synchronous FULL or NORMAL, chosen per commit)
---------------------------------------------------------------------------------------
A commit is written to the WAL before it returns; under synchronous=FULL SQLite also fsyncs the
WAL (and with it every earlier commit), under NORMAL it leaves the bytes in the OS's page cache
(fsynced at the next FULL commit or checkpoint). The writer commits with FULL whatever someone
waits for or must never lose: a registration or learned user, a flush, a blocked name, the
sequence reservation; and any commit made ``SYNC_EVERY_S`` (1 s) or more after the last fsync.
Other commits (activities only) use NORMAL: that saves an fsync per group commit. Peer marks
are written by the fsynced commits only.
- ``kill -9`` of the server: only what was not yet committed, i.e. activities that arrived in the
  last ~100 ms (on restart the per-origin marks are exactly what was committed, so the recovery
  routine asks the peers for the rest), the peer marks of the last second at most (older ones
  make a peer resend what de-duplication then drops) and pending learned users (SYNC_USER
  brings them back). A NORMAL commit survives it: its bytes are in the page cache, which the
  kernel writes out anyway. Never an acknowledged registration: REGISTER_SUCCESS waits for the
  commit, and that commit is fsynced.
- A power cut or kernel crash: the same, and also the activities of the NORMAL commits since
  the last fsync, all made within ``SYNC_EVERY_S`` of it: at most about the last
  second of activities (the per-origin marks roll back with them, so recovery asks the peers
  for those too). Never a registration, learned user or blocked name that was committed, nor the
  reservation: their commits are fsynced. The database itself is never damaged (WAL
  checksums: a torn commit is rolled back whole).
- Sequence numbers are never reused: the database holds a reservation ``SEQ_BLOCK`` ahead of the
  numbers handed out (refreshed by the writer), and a restart starts above it. Ids lost in a crash
  leave a gap in that origin's sequence, which peers' de-duplication accepts; ``first_seq`` (the
  first number of this run) goes into our network-map entry as "resumes", so peers do not hold
  our activities back waiting for the numbers skipped.
- A failing disk (full, read-only, I/O error) loses durability, not service: the writer logs it
  loudly (once, then every ``LOG_EVERY_S``), keeps at most ``max_queue`` entries in each queue
  (the activity queue then drops its oldest, other writes are refused; all counted) and at most
  ``max_queue`` in its batch for the retry (the oldest activities dropped first), fails waiting
  registrations (``Ticket.wait`` raises ``StoreError``), retries every ``retry_s`` and says so
  in ``status()``. Until it recovers, the sequence reservation is not refreshed either: a
  server that hands out more than ``SEQ_BLOCK/2`` ids on a failing disk and then restarts on a
  healed one can reuse ids.

A data directory belongs to one server at a time (``flock`` on its lock file). A database file
that is not ours (not SQLite, or SQLite without our ``application_id``) or from a newer schema
version is refused with a ``StoreError`` naming it and left untouched; older versions are migrated
forward in one transaction. A new database is built under a temporary name and renamed into place,
so the database file is either absent or complete.
"""

import fcntl
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass

from . import protocol

log = logging.getLogger(__name__)

DB_NAME = "activitynet.sqlite3"
LOCK_NAME = "activitynet.lock"
APPLICATION_ID = 0x616E6574  # b"anet": PRAGMA application_id, how we recognise our file
SQLITE_MAGIC = b"SQLite format 3\x00"
SYNCHRONOUS = "FULL"  # for registrations, blocked names, the reservation (module docstring)
SYNC_EVERY_S = 1.0  # activity-only commits skip the fsync unless the last one is this old
SEQ_BLOCK = 1_000_000  # sequence numbers reserved ahead of those handed out
GATHER_S = 0.05  # the writer looks for work this often, and commits what it found at once
MAX_QUEUE = 250_000  # activities (or other writes) waiting for the disk, at most (~300 bytes each)
RETRY_S = 1.0  # a failing disk is retried this often
LOG_EVERY_S = 30.0  # and reported this often while it fails
SEGMENT_MAX = 2048  # activities per stored segment (and per chunk read for recovery), at most,
# unless one recorded batch (one read of a connection: 64 KiB) holds more: batches are never split
PAGE_SIZE = 16384  # of a new database: SQLite costs less CPU per byte than with 4 KiB (larger
# pages cost more per commit: each commit rewrites a few small tables' pages too)
WAL_CHECKPOINT_BYTES = 16 << 20  # the WAL is copied into the database this often

FOREIGN = 0  # origin number of activities whose ids are not ours (opaque; their seq is null)
LISTED = -1  # a run's send time when its ids are stored in the segment's ids column

# Schema version 1, the tables. Its segments held, per activity, a position, origin number, seq
# and length (int arrays): version 2 replaced them with runs (see _SEGMENTS_2).
_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE users (name BLOB PRIMARY KEY, secret BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE blocked (name BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE origins (no INTEGER PRIMARY KEY, origin TEXT NOT NULL UNIQUE,
                      high INTEGER NOT NULL, first_pos INTEGER NOT NULL, last_pos INTEGER NOT NULL);
CREATE TABLE segments (last_pos INTEGER PRIMARY KEY, first_pos INTEGER NOT NULL,
                       count INTEGER NOT NULL, foreign_count INTEGER NOT NULL,
                       ranges TEXT NOT NULL, positions BLOB NOT NULL, origin_nos BLOB NOT NULL,
                       seqs BLOB NOT NULL, lengths BLOB NOT NULL, ids TEXT NOT NULL,
                       data BLOB NOT NULL);
CREATE INDEX segments_with_foreign_ids ON segments (last_pos) WHERE foreign_count > 0;
CREATE TABLE peer_marks (peer BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
"""

# Activities are stored in segments: one row per commit (cut near SEGMENT_MAX), holding the lines
# concatenated as they were relayed and what indexes them, by *run*: the batches the relay
# recorded (one read of a connection each), not by activity. A row per activity cost 5-7 us of
# CPU each in SQLite here; arrays with an item per activity (schema version 1) still cost the
# writer 1-2 us per activity, reading back long-gone objects; a run costs the same for one
# activity or a thousand, so the writer's work per activity is C copying bytes. Recovery reads
# whole segments: what it sends anyway.
#   runs:   native int64 array (array module), 5 items per run: its first position, its count,
#           the origin number of its ids (FOREIGN, 0, for foreign ids), the seq of its first
#           id (the others follow it; 0 for foreign ids), and the send time (ms) all its ids
#           share when they are ``protocol.make_ids``' of it (our client batches, and most
#           batches relayed from a peer), else LISTED (-1)
#   ids:    JSON list of the ids that cannot be made again (of runs with send time LISTED), in
#           order (ASCII-escaped)
#   data:   the ACTIVITY_BROADCAST lines, each ending in "\n" (none holds another)
#   ranges: JSON {"origin number": [lowest seq, highest seq]} of the segment (own ids only)
_SEGMENTS_2 = """
CREATE TABLE segments (last_pos INTEGER PRIMARY KEY, first_pos INTEGER NOT NULL,
                       count INTEGER NOT NULL, foreign_count INTEGER NOT NULL,
                       ranges TEXT NOT NULL, runs BLOB NOT NULL, ids TEXT NOT NULL,
                       data BLOB NOT NULL);
CREATE INDEX segments_with_foreign_ids ON segments (last_pos) WHERE foreign_count > 0;
"""

# The per-origin summary (version 3). A commit that fsyncs brings the origins table's high and
# last_pos up to date (and writes the peer marks) and records in meta "origins_at" the last
# position they cover; commits in between write only their segments, whose ``ranges`` say the
# rest (``_origin_rows`` adds them up when reading). A small commit then rewrites one page, not
# three: a trickle of 20 activities/s wrote about 1 MB/s when every commit updated the origins
# and peer marks. Versions 1 and 2 updated origins every commit: all is covered.
_ORIGINS_COVERED_3 = ("INSERT OR REPLACE INTO meta VALUES "
                      "('origins_at', (SELECT coalesce(max(last_pos), 0) FROM segments))")

# MIGRATIONS[v] takes a database from schema version v to v + 1, inside one transaction.
MIGRATIONS = [
    lambda db: _execute_script(db, _SCHEMA_1),
    lambda db: _segments_as_runs(db),
    lambda db: db.execute(_ORIGINS_COVERED_3),
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used, or cannot keep a promise; the message is for people."""


@dataclass
class Loaded:
    """What a restarting server needs, read by ``Store.load``."""

    origin: str  # this server's origin identity, kept across restarts
    users: dict  # name -> secret
    blocked: set  # names deleted by a conflict, never accepted again
    history: list  # the newest (position, id, line bytes), oldest first
    last_position: int  # positions given to add_activity must be above this
    marks: dict  # origin -> highest sequence number stored (de-duplication and ACTIVITY_RETRIEVE)
    peer_marks: dict  # peer key -> value given to set_peer_mark


class Ticket:
    """Tells when the writes queued with it are committed: wait on it outside the state lock,
    or have the writer call you back (so a connection can go on reading pipelined requests and
    hold back only the replies that must follow the commit)."""

    __slots__ = ("_store", "_done", "_error", "_callbacks")

    def __init__(self, store):
        self._store = store
        self._done = False
        self._error = None
        self._callbacks = None

    def add_done_callback(self, callback):
        """Call ``callback(ticket)`` once the ticket is settled: at once if it is, else from the
        writer thread right after the commit (keep it short: it delays the next commit)."""
        with self._store._committed:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def error(self):
        """Why the store could not commit it (None if committed or not settled yet)."""
        return self._error

    def wait(self, timeout=None):
        """True once committed, False if ``timeout`` passed first; raises ``StoreError`` if the
        store could not commit it (a failing disk, a closed store)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._store._committed:
            while not self._done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._store._committed.wait(remaining)
        if self._error is not None:
            raise StoreError(self._error)
        return True

    def done(self):
        return self._done


# Queue entries: (kind, ...). The writer applies them in one transaction per batch.
_USER, _BLOCK, _ACTIVITY, _FLUSH = range(4)


class _Batch:
    """What the writer drained and has not committed yet (owned by the writer thread)."""

    def __init__(self):
        self.users = {}  # name -> secret
        self.blocked = {}  # name -> True (ordered set)
        self.activities = []  # recorded batches: (first position, ids, origin, first seq, data, sent)
        self.activity_count = 0  # the activities in them
        self.tickets = []

    def __bool__(self):
        return bool(self.users or self.blocked or self.activities or self.tickets)

    def entries(self):
        return len(self.users) + len(self.blocked) + self.activity_count


class Store:
    """The durable store in one data directory; see the module docstring. Open with ``open``."""

    @classmethod
    def open(cls, data_dir, disk_history=1_000_000, *, synchronous=SYNCHRONOUS,
             max_queue=MAX_QUEUE, retry_s=RETRY_S, gather_s=GATHER_S):
        """Lock ``data_dir`` (created if missing), open or create its database, migrate it and
        start the writer. Raises ``StoreError`` with a message naming the culprit."""
        data_dir = os.path.abspath(data_dir)
        lock = _lock_directory(data_dir)
        path = os.path.join(data_dir, DB_NAME)
        try:
            if not os.path.lexists(path):
                _create(path)
            _check_ours(path)
            db = _connect(path, synchronous)
            try:
                _migrate(db, path)
                return cls(data_dir, path, lock, db, disk_history, synchronous, max_queue,
                           retry_s, gather_s)
            except BaseException:
                db.close()
                raise
        except BaseException as exc:
            os.close(lock)
            if isinstance(exc, (sqlite3.Error, OSError)):  # a damaged file, a full disk...
                raise StoreError(f"cannot open the data store {path}: {exc}") from exc
            raise

    def __init__(self, data_dir, path, lock, db, disk_history, synchronous, max_queue, retry_s,
                 gather_s):
        self.data_dir = data_dir
        self.path = path
        self.disk_history = disk_history
        self._lock_fd = lock
        self._db = db  # the writer's connection: used by open() and then only the writer thread
        self._synchronous = synchronous
        self._max_queue = max_queue
        self._retry_s = retry_s
        self._gather_s = gather_s
        self._queue = deque()  # users, blocked names, flush tickets
        self._activities = deque()  # batches given to ``record``, for the writer
        self._recorded = 0  # activities given to ``record`` (written by the relay only)
        self._shed = 0  # of those, dropped by ``record`` as too many waited (the relay only)
        self._taken = 0  # of those, taken by the writer (the writer only)
        self._wake = threading.Event()  # something to write: the writer sleeps until then
        self._urgent = threading.Event()  # someone waits for a commit (or closing): commit now
        self._stop = threading.Event()
        self._committed = threading.Condition()  # notified after each commit attempt
        self._closed = False
        self._peer_marks = {}  # peer key -> value, written by callers, copied by the writer
        self._stored_peer_marks = {}  # what the database holds (writer only)
        # Counters: the writer's, and those of writes refused at the queue (callers' threads).
        self.counts = {"activities_committed": 0, "users_committed": 0, "commits": 0,
                       "failed_commits": 0, "dropped_activities": 0, "dropped_users": 0}
        self._refused_counts = {_USER: 0, _BLOCK: 0, _ACTIVITY: 0}
        self._failure = None  # why the last commit failed, None when healthy
        self._failing_since = None
        self._last_commit = None  # time.time() of the last successful commit
        self._waiting = 0  # entries drained by the writer and not yet committed
        self._writer_cpu = 0.0  # CPU seconds the writer thread has used
        self._origin_nos = dict(db.execute("SELECT origin, no FROM origins"))
        self._last_position = db.execute("SELECT coalesce(max(last_pos), 0) FROM segments").fetchone()[0]
        self._committed_last = self._last_position  # the last position committed (writer only)
        self._origins_at = _origins_covered(db)  # the last position the origins table covers
        self._pending_highs = {}  # origin number -> [last position, high] committed since then
        self._sync_now = synchronous  # the writer connection's PRAGMA synchronous
        self._last_sync = time.monotonic()  # of the last commit that fsynced the WAL
        self._unsynced = False  # a commit since then was not fsynced
        self.origin, first_seq = self._claim_sequence()
        self.first_seq = first_seq  # of this run: above the reservation of the previous one
        self._sequence = protocol.Sequence(first_seq)  # handed out by the relay
        self._extend_at = self._reserved - SEQ_BLOCK // 2
        self._writer = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._writer.start()

    def _claim_sequence(self):
        """Our origin (chosen on first use) and the first sequence number of this run: above
        every number any earlier run handed out. Reserves the next block before returning."""
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        origin = meta.get("origin") or protocol.new_origin()
        number = self._origin_nos.get(origin)
        high = _origin_rows(db)[number][2] if number is not None else 0
        first = max(int(meta.get("seq_reserved", 0)), high) + 1
        self._reserved = first - 1 + SEQ_BLOCK
        with _transaction(db):
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("origin", origin), ("seq_reserved", self._reserved)])
        return origin, first

    # --- recording verbs: no I/O, O(1); called under the server's state lock ----------------

    def take_seqs(self, count):
        """The sequence numbers for our next ``count`` activity ids, a range (never a number an
        earlier run handed out; the writer moves the reservation ahead when half of it is used)."""
        return self._sequence.take(count)

    def next_seq(self):
        """``take_seqs`` of one: the number itself."""
        return self.take_seqs(1)[0]

    def add_user(self, name, secret):
        """Record a user; returns a Ticket for REGISTER_SUCCESS to wait on (outside the lock)."""
        ticket = Ticket(self)
        if self._refused(_USER):
            ticket._error = self._refusal()
            ticket._done = True
            return ticket
        self._queue.append((_USER, name, secret, ticket))
        if not self._urgent.is_set():  # (an Event's set takes its lock: not once per user)
            self._hurry()
        return ticket

    def block_name(self, name):
        """Record a name deleted by a conflict (its user row goes too)."""
        if not self._refused(_BLOCK):
            self._queue.append((_BLOCK, name))
            self._wake.set()

    def record(self, first_position, ids, origin, first_seq, data, sent_ms=None):
        """Record a batch of activities as published (``State._publish_all``, or one activity:
        ``State._publish``): the relay's verb, one call per batch under the state lock, so
        it does nothing per activity and its arguments are taken as they are:
          first_position: the history number (``History``) of the first; the others follow it,
                one each; numbering continues from ``load().last_position``
          ids: a list of the activity ids, which nobody changes afterwards
          origin, first_seq: for ids of ours from one origin with consecutive seqs from
                ``first_seq`` (``protocol.parse_id``, ``parse_run``); both None for foreign ids
          data: their ACTIVITY_BROADCAST lines, bytes, each ending in "\\n", concatenated
          sent_ms: when every id is ``protocol.make_ids(origin, seqs, sent_ms)``'s: then the
                store keeps no copy of the ids (it makes them again when reading)
        Past ``max_queue`` activities waiting (a failing or far too slow disk) the oldest batch
        is dropped (counted), and after ``close`` the batch is: memory and relaying go on."""
        if self._closed:
            self._refused_counts[_ACTIVITY] += len(ids)
            return
        activities = self._activities
        activities.append((first_position, ids, origin, first_seq, data, sent_ms))
        if len(activities) == 1:  # the writer drains them all: only then may it be asleep
            self._wake.set()
        self._recorded += len(ids)
        if self._recorded - self._taken - self._shed > self._max_queue:
            try:
                self._shed += len(self._activities.popleft()[1])
            except IndexError:  # the writer took them all meanwhile
                pass

    def add_activity(self, position, activity_id, line, origin, seq):
        """``record`` of one activity, its arguments checked: positions must increase, the
        line must be one line ending in "\\n"."""
        if position <= self._last_position:
            raise ValueError(f"activity position {position} is not above {self._last_position}")
        if not line.endswith(b"\n") or line.count(b"\n") != 1:
            raise ValueError(f"an activity is one line ending in a newline, not {line[:80]!r}")
        self._last_position = position
        self.record(position, [activity_id], origin, seq, line)

    def set_peer_mark(self, peer_key, value):
        """Remember per-peer bookkeeping (say the last id received from ``peer_key``); only the
        latest value per key is written."""
        self._peer_marks[peer_key] = value
        self._wake.set()

    def share_peer_marks(self, marks):
        """Take ``marks`` (a dict: peer key -> value, changed by the caller under its lock) as the
        per-peer bookkeeping: each commit writes the keys whose value changed, within
        ``GATHER_S`` of the change. The caller then needs no call per change (a relayed activity
        costs one dict store)."""
        marks.update(self._peer_marks)
        self._peer_marks = marks

    @property
    def failing(self):
        """Whether the last commit failed (the disk is full, read-only or broken)."""
        return self._failure is not None

    def flush(self, timeout=None):
        """Wait (outside the state lock) until everything recorded before is committed; returns
        False on timeout, raises StoreError if the disk is failing."""
        ticket = Ticket(self)
        self._queue.append((_FLUSH, ticket))
        self._hurry()
        return ticket.wait(timeout)

    def _hurry(self):
        """Have the writer commit now, without gathering first."""
        self._urgent.set()
        self._wake.set()

    def _refused(self, kind):
        """Whether to drop a write: the store is closed, or the queue is full (a failing or
        far too slow disk). Durability goes; memory and the relay are unaffected."""
        if not self._closed and len(self._queue) < self._max_queue:
            return False
        self._refused_counts[kind] += 1
        return True

    def _refusal(self):
        if self._closed:
            return "the data store is closed"
        return f"the data store cannot keep up ({self._failure or 'the disk is too slow'})"

    # --- the writer thread -------------------------------------------------------------------

    def _run(self):
        # The writer sleeps until something is queued (the first activity after a drain wakes
        # it: one call per commit, not per activity) or an fsync falls due, then gathers for
        # GATHER_S unless a registration or a flush waits (or closing): at once then.
        batch = _Batch()
        while True:
            if self._failure is None:
                self._wake.wait(self._sleep_s())
                self._wake.clear()
                if not self._urgent.is_set():
                    self._urgent.wait(self._gather_s)
            else:
                self._stop.wait(self._retry_s)
            self._urgent.clear()
            stopping = self._stop.is_set()
            self._drain(batch)
            self._write(batch, final=stopping)
            self._waiting = batch.entries()
            self._writer_cpu = time.thread_time()
            if stopping:
                break
        if batch:
            log.error("data store %s closed with %d writes not stored (%s)", self.path,
                      batch.entries(), self._failure)
            self._fail_tickets(batch, self._failure or "the data store is closed")
        self._checkpoint()
        self._db.close()

    def _sleep_s(self):
        """How long the writer may sleep with nothing queued: until the fsync (and the origins
        summary) that commits without one fall due, or for good."""
        if self._unsynced or self._pending_highs or self._peer_marks != self._stored_peer_marks:
            return max(0.0, self._last_sync + SYNC_EVERY_S - time.monotonic())
        return None

    def _drain(self, batch):
        """Move what is queued into ``batch``. The other queue first: a flush ticket (or a user's)
        then covers every activity recorded before it."""
        queue = self._queue
        for _ in range(len(queue)):
            entry = queue.popleft()
            kind = entry[0]
            if kind == _USER:
                batch.users[entry[1]] = entry[2]
                batch.tickets.append(entry[3])
            elif kind == _BLOCK:
                batch.users.pop(entry[1], None)
                batch.blocked[entry[1]] = True
            else:
                batch.tickets.append(entry[1])
        activities = self._activities
        taken = []
        try:  # popleft to the end, not a copy and clear: the relay may append (or shed) meanwhile,
            while True:  # and wakes the writer only for an append to an empty queue
                taken.append(activities.popleft())
        except IndexError:
            pass
        if taken:
            count = sum(len(entry[1]) for entry in taken)
            self._taken += count
            last = _last_position(taken[-1])
            if last > self._last_position:
                self._last_position = last  # the end of what ``missing`` may read
            batch.activities += taken
            batch.activity_count += count

    def _write(self, batch, final=False):
        peer_marks = self._peer_marks.copy()  # one C call: atomic against writers
        changed = [(k, v) for k, v in peer_marks.items() if self._stored_peer_marks.get(k) != v]
        last_seq = self._sequence.last
        reserve = last_seq + SEQ_BLOCK if last_seq > self._extend_at else None
        # commits left without fsync by a stream that then stopped, and the summary they left
        # out (origins, peer marks): fsynced and written SYNC_EVERY_S on
        sync_due = ((self._unsynced or self._pending_highs or changed)
                    and (final or time.monotonic() - self._last_sync >= SYNC_EVERY_S))
        if not (batch or reserve or sync_due):
            return
        try:
            if self._failure is not None:  # a fresh connection after a failure
                self._db.close()
                self._db = _connect(self.path, self._synchronous)
                self._sync_now = self._synchronous
            origin_nos, summarized = self._commit(batch, changed, reserve, final)
        except sqlite3.Error as exc:
            self._failed(batch, exc)
            return
        except Exception as exc:  # a bug: say so loudly (once), and keep the server relaying
            if self._failure is None:
                log.exception("data store %s: unexpected error while writing", self.path)
            self._failed(batch, exc)
            return
        self._origin_nos = origin_nos
        if summarized:
            self._stored_peer_marks.update(changed)
        if reserve is not None:
            self._reserved, self._extend_at = reserve, reserve - SEQ_BLOCK // 2
        self.counts["commits"] += 1
        self.counts["activities_committed"] += batch.activity_count
        self.counts["users_committed"] += len(batch.users)
        self._last_commit = time.time()
        if self._failure is not None:
            log.warning("data store %s writes again after %.1f s of failure", self.path,
                        time.monotonic() - self._failing_since)
            self._failure = self._failing_since = None
        tickets = batch.tickets
        batch.__init__()
        self._settle(tickets, None)

    def _commit(self, batch, peer_marks, reserve, final=False):
        """One transaction with everything in ``batch``, and the summary (``peer_marks``, the
        origins' highs) if it fsyncs; returns the origin numbers to use next and whether the
        summary was written."""
        db = self._db
        origin_nos = dict(self._origin_nos)  # kept only if the transaction commits
        pending = {no: list(row) for no, row in self._pending_highs.items()}  # (likewise)
        last = _last_position(batch.activities[-1]) if batch.activities else self._committed_last
        now = time.monotonic()
        # What someone waits for (a registration, a flush), a blocked name and the reservation
        # are fsynced (and so is all the WAL before them); activities and peer marks alone only
        # once per SYNC_EVERY_S: a kill -9 loses none of them, a power cut at most that much.
        sync = (self._synchronous if batch.tickets or batch.users or batch.blocked or reserve
                or final or now - self._last_sync >= SYNC_EVERY_S else "NORMAL")
        if sync != self._sync_now:
            db.execute(f"PRAGMA synchronous = {sync}")
            self._sync_now = sync
        with _transaction(db):
            if batch.users:
                db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?)",
                               [(_blob(name), _blob(secret)) for name, secret in batch.users.items()])
            if batch.blocked:
                names = [(_blob(name),) for name in batch.blocked]
                db.executemany("DELETE FROM users WHERE name = ?", names)
                db.executemany("INSERT OR IGNORE INTO blocked VALUES (?)", names)
            summarize = sync == self._synchronous
            if batch.activities:
                self._insert_activities(db, batch.activities, origin_nos, pending)
                # segments about to go past disk_history must be summarized first
                summarize = summarize or last - self.disk_history > self._origins_at
            if reserve is not None:
                db.execute("UPDATE meta SET value = ? WHERE key = 'seq_reserved'", (reserve,))
            if summarize:
                if pending:
                    db.executemany("UPDATE origins SET last_pos = max(last_pos, ?), "
                                   "high = max(high, ?) WHERE no = ?",
                                   [(*row, no) for no, row in pending.items()])
                if peer_marks:
                    db.executemany("INSERT OR REPLACE INTO peer_marks VALUES (?, ?)",
                                   [(_blob(key), _blob(value)) for key, value in peer_marks])
                # (and the one row a commit for the fsync alone writes)
                if last != self._origins_at or not (batch or reserve or peer_marks):
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('origins_at', ?)", (last,))
            if batch.activities:
                _delete_past(db, last - self.disk_history)
        if sync == self._synchronous:
            self._last_sync, self._unsynced = now, False
        else:
            self._unsynced = True
        self._committed_last = last
        if summarize:
            self._origins_at, self._pending_highs = last, {}
        else:
            self._pending_highs = pending
        return origin_nos, summarize

    def _insert_activities(self, db, batches, origin_nos, highs):
        """A segment per SEGMENT_MAX activities of ``batches``; new origins get their number in
        ``origin_nos``, and ``highs`` (origin number -> [last position, highest seq]) grows
        to cover the segments."""
        # Per batch a little Python; per activity only C (joining ids, copying bytes).
        for part in _segments(batches):
            firsts, ids, origins, first_seqs, data, sents = zip(*part)
            for origin in sorted(set(origins) - origin_nos.keys() - {None}):
                origin_nos[origin] = db.execute(
                    "INSERT INTO origins (origin, high, first_pos, last_pos) VALUES (?, 0, ?, 0)",
                    (origin, firsts[origins.index(origin)])).lastrowid
            numbers = list(map({**origin_nos, None: FOREIGN}.__getitem__, origins))
            counts = list(map(len, ids))
            seqs = [seq or 0 for seq in first_seqs]
            ranges = {}
            foreign = 0
            for number, seq, count in zip(numbers, seqs, counts):
                if number == FOREIGN:
                    foreign += count
                else:
                    low, high = ranges.get(number, (seq, seq + count - 1))
                    ranges[number] = [min(low, seq), max(high, seq + count - 1)]
            sents = [LISTED if sent is None else sent for sent in sents]
            listed = [run_ids for run_ids, sent in zip(ids, sents) if sent == LISTED]
            if not listed:
                ids_json = "[]"
            elif foreign:
                ids_json = _json(list(itertools.chain.from_iterable(listed)))
            else:  # our ids need no escaping (protocol's _OWN_ID): as json.dumps would write them
                ids_json = '["' + '","'.join(itertools.chain.from_iterable(listed)) + '"]'
            runs = array(_INT64, itertools.chain.from_iterable(zip(firsts, counts, numbers, seqs, sents)))
            last_pos = _last_position(part[-1])
            db.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (last_pos, firsts[0], sum(counts), foreign, _json(ranges), runs, ids_json,
                        b"".join(data)))
            for number, (_low, high) in ranges.items():
                row = highs.setdefault(number, [last_pos, high])
                row[0], row[1] = last_pos, max(high, row[1])

    def _failed(self, batch, exc):
        now = time.monotonic()
        reason = f"{type(exc).__name__}: {exc}"
        if self._failure is None:
            self._failing_since = self._last_failure_log = now
            log.error("data store %s cannot write (%s): users and activities are no longer "
                      "stored; the server keeps relaying; retrying every %s s",
                      self.path, reason, self._retry_s)
        elif now - self._last_failure_log >= LOG_EVERY_S:
            self._last_failure_log = now
            log.error("data store %s still cannot write after %.0f s (%s); %d writes waiting, "
                      "%d activities dropped", self.path, now - self._failing_since, reason,
                      batch.entries(), self.counts["dropped_activities"])
        self._failure = reason
        self.counts["failed_commits"] += 1
        self._fail_tickets(batch, f"the data store cannot write: {reason}")
        excess = batch.entries() - self._max_queue
        if excess > 0:  # keep the newest activities (whole batches); users and blocked names go last
            dropped = batches = 0
            while dropped < excess and batches < len(batch.activities):
                dropped += len(batch.activities[batches][1])
                batches += 1
            del batch.activities[:batches]
            batch.activity_count -= dropped
            self.counts["dropped_activities"] += dropped
            for name in list(itertools.islice(batch.users, max(0, excess - dropped))):
                del batch.users[name]
                self.counts["dropped_users"] += 1

    def _fail_tickets(self, batch, reason):
        tickets, batch.tickets = batch.tickets, []
        self._settle(tickets, reason)

    def _settle(self, tickets, error):
        """Mark ``tickets`` committed (or failed with ``error``), wake waiters, run callbacks."""
        callbacks = []
        with self._committed:
            for ticket in tickets:
                ticket._error = error
                ticket._done = True
                if ticket._callbacks:
                    callbacks += [(callback, ticket) for callback in ticket._callbacks]
                    ticket._callbacks = None
            self._committed.notify_all()
        for callback, ticket in callbacks:
            try:
                callback(ticket)
            except Exception:  # the caller's bug must not stop durability for everyone
                log.exception("data store %s: a commit callback failed", self.path)

    def _checkpoint(self):
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("data store %s: final checkpoint failed (%s)", self.path, exc)

    # --- reads: outside the state lock -------------------------------------------------------

    def load(self, history):
        """The committed state a restarting server starts from; ``history`` is how many of the
        newest activities to read (the in-memory ``--history``), never the whole disk. Raises
        StoreError if the database cannot be read (a damaged file)."""
        try:
            return self._load(history)
        except (sqlite3.Error, ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read the data store {self.path}: {exc}; move it away "
                             "or choose another --data-dir") from exc

    def _load(self, history):
        with _reader(self.path) as db, _snapshot(db):
            origins = _origins(db)
            users = {_text(name): _text(secret)
                     for name, secret in db.execute("SELECT name, secret FROM users")}
            blocked = {_text(name) for (name,) in db.execute("SELECT name FROM blocked")}
            newest = []
            wanted = history
            for segment in db.execute(f"SELECT {_SEGMENT_COLUMNS} FROM segments ORDER BY last_pos DESC"):
                if wanted <= 0:
                    break
                rows = _unpack(origins, *segment)[-wanted:]
                wanted -= len(rows)
                newest.append([(position, activity_id, line)
                               for position, activity_id, _no, _seq, line in rows])
            marks = {origins[no]: high for no, (_first, _last, high) in _origin_rows(db).items()}
            peer_marks = {_text(key): _text(value)
                          for key, value in db.execute("SELECT peer, value FROM peer_marks")}
        history_entries = [entry for rows in reversed(newest) for entry in rows]
        return Loaded(origin=self.origin, users=users, blocked=blocked, history=history_entries,
                      last_position=self._last_position, marks=marks, peer_marks=peer_marks)

    def position_of(self, activity_id):
        """The stored position of ``activity_id``, or None if it is not on disk. (A scan of the
        segments' indexes in SQLite: for the rare ``after`` that memory no longer holds.)"""
        parsed = protocol.parse_id(activity_id)
        with _reader(self.path) as db:
            if parsed is None:
                rows = db.execute("SELECT runs, ids FROM segments WHERE foreign_count > 0 "
                                  "AND instr(ids, ?) ORDER BY last_pos DESC",
                                  (_json(activity_id),))
            else:
                origin, seq, _sent = parsed
                number = db.execute("SELECT no FROM origins WHERE origin = ?", (origin,)).fetchone()
                if number is None:
                    return None
                key = f'$."{number[0]}"'
                rows = db.execute("SELECT runs, ids FROM segments WHERE json_extract(ranges, ?) <= ? "
                                  "AND json_extract(ranges, ?) >= ? ORDER BY last_pos DESC",
                                  (key + "[0]", seq, key + "[1]", seq))
            origins = _origins(db)
            for runs, ids in rows:
                positions, stored_ids, _numbers, _seqs = _index(origins, runs, ids)
                for position, stored_id in zip(positions, stored_ids):
                    if stored_id == activity_id:
                        return position
        return None

    def missing(self, marks=None, after=0, below=None, start=0):
        """Stored activities a peer lacks, in position order, as lists (a segment's: about
        SEGMENT_MAX long at most) of (position, id, line); only positions from ``start`` and
        below ``below`` (what memory lacks).

        The rule is ``recovery.missing_entries``'s: without ``marks``, everything after
        position ``after``; with marks (origin -> highest seq the peer holds), our ids above the
        peer's mark for their origin (all of an origin it has no mark for) and foreign ids after
        position ``after``. Reading starts at the first segment that can hold such an activity,
        found from the segments' seq ranges newest first, so a peer that lacks little costs
        little. Each read is its own short transaction: a long refill does not pin the WAL."""
        end = below if below is not None else self._last_position + 1
        with _reader(self.path) as db:
            if marks:
                with _snapshot(db):
                    need_above = {no: marks.get(origin, 0) for no, origin in _origins(db).items()}
                    first = _first_needed(db, need_above, after)
            else:
                need_above = None
                first = after + 1
            start = None if first is None else max(first, start)
            while start is not None and start < end:
                segments = db.execute(f"SELECT last_pos, {_SEGMENT_COLUMNS} FROM segments "
                                      "WHERE last_pos >= ? ORDER BY last_pos LIMIT 8",
                                      (start,)).fetchall()
                if not segments:
                    return
                origins = _origins(db)  # (the writer may have added one since the last read)
                for last_pos, *columns in segments:
                    picked = [(position, activity_id, line)
                              for position, activity_id, no, seq, line in _unpack(origins, *columns)
                              if start <= position < end
                              and (need_above is None or no == FOREIGN and position > after
                                   or no != FOREIGN and seq > need_above.get(no, 0))]
                    if picked:
                        yield picked
                    start = last_pos + 1

    def status(self):
        """Plain data for the server's status: healthy or failing, and why."""
        refused = self._refused_counts
        return {
            "path": self.path,
            "failing": self._failure is not None,
            "error": self._failure,
            "failing_for_s": (None if self._failing_since is None
                              else round(time.monotonic() - self._failing_since, 1)),
            "queued": len(self._queue) + self._recorded - self._taken - self._shed + self._waiting,
            "writer_cpu_s": round(self._writer_cpu, 3),
            "last_commit": self._last_commit,
            "commits": self.counts["commits"],
            "failed_commits": self.counts["failed_commits"],
            "activities_committed": self.counts["activities_committed"],
            "users_committed": self.counts["users_committed"],
            "dropped_activities": self.counts["dropped_activities"] + refused[_ACTIVITY] + self._shed,
            "dropped_users": self.counts["dropped_users"] + refused[_USER],
            "dropped_blocked": refused[_BLOCK],
        }

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self):
        """Commit everything queued, stop the writer and release the directory."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._hurry()
        self._writer.join()
        os.close(self._lock_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _first_needed(db, need_above, after):
    """The first position of the oldest segment holding an activity a peer with these marks
    lacks, or None. Foreign ids: the first segment with one after ``after`` (an index). Our ids:
    a walk over the segments' seq ranges, newest first, until every origin is settled: by a
    segment holding one of its seqs at or below the peer's mark (per origin, seqs grow with
    position), or by being older than the origin's first stored activity."""
    row = db.execute("SELECT first_pos FROM segments WHERE foreign_count > 0 AND last_pos > ? "
                     "ORDER BY last_pos LIMIT 1", (after,)).fetchone()
    start = row[0] if row else None
    oldest = db.execute("SELECT first_pos FROM segments ORDER BY last_pos LIMIT 1").fetchone()
    if oldest is None:
        return None
    origins = _origin_rows(db)
    # Settled from the start: an origin the peer holds all of, or with nothing left on disk.
    unsettled = {no for no, mark in need_above.items()
                 if no in origins and origins[no][2] > mark and origins[no][1] >= oldest[0]}
    if not unsettled:
        return start
    for first_pos, last_pos, ranges in db.execute(
            "SELECT first_pos, last_pos, ranges FROM segments ORDER BY last_pos DESC"):
        unsettled = {no for no in unsettled if origins[no][0] <= last_pos}
        if not unsettled:
            break
        for key, (low, high) in json.loads(ranges).items():
            no = int(key)
            if no in unsettled:
                if high > need_above[no]:
                    start = first_pos if start is None else min(start, first_pos)
                if low <= need_above[no]:
                    unsettled.discard(no)
    return start


def _delete_past(db, cutoff):
    """Drop the segments at or below ``cutoff``: whole segments, so the disk keeps at most
    disk_history activities plus the rest of the oldest segment."""
    if cutoff > 0:
        db.execute("DELETE FROM segments WHERE last_pos <= ?", (cutoff,))


def _origins_covered(db):
    """The last position the origins table covers (meta "origins_at", see _ORIGINS_COVERED_3)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'origins_at'").fetchone()
    return row[0] if row else 0


def _origin_rows(db):
    """{origin number: [first position, last position, highest seq]} as committed: the origins
    table and the seq ranges of the segments stored after what it covers. Call it inside one
    read transaction (``_snapshot``), so the two agree."""
    rows = {no: [first, last, high] for no, first, last, high in
            db.execute("SELECT no, first_pos, last_pos, high FROM origins")}
    for last_pos, ranges in db.execute("SELECT last_pos, ranges FROM segments WHERE last_pos > ?",
                                       (_origins_covered(db),)):
        for key, (_low, high) in json.loads(ranges).items():
            row = rows[int(key)]
            row[1], row[2] = max(row[1], last_pos), max(row[2], high)
    return rows


def _json(value):
    """Compact JSON, ASCII: a lone surrogate in a foreign id (valid JSON) survives it."""
    return json.dumps(value, separators=(",", ":"))


def _blob(text):
    """A name, secret or peer value as stored: UTF-8 bytes, lone surrogates (which JSON lets a
    peer send) included, which SQLite's TEXT would refuse and so fail every later commit."""
    return text.encode("utf-8", "surrogatepass")


def _text(blob):
    return blob.decode("utf-8", "surrogatepass")


_INT32, _INT64 = "i", "q"
assert array(_INT32).itemsize == 4 and array(_INT64).itemsize == 8


def _ints(kind, blob):
    values = array(kind)
    values.frombytes(blob)
    return values


def _last_position(batch):
    """The position of a recorded batch's last activity (they are numbered one each)."""
    return batch[0] + len(batch[1]) - 1


def _segments(batches):
    """``batches`` cut into segments: lists of whole batches of at most SEGMENT_MAX activities
    in all, unless one batch alone holds more."""
    part, size = [], 0
    for entry in batches:
        if part and size + len(entry[1]) > SEGMENT_MAX:
            yield part
            part, size = [], 0
        part.append(entry)
        size += len(entry[1])
    if part:
        yield part


def _run_items(runs):
    """A segment's runs (its blob) as (first position, count, origin number, first seq, sent)."""
    values = _ints(_INT64, runs)
    return zip(values[0::5], values[1::5], values[2::5], values[3::5], values[4::5])


_SEGMENT_COLUMNS = "runs, ids, data"


def _origins(db):
    """{origin number: origin}, for ``_unpack``."""
    return dict(db.execute("SELECT no, origin FROM origins"))


def _unpack(origins, runs, ids, data):
    """A segment's activities (its _SEGMENT_COLUMNS): [(position, id, origin number, seq, line)];
    ``origins`` is ``_origins``'s (ids of ours are made again from their runs)."""
    lines = data.split(b"\n")
    lines.pop()  # after the last "\n"
    return list(zip(*_index(origins, runs, ids), [line + b"\n" for line in lines]))


def _index(origins, runs, ids):
    """A segment's positions, ids, origin numbers and seqs, as four lists."""
    positions, all_ids, numbers, seqs = [], [], [], []
    listed = iter(json.loads(ids))
    for first, count, number, seq, sent in _run_items(runs):
        positions += range(first, first + count)
        numbers += itertools.repeat(number, count)
        if number == FOREIGN:
            seqs += itertools.repeat(0, count)
        else:
            seqs += range(seq, seq + count)
        if sent == LISTED:
            all_ids += itertools.islice(listed, count)
        else:
            all_ids += protocol.make_ids(origins[number], range(seq, seq + count), sent)
    return positions, all_ids, numbers, seqs


def _segments_as_runs(db):
    """Schema version 1 to 2: each segment's per-activity arrays become runs (_SEGMENTS_2)."""
    db.execute("ALTER TABLE segments RENAME TO segments_1")
    db.execute("DROP INDEX segments_with_foreign_ids")
    _execute_script(db, _SEGMENTS_2)
    old = db.execute("SELECT last_pos, first_pos, count, foreign_count, ranges, positions, "
                     "origin_nos, seqs, lengths, ids, data FROM segments_1 ORDER BY last_pos")
    for last, first, count, foreign, ranges, positions, numbers, seqs, lengths, ids, data in old:
        runs = []
        for position, number, seq in zip(_ints(_INT64, positions), _ints(_INT32, numbers),
                                         _ints(_INT64, seqs)):
            if runs and position == runs[-5] + runs[-4] and number == runs[-3] and (
                    number == FOREIGN or seq == runs[-2] + runs[-4]):
                runs[-4] += 1
            else:
                runs += [position, 1, number, seq if number != FOREIGN else 0, LISTED]
        ends = list(itertools.accumulate(_ints(_INT32, lengths)))
        lines = [data[start:end].rstrip(b"\n") + b"\n" for start, end in zip([0] + ends[:-1], ends)]
        db.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (last, first, count, foreign, ranges, array(_INT64, runs), ids, b"".join(lines)))
    db.execute("DROP TABLE segments_1")


# --- opening a data directory -------------------------------------------------------------------

def _lock_directory(data_dir):
    """Create ``data_dir`` if needed and lock it for this process; returns the lock's fd."""
    try:
        os.makedirs(data_dir, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"data directory {data_dir} is not a directory") from None
    except OSError as exc:
        raise StoreError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot use data directory {data_dir}: {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"data directory {data_dir} is in use by another activitynet server "
                         f"(pid {holder}); give each server its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _create(path):
    """A new database at schema version 0 (``_migrate`` builds it), under a temporary name and
    renamed into place, so ``path`` never holds a half-made file."""
    temporary = path + ".new"
    if os.path.lexists(temporary):
        os.unlink(temporary)  # left by a crash during an earlier creation, in our locked directory
    db = sqlite3.connect(temporary, isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # first: any write fixes it
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA journal_mode = WAL")
    finally:
        db.close()  # the last connection checkpoints: everything is in the main file
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    _fsync_directory(os.path.dirname(path))


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_ours(path):
    """Refuse, without writing a byte, a file that is not an activitynet database."""
    advice = "it was left untouched: move it away or choose another --data-dir"
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreError(f"{path} is not an activitynet database (not an SQLite file); {advice}")
    if int.from_bytes(header[68:72], "big") != APPLICATION_ID:
        raise StoreError(f"{path} is an SQLite database of another program, not an activitynet "
                         f"database; {advice}")


def _execute_script(db, script):
    """Each statement of ``script`` (``executescript`` would commit the open transaction)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _connect(path, synchronous):
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    # Debian's SQLite zeroes every freed page (SECURE_DELETE): past disk_history each segment
    # dropped was read, zeroed and written to the WAL and the database again, 250 bytes more
    # written per activity (690 against 440) and a sixth more of the writer's CPU. FAST still
    # zeroes what is deleted inside pages that are written anyway (a blocked user's secret).
    db.execute("PRAGMA secure_delete = FAST")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]  # an older database's may be 4 KiB
    db.execute(f"PRAGMA wal_autocheckpoint = {max(1, WAL_CHECKPOINT_BYTES // page_size)}")
    return db


def _migrate(db, path):
    """Bring the database to SCHEMA_VERSION, refusing one from a newer version untouched."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer activitynet (schema version {version}; "
                         f"this one reads up to {SCHEMA_VERSION}); it was left untouched: upgrade "
                         "activitynet or choose another --data-dir")
    if version == SCHEMA_VERSION:
        return
    with _transaction(db):
        for step in range(version, SCHEMA_VERSION):
            MIGRATIONS[step](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if version:
        log.warning("data store %s migrated from schema version %d to %d", path, version,
                    SCHEMA_VERSION)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (a connection in autocommit mode)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error says more; SQLite may have rolled back already


class _snapshot:
    """One read transaction: the statements inside see the same commit."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN")

    def __exit__(self, *exc_info):
        if self.db.in_transaction:  # (it reads only: ending it is all COMMIT does)
            self.db.execute("COMMIT")


class _reader:
    """A short-lived read-only connection for one caller's thread."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout = 5000")
        self.db.execute("PRAGMA query_only = ON")
        return self.db

    def __exit__(self, *exc_info):
        self.db.close()
