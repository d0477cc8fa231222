"""activitynet client: join an activitynet network from a terminal, or drive it from a script.

Usage:
  activitynet.client [options]

Run it as "python -m activitynet.client". Project 1 example: -u alice -rh localhost -rp 3780 -s abc

Options (the Project 1 flag in brackets):
  --username=NAME        [-u] the user to log in as [default: anonymous]
  --secret=SECRET        [-s] the user's secret. A username without a secret registers that
                         user first, with a generated secret that is printed
  --remote-host=HOST     [-rh] the server to connect to [default: localhost]
  --remote-port=PORT     [-rp] its port [default: 3780]
  --json                 print each received message as one raw JSON line
  --no-reconnect         exit (status 1) when the server goes away, instead of reconnecting
  --max-redirects=N      most REDIRECTs followed in a row [default: 10]
  --log-level=LEVEL      debug, info, warning or error [default: warning]
  -h --help              show this text

Each line typed is sent as an activity: a JSON object as it is, any other text as
{"message": "<text>"}; blank lines are ignored. Received activities are printed as
"<sender>: <content>". Ctrl-D (end of input) or Ctrl-C logs out and exits with status 0.
stdout carries only what was received; status lines (the generated secret, redirects, lost and
restored connections, errors) go to stderr. Exit status: 0 after logging out, 1 on a failure
reply or a lost connection that is not restored, 2 for a bad command line.

Design: ``Client`` is the library (one connection, the start-up handshake, buffered reads); the
command line is a ``Session`` of two threads. The main thread reads stdin and queues activities;
the network thread owns the ``Client``: it sends what is queued, prints what arrives, and
reconnects when the server goes away. Only the network thread touches the socket, so no lock is
needed around it; the queue is guarded by ``Session._lock`` and a pipe wakes the network thread.
"""

import codecs
import collections
import contextlib
import io
import json
import logging
import math
import os
import secrets
import select
import socket
import sys
import threading
import time

from . import cli, protocol

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 3780
RECV_SIZE = 256 * 1024
MAX_LINE = 64 * 1024 * 1024  # a server sending a longer line than this is broken or hostile
LOGIN_RETRIES = 4  # LOGIN_FAILED right after a redirect: the target may not know the user yet
LOGIN_RETRY_WAIT = 0.1

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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
    "LOGIN_FAILED": LoginFailed,
    "REGISTER_FAILED": RegisterFailed,
    "AUTHENTICATION_FAIL": AuthenticationFailed,
    "INVALID_MESSAGE": InvalidMessage,
}


def error_for(message):
    """The exception matching a failure reply (LOGIN_FAILED, ...), or None for other messages."""
    kind = FAILURE_REPLIES.get(message.get("command"))
    if kind is None:
        return None
    info = message.get("info")
    return kind(info if isinstance(info, str) else _dumps(message), message)


def generate_secret():
    return secrets.token_hex(16)


# --- the library --------------------------------------------------------------------------------

class Client:
    """One client connection to an activitynet server.

    ``connect()`` does what a Project 1 client does at start-up: a username without a secret is
    registered first (with a generated secret, kept in ``secret``), then it logs in, following
    REDIRECTs (``redirects`` lists the hops; ``host``/``port`` say where it ended up)::

        with Client("127.0.0.1", 3780, "alice") as client:
            client.connect()
            client.send_activity({"text": "hello"})
            for message in client.messages(timeout=5):
                print(message)

    Received messages are buffered: nothing that arrives together with a reply is lost. A
    REDIRECT is followed wherever it arrives (also one that ``login`` stopped waiting for after
    ``redirect_wait`` seconds and ``recv`` meets later). Failure replies raise from
    ``register``/``login``; after login ``recv`` returns them like any message (``error_for``
    turns one into its exception), and the server closes the connection after them.

    Threads: one thread may receive while others send (sends are serialised by a lock).
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, username=ANONYMOUS, secret=None, *,
                 max_redirects=10, timeout=10.0, redirect_wait=0.05):
        self.host = host
        self.port = port
        self.username = username or ANONYMOUS
        self.secret = secret
        self.generated_secret = False
        self.max_redirects = max_redirects
        self.timeout = timeout  # for connecting and for each awaited reply
        self.redirect_wait = redirect_wait  # how long login waits for a REDIRECT after success
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
                                            f"got {_dumps(message)}", message)
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
        """A function encoding one ACTIVITY_MESSAGE line; the fixed head is encoded once."""
        head = {"command": "ACTIVITY_MESSAGE", "username": self.username}
        if self.secret is not None:
            head["secret"] = self.secret
        prefix = _dumps(head)[:-1] + ',"activity":'

        def line(activity):
            if not isinstance(activity, dict):
                raise TypeError(f"an activity must be a dict, not {type(activity).__name__}")
            try:
                return (prefix + _dumps(activity) + "}\n").encode()
            except UnicodeEncodeError:  # a lone surrogate ("\\ud800" is valid JSON): escape it
                return protocol.encode(protocol.activity_message(self.username, self.secret, activity))

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
        if timeout is not None and not poller.poll(math.ceil(timeout * 1000)):
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
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            self.close()
            raise UnexpectedReply(f"{self.host}:{self.port} sent a line that is not a JSON object: "
                                  f"{line[:200]!r}")
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
        if self.sock is None or self._eof:
            self._open()

    def _open(self):
        """(Re)connect to ``host:port`` with an empty buffer."""
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
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


def redirect_target(message):
    """(hostname, port) from a REDIRECT. Ports may arrive as floats from other implementations."""
    hostname, port = message.get("hostname"), message.get("port")
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if not isinstance(hostname, str) or not hostname or isinstance(port, bool) \
            or not isinstance(port, int) or not 0 < port < 65536:
        raise UnexpectedReply(f"REDIRECT without a usable hostname and port: {_dumps(message)}",
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


# --- what a person types and reads --------------------------------------------------------------

def activity_from_line(line):
    """The activity to send for one line typed: a JSON object as it is, other text wrapped as
    {"message": text}; None for a blank line."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
    return {"message": text}


def format_activity(activity):
    """One readable line: the sender, then the content (just the text of a plain message)."""
    if not isinstance(activity, dict):
        return f"?: {_dumps(activity)}"
    sender = activity.get("authenticated_user", "?")
    rest = {key: value for key, value in activity.items() if key != "authenticated_user"}
    text = rest.get("message")
    if len(rest) == 1 and isinstance(text, str) and text.isprintable():
        return f"{sender}: {text}"
    return f"{sender}: {_dumps(rest)}"


# --- the command line ---------------------------------------------------------------------------

ALIASES = {"-u": "--username", "-s": "--secret", "-rh": "--remote-host", "-rp": "--remote-port"}
LOG_LEVELS = ("debug", "info", "warning", "error")
FIRST_RETRY = 0.2  # reconnect backoff: 0.2 s, doubling up to MAX_RETRY
MAX_RETRY = 5.0
RECONNECT_LOGIN_FAILURES = 6  # a restarted server may need a moment to learn the users again
LOGOUT_WAIT = 1.0  # after LOGOUT, how long to keep printing what is still arriving
PROGRAM = "activitynet.client"


class Options:
    def __init__(self, args):
        self.username = args["--username"]
        self.secret = args["--secret"]
        self.host = args["--remote-host"]
        self.port = remote_port(args["--remote-port"])
        self.json = args["--json"]
        self.reconnect = not args["--no-reconnect"]
        self.max_redirects = cli.positive_int(args["--max-redirects"], "--max-redirects", minimum=0)
        self.log_level = args["--log-level"].lower()
        if not self.username:
            raise cli.UsageError("-u/--username must not be empty")
        if self.secret is not None and not self.secret:
            raise cli.UsageError("-s/--secret must not be empty")
        if not self.host.strip():
            raise cli.UsageError("-rh/--remote-host must not be empty")
        if self.log_level not in LOG_LEVELS:
            raise cli.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                                 f"not {self.log_level!r}")


def remote_port(text):
    try:
        number = cli.port(text, "-rp/--remote-port")
    except cli.UsageError:
        number = 0
    if number == 0:  # 0 means "any free port" to a listener, nothing to a client
        raise cli.UsageError(f"-rp/--remote-port must be a port number from 1 to 65535, not {text!r}")
    return number


def parse_options(argv):
    """Options from the command line; None when help was asked for. Raises UsageError."""
    args = cli.parse(__doc__, argv, ALIASES)
    return None if args is None else Options(args)


class Output:
    """Whole lines to stdout and stderr, one writer at a time."""

    def __init__(self, stdout, stderr):
        self.stdout = stdout
        self.stderr = stderr
        self.lock = threading.Lock()

    def lines(self, lines):
        if lines:
            with self.lock:
                self.stdout.write("".join(line + "\n" for line in lines))
                self.stdout.flush()

    def status(self, text):
        with self.lock:
            self.stderr.write(f"{PROGRAM}: {text}\n")
            self.stderr.flush()

    def error(self, text):
        self.status(f"error: {text}")


# Failures a reconnection would not cure: the session ends with status 1.
FATAL_ERRORS = (LoginFailed, RegisterFailed, AuthenticationFailed, InvalidMessage, UnexpectedReply)


class Fatal(Exception):
    """End the session with status 1; the message has been printed."""


class Session:
    """The command-line client: see the module docstring's Design paragraph."""

    def __init__(self, options, out):
        self.options = options
        self.out = out
        self.client = None
        self.result = None
        self._lock = threading.Lock()  # guards _outgoing, _stopping, _woken
        self._outgoing = collections.deque()
        self._stopping = False
        self._woken = False
        self.stop_event = threading.Event()  # set with _stopping, for waits in the network thread
        self.done = threading.Event()  # the network thread has finished
        self._wake_r, self._wake_w = os.pipe()  # wakes the network thread
        self._done_r, self._done_w = os.pipe()  # wakes the main thread
        for fd in (self._wake_w, self._done_w):
            os.set_blocking(fd, False)
        self._shown_redirects = 0

    def run(self, stdin):
        """Start up, then read ``stdin`` until it ends or the session fails; the exit status."""
        network = None
        # Ctrl-C (KeyboardInterrupt) may strike anywhere in here: whatever happens, a client that
        # logged in logs out, by the network thread if it runs, else right here.
        try:
            try:
                self.start()
            except (ClientError, OSError) as exc:
                self.out.error(describe(exc, self.client))
                return 1
            network = threading.Thread(target=self._network, name="network", daemon=True)
            network.start()
            self.read_input(stdin)
        finally:
            self.stop()
            if network is not None and network.ident is not None:
                network.join(LOGOUT_WAIT + 2 * self.client.timeout)
            elif self.client is not None:
                if self.client.logged_in:
                    self.client.logout()
                self.client.close()
            if network is None or not network.is_alive():
                self._close_pipes()
        return self.result if self.result is not None else 0

    def start(self):
        o = self.options
        client = self.client = Client(o.host, o.port, o.username, o.secret,
                                      max_redirects=o.max_redirects)
        if o.username != ANONYMOUS and o.secret is None:
            client.register()
            o.secret = client.secret  # reconnections log in with it
            self.out.status(f"registered {o.username} with the generated secret {client.secret} "
                            f"(log in again with: -u {o.username} -s {client.secret})")
        client.login()
        self._show_redirects(client)
        self.out.status(f"logged in as {o.username} at {client.host}:{client.port}")
        return client

    # --- main thread -----------------------------------------------------------------------

    def read_input(self, stdin):
        """Queue an activity per line until stdin ends or the network thread finishes."""
        try:
            fd = stdin.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            fd = None
        if fd is None:  # an in-memory stream (tests): it cannot block
            for line in stdin or ():
                if self.done.is_set():
                    return
                self.submit(activity_from_line(line))
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._done_r, select.POLLIN)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            ready = {ready_fd for ready_fd, _ in poller.poll()}
            if self._done_r in ready:
                return
            data = os.read(fd, 65536)
            text = pending + decoder.decode(data, final=not data)
            lines = text.split("\n")
            pending = lines.pop()
            if not data and pending:
                lines.append(pending)
            for line in lines:
                self.submit(activity_from_line(line))
            if not data:
                return

    def submit(self, activity):
        if activity is None:
            return
        with self._lock:
            self._outgoing.append(activity)
            wake = not self._woken
            self._woken = True
        if wake:
            _poke(self._wake_w)

    def stop(self):
        """Ask the network thread to send what is queued, log out and finish."""
        with self._lock:
            self._stopping = True
        self.stop_event.set()
        _poke(self._wake_w)

    # --- network thread --------------------------------------------------------------------

    def _network(self):
        try:
            code = self._serve()
        except Fatal:
            code = 1
        except BrokenPipeError:  # whoever read our stdout has gone; nobody to talk to
            code = 0
        except Exception:
            log.exception("the network thread failed")
            self.out.error("internal error (see the log above)")
            code = 1
        if self.client is not None:
            self.client.close()
        self.result = code
        self.done.set()
        _poke(self._done_w)

    def _serve(self):
        while True:
            client = self.client
            with self._lock:
                batch = list(self._outgoing)
                self._outgoing.clear()
                self._woken = False
            lost = False
            if batch:
                try:
                    client.send_activities(batch)
                except ConnectionLost:
                    with self._lock:
                        self._outgoing.extendleft(reversed(batch))  # resent once reconnected
                    lost = True
            with self._lock:
                finished = self._stopping and not self._outgoing
            if finished and not lost:
                self._logout(client)
                return 0
            if not lost:
                lost = not self._drain(client)
            if lost:
                with self._lock:
                    if self._stopping:
                        if self._outgoing:
                            self.out.error(f"the connection was lost; {len(self._outgoing)} "
                                           "activities were not sent")
                        return 0
                self.client = self._reconnect(client)
                if self.client is None:
                    return 0
                continue
            poller = select.poll()
            poller.register(client.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            if self._wake_r in {fd for fd, _ in poller.poll()}:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def _drain(self, client):
        """Print everything received so far; False once the connection has ended."""
        printed = []
        try:
            while True:
                try:
                    message = client.recv(timeout=0)
                except FATAL_ERRORS as exc:  # garbage, or a failure following a late REDIRECT
                    self.out.lines(printed)
                    printed = []
                    self.out.error(describe(exc, client))
                    raise Fatal from None
                except (ClientError, OSError) as exc:
                    if isinstance(exc, TimeoutError) and not isinstance(exc, ReplyTimeout):
                        return True  # nothing more has arrived
                    log.info("%s", exc)
                    return False
                finally:
                    self._show_redirects(client)
                if message is None:
                    return False
                self._show(message, printed)
                if len(printed) >= 1000:
                    self.out.lines(printed)
                    printed = []
        finally:
            self.out.lines(printed)

    def _show(self, message, printed):
        if self.options.json:
            printed.append(_dumps(message))
        error = error_for(message)
        if error is not None:
            self.out.lines(printed)
            printed.clear()
            self.out.error(describe(error, self.client))
            raise Fatal
        command = message.get("command")
        if command == "ACTIVITY_BROADCAST":
            if not self.options.json:
                printed.append(format_activity(message.get("activity")))
        elif not self.options.json:
            self.out.status(f"the server sent {_dumps(message)}")

    def _show_redirects(self, client):
        for host, port in client.redirects[self._shown_redirects:]:
            self.out.status(f"redirected to {host}:{port}")
        self._shown_redirects = len(client.redirects)

    def _logout(self, client):
        """LOGOUT, then print what the server still sends until it closes (briefly)."""
        client.logout()
        deadline = time.monotonic() + LOGOUT_WAIT
        printed = []
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                message = client.recv(remaining)
                if message is None:
                    break
                with contextlib.suppress(Fatal):
                    self._show(message, printed)
        except (ClientError, OSError):
            pass
        finally:
            self.out.lines(printed)
            client.close()

    def _reconnect(self, old):
        """Log in again after the connection was lost: a new Client, or None when stopping."""
        where = f"{old.host}:{old.port}"
        old.close()
        if not self.options.reconnect:
            self.out.error(f"lost the connection to {where}")
            raise Fatal
        self.out.status(f"lost the connection to {where}; reconnecting")
        o = self.options
        # The server we were on first, then the one we were told to use, turn about.
        targets = [(old.host, old.port)]
        if (o.host, o.port) not in targets:
            targets.append((o.host, o.port))
        wait = FIRST_RETRY
        login_failures = 0
        attempt = 0
        while not self.stop_event.wait(wait):
            host, port = targets[attempt % len(targets)]
            attempt += 1
            client = Client(host, port, o.username, o.secret, max_redirects=o.max_redirects)
            self._shown_redirects = 0
            try:
                client.login()
            except LoginFailed as exc:
                login_failures += 1
                if login_failures >= RECONNECT_LOGIN_FAILURES:
                    self.out.error(describe(exc, client))
                    raise Fatal from None
                log.info("reconnecting to %s:%d: %s", host, port, exc)
            except FATAL_ERRORS as exc:
                self.out.error(describe(exc, client))
                raise Fatal from None
            except (ClientError, OSError) as exc:
                log.info("reconnecting to %s:%d: %s", host, port,
                         exc if isinstance(exc, ClientError) else exc.strerror or exc)
            else:
                self.client = client
                self._show_redirects(client)
                self.out.status(f"reconnected as {o.username} at {client.host}:{client.port}")
                return client
            client.close()
            wait = min(wait * 2, MAX_RETRY)
        return None

    def _close_pipes(self):
        for fd in (self._wake_r, self._wake_w, self._done_r, self._done_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _poke(fd):
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"x")


def describe(exc, client):
    """One line a person can act on; ``client`` says where it happened."""
    if isinstance(exc, ClientError):
        return str(exc)
    return f"cannot connect to {client.host}:{client.port}: {exc.strerror or exc}"


def run(argv, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr):
    """The client command; returns the exit status."""
    out = Output(stdout, stderr)
    options, status = cli.settle(PROGRAM, __doc__, parse_options, argv, stdout, stderr)
    if options is None:
        return status
    log.setLevel(options.log_level.upper())
    try:
        return Session(options, out).run(stdin)
    except KeyboardInterrupt:  # Ctrl-C: Session.run has logged out on its way out
        return 0


def main():
    # A lone surrogate ("\\ud800" is valid JSON) or a character the terminal cannot show is
    # printed as its escape; in a JSON string that is the same JSON.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s")
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
