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
"""

import itertools
import threading
import time

from . import protocol, recovery
from .connection import Outgoing
from .history import History, Seen
from .protocol import AuthenticationFail, InvalidMessage, LoginFailed, RegisterFailed, encode
from .recovery import Step
from .session import CLIENT, NEW, SERVER, Session
from .users import Users

ANONYMOUS = "anonymous"
# Servers' clocks may differ by about this much (seconds). An activity is delivered to the clients
# that were logged in when it was sent, give or take this slack: a client logging in to a server
# that is being refilled after a restart, a late join or a partition is not sent old history.
CLOCK_SLACK = 5.0


class State:
    """Sessions, clients, links, users and history of one server; see the module docstring."""

    def __init__(self, hostname, port, history_size=100_000, origin=None, clock_slack=CLOCK_SLACK,
                 users=None, history=None, outgoing=None, lock=None):
        self.outgoing = outgoing or Outgoing()
        self._locked = self.outgoing.holding(lock or threading.RLock())  # see the module doc
        self.clock_slack = clock_slack
        self._newest_login = 0.0  # wall-clock time of the latest login (only ever grows)
        self.hostname = hostname
        self.port = port
        self.origin = origin or protocol.new_origin()
        self._seq = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._users = Users() if users is None else users
        self._history = History(history_size) if history is None else history
        self._seen = Seen(max(4 * history_size, 10_000))
        self._peers = recovery.PeerMemory()
        self._sessions = {}  # every open session (dict as ordered set)
        self._clients = {}  # logged-in client sessions, in login order
        self._links = {}  # authenticated server sessions -> their recovery.Link

    # --- sessions --------------------------------------------------------------------------

    def open_session(self, outbox, address):
        """A new connection; returns its Session (see ``session``)."""
        with self._locked:
            session = Session(next(self._session_ids), outbox, address)
            self._sessions[session] = True
            return session

    def close_session(self, session):
        """Forget a closed connection: a client's load, a server's link."""
        with self._locked:
            self._sessions.pop(session, None)
            if self._clients.pop(session, None) is not None:
                self._announce_load()
            self._links.pop(session, None)

    # --- clients ---------------------------------------------------------------------------

    def register_user(self, session, username, secret):
        with self._locked:
            if session.logged_in:
                raise InvalidMessage(f"REGISTER is not allowed once logged in (logged in as {session.username})")
            if username == ANONYMOUS or username in self._users:
                raise RegisterFailed(f"{username} is already registered with the system")
            if self._users.is_blocked(username):
                raise RegisterFailed(f"{username} cannot be registered: it was registered twice "
                                     "with different secrets and is blocked network-wide")
            session.role = CLIENT
            self._users.add(username, secret)
            session.send(encode(protocol.info_message("REGISTER_SUCCESS", f"register success for {username}")))
            self._to_links(encode(protocol.new_user(username, secret)))

    def login(self, session, username, secret):
        """Log ``session`` in; returns a (hostname, port) to redirect it to, or None."""
        with self._locked:
            if session.logged_in:
                raise InvalidMessage(f"LOGIN on a connection already logged in as {session.username}")
            if username != ANONYMOUS:
                known = self._users.secret_of(username)
                if known is None:
                    raise LoginFailed(f"attempt to login with wrong secret: {username} is not registered")
                if secret is None:
                    raise LoginFailed(f"attempt to login with wrong secret: no secret given for {username}")
                if known != secret:
                    raise LoginFailed("attempt to login with wrong secret")
            session.role = CLIENT
            session.send(encode(protocol.info_message("LOGIN_SUCCESS", f"logged in as user {username}")))
            target = redirect_target(len(self._clients) + 1, self._neighbour_loads())
            if target is not None:
                return target
            session.logged_in = True
            session.logged_in_at = time.time()
            self._newest_login = max(self._newest_login, session.logged_in_at)
            session.username = username
            session.secret = secret
            self._clients[session] = True
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
            if username != ANONYMOUS and secret != session.secret:
                raise AuthenticationFail(f"the secret does not match the one of user {username}")
            activity["authenticated_user"] = username
            seq = next(self._seq)
            sent_ms = int(time.time() * 1000)
            activity_id = protocol.make_id(self.origin, seq, sent_ms)
            line = encode(protocol.activity_broadcast(activity, activity_id))
            self._seen.first_sighting(activity_id, (self.origin, seq, sent_ms))
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
                self._take(session, link.peer_asked(), request=(after, marks))

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
                link.activities_received += 1
                if link.peer_key is not None:
                    self._peers.heard(link.peer_key, activity_id)
            parsed = protocol.parse_id(activity_id)
            if parsed is None and activity_id in self._history:
                return False
            if not self._seen.first_sighting(activity_id, parsed):
                return False
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

    def snapshot(self):
        """The state as plain data, for the status endpoint and tests (shape in ARCH.md)."""
        now = time.monotonic()
        with self._locked:
            clients = [{"id": s.id, "address": s.address, "user": s.username, "since": s.logged_in_at,
                        "messages_in": s.messages_in, "messages_out": s.messages_out,
                        "bytes_queued": s.outbox.queued_bytes()} for s in self._clients]
            links = [{"id": s.id, "address": s.address,
                      "peer": f"{link.hostname}:{link.port}" if link.announced else None,
                      "initiator": link.initiator, "since": link.since, "phase": link.phase,
                      "live": link.live, "load": link.load, "bytes_queued": s.outbox.queued_bytes(),
                      "last_heard_s": round(now - s.outbox.last_heard, 3),
                      "activities_sent": link.activities_sent,
                      "activities_received": link.activities_received}
                     for s, link in self._links.items()]
            pending = sum(1 for s in self._sessions if s.role == NEW or (s.role == CLIENT and not s.logged_in))
            return {
                "origin": self.origin, "hostname": self.hostname, "port": self.port,
                "clients": clients, "links": links,
                "users": len(self._users), "blocked": len(self._users.blocked()),
                "logged_in_names": len({s.username for s in self._clients}),
                "history": {"entries": len(self._history), "bytes": self._history.bytes},
                "pending": pending,
            }

    def has_activity(self, activity_id):
        with self._locked:
            return activity_id in self._history

    # --- internals (call with the lock held) -----------------------------------------------

    def _new_link(self, session, link):
        session.role = SERVER
        session.link = link
        self._links[session] = link
        return link

    def _take(self, session, steps, secret=None, request=None):
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
                if step is Step.ANSWER:
                    entries = recovery.missing_entries(self._history, *request)
                elif step is Step.CATCH_UP:
                    entries = self._history.after_number(link.start_no)
                else:  # Step.REPLAY
                    entries = self._history.after_number(0)
                for _number, _id, line in entries:
                    session.send(line)
                link.activities_sent += len(entries)

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
        if known == secret:
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
        if sent is None or sent >= self._newest_login - self.clock_slack:
            for client in self._clients:
                client.messages_out += 1
                client.outbox.send(line)
        else:
            for client in self._clients:
                if client.logged_in_at - self.clock_slack <= sent:
                    client.messages_out += 1
                    client.outbox.send(line)
        for session, link in self._links.items():
            if link.live and session is not source:
                session.send(line)
                link.activities_sent += 1

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


def redirect_target(load_with_new_client, neighbours):
    """Project 1's rule: redirect when a neighbour's load is at least 2 below ours (counting the
    new client); pick the least loaded. ``neighbours`` is [(load, hostname, port)]."""
    best = min(neighbours, key=lambda n: n[0], default=None)
    if best is None or best[0] > load_with_new_client - 2:
        return None
    return best[1], best[2]
