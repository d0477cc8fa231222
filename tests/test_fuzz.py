"""Property tests: whatever a client sends, it gets the protocol's answer and the server keeps serving.

``expected`` below is the client side of PROTOCOL.md sections 2 and 3 written as a small reference
model: given the bytes a fresh connection sends, it says which replies come back, in order, and
which activities get broadcast. Hypothesis then throws three kinds of input at one live server:
random bytes, random JSON values, and sequences of valid messages with a field mutated, dropped or
retyped. After every case a long-lived logged-in client (the keeper) must receive exactly the
activities the case broadcast and then its own: the server is still serving, and nobody else was
disturbed.

Every input is followed by a LOGOUT line, so each case ends with the server closing the
connection: after a failure reply, or because of the LOGOUT.
"""

import json
import secrets

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activitynet import schemas
from harness import LineClient, LocalServer, activity, login, register

SERVER_SECRET = "fuzz-" + secrets.token_hex(16)  # never guessed by the fuzzer
LOGOUT_LINE = b'{"command":"LOGOUT"}\n'
MAX_DEPTH = 100
VALIDATORS = {command: jsonschema.Draft7Validator(schema) for command, schema in schemas.SCHEMAS.items()}
CLIENT_TABLE = {"REGISTER", "LOGIN", "LOGOUT", "ACTIVITY_MESSAGE", "INVALID_MESSAGE", "AUTHENTICATION_FAIL"}
NEW_TABLE = CLIENT_TABLE | {"AUTHENTICATE", "BUNDLE"}
FUZZ_SETTINGS = settings(max_examples=150, deadline=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the reference model ------------------------------------------------------------------------

class Stop(Exception):
    """The connection ends here (after ``reply``, if any)."""

    def __init__(self, reply=None):
        super().__init__(reply)
        self.reply = reply


def strict_json(line):
    """The message in ``line``, or raise Stop("INVALID_MESSAGE"): UTF-8, RFC 8259 JSON (no NaN,
    no Infinity, no number too large to represent), an object, nested at most MAX_DEPTH deep."""
    def reject(_):
        raise ValueError

    def finite(text):
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError
        return value

    try:
        text = line.decode("utf-8")
        value = json.loads(text.removeprefix("\ufeff"), parse_constant=reject, parse_float=finite)
    except (ValueError, RecursionError):
        raise Stop("INVALID_MESSAGE") from None
    if not isinstance(value, dict) or depth(value) > MAX_DEPTH:
        raise Stop("INVALID_MESSAGE")
    return value


def depth(value):
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


class Session:
    """What the server does with one fresh connection, per PROTOCOL.md section 3."""

    def __init__(self, users):
        self.users = users  # shared with the test: REGISTER_SUCCESS adds to it
        self.role = "new"
        self.logged_in = None  # (username, secret)
        self.replies = []  # commands sent back, in order
        self.broadcasts = []  # activities every logged-in client receives

    def run(self, data):
        try:
            for line in data.split(b"\n"):
                line = line[:-1] if line.endswith(b"\r") else line
                if not line or line.isspace():
                    continue
                if line == b"h" and self.role != "client":
                    continue  # a heartbeat: servers may send it before AUTHENTICATE
                self.dispatch(strict_json(line))
        except Stop as stop:
            if stop.reply:
                self.replies.append(stop.reply)
        return self

    def dispatch(self, message):
        command = message.get("command")
        if not isinstance(command, str):
            raise Stop("INVALID_MESSAGE")
        if command not in (NEW_TABLE if self.role == "new" else CLIENT_TABLE):
            raise Stop("INVALID_MESSAGE")
        if any(VALIDATORS[command].iter_errors(message)):
            raise Stop("INVALID_MESSAGE")
        getattr(self, command.lower())(message)

    def register(self, message):
        username, secret = message["username"], message["secret"]
        if self.logged_in:
            raise Stop("INVALID_MESSAGE")
        if username == "anonymous" or username in self.users:
            raise Stop("REGISTER_FAILED")
        self.users[username] = secret
        self.role = "client"
        self.replies.append("REGISTER_SUCCESS")

    def login(self, message):
        username, secret = message["username"], message.get("secret")
        if self.logged_in:
            raise Stop("INVALID_MESSAGE")
        if username != "anonymous" and (secret is None or self.users.get(username) != secret):
            raise Stop("LOGIN_FAILED")
        self.role = "client"
        self.logged_in = (username, secret)
        self.replies.append("LOGIN_SUCCESS")  # one server, no neighbours: no REDIRECT

    def logout(self, message):
        raise Stop()

    def activity_message(self, message):
        username, secret = message["username"], message.get("secret")
        if not self.logged_in or username != self.logged_in[0]:
            raise Stop("AUTHENTICATION_FAIL")
        if username != "anonymous" and secret != self.logged_in[1]:
            raise Stop("AUTHENTICATION_FAIL")
        self.broadcasts.append({**message["activity"], "authenticated_user": username})
        self.replies.append("ACTIVITY_BROADCAST")

    def invalid_message(self, message):
        raise Stop()  # the receiver of a failure reply closes too

    authentication_fail = invalid_message

    def authenticate(self, message):
        if message["secret"] != SERVER_SECRET:
            raise Stop("AUTHENTICATION_FAIL")
        raise AssertionError("the fuzzer guessed the server secret")

    def bundle(self, message):
        inner = message["messages"]
        if not inner or inner[0].get("command") != "AUTHENTICATE":
            raise Stop("INVALID_MESSAGE")
        for each in inner:
            self.dispatch(each)


# --- the live server and the check --------------------------------------------------------------

@pytest.fixture(scope="module")
def live():
    server = LocalServer(secret=SERVER_SECRET)
    register(server.port, "alice", "pw").close()
    keeper = login(server.port)
    yield server, keeper, {"alice": "pw"}
    keeper.close()
    server.stop()


pytestmark = pytest.mark.usefixtures("no_server_errors")


def check(live, data):
    """Send ``data`` (then LOGOUT) on a fresh connection; compare with the model."""
    server, keeper, users = live
    check.cases += 1
    payload = data + b"\n" + LOGOUT_LINE
    model = Session(users).run(payload)
    client = LineClient(server.port)
    try:
        client.send_raw(payload)
        received = []
        while (message := client.recv()) is not None:
            received.append(message)
    finally:
        client.close()
    assert [m["command"] for m in received] == model.replies, f"for {payload!r}: got {received}"
    mine = [m["activity"] for m in received if m["command"] == "ACTIVITY_BROADCAST"]
    assert mine == model.broadcasts
    # the keeper: exactly the case's broadcasts, then its own activity
    for expected in model.broadcasts:
        assert keeper.expect("ACTIVITY_BROADCAST")["activity"] == expected
    activity(keeper, {"keeper": check.cases})
    assert keeper.expect("ACTIVITY_BROADCAST")["activity"] == {"keeper": check.cases,
                                                               "authenticated_user": "anonymous"}


check.cases = 0


def run_cases(case):
    """Run a @given function; make sure it really threw a good number of cases at the server."""
    before = check.cases
    case()
    assert check.cases - before >= 100, f"only {check.cases - before} cases ran"


# --- strategies -----------------------------------------------------------------------------------

COMMANDS = sorted(schemas.COMMANDS | {"LOCK_REQUEST", "login", ""})
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def encode(message, ascii_only, crlf):
    return json.dumps(message, ensure_ascii=ascii_only).encode() + (b"\r\n" if crlf else b"\n")


def templates(draw):
    """One valid client message (valid as JSON and schema; not necessarily welcome)."""
    kind = draw(st.sampled_from(["register", "login-anon", "login-alice", "login-wrong", "activity-anon",
                                 "activity-alice", "logout", "authenticate", "invalid"]))
    if kind == "register":
        return {"command": "REGISTER", "username": draw(st.text(min_size=1, max_size=8)),
                "secret": draw(st.text(max_size=8))}
    if kind == "login-anon":
        return {"command": "LOGIN", "username": "anonymous"}
    if kind == "login-alice":
        return {"command": "LOGIN", "username": "alice", "secret": "pw"}
    if kind == "login-wrong":
        return {"command": "LOGIN", "username": "alice", "secret": draw(st.text(max_size=4))}
    if kind == "activity-anon":
        return {"command": "ACTIVITY_MESSAGE", "username": "anonymous", "activity": draw(json_objects)}
    if kind == "activity-alice":
        return {"command": "ACTIVITY_MESSAGE", "username": "alice", "secret": "pw", "activity": draw(json_objects)}
    if kind == "logout":
        return {"command": "LOGOUT"}
    if kind == "authenticate":
        return {"command": "AUTHENTICATE", "secret": draw(st.text(max_size=8))}
    return {"command": "INVALID_MESSAGE", "info": draw(st.text(max_size=8))}


def mutate(draw, message):
    """Leave it, drop a field, retype or replace a field, add one, or change the command."""
    how = draw(st.sampled_from(["keep", "keep", "drop", "retype", "add", "command"]))
    message = dict(message)
    if how == "drop":
        del message[draw(st.sampled_from(sorted(message)))]
    elif how == "retype":
        message[draw(st.sampled_from(sorted(message)))] = draw(json_values)
    elif how == "add":
        message[draw(st.text(max_size=6))] = draw(json_values)
    elif how == "command":
        message["command"] = draw(st.sampled_from(COMMANDS) | st.text(max_size=6))
    return message


@st.composite
def mutated_sessions(draw):
    """Often a good LOGIN first, so that mutated activities meet a logged-in connection."""
    who = draw(st.sampled_from([None, ("anonymous", None), ("alice", "pw")]))
    messages = []
    if who is not None:
        messages.append({"command": "LOGIN", "username": who[0], "secret": who[1]})
        messages.append(mutate(draw, {"command": "ACTIVITY_MESSAGE", "username": who[0],
                                      "secret": who[1], "activity": draw(json_objects)}))
    messages += [mutate(draw, templates(draw)) for _ in range(draw(st.integers(1 - len(messages) // 2, 3)))]
    ascii_only, crlf = draw(st.booleans()), draw(st.booleans())
    return b"".join(encode(m, ascii_only, crlf) for m in messages)


@st.composite
def random_objects(draw):
    """Random JSON, often an object, sometimes with a real command name."""
    value = draw(json_values | json_objects)
    if isinstance(value, dict) and draw(st.booleans()):
        value["command"] = draw(st.sampled_from(COMMANDS))
    return encode(value, draw(st.booleans()), draw(st.booleans()))


# --- the properties -------------------------------------------------------------------------------

def test_model_agrees_with_hand_written_cases():
    """The model itself, on cases whose answer PROTOCOL.md states outright."""
    users = {"alice": "pw"}
    assert Session(users).run(b'{"command":"LOGIN","username":"anonymous"}\n').replies == ["LOGIN_SUCCESS"]
    assert Session(users).run(b"nonsense\n").replies == ["INVALID_MESSAGE"]
    assert Session(users).run(b'{"command":"ACTIVITY_MESSAGE","username":"a","activity":{}}').replies \
        == ["AUTHENTICATION_FAIL"]
    assert Session(users).run(b'{"command":"LOGIN","username":"alice","secret":"no"}').replies == ["LOGIN_FAILED"]
    assert Session(users).run(b'{"command":"REGISTER","username":"alice","secret":"x"}').replies \
        == ["REGISTER_FAILED"]
    assert Session(users).run(b'h\n\r\n{"command":"LOGOUT"}\n{"command":"LOGIN"}').replies == []
    assert Session(users).run(b'{"command":"BUNDLE","messages":[]}').replies == ["INVALID_MESSAGE"]


def test_random_bytes(live):
    """Random bytes, sometimes as several lines: almost always INVALID_MESSAGE, never a crash."""
    @FUZZ_SETTINGS
    @given(st.binary(max_size=300) | st.builds(lambda parts: b"\n".join(parts), st.lists(st.binary(max_size=40))))
    def case(data):
        check(live, data)
    run_cases(case)


def test_random_json(live):
    """Random JSON values and objects, some with a real command name."""
    @FUZZ_SETTINGS
    @given(st.lists(random_objects(), min_size=1, max_size=3))
    def case(lines):
        check(live, b"".join(lines))
    run_cases(case)


def test_mutated_valid_messages(live):
    """Valid sessions with one field dropped, retyped or replaced per message."""
    @FUZZ_SETTINGS
    @given(mutated_sessions())
    def case(data):
        check(live, data)
    run_cases(case)
