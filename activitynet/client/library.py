"""The client library: one ``Client`` per session with a network of activitynet servers.

A ``Client`` owns its connection for its whole life: it opens it, follows REDIRECTs, and after
the connection is lost ``reconnect()`` logs in again, on the same server or the next one of its
list (failover), so whoever holds the ``Client`` never has to swap it for another. Scripts,
benchmarks and the terminal program (``activitynet.client.terminal``) all use it.

Everything on the wire goes through ``activitynet.protocol``: its builders, its encoder and its
decoder, so the client speaks exactly what the servers check.
"""

import collections
import contextlib
import logging
import math
import secrets
import select
import socket
import ssl
import threading
import time

from .. import protocol

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 3780
RECV_SIZE = 256 * 1024
MAX_LINE = 64 * 1024 * 1024  # a server sending a longer line than this is broken or hostile
LOGIN_RETRIES = 4  # LOGIN_FAILED right after a redirect: the target may not know the user yet
LOGIN_RETRY_WAIT = 0.1
FIRST_RETRY = 0.2  # reconnection backoff: 0.2 s, doubling up to MAX_RETRY
MAX_RETRY = 5.0
RECONNECT_LOGIN_FAILURES = 6  # a restarted server may need a moment to learn the users again


def one_line(value):
    """Any JSON value as the compact text protocol.encode puts on the wire (without the newline)."""
    return protocol.encode(value).decode(protocol.ENCODING)[:-1]


# --- errors -------------------------------------------------------------------------------------

class ClientError(Exception):
    """Something the server said or did that ends the session; ``info`` is the server's text
    where there is one, ``message`` the reply itself (a dict) or None."""

    what = None  # how a person would name the failure, e.g. "login failed"

    def __init__(self, info, message=None):
        super().__init__(info)
        self.info = info
        self.message = message

    def __str__(self):
        return f"{self.what}: {self.info}" if self.what else str(self.info)


class LoginFailed(ClientError):
    what = "login failed"


class RegisterFailed(ClientError):
    what = "register failed"


class AuthenticationFailed(ClientError):
    what = "authentication failed"


class InvalidMessage(ClientError):
    what = "the server rejected a message as invalid"


class TooManyRedirects(ClientError):
    pass


class ConnectionLost(ClientError):
    """The connection closed or broke while a reply was awaited or data was being sent."""


class UnexpectedReply(ClientError):
    """The server sent something the protocol does not allow here (or not a JSON object)."""


class ReplyTimeout(ClientError, TimeoutError):
    """No reply within ``Client.timeout``."""


FAILURE_REPLIES = {
    protocol.LoginFailed.command: LoginFailed,
    protocol.RegisterFailed.command: RegisterFailed,
    protocol.AuthenticationFail.command: AuthenticationFailed,
    protocol.InvalidMessage.command: InvalidMessage,
}

# Failures another try would not cure (a LOGIN_FAILED is retried a few times while reconnecting:
# a restarted server may not have relearnt the users yet).
FATAL_ERRORS = (LoginFailed, RegisterFailed, AuthenticationFailed, InvalidMessage, UnexpectedReply)


def error_for(message):
    """The exception matching a failure reply (LOGIN_FAILED, ...), or None for other messages."""
    kind = FAILURE_REPLIES.get(message.get("command"))
    if kind is None:
        return None
    info = message.get("info")
    return kind(info if isinstance(info, str) else one_line(message), message)


def generate_secret():
    return secrets.token_hex(16)


def tls_context(cafile=None):
    """A TLS context that verifies the server's certificate and name against ``cafile`` (PEM),
    or against the system's trust store when None. Raises OSError/ssl.SSLError for a bad file."""
    return ssl.create_default_context(cafile=cafile)


# --- the library --------------------------------------------------------------------------------

class Client:
    """One client session with an activitynet network.

    ``connect()`` does what a Project 1 client does at start-up: a username without a secret is
    registered first (with a generated secret, kept in ``secret``), then it logs in, following
    REDIRECTs (``redirects`` lists the hops; ``host``/``port`` say where it ended up)::

        with Client("127.0.0.1", 3780, "alice", servers=[("127.0.0.1", 3781)]) as client:
            client.connect()
            client.send_activity({"text": "hello"})
            for message in client.messages(timeout=5):
                print(message)
            client.reconnect()  # the server went away: log in again there or on the next one

    ``servers`` lists more servers after ``host:port`` (``self.servers`` holds them all, in
    order). Opening a connection tries them in order until one answers; after the connection is
    lost, ``reconnect()`` tries the next ones in turn, with a growing pause between tries. TLS:
    pass ``ssl_context``, or ``tls=True`` (and ``tls_ca``, a CA file; default: the system's).

    Received messages are buffered: nothing that arrives together with a reply is lost. A
    REDIRECT is followed wherever it arrives (also one that ``login`` stopped waiting for after
    ``redirect_wait`` seconds and ``recv`` meets later). Failure replies raise from
    ``register``/``login``; after login ``recv`` returns them like any message (``error_for``
    turns one into its exception), and the server closes the connection after them.

    Threads: one thread may receive (and reconnect) while others send; sends are serialised by
    a lock and raise ``ConnectionLost`` while there is no connection. Over TLS, send and receive
    from one thread: OpenSSL does not promise that one connection may read and write at once.
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, username=ANONYMOUS, secret=None, *,
                 servers=(), max_redirects=10, timeout=10.0, redirect_wait=0.05,
                 tls=False, tls_ca=None, ssl_context=None):
        self.host = host  # where the connection is (or was last)
        self.port = port
        self.servers = list(dict.fromkeys([(host, port), *((h, p) for h, p in servers)]))
        self.username = username or ANONYMOUS
        self.secret = secret
        self.generated_secret = False
        self.max_redirects = max_redirects
        self.timeout = timeout  # for connecting and for each awaited reply
        self.redirect_wait = redirect_wait  # how long login waits for a REDIRECT after success
        if ssl_context is None and (tls or tls_ca is not None):
            ssl_context = tls_context(tls_ca)
        self.ssl_context = ssl_context  # None: plain TCP
        self.redirects = []  # (host, port) of every REDIRECT followed, in order
        self.logged_in = False
        self.sock = None
        self._poll = None
        self._buffer = b""  # an incomplete last line
        self._queue = collections.deque()  # messages received and not yet returned
        self._eof = False
        self._send_lock = threading.Lock()  # serialises sendall and socket swaps

    def __repr__(self):
        return f"<Client {self.username} {self.host}:{self.port}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.logged_in:
            self.logout()
        self.close()

    # --- start-up --------------------------------------------------------------------------

    def connect(self):
        """Open the connection, register if there is a username but no secret, then log in."""
        if self.username != ANONYMOUS and self.secret is None:
            self.register()
        self.login()

    def register(self):
        """REGISTER (generating a secret if there is none) and wait for REGISTER_SUCCESS."""
        if self.logged_in:
            raise ClientError("REGISTER is not allowed once logged in")
        if self.secret is None:
            self.secret = generate_secret()
            self.generated_secret = True
        self._ensure_open()
        self.send(protocol.register(self.username, self.secret))
        self._await_reply("REGISTER_SUCCESS")

    def login(self):
        """LOGIN and wait for LOGIN_SUCCESS; follow a REDIRECT to the next server and log in there,
        up to ``max_redirects`` hops."""
        if self.logged_in:
            raise ClientError(f"already logged in as {self.username}")
        self._ensure_open()
        self._login_chain(0)

    def reconnect(self, stop=None):
        """Log in again after the connection was lost (register is never repeated).

        Tries the server after the lost one in ``servers`` first, then the others in turn, the
        lost one last (a server reached through a REDIRECT is tried first, then the list),
        waiting 0.2 s before the first try and twice as long before each next one, up to 5 s.
        Returns True once logged in, False as soon as ``stop`` (a ``threading.Event``) is set.
        Raises a ``FATAL_ERRORS`` failure, or ``LoginFailed`` when it keeps coming.
        """
        stop = stop or threading.Event()
        lost = (self.host, self.port)
        self.close()
        order = failover_order(self.servers, lost)
        wait = FIRST_RETRY
        login_failures = 0
        attempt = 0
        while not stop.wait(wait):
            host, port = self.host, self.port = order[attempt % len(order)]
            attempt += 1
            try:
                self._open()
                self._login_chain(0)
                return True
            except LoginFailed as exc:
                login_failures += 1
                if login_failures >= RECONNECT_LOGIN_FAILURES:
                    raise
                log.info("reconnecting to %s:%d: %s", host, port, exc)
            except FATAL_ERRORS:
                raise
            except (ClientError, OSError) as exc:
                log.info("reconnecting to %s:%d: %s", host, port,
                         exc if isinstance(exc, ClientError) else exc.strerror or exc)
            self.close()
            wait = min(wait * 2, MAX_RETRY)
        return False

    def _login_chain(self, hops):
        retries = 0
        while True:
            self.send(protocol.login(self.username, self.secret))
            try:
                self._await_reply("LOGIN_SUCCESS")
            except LoginFailed:
                # Users spread through the network eventually: a server we were just sent to may
                # not have learnt ours yet. Ask it again a few times before believing it.
                if not hops or self.username == ANONYMOUS or retries >= LOGIN_RETRIES:
                    raise
                retries += 1
                log.info("login failed at %s:%d after a redirect; retrying", self.host, self.port)
                time.sleep(LOGIN_RETRY_WAIT * 2 ** retries)
                self._open()
                continue
            target = self._redirect_after_login()
            if target is None:
                self.logged_in = True
                log.debug("logged in as %s at %s:%d", self.username, self.host, self.port)
                return
            hops += 1
            if hops > self.max_redirects:
                self.close()
                raise TooManyRedirects(f"more than {self.max_redirects} redirects in a row "
                                       f"(the last to {target[0]}:{target[1]})")
            log.info("redirected to %s:%d", *target)
            self.redirects.append(target)
            self.host, self.port = target
            self._open()
            retries = 0

    def _redirect_after_login(self):
        """The (host, port) of a REDIRECT that follows LOGIN_SUCCESS, or None."""
        deadline = time.monotonic() + self.redirect_wait
        while True:
            if self._queue:
                if self._queue[0].get("command") != "REDIRECT":
                    return None  # something else came first: no redirect (it stays queued)
                return redirect_target(self._queue.popleft())
            if self._eof:
                return None
            try:
                self._fill(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None

    def _await_reply(self, expected):
        deadline = time.monotonic() + self.timeout
        while True:
            while self._queue:
                message = self._queue.popleft()
                if message.get("command") == expected:
                    return message
                error = error_for(message)
                if error is None:
                    error = UnexpectedReply(f"expected {expected} from {self.host}:{self.port}, "
                                            f"got {one_line(message)}", message)
                self.close()
                raise error
            if self._eof:
                self.close()
                raise ConnectionLost(f"{self.host}:{self.port} closed the connection before "
                                     f"sending {expected}")
            remaining = deadline - time.monotonic()
            try:
                self._fill(max(0.0, remaining))
            except TimeoutError:
                self.close()
                raise ReplyTimeout(f"no {expected} from {self.host}:{self.port} within "
                                   f"{self.timeout:g} s") from None

    # --- sending ---------------------------------------------------------------------------

    def send(self, message):
        """Send any message (a dict) as one line."""
        self._sendall(protocol.encode(message))

    def send_activity(self, activity):
        """Send one ACTIVITY_MESSAGE carrying ``activity`` (a dict)."""
        self._sendall(self._activity_encoder()(activity))

    def send_activities(self, activities):
        """Send an ACTIVITY_MESSAGE for each activity, all written with one ``sendall``."""
        line = self._activity_encoder()
        data = b"".join([line(activity) for activity in activities])
        if data:
            self._sendall(data)

    def _activity_encoder(self):
        """A function encoding one ACTIVITY_MESSAGE line. The fixed part (command, username,
        secret) is encoded once and the activity spliced in last: a third less time per line
        than encoding each whole message, which a benchmark sending millions notices."""
        head = protocol.activity_message(self.username, self.secret, None)
        del head["activity"]
        prefix = protocol.encode(head)[:-2] + b',"activity":'  # without its closing "}\n"

        def line(activity):
            if not isinstance(activity, dict):
                raise TypeError(f"an activity must be a dict, not {type(activity).__name__}")
            return prefix + protocol.encode(activity)[:-1] + b"}\n"

        return line

    def _sendall(self, data):
        with self._send_lock:
            if self.sock is None:
                raise ConnectionLost("not connected")
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionLost(f"sending to {self.host}:{self.port} failed: "
                                     f"{exc.strerror or exc}") from None

    # --- receiving -------------------------------------------------------------------------

    def recv(self, timeout=None):
        """The next received message (a dict), or None once the server has closed the connection.

        ``timeout`` in seconds (None: wait as long as it takes; 0: only what has arrived);
        raises ``TimeoutError`` when it passes. Raises ``ConnectionLost`` when the connection
        breaks (reset), ``UnexpectedReply`` for a line that is not a JSON object.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._queue:
                message = self._queue.popleft()
                if message.get("command") == "REDIRECT" and self.logged_in:
                    self._follow(message)
                    continue
                return message
            if self._eof or self.sock is None:
                return None
            self._fill(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def messages(self, timeout=None):
        """Iterate over received messages until the server closes the connection; ``timeout``
        applies to each message."""
        while True:
            message = self.recv(timeout)
            if message is None:
                return
            yield message

    def _follow(self, message):
        """A REDIRECT that arrived after ``login`` returned: log in over there instead."""
        target = redirect_target(message)
        log.info("redirected to %s:%d (late)", *target)
        self.logged_in = False
        self.redirects.append(target)
        self.host, self.port = target
        self._open()
        self._login_chain(1)

    def _fill(self, timeout):
        """Receive one chunk and queue the messages it completes. ``timeout`` None blocks."""
        sock, poller = self.sock, self._poll
        if sock is None:  # closed by another thread
            self._eof = True
            return
        # TLS may hold decrypted bytes that poll cannot see: read those without waiting
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if timeout is not None and not buffered and not poller.poll(math.ceil(timeout * 1000)):
            raise TimeoutError(f"no message from {self.host}:{self.port} within {timeout:g} s")
        try:
            data = sock.recv(RECV_SIZE)
        except OSError as exc:
            self._eof = True
            raise ConnectionLost(f"the connection to {self.host}:{self.port} broke: "
                                 f"{exc.strerror or exc}") from None
        if not data:
            self._eof = True
            if self._buffer.strip():  # a last line without its newline
                self._queue_line(self._buffer)
            self._buffer = b""
            return
        if self._buffer:
            data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE:
            self.close()
            raise UnexpectedReply(f"{self.host}:{self.port} sent a line longer than {MAX_LINE} bytes")
        for line in lines:
            self._queue_line(line)

    def _queue_line(self, line):
        if not line.strip():  # blank lines are allowed; a "\r" before "\n" is JSON whitespace
            return
        try:
            message = protocol.decode(line)
        except protocol.InvalidMessage as exc:
            self.close()
            raise UnexpectedReply(f"{self.host}:{self.port} sent a line that is not a JSON object "
                                  f"({exc.info}): {line[:200]!r}") from None
        self._queue.append(message)

    # --- ending ----------------------------------------------------------------------------

    def logout(self):
        """Send LOGOUT (the server closes the connection; ``recv`` still returns what it sent
        before that, then None). Does nothing if the connection is already gone."""
        self.logged_in = False
        with contextlib.suppress(ConnectionLost):
            self.send(protocol.logout())

    def close(self):
        """Close the connection (idempotent). Messages already received stay readable."""
        with self._send_lock:
            sock, self.sock = self.sock, None
        self.logged_in = False
        self._eof = True
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def fileno(self):
        """The socket's file descriptor (for select/poll), -1 when not connected."""
        sock = self.sock
        return sock.fileno() if sock is not None else -1

    def _ensure_open(self):
        """A connection for register/login: the one open, else the first server that answers."""
        if self.sock is not None and not self._eof:
            return
        for number, (host, port) in enumerate(self.servers, 1):
            self.host, self.port = host, port
            try:
                self._open()
                return
            except OSError as exc:
                if number == len(self.servers):
                    raise
                log.info("cannot connect to %s:%d (%s); trying the next server", host, port,
                         exc.strerror or exc)

    def _open(self):
        """(Re)connect to ``host:port`` (with TLS if configured), with an empty buffer."""
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # blocking; recv timeouts are done with poll, so that a receiving
        # thread never changes the socket's mode under a sending one
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        self._buffer = b""
        self._queue.clear()
        self._eof = False
        with self._send_lock:
            self.sock, self._poll = sock, poller


def failover_order(servers, lost):
    """The order ``reconnect`` tries servers in after losing ``lost``: the ones after it in
    ``servers``, then those before it, then ``lost`` itself (it may just be restarting). A server
    not in the list (reached through a REDIRECT) is tried first, then the whole list."""
    if lost not in servers:
        return [lost, *servers]
    after = servers.index(lost) + 1
    return servers[after:] + servers[:after]


def redirect_target(message):
    """(hostname, port) from a REDIRECT. Ports may arrive as floats from other implementations."""
    hostname, port = message.get("hostname"), message.get("port")
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if not isinstance(hostname, str) or not hostname or isinstance(port, bool) \
            or not isinstance(port, int) or not 0 < port < 65536:
        raise UnexpectedReply(f"REDIRECT without a usable hostname and port: {one_line(message)}",
                              message)
    return hostname, port


def _keepalive(sock):
    """Notice a server that vanished without a word (a cut cable) within about half a minute,
    even while idle: servers send clients no heartbeats."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
