"""Clients that record everything they receive, for the recovery and chaos tests.

A ``Recorder`` is a logged-in ``LineClient`` whose reader thread keeps every message with the time
it arrived, so a test can send from several clients at once and check afterwards what each one
received, in which order, and whether it was disconnected. Logging in follows the Project 1 rule
that a server may answer LOGIN_SUCCESS with a REDIRECT right after it: ``log_in`` waits briefly
for one and reports it instead of returning a client that is about to be closed.
"""

import socket
import threading
import time

from harness import TIMEOUT, LineClient, wait_until

REDIRECT_WAIT = 0.3  # a REDIRECT follows LOGIN_SUCCESS at once, from the same handler


class Redirected(Exception):
    def __init__(self, hostname, port):
        super().__init__(f"redirected to {hostname}:{port}")
        self.hostname = hostname
        self.port = port


class Recorder:
    """A logged-in client; a daemon thread records what it receives (see the module doc)."""

    def __init__(self, client, name, username="anonymous", secret=None, port=None, first=()):
        self.client = client
        self.name = name
        self.username = username
        self.secret = secret
        self.port = port
        self.opened_at = time.monotonic()
        self.closed_at = None  # when the server closed the connection (or we did)
        self.errors = []  # anything unexpected the reader met (schema violations included)
        self._cond = threading.Condition()  # guards messages and closed_at
        self.messages = [(self.opened_at, m) for m in first]
        self._thread = threading.Thread(target=self._read, name=f"recorder-{name}", daemon=True)
        self._thread.start()

    def __repr__(self):
        return f"<Recorder {self.name} on {self.port}>"

    def _read(self):
        while True:
            try:
                message = self.client.recv(timeout=3600)
            except socket.timeout:
                continue
            except OSError:
                message = None
            except Exception as exc:  # noqa: BLE001 - a bad message must fail the test, not the thread
                self.errors.append(repr(exc))
                message = None
            with self._cond:
                if message is None:
                    if self.closed_at is None:
                        self.closed_at = time.monotonic()
                    self._cond.notify_all()
                    return
                self.messages.append((time.monotonic(), message))
                self._cond.notify_all()

    # --- sending ---------------------------------------------------------------------------

    def send(self, message):
        """Send a message; False if the connection is gone."""
        try:
            self.client.send(message)
            return True
        except OSError:
            return False

    def send_activity(self, body):
        message = {"command": "ACTIVITY_MESSAGE", "username": self.username, "activity": body}
        if self.secret is not None:
            message["secret"] = self.secret
        return self.send(message)

    def close(self):
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; close() alone does not
        except OSError:
            pass
        self.client.close()
        self._thread.join(timeout=5)

    # --- what was received -----------------------------------------------------------------

    @property
    def open(self):
        return self.closed_at is None

    def received(self):
        with self._cond:
            return [message for _at, message in self.messages]

    def broadcasts(self):
        """The ACTIVITY_BROADCAST messages received, in order."""
        return [m for m in self.received() if m["command"] == "ACTIVITY_BROADCAST"]

    def bodies(self):
        return [m["activity"] for m in self.broadcasts()]

    def wait(self, predicate, timeout=TIMEOUT, message="condition"):
        """Wait until ``predicate(self)`` holds; on a timeout, say what was received."""
        try:
            return wait_until(lambda: predicate(self), timeout, message=f"{self.name}: {message}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; received {self.summary()}") from None

    def summary(self):
        """What was received, briefly: numbered activities per sender, and the connection state."""
        parts = []
        for sender, seqs in sequences(self.bodies()).items():
            shown = seqs if len(seqs) <= 12 else seqs[:6] + ["..."] + seqs[-6:]
            parts.append(f"{sender}: {len(seqs)} {shown}")
        state = "open" if self.open else "closed"
        return f"[{'; '.join(parts)}] ({state}, {len(self.messages)} messages)"

    def wait_closed(self, timeout=TIMEOUT):
        with self._cond:
            self._cond.wait_for(lambda: self.closed_at is not None, timeout)
            assert self.closed_at is not None, f"{self.name} was not disconnected within {timeout} s"


def log_in(port, name, username="anonymous", secret=None, redirect_wait=REDIRECT_WAIT,
           register=False, timeout=TIMEOUT):
    """A ``Recorder`` logged in on ``port`` (REGISTER first if ``register``). Raises ``Redirected``
    when the server redirects the client, and AssertionError on any failure reply."""
    client = LineClient(port, timeout=timeout)
    try:
        if register:
            client.send({"command": "REGISTER", "username": username, "secret": secret})
            client.expect("REGISTER_SUCCESS")
        login = {"command": "LOGIN", "username": username}
        if secret is not None:
            login["secret"] = secret
        client.send(login)
        client.expect("LOGIN_SUCCESS")
        try:
            after = client.recv(timeout=redirect_wait)
        except socket.timeout:
            after = None
        else:
            if after is None:
                raise AssertionError(f"{name}: closed right after LOGIN_SUCCESS")
            if after["command"] == "REDIRECT":
                raise Redirected(after["hostname"], after["port"])
    except BaseException:
        client.close()
        raise
    return Recorder(client, name, username, secret, port, first=[after] if after else [])


def log_in_here(port, name, username="anonymous", secret=None, timeout=TIMEOUT, **kwargs):
    """Log in on exactly this server, retrying while it redirects: the neighbours' announced loads
    lag behind logins, so a balanced network may redirect for a moment."""
    def attempt():
        try:
            return log_in(port, name, username, secret, **kwargs)
        except Redirected:
            return None
    return wait_until(attempt, timeout, interval=0.1, message=f"{name} to log in on {port} without a redirect")


def try_login(port, username, secret, timeout=TIMEOUT):
    """The reply command to LOGIN (LOGIN_SUCCESS or LOGIN_FAILED); the connection is closed."""
    return _reply_to("LOGIN", port, username, secret, timeout)


def try_register(port, username, secret, timeout=TIMEOUT):
    """The reply command to REGISTER (REGISTER_SUCCESS or REGISTER_FAILED); the connection is
    closed."""
    return _reply_to("REGISTER", port, username, secret, timeout)


def _reply_to(command, port, username, secret, timeout):
    client = LineClient(port, timeout=timeout)
    try:
        client.send({"command": command, "username": username, "secret": secret})
        reply = client.recv()
        assert reply is not None, f"{command} {username} on {port}: closed without a reply"
        return reply["command"]
    finally:
        client.close()


def sequences(bodies, key="sender", seq="seq"):
    """{sender: [seq, ...]} in the order received, for bodies carrying both fields."""
    out = {}
    for body in bodies:
        if key in body and seq in body:
            out.setdefault(body[key], []).append(body[seq])
    return out
