"""The one shared state of a server, behind one lock.

Everything several connections share lives here: the sessions (who is on each connection), the
logged-in clients, the server links, and, through collaborators, the user directory
(``users.Users``) and the activity history with its de-duplication (``history``). Its methods
are the only way that state changes; each runs under the state lock and decides *what* every
connection is sent, and in which order. ``State`` never sees a socket: it queues bytes on the
sessions' outboxes.

The lock rule, by construction: every verb takes the lock through ``_locked``, an ``Outgoing``
section holding the lock: the section opens first and the lock is released before it ends. Queued bytes are
written (and slow consumers closed) only when the outermost section ends, so no socket is
written, shut down or closed while the lock is held, whoever calls, with nothing to remember.

Ordering guarantees rest on two rules kept here:
- history, and the order each peer is sent activities in, are decided under the lock;
- a new server link receives live activities only once it has been sent its backlog (see
  ``recovery``), so no activity overtakes an older one from its sender.

The counters since start (``stats.Counters``, read by the monitor) are bumped here, under the
lock, where the events are decided; a connection's bytes are counted by the connection itself and
added when its session closes (``traffic`` sums both).
"""

import collections
import itertools
import logging
import sqlite3
import threading
import time

from . import netmap, protocol, recovery, stats
from .connection import SLOW_CONSUMER, Outgoing
from .credentials import same_secret
from .dedup import Intake
from .history import History
from .netmap import Lineage, NetMap, Seeker
from .protocol import AuthenticationFail, InvalidMessage, LoginFailed, Refused, RegisterFailed, encode
from .recovery import Step
from .session import CLIENT, SERVER, Session
from .store import StoreError
from .users import DurableUsers, Users

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# Servers' clocks may differ by about this much (seconds). An activity is delivered to the clients
# that were logged in when it was sent, give or take this slack: a client logging in to a server
# that is being refilled after a restart, a late join or a partition is not sent old history.
CLOCK_SLACK = 5.0
# A link's catch-up worker waits between chunks until its outbox holds less than this: a slow
# peer does not pull the whole history into memory (and stays far below the slow-consumer limit).
CATCH_UP_LOW_WATER = 1024 * 1024
CATCH_UP_POLL = 0.002  # seconds between looks at a full outbox
# A registration's reply waits at most this long for its commit (see ``send_held``).
COMMIT_WAIT = 30.0


class State:
    """Sessions, clients, links, users and history of one server; see the module docstring."""

    def __init__(self, hostname, port, history_size=100_000, origin=None, clock_slack=CLOCK_SLACK,
                 users=None, history=None, outgoing=None, lock=None, counters=None, store=None,
                 joins=(), grace=netmap.GRACE, catch_up_runner=None):
        """``store``: a ``store.Store`` (``--data-dir``) to start from and record into; without
        one everything is in memory and a new server starts empty. ``joins``, ``grace``: see
        the network map below. ``catch_up_runner(session)`` starts a link's catch-up worker,
        which calls ``catch_up(session)`` (the server starts a thread); without one a backlog is
        sent at once, in the lock hold that decides it (unit tests on plain data)."""
        self.outgoing = outgoing or Outgoing()
        self._locked = self.outgoing.holding(lock or threading.RLock())  # see the module doc
        self.clock_slack = clock_slack
        self.counters = stats.Counters() if counters is None else counters
        self._closed_bytes = [0, 0]  # bytes in, out of the connections already closed
        self._newest_login = 0.0  # wall-clock time of the latest login (only ever grows)
        self.hostname = hostname
        self.port = port
        self.origin = origin or protocol.new_origin()
        self._take_seqs = protocol.Sequence().take  # a data store hands them out instead
        self._session_ids = itertools.count(1)
        self._users = Users() if users is None else users
        self._history = History(history_size) if history is None else history
        self._intake = Intake(max(4 * history_size, 10_000))  # any-path de-duplication and order
        # The network map and the re-attachment rule (``netmap``; issue 9). ``joins``: the
        # -rh/--join servers as "host:port", in order; a server with none is a settled root.
        started_ms = int(time.time() * 1000)
        self.me = f"{hostname}:{port}"
        self.lineage = Lineage.joining(self.me, started_ms) if joins else Lineage.settled(self.me)
        self.netmap = NetMap(self.me, started_ms, self.lineage)
        self.seeker = Seeker(joins, grace)
        self.monitor = None  # "host:port" of our monitor endpoint, if any: see set_monitor
        self.resumes = None  # (our origin, first seq) when a durable counter resumed above 1
        self._resumes_seen = set()  # (origin, first) of others already applied to the intake
        self._parent = None  # the session of the link to our parent: we dialled it, it accepted
        self._dial_alone = False  # our pending dial says alone: refuse every diallers meanwhile
        self._map_gen = 0  # bumped when the map changes; a link is sent the map when behind
        self._peers = recovery.PeerMemory(max(history_size, 10_000))
        self._store = store
        self._catch_up_runner = catch_up_runner
        if store is not None:
            self._restore(store, history_size)
        self._sessions = {}  # every open session (dict as ordered set)
        self._clients = {}  # logged-in client sessions, in login order
        self._names = collections.Counter()  # username -> its logged-in sessions (for the monitor)
        self._links = {}  # authenticated server sessions -> their recovery.Link

    def batch(self):
        """A section holding the state lock across several verbs (each takes it again: it is
        reentrant), for a reader thread's batch of lines: one hold instead of one per line,
        and what the batch sends is queued once per connection (see ``connection.Outgoing``).
        Keep batches bounded: other connections wait for the lock meanwhile."""
        return self._locked

    # --- sessions --------------------------------------------------------------------------

    def open_session(self, outbox, address, secure=False):
        """A new connection (``secure``: over TLS); returns its Session (see ``session``)."""
        with self._locked:
            session = Session(next(self._session_ids), outbox, address, secure)
            self._sessions[session] = True
            return session

    def close_session(self, session):
        """Forget a closed connection: a client's load, a server's link."""
        with self._locked:
            if self._sessions.pop(session, None) is None:
                return
            outbox = session.outbox
            self._closed_bytes[0] += getattr(outbox, "bytes_in", 0)
            self._closed_bytes[1] += getattr(outbox, "bytes_out", 0)
            if getattr(outbox, "close_reason", None) == SLOW_CONSUMER:
                self.counters.slow_consumers_cut += 1
            if self._clients.pop(session, None) is not None:
                self._names[session.username] -= 1
                if not self._names[session.username]:
                    del self._names[session.username]
                self._announce_load()
            link = self._links.pop(session, None)
            if link is not None:
                if link.live and link.peer_key is not None:  # what it held (recovery rule 5)
                    self._peers.link_ended(link.peer_key, self._history.last_no)
                if session is self._parent:  # an orphan root now; its subtree hears it at once
                    self._parent = None
                    self.seeker.parent_lost(self.lineage, time.monotonic(), link.peer_key)
                    self.lineage = self.lineage.orphaned()
                self._map_update()

    # --- clients ---------------------------------------------------------------------------

    def register_user(self, session, username, secret):
        """With a data store, REGISTER_SUCCESS is held on the session until the user is
        committed, and sent by ``send_held``; see there. NEW_USER goes to peers at once."""
        with self._locked:
            if session.logged_in:
                raise InvalidMessage(f"REGISTER is not allowed once logged in (logged in as {session.username})",
                                     kind="not_allowed")
            if username == ANONYMOUS or username in self._users:
                raise RegisterFailed(f"{username} is already registered with the system")
            if self._users.is_blocked(username):
                raise RegisterFailed(f"{username} cannot be registered: it was registered twice "
                                     "with different secrets and is blocked network-wide")
            if self._store is not None and self._store.failing:
                raise RegisterFailed(f"{username} cannot be registered now: this server cannot "
                                     "store new users (its disk is failing); try again later")
            session.role = CLIENT
            ticket = self._users.add(username, secret)
            self.counters.registrations += 1
            reply = encode(protocol.info_message("REGISTER_SUCCESS", f"register success for {username}"))
            if ticket is None:
                session.send(reply)
            else:
                if session.held is None:
                    session.held = []
                session.held.append((ticket, reply, username))
            self._to_links(encode(protocol.new_user(username, secret)))

    def send_held(self, session, timeout=COMMIT_WAIT):
        """Send the REGISTER_SUCCESS replies held on ``session``, once their users are committed.

        Why this keeps the promise and the order: the reply is not queued at all before the
        commit (a queued reply could be flushed by another thread, such as the poller finishing
        an earlier write). The connection's reader thread calls this before it handles any
        command other than REGISTER on that connection, before its last reply, and at the end
        of each batch of lines it read. Until then nothing else can be sent to the connection:
        it is not logged in (REGISTER is refused once logged in), and only logged-in clients are
        sent anything by other threads. So a pipelined REGISTER, LOGIN gets REGISTER_SUCCESS
        first, and a batch of N pipelined REGISTERs waits for about one group commit, not N
        (``store.Ticket``). Raises RegisterFailed (the earlier replies sent) for a user the
        store could not commit; that user stays known in memory and to peers until a restart."""
        held, session.held = session.held, None
        if not held:
            return
        failure = None
        try:  # tickets settle in the order they were taken: the last one settles last
            if not held[-1][0].wait(timeout):
                failure = held[0][2], f"the data store did not commit it within {timeout:.0f} s"
        except StoreError:
            pass  # the first failed one is found below
        for ticket, _reply, username in held:
            if failure is None and ticket.error() is not None:
                failure = username, ticket.error()
        with self._locked:
            for _ticket, reply, username in held:
                if failure and failure[0] == username:
                    raise RegisterFailed(f"{username} could not be stored on this server's disk "
                                         f"({failure[1]}); it will not survive a restart of this server")
                session.send(reply)

    def login(self, session, username, secret):
        """Log ``session`` in; returns a (hostname, port) to redirect it to, or None."""
        with self._locked:
            if session.logged_in:
                raise InvalidMessage(f"LOGIN on a connection already logged in as {session.username}",
                                     kind="not_allowed")
            if username != ANONYMOUS:
                refusal = login_refusal(username, self._users.secret_of(username), secret)
                if refusal is not None:
                    self.counters.login_failures += 1
                    raise LoginFailed(refusal)
            session.role = CLIENT
            session.send(encode(protocol.info_message("LOGIN_SUCCESS", f"logged in as user {username}")))
            target = redirect_target(len(self._clients) + 1, self._neighbour_loads())
            if target is not None:
                self.counters.redirects += 1
                return target
            self.counters.logins += 1
            session.logged_in = True
            session.logged_in_at = time.time()
            self._newest_login = max(self._newest_login, session.logged_in_at)
            session.username = username
            session.secret = secret
            self._clients[session] = True
            self._names[username] += 1
            self._announce_load()
            return None

    def client_activity(self, session, username, secret, activity):
        """An ACTIVITY_MESSAGE from a client: authenticate it, stamp it, broadcast it."""
        with self._locked:
            self._check_sender(session, username, secret)
            activity["authenticated_user"] = username
            seq = self._take_seqs(1)[0]
            sent_ms = int(time.time() * 1000)
            activity_id = protocol.make_id(self.origin, seq, sent_ms)
            line = encode(protocol.activity_broadcast(activity, activity_id))
            self._intake.sent(self.origin, seq)
            self.counters.activities_from_clients += 1
            self._publish(activity_id, line, source=None, origin=self.origin, seq=seq, sent_ms=sent_ms)

    def client_activities(self, session, messages):
        """``client_activity`` for each of ``messages`` (ACTIVITY_MESSAGE structs of one read,
        ``schemas.decode_activities``), in order, in one hold of the lock: stamped together and
        encoded in one call, then delivered and forwarded as one write per connection. One that
        fails the checks raises as ``client_activity`` would, after those before it are out."""
        with self._locked:
            name = session.username
            anonymous = name == ANONYMOUS
            count = 0
            if session.logged_in:
                for message in messages:
                    if message.username != name or not (anonymous or same_secret(message.secret, session.secret)):
                        break
                    count += 1
            if count:
                self._stamp_and_publish([message.activity for message in messages[:count]], name)
            if count < len(messages):
                message = messages[count]
                self._check_sender(session, message.username, message.secret)

    def _check_sender(self, session, username, secret):
        """Raise AuthenticationFail unless ``session`` may send an activity as ``username``."""
        if not session.logged_in:
            raise AuthenticationFail("ACTIVITY_MESSAGE before LOGIN: log in first")
        if username != session.username:
            raise AuthenticationFail(f"the username {username} is not the one logged in on "
                                     f"this connection ({session.username})")
        if username != ANONYMOUS and not same_secret(secret, session.secret):
            raise AuthenticationFail(f"the secret does not match the one of user {username}")

    def _stamp_and_publish(self, activities, username):
        """Our own activities, sent by ``username``: numbered, stamped and published in order."""
        origin = self.origin
        seqs = self._take_seqs(len(activities))
        sent_ms = int(time.time() * 1000)
        ids = protocol.make_ids(origin, seqs, sent_ms)
        for activity in activities:
            activity["authenticated_user"] = username
        data = protocol.encode_lines(protocol.activity_broadcasts(activities, ids))
        self._intake.sent_all(origin, seqs)
        self.counters.activities_from_clients += len(ids)
        self._publish_all(ids, data.splitlines(True), data, None, origin, seqs, sent_ms)

    def load(self):
        with self._locked:
            return len(self._clients)

    # --- server links (the steps are recovery's; see recovery.Link) -------------------------

    def dial_link(self, session, peer_key, secret):
        """A link we dialled to ``peer_key``: the initiator's whole opening, in one step."""
        with self._locked:
            link = self._new_link(session, recovery.Link.dialled(peer_key, self._history.last_no, time.monotonic()))
            self._take(session, link.open(), secret=secret)

    def accept_link(self, session):
        """A peer's AUTHENTICATE succeeded: the acceptor's opening (SYNC_USER)."""
        with self._locked:
            link = self._new_link(session, recovery.Link.accepted(self._history.last_no, time.monotonic()))
            self._take(session, link.open())

    def peer_announced(self, session, load, hostname, port, lineage=None, wire_map=None):
        """A neighbour's SERVER_ANNOUNCE; returns True the first time this link announces.
        ``lineage`` and ``wire_map`` are our extension (issue 9): the first announce on a link
        we dialled says the peer accepted it, so the peer is our parent; our parent's lineage
        is the start of ours, unless it holds us already (a cycle: we drop the link)."""
        with self._locked:
            link = self._links[session]
            first = not link.announced
            self._take(session, link.peer_announced(load, hostname, port))
            changed = wire_map is not None and self.netmap.merge(wire_map)
            if changed:
                self._apply_resumes()
            if first and link.initiator and self._parent is None:
                self._parent = session
                link.was_parent = True
                self._dial_alone = False
                self.seeker.attached()
            if session is self._parent:
                if lineage is not None and netmap.loops(self.me, lineage):
                    raise Refused(netmap.Refusal(netmap.REFUSED_CYCLE, f"{self.me} is in its parent's "
                                                 f"lineage ({' > '.join(lineage.chain())}): a cycle"))
                parent = lineage or Lineage.settled(f"{hostname}:{port}")  # not one of ours
                self.lineage = parent.child(self.me)
            if first or changed or session is self._parent:
                self._map_update(force=changed)
            return first

    def peer_asked(self, session, after, marks, held=None, lineage=None, alone=False):
        """A neighbour's ACTIVITY_RETRIEVE: what it lacks is streamed to it by the link's
        catch-up worker (``catch_up``), and live forwarding starts in the hold that sends the
        last of it, so nothing is missed and nothing overtakes. A dialler that sends its
        ``lineage`` is one of ours re-attaching: the rule (``netmap.accepts``) decides here,
        under the lock, before anything is answered, whether it may hang below us.

        With a data store, what the peer lacks beyond the in-memory history is read from disk
        by the worker, outside the lock, and sent first (see ``catch_up``)."""
        with self._locked:
            link = self._links.get(session)
            if link is None:
                return
            if lineage is not None and not link.initiator:
                refusal = netmap.accepts(self.lineage, lineage, alone)
                if refusal is None and self._dial_alone:
                    refusal = netmap.Refusal(netmap.REFUSED_BUSY, f"{self.me} is dialling alone")
                if refusal is not None:
                    raise Refused(refusal)
                link.peer_key = lineage.address()
                self._map_update()
            self._take(session, link.peer_asked(after, marks, held, ours=lineage is not None))

    def peer_refused(self, session):
        """The peer we dialled refused our secret."""
        with self._locked:
            link = self._links.get(session)
            if link is not None:
                link.peer_refused()

    def tick(self, now, silence):
        """The heartbeat: ``h`` on every link, and the recovery clock. Returns the outboxes of
        the links silent for more than ``silence`` seconds, for the caller to close."""
        silent = []
        with self._locked:
            for item in self._intake.expire(now):  # gaps waited for long enough: given up
                self._publish_item(item)
            if self.netmap.expire(now):
                self._map_update(force=True)
            for session, link in self._links.items():
                if now - session.outbox.last_heard > silence:
                    silent.append(session.outbox)
                    continue
                session.outbox.send(protocol.HEARTBEAT)
                self._take(session, link.tick(now))
        return silent

    def server_activity(self, session, activity, activity_id, received=None):
        """An ACTIVITY_BROADCAST from a neighbour: de-duplicate, keep, deliver, forward.

        ``received`` is the line as it arrived, when it may be relayed unchanged
        (``protocol.relayable_broadcast``): then it is not encoded again."""
        with self._locked:
            link = self._links.get(session)
            now = time.monotonic()
            if link is not None:
                link.peer_sent_activity(now)
                if link.peer_key is not None:
                    self._peers.heard(link.peer_key, activity_id)  # the store shares its dict
                    if link.foreign:  # it cannot de-duplicate: never send it back (recovery rule 5)
                        self._peers.sent_us(link.peer_key, activity_id)
            return bool(self._take_from_server(session, link, activity, activity_id, received, now))

    def server_activities(self, session, messages, received):
        """``server_activity`` for each of ``messages`` (ACTIVITY_BROADCAST structs of one read,
        ``schemas.decode_activities``), received as the lines ``received`` (without their
        "\\n"; none holds a "\\r"), which may be relayed unchanged, in order, in one hold of the
        lock.

        The usual case, a run of the next numbers of one origin of ours, all new and none held,
        is judged and published as one (``dedup.Intake.receive_run``), delivered and forwarded
        as one write per connection; anything else is taken one by one."""
        with self._locked:
            link = self._links.get(session)
            now = time.monotonic()
            count = len(messages)
            ids = [message.id for message in messages]
            if link is not None:
                link.peer_sent_activity(now, count)
                if link.peer_key is not None:
                    self._peers.heard(link.peer_key, ids[-1])  # the store shares its dict
                    if link.foreign:  # see server_activity
                        for activity_id in ids:
                            self._peers.sent_us(link.peer_key, activity_id)
            run = protocol.parse_run(ids)
            if run is not None:
                origin, first, oldest, sent_ms = run
                if (oldest / 1000 >= self._newest_login - self.clock_slack
                        and self._intake.receive_run(origin, first, first + count - 1)):
                    self.counters.activities_from_servers += count
                    if link is not None and oldest < link.since * 1000:  # a backlog (see server_activity)
                        self.counters.activities_recovered += sum(
                            1 for activity_id in ids if protocol.parse_id(activity_id)[2] < link.since * 1000)
                    lines = [line + b"\n" for line in received]
                    self._publish_all(ids, lines, b"".join(lines), session, origin,
                                      range(first, first + count), sent_ms)
                    return
            for message, line in zip(messages, received):
                self._take_from_server(session, link, message.activity, message.id, line, now)

    def _take_from_server(self, session, link, activity, activity_id, received, now):
        """De-duplicate, count and publish one activity from a neighbour; None for a copy of
        one already seen, else whether it was published now (not held back)."""
        parsed = protocol.parse_id(activity_id)
        if parsed is None and activity_id in self._history:
            self.counters.activities_deduplicated += 1
            return None
        duplicates = self._intake.duplicates
        # held back while an earlier one of its sender is missing, so possibly none or several
        items = self._intake.receive(activity_id, parsed, (activity, activity_id, parsed, session, received), now)
        if self._intake.duplicates != duplicates:
            self.counters.activities_deduplicated += 1
            return None
        self.counters.activities_from_servers += 1
        if link is not None and parsed is not None and parsed[2] < link.since * 1000:
            self.counters.activities_recovered += 1  # sent before this link came up: its backlog
        for item in items:
            self._publish_item(item)
        return bool(items)

    # --- users across servers --------------------------------------------------------------

    def merge_users(self, session, users):
        """SYNC_USER: add unknown users, delete conflicting ones; forward what was new."""
        with self._locked:
            added = {}
            for username, secret in users.items():
                outcome = self._learn_user(session, username, secret)
                if outcome == "added":
                    added[username] = secret
            for line in sync_user_lines(added):
                self._to_links(line, exclude=session)

    def new_user(self, session, username, secret):
        with self._locked:
            if self._learn_user(session, username, secret) == "added":
                self._to_links(encode(protocol.new_user(username, secret)), exclude=session)

    def user_conflict(self, session, username):
        """USER_CONFLICT: delete the user everywhere; forward only the first time we hear of it,
        so the flood ends."""
        with self._locked:
            if self._users.is_blocked(username):
                return
            self._delete_user(username)
            self._to_links(encode(protocol.user_conflict(username)), exclude=session)

    # --- reading (copies; taking the lock only to copy) -------------------------------------

    def user_directory(self):
        """(users {name: secret}, blocked names), copies."""
        with self._locked:
            return self._users.users(), self._users.blocked()

    def snapshot(self, clients=True):
        """The state as plain data, for the monitor and tests (shape in ARCH.md). With
        ``clients=False`` the "clients" list is left out, and with a ``slice`` it holds only
        those clients (in login order): copying 10,000 client records costs milliseconds under
        the lock, and the monitor shows a page at most. "client_count" and
        "client_bytes_queued" are always there. Apart from that sum, the cost does not grow
        with the number of clients."""
        now = time.monotonic()
        with self._locked:
            if clients is True:
                chosen = self._clients
            elif isinstance(clients, slice):
                chosen = itertools.islice(self._clients, clients.start, clients.stop)
            else:
                chosen = ()
            records = [{"id": s.id, "address": s.address, "user": s.username, "since": s.logged_in_at,
                        "messages_in": s.messages_in, "messages_out": s.messages_out,
                        "bytes_queued": s.outbox.queued_bytes()} for s in chosen]
            client_bytes_queued = sum([s.outbox.queued_bytes() for s in self._clients])
            links = [{"id": s.id, "address": s.address,
                      "peer": f"{link.hostname}:{link.port}" if link.announced else None,
                      "initiator": link.initiator, "since": link.since, "phase": link.phase,
                      "live": link.live, "load": link.load, "bytes_queued": s.outbox.queued_bytes(),
                      "last_heard_s": round(now - s.outbox.last_heard, 3),
                      "activities_sent": link.activities_sent,
                      "activities_received": link.activities_received}
                     for s, link in self._links.items()]
            # not yet logged in or authenticated: every session is one of those, a logged-in
            # client or a server link
            pending = len(self._sessions) - len(self._clients) - len(self._links)
            snapshot = {
                "origin": self.origin, "hostname": self.hostname, "port": self.port,
                "client_count": len(self._clients), "client_bytes_queued": client_bytes_queued,
                "links": links,
                "users": len(self._users), "blocked": len(self._users.blocked()),
                "logged_in_names": len(self._names),
                "history": {"entries": len(self._history), "bytes": self._history.bytes},
                "pending": pending,
            }
        if clients is True or isinstance(clients, slice):
            snapshot["clients"] = records
        return snapshot

    def traffic(self):
        """(bytes read, bytes written) on every connection since start, closed ones included."""
        with self._locked:
            bytes_in, bytes_out = self._closed_bytes
            for session in self._sessions:
                bytes_in += session.outbox.bytes_in
                bytes_out += session.outbox.bytes_out
            return bytes_in, bytes_out

    def count_rate_limited(self):
        """A client's reads were paused by its rate limit for the first time."""
        with self._locked:
            self.counters.clients_rate_limited += 1

    def count_invalid(self, kind):
        """A connection was refused with INVALID_MESSAGE of ``kind`` (``stats.INVALID_REASONS``)."""
        with self._locked:
            reasons = self.counters.invalid_messages
            kind = kind if kind in reasons else "other"
            reasons[kind] += 1

    def has_activity(self, activity_id):
        with self._locked:
            return activity_id in self._history

    # --- the data store (--data-dir) --------------------------------------------------------

    def _restore(self, store, history_size):
        """Start from what ``store`` kept (before serving, so no lock is needed): the origin and
        its sequence (``take_seqs`` never hands out a number twice), users and blocked names,
        the newest ``history_size`` activities numbered on from the store's last position, the
        per-origin marks (de-duplication, and what we ask peers for) and the per-peer marks."""
        loaded = store.load(history_size)
        self.origin = loaded.origin
        self._take_seqs = store.take_seqs
        if store.first_seq > 1:  # peers must not hold our activities for the numbers skipped
            self.resumes = (self.origin, store.first_seq)
            self.netmap.set_own(None, [], self.lineage, self.monitor, self.resumes)  # in our first map
        self._users = DurableUsers(store, loaded.users, loaded.blocked)
        self._history = History(history_size, _gap_free_tail(loaded.history), loaded.last_position)
        self._intake.restore(loaded.marks)
        for peer_key, activity_id in loaded.peer_marks.items():
            self._peers.heard(peer_key, activity_id)
        store.share_peer_marks(self._peers.marks)

    # --- internals (call with the lock held) -----------------------------------------------

    def _new_link(self, session, link):
        self.counters.recoveries_run += 1  # every new link runs the routine (see recovery)
        session.role = SERVER
        session.link = link
        self._links[session] = link
        return link

    def _take(self, session, steps, secret=None):
        """Send what ``steps`` (from the link's machine) say, in order."""
        link = session.link
        for step in steps:
            if step is Step.AUTHENTICATE:
                session.send(encode(protocol.authenticate(secret)))
            elif step is Step.USERS:
                for line in sync_user_lines(self._users.users(), always=True):
                    session.send(line)
            elif step is Step.ASK:
                lineage = self.lineage.to_wire() if link.initiator else None
                session.send(encode(protocol.activity_retrieve(
                    self._peers.last_from(link.peer_key), self._intake.marks(), self._intake.extras(),
                    lineage, link.initiator and self._dial_alone)))
            elif step is Step.ANNOUNCE:
                session.send(encode(self._announce_message(link)))
            else:  # the backlog: streamed by the link's catch-up worker
                running = link.catch_up is not None  # a worker streams it: it takes the new one
                link.catch_up = self._backlog(step, link)
                if running:
                    continue
                if self._catch_up_runner is None:
                    self._catch_up_at_once(session)
                else:
                    self._catch_up_runner(session)

    def _backlog(self, step, link):
        """The ``recovery.CatchUp`` of a backlog step (decided here, under the lock)."""
        disk = self._store is not None and self._catch_up_runner is not None  # read by the worker
        sent_by = self._peers.sent_by(link.peer_key) if link.foreign else None
        if step is Step.ANSWER:
            after, marks, held = link.request
            return recovery.answer(self._history, after, marks, held, sent_by, disk)
        if step is Step.CATCH_UP:  # a peer that never asks: after what it held, or since the link
            held = self._peers.held_up_to(link.peer_key) if link.foreign else None
            start = link.start_no if held is None else held
            return recovery.CatchUp(start, recovery.not_sent_by(sent_by), "catch up").start(self._history, disk)
        return recovery.CatchUp(0).start(self._history)  # Step.REPLAY: what memory holds

    # --- the catch-up (recovery.CatchUp), chunk by chunk --------------------------------------

    def catch_up(self, session):
        """The catch-up worker of one link (its own thread): stream the link's backlog, a bounded
        chunk per lock hold, the rest outside the lock, waiting for the outbox to drain between
        chunks; the last chunk and going live share one hold. With a data store, what memory
        no longer holds is read from disk here, outside the lock, before the memory part.
        Returns when the link is live or gone. Only this thread sends a non-live link
        activities, so their order is kept."""
        outbox = session.outbox
        sent = 0
        while True:
            with self._locked:
                work, catch_up, evicted = self._catch_up_step(session, sent)
            sent = 0
            if evicted:
                log.warning("%d activities were evicted from the history while %s was caught up; "
                            "it does not get them", evicted, session.address, extra={"conn": session.address})
            if work is None or getattr(outbox, "closed", False):
                return
            if work == "lookup":
                self._look_up(session, catch_up)
            elif work[0] == "disk":
                sent = self._send_stored(session, catch_up, *work[1:])
            else:
                lines = catch_up.lines(work)
                if lines:
                    outbox.send(b"".join(lines))  # not in a section: written (or queued) at once
                sent = len(lines)
                self._drain(outbox)
                time.sleep(0)  # let threads waiting for the GIL in: a client's round trip

    def _catch_up_at_once(self, session):
        """Without a worker: every chunk now, in this hold (unit tests on plain data)."""
        sent = 0
        while True:
            work, catch_up, _evicted = self._catch_up_step(session, sent)
            if work is None:
                return
            lines = catch_up.lines(work)
            if lines:
                session.outbox.send(b"".join(lines))
            sent = len(lines)

    def _catch_up_step(self, session, sent):
        """One lock hold of a catch-up (lock held): count what the worker ``sent`` since the last
        one, then decide its next piece of work: None (done: the link is live or gone),
        "lookup" (find the request's ``after`` on disk), ("disk", first, below) (read those
        numbers from the store), or the next entries of memory; the last ones are sent here
        and the link goes live. Returns (work, the CatchUp, how many were evicted unsent)."""
        link = self._links.get(session)
        if link is None or link.catch_up is None:
            return None, None, 0
        self._count_sent(session, link, sent)
        catch_up = link.catch_up
        if catch_up.lookup is not None:
            return "lookup", catch_up, 0
        if self._store is not None and self._catch_up_runner is not None:
            missing = catch_up.on_disk(self._history)
            if missing is not None:
                return ("disk", *missing), catch_up, 0
        entries, last, evicted = catch_up.take(self._history)
        if not last:
            return entries, catch_up, evicted
        lines = catch_up.lines(entries)
        if lines:
            session.outbox.send(b"".join(lines))
        self._count_sent(session, link, len(lines))
        link.caught_up()
        return None, catch_up, evicted

    def _look_up(self, session, catch_up):
        """The request's ``after`` is not in memory: find its number on disk (outside the lock),
        then decide the answer (``recovery.answer``)."""
        position = None
        try:
            position = self._store.position_of(catch_up.lookup)
        except (StoreError, sqlite3.Error) as exc:
            log.error("data store: cannot look up %s for recovery: %s", catch_up.lookup, exc)
        with self._locked:
            link = self._links.get(session)
            if link is None or link.catch_up is not catch_up:
                return  # gone, or asked again meanwhile: the next hold sees it
            after, marks, held = link.request
            sent_by = self._peers.sent_by(link.peer_key) if link.foreign else None
            after_no = position if position is not None else self._history.first_no - 1
            link.catch_up = recovery.answer(self._history, after, marks, held, sent_by, True, after_no)

    def _send_stored(self, session, catch_up, first, below):
        """Send ``session``, outside the lock, the stored entries numbered [first, below) that
        the catch-up wants, in order, a chunk at a time, draining the outbox between chunks;
        then move its cursor past them (under the lock). Those were evicted from memory but
        may still wait for the store's writer: flush first. A failing store is logged; the
        catch-up then goes on from memory. Returns how many were sent."""
        sent = 0
        began = time.perf_counter()
        outbox = session.outbox
        try:
            self._store.flush(COMMIT_WAIT)
            for chunk in self._store.missing(catch_up.marks or None, catch_up.foreign_after or 0, below, first):
                lines = catch_up.lines(chunk)
                if lines:
                    outbox.send(b"".join(lines))
                sent += len(lines)
                if getattr(outbox, "closed", False):
                    break
                self._drain(outbox)
        except (StoreError, sqlite3.Error) as exc:
            log.error("data store: cannot read activities for %s from disk (%s); it gets what "
                      "memory holds", session.address, exc)
        if sent:
            log.info("sent %s %d activities from disk (numbers %d to %d) in %.3f s", session.address, sent,
                     first, below - 1, time.perf_counter() - began, extra={"conn": session.address})
        with self._locked:
            if session.link is not None and session.link.catch_up is catch_up:
                catch_up.cursor = max(catch_up.cursor, below - 1)
        return sent

    @staticmethod
    def _drain(outbox):
        """Wait until ``outbox`` holds less than CATCH_UP_LOW_WATER (or is closed)."""
        while outbox.queued_bytes() > CATCH_UP_LOW_WATER and not getattr(outbox, "closed", False):
            time.sleep(CATCH_UP_POLL)

    def _count_sent(self, session, link, count):
        session.messages_out += count
        link.activities_sent += count
        self.counters.activities_relayed += count

    def _learn_user(self, session, username, secret):
        if self._users.is_blocked(username):
            session.send(encode(protocol.user_conflict(username)))  # tell the sender it is stale
            return "blocked"
        known = self._users.secret_of(username)
        if known is None:
            if username == ANONYMOUS:
                return "ignored"
            self._users.add(username, secret)
            return "added"
        if same_secret(secret, known):
            return "same"
        self._delete_user(username)
        self._to_links(encode(protocol.user_conflict(username)))
        return "conflict"

    def _delete_user(self, username):
        self._users.block(username)
        goodbye = encode(AuthenticationFail(
            f"user {username} was deleted: it was registered elsewhere with a different secret").reply())
        for client in [c for c in self._clients if c.username == username]:
            client.send_last(goodbye, f"user {username} deleted by a conflict")

    def _publish_item(self, item):
        """Publish an activity ``Intake`` released: (activity, id, parsed id, source session,
        the line as received when it may be relayed unchanged, else None)."""
        activity, activity_id, parsed, source, received = item
        if received is not None:
            line = received + b"\n"
        else:
            line = encode(protocol.activity_broadcast(activity, activity_id))
        if parsed is None:
            self._publish(activity_id, line, source=source)
        else:
            self._publish(activity_id, line, source=source, sent=parsed[2] / 1000, origin=parsed[0], seq=parsed[1])

    def _publish(self, activity_id, line, source, sent=None, origin=None, seq=None, sent_ms=None):
        """Keep, deliver and forward an activity. ``sent`` (wall-clock seconds, known for our own
        ids) lets an old one recovered from history skip clients that logged in after it;
        ``origin``, ``seq`` (of our ids) and ``sent_ms`` (when the id is ``make_id``'s of the
        three) are for the data store."""
        self._history.add(activity_id, line)
        if self._store is not None:
            self._store.record(self._history.last_no, [activity_id], origin, seq, line, sent_ms)
        # The hot loop: a session's send inlined (count, queue), one frame less per delivery.
        counters = self.counters
        if sent is None or sent >= self._newest_login - self.clock_slack:
            for client in self._clients:
                client.messages_out += 1
                client.outbox.send(line)
            counters.activities_delivered += len(self._clients)
        else:
            for client in self._clients:
                if client.logged_in_at - self.clock_slack <= sent:
                    client.messages_out += 1
                    client.outbox.send(line)
                    counters.activities_delivered += 1
        for session, link in self._links.items():
            if link.live and session is not source:
                session.send(line)
                link.activities_sent += 1
                counters.activities_relayed += 1

    def _publish_all(self, ids, lines, data, source, origin, seqs, sent_ms=None):
        """``_publish`` of several activities of ``origin`` (numbered ``seqs``), in order, none
        older than the newest login (less the clock slack): ``lines`` (each ending in "\\n")
        and ``data``, the same joined; ``seqs`` are consecutive; ``sent_ms``: the send time of
        every id, when they are ``protocol.make_ids``'s. Every connection is sent ``data`` in
        one piece, and the data store records it as one batch."""
        history = self._history
        if self._store is not None:
            self._store.record(history.last_no + 1, ids, origin, seqs[0], data, sent_ms)
        for activity_id, line in zip(ids, lines):
            history.add(activity_id, line)
        count = len(ids)
        counters = self.counters
        for client in self._clients:
            client.messages_out += count
            client.outbox.send(data)
        counters.activities_delivered += count * len(self._clients)
        for session, link in self._links.items():
            if link.live and session is not source:
                session.messages_out += count
                session.outbox.send(data)
                link.activities_sent += count
                counters.activities_relayed += count

    def _to_links(self, line, exclude=None):
        for session in self._links:
            if session is not exclude:
                session.send(line)

    def _neighbour_loads(self):
        return [(link.load, link.hostname, link.port)
                for link in self._links.values() if link.load is not None]

    def _announce_message(self, link):
        """Our SERVER_ANNOUNCE for ``link``: load, lineage, and the map if the link lacks it."""
        wire_map = None
        if link.map_gen != self._map_gen:
            link.map_gen = self._map_gen
            wire_map = self.netmap.to_wire()
        return protocol.server_announce(len(self._clients), self.hostname, self.port,
                                        self.lineage.to_wire(), wire_map)

    def _announce_load(self):
        for session, link in self._links.items():
            if link.may_announce_load:
                session.send(encode(self._announce_message(link)))

    def _map_update(self, force=False):
        """Our own map entry from our links now; when the map changed (or ``force``: a merge or
        an expiry changed it), every link is sent it (with our lineage) hop by hop."""
        up = None
        if self._parent is not None:
            link = self._parent.link
            up = f"{link.hostname}:{link.port}" if link.announced else link.peer_key
        down = [link.peer_key for link in self._links.values() if not link.initiator and link.peer_key]
        if self.netmap.set_own(up, down, self.lineage, self.monitor, self.resumes) or force:
            self._map_gen += 1
            self._announce_load()

    def _apply_resumes(self):
        """A restarted origin's "resumes" in the map (see ``dedup.Reorder.resume``): its
        activities are not held for the numbers it skipped."""
        for entry in self.netmap.entries.values():
            if entry.resumes is not None and entry.resumes not in self._resumes_seen:
                self._resumes_seen.add(entry.resumes)
                for item in self._intake.order.resume(*entry.resumes):
                    self._publish_item(item)

    # --- the dialler's questions (links.Seeking) --------------------------------------------

    def next_dial(self, now):
        """(address, alone) to dial now, or None (see ``netmap.Seeker``)."""
        with self._locked:
            has_children = bool(self.netmap.own.down)  # servers that hang below us (not a probe)
            dial = self.seeker.next_dial(now, self.netmap, self.lineage, has_children)
            self._dial_alone = bool(dial and dial[1])
            return dial

    def dial_ended(self, session, now):
        """Our dial ended (``session`` is None if no connection was made): unless the peer
        accepted it as our parent at some point, the seeker moves on."""
        with self._locked:
            self._dial_alone = False
            if session is None or session.link is None or not session.link.was_parent:
                self.seeker.outcome(now, False)
            if session is not None and session.link is not None and session.link.refused:
                self.seeker.excluded.add(session.link.peer_key)

    def dial_wait(self, now):
        with self._locked:
            return self.seeker.wait_hint(now)

    def set_monitor(self, address):
        """Our monitor endpoint's "host:port": it rides in our map entry, for the others' maps."""
        with self._locked:
            self.monitor = address
            self._map_update()

    def network(self):
        """The network map as plain data, for the monitor's /networkz (``server.network_map``),
        the benchmarks and tests: {"me": "h:p", "root": "h:p" (of our network), "servers":
        [{"address", "parent", "children", "load", "monitor", "alive", "root", "depth"}],
        "links": [{"a": child, "b": parent}]}. "alive": in our network (servers outside it are
        dead or cut off, kept a while as addresses to try); "links" are the links both ends
        confirm within our network (n - 1 once settled); "load" is known for us and our
        neighbours only (None otherwise)."""
        with self._locked:
            inside = self.netmap.component()
            loads = {f"{link.hostname}:{link.port}": link.load
                     for link in self._links.values() if link.announced}
            loads[self.me] = len(self._clients)
            servers, links = [], []
            for address, entry in sorted(self.netmap.entries.items()):
                chain = entry.lineage.chain() if entry.lineage is not None else None
                servers.append({"address": address, "parent": entry.up, "children": list(entry.down),
                                "load": loads.get(address), "monitor": entry.monitor,
                                "alive": address in inside, "root": chain[0] if chain else None,
                                "depth": len(chain) - 1 if chain else None})
                if address in inside and entry.up and self.netmap.linked(address, entry.up):
                    links.append({"a": address, "b": entry.up})
            return {"me": self.me, "root": self.lineage.chain()[0], "servers": servers, "links": links}


def _gap_free_tail(entries):
    """The newest run of ``entries`` (number, id, line) whose numbers have no gap: ``History``
    finds entries by number arithmetic (a store that dropped writes on a failing disk has gaps)."""
    start = len(entries) - 1
    while start > 0 and entries[start - 1][0] == entries[start][0] - 1:
        start -= 1
    return entries[max(start, 0):]


SYNC_USER_CHUNK = 5000


def sync_user_lines(users, always=False):
    """SYNC_USER lines of at most SYNC_USER_CHUNK users each, so that 100,000 users never make
    one line longer than a peer's line limit; merging is per user, so the split is invisible."""
    items = list(users.items())
    if not items:
        return [encode(protocol.sync_user({}))] if always else []
    return [encode(protocol.sync_user(dict(items[i:i + SYNC_USER_CHUNK])))
            for i in range(0, len(items), SYNC_USER_CHUNK)]


def login_refusal(username, known_secret, secret):
    """Why a LOGIN of a registered-name ``username`` with ``secret`` is refused, or None."""
    if known_secret is None:
        return f"attempt to login with wrong secret: {username} is not registered"
    if secret is None:
        return f"attempt to login with wrong secret: no secret given for {username}"
    if not same_secret(secret, known_secret):  # constant time: the timing tells nothing
        return "attempt to login with wrong secret"
    return None


def redirect_target(load_with_new_client, neighbours):
    """Project 1's rule: redirect when a neighbour's load is at least 2 below ours (counting the
    new client); pick the least loaded. ``neighbours`` is [(load, hostname, port)]."""
    best = min(neighbours, key=lambda n: n[0], default=None)
    if best is None or best[0] > load_with_new_client - 2:
        return None
    return best[1], best[2]
