"""A reader's batch of activity lines, handled as one (issue 13, item 1).

A busy client or link sends runs of ACTIVITY_MESSAGE or ACTIVITY_BROADCAST lines. A server reads
such a run in one C call (``schemas.decode_activities``), judges a relayed stream's ids at once
(``protocol.parse_run``, ``dedup.Intake.receive_run``), and writes each connection one piece.
None of that may be visible from outside: every line must mean what it means alone, every other
line goes the way it always went, and the replies (INVALID_MESSAGE texts included) are the same.
"""

import json
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from activitynet import protocol, schemas
from activitynet.dedup import Intake
from harness import login, register
from test_server_links import broadcast, live_fake

AM = "ACTIVITY_MESSAGE"
AB = "ACTIVITY_BROADCAST"


def _as_message(struct, command):
    """What ``decode_valid`` reads, from one struct of ``decode_activities``."""
    if command == AM:
        return {"username": struct.username, "activity": struct.activity, "secret": struct.secret}
    return {"activity": struct.activity, "id": struct.id}


def _fields(message, command):
    if command == AM:
        return {"username": message["username"], "activity": message["activity"], "secret": message.get("secret")}
    return {"activity": message["activity"], "id": message["id"]}


def _agrees(lines, command):
    """``decode_activities`` accepts ``lines`` only when ``decode_valid`` accepts each line as
    ``command``, and reads each as it does (values, types, the activity's key order)."""
    structs = schemas.decode_activities(lines, command)
    if structs is not None:
        assert len(structs) == len(lines)
        for struct, line in zip(structs, lines):
            alone = schemas.decode_valid(line)
            assert alone is not None and alone["command"] == command, line
            assert _as_message(struct, command) == _fields(alone, command)
            assert protocol.encode(struct.activity) == protocol.encode(alone["activity"])
    return structs


def am(n, **extra):
    message = {"command": AM, "username": "anonymous", "activity": {"n": n, "p": "x", **extra}}
    return json.dumps(message, separators=(",", ":")).encode()


def ab(activity_id, **body):
    return json.dumps(broadcast(activity_id, **body), separators=(",", ":")).encode()


@pytest.mark.parametrize("lines, command, accepted", [
    ([am(1), am(2), am(3)], AM, True),
    ([am(1, f=1.5, t=True, z=None, big=2 ** 70, s="\u00e9")], AM, True),
    ([b'{"command":"ACTIVITY_MESSAGE","username":"u","secret":"s","activity":{}}',
      b'{"activity":{"a":1},"username":"u","command":"ACTIVITY_MESSAGE","secret":null}'], AM, True),
    ([b' {"command":"ACTIVITY_MESSAGE","username":"u","activity":{}}'], AM, True),  # the first may
    ([am(1), b' ' + am(2)], AM, False),  # any later line must start with "{"
    ([ab("i-1"), ab("i-2")], AB, True),
    ([ab("i-1"), ab("i-2")], AM, False),  # a client's batch holds ACTIVITY_MESSAGEs only
    ([am(1), ab("i-2")], AM, False),
    ([am(1), am(2, nested={"a": 1})], AM, False),  # not flat: each line alone (decode_valid)
    ([am(1), am(2, nested=[1])], AM, False),
    ([am(1) + b"," + am(2)], AM, False),  # two messages on one line
    ([am(1) + b"," + am(2), am(3)[:-1]], AM, False),
    ([am(1)[:-1], b"}"], AM, False),
    ([b'{"command":"ACTIVITY_MESSAGE","username":"u"', b'{"activity":{}}'], AM, False),
    ([b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"a":"', b'{"}}'], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"","activity":{}}'], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"n":1e400}}'], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"n":NaN}}'], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"t":"\\ud800"}}'], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"t":"\xff"}}'], AM, False),
    ([am(1), b'\xef\xbb\xbf' + am(2)], AM, False),
    ([am(1), b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{},"x":1}'], AM, False),
    ([am(1), b'{"command":"LOGOUT"}'], AM, False),
    ([am(1), b"h"], AM, False),
    ([ab("i-1"), b'{"command":"ACTIVITY_BROADCAST","activity":{},"id":""}'], AB, False),
])
def test_a_batch_is_read_as_each_line_alone(lines, command, accepted):
    assert (_agrees(lines, command) is not None) == accepted


_piece = st.sampled_from([am(1), am(2, s="a,b"), ab("x:1"), ab("y", q="}{"), am(3, nested={"k": [1]}),
                          b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":{"a":1},"secret":null}',
                          b'{"command":"ACTIVITY_MESSAGE","username":"u","activity":[]}', b"h", b"{}"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=6), st.data(), st.sampled_from([AM, AB]))
def test_lines_cut_and_glued_anywhere_are_never_misread(pieces, data, command):
    """Whatever way the bytes of valid and invalid lines are cut into lines (messages split
    across lines, several on one line), a batch is read only as its lines alone would be."""
    text = b"\n".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=4))
    glue = data.draw(st.lists(st.integers(0, len(text)), max_size=3))
    edited = bytearray(text)
    for at in sorted(glue, reverse=True):
        if edited[at:at + 1] == b"\n":
            edited[at:at + 1] = b","
    for at in sorted(cuts, reverse=True):
        edited[at:at] = b"\n"
    lines = [line for line in bytes(edited).split(b"\n") if line]
    if lines:
        _agrees(lines, command)


def test_every_valid_flat_batch_is_taken():
    assert _agrees([am(n) for n in range(500)], AM) is not None
    assert _agrees([ab(f"0123456789abcdef:{n}:1", n=n) for n in range(1, 500)], AB) is not None


# --- a relayed stream's ids ---------------------------------------------------------------------

OWN = "0123456789abcdef"


@pytest.mark.parametrize("ids, expected", [
    ([f"{OWN}:5:100", f"{OWN}:6:101", f"{OWN}:7:99"], (OWN, 5, 99, None)),
    ([f"{OWN}:1:1"], (OWN, 1, 1, 1)),
    ([f"{OWN}:9:7", f"{OWN}:10:7"], (OWN, 9, 7, 7)),  # one send time: make_ids writes them from it
    ([f"{OWN}:8:100", f"{OWN}:9:99", f"{OWN}:10:1000", f"{OWN}:11:7"], (OWN, 8, 7, None)),  # lengths differ
    ([f"{OWN}:098:5", f"{OWN}:099:5", f"{OWN}:100:5"], (OWN, 98, 5, None)),  # zeros ahead: as parse_id
    ([f"{OWN}:98:05", f"{OWN}:99:05"], (OWN, 98, 5, None)),  # reads them, but make_ids writes no zeros
    ([f"{OWN}:10:5", f"{OWN}:12:5", f"{OWN}:11:5"], None),  # from 10 to 12, but not in order
    ([f"{OWN}:10:5", f"{OWN}:12:5", f"{OWN}:12:5"], None),
    ([f"{OWN}:9:5", f"{OWN}:11:5", f"{OWN}:10:5"], None),
    ([f"{OWN}:5:100", f"{OWN}:7:100"], None),  # a gap
    ([f"{OWN}:6:100", f"{OWN}:5:100"], None),  # backwards
    ([f"{OWN}:5:100", f"{OWN}:5:100"], None),  # a copy
    ([f"{OWN}:5:100", f"fedcba9876543210:6:100"], None),  # two origins
    ([f"{OWN}:5:100", "foreign-6"], None),
    ([f"{OWN}:5:100\n{OWN}:6:100"], None),  # one id with a newline in it
    ([f"{OWN}:5:100", f"{OWN}:6:100\n"], None),
    ([f"{OWN}:5:100", f"{OWN}:\u0666:100"], None),  # digits of another script
    ([f"{OWN}:5:100", f"{OWN.upper()}:6:100"], None),
])
def test_parse_run_reads_only_a_run_of_one_origin(ids, expected):
    run = protocol.parse_run(ids)
    assert run == expected
    if run is not None:
        parsed = [protocol.parse_id(i) for i in ids]
        assert [p[:2] for p in parsed] == [(run[0], run[1] + k) for k in range(len(ids))]
        assert run[2] == min(p[2] for p in parsed)
        assert run[3] is None or ids == protocol.make_ids(run[0], range(run[1], run[1] + len(ids)), run[3])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([OWN, "fedcba9876543210", "x"]), st.integers(0, 1200),
                          st.integers(0, 10 ** 15 - 1), st.sampled_from(["", "0"])), min_size=1, max_size=8),
       st.booleans())
def test_parse_run_agrees_with_parse_id(parts, consecutive):
    """Runs (or not) of numbers of any length, from one origin or several: parse_run reads a
    run exactly when parse_id would find one origin and consecutive numbers."""
    if consecutive:
        parts = [(parts[0][0], parts[0][1] + k, sent, zero) for k, (_, _, sent, zero) in enumerate(parts)]
    ids = [f"{origin}:{zero}{seq}:{sent}" for origin, seq, sent, zero in parts]
    parsed = [protocol.parse_id(i) for i in ids]
    is_run = (None not in parsed and len({p[0] for p in parsed}) == 1
              and [p[1] for p in parsed] == list(range(parsed[0][1], parsed[0][1] + len(ids))))
    run = protocol.parse_run(ids)
    assert (run is not None) == is_run
    if run is not None:
        assert run[:3] == (parsed[0][0], parsed[0][1], min(p[2] for p in parsed))
        remade = protocol.make_ids(run[0], range(run[1], run[1] + len(ids)), run[3])
        assert (run[3] is not None) == (ids == remade)


def _state_of(intake):
    return (intake.marks(), intake.extras(), dict(intake.order._next), intake.order.held, intake.duplicates)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a" * 16, "b" * 16]), st.integers(1, 30), st.integers(1, 5)),
                min_size=1, max_size=12))
def test_receive_run_is_receive_of_each_or_nothing(runs):
    """``receive_run`` either does exactly what a ``receive`` of each number would (all new and
    due now) or changes nothing, so that the caller receives each."""
    by_run, one_by_one = Intake(100, hold_for=60), Intake(100, hold_for=60)
    for origin, first, length in runs:
        last = first + length - 1
        before = _state_of(by_run)
        took = by_run.receive_run(origin, first, last)
        released = []
        for seq in range(first, last + 1):
            released += one_by_one.receive(f"{origin}:{seq}:1", (origin, seq, 1), seq, 0.0)
        if took:
            assert released == list(range(first, last + 1))
        else:
            assert _state_of(by_run) == before
            for seq in range(first, last + 1):
                by_run.receive(f"{origin}:{seq}:1", (origin, seq, 1), seq, 0.0)
        assert _state_of(by_run) == _state_of(one_by_one)


def test_sent_all_is_sent_of_each():
    for seqs in ([1, 2, 3], [4, 5], [9, 10], [7], [11, 13]):
        together, each = Intake(100), Intake(100)
        for intake in (together, each):
            intake.sent(OWN, 3)
        together.sent_all(OWN, seqs)
        for seq in seqs:
            each.sent(OWN, seq)
        assert _state_of(together) == _state_of(each)


# --- live: the same lines, in one write or one by one -------------------------------------------

@pytest.fixture
def server(make_server):
    return make_server()


def _received(client, count):
    """The next ``count`` ACTIVITY_BROADCAST lines ``client`` receives (heartbeats and a
    link's SERVER_ANNOUNCEs skipped)."""
    lines = []
    while len(lines) < count:
        line = client.recv_line()
        assert line is not None, f"closed after {lines}"
        if b'"ACTIVITY_BROADCAST"' in line:
            lines.append(line)
    return lines


@pytest.mark.parametrize("in_one_write", [True, False])
def test_a_client_batch_with_a_bad_line_in_it(server, in_one_write):
    """200 activities, one sent under another user's name, 50 more: the first 200 reach
    everyone in order, then the sender gets the usual AUTHENTICATION_FAIL and is closed; what
    followed is never handled."""
    reader = login(server.port)
    sender = login(server.port)
    good = [am(n) for n in range(200)]
    bad = b'{"command":"ACTIVITY_MESSAGE","username":"mallory","activity":{"n":-1}}'
    after = [am(n) for n in range(200, 250)]
    lines = good + [bad] + after
    if in_one_write:
        sender.send_raw(b"".join(line + b"\n" for line in lines))
    else:  # the lines after it would race with the close (a reset can destroy the reply)
        for line in good + [bad]:
            sender.send_raw(line + b"\n")
    for client in (reader, sender):
        got = [json.loads(line) for line in _received(client, 200)]
        assert [m["activity"]["n"] for m in got] == list(range(200))
        assert all(m["command"] == AB and m["activity"]["authenticated_user"] == "anonymous" for m in got)
        assert len({m["id"] for m in got}) == 200
    failure = sender.expect("AUTHENTICATION_FAIL")
    assert failure["info"] == "the username mallory is not the one logged in on this connection (anonymous)"
    sender.expect_closed()
    reader.send_raw(am(999) + b"\n")
    assert json.loads(_received(reader, 1)[0])["activity"]["n"] == 999, "nothing after the bad line"


def test_a_client_batch_from_a_registered_user_checks_each_secret(server):
    register(server.port, "u", "s")
    sender = login(server.port, "u", "s")
    ok = b'{"command":"ACTIVITY_MESSAGE","username":"u","secret":"s","activity":{"n":%d}}'
    wrong = b'{"command":"ACTIVITY_MESSAGE","username":"u","secret":"t","activity":{"n":9}}'
    sender.send_raw(b"".join(ok % n + b"\n" for n in range(3)) + wrong + b"\n" + ok % 10 + b"\n")
    assert [json.loads(line)["activity"]["n"] for line in _received(sender, 3)] == [0, 1, 2]
    assert sender.expect("AUTHENTICATION_FAIL")["info"] == "the secret does not match the one of user u"


def test_a_link_batch_is_taken_as_each_line_would_be(server, fakes):
    """A neighbour's run of broadcasts in one write, with heartbeats, copies, a gap filled
    late, foreign ids and a carriage return among them: each client gets each activity once,
    in its sender's order, as the bytes received (the "\\r" one encoded again)."""
    fake = live_fake(fakes, server)
    other = live_fake(fakes, server)
    client = login(server.port)
    origin, now = "fedcba9876543210", int(time.time() * 1000)  # sent now: older is not delivered
    own = [ab(f"{origin}:{seq}:{now}", n=seq) for seq in range(1, 301)]
    lines = own[:100] + [b"h"] + own[100:150] + own[140:160] + own[170:200] + own[160:170] + own[200:]
    lines[5:5] = [ab("foreign-1", n=-1), ab("foreign-1", n=-1)]
    lines.insert(50, b'{"command":"ACTIVITY_BROADCAST",\r"activity":{"n":-2},"id":"foreign-2"}')
    fake.send_raw(b"".join(line + b"\n" for line in lines))
    got = _received(client, 302)
    ids = [json.loads(line)["id"] for line in got]
    assert ids == ([f"{origin}:{seq}:{now}" for seq in range(1, 6)] + ["foreign-1"]
                   + [f"{origin}:{seq}:{now}" for seq in range(6, 49)] + ["foreign-2"]
                   + [f"{origin}:{seq}:{now}" for seq in range(49, 301)])
    expected_own = dict(zip((f"{origin}:{seq}:{now}" for seq in range(1, 301)), own))
    for line, activity_id in zip(got, ids):
        if activity_id in expected_own:
            assert line == expected_own[activity_id]
    assert got[ids.index("foreign-2")] == b'{"command":"ACTIVITY_BROADCAST","activity":{"n":-2},"id":"foreign-2"}'
    assert _received(other, 302) == got, "forwarded alike to the other neighbour"
    snapshot = server.snapshot()
    assert snapshot["history"]["entries"] == 302


@pytest.fixture
def fakes():
    from test_server_links import FakeServer
    made = []

    def make(port):
        fake = FakeServer(port)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def test_a_stream_in_random_writes_arrives_whole(server):
    """Writes cut anywhere (mid-line included) and lines of every kind a client sends mixed in:
    all handled, in order."""
    reader = login(server.port)
    sender = login(server.port)
    lines = [am(n) if n % 37 else am(n, nested={"k": n}) for n in range(1000)]
    data = b"".join(line + b"\n" for line in lines)
    rng = random.Random(13)
    at = 0
    while at < len(data):
        size = rng.choice([1, 50, 700, 5000, 40000])
        sender.send_raw(data[at:at + size])
        at += size
    assert [json.loads(line)["activity"]["n"] for line in _received(reader, 1000)] == list(range(1000))


# --- reading lines ------------------------------------------------------------------------------

class _Chunks:
    """A transport whose reads return the given chunks, then EOF."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.peer = None

    def recv(self, size):
        return self.chunks.pop(0) if self.chunks else b""

    def fileno(self):
        return -1


def _lines_one_by_one(chunks, max_line):
    """What ``Connection.batches`` must yield, line by line: (lines, then "too long" or None)."""
    out, pending = [], b""
    for data in chunks:
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line = line[:-1] if line.endswith(b"\r") else line
            if len(line) > max_line:
                return out, "too long"
            if line and not line.isspace():
                out.append(line)
        if len(pending[:-1] if pending.endswith(b"\r") else pending) > max_line:
            return out, "too long"
    if pending.strip():
        out.append(pending.rstrip(b"\r"))
    return out, None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"{}", b"x" * 70, b" ", b"\t", b"", b"\r", b"a\rb", b"\x0b", b"h"]), max_size=30),
       st.data())
def test_reading_lines_in_bulk_is_reading_them_one_by_one(pieces, data):
    """Blank and whitespace lines dropped, a "\\r" ending stripped, an over-long line (past 64
    bytes here) refused after the lines before it: whatever the reads' boundaries."""
    from activitynet.connection import Connection, LineTooLong
    text = b"\n".join(pieces) + data.draw(st.sampled_from([b"", b"\n", b"\r\n"]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=4)))
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]) if text[a:b]]
    conn = Connection(_Chunks(chunks), poller=None, outgoing=None, max_line=64, max_outbox=1 << 20)
    got, ending = [], None
    try:
        for lines in conn.batches():
            got += lines
    except LineTooLong:
        ending = "too long"
    assert (got, ending) == _lines_one_by_one(chunks, 64)
