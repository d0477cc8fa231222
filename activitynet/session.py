"""Who is on a connection: the session record ``State`` keeps for each one.

``State`` creates a ``Session`` when a connection opens and owns it: every field changes only
under the state lock, through a ``State`` verb. The one exception is ``messages_in``, counted by
the connection's own reader thread (the only thread that writes it). A handler running on the
connection's own thread may read ``role`` without the lock: only that thread's own commands
change it.

A session never sees a socket. Its ``outbox`` is the narrow side of a connection that ``State``
uses: ``send(bytes)``, ``send_last(bytes, reason)`` (close once written), ``queued_bytes()`` and
``last_heard`` (monotonic time of the last bytes read). Bytes given to it are queued; they reach
the socket only after the state lock is released (see ``state``).
"""

import time

NEW, CLIENT, SERVER = "new", "client", "server"


class Session:
    """One connection's role, user and link; see the module docstring."""

    # Slots: a server may hold 10,000 idle connections.
    __slots__ = ("id", "outbox", "address", "secure", "since", "role", "username", "secret",
                 "logged_in", "logged_in_at", "link", "bucket", "messages_in", "messages_out",
                 "held", "__weakref__")

    def __init__(self, session_id, outbox, address, secure=False):
        self.id = session_id
        self.outbox = outbox
        self.address = address  # "host:port" of the socket's peer
        self.secure = secure  # the connection is TLS (--tls-required refuses a plain AUTHENTICATE)
        self.since = time.time()  # wall-clock time the connection opened
        self.role = NEW  # NEW -> CLIENT | SERVER
        self.username = None
        self.secret = None
        self.logged_in = False
        self.logged_in_at = 0.0  # wall-clock time of the login
        self.link = None  # a recovery.Link, once this is an authenticated server link
        self.bucket = None  # a limits.TokenBucket for a client connection (used by its reader only)
        self.messages_in = 0
        self.messages_out = 0
        # [(store ticket, REGISTER_SUCCESS line, username)] waiting for their commit; only the
        # connection's own reader thread touches it (see State.send_held)
        self.held = None

    def __repr__(self):
        return f"<Session {self.id} {self.address} {self.role}>"

    def send(self, data):
        self.messages_out += 1
        self.outbox.send(data)

    def send_last(self, data, reason):
        """Send ``data``, then close the connection (a failure reply, a deleted user's goodbye)."""
        self.messages_out += 1
        self.outbox.send_last(data, reason)
