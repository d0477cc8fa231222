"""The one shared state of a server, behind one lock.

Everything several connections share lives here: registered users, logged-in clients, server
links and the activity history. Its methods are the only way that state changes, and each runs
under ``self.lock``. They decide *what* every connection is sent, and in which order, and queue
the bytes on the connections' outboxes; they never touch a socket (callers run inside
``connection.batch()``, which flushes after the lock is released).

Ordering guarantees rest on two rules kept here:
- history, and the order each peer is sent activities in, are decided under the lock;
- a new server link receives live activities only once it has been caught up from the history
  (see ``Link.live`` and ``recovery``), so no activity overtakes an older one from its sender.
"""

import itertools
import threading
import time
from collections import OrderedDict, deque

from . import protocol
from .protocol import AuthenticationFail, InvalidMessage, LoginFailed, RegisterFailed, encode

ANONYMOUS = "anonymous"
# Servers' clocks may differ by about this much (seconds). An activity is delivered to the clients
# that were logged in when it was sent, give or take this slack: a client logging in to a server
# that is being refilled after a restart, a late join or a partition is not sent old history.
CLOCK_SLACK = 5.0


class Link:
    """Bookkeeping for one authenticated server link (guarded by the state lock)."""

    def __init__(self, initiator, peer_key, start_no):
        self.initiator = initiator
        self.peer_key = peer_key  # "host:port" of the peer's listener, once known
        self.start_no = start_no  # history position when the link came up
        self.since = time.monotonic()
        self.live = False  # activities are forwarded as they arrive
        self.load = None  # the peer's last announced client load
        self.hostname = None
        self.port = None
        self.asked = False  # we sent our ACTIVITY_RETRIEVE


class History:
    """Bounded cache of ACTIVITY_BROADCAST lines in arrival order, with O(1) lookup by id."""

    def __init__(self, size):
        self.size = size
        self._entries = deque()  # (number, id, line bytes)
        self._index = {}  # id -> number
        self._numbers = itertools.count(1)
        self.last_no = 0

    def add(self, activity_id, line):
        self.last_no = number = next(self._numbers)
        self._entries.append((number, activity_id, line))
        self._index[activity_id] = number
        if len(self._entries) > self.size:
            _, old_id, _ = self._entries.popleft()
            del self._index[old_id]

    def __contains__(self, activity_id):
        return activity_id in self._index

    def __len__(self):
        return len(self._entries)

    def after_number(self, number):
        """Entries added after history position ``number``."""
        if not self._entries:
            return []
        start = max(0, number - self._entries[0][0] + 1)
        return list(itertools.islice(self._entries, start, None))

    def number_of(self, activity_id):
        """The history position of ``activity_id``, or None if it is not (or no longer) cached."""
        return self._index.get(activity_id)

    def after_id(self, activity_id):
        """Entries after ``activity_id``, or all of them if it is not (or no longer) cached."""
        number = self._index.get(activity_id)
        return self.after_number(number) if number is not None else list(self._entries)

    def last_id(self):
        return self._entries[-1][1] if self._entries else None


class State:
    """Users, clients, links and history of one server; see the module docstring."""

    def __init__(self, hostname, port, history_size=100_000, origin=None, clock_slack=CLOCK_SLACK):
        self.lock = threading.RLock()
        self.clock_slack = clock_slack
        self._newest_login = 0.0  # wall-clock time of the latest login (only ever grows)
        self.hostname = hostname
        self.port = port
        self.origin = origin or protocol.new_origin()
        self._seq = itertools.count(1)
        self.users = {}  # username -> secret
        self.tombstones = set()  # usernames deleted by a conflict; never accepted again
        self.clients = {}  # logged-in client connections, in login order (dict as ordered set)
        self.links = {}  # server connection -> Link
        self.history = History(history_size)
        self.high = {}  # origin -> highest sequence number accepted (our own id format)
        self._foreign_seen = OrderedDict()  # foreign ids, bounded, for de-duplication
        self._foreign_bound = max(4 * history_size, 10_000)
        self.last_from = {}  # peer_key -> last activity id received from that peer

    # --- clients ---------------------------------------------------------------------------

    def register_user(self, conn, username, secret):
        with self.lock:
            if conn.logged_in:
                raise InvalidMessage(f"REGISTER is not allowed once logged in (logged in as {conn.username})")
            if username == ANONYMOUS or username in self.users:
                raise RegisterFailed(f"{username} is already registered with the system")
            if username in self.tombstones:
                raise RegisterFailed(f"{username} cannot be registered: it was registered twice "
                                     "with different secrets and is blocked network-wide")
            conn.role = "client"
            self.users[username] = secret
            conn.send(encode(protocol.info_message("REGISTER_SUCCESS", f"register success for {username}")))
            self._to_links(encode(protocol.new_user(username, secret)))

    def login(self, conn, username, secret):
        """Log ``conn`` in; returns a (hostname, port) to redirect it to, or None."""
        with self.lock:
            if conn.logged_in:
                raise InvalidMessage(f"LOGIN on a connection already logged in as {conn.username}")
            if username != ANONYMOUS:
                known = self.users.get(username)
                if known is None:
                    raise LoginFailed(f"attempt to login with wrong secret: {username} is not registered")
                if secret is None:
                    raise LoginFailed(f"attempt to login with wrong secret: no secret given for {username}")
                if known != secret:
                    raise LoginFailed("attempt to login with wrong secret")
            conn.role = "client"
            conn.send(encode(protocol.info_message("LOGIN_SUCCESS", f"logged in as user {username}")))
            target = redirect_target(len(self.clients) + 1, self._neighbour_loads())
            if target is not None:
                return target
            conn.logged_in = True
            conn.logged_in_at = time.time()
            self._newest_login = max(self._newest_login, conn.logged_in_at)
            conn.username = username
            conn.secret = secret
            self.clients[conn] = True
            self._announce_load()
            return None

    def client_activity(self, conn, username, secret, activity):
        """An ACTIVITY_MESSAGE from a client: authenticate it, stamp it, broadcast it."""
        with self.lock:
            if not conn.logged_in:
                raise AuthenticationFail("ACTIVITY_MESSAGE before LOGIN: log in first")
            if username != conn.username:
                raise AuthenticationFail(f"the username {username} is not the one logged in on "
                                         f"this connection ({conn.username})")
            if username != ANONYMOUS and secret != conn.secret:
                raise AuthenticationFail(f"the secret does not match the one of user {username}")
            activity["authenticated_user"] = username
            seq = next(self._seq)
            activity_id = protocol.make_id(self.origin, seq, int(time.time() * 1000))
            line = encode(protocol.activity_broadcast(activity, activity_id))
            self.high[self.origin] = seq
            self._publish(activity_id, line, source=None)

    def drop(self, conn):
        """Forget a closed connection: a client's load, a server's link."""
        with self.lock:
            if self.clients.pop(conn, None) is not None:
                self._announce_load()
            self.links.pop(conn, None)

    def load(self):
        with self.lock:
            return len(self.clients)

    # --- server links ----------------------------------------------------------------------

    def link_up(self, conn, initiator, peer_key=None, first=None):
        """Record a new authenticated server link; returns its Link. ``first`` (bytes) is queued
        before anything else can be sent on the link."""
        with self.lock:
            if first is not None:
                conn.send(first)
            conn.role = "server"
            link = Link(initiator, peer_key, self.history.last_no)
            self.links[conn] = link
            conn.link = link
            return link

    def send_users(self, conn):
        """SYNC_USER with every user (always, even none: it is AUTHENTICATE's success reply)."""
        with self.lock:
            for line in sync_user_lines(self.users, always=True):
                conn.send(line)

    def send_announce(self, conn):
        with self.lock:
            conn.send(encode(self._announce_message()))

    def send_retrieve(self, conn, request_for):
        """Send our ACTIVITY_RETRIEVE, built by ``request_for(state, link)`` under the lock, once
        per link; returns whether it was sent now."""
        with self.lock:
            link = self.links.get(conn)
            if link is None or link.asked:
                return False
            link.asked = True
            conn.send(encode(request_for(self, link)))
            return True

    def answer_retrieve(self, conn, select):
        """Answer a peer's ACTIVITY_RETRIEVE with ``select(history)`` and start forwarding live.

        Both happen under the lock, so everything before is in the reply and everything after
        goes out live: nothing is missed and nothing overtakes an older activity."""
        with self.lock:
            link = self.links.get(conn)
            for _number, _id, line in select(self.history):
                conn.send(line)
            if link is not None:
                link.live = True

    def go_live(self, conn, whole_history=False):
        """Start forwarding to a peer that did not ask for history (yet): first everything that
        arrived since the link came up (or the whole history), then live."""
        with self.lock:
            link = self.links.get(conn)
            if link is None or link.live:
                return
            since = 0 if whole_history else link.start_no
            for _number, _id, line in self.history.after_number(since):
                conn.send(line)
            link.live = True

    def announced(self, conn, load, hostname, port):
        """A neighbour's SERVER_ANNOUNCE; returns True the first time this link announces."""
        with self.lock:
            link = self.links[conn]
            first = link.hostname is None
            link.load, link.hostname, link.port = load, hostname, port
            if link.peer_key is None:
                link.peer_key = f"{hostname}:{port}"
            return first

    def server_activity(self, conn, activity, activity_id, received=None):
        """An ACTIVITY_BROADCAST from a neighbour: de-duplicate, keep, deliver, forward.

        ``received`` is the line as it arrived, when it may be relayed unchanged
        (``protocol.relayable_broadcast``): then it is not encoded again."""
        with self.lock:
            link = self.links.get(conn)
            if link is not None and link.peer_key is not None:
                self.last_from[link.peer_key] = activity_id
            parsed = protocol.parse_id(activity_id)
            if not self._first_sighting(activity_id, parsed):
                return False
            if received is not None:
                line = received + b"\n"
            else:
                line = encode(protocol.activity_broadcast(activity, activity_id))
            self._publish(activity_id, line, source=conn, sent=parsed[2] / 1000 if parsed else None)
            return True

    # --- users across servers --------------------------------------------------------------

    def merge_users(self, conn, users):
        """SYNC_USER: add unknown users, delete conflicting ones; forward what was new."""
        with self.lock:
            added = {}
            for username, secret in users.items():
                outcome = self._learn_user(conn, username, secret)
                if outcome == "added":
                    added[username] = secret
            for line in sync_user_lines(added):
                self._to_links(line, exclude=conn)

    def new_user(self, conn, username, secret):
        with self.lock:
            if self._learn_user(conn, username, secret) == "added":
                self._to_links(encode(protocol.new_user(username, secret)), exclude=conn)

    def user_conflict(self, conn, username):
        """USER_CONFLICT: delete the user everywhere; forward only the first time we hear of it,
        so the flood ends."""
        with self.lock:
            if username in self.tombstones:
                return
            self._delete_user(username)
            self._to_links(encode(protocol.user_conflict(username)), exclude=conn)

    def user_snapshot(self):
        with self.lock:
            return dict(self.users), set(self.tombstones)

    # --- internals (call with the lock held) -----------------------------------------------

    def _learn_user(self, conn, username, secret):
        if username in self.tombstones:
            conn.send(encode(protocol.user_conflict(username)))  # tell the sender it is stale
            return "blocked"
        known = self.users.get(username)
        if known is None:
            if username == ANONYMOUS:
                return "ignored"
            self.users[username] = secret
            return "added"
        if known == secret:
            return "same"
        self._delete_user(username)
        self._to_links(encode(protocol.user_conflict(username)))
        return "conflict"

    def _delete_user(self, username):
        self.tombstones.add(username)
        self.users.pop(username, None)
        goodbye = encode(protocol.info_message(
            "AUTHENTICATION_FAIL",
            f"user {username} was deleted: it was registered elsewhere with a different secret"))
        for client in [c for c in self.clients if c.username == username]:
            client.send_last(goodbye, f"user {username} deleted by a conflict")

    def _first_sighting(self, activity_id, parsed):
        if parsed is not None:
            origin, seq, _sent = parsed
            if seq <= self.high.get(origin, 0):
                return False
            self.high[origin] = seq
            return True
        if activity_id in self._foreign_seen or activity_id in self.history:
            return False
        self._foreign_seen[activity_id] = True
        if len(self._foreign_seen) > self._foreign_bound:
            self._foreign_seen.popitem(last=False)
        return True

    def _publish(self, activity_id, line, source, sent=None):
        """Keep, deliver and forward an activity. ``sent`` (wall-clock seconds, known for our own
        ids) lets an old one recovered from history skip clients that logged in after it."""
        self.history.add(activity_id, line)
        if sent is None or sent >= self._newest_login - self.clock_slack:
            for client in self.clients:
                client.send(line)
        else:
            for client in self.clients:
                if client.logged_in_at - self.clock_slack <= sent:
                    client.send(line)
        for conn, link in self.links.items():
            if link.live and conn is not source:
                conn.send(line)

    def _to_links(self, line, exclude=None):
        for conn in self.links:
            if conn is not exclude:
                conn.send(line)

    def _neighbour_loads(self):
        return [(link.load, link.hostname, link.port)
                for link in self.links.values() if link.load is not None]

    def _announce_message(self):
        return protocol.server_announce(len(self.clients), self.hostname, self.port)

    def _announce_load(self):
        self._to_links(encode(self._announce_message()))


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
