"""JSON Schema validation at the edges: one schema file per command in ``schemas/``.

Validation runs on every inbound message, so the fast path uses validators compiled to Python code
by fastjsonschema (about 2 µs a message instead of about 60 µs for an interpreted validator). Only
when a message fails does python-jsonschema look at it again, to pick the most relevant error and
say it in words a person can act on. Both are built once from the same files, by ``load`` at
start-up or on first use (nothing is read at import), and are
only read afterwards (neither library promises thread-safe construction).

The two commands that carry activities, nearly every message a busy server reads, have a faster
path still: ``decode_valid`` reads a line straight into typed msgspec structs that say what their
schema files say, parsing and validating in one C call (about 2.5 µs less per message). It only
ever accepts: anything unusual (a failed check, an extra field, a lone surrogate, deep nesting,
another command) returns None, and the general path (``protocol.decode`` and ``validate``)
decides, with its words. tests/test_schemas.py holds the structs to the schema files.

A reader's whole batch of such lines can be read in one C call too (``decode_activities``), when
every activity in it is flat (its values are strings, numbers, booleans or null, as almost every
activity is); the lines are then handled as one (see ``State.client_activities``).
"""

import copy
import json
import operator
import threading
from pathlib import Path
from typing import Annotated, Optional, Union

import fastjsonschema
import jsonschema
import msgspec
from jsonschema.exceptions import best_match

from . import protocol
from .protocol import InvalidMessage, type_name

DEFINITIONS = "definitions.json"


def schema_dir():
    """Where the schema files are: shipped inside the package, or ``schemas/`` of a source tree."""
    installed = Path(__file__).with_name("schema_files")
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "schemas"


def _inline_refs(node, definitions):
    """Replace ``{"$ref": "definitions.json#/definitions/x"}`` by a copy of definition x, so each
    command schema stands alone for both validator libraries."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(DEFINITIONS + "#/definitions/"):
            return copy.deepcopy(definitions[ref.rsplit("/", 1)[1]])
        return {key: _inline_refs(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, definitions) for item in node]
    return node


def load_schemas(directory=None):
    """{command: self-contained schema} for every command file in ``directory``."""
    directory = Path(directory or schema_dir())
    definitions = json.loads((directory / DEFINITIONS).read_text())["definitions"]
    schemas = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == DEFINITIONS:
            continue
        schema = _inline_refs(json.loads(path.read_text()), definitions)
        schema.pop("$id", None)
        schemas[path.stem] = schema
    return schemas


_building = threading.Lock()  # one build at a time; readers never take it


def load(directory=None):
    """Build the validators from the schema files in ``directory`` (default: ``schema_dir()``)
    and use them from now on. The first use of this module calls it; a server may call it at
    start-up to pay the cost there, a test to validate against other files. Not meant to run
    while other threads validate: the tables are swapped one by one."""
    with _building:
        _build(directory)


def _load_once():
    with _building:
        if isinstance(_FAST, _NotLoaded):  # another thread may have loaded while we waited
            _build(None)


def _build(directory):
    global SCHEMAS, COMMANDS, _FAST, _EXPLAIN
    found = load_schemas(directory)
    fast = {command: fastjsonschema.compile(schema) for command, schema in found.items()}
    explaining = {command: jsonschema.Draft7Validator(schema) for command, schema in found.items()}
    SCHEMAS, COMMANDS, _FAST, _EXPLAIN = found, frozenset(found), fast, explaining


class _NotLoaded(dict):
    """Holds the place of a validator table until the first lookup loads the real one, a plain
    dict; from then on lookups never come here, and ``validate`` is as fast as if built at
    import."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def __missing__(self, command):
        _load_once()
        return globals()[self.table][command]


_FAST = _NotLoaded("_FAST")
_EXPLAIN = _NotLoaded("_EXPLAIN")


def __getattr__(name):
    """``SCHEMAS`` and ``COMMANDS`` before the first load: load; they are plain globals after."""
    if name in ("SCHEMAS", "COMMANDS"):
        _load_once()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate(message):
    """Check a decoded message against the schema of its command; raise ``InvalidMessage``.

    The caller has already made sure ``message["command"]`` names a known command.
    """
    command = message["command"]
    try:
        _FAST[command](message)
    except fastjsonschema.JsonSchemaException:
        raise InvalidMessage(explain(command, message)) from None


def explain(command, message):
    """One sentence naming what is wrong with ``message``, for its INVALID_MESSAGE ``info``."""
    error = best_match(_EXPLAIN[command].iter_errors(message))
    if error is None:  # the two libraries disagree; say something true anyway
        return f"{command} message does not match its schema"
    field = error.json_path[2:] or "the message"  # "$.users.bob" -> "users.bob"
    where = f"field '{field}'" if error.path else "the message"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        needed = ", ".join(SCHEMAS[command]["required"][1:]) or "no fields"
        prefix = f"in field '{field}', " if error.path else ""
        return f"{command} {prefix}is missing the field '{missing}' (it needs {needed})"
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"{command} {where} must be {_article(wanted)} {wanted}, not {type_name(error.instance)}"
    if error.validator in ("minimum", "maximum"):
        bounds = SCHEMAS[command]["properties"].get(str(error.path[0]), {}) if error.path else {}
        low, high = bounds.get("minimum"), bounds.get("maximum")
        if low is not None and high is not None:
            return f"{command} {where} must be from {low} to {high}, not {error.instance!r}"
        return f"{command} {where} is out of range: {error.message}"
    if error.validator == "minLength":
        return f"{command} {where} must not be empty"
    return f"{command} {where} is invalid: {error.message}"


def _article(word):
    return "an" if word[:1] in "aeiou" else "a"


# --- the fast path of the two activity commands (see the module docstring) ----------------------

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]  # definitions.json: username, id


class _ActivityMessage(msgspec.Struct, tag_field="command", tag="ACTIVITY_MESSAGE",
                       forbid_unknown_fields=True):
    """schemas/ACTIVITY_MESSAGE.json"""
    username: _NonEmpty
    activity: dict
    secret: Union[str, None, msgspec.UnsetType] = msgspec.UNSET  # optional_secret

    def as_message(self):
        message = {"command": "ACTIVITY_MESSAGE", "username": self.username, "activity": self.activity}
        if self.secret is not msgspec.UNSET:  # null stays null, as protocol.decode has it
            message["secret"] = self.secret
        return message


class _ActivityBroadcast(msgspec.Struct, tag_field="command", tag="ACTIVITY_BROADCAST",
                         forbid_unknown_fields=True):
    """schemas/ACTIVITY_BROADCAST.json"""
    activity: dict
    id: _NonEmpty

    def as_message(self):
        return protocol.activity_broadcast(self.activity, self.id)


_decode_activity_command = msgspec.json.Decoder(Union[_ActivityMessage, _ActivityBroadcast]).decode


def decode_valid(line):
    """An ACTIVITY_MESSAGE or ACTIVITY_BROADCAST line as the message ``protocol.decode`` would
    return, already valid by its schema; None for any other line (then decode and validate)."""
    if protocol.may_nest_too_deep(line):
        return None
    try:
        return _decode_activity_command(line).as_message()
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return None


# --- a batch of activity lines at once (see the module docstring) -------------------------------

_Scalar = Union[str, int, float, bool, None]  # a JSON value that is not an array or object


class _FlatActivityMessage(msgspec.Struct, tag_field="command", tag="ACTIVITY_MESSAGE",
                           forbid_unknown_fields=True):
    """``_ActivityMessage`` whose activity holds no array or object; ``secret`` is None when
    absent (as ``message.get("secret")`` reads it)."""
    username: _NonEmpty
    activity: dict[str, _Scalar]
    secret: Union[str, None] = None


class _FlatActivityBroadcast(msgspec.Struct, tag_field="command", tag="ACTIVITY_BROADCAST",
                             forbid_unknown_fields=True):
    """``_ActivityBroadcast`` whose activity holds no array or object."""
    activity: dict[str, _Scalar]
    id: _NonEmpty


_BATCH_DECODERS = {"ACTIVITY_MESSAGE": msgspec.json.Decoder(list[_FlatActivityMessage]).decode,
                   "ACTIVITY_BROADCAST": msgspec.json.Decoder(list[_FlatActivityBroadcast]).decode}
_SEPARATOR = b",\n"
_FIRST_BYTE = operator.itemgetter(0)


def decode_activities(lines, command) -> Optional[list]:
    """Every line of ``lines`` read as a ``command`` (ACTIVITY_MESSAGE or ACTIVITY_BROADCAST)
    with a flat activity, in one C call: a list of structs with the fields of the command (a
    message's absent secret is None), or None when any line is anything else; then
    each line goes the way of ``decode_valid``. Each struct is what ``decode_valid`` reads of
    its line, valid by its schema and nested only 2 deep.

    Why the lines cannot run into each other in the one JSON array read: they are joined with
    ",\n", and each but the first must start with "{". A newline cannot be inside a string or a
    number, so each separator is between two tokens, and inside an object a comma is followed
    by a key, never by "{": each separator is one of the array's own. With as many elements as
    lines, each element is then exactly one line."""
    try:
        firsts = bytes(map(_FIRST_BYTE, lines))
    except IndexError:  # an empty line
        return None
    if firsts[1:].count(b"{") != len(lines) - 1:
        return None
    try:
        structs = _BATCH_DECODERS[command](b"[" + _SEPARATOR.join(lines) + b"]")
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return None
    return structs if len(structs) == len(lines) else None
