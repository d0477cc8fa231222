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
import threading
import time

from . import protocol, recovery, stats
from .connection import SLOW_CONSUMER, Outgoing
from .credentials import same_secret
from .history import History, Seen
from .protocol import AuthenticationFail, InvalidMessage, LoginFailed, RegisterFailed, encode
from .recovery import Step
from .session import CLIENT, SERVER, Session
from .users import Users

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


class State:
    """Sessions, clients, links, users and history of one server; see the module docstring."""

    def __init__(self, hostname, port, history_size=100_000, origin=None, clock_slack=CLOCK_SLACK,
                 users=None, history=None, outgoing=None, lock=None, counters=None, catch_up_runner=None):
        """``catch_up_runner(session)`` starts a link's catch-up worker, which calls
        ``catch_up(session)`` (the server starts a thread); without one a backlog is sent at
        once, in the lock hold that decides it (unit tests on plain data)."""
        self.outgoing = outgoing or Outgoing()
        self._locked = self.outgoing.holding(lock or threading.RLock())  # see the module doc
        self.clock_slack = clock_slack
        self.counters = stats.Counters() if counters is None else counters
        self._closed_bytes = [0, 0]  # bytes in, out of the connections already closed
        self._newest_login = 0.0  # wall-clock time of the latest login (only ever grows)
        self.hostname = hostname
        self.port = port
        self.origin = origin or protocol.new_origin()
        self._seq = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._users = Users() if users is None else users
        self._history = History(history_size) if history is None else history
        self._seen = Seen(max(4 * history_size, 10_000))
        self._peers = recovery.PeerMemory(max(history_size, 10_000))
        self._catch_up_runner = catch_up_runner
        self._sessions = {}  # every open session (dict as ordered set)
        self._clients = {}  # logged-in client sessions, in login order
        self._names = collections.Counter()  # username -> its logged-in sessions (for the monitor)
        self._links = {}  # authenticated server sessions -> their recovery.Link

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
            if link is not None and link.live and link.peer_key is not None:
                self._peers.link_ended(link.peer_key, self._history.last_no)

    # --- clients ---------------------------------------------------------------------------

    def register_user(self, session, username, secret):
        with self._locked:
            if session.logged_in:
                raise InvalidMessage(f"REGISTER is not allowed once logged in (logged in as {session.username})",
                                     kind="not_allowed")
            if username == ANONYMOUS or username in self._users:
                raise RegisterFailed(f"{username} is already registered with the system")
            if self._users.is_blocked(username):
                raise RegisterFailed(f"{username} cannot be registered: it was registered twice "
                                     "with different secrets and is blocked network-wide")
            session.role = CLIENT
            self._users.add(username, secret)
            self.counters.registrations += 1
            session.send(encode(protocol.info_message("REGISTER_SUCCESS", f"register success for {username}")))
            self._to_links(encode(protocol.new_user(username, secret)))

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
            if not session.logged_in:
                raise AuthenticationFail("ACTIVITY_MESSAGE before LOGIN: log in first")
            if username != session.username:
                raise AuthenticationFail(f"the username {username} is not the one logged in on "
                                         f"this connection ({session.username})")
            if username != ANONYMOUS and not same_secret(secret, session.secret):
                raise AuthenticationFail(f"the secret does not match the one of user {username}")
            activity["authenticated_user"] = username
            seq = next(self._seq)
            sent_ms = int(time.time() * 1000)
            activity_id = protocol.make_id(self.origin, seq, sent_ms)
            line = encode(protocol.activity_broadcast(activity, activity_id))
            self._seen.first_sighting(activity_id, (self.origin, seq, sent_ms))
            self.counters.activities_from_clients += 1
            self._publish(activity_id, line, source=None)

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

    def peer_announced(self, session, load, hostname, port):
        """A neighbour's SERVER_ANNOUNCE; returns True the first time this link announces."""
        with self._locked:
            link = self._links[session]
            first = not link.announced
            self._take(session, link.peer_announced(load, hostname, port))
            return first

    def peer_asked(self, session, after, marks):
        """A neighbour's ACTIVITY_RETRIEVE: everything before this goes into the answer,
        everything after is forwarded live, so nothing is missed and nothing overtakes."""
        with self._locked:
            link = self._links.get(session)
            if link is not None:
                self._take(session, link.peer_asked(after, marks))

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
            for session, link in self._links.items():
                if now - session.outbox.last_heard > silence:
                    silent.append(session.outbox)
                    continue
                session.outbox.send(protocol.HEARTBEAT)
                self._take(session, link.tick(now))
        return silent

    def server_activity(self, session, activity, activity_id):
        """An ACTIVITY_BROADCAST from a neighbour: de-duplicate, keep, deliver, forward."""
        with self._locked:
            link = self._links.get(session)
            if link is not None:
                link.peer_sent_activity(time.monotonic())
                if link.peer_key is not None:
                    self._peers.heard(link.peer_key, activity_id)
                    if link.foreign:  # it cannot de-duplicate: never send it back (recovery rule 5)
                        self._peers.sent_us(link.peer_key, activity_id)
            parsed = protocol.parse_id(activity_id)
            if (parsed is None and activity_id in self._history) or not self._seen.first_sighting(activity_id, parsed):
                self.counters.activities_deduplicated += 1
                return False
            self.counters.activities_from_servers += 1
            if link is not None and parsed is not None and parsed[2] < link.since * 1000:
                self.counters.activities_recovered += 1  # sent before this link came up: its backlog
            line = encode(protocol.activity_broadcast(activity, activity_id))
            self._publish(activity_id, line, source=session, sent=parsed[2] / 1000 if parsed else None)
            return True

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
                session.send(encode(protocol.activity_retrieve(self._peers.last_from(link.peer_key),
                                                               self._seen.marks())))
            elif step is Step.ANNOUNCE:
                session.send(encode(self._announce_message()))
            else:
                link.catch_up = self._backlog(step, link)
                if self._catch_up_runner is None:
                    self._catch_up_at_once(session)
                else:
                    self._catch_up_runner(session)

    def _backlog(self, step, link):
        """The ``recovery.CatchUp`` of a backlog step (decided here, under the lock)."""
        sent_by = self._peers.sent_by(link.peer_key) if link.foreign else None
        if step is Step.ANSWER:
            return recovery.answer(self._history, *link.request, sent_by=sent_by)
        if step is Step.CATCH_UP:  # a peer that never asks: after what it held, or since the link
            held = self._peers.held_up_to(link.peer_key) if link.foreign else None
            start = link.start_no if held is None else held
            return recovery.CatchUp(start, recovery.not_sent_by(sent_by), "catch up").start(self._history)
        return recovery.CatchUp(0).start(self._history)  # Step.REPLAY

    # --- the catch-up (recovery.CatchUp), chunk by chunk --------------------------------------

    def catch_up(self, session):
        """The catch-up worker of one link (its own thread): stream the link's backlog, a bounded
        chunk per lock hold, the rest outside the lock, waiting for the outbox to drain between
        chunks; the last chunk and going live share one hold. Returns when the link is live or
        gone. Only this thread sends a non-live link activities, so their order is kept."""
        outbox = session.outbox
        sent = 0
        while True:
            with self._locked:
                done, chunk, evicted = self._catch_up_step(session, sent)
                catch_up = session.link.catch_up if session.link is not None else None
            if evicted:
                log.warning("%d activities were evicted from the history while %s was caught up; "
                            "it does not get them", evicted, session.address, extra={"conn": session.address})
            if done:
                return
            lines = catch_up.lines(chunk)
            if lines:
                outbox.send(b"".join(lines))  # not in a section: written (or queued) at once
            sent = len(lines)
            while outbox.queued_bytes() > CATCH_UP_LOW_WATER and not getattr(outbox, "closed", False):
                time.sleep(CATCH_UP_POLL)

    def _catch_up_at_once(self, session):
        """Without a worker: every chunk now, in this hold."""
        sent = 0
        while True:
            done, chunk, _evicted = self._catch_up_step(session, sent)
            if done:
                return
            lines = session.link.catch_up.lines(chunk)
            if lines:
                session.outbox.send(b"".join(lines))
            sent = len(lines)

    def _catch_up_step(self, session, sent):
        """One lock hold of a catch-up (lock held): count what the worker ``sent`` since the last
        one, take the next chunk; the last one is sent here and the link goes live. Returns
        (done, entries for the worker to send, how many were evicted unsent)."""
        link = self._links.get(session)
        if link is None or link.catch_up is None:
            return True, None, 0
        self._count_sent(session, link, sent)
        catch_up = link.catch_up
        entries, last, evicted = catch_up.take(self._history)
        if not last:
            return False, entries, evicted
        lines = catch_up.lines(entries)
        if lines:
            session.outbox.send(b"".join(lines))
        self._count_sent(session, link, len(lines))
        link.caught_up()
        return True, None, evicted

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

    def _publish(self, activity_id, line, source, sent=None):
        """Keep, deliver and forward an activity. ``sent`` (wall-clock seconds, known for our own
        ids) lets an old one recovered from history skip clients that logged in after it."""
        self._history.add(activity_id, line)
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

    def _to_links(self, line, exclude=None):
        for session in self._links:
            if session is not exclude:
                session.send(line)

    def _neighbour_loads(self):
        return [(link.load, link.hostname, link.port)
                for link in self._links.values() if link.load is not None]

    def _announce_message(self):
        return protocol.server_announce(len(self._clients), self.hostname, self.port)

    def _announce_load(self):
        line = encode(self._announce_message())
        for session, link in self._links.items():
            if link.may_announce_load:
                session.send(line)


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
