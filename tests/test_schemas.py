"""The message catalogue: which commands exist, their shapes (``schemas/``), and the wire format.

PROTOCOL.md section 3 lists every command; ``schemas/`` holds one JSON Schema per command; the
dispatch tables in ``handlers`` say who may send what. These tests keep the three in step, show a
valid example of every message, and pin the readable ``info`` a malformed one earns. The last part
covers ``protocol.encode``/``decode``: one compact JSON object per line, UTF-8.
"""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activitynet import handlers, protocol, schemas
from activitynet.protocol import InvalidMessage, decode, encode
from harness import ROOT

# Commands a server only ever sends (to clients): they have schemas but no handler.
SENT_ONLY = {"REGISTER_SUCCESS", "REGISTER_FAILED", "LOGIN_SUCCESS", "LOGIN_FAILED", "REDIRECT"}

# One valid example of every command, as in PROTOCOL.md section 3.
EXAMPLES = {
    "REGISTER": {"command": "REGISTER", "username": "alice", "secret": "pw"},
    "REGISTER_SUCCESS": {"command": "REGISTER_SUCCESS", "info": "register success for alice"},
    "REGISTER_FAILED": {"command": "REGISTER_FAILED", "info": "alice is already registered with the system"},
    "LOGIN": {"command": "LOGIN", "username": "alice", "secret": "pw"},
    "LOGIN_SUCCESS": {"command": "LOGIN_SUCCESS", "info": "logged in as user alice"},
    "LOGIN_FAILED": {"command": "LOGIN_FAILED", "info": "attempt to login with wrong secret"},
    "REDIRECT": {"command": "REDIRECT", "hostname": "127.0.0.1", "port": 3781},
    "LOGOUT": {"command": "LOGOUT"},
    "ACTIVITY_MESSAGE": {"command": "ACTIVITY_MESSAGE", "username": "alice", "secret": "pw",
                         "activity": {"text": "hi"}},
    "ACTIVITY_BROADCAST": {"command": "ACTIVITY_BROADCAST", "id": "a1",
                           "activity": {"text": "hi", "authenticated_user": "alice"}},
    "INVALID_MESSAGE": {"command": "INVALID_MESSAGE", "info": "the message has no 'command' field"},
    "AUTHENTICATION_FAIL": {"command": "AUTHENTICATION_FAIL", "info": "the supplied secret is incorrect: x"},
    "AUTHENTICATE": {"command": "AUTHENTICATE", "secret": "server-secret"},
    "SERVER_ANNOUNCE": {"command": "SERVER_ANNOUNCE", "load": 5, "hostname": "128.250.13.46", "port": 3570},
    "SYNC_USER": {"command": "SYNC_USER", "users": {"user1": "secret1", "user2": "secret2"}},
    "NEW_USER": {"command": "NEW_USER", "username": "foo", "secret": "bar"},
    "USER_CONFLICT": {"command": "USER_CONFLICT", "username": "foo"},
    "ACTIVITY_RETRIEVE": {"command": "ACTIVITY_RETRIEVE", "after": "foobar"},
    "BUNDLE": {"command": "BUNDLE", "messages": [{"command": "NEW_USER", "username": "foo", "secret": "bar"}]},
}

# A value of the wrong JSON type for each kind of field.
WRONG_TYPE = {"string": 5, "integer": "5", "object": [], "array": {}}


def schema_files():
    return {path.stem for path in (ROOT / "schemas").glob("*.json") if path.name != "definitions.json"}


def field_types(command):
    """{field: JSON type} of a command's schema, definitions inlined."""
    found = {}
    for field, spec in schemas.SCHEMAS[command]["properties"].items():
        kind = spec.get("type")
        if isinstance(kind, str):
            found[field] = kind
    return found


# --- tables and files name the same commands --------------------------------------------------

def test_dispatch_tables_and_schema_files_name_the_same_commands():
    """Every handled command has a schema file, and every schema file is handled or only sent."""
    handled = set(handlers.CLIENT_HANDLERS) | set(handlers.SERVER_HANDLERS) | set(handlers.NEW_HANDLERS)
    assert handled | SENT_ONLY == schema_files()
    assert not handled & SENT_ONLY, "a command a server only sends must not be accepted"


def test_loaded_schemas_are_the_files_in_schemas():
    """The validator knows exactly the commands of ``schemas/``."""
    assert schemas.COMMANDS == schema_files()


def test_the_validators_are_built_on_first_use_not_at_import():
    """Importing the module reads no schema file; the first validation builds every validator."""
    code = ("from activitynet import schemas; assert 'SCHEMAS' not in vars(schemas); "
            "schemas.validate({'command': 'LOGOUT'}); assert 'SCHEMAS' in vars(schemas); "
            "print(sorted(schemas.COMMANDS))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == str(sorted(schema_files()))


def test_the_validators_can_be_loaded_from_another_directory(tmp_path):
    """``schemas.load(directory)`` validates against other files (here: one command fewer and
    a LOGOUT that needs a reason); ``schemas.load()`` goes back to the packaged ones."""
    for path in (ROOT / "schemas").glob("*.json"):
        if path.stem != "BUNDLE":
            schema = json.loads(path.read_text())
            if path.stem == "LOGOUT":
                schema["required"].append("reason")
            (tmp_path / path.name).write_text(json.dumps(schema))
    try:
        schemas.load(tmp_path)
        assert schemas.COMMANDS == schema_files() - {"BUNDLE"}
        with pytest.raises(InvalidMessage, match="LOGOUT is missing the field 'reason'"):
            schemas.validate({"command": "LOGOUT"})
    finally:
        schemas.load()
    assert schemas.COMMANDS == schema_files()
    schemas.validate({"command": "LOGOUT"})


def test_examples_cover_every_command():
    """This file shows an example of every command."""
    assert set(EXAMPLES) == schema_files()


def test_lock_protocol_is_gone():
    """Section 3: LOCK_REQUEST, LOCK_ALLOWED and LOCK_DENIED were removed."""
    for command in handlers.REMOVED_COMMANDS:
        assert command not in schemas.COMMANDS
        for table in handlers.HANDLERS_BY_ROLE.values():
            assert command not in table


def test_roles_accept_what_protocol_md_says():
    """A fresh connection may become a client or authenticate as a server; a client may not send
    server commands and a server link may not send client commands."""
    client_commands = {"REGISTER", "LOGIN", "LOGOUT", "ACTIVITY_MESSAGE"}
    server_commands = {"AUTHENTICATE", "SERVER_ANNOUNCE", "ACTIVITY_BROADCAST", "SYNC_USER",
                       "NEW_USER", "USER_CONFLICT", "ACTIVITY_RETRIEVE", "BUNDLE"}
    failures = {"INVALID_MESSAGE", "AUTHENTICATION_FAIL"}  # a peer's failure reply: we close too
    assert set(handlers.CLIENT_HANDLERS) == client_commands | failures
    assert set(handlers.SERVER_HANDLERS) == server_commands | failures
    assert client_commands | {"AUTHENTICATE"} <= set(handlers.NEW_HANDLERS)
    assert not (server_commands - {"AUTHENTICATE", "BUNDLE"}) & set(handlers.NEW_HANDLERS)


# --- each schema: one valid example, and readable errors -----------------------------------------

@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_valid_example_passes(command):
    """The example of each command, as PROTOCOL.md shows it, is valid."""
    schemas.validate(dict(EXAMPLES[command]))


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_extra_fields_are_harmless(command):
    """PROTOCOL.md: extra fields are accepted (other implementations add their own)."""
    schemas.validate({**EXAMPLES[command], "x-extension": [1, 2, 3]})


@pytest.mark.parametrize("command, field", [
    (command, field) for command in sorted(EXAMPLES)
    for field in schemas.SCHEMAS[command]["required"] if field != "command"])
def test_missing_required_field_is_named(command, field):
    """A missing required field earns an info naming the command and the field."""
    message = dict(EXAMPLES[command])
    del message[field]
    with pytest.raises(InvalidMessage) as caught:
        schemas.validate(message)
    info = caught.value.info
    assert info.startswith(command) and f"missing the field '{field}'" in info, info


@pytest.mark.parametrize("command, field, kind", [
    (command, field, kind) for command in sorted(EXAMPLES)
    for field, kind in field_types(command).items() if field in EXAMPLES[command]])
def test_ill_typed_field_is_named_with_both_types(command, field, kind):
    """A field of the wrong JSON type earns an info naming the field and the type wanted."""
    message = {**EXAMPLES[command], field: WRONG_TYPE[kind]}
    with pytest.raises(InvalidMessage) as caught:
        schemas.validate(message)
    info = caught.value.info
    assert f"field '{field}'" in info and f"must be a{'n' if kind[0] in 'aeiou' else ''} {kind}" in info, info


@pytest.mark.parametrize("message, words", [
    ({"command": "REDIRECT", "hostname": "h", "port": 70000}, ["'port'", "from 1 to 65535", "70000"]),
    ({"command": "REDIRECT", "hostname": "h", "port": 0}, ["'port'", "from 1 to 65535"]),
    ({"command": "SERVER_ANNOUNCE", "load": -1, "hostname": "h", "port": 1}, ["'load'"]),
    ({"command": "SERVER_ANNOUNCE", "load": True, "hostname": "h", "port": 1}, ["'load'", "boolean"]),
    ({"command": "SERVER_ANNOUNCE", "load": 1, "hostname": "", "port": 1}, ["'hostname'", "empty"]),
    ({"command": "LOGIN", "username": ""}, ["'username'", "empty"]),
    ({"command": "ACTIVITY_BROADCAST", "activity": {}, "id": ""}, ["'id'", "empty"]),
    ({"command": "SYNC_USER", "users": {"bob": 5}}, ["users.bob", "string"]),
    ({"command": "BUNDLE", "messages": [5]}, ["messages", "object"]),
    ({"command": "ACTIVITY_RETRIEVE", "after": "x", "marks": {"o": -1}}, ["marks"]),
    ({"command": "ACTIVITY_MESSAGE", "username": "a", "activity": "hello"}, ["'activity'", "object", "string"]),
])
def test_out_of_range_values_are_explained(message, words):
    """Ranges, empty strings and nested fields are explained in words."""
    with pytest.raises(InvalidMessage) as caught:
        schemas.validate(message)
    for word in words:
        assert word in caught.value.info, caught.value.info


def test_retrieve_after_may_be_null():
    """Other implementations send ``"after": null`` for 'everything you have'."""
    schemas.validate({"command": "ACTIVITY_RETRIEVE", "after": None})


def test_numbers_that_are_whole_floats_pass_as_integers():
    """Section 5: numbers may come back as floats from the Java implementation."""
    schemas.validate({"command": "SERVER_ANNOUNCE", "load": 2.0, "hostname": "h", "port": 3780.0})


# --- the message builders produce what the schemas describe ----------------------------------

@pytest.mark.parametrize("message", [
    protocol.register("u", "s"), protocol.login("u", "s"), protocol.login("anonymous"),
    protocol.logout(), protocol.activity_message("u", "s", {"a": 1}),
    protocol.activity_message("anonymous", None, {}), protocol.redirect("h", 3780),
    protocol.activity_broadcast({"a": 1}, "o:1"), protocol.authenticate("s"),
    protocol.server_announce(0, "h", 3780), protocol.sync_user({"u": "s"}), protocol.new_user("u", "s"),
    protocol.user_conflict("u"), protocol.activity_retrieve(""), protocol.activity_retrieve("x", {"o": 3}),
    protocol.info_message("LOGIN_FAILED", "attempt to login with wrong secret"),
], ids=lambda message: message["command"])
def test_builders_match_the_schemas(message):
    """Every message the code builds is valid against its own schema."""
    schemas.validate(message)


def test_protocol_errors_reply_with_their_own_command():
    """Each failure exception turns into its own reply command with the info."""
    for error, command in [(protocol.InvalidMessage, "INVALID_MESSAGE"),
                           (protocol.AuthenticationFail, "AUTHENTICATION_FAIL"),
                           (protocol.LoginFailed, "LOGIN_FAILED"),
                           (protocol.RegisterFailed, "REGISTER_FAILED")]:
        reply = error("why").reply()
        assert reply == {"command": command, "info": "why"}
        schemas.validate(reply)


# --- encode / decode --------------------------------------------------------------------------

def test_encode_is_compact_json_and_one_newline():
    """Section 2: compact JSON, then one newline."""
    data = encode({"command": "ACTIVITY_BROADCAST", "activity": {"a": [1, 2]}, "id": "x"})
    assert data == b'{"command":"ACTIVITY_BROADCAST","activity":{"a":[1,2]},"id":"x"}\n'
    assert data.count(b"\n") == 1


def test_encode_writes_utf8_not_escapes_and_newlines_inside_strings_stay_escaped():
    """UTF-8 on the wire, and a newline inside a string never splits the line."""
    data = encode({"text": "héllo ✓ 你好", "multi": "a\nb"})
    assert "héllo ✓ 你好".encode() in data
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert decode(data[:-1]) == {"text": "héllo ✓ 你好", "multi": "a\nb"}


def test_encode_of_a_lone_surrogate_is_still_valid_utf8():
    """JSON may carry "\\ud800" (valid JSON text, not a valid Unicode scalar); relaying it must
    not crash the encoder nor put invalid UTF-8 on the wire."""
    data = encode({"text": "\ud800x"})
    data.decode("utf-8")  # strict: raises on invalid UTF-8
    assert json.loads(data) == {"text": "\ud800x"}


def test_decode_round_trips_an_object():
    """What encode writes, decode reads back unchanged."""
    message = {"command": "LOGIN", "username": "bob", "secret": "s", "n": [1, 2.5, None, True]}
    assert decode(encode(message).rstrip(b"\n")) == message


@pytest.mark.parametrize("line, words", [
    (b"[1, 2]", ["JSON object", "array"]),
    (b'"LOGIN"', ["JSON object", "string"]),
    (b"42", ["JSON object", "number"]),
    (b"null", ["JSON object", "null"]),
    (b"true", ["JSON object", "boolean"]),
    (b"{not json", ["not valid JSON"]),
    (b'{"command": "LOGIN",}', ["not valid JSON"]),
    (b"hello", ["not valid JSON"]),
    (b"\xff\xfe\x00", ["UTF-8"]),
    (b'{"command": "LOGIN", "username": "\xc3"}', ["UTF-8"]),
    (b'{"text": "\xed\xa0\x80"}', ["UTF-8"]),  # an encoded surrogate is not UTF-8
    (b"[" * 200 + b"]" * 200, ["levels deep"]),
    (b'{"a": NaN}', ["not valid JSON"]),
    (b'{"a": -Infinity}', ["not valid JSON"]),
    (b'{"a": 1e999}', ["number"]),
    (b'{"a": ' + b"1" * 5000 + b"}", ["number"]),
])
def test_decode_rejects_what_is_not_a_json_object_in_utf8(line, words):
    """Only a JSON object in UTF-8 is a message; the info says what was wrong."""
    with pytest.raises(InvalidMessage) as caught:
        decode(line)
    for word in words:
        assert word in caught.value.info, caught.value.info


def test_decode_allows_nesting_up_to_the_bound_and_brackets_inside_strings():
    """The nesting bound counts real nesting only, not brackets inside strings."""
    deep = b'{"a":' * 50 + b"1" + b"}" * 50
    assert decode(deep)["a"]["a"]["a"]
    assert decode(b'{"text": "' + b"[" * 1000 + b'"}') == {"text": "[" * 1000}


# --- the fast codec and the reference agree -----------------------------------------------------
# ``protocol`` decodes and encodes with msgspec and hands whatever msgspec refuses to the json
# module, which holds the rules. Whichever of the two ran must make no difference.

def _outcome(function, line):
    try:
        return "ok", function(line)
    except InvalidMessage as exc:
        return "invalid", exc.info


@pytest.mark.parametrize("line", [
    b'{"a": 9007199254740993}', b'{"a": 18446744073709551616}', b'{"a": -' + b"9" * 400 + b"}",
    b'{"a": 1.00000000000000011102230246251565404236316680908203125}', b'{"a": 2.2250738585072011e-308}',
    b'{"a": 1e400}', b'{"a": -0.0}', b'{"a": -0}', b'{"a": 1E2, "b": 0.1e1, "c": 1.5e-400}',
    b'{"a": "\\ud800"}', b'{"a": "\\udc00x\\ud83d\\ude00"}', b'{"a": "\\u0000\\u00e9"}',
    b'\xef\xbb\xbf{"a": 1}', b'{"a": 1, "a": 2}', b'{"a": "\x01"}', b'{"a": 1}\x0b', b'\xc2\xa0{"a": 1}',
    b' {"a": []} ', b'{"a": 01}', b'{"a": 1.}', b'{"a": 1,}', b"{'a': 1}", b'{"a": NaN}',
    b'{"a": "\xed\xa0\x80"}', b'{"a": "\xff"}', b"[1]", b"", b"  ", b"h",
])
def test_fast_decode_agrees_with_the_reference_on_edge_cases(line):
    assert _outcome(decode, line) == _outcome(protocol.decode_reference, line)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 60, max_value=2 ** 200)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.sampled_from([None, 1]),
       st.booleans())
def test_fast_codec_agrees_with_the_reference(message, indent, ascii_only):
    """Any object, written compactly, indented or ASCII-escaped, decodes to the same value and
    the same error either way; what ``encode`` writes decodes back to the message."""
    line = json.dumps(message, indent=indent, ensure_ascii=ascii_only).replace("\n", " ").encode(
        "utf-8", "surrogatepass")
    assert _outcome(decode, line) == _outcome(protocol.decode_reference, line)
    written = encode(message)
    assert written.endswith(b"\n") and written.count(b"\n") == 1
    written.decode("utf-8")  # valid UTF-8, even for lone surrogates
    assert json.loads(written) == message == decode(written[:-1])


@settings(max_examples=300, deadline=None)
@given(st.from_regex(rb"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?", fullmatch=True))
def test_fast_decode_reads_every_number_as_the_reference_does(number):
    line = b'{"n": ' + number + b"}"
    fast, reference = _outcome(decode, line), _outcome(protocol.decode_reference, line)
    assert fast == reference
    if fast[0] == "ok":
        assert type(fast[1]["n"]) is type(reference[1]["n"])



# --- activity ids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("activity_id, parsed", [
    ("0123456789abcdef:1:1700000000000", ("0123456789abcdef", 1, 1700000000000)),
    ("0123456789abcdef:" + "9" * 18 + ":" + "9" * 15, ("0123456789abcdef", 10 ** 18 - 1, 10 ** 15 - 1)),
    ("0123456789abcdef:007:0", ("0123456789abcdef", 7, 0)),
])
def test_parse_id_reads_our_ids(activity_id, parsed):
    assert protocol.parse_id(activity_id) == parsed


@pytest.mark.parametrize("activity_id", [
    "0123456789abcdef:" + "9" * 19 + ":1", "0123456789abcdef:1:" + "9" * 16, "0123456789ABCDEF:1:1",
    "0123456789abcde:1:1", "0123456789abcdeff:1:1", "0123456789abcdeg:1:1", "0123456789abcdef::1",
    "0123456789abcdef:1:", "0123456789abcdef:1:1:1", "0123456789abcdef:1", "0123456789abcdef:+1:1",
    "0123456789abcdef:-1:1", "0123456789abcdef: 1:1", "0123456789abcdef:1_0:1", "0123456789abcdef:\u0661:1",
    "0123456789abcdef:1:\u00b2", "0123456789abcdef:1:1\n", "0123456789abcde\u0660:1:1", "", ":", "::", "a1",
])
def test_parse_id_leaves_every_other_id_foreign(activity_id):
    """Foreign ids are opaque: anything not exactly our format (digits of other scripts
    included) is None, and is de-duplicated by the whole id instead."""
    assert protocol.parse_id(activity_id) is None


# --- the fast path of the activity commands (schemas.decode_valid) ------------------------------
# decode_valid may only ever accept, and what it accepts must be exactly what protocol.decode
# reads and the schema files pass; on valid activity messages without extra fields it must accept.

def _general_path(line):
    """What the general path makes of a line: the message if it is a valid activity command."""
    try:
        message = decode(line)
        if message.get("command") not in ("ACTIVITY_MESSAGE", "ACTIVITY_BROADCAST"):
            return "other command"
        schemas.validate(message)
    except InvalidMessage as exc:
        return "invalid: " + exc.info
    return message


def _agrees(line):
    """The fast path and the general path agree on ``line``; returns the fast path's answer."""
    fast, general = schemas.decode_valid(line), _general_path(line)
    if fast is not None:
        # Equal, and the activity written the same: its keys in order, 1 and 1.0 and true apart.
        assert fast == general and encode(fast["activity"]) == encode(general["activity"])
    return fast, general


@pytest.mark.parametrize("line, accepted", [
    (b'{"command":"ACTIVITY_MESSAGE","username":"a","secret":"s","activity":{"x":[1,2.5,null]}}', True),
    (b'{"activity":{},"username":"a","command":"ACTIVITY_MESSAGE"}', True),  # any order, no secret
    (b'{"command":"ACTIVITY_MESSAGE","username":"a","secret":null,"activity":{}}', True),
    (b'{"command":"ACTIVITY_MESSAGE","username":"\\ud83d\\ude00","activity":{}}', True),  # 1 character
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"n":' + b"9" * 40 + b'},"id":"x"}', True),
    (b'{"command":"ACTIVITY_BROADCAST",\r"activity":{},"id":"x"}', True),
    (b'{"command":"ACTIVITY_MESSAGE","username":"a","username":"b","activity":{}}', True),  # last wins
    (b'{"command":"ACTIVITY_MESSAGE","username":"","activity":{}}', False),
    (b'{"command":"ACTIVITY_MESSAGE","username":1,"activity":{}}', False),
    (b'{"command":"ACTIVITY_MESSAGE","username":"a","secret":1,"activity":{}}', False),
    (b'{"command":"ACTIVITY_MESSAGE","username":"a","activity":[]}', False),
    (b'{"command":"ACTIVITY_MESSAGE","username":"a"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{},"id":""}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{},"id":7}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":null,"id":"x"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"n":1e400},"id":"x"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"n":NaN},"id":"x"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"t":"\\ud800"},"id":"x"}', False),  # general path relays it
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"t":"\xed\xa0\x80"},"id":"x"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"t":"\xff"},"id":"x"}', False),
    (b'\xef\xbb\xbf{"command":"ACTIVITY_BROADCAST","activity":{},"id":"x"}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{},"id":"x","extra":1}', False),  # valid: general path
    (b'{"command":"ACTIVITY_MESSAGE","command":"LOGIN","username":"a","activity":{}}', False),
    (b'{"command":"LOGIN","command":"ACTIVITY_MESSAGE","username":"a","activity":{}}', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{"a":' + b"[" * 101 + b"]" * 101 + b'},"id":"x"}', False),
    (b'{"command":"LOGIN","username":"a"}', False),
    (b'{"username":"a","activity":{}}', False),
    (b'[{"command":"ACTIVITY_BROADCAST","activity":{},"id":"x"}]', False),
    (b'{"command":"ACTIVITY_BROADCAST","activity":{},"id":"x"', False),
])
def test_fast_path_of_activity_commands_agrees_with_the_schemas(line, accepted):
    fast, _ = _agrees(line)
    assert (fast is not None) == accepted


wrong_values = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=2) \
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), json_values, max_size=3)
FIELDS = {"username": st.text(min_size=1, max_size=4), "secret": st.none() | st.text(max_size=4),
          "activity": st.dictionaries(st.text(max_size=5), json_values, max_size=4),
          "id": st.text(min_size=1, max_size=12), "extra": wrong_values}
KNOWN = {"ACTIVITY_MESSAGE": {"command", "username", "secret", "activity"},
         "ACTIVITY_BROADCAST": {"command", "activity", "id"}}


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["ACTIVITY_MESSAGE", "ACTIVITY_BROADCAST", "ACTIVITY_BROADCAST", "LOGIN", ""]),
       st.data(), st.permutations(range(6)), st.sampled_from([None, 1]), st.booleans())
def test_fast_path_agrees_with_the_schemas_on_any_message(command, data, order, indent, ascii_only):
    """Any mix of right, wrong and missing fields, in any order, written any way: the fast path
    accepts exactly the valid activity messages without fields of other commands, and reads them
    as the general path does (values, types, the activity's key order)."""
    message = {"command": command}
    for name in FIELDS:  # mostly the command's own fields, mostly right
        own = name in KNOWN.get(command, ())
        kinds = ["right"] * 4 + ["wrong", "absent"] if own else ["absent"] * 6 + ["right", "wrong"]
        kind = data.draw(st.sampled_from(kinds))
        if kind != "absent" and (name != "extra" or kind == "wrong"):
            message[name] = data.draw(FIELDS[name] if kind == "right" else wrong_values, label=name)
    keys = sorted(message, key=lambda key: order[list(message).index(key)])
    line = json.dumps({key: message[key] for key in keys}, indent=indent, ensure_ascii=ascii_only) \
        .replace("\n", " ").encode("utf-8", "surrogatepass")
    fast, general = _agrees(line)
    if isinstance(general, dict) and set(general) <= KNOWN[command]:
        assert fast is not None
    if fast is not None:
        assert type(general) is dict
