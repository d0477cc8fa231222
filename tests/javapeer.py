"""A fake server that behaves like the seed authors' Java implementation (PROTOCOL.md section 5).

A mixed network must heal (issue 13 item 4), and that implementation is not ours to run in CI, so
this plays it, by its observable habits:

- As the *dialler* of a link it opens with ONE ``BUNDLE``: AUTHENTICATE, ACTIVITY_RETRIEVE (after
  the last id it had), SYNC_USER, SERVER_ANNOUNCE, then an ACTIVITY_BROADCAST for each activity it
  holds after that id: it pushes what the other side lacks and asks for what it lacks.
- As the *acceptor* it answers AUTHENTICATE with SYNC_USER (only when it has users) and
  SERVER_ANNOUNCE, and never sends ACTIVITY_RETRIEVE: it expects the side that dialled to push.
- It answers ACTIVITY_RETRIEVE with one BUNDLE of the activities after ``after`` (all of them if
  it does not hold that id). It ignores fields it does not know (our ``marks``).
- No de-duplication by id: every ACTIVITY_BROADCAST it is sent reaches its clients and is
  forwarded to its other links. ``received()`` lists what reached its clients, so a test can
  assert that each activity arrived exactly once.
- Numbers inside activities come back as floats (it parses them into doubles).
- A bare ``h`` heartbeat about every second on each link; a link silent for ``SILENCE`` seconds
  is closed. Any command it does not know closes the link (recorded in ``closed``).
- Its own activities get random base-32 ids (130 random bits, as its ``nextSecret``).

"The last id it had" is the newest activity it held when its last working link broke (a link on
which the other side had said anything; a connection reset before a word, as a cut relay does to
every redial, moves nothing). While it never had a link it asks after its newest activity, or
"" if it holds none: the whole history.

The API a test uses: ``JavaPeer()`` listens on 127.0.0.1 port 0 (``peer.port``), ``dial(port)``
keeps a link to a server up (redialling), ``send_activity(body)`` is one of its clients sending,
``received()`` what its clients got, ``live_links()``, ``cut()`` resets its links, ``close()``.
Locking: one re-entrant lock (``_lock``) guards users, history, links and records, and, as in
the Java implementation (whose message handling is ``synchronized``), messages are written while
it is held, so every link is sent activities in history order. Heartbeats are written outside it
(a per-link send lock keeps lines whole).
"""

import json
import logging
import random
import socket
import threading
import time

from harness import SECRET

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0
SILENCE = 3.0
REDIAL_EVERY = 0.2
KNOWN = {"AUTHENTICATE", "AUTHENTICATION_FAIL", "INVALID_MESSAGE", "SERVER_ANNOUNCE", "ACTIVITY_BROADCAST",
         "SYNC_USER", "NEW_USER", "USER_CONFLICT", "ACTIVITY_RETRIEVE", "BUNDLE"}
BASE32 = "0123456789abcdefghijklmnopqrstuv"


def java_id(rng=random.SystemRandom()):
    """A random base-32 id like the Java implementation's (BigInteger(130, random).toString(32))."""
    number = rng.getrandbits(130)
    digits = ""
    while number:
        number, digit = divmod(number, 32)
        digits = BASE32[digit] + digits
    return digits or "0"


def as_java_numbers(value):
    """Every number as a double, as the Java implementation's JSON library parses them."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [as_java_numbers(item) for item in value]
    return {key: as_java_numbers(item) for key, item in value.items()}


def encode(message):
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _Link:
    """One server link of the fake: a socket, a reader thread, and what was heard on it."""

    def __init__(self, peer, sock, dialled):
        self.peer = peer
        self.sock = sock
        self.dialled = dialled
        self.authenticated = dialled  # a dialler trusts the link it opened
        self.heard_anything = False  # the other side said something (a working link)
        self.last_heard = time.monotonic()
        self.announced = None  # the other side's last SERVER_ANNOUNCE
        self.open = True
        self._send_lock = threading.Lock()  # one writer at a time, in the order decided

    def send(self, *messages):
        data = b"".join(m if isinstance(m, bytes) else encode(m) for m in messages)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError:
            self.close("send failed")

    def close(self, reason, reset=False):
        if not self.open:
            return
        self.open = False
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.peer._link_closed(self, reason)

    def read_lines(self):
        pending = b""
        while self.open:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.close("closed by the other side")
                return
            self.last_heard = time.monotonic()
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                line = line.strip()
                if line and self.open:
                    yield line


class JavaPeer:
    """A fake server of the other implementation (module doc)."""

    def __init__(self, secret=SECRET, history_size=1000):
        self.secret = secret
        self.history_size = history_size
        self.server_id = java_id()
        self._lock = threading.RLock()
        self.users = {}
        self.history = []  # ACTIVITY_BROADCAST messages, oldest first (bounded)
        self._received = []  # (id, activity) delivered to its clients, in order
        self.closed = []  # (dialled, reason) of every link that ended
        self.unknown = []  # commands it closed a link for
        self.last_id = None  # the newest id it held when its last working link broke
        self._links = []
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept_loop, name=f"java-{self.port}", daemon=True),
                         threading.Thread(target=self._heartbeat, name=f"java-{self.port}-h", daemon=True)]
        for thread in self._threads:
            thread.start()

    def __repr__(self):
        return f"<JavaPeer {self.port}>"

    # --- the API for tests -----------------------------------------------------------------

    def dial(self, port, host="127.0.0.1"):
        """Keep a link to ``host:port`` up: dial, and redial every ``REDIAL_EVERY`` s after it
        breaks, until ``close()``."""
        thread = threading.Thread(target=self._dial_loop, args=(host, port), name=f"java-{self.port}-dial",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    def send_activity(self, body, username="anonymous"):
        """One of its clients sends ``body``: delivered to its clients, kept, sent to every link.
        Returns the new id."""
        activity = dict(as_java_numbers(body), authenticated_user=username)
        message = {"command": "ACTIVITY_BROADCAST", "activity": activity, "id": java_id()}
        with self._lock:
            self._to(self._keep_and_deliver(message), message)
        return message["id"]

    def received(self):
        """The activities its clients received, in order (each delivery once)."""
        with self._lock:
            return [activity for _id, activity in self._received]

    def received_ids(self):
        with self._lock:
            return [activity_id for activity_id, _activity in self._received]

    def live_links(self):
        """Links that are authenticated and on which the other side has spoken."""
        with self._lock:
            return sum(1 for link in self._links if link.authenticated and link.heard_anything)

    def cut(self):
        """Reset every link now (an RST); a dialled link is redialled."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close("cut by the test", reset=True)

    def close(self):
        self._stopping.set()
        self.cut()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- links -----------------------------------------------------------------------------

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            link = _Link(self, sock, dialled=False)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._serve, args=(link,), name=f"java-{self.port}-in", daemon=True).start()

    def _dial_loop(self, host, port):
        while not self._stopping.is_set():
            try:
                sock = socket.create_connection((host, port), timeout=5)
            except OSError:
                self._stopping.wait(REDIAL_EVERY)
                continue
            sock.settimeout(None)
            link = _Link(self, sock, dialled=True)
            with self._lock:  # nothing may go out on the link before its opening
                self._links.append(link)
                link.send(self._opening_bundle())
            self._serve(link)
            self._stopping.wait(REDIAL_EVERY)

    def _opening_bundle(self):
        """The dialler's one BUNDLE (under the lock): ask after the last id it had, push what it
        holds after that id."""
        if self.last_id is not None:
            after = self.last_id
        else:
            after = self.history[-1]["id"] if self.history else ""
        ids = [m["id"] for m in self.history]
        pushed = self.history[ids.index(after) + 1:] if after in ids else []
        return {"command": "BUNDLE", "messages": [
            {"command": "AUTHENTICATE", "secret": self.secret},
            {"command": "ACTIVITY_RETRIEVE", "after": after},
            {"command": "SYNC_USER", "users": dict(self.users)},
            self._announce(),
            *pushed,
        ]}

    def _announce(self):
        return {"command": "SERVER_ANNOUNCE", "id": self.server_id, "load": 1, "hostname": "127.0.0.1",
                "port": self.port}

    def _serve(self, link):
        for line in link.read_lines():
            link.heard_anything = True
            if line == b"h":
                continue
            try:
                message = json.loads(line)
            except ValueError:
                link.close(f"not JSON: {line[:80]!r}")
                return
            self._handle(link, message)

    def _link_closed(self, link, reason):
        with self._lock:
            if link in self._links:
                self._links.remove(link)
            self.closed.append((link.dialled, reason))
            if link.heard_anything and link.authenticated and self.history:
                self.last_id = self.history[-1]["id"]
        log.info("java peer %d: link closed (%s)", self.port, reason)

    def _heartbeat(self):
        while not self._stopping.wait(HEARTBEAT_EVERY):
            now = time.monotonic()
            with self._lock:
                links = [link for link in self._links if link.authenticated]
            for link in links:
                if now - link.last_heard > SILENCE:
                    link.close(f"silent for {now - link.last_heard:.1f} s")
                else:
                    link.send(b"h\n")

    # --- messages --------------------------------------------------------------------------

    def _handle(self, link, message):
        command = message.get("command") if isinstance(message, dict) else None
        if command not in KNOWN:
            with self._lock:
                self.unknown.append(command)
            link.close(f"unknown command {command!r}")
            return
        if not link.authenticated and command not in ("AUTHENTICATE", "BUNDLE"):
            link.send({"command": "INVALID_MESSAGE", "info": "not authenticated"})
            link.close("not authenticated")
            return
        getattr(self, "_on_" + command.lower())(link, message)

    def _on_authenticate(self, link, message):
        if link.authenticated and not link.dialled:
            link.send({"command": "INVALID_MESSAGE", "info": "already authenticated"})
            link.close("authenticated twice")
            return
        if message.get("secret") != self.secret:
            link.send({"command": "AUTHENTICATION_FAIL", "info": "secret incorrect"})
            link.close("wrong secret")
            return
        with self._lock:
            link.authenticated = True
            replies = [{"command": "SYNC_USER", "users": dict(self.users)}] if self.users else []
            link.send(*replies, self._announce())

    def _on_authentication_fail(self, link, message):
        link.close(f"AUTHENTICATION_FAIL: {message.get('info')}")

    def _on_invalid_message(self, link, message):
        link.close(f"INVALID_MESSAGE: {message.get('info')}")

    def _on_server_announce(self, link, message):
        link.announced = message

    def _on_activity_broadcast(self, link, message):
        message = {"command": "ACTIVITY_BROADCAST", "activity": as_java_numbers(message["activity"]),
                   "id": message["id"]}
        with self._lock:
            self._to(self._keep_and_deliver(message, source=link), message)

    def _on_activity_retrieve(self, link, message):
        after = message.get("after")
        with self._lock:
            ids = [m["id"] for m in self.history]
            answer = self.history[ids.index(after) + 1:] if after in ids else list(self.history)
            link.send({"command": "BUNDLE", "messages": answer})

    def _on_sync_user(self, link, message):
        with self._lock:
            added = {u: s for u, s in message["users"].items() if u not in self.users}
            self.users.update(added)
            if added:
                self._to(self._others(link), {"command": "SYNC_USER", "users": added})

    def _on_new_user(self, link, message):
        with self._lock:
            if message["username"] not in self.users:
                self.users[message["username"]] = message["secret"]
                self._to(self._others(link), message)

    def _on_user_conflict(self, link, message):
        with self._lock:
            if self.users.pop(message["username"], None) is not None:
                self._to(self._others(link), message)

    def _on_bundle(self, link, message):
        for inner in message.get("messages", []):
            if not link.open:
                return
            self._handle(link, inner)

    # --- internals (call with the lock held) -----------------------------------------------

    def _keep_and_deliver(self, message, source=None):
        """Keep ``message`` in the history, deliver it to the clients, and return the links to
        forward it to (every authenticated one but ``source``): no de-duplication."""
        self.history.append(message)
        del self.history[:-self.history_size]
        self._received.append((message["id"], message["activity"]))
        return self._others(source)

    def _others(self, source):
        return [link for link in self._links if link.authenticated and link is not source]

    @staticmethod
    def _to(links, message):
        data = encode(message)
        for link in links:
            link.send(data)
