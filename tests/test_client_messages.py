"""Client <-> server, row by row (PROTOCOL.md sections 2 and 3), over raw sockets.

Each test speaks JSON lines to a real server as a Project 1 client or a person in telnet would,
and pins one rule: the reply, its customary ``info``, and whether the connection stays open.
Every failure reply (INVALID_MESSAGE, AUTHENTICATION_FAIL, LOGIN_FAILED, REGISTER_FAILED) is
followed by the server closing the connection, and a bad client never disturbs the others: a
logged-in bystander still gets its own activities back afterwards. Every message received is
validated against its schema by ``LineClient``.
"""

import socket
import threading

import pytest

from harness import LineClient, LocalServer, activity, login, register, wait_until

ALICE = ("alice", "alice-secret")


# A bad input must earn a protocol reply, never an error in the server's log.
pytestmark = pytest.mark.usefixtures("no_server_errors")


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture(scope="module")
def shared():
    """One server for the long tables of bad inputs, whose tests leave no state behind."""
    server = LocalServer()
    yield server
    server.stop()


@pytest.fixture
def shared_bystander(shared):
    client = login(shared.port)
    yield client
    client.close()


@pytest.fixture
def bystander(server):
    """A logged-in client that must keep being served whatever other clients do."""
    client = login(server.port)
    yield client
    client.close()


def still_served(client, token):
    """``client`` sends an activity and gets it back next: the server is still serving it."""
    activity(client, {"still": token})
    got = client.expect("ACTIVITY_BROADCAST")
    assert got["activity"] == {"still": token, "authenticated_user": "anonymous"}


def expect_failure(client, command, *words):
    """The failure reply ``command`` whose info mentions ``words``, then the close."""
    message = client.expect(command)
    for word in words:
        assert word in message["info"], message["info"]
    client.expect_closed()
    return message


def send_line(client, line):
    client.send_raw(line if line.endswith(b"\n") else line + b"\n")


# --- REGISTER ---------------------------------------------------------------------------------

def test_register_success_keeps_the_connection_open_for_login(server):
    """REGISTER_SUCCESS keeps the connection open; the client usually LOGINs next on it."""
    client = LineClient(server.port)
    client.send({"command": "REGISTER", "username": "alice", "secret": "pw"})
    client.expect("REGISTER_SUCCESS", info="register success for alice")
    client.send({"command": "LOGIN", "username": "alice", "secret": "pw"})
    client.expect("LOGIN_SUCCESS", info="logged in as user alice")
    assert server.users()["alice"] == "pw"


def test_register_of_a_known_user_fails_and_closes(server, bystander):
    """A username known locally: REGISTER_FAILED, close, and the first secret stands."""
    register(server.port, *ALICE).close()
    client = LineClient(server.port)
    client.send({"command": "REGISTER", "username": "alice", "secret": "other"})
    expect_failure(client, "REGISTER_FAILED", "alice")
    assert server.users()["alice"] == ALICE[1], "the first registration stands"
    still_served(bystander, 1)


def test_register_failed_has_the_customary_info(server):
    """The customary info: ``<u> is already registered with the system``."""
    register(server.port, *ALICE).close()
    client = LineClient(server.port)
    client.send({"command": "REGISTER", "username": "alice", "secret": ALICE[1]})
    message = expect_failure(client, "REGISTER_FAILED")
    assert message["info"] == "alice is already registered with the system"


def test_anonymous_cannot_be_registered(server):
    """``anonymous`` counts as already registered."""
    client = LineClient(server.port)
    client.send({"command": "REGISTER", "username": "anonymous", "secret": "pw"})
    message = expect_failure(client, "REGISTER_FAILED")
    assert message["info"] == "anonymous is already registered with the system"
    assert "anonymous" not in server.users()


def test_register_while_logged_in_is_invalid(server, bystander):
    """REGISTER is not allowed once logged in: INVALID_MESSAGE and close."""
    client = login(server.port)
    client.send({"command": "REGISTER", "username": "bob", "secret": "pw"})
    expect_failure(client, "INVALID_MESSAGE", "REGISTER", "logged in")
    assert "bob" not in server.users()
    still_served(bystander, 1)


@pytest.mark.parametrize("field", ["username", "secret"])
def test_register_needs_username_and_secret(server, field):
    """REGISTER without username or secret is an INVALID_MESSAGE naming the field."""
    message = {"command": "REGISTER", "username": "bob", "secret": "pw"}
    del message[field]
    client = LineClient(server.port)
    client.send(message)
    expect_failure(client, "INVALID_MESSAGE", "REGISTER", f"'{field}'")
    assert "bob" not in server.users()


# --- LOGIN ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"secret": "anything"}])
def test_anonymous_login_always_succeeds(server, extra):
    """``anonymous`` always logs in, with or without a secret, and counts as load."""
    client = LineClient(server.port)
    client.send({"command": "LOGIN", "username": "anonymous", **extra})
    client.expect("LOGIN_SUCCESS", info="logged in as user anonymous")
    wait_until(lambda: server.state.load() == 1, message="the load to count the client")


def test_login_with_the_registered_secret(server):
    """The registered pair logs in: ``logged in as user <u>``."""
    register(server.port, *ALICE).close()
    client = LineClient(server.port)
    client.send({"command": "LOGIN", "username": ALICE[0], "secret": ALICE[1]})
    client.expect("LOGIN_SUCCESS", info="logged in as user alice")


@pytest.mark.parametrize("username, secret", [
    ("alice", "wrong"),      # wrong secret
    ("alice", None),         # no secret for a registered user
    ("nobody", "pw"),        # unknown user
])
def test_login_failures_close(server, bystander, username, secret):
    """Wrong secret, no secret, unknown user: LOGIN_FAILED, close, no load counted."""
    register(server.port, *ALICE).close()
    client = LineClient(server.port)
    message = {"command": "LOGIN", "username": username}
    if secret is not None:
        message["secret"] = secret
    client.send(message)
    expect_failure(client, "LOGIN_FAILED", "attempt to login with wrong secret")
    assert server.state.load() == 1, "only the bystander counts"
    still_served(bystander, 1)


def test_login_on_a_logged_in_connection_is_invalid(server, bystander):
    """LOGIN on a connection already logged in: INVALID_MESSAGE and close."""
    client = login(server.port)
    client.send({"command": "LOGIN", "username": "anonymous"})
    expect_failure(client, "INVALID_MESSAGE", "LOGIN", "already logged in")
    wait_until(lambda: server.state.load() == 1, message="the closed client to stop counting")
    still_served(bystander, 1)


def test_login_needs_a_username(server):
    """LOGIN without a username is an INVALID_MESSAGE naming the field."""
    client = LineClient(server.port)
    client.send({"command": "LOGIN", "secret": "pw"})
    expect_failure(client, "INVALID_MESSAGE", "LOGIN", "'username'")


# --- LOGOUT -----------------------------------------------------------------------------------

def test_logout_closes_without_reply_and_drops_the_load(server, bystander):
    """LOGOUT: no reply, the server closes and the load drops."""
    client = login(server.port)
    wait_until(lambda: server.state.load() == 2, message="two clients counted")
    client.send({"command": "LOGOUT"})
    client.expect_closed()
    wait_until(lambda: server.state.load() == 1, message="the load to drop")
    still_served(bystander, 1)


def test_logout_before_login_just_closes(server):
    """LOGOUT on a fresh connection closes it too."""
    client = LineClient(server.port)
    client.send({"command": "LOGOUT"})
    client.expect_closed()


def test_a_client_that_vanishes_drops_the_load(server):
    """No LOGOUT (a crashed client): closing the socket is enough."""
    client = login(server.port)
    wait_until(lambda: server.state.load() == 1, message="the client counted")
    client.close()
    wait_until(lambda: server.state.load() == 0, message="the load to drop")


# --- ACTIVITY_MESSAGE and ACTIVITY_BROADCAST -----------------------------------------------------

def test_activity_before_login_is_an_authentication_failure(server, bystander):
    """ACTIVITY_MESSAGE on a connection not logged in: AUTHENTICATION_FAIL and close."""
    client = LineClient(server.port)
    activity(client, {"text": "hi"})
    expect_failure(client, "AUTHENTICATION_FAIL", "log in")
    still_served(bystander, 1)


def test_activity_after_register_but_before_login_fails(server):
    """Registering is not logging in: the activity is refused."""
    client = register(server.port, *ALICE)
    activity(client, {"text": "hi"}, *ALICE)
    expect_failure(client, "AUTHENTICATION_FAIL")


@pytest.mark.parametrize("username, secret, words", [
    ("bob", "bob-secret", ["bob", "alice"]),     # another (registered) user's name
    ("anonymous", None, ["anonymous"]),          # anonymous while logged in as alice
    ("alice", "wrong", ["secret"]),
    ("alice", None, ["secret"]),
])
def test_activity_must_name_the_logged_in_user(server, bystander, username, secret, words):
    """username and secret must be those of the user logged in on this connection."""
    register(server.port, "bob", "bob-secret").close()
    register(server.port, *ALICE).close()
    client = login(server.port, *ALICE)
    activity(client, {"text": "hi"}, username, secret)
    expect_failure(client, "AUTHENTICATION_FAIL", *words)
    still_served(bystander, 1)  # and it received nothing from the failed attempt


def test_anonymous_activity_needs_no_secret(server):
    """For ``anonymous`` the secret is not checked."""
    client = login(server.port)
    activity(client, {"text": "hi"}, "anonymous", "whatever")
    assert client.expect("ACTIVITY_BROADCAST")["activity"]["authenticated_user"] == "anonymous"


def test_authenticated_user_is_overwritten(server):
    """``activity.authenticated_user`` is set to the username, whatever the client put there."""
    register(server.port, *ALICE).close()
    client = login(server.port, *ALICE)
    activity(client, {"text": "hi", "authenticated_user": "mallory", "nested": {"x": [1, None]}}, *ALICE)
    got = client.expect("ACTIVITY_BROADCAST")
    assert got["activity"] == {"text": "hi", "authenticated_user": "alice", "nested": {"x": [1, None]}}


def test_every_logged_in_client_gets_each_activity_exactly_once(server):
    """The sender included; connections that are not logged in get nothing."""
    register(server.port, *ALICE).close()
    sender = login(server.port, *ALICE)
    others = [login(server.port) for _ in range(4)]
    lurker = register(server.port, "lurker", "pw")  # registered on this connection, not logged in
    for n in range(5):
        activity(sender, {"n": n}, *ALICE)
    ids = set()
    for client in [sender, *others]:
        got = [client.expect("ACTIVITY_BROADCAST") for _ in range(5)]
        assert [m["activity"]["n"] for m in got] == list(range(5)), "in the order sent"
        ids.add(tuple(m["id"] for m in got))
    assert len(ids) == 1, "every client sees the same ids"
    assert len(set(next(iter(ids)))) == 5, "ids are unique"
    # exactly once: the next thing each client sees is a fresh marker, not a duplicate
    activity(sender, {"n": "end"}, *ALICE)
    for client in [sender, *others]:
        assert client.expect("ACTIVITY_BROADCAST")["activity"]["n"] == "end"
    lurker.send({"command": "LOGOUT"})
    lurker.expect_closed()


def test_activity_ids_are_unique_across_senders(server):
    """Interleaved senders: unique ids, and each sender's activities in its order."""
    a, b = login(server.port), login(server.port)
    for n in range(20):
        activity(a, {"from": "a", "n": n})
        activity(b, {"from": "b", "n": n})
    got = [a.expect("ACTIVITY_BROADCAST") for _ in range(40)]
    assert len({m["id"] for m in got}) == 40
    assert [m["activity"]["n"] for m in got if m["activity"]["from"] == "a"] == list(range(20))
    assert [m["activity"]["n"] for m in got if m["activity"]["from"] == "b"] == list(range(20))


@pytest.mark.parametrize("field, value, words", [
    ("activity", "text", ["'activity'", "object", "string"]),
    ("activity", None, ["'activity'", "object", "null"]),
    ("username", 5, ["'username'", "string", "number"]),
    ("secret", ["pw"], ["'secret'", "string", "array"]),
])
def test_ill_typed_activity_message_is_invalid(shared, shared_bystander, field, value, words):
    """Ill-typed fields of ACTIVITY_MESSAGE are INVALID_MESSAGE, naming field and types."""
    client = login(shared.port)
    message = {"command": "ACTIVITY_MESSAGE", "username": "anonymous", "activity": {}}
    message[field] = value
    client.send(message)
    expect_failure(client, "INVALID_MESSAGE", "ACTIVITY_MESSAGE", *words)
    still_served(shared_bystander, 1)


def test_activity_message_needs_an_activity(server):
    """ACTIVITY_MESSAGE without an activity is an INVALID_MESSAGE."""
    client = login(server.port)
    client.send({"command": "ACTIVITY_MESSAGE", "username": "anonymous"})
    expect_failure(client, "INVALID_MESSAGE", "'activity'")


def test_escaped_lone_surrogates_are_relayed_not_fatal(server, bystander):
    r"""``"\ud800"`` is valid JSON text; the activity goes out escaped, as valid UTF-8."""
    client = login(server.port)
    send_line(client, b'{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":{"t":"\\ud800!"}}')
    assert client.expect("ACTIVITY_BROADCAST")["activity"]["t"] == "\ud800!"
    assert bystander.expect("ACTIVITY_BROADCAST")["activity"]["t"] == "\ud800!"
    still_served(bystander, 1)


def test_escaped_lone_surrogate_in_a_username_is_registered_consistently(server):
    """The same for a username: the reply that echoes it must still be valid UTF-8."""
    client = LineClient(server.port)
    send_line(client, b'{"command":"REGISTER","username":"\\udc00bob","secret":"pw"}')
    client.expect("REGISTER_SUCCESS")
    assert "\udc00bob" in server.users()


# --- INVALID_MESSAGE: anything malformed or misplaced ---------------------------------------------

MALFORMED = [
    (b"hello", ["not valid JSON"]),
    (b"{\"command\": \"LOGIN\"", ["not valid JSON"]),
    (b"[\"LOGIN\"]", ["JSON object", "array"]),
    (b"\"LOGIN\"", ["JSON object", "string"]),
    (b"3780", ["JSON object", "number"]),
    (b"null", ["JSON object", "null"]),
    (b"{}", ["no 'command'"]),
    (b"{\"username\": \"alice\", \"secret\": \"pw\"}", ["no 'command'"]),
    (b"{\"command\": null}", ["no 'command'"]),
    (b"{\"command\": 5}", ["'command'", "string", "number"]),
    (b"{\"command\": [\"LOGIN\"]}", ["'command'", "string", "array"]),
    (b"{\"command\": \"DANCE\"}", ["unknown command", "DANCE"]),
    (b"{\"command\": \"login\", \"username\": \"anonymous\"}", ["unknown command"]),
    (b"{\"command\": \"LOCK_REQUEST\", \"username\": \"a\", \"secret\": \"b\"}", ["LOCK_REQUEST", "removed"]),
    (b"{\"command\": \"LOCK_ALLOWED\", \"username\": \"a\", \"secret\": \"b\"}", ["LOCK_ALLOWED"]),
    (b"{\"command\": \"LOCK_DENIED\", \"username\": \"a\", \"secret\": \"b\"}", ["LOCK_DENIED"]),
    (b"\xff\xfe{}", ["UTF-8"]),
    (b"{\"command\": \"LOGIN\", \"username\": \"\xe9\"}", ["UTF-8"]),
    (b"[" * 150 + b"]" * 150, ["deep"]),
    (b"{\"command\": \"ACTIVITY_MESSAGE\", \"username\": \"anonymous\", \"activity\": {\"x\": NaN}}",
     ["not valid JSON", "NaN"]),
    (b"{\"command\": \"ACTIVITY_MESSAGE\", \"username\": \"anonymous\", \"activity\": {\"x\": 1e400}}",
     ["out of range"]),
    (b"{\"command\": \"LOGIN\", \"username\": \"anonymous\", \"n\": " + b"9" * 5000 + b"}", ["number"]),
]

SERVER_ONLY = [
    {"command": "SERVER_ANNOUNCE", "load": 0, "hostname": "h", "port": 1},
    {"command": "ACTIVITY_BROADCAST", "activity": {}, "id": "x"},
    {"command": "SYNC_USER", "users": {"mallory": "pw"}},
    {"command": "NEW_USER", "username": "mallory", "secret": "pw"},
    {"command": "USER_CONFLICT", "username": "alice"},
    {"command": "ACTIVITY_RETRIEVE", "after": ""},
    {"command": "BUNDLE", "messages": []},
]

SENT_TO_CLIENTS = [
    {"command": "LOGIN_SUCCESS", "info": "logged in as user anonymous"},
    {"command": "LOGIN_FAILED", "info": "x"},
    {"command": "REGISTER_SUCCESS", "info": "x"},
    {"command": "REGISTER_FAILED", "info": "x"},
    {"command": "REDIRECT", "hostname": "h", "port": 1},
]


@pytest.fixture(params=[False, True], ids=["fresh", "logged-in"])
def offender(request, shared):
    """A connection about to misbehave: fresh, or logged in as anonymous."""
    return login(shared.port) if request.param else LineClient(shared.port)


@pytest.mark.parametrize("line, words", MALFORMED, ids=[repr(line[:30]) for line, _ in MALFORMED])
def test_malformed_lines_are_invalid_and_close(shared, shared_bystander, offender, line, words):
    """Section 3: anything that is not a well-formed, known message is INVALID_MESSAGE + close."""
    send_line(offender, line)
    expect_failure(offender, "INVALID_MESSAGE", *words)
    still_served(shared_bystander, 1)


@pytest.mark.parametrize("message", SERVER_ONLY, ids=[m["command"] for m in SERVER_ONLY])
def test_server_commands_from_a_client_are_invalid(shared, shared_bystander, offender, message):
    """Server commands need an authenticated server link: from a client they change nothing."""
    offender.send(message)
    expect_failure(offender, "INVALID_MESSAGE", message["command"], "AUTHENTICATE")
    assert "mallory" not in shared.users()
    assert "alice" not in shared.blocked()
    still_served(shared_bystander, 1)


@pytest.mark.parametrize("message", SENT_TO_CLIENTS, ids=[m["command"] for m in SENT_TO_CLIENTS])
def test_replies_meant_for_clients_are_invalid_from_a_client(shared, shared_bystander, offender, message):
    """A server never accepts the replies it sends to clients."""
    offender.send(message)
    expect_failure(offender, "INVALID_MESSAGE", message["command"], "sent by servers")
    still_served(shared_bystander, 1)


def test_authenticate_from_a_logged_in_client_is_invalid(server, bystander):
    """A client connection cannot turn into a server link."""
    client = login(server.port)
    client.send({"command": "AUTHENTICATE", "secret": "test-secret"})
    expect_failure(client, "INVALID_MESSAGE", "AUTHENTICATE", "client")
    assert not server.links()
    still_served(bystander, 1)


@pytest.mark.parametrize("command", ["INVALID_MESSAGE", "AUTHENTICATION_FAIL"])
def test_a_client_reporting_a_failure_is_closed_silently(shared, shared_bystander, offender, command):
    """Section 2: the receiver of INVALID_MESSAGE or AUTHENTICATION_FAIL closes too."""
    offender.send({"command": command, "info": "you did something wrong"})
    offender.expect_closed()
    still_served(shared_bystander, 1)


def test_an_over_long_line_is_invalid(make_server):
    """Section 2 decision: a line longer than the maximum is an INVALID_MESSAGE."""
    server = make_server(max_line=256)
    bystander = login(server.port)
    client = login(server.port)
    client.send_raw(b'{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":{"t":"'
                    + b"x" * 400 + b'"}}\n')
    expect_failure(client, "INVALID_MESSAGE", "longer than the limit of 256 bytes")
    still_served(bystander, 1)
    # a line of exactly the limit is fine
    bystander.send_raw(line_of(256) + b"\n")
    assert bystander.expect("ACTIVITY_BROADCAST")["activity"]["t"].startswith("yyy")


def line_of(size):
    """An ACTIVITY_MESSAGE line of exactly ``size`` bytes (terminator not included)."""
    body = b'{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":{"t":"'
    line = body + b"y" * (size - len(body) - 3) + b'"}}'
    assert len(line) == size
    return line


def test_the_limit_does_not_count_the_carriage_return(make_server):
    """``\\r\\n`` is a line end: a telnet line of exactly the limit is accepted too."""
    server = make_server(max_line=256)
    client = login(server.port)
    client.send_raw(line_of(256) + b"\r\n")
    assert client.expect("ACTIVITY_BROADCAST")["activity"]["t"].startswith("yyy")


def test_an_over_long_line_without_newline_is_cut_short(make_server):
    """The server need not wait for the end of a line it will reject anyway."""
    server = make_server(max_line=256)
    client = LineClient(server.port)
    client.send_raw(b"{" + b" " * 1000)
    expect_failure(client, "INVALID_MESSAGE", "longer than the limit")


def test_messages_before_an_over_long_line_are_still_handled(make_server):
    """Lines are handled in order: what came before the over-long line is answered first."""
    server = make_server(max_line=256)
    client = LineClient(server.port)
    client.send_raw(b'{"command":"REGISTER","username":"early","secret":"pw"}\n' + b"x" * 400 + b"\n")
    client.expect("REGISTER_SUCCESS")
    expect_failure(client, "INVALID_MESSAGE", "longer than the limit")
    assert "early" in server.users()


def test_only_the_failing_line_counts_lines_after_it_are_ignored(server):
    """After a failure reply the server closes: later lines in the same packet are not handled."""
    client = LineClient(server.port)
    client.send_raw(b'{"command":"LOGIN","username":"nobody","secret":"x"}\n'
                    b'{"command":"REGISTER","username":"late","secret":"pw"}\n')
    expect_failure(client, "LOGIN_FAILED")
    assert "late" not in server.users()


# --- telnet and packetisation -----------------------------------------------------------------

def test_telnet_line_ends_and_blank_lines(server):
    """Section 2: ``\\r\\n`` line ends, blank lines and spaces around the JSON are fine."""
    client = LineClient(server.port)
    client.send_raw(b'\r\n\r\n   \r\n\t\n{"command":"REGISTER","username":"tel","secret":"net"}\r\n\r\n')
    client.expect("REGISTER_SUCCESS")
    client.send_raw(b'  {"command" : "LOGIN", "username" : "tel", "secret" : "net"}  \r\n')
    client.expect("LOGIN_SUCCESS")
    client.send_raw(b'\r\n{"command":"ACTIVITY_MESSAGE","username":"tel","secret":"net",'
                    b'"activity":{"typed":"by hand"}}\r\n\r\n')
    assert client.expect("ACTIVITY_BROADCAST")["activity"] == {"typed": "by hand", "authenticated_user": "tel"}


def test_several_messages_in_one_packet_are_answered_in_order(server):
    """A burst of lines in one packet is handled line by line, in order."""
    client = LineClient(server.port)
    client.send_raw(b'{"command":"REGISTER","username":"burst","secret":"pw"}\n'
                    b'{"command":"LOGIN","username":"burst","secret":"pw"}\n'
                    + b"".join(b'{"command":"ACTIVITY_MESSAGE","username":"burst","secret":"pw",'
                               b'"activity":{"n":%d}}\n' % n for n in range(10))
                    + b'{"command":"LOGOUT"}\n')
    client.expect("REGISTER_SUCCESS")
    client.expect("LOGIN_SUCCESS")
    assert [client.expect("ACTIVITY_BROADCAST")["activity"]["n"] for _ in range(10)] == list(range(10))
    client.expect_closed()


def test_one_message_split_over_several_packets(server):
    """A line is handled when its newline arrives, however it was split."""
    client = LineClient(server.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = b'{"command":"LOGIN","username":"anonymous"}\n'
    for part in (line[:5], line[5:17], line[17:-1]):
        client.send_raw(part)
        with pytest.raises(TimeoutError):  # nothing is answered before the line is complete
            client.recv_line(timeout=0.2)
    client.send_raw(b"\n")
    client.expect("LOGIN_SUCCESS")


def test_a_message_sent_byte_by_byte(server):
    """Even one byte per packet works (a person typing into telnet)."""
    client = LineClient(server.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in b'{"command":"LOGIN","username":"anonymous"}\r\n':
        client.send_raw(bytes([byte]))
    client.expect("LOGIN_SUCCESS")


def test_a_last_line_without_newline_is_handled_at_end_of_input(server):
    """``printf '{...}' | nc host port``: the final line has no terminator, then EOF."""
    register(server.port, *ALICE).close()
    client = LineClient(server.port)
    client.send_raw(b'{"command":"LOGIN","username":"alice","secret":"alice-secret"}')
    client.sock.shutdown(socket.SHUT_WR)
    client.expect("LOGIN_SUCCESS")
    client.expect_closed()


def test_many_clients_at_once(server):
    """Thread per connection: concurrent logins and activities do not interfere."""
    results = []

    def run(n):
        client = login(server.port)
        activity(client, {"n": n})
        while True:
            got = client.expect("ACTIVITY_BROADCAST")
            if got["activity"]["n"] == n:
                results.append(n)
                break
        client.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == list(range(30))
    wait_until(lambda: server.state.load() == 0, message="every client gone")
