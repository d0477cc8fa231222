"""Test harness: real servers (in this process or as subprocesses) and raw JSON-line clients.

Tests wait on conditions (``wait_until``), never on bare sleeps, with generous timeouts so they
pass on a slow, busy machine. Every message a test client receives is validated against its
schema, so code and ``schemas/`` cannot drift apart.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from activitynet import protocol, schemas, testing
from activitynet.server import Server, Settings

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
SECRET = "test-secret"


def wait_until(predicate, timeout=TIMEOUT, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class LineClient:
    """A raw TCP peer speaking JSON lines, as a marking script or telnet user would."""

    def __init__(self, port, host="127.0.0.1", timeout=TIMEOUT, sock=None):
        self.sock = sock if sock is not None else socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buffer = b""
        self.eof = False

    @classmethod
    def accepted(cls, listener, timeout=TIMEOUT):
        """The next connection ``listener`` accepts, as a LineClient (to play a dialled server)."""
        listener.settimeout(timeout)
        sock, _address = listener.accept()
        sock.settimeout(timeout)
        return cls(None, timeout=timeout, sock=sock)

    # sending
    def send(self, message):
        """Send a dict as one compact JSON line."""
        self.send_raw(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    # receiving
    def recv_line(self, timeout=None):
        """The next line (bytes, without terminator), or None at EOF."""
        self.sock.settimeout(timeout or self.timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def recv(self, timeout=None, skip_heartbeats=True):
        """The next message (validated against its schema), or None at EOF."""
        while True:
            line = self.recv_line(timeout)
            if line is None:
                return None
            if skip_heartbeats and line == protocol.HEARTBEAT_LINE:
                continue
            message = json.loads(line)
            assert isinstance(message, dict), line
            assert message.get("command") in schemas.COMMANDS, f"unknown command sent: {line!r}"
            schemas.validate(message)
            return message

    def expect(self, command, timeout=None, **fields):
        """Receive one message and check its command (and any given fields)."""
        message = self.recv(timeout)
        assert message is not None, f"connection closed while expecting {command}"
        assert message["command"] == command, f"expected {command}, got {message}"
        for key, value in fields.items():
            assert message[key] == value, f"{key}: expected {value!r}, got {message[key]!r} in {message}"
        return message

    def expect_closed(self, timeout=None):
        """The server closes the connection without sending anything more."""
        message = self.recv(timeout)
        assert message is None, f"expected the connection to close, got {message}"

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def login(port, username="anonymous", secret=None):
    """A client logged in on ``port`` (anonymous by default)."""
    client = LineClient(port)
    message = {"command": "LOGIN", "username": username}
    if secret is not None:
        message["secret"] = secret
    client.send(message)
    client.expect("LOGIN_SUCCESS")
    return client


def register(port, username, secret):
    client = LineClient(port)
    client.send({"command": "REGISTER", "username": username, "secret": secret})
    client.expect("REGISTER_SUCCESS")
    return client


def activity(client, body, username="anonymous", secret=None):
    message = {"command": "ACTIVITY_MESSAGE", "username": username, "activity": body}
    if secret is not None:
        message["secret"] = secret
    client.send(message)


# --- servers in this process --------------------------------------------------------------------

class LocalServer:
    """A ``Server`` running in a thread of the test process; its state is read through
    ``State.snapshot()`` and ``State.user_directory()`` (copies taken under the lock)."""

    def __init__(self, remote=None, secret=SECRET, **settings):
        options = dict(local_port=0, local_host="127.0.0.1", bind="127.0.0.1", secret=secret,
                       activity_interval=500)
        if remote is not None:
            options.update(remote_host="127.0.0.1", remote_port=remote.port)
        options.update(settings)
        self.server = Server(Settings(**options))
        self.port = self.server.port
        self.state = self.server.state  # its public verbs only: load(), has_activity(), ...
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"server-{self.port}")
        self.thread.start()

    def snapshot(self):
        return self.server.state.snapshot()

    def links(self):
        return self.snapshot()["links"]

    def users(self):
        """{username: secret} registered here, a copy."""
        return self.server.state.user_directory()[0]

    def blocked(self):
        return self.server.state.user_directory()[1]

    def live_links(self):
        return sum(1 for link in self.links() if link["live"] and link["peer"])

    def stop(self):
        self.server.shutdown()
        self.thread.join(timeout=10)
        self.server.server_close()
        assert not self.thread.is_alive()


def wait_links(*servers_and_counts, timeout=TIMEOUT):
    """Wait until each (server, n) has n live, announced server links."""
    for server, count in servers_and_counts:
        wait_until(lambda: server.live_links() == count, timeout,
                   message=f"{count} live links on server {server.port}")


# --- servers as processes -----------------------------------------------------------------------

class ServerProcess(testing.ServerProcess):
    """``python -m activitynet.server`` started as a marker would, with the Project 1 flags (the
    one implementation shared with the benchmarks); ``stop`` also checks no thread crashed."""

    def __init__(self, remote_port=None, secret=SECRET, port=0, extra=(), interval=500):
        super().__init__(remote_port=remote_port, secret=secret, port=port, interval=interval, extra=extra)

    def stop(self):
        """SIGTERM, and check the exit was clean and no thread crashed."""
        code = super().stop()
        if code is not None:
            assert "Traceback" not in self.log_text(), self.log_text()
        return code


def server_errors(caplog, tracebacks_only=False):
    """activitynet log records of level ERROR (or only those with a traceback) from every phase
    of the current test, for an autouse fixture to check after ``yield``. (``caplog.records``
    alone holds only the current phase, which after ``yield`` is the teardown.)"""
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    return [r.getMessage() for r in records if r.name.startswith("activitynet")
            and (r.exc_info if tracebacks_only else r.levelno >= logging.ERROR)]
