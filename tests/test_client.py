"""The client: the ``Client`` library against real and scripted servers, and
``python -m activitynet.client`` run as a subprocess the way a person or a marking script runs it.

Scripted ("fake") servers are raw sockets in this process that answer as a test says; they
provoke replies a correct server never sends to a correct client (AUTHENTICATION_FAIL, ...)
and pin down timing (a REDIRECT that arrives late). Everything else runs against real servers.
"""

import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from activitynet import schemas
from activitynet.client import (AuthenticationFailed, Client, ConnectionLost, InvalidMessage,
                                LoginFailed, RegisterFailed, TooManyRedirects, error_for)
from activitynet.client import failover_order, terminal
from activitynet.client.terminal import activity_from_line, format_activity
from harness import ROOT, TIMEOUT, LineClient, activity, login, register, wait_links, wait_until

HOST = "127.0.0.1"


# --- helpers ------------------------------------------------------------------------------------

class ClientProcess:
    """``python -m activitynet.client`` with pipes; its output is collected by two threads."""

    def __init__(self, port, *args, host=HOST):
        argv = [sys.executable, "-m", "activitynet.client", "-rh", host, "-rp", str(port), *args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     cwd=str(ROOT))
        self.out = []
        self.err = []
        self._lock = threading.Lock()
        self._drains = [threading.Thread(target=self._drain, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for thread in self._drains:
            thread.start()

    def _drain(self, stream, lines):
        for raw in stream:
            with self._lock:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def lines(self, which):
        with self._lock:
            return list(self.out if which == "out" else self.err)

    def wait_line(self, pattern, which="err", timeout=TIMEOUT):
        """The first match of ``pattern`` in a stdout ("out") or stderr ("err") line."""
        def find():
            for line in self.lines(which):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._drains):
                raise AssertionError(f"client exited ({self.proc.returncode}) before printing "
                                     f"{pattern!r}:\n{self.transcript()}")
            return None
        try:
            return wait_until(find, timeout, message=f"{pattern!r} on the client's std{which}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.transcript()}") from None

    def write(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close_input(self):
        self.proc.stdin.close()

    def wait(self, timeout=TIMEOUT):
        """The exit status, once the process has ended and all its output has been read."""
        code = self.proc.wait(timeout=timeout)
        for thread in self._drains:
            thread.join(timeout)
        return code

    def transcript(self):
        return ("stdout:\n" + "\n".join(self.lines("out")) +
                "\nstderr:\n" + "\n".join(self.lines("err")))

    def error_lines(self):
        return [line for line in self.lines("err") if "error" in line]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()  # the drain threads end at EOF, before their pipes are closed
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass


@pytest.fixture
def run_client():
    """``run_client(port, *args)`` -> a started ClientProcess, killed after the test if alive."""
    processes = []

    def start(port, *args):
        process = ClientProcess(port, *args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


def finished(process, code=0):
    """Wait for ``process`` to exit with ``code``; its whole output is then collected."""
    status = process.wait()
    assert status == code, f"exit status {status}, expected {code}\n{process.transcript()}"
    assert "Traceback" not in "\n".join(process.lines("err")), process.transcript()


class Peer(LineClient):
    """The server's end of a connection accepted by a FakeServer."""

    def __init__(self, sock):
        sock.settimeout(TIMEOUT)
        self.sock = sock
        self.timeout = TIMEOUT
        self._buffer = b""
        self.eof = False


class FakeServer:
    """Accepts one connection per script and runs the script (a function of a Peer) on it."""

    def __init__(self, *scripts):
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(scripts,), daemon=True)
        self.thread.start()

    def _run(self, scripts):
        try:
            for script in scripts:
                sock, _ = self.listener.accept()
                peer = Peer(sock)
                try:
                    script(peer)
                finally:
                    peer.close()
        except BaseException as exc:  # reported by check(), in the test's thread
            self.error = exc

    def check(self):
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the fake server's script did not finish"
        if self.error is not None:
            raise self.error

    def close(self):
        self.listener.close()


@pytest.fixture
def fake_server():
    servers = []

    def make(*scripts):
        server = FakeServer(*scripts)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def reply(command, info="scripted"):
    return {"command": command, "info": info}


def answer_login(peer, *extra):
    """Expect LOGIN, reply LOGIN_SUCCESS (and ``extra`` raw lines in the same write)."""
    peer.expect("LOGIN")
    peer.send_raw(json.dumps(reply("LOGIN_SUCCESS", "logged in")).encode() + b"\n" + b"".join(extra))


def can_login(port, username, secret):
    peer = LineClient(port)
    try:
        peer.send({"command": "LOGIN", "username": username, "secret": secret})
        return peer.recv()["command"] == "LOGIN_SUCCESS"
    finally:
        peer.close()


def connection_ends(client):
    """The server went away: recv() gives None (closed) or raises ConnectionLost (reset)."""
    try:
        return client.recv(TIMEOUT) is None
    except ConnectionLost:
        return True


def neighbour_loads(server):
    """{port: load} as ``server`` last heard from each neighbour."""
    return {int(link["peer"].rsplit(":", 1)[1]): link["load"] for link in server.links() if link["peer"]}


def build_two_hop_chain(make_server):
    """Servers A-B-C with 2 clients on A, 1 on B and none on C, every load known to the
    neighbours. A client logging in at A is then sent on twice by the rule "redirect when a
    neighbour's load is at least 2 below ours counting the new client": A (2+1) -> B (load 1),
    B (1+1) -> C (load 0), and C (0+1) keeps it, B's load 1 not being 2 below 1."""
    a = make_server()
    b = make_server(remote=a)
    c = make_server(remote=b)
    wait_links((a, 1), (b, 2), (c, 1))
    held = [login(b.port)]
    # A must know B's 1 before its second client, or it would send that client to B.
    wait_until(lambda: neighbour_loads(a) == {b.port: 1}, message="A to learn B's load")
    held += [login(a.port), login(a.port)]
    assert a.state.load() == 2 and b.state.load() == 1 and c.state.load() == 0
    wait_until(lambda: neighbour_loads(b) == {a.port: 2, c.port: 0}, message="B to learn the loads")
    wait_until(lambda: neighbour_loads(c) == {b.port: 1}, message="C to learn B's load")
    return a, b, c, held


# --- pure functions -----------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("hello world\n", {"message": "hello world"}),
    ("hello\r\n", {"message": "hello"}),
    ('{"n": 1, "text": "x"}\n', {"n": 1, "text": "x"}),
    ('  {"n": 1}  \n', {"n": 1}),
    ("[1, 2]\n", {"message": "[1, 2]"}),
    ("42", {"message": "42"}),
    ('{"broken": \n', {"message": '{"broken": '}),
    ("  padded  \n", {"message": "  padded  "}),
    ("\n", None),
    ("   \t \r\n", None),
])
def test_activity_from_line(line, expected):
    assert activity_from_line(line) == expected


def test_format_activity():
    assert format_activity({"message": "hi", "authenticated_user": "alice"}) == "alice: hi"
    assert format_activity({"n": 1, "authenticated_user": "bob"}) == 'bob: {"n":1}'
    assert format_activity({"message": "two\nlines", "authenticated_user": "c"}) == \
        'c: {"message":"two\\nlines"}'
    assert format_activity({"message": "x", "extra": 1, "authenticated_user": "d"}) == \
        'd: {"message":"x","extra":1}'
    assert format_activity({"message": "no sender"}) == "?: no sender"


def test_error_for_maps_each_failure_reply():
    for command, kind in [("LOGIN_FAILED", LoginFailed), ("REGISTER_FAILED", RegisterFailed),
                          ("AUTHENTICATION_FAIL", AuthenticationFailed),
                          ("INVALID_MESSAGE", InvalidMessage)]:
        error = error_for(reply(command, "why"))
        assert type(error) is kind and error.info == "why" and str(error).endswith(": why")
    assert error_for({"command": "ACTIVITY_BROADCAST"}) is None


# --- command line parsing (in process) ----------------------------------------------------------

def test_project1_flags_and_long_forms_parse_alike():
    short = terminal.parse_options(["-u", "alice", "-s", "pw", "-rh", "example", "-rp", "3781"])
    long = terminal.parse_options(["--username", "alice", "--secret=pw", "--remote-host",
                                        "example", "--remote-port", "3781"])
    for options in (short, long):
        assert (options.username, options.secret, options.host, options.port) == \
            ("alice", "pw", "example", 3781)
    defaults = terminal.parse_options([])
    assert (defaults.username, defaults.secret, defaults.host, defaults.port) == \
        ("anonymous", None, "localhost", 3780)
    assert defaults.reconnect and not defaults.json


def test_servers_and_tls_options_parse():
    options = terminal.parse_options(["-rh", "h1", "-rp", "1", "--servers", "h2:2, 10.0.0.3:3,[::1]:4"])
    assert options.servers == [("h2", 2), ("10.0.0.3", 3), ("::1", 4)]
    assert options.ssl_context is None
    assert terminal.parse_options([]).servers == []
    tls = terminal.parse_options(["--tls"]).ssl_context
    assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname


@pytest.mark.parametrize("argv, complaint", [
    (["-rh", "127.0.0.1", "-rp", "nope"], "-rp/--remote-port must be a port number from 1 to 65535"),
    (["-rp", "70000"], "from 1 to 65535"),
    (["-rp", "0"], "from 1 to 65535"),
    (["--bogus"], "unrecognised arguments"),
    (["-u", ""], "must not be empty"),
    (["-s", ""], "must not be empty"),
    (["--max-redirects", "-1"], "--max-redirects"),
    (["--log-level", "loud"], "--log-level"),
    (["--servers", "nope"], "--servers must be HOST:PORT[,HOST:PORT...] with ports from 1 to 65535; "
                            "'nope' is not"),
    (["--servers", "a:1,b"], "'b' is not (in 'a:1,b')"),
    (["--servers", "a:1,"], "'' is not (in 'a:1,')"),
    (["--servers", ":3780"], "':3780' is not"),
    (["--servers", "a:0"], "'a:0' is not"),
    (["--servers", "a:65536"], "'a:65536' is not"),
    (["--servers", "a:x1"], "'a:x1' is not"),
    (["--servers"], "--servers requires argument"),
    (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca '/nonexistent/ca.pem' cannot be used as CA "
                                          "certificates (PEM): No such file or directory"),
    (["--tls-ca", __file__], "cannot be used as CA certificates (PEM): it holds no PEM certificate"),
])
def test_bad_command_lines_exit_2(argv, complaint):
    stdout, stderr = io.StringIO(), io.StringIO()
    assert terminal.run(argv, io.StringIO(), stdout, stderr) == 2
    assert complaint in stderr.getvalue()
    assert stderr.getvalue().startswith("activitynet.client: ") and stdout.getvalue() == ""


def test_help_prints_usage():
    for flag in ("-h", "--help"):
        stdout = io.StringIO()
        assert terminal.run([flag], io.StringIO(), stdout, io.StringIO()) == 0
        assert "Usage:\n  activitynet.client [options]" in stdout.getvalue()
        assert "-rh" in stdout.getvalue() and "Design:" not in stdout.getvalue()


# --- the library --------------------------------------------------------------------------------

def test_library_anonymous_session(make_server):
    server = make_server()
    with Client(HOST, server.port) as client:
        client.connect()
        assert client.logged_in and client.redirects == [] and not client.generated_secret
        assert server.state.load() == 1
        client.send_activity({"text": "hi"})
        got = client.recv(TIMEOUT)
        schemas.validate(got)
        assert got["command"] == "ACTIVITY_BROADCAST"
        assert got["activity"] == {"text": "hi", "authenticated_user": "anonymous"}
        with pytest.raises(TimeoutError):
            client.recv(timeout=0.05)
    wait_until(lambda: server.state.load() == 0, message="the logout to be seen")


def test_library_registers_with_a_generated_secret(make_server):
    server = make_server()
    first = Client(HOST, server.port, "carol")
    first.connect()
    assert first.generated_secret and first.secret
    assert server.users()["carol"] == first.secret
    first.logout()
    assert first.recv(TIMEOUT) is None  # the server closes after LOGOUT
    first.close()
    with Client(HOST, server.port, "carol", first.secret) as again:
        again.connect()  # a secret was given: log in, no REGISTER
        assert again.logged_in and not again.generated_secret


def test_library_failure_replies_carry_the_servers_info(make_server):
    server = make_server()
    register(server.port, "alice", "pw").close()
    with pytest.raises(LoginFailed) as failed:
        Client(HOST, server.port, "alice", "wrong").login()
    assert failed.value.info == "attempt to login with wrong secret"
    assert failed.value.message["command"] == "LOGIN_FAILED"
    with pytest.raises(RegisterFailed) as failed:
        Client(HOST, server.port, "alice").connect()
    assert failed.value.info == "alice is already registered with the system"
    with pytest.raises(ConnectionRefusedError):
        Client(HOST, _free_port()).connect()


def _free_port():
    with socket.create_server((HOST, 0)) as probe:
        return probe.getsockname()[1]


def test_library_send_activities_uses_one_sendall_and_keeps_order(make_server):
    server = make_server()
    count = 3000

    class CountingSocket:
        def __init__(self, sock):
            self.sock = sock
            self.sendalls = 0

        def sendall(self, data):
            self.sendalls += 1
            return self.sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self.sock, name)

    with Client(HOST, server.port) as client:
        client.connect()
        counting = client.sock = CountingSocket(client.sock)
        client.send_activities({"n": n, "pad": "x" * 50} for n in range(count))
        assert counting.sendalls == 1
        received = [client.recv(TIMEOUT) for _ in range(count)]
    assert [m["activity"]["n"] for m in received] == list(range(count))
    assert len({m["id"] for m in received}) == count


def test_library_sends_any_json_string_even_a_lone_surrogate(make_server):
    server = make_server()
    register(server.port, "zoë", "sécret").close()
    with Client(HOST, server.port, "zoë", "sécret") as client:
        client.connect()
        client.send_activities([{"text": "naïve ☃"}, {"odd": "\ud800"}])
        assert client.recv(TIMEOUT)["activity"] == {"text": "naïve ☃", "authenticated_user": "zoë"}
        assert client.recv(TIMEOUT)["activity"] == {"odd": "\ud800", "authenticated_user": "zoë"}


def test_library_keeps_messages_that_arrive_with_the_reply(fake_server):
    b1 = {"command": "ACTIVITY_BROADCAST", "activity": {"n": 1, "authenticated_user": "x"}, "id": "a"}
    b2 = {"command": "ACTIVITY_BROADCAST", "activity": {"n": 2, "authenticated_user": "x"}, "id": "b"}

    def script(peer):
        # LOGIN_SUCCESS and two broadcasts in one write, with \r\n and a blank line between
        answer_login(peer, b"\r\n\n" + json.dumps(b1).encode() + b"\r\n" + json.dumps(b2).encode() + b"\n")
        assert peer.recv() is None  # the client closes first

    fake = fake_server(script)
    client = Client(HOST, fake.port, redirect_wait=1.0)
    client.login()
    assert client.recv(TIMEOUT) == b1
    assert client.recv(TIMEOUT) == b2
    client.close()
    fake.check()


def test_library_follows_a_two_hop_redirect(make_server):
    a, b, c, held = build_two_hop_chain(make_server)
    with Client(HOST, a.port) as client:
        client.login()
        assert client.redirects == [(HOST, b.port), (HOST, c.port)]
        assert (client.host, client.port) == (HOST, c.port)
        assert (a.state.load(), b.state.load(), c.state.load()) == (2, 1, 1)
        client.send_activity({"hop": 2})
        assert held[0].expect("ACTIVITY_BROADCAST")["activity"]["hop"] == 2
    # the loads are back to 2-1-0 once B has heard that C's client logged out
    wait_until(lambda: neighbour_loads(b) == {a.port: 2, c.port: 0}, message="C's load to drop")
    with pytest.raises(TooManyRedirects):
        Client(HOST, a.port, max_redirects=1).login()
    for conn in held:
        conn.close()


def test_library_follows_a_late_redirect_and_retries_a_login_the_target_refused(
        make_server, fake_server):
    """A REDIRECT arriving after login() returned is followed by recv(); a LOGIN_FAILED right
    after a redirect is retried (the target may not have learnt the user yet)."""
    server = make_server()
    register(server.port, "alice", "pw").close()
    late = threading.Event()

    def redirect_late(peer):
        answer_login(peer)
        assert late.wait(TIMEOUT)
        peer.send({"command": "REDIRECT", "hostname": HOST, "port": fake_b.port})

    def refuse(peer):
        peer.expect("LOGIN", username="alice", secret="pw")
        peer.send(reply("LOGIN_FAILED", "attempt to login with wrong secret"))

    def relay_to_server(peer):
        answer_login(peer, json.dumps({"command": "REDIRECT", "hostname": HOST,
                                       "port": server.port}).encode() + b"\n")

    fake_b = fake_server(refuse, relay_to_server)
    fake_a = fake_server(redirect_late)
    client = Client(HOST, fake_a.port, "alice", "pw", redirect_wait=0)
    client.login()
    assert client.redirects == [] and client.port == fake_a.port
    late.set()

    def on_server():
        try:
            client.recv(timeout=0.05)
        except TimeoutError:
            pass
        return server.state.load() == 1

    wait_until(on_server, message="the client to follow the late REDIRECT")
    assert client.redirects == [(HOST, fake_b.port), (HOST, server.port)]
    client.send_activity({"after": "redirects"})
    assert client.recv(TIMEOUT)["activity"] == {"after": "redirects", "authenticated_user": "alice"}
    client.close()
    fake_a.check()
    fake_b.check()


def test_library_raises_scripted_failures(fake_server):
    def invalid(peer):
        peer.expect("LOGIN")
        peer.send(reply("INVALID_MESSAGE", "the message has no 'command' field"))

    def hang_up(peer):
        peer.expect("LOGIN")

    fake = fake_server(invalid, hang_up)
    with pytest.raises(InvalidMessage) as failed:
        Client(HOST, fake.port).login()
    assert failed.value.info == "the message has no 'command' field"
    with pytest.raises(ConnectionLost):
        Client(HOST, fake.port).login()
    fake.check()


def test_failover_order():
    a, b, c, elsewhere = ("a", 1), ("b", 2), ("c", 3), ("redirected", 4)
    assert failover_order([a, b, c], a) == [b, c, a]
    assert failover_order([a, b, c], b) == [c, a, b]
    assert failover_order([a, b, c], c) == [a, b, c]
    assert failover_order([a], a) == [a]
    assert failover_order([a, b], elsewhere) == [elsewhere, a, b]


def test_library_reconnect_backs_off_and_walks_the_list_until_stopped():
    """Nobody answers: reconnect() waits 0.2 s, then twice as long each time up to 5 s, trying
    the servers after the lost one in turn, and returns False once ``stop`` is set."""
    dead = [(HOST, _free_port()) for _ in range(3)]
    client = Client(*dead[0], servers=dead[1:])
    waits, tried = [], []

    class Stop:
        def wait(self, seconds):  # stands in for threading.Event: records instead of sleeping
            if waits:
                tried.append((client.host, client.port))
            waits.append(seconds)
            return len(waits) > 8

    assert client.reconnect(Stop()) is False
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    assert tried == [dead[1], dead[2], dead[0]] * 2 + [dead[1], dead[2]]
    assert not client.logged_in and client.sock is None


def test_library_skips_a_server_that_does_not_answer_at_start_up(make_server):
    server = make_server()
    dead = _free_port()
    with Client(HOST, dead, "carol", servers=[(HOST, server.port)]) as client:
        client.connect()
        assert client.logged_in and (client.host, client.port) == (HOST, server.port)
        assert server.users()["carol"] == client.secret
    with pytest.raises(ConnectionRefusedError):  # nobody answers: the last server's error
        Client(HOST, dead, servers=[(HOST, _free_port())]).connect()


def test_library_fails_over_to_the_next_server_and_logs_in_again(make_process):
    """A client on A, A killed for good: reconnect() logs in on B (the next of its servers) with
    the secret it registered on A, and its activities reach B's clients."""
    a = make_process()
    b = make_process(remote_port=a.port)
    client = Client(HOST, a.port, "gina", servers=[(HOST, b.port)], redirect_wait=0)
    client.connect()
    assert client.generated_secret and client.port == a.port
    wait_until(lambda: can_login(b.port, "gina", client.secret), message="gina to reach B")
    observer = login(b.port)
    secret = client.secret
    a.kill()
    assert connection_ends(client)
    # B knows gina, so a second REGISTER would fail there: logging in proves it is not repeated
    assert client.reconnect() is True
    assert client.logged_in and (client.host, client.port) == (HOST, b.port)
    assert client.secret == secret
    client.send_activity({"after": "failover"})
    assert observer.expect("ACTIVITY_BROADCAST")["activity"] == \
        {"after": "failover", "authenticated_user": "gina"}
    assert client.recv(TIMEOUT)["activity"]["after"] == "failover"
    client.logout()
    client.close()
    observer.close()


# --- the command line against real servers ------------------------------------------------------

def test_cli_anonymous_text_and_json_input(make_server, run_client):
    server = make_server()
    observer = login(server.port)
    client = run_client(server.port)
    client.wait_line(rf"logged in as anonymous at 127\.0\.0\.1:{server.port}$")
    client.write('plain text\n\n   \n{"n": 1, "text": "x"}\n[1, 2]\n{"broken": \n  padded  \r\n'
                 '{"odd": "\\ud800"}\n')
    expected = [{"message": "plain text"}, {"n": 1, "text": "x"}, {"message": "[1, 2]"},
                {"message": '{"broken": '}, {"message": "  padded  "}, {"odd": "\ud800"}]
    for body in expected:
        got = observer.expect("ACTIVITY_BROADCAST")["activity"]
        assert got == {**body, "authenticated_user": "anonymous"}
    client.wait_line(r"^anonymous: \{\"odd\"", "out")
    assert client.lines("out") == ["anonymous: plain text", 'anonymous: {"n":1,"text":"x"}',
                                   "anonymous: [1, 2]", 'anonymous: {"broken": ',
                                   "anonymous:   padded  ", 'anonymous: {"odd":"\\ud800"}']
    client.close_input()
    finished(client)
    observer.close()


def test_cli_login_prints_who_sent_what(make_server, run_client):
    server = make_server()
    register(server.port, "alice", "pw").close()
    register(server.port, "bob", "bpw").close()
    client = run_client(server.port, "-u", "alice", "-s", "pw")
    client.wait_line(r"logged in as alice")
    bob = login(server.port, "bob", "bpw")
    activity(bob, {"message": "hi alice"}, "bob", "bpw")
    activity(bob, {"mood": "sunny"}, "bob", "bpw")
    client.wait_line(r'^bob: \{"mood":"sunny"\}$', "out")
    client.write("hi bob\n")
    assert bob.expect("ACTIVITY_BROADCAST")["activity"]["message"] == "hi alice"
    assert bob.expect("ACTIVITY_BROADCAST")["activity"] == {"mood": "sunny", "authenticated_user": "bob"}
    assert bob.expect("ACTIVITY_BROADCAST")["activity"] == {"message": "hi bob", "authenticated_user": "alice"}
    client.wait_line(r"^alice: hi bob$", "out")
    assert client.lines("out")[0] == "bob: hi alice"
    client.close_input()
    finished(client)
    bob.close()


def test_cli_registers_with_a_generated_secret_then_logs_in_with_it(make_server, run_client):
    server = make_server()
    first = run_client(server.port, "-u", "dave")
    match = first.wait_line(r"registered dave with the generated secret (\S+) "
                            r"\(log in again with: -u dave -s (\S+)\)")
    secret = match.group(1)
    assert match.group(2) == secret and server.users()["dave"] == secret
    first.wait_line(r"logged in as dave")
    first.close_input()
    finished(first)
    observer = login(server.port)
    again = run_client(server.port, "-u", "dave", "-s", secret)
    again.wait_line(r"logged in as dave")
    assert not any("registered" in line for line in again.lines("err"))
    again.write("back again\n")
    assert observer.expect("ACTIVITY_BROADCAST")["activity"] == \
        {"message": "back again", "authenticated_user": "dave"}
    again.close_input()
    finished(again)
    observer.close()


def test_cli_json_output(make_server, run_client):
    server = make_server()
    client = run_client(server.port, "--json")
    client.wait_line(r"logged in as anonymous")
    sender = login(server.port)
    activity(sender, {"message": "for scripts", "n": 7})
    line = client.wait_line(r"for scripts", "out").string
    message = json.loads(line)
    schemas.validate(message)
    assert message["command"] == "ACTIVITY_BROADCAST"
    assert message["activity"] == {"message": "for scripts", "n": 7, "authenticated_user": "anonymous"}
    client.close_input()
    finished(client)
    assert all(json.loads(line)["command"] == "ACTIVITY_BROADCAST" for line in client.lines("out"))
    sender.close()


def test_cli_follows_a_two_hop_redirect(make_server, run_client):
    a, b, c, held = build_two_hop_chain(make_server)
    client = run_client(a.port)
    client.wait_line(rf"logged in as anonymous at 127\.0\.0\.1:{c.port}$")
    status = [line for line in client.lines("err") if "redirected" in line]
    assert status == [f"activitynet.client: redirected to 127.0.0.1:{b.port}",
                      f"activitynet.client: redirected to 127.0.0.1:{c.port}"]
    assert (a.state.load(), b.state.load(), c.state.load()) == (2, 1, 1)
    client.write("from C\n")
    assert held[0].expect("ACTIVITY_BROADCAST")["activity"]["message"] == "from C"
    client.close_input()
    finished(client)
    for conn in held:
        conn.close()


def test_cli_login_failed(make_server, run_client):
    server = make_server()
    register(server.port, "alice", "pw").close()
    client = run_client(server.port, "-u", "alice", "-s", "wrong")
    finished(client, 1)
    assert client.lines("err") == ["activitynet.client: error: login failed: "
                                   "attempt to login with wrong secret"]
    assert client.lines("out") == []


def test_cli_register_failed(make_server, run_client):
    server = make_server()
    register(server.port, "alice", "pw").close()
    client = run_client(server.port, "-u", "alice")
    finished(client, 1)
    assert client.lines("err") == ["activitynet.client: error: register failed: "
                                   "alice is already registered with the system"]


def test_cli_cannot_connect(run_client):
    port = _free_port()
    client = run_client(port)
    finished(client, 1)
    assert client.lines("err") == [f"activitynet.client: error: cannot connect to "
                                   f"127.0.0.1:{port}: Connection refused"]


@pytest.mark.parametrize("answered, failure, what", [
    ("LOGIN", "INVALID_MESSAGE", "the server rejected a message as invalid"),
    ("ACTIVITY_MESSAGE", "AUTHENTICATION_FAIL", "authentication failed"),
    ("ACTIVITY_MESSAGE", "INVALID_MESSAGE", "the server rejected a message as invalid"),
])
def test_cli_scripted_failure_replies(fake_server, run_client, answered, failure, what):
    info = f"scripted {failure} for the test"

    def script(peer):
        if answered == "LOGIN":
            peer.expect("LOGIN")
        else:
            answer_login(peer)
            peer.expect("ACTIVITY_MESSAGE", activity={"message": "provoke"})
        peer.send(reply(failure, info))

    fake = fake_server(script)
    client = run_client(fake.port)
    if answered != "LOGIN":
        client.wait_line(r"logged in as anonymous")
        client.write("provoke\n")
    finished(client, 1)
    assert client.error_lines() == [f"activitynet.client: error: {what}: {info}"]
    fake.check()


def test_cli_eof_logs_out(make_process, run_client):
    server = make_process()
    client = run_client(server.port)
    client.wait_line(r"logged in as anonymous")
    client.close_input()
    finished(client)
    wait_until(lambda: server.find_log(r"closing \S+: logged out"), message="the LOGOUT")


def test_cli_ctrl_c_logs_out(make_process, run_client):
    server = make_process()
    client = run_client(server.port)
    client.wait_line(r"logged in as anonymous")
    client.proc.send_signal(signal.SIGINT)
    finished(client)
    wait_until(lambda: server.find_log(r"closing \S+: logged out"), message="the LOGOUT")


def test_cli_reconnects_after_the_server_is_killed_and_restarted(make_process, run_client):
    server = make_process()
    client = run_client(server.port)
    client.wait_line(r"logged in as anonymous")
    server.kill()
    client.wait_line(rf"lost the connection to 127\.0\.0\.1:{server.port}; reconnecting")
    client.write("typed while the server was down\n")
    server.start()
    client.wait_line(rf"reconnected as anonymous at 127\.0\.0\.1:{server.port}")
    # what was typed meanwhile is sent once the client is back; it reaches the client itself
    client.wait_line(r"^anonymous: typed while the server was down$", "out")
    observer = login(server.port)
    client.write("after the restart\n")
    assert observer.expect("ACTIVITY_BROADCAST")["activity"]["message"] == "after the restart"
    client.close_input()
    finished(client)
    observer.close()


def test_cli_fails_over_to_the_next_server_when_its_own_dies_for_good(make_process, run_client):
    """A client on A with --servers B: A is killed and never comes back. The client logs in on B
    as the user it registered on A (no second REGISTER), what was typed meanwhile is sent, and
    what it types reaches B's clients."""
    a = make_process()
    b = make_process(remote_port=a.port)
    observer = login(b.port)  # B has one client, A none: A keeps the next one (no REDIRECT)
    client = run_client(a.port, "-u", "hana", "--servers", f"127.0.0.1:{b.port}")
    secret = client.wait_line(r"generated secret (\S+)").group(1)
    client.wait_line(rf"logged in as hana at 127\.0\.0\.1:{a.port}$")
    wait_until(lambda: can_login(b.port, "hana", secret), message="hana to reach B")
    a.kill()
    client.wait_line(rf"lost the connection to 127\.0\.0\.1:{a.port}; reconnecting")
    client.write("typed while failing over\n")
    client.wait_line(rf"reconnected as hana at 127\.0\.0\.1:{b.port}$")
    assert observer.expect("ACTIVITY_BROADCAST")["activity"] == \
        {"message": "typed while failing over", "authenticated_user": "hana"}
    client.write("hello B\n")
    assert observer.expect("ACTIVITY_BROADCAST")["activity"] == \
        {"message": "hello B", "authenticated_user": "hana"}
    client.wait_line(r"^hana: hello B$", "out")
    client.close_input()
    finished(client)
    assert sum("registered hana" in line for line in client.lines("err")) == 1
    assert client.error_lines() == []
    observer.close()


def test_cli_starts_on_the_next_server_when_the_first_does_not_answer(make_server, run_client):
    server = make_server()
    dead = _free_port()
    client = run_client(dead, "--servers", f"127.0.0.1:{_free_port()},127.0.0.1:{server.port}")
    client.wait_line(rf"logged in as anonymous at 127\.0\.0\.1:{server.port}$")
    client.close_input()
    finished(client)
    assert client.error_lines() == []


def test_cli_end_of_input_while_reconnecting_exits_0(make_process, run_client):
    """Ctrl-D while the client waits to reconnect: it stops waiting and exits 0 (nothing to log
    out from: it is not connected), without a traceback. This once crashed in 3 runs of 4 (the
    session dropped its connection object while reconnecting), so it runs 10 times."""
    server = make_process()
    for run in range(10):
        if not server.alive():
            server.start()  # on the same port
        client = run_client(server.port)
        client.wait_line(r"logged in as anonymous")
        server.kill()
        client.wait_line(rf"lost the connection to 127\.0\.0\.1:{server.port}; reconnecting")
        client.close_input()
        finished(client)
        assert client.error_lines() == [], f"run {run}:\n{client.transcript()}"


def test_cli_reconnection_retries_a_login_the_restarted_server_refuses(fake_server, run_client):
    """A restarted server may not have relearnt the users when the client is back: LOGIN_FAILED
    then is retried (with backoff), not taken as final."""
    crashed = threading.Event()

    def crash(peer):
        answer_login(peer)
        assert crashed.wait(TIMEOUT)  # the peer closes: the client sees the server go away

    def not_yet(peer):
        peer.expect("LOGIN", username="frank", secret="pw")
        peer.send(reply("LOGIN_FAILED", "attempt to login with wrong secret"))

    def relearnt(peer):
        answer_login(peer)
        peer.expect("ACTIVITY_MESSAGE", username="frank", secret="pw", activity={"message": "ok"})
        peer.send({"command": "ACTIVITY_BROADCAST", "id": "1",
                   "activity": {"message": "ok", "authenticated_user": "frank"}})
        assert peer.recv() == {"command": "LOGOUT"}

    fake = fake_server(crash, not_yet, not_yet, relearnt)
    client = run_client(fake.port, "-u", "frank", "-s", "pw")
    client.wait_line(r"logged in as frank")
    crashed.set()
    client.wait_line(rf"reconnected as frank at 127\.0\.0\.1:{fake.port}")
    client.write("ok\n")
    client.wait_line(r"^frank: ok$", "out")
    client.close_input()
    finished(client)
    assert client.error_lines() == []
    fake.check()


def test_cli_registered_user_survives_a_restart_of_its_server(make_process, run_client):
    first = make_process()
    second = make_process(remote_port=first.port)
    client = run_client(second.port, "-u", "erin")
    secret = client.wait_line(r"generated secret (\S+)").group(1)
    client.wait_line(r"logged in as erin")
    wait_until(lambda: can_login(first.port, "erin", secret), message="erin to reach `first`")
    second.kill()
    client.wait_line(r"lost the connection")
    second.start()  # empty: it knows erin again only once SYNC_USER from `first` arrives
    client.wait_line(rf"reconnected as erin at 127\.0\.0\.1:{second.port}")
    client.write("still me\n")
    client.wait_line(r"^erin: still me$", "out")
    client.close_input()
    finished(client)


def test_cli_no_reconnect_exits_1(make_process, run_client):
    server = make_process()
    client = run_client(server.port, "--no-reconnect")
    client.wait_line(r"logged in as anonymous")
    server.kill()
    finished(client, 1)
    assert client.error_lines() == [f"activitynet.client: error: lost the connection to "
                                    f"127.0.0.1:{server.port}"]


# --- TLS ----------------------------------------------------------------------------------------
# The servers' side of TLS is built elsewhere; here a scripted server speaks just enough of the
# protocol over TLS (LOGIN -> LOGIN_SUCCESS, ACTIVITY_MESSAGE -> ACTIVITY_BROADCAST, LOGOUT) to
# show that the client verifies the server and talks to it through TLS. Certificates are made at
# test time with the openssl command (tests/certs.py, as for the servers' TLS tests).

@pytest.fixture
def tls_files(certs):
    """{"ca": trusted CA, "other_ca": a CA that signed nothing the server shows, "cert"/"key":
    the server's certificate for 127.0.0.1, signed by "ca"} (made once a run by tests/certs.py)."""
    return {"ca": certs.ca, "other_ca": certs.other_ca, "cert": certs.server.cert,
            "key": certs.server.key}


def over_tls(peer, tls_files):
    """The server's side of the TLS handshake on a FakeServer's connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    peer.sock = context.wrap_socket(peer.sock, server_side=True)
    return peer


def echo_over_tls(tls_files):
    """A script: TLS, LOGIN -> LOGIN_SUCCESS, one activity echoed as a broadcast, then LOGOUT."""
    def script(peer):
        over_tls(peer, tls_files)
        answer_login(peer)
        sent = peer.expect("ACTIVITY_MESSAGE", username="anonymous")
        peer.send({"command": "ACTIVITY_BROADCAST", "id": "tls-1",
                   "activity": {**sent["activity"], "authenticated_user": "anonymous"}})
        assert peer.recv() == {"command": "LOGOUT"}
    return script


def test_library_over_tls(fake_server, tls_files):
    fake = fake_server(echo_over_tls(tls_files))
    with Client(HOST, fake.port, tls_ca=tls_files["ca"], redirect_wait=0) as client:
        client.login()
        assert isinstance(client.sock, ssl.SSLSocket) and client.sock.version().startswith("TLS")
        client.send_activity({"secret": "stuff"})
        assert client.recv(TIMEOUT)["activity"] == {"secret": "stuff", "authenticated_user": "anonymous"}
    fake.check()


def test_cli_over_tls(fake_server, run_client, tls_files):
    fake = fake_server(echo_over_tls(tls_files))
    client = run_client(fake.port, "--tls", "--tls-ca", tls_files["ca"])
    client.wait_line(rf"logged in as anonymous at 127\.0\.0\.1:{fake.port}$")
    client.write("over TLS\n")
    client.wait_line(r"^anonymous: over TLS$", "out")
    client.close_input()
    finished(client)
    fake.check()


@pytest.mark.parametrize("flags", [("--tls-ca", "other_ca"), ("--tls",)],
                         ids=["another CA (--tls-ca implies --tls)", "the system's CAs"])
def test_cli_refuses_a_server_its_ca_did_not_sign(fake_server, run_client, tls_files, flags):
    def refused(peer):
        with pytest.raises(ssl.SSLError):  # the client aborts the handshake
            over_tls(peer, tls_files)

    fake = fake_server(refused)
    client = run_client(fake.port, *(tls_files.get(flag, flag) for flag in flags))
    finished(client, 1)
    assert client.lines("err") == [f"activitynet.client: error: the certificate of "
                                   f"127.0.0.1:{fake.port} was not accepted: "
                                   f"unable to get local issuer certificate"]
    fake.check()
