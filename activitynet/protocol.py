"""The wire format: one compact JSON object per line, the message builders and protocol errors.

Every message that leaves a server or a client is built here, so the field names live in one
place; ``schemas/`` holds the same shapes for validation.
"""

import json
import os
import re

import msgspec

ENCODING = "utf-8"
HEARTBEAT = b"h\n"
HEARTBEAT_LINE = b"h"

# Two codecs, one behaviour. msgspec's C codec is the fast path (a 200-byte broadcast: about
# 0.4 us to decode and 0.3 us to encode, against 2.3 and 2.9 us for the json module). The json
# module below is the reference: every rule (no NaN or Infinity, strict UTF-8, integers of any
# size kept exactly, "\\ud800" accepted and relayed escaped, the words of every error) is its,
# and it takes over whenever msgspec refuses something. msgspec accepts only what it also
# accepts, with the same result (tests/test_schemas.py holds the two side by side), so which
# one ran is invisible from outside.
_fast_encoder = msgspec.json.Encoder()
_fast_dumps = _fast_encoder.encode
_fast_dumps_lines = _fast_encoder.encode_lines
_fast_loads = msgspec.json.Decoder().decode
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_dumps_ascii = json.JSONEncoder(separators=(",", ":")).encode


def encode(message):
    """Compact JSON plus the line terminator, as bytes ready for a socket."""
    try:
        return _fast_dumps(message) + b"\n"
    except (TypeError, ValueError, OverflowError):  # e.g. a lone surrogate: the reference decides
        return encode_reference(message)


def encode_lines(messages):
    """``encode`` of each of ``messages``, joined: one C call for a batch."""
    try:
        return _fast_dumps_lines(messages)
    except (TypeError, ValueError, OverflowError):
        return b"".join(map(encode, messages))


def encode_reference(message):
    """``encode`` by the json module alone."""
    try:
        return (_dumps(message) + "\n").encode(ENCODING)
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" is valid JSON): keep it escaped
        return (_dumps_ascii(message) + "\n").encode(ENCODING)


class _NotJson(ValueError):
    pass


def _reject_constant(name):
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if value - value != 0:  # inf: we could only send it on as Infinity, which is not JSON
        raise _NotJson(f"the number {text[:20]} is out of range")
    return value


# NaN and Infinity are Python extensions to JSON; relaying them would put non-JSON on the wire.
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


MAX_DEPTH = 100
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def nesting_depth(line):
    """How deeply arrays and objects nest in a JSON text (brackets inside strings ignored)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", line))
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def may_nest_too_deep(line):
    """A cheap first look: False means ``line`` cannot nest more than MAX_DEPTH levels."""
    return line.count(b"[") + line.count(b"{") > MAX_DEPTH


def decode(line):
    """Parse one line (bytes, without its terminator) into a message object.

    Raises ``InvalidMessage`` when the line is not a JSON object; the ``info`` says why in terms a
    person typing into telnet can act on. Nesting is bounded before parsing: the C parser and
    encoder recurse once per level, and a hostile line of a million brackets must not exhaust a
    reader thread's stack.
    """
    if may_nest_too_deep(line) and nesting_depth(line) > MAX_DEPTH:
        raise InvalidMessage(f"the message nests arrays or objects more than {MAX_DEPTH} levels deep")
    try:
        message = _fast_loads(line)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return decode_reference(line)
    if not isinstance(message, dict):
        raise InvalidMessage(f"the message must be a JSON object, not {type_name(message)}")
    return message


def decode_reference(line):
    """``decode`` by the json module alone, after the nesting check: the rules and their words."""
    try:
        text = line.decode(ENCODING)  # strict: json.loads(bytes) would also take UTF-16 and surrogates
    except UnicodeDecodeError:
        raise InvalidMessage("the message is not valid UTF-8 text") from None
    try:
        message = _decoder.decode(text[1:] if text.startswith("\ufeff") else text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"the message is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except _NotJson as exc:
        raise InvalidMessage(f"the message is not valid JSON: {exc}") from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        raise InvalidMessage("the message has a number too long to read") from None
    if not isinstance(message, dict):
        raise InvalidMessage(f"the message must be a JSON object, not {type_name(message)}")
    return message


_BOM = b"\xef\xbb\xbf"


def relayable_broadcast(message, line):
    """Whether a received ACTIVITY_BROADCAST (decoded ``message``, valid by its schema) may be
    relayed as the bytes ``line`` it came in, instead of being encoded again.

    Encoding is a third of a relaying server's work per activity. The received line is a valid
    JSON object on one line (``decode`` accepted it), and whitespace between tokens is fine to
    pass on, except a carriage return: Java's ``readLine`` ends a line there. A leading BOM is
    dropped by ``decode`` and must not reach clients; fields other than command, activity and
    id are dropped too, as an encoded broadcast would. Those few lines are encoded again."""
    return len(message) == 3 and b"\r" not in line and not line.startswith(_BOM)


def type_name(value):
    """The JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- errors -------------------------------------------------------------------------------------

class ProtocolError(Exception):
    """A reply-and-close condition. ``command`` is the failure reply the peer receives."""

    command = "INVALID_MESSAGE"

    def __init__(self, info):
        super().__init__(info)
        self.info = info

    def reply(self):
        return {"command": self.command, "info": self.info}


class InvalidMessage(ProtocolError):
    command = "INVALID_MESSAGE"
    kind = "other"  # why, as one of stats.INVALID_REASONS (counted by the monitor)

    def __init__(self, info, kind=None):
        super().__init__(info)
        if kind is not None:
            self.kind = kind


class Refused(InvalidMessage):
    """A server link refused by the re-attachment rule (``netmap.accepts``): the reply carries
    the machine field ``refused`` (a ``netmap.REFUSED_*`` code) so the dialler moves on to its next
    candidate without reading ``info``, which is for people."""

    def __init__(self, refusal):
        super().__init__(f"link refused: {refusal}")
        self.code = refusal.code

    def reply(self):
        return {"command": self.command, "info": self.info, "refused": self.code}


class AuthenticationFail(ProtocolError):
    command = "AUTHENTICATION_FAIL"


class LoginFailed(ProtocolError):
    command = "LOGIN_FAILED"


class RegisterFailed(ProtocolError):
    command = "REGISTER_FAILED"


# --- activity ids -------------------------------------------------------------------------------
# Our ids are "<origin>:<seq>:<sent>": origin is 16 random hex digits chosen when a server process
# starts, seq counts that process's activities from 1, sent is the wall-clock time it accepted the
# activity, in ms. Foreign ids are opaque; ``parse_id`` returns None for them. This is the one
# place that knows the format.

_OWN_ID = re.compile(r"([0-9a-f]{16}):([0-9]{1,18}):([0-9]{1,15})")


def new_origin():
    return os.urandom(8).hex()


def make_id(origin, seq, sent_ms):
    return f"{origin}:{seq}:{sent_ms}"


class Sequence:
    """The sequence numbers of our ids, handed out in runs: ``take(count)`` is the next
    ``count`` of them as a range (one call per batch, not per activity); ``last`` is the last
    one handed out."""

    __slots__ = ("last",)

    def __init__(self, first=1):
        self.last = first - 1

    def take(self, count):
        first = self.last + 1
        self.last += count
        return range(first, first + count)


def make_ids(origin, seqs, sent_ms):
    """``make_id`` of each of ``seqs``, all sent at ``sent_ms``."""
    head, tail = f"{origin}:", f":{sent_ms}"
    return [head + str(seq) + tail for seq in seqs]


def parse_id(activity_id):
    """(origin, seq, sent in ms) for one of our ids, None for a foreign one."""
    match = _OWN_ID.fullmatch(activity_id)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


_OWN_IDS = re.compile(r"^([0-9a-f]{16}):([0-9]{1,18}):([0-9]{1,15})$", re.MULTILINE)


def parse_run(activity_ids):
    """(origin, first seq, the oldest sent in ms, the sent in ms they all share or None) when
    ``activity_ids`` (a list) are ours, from one origin, with consecutive sequence numbers:
    what a peer relaying a stream sends. The shared sent is given only for ids exactly as
    ``make_ids`` writes them (no zeros ahead of a number), so that they can be made again from
    it (the data store keeps no copy of such ids). None for any other list (then ``parse_id``
    each). One regular expression reads them all, and the numbers are compared as text where
    that says the same (a relay's hot path)."""
    text = "\n".join(activity_ids)
    count = len(activity_ids)
    if text.count("\n") != count - 1:  # an id with a newline in it
        return None
    found = _OWN_IDS.findall(text)
    if len(found) != count:
        return None
    origins, seqs, sents = zip(*found)
    origin, first, last = origins[0], int(seqs[0]), int(seqs[-1])
    if origins.count(origin) != count or last - first != count - 1:
        return None
    if min(map(len, seqs)) == max(map(len, seqs)):  # as long, rising: count numbers from first to last
        if list(seqs) != sorted(set(seqs)):
            return None
    elif list(map(int, seqs)) != list(range(first, last + 1)):
        return None
    if sents.count(sents[0]) == count:
        sent = int(sents[0])
        return origin, first, sent, None if ":0" in text else sent
    if min(map(len, sents)) == max(map(len, sents)):  # as long: the least text is the least number
        return origin, first, int(min(sents)), None
    return origin, first, min(map(int, sents)), None


def split_id(activity_id):
    """(origin, seq) as the texts an id of ours would have there, unchecked: for scanning a whole
    history, about three times cheaper than ``parse_id``. The caller checks the origin against
    origins it knows (whose ids are ours) and the seq with ``str.isdigit``."""
    origin, _, rest = activity_id.partition(":")
    return origin, rest.partition(":")[0]


# --- message builders ---------------------------------------------------------------------------

def info_message(command, info):
    return {"command": command, "info": info}


def register(username, secret):
    return {"command": "REGISTER", "username": username, "secret": secret}


def login(username, secret=None):
    message = {"command": "LOGIN", "username": username}
    if secret is not None:
        message["secret"] = secret
    return message


def logout():
    return {"command": "LOGOUT"}


def activity_message(username, secret, activity):
    message = {"command": "ACTIVITY_MESSAGE", "username": username, "activity": activity}
    if secret is not None:
        message["secret"] = secret
    return message


def redirect(hostname, port):
    return {"command": "REDIRECT", "hostname": hostname, "port": port}


def activity_broadcast(activity, activity_id):
    return {"command": "ACTIVITY_BROADCAST", "activity": activity, "id": activity_id}


def activity_broadcasts(activities, activity_ids):
    """``activity_broadcast`` of each activity with its id."""
    return [{"command": "ACTIVITY_BROADCAST", "activity": activity, "id": activity_id}
            for activity, activity_id in zip(activities, activity_ids)]


def authenticate(secret):
    return {"command": "AUTHENTICATE", "secret": secret}


def server_announce(load, hostname, port, lineage=None, netmap=None):
    """SERVER_ANNOUNCE; ``lineage`` and ``map`` (wire forms, see ``netmap``) are our optional
    extension, ignored by other implementations."""
    message = {"command": "SERVER_ANNOUNCE", "load": load, "hostname": hostname, "port": port}
    if lineage is not None:
        message["lineage"] = lineage
    if netmap is not None:
        message["map"] = netmap
    return message


def sync_user(users):
    return {"command": "SYNC_USER", "users": users}


def new_user(username, secret):
    return {"command": "NEW_USER", "username": username, "secret": secret}


def user_conflict(username):
    return {"command": "USER_CONFLICT", "username": username}


def activity_retrieve(after, marks=None, held=None, lineage=None, alone=False):
    """ACTIVITY_RETRIEVE; ``marks`` (origin -> end of the first run held), ``held`` (origin ->
    runs held above it), the dialler's ``lineage`` and ``alone`` are our optional extensions."""
    message = {"command": "ACTIVITY_RETRIEVE", "after": after}
    if marks is not None:  # even empty: it says we de-duplicate (recovery rule 5)
        message["marks"] = marks
    if held:
        message["held"] = held
    if lineage is not None:
        message["lineage"] = lineage
    if alone:
        message["alone"] = True
    return message
