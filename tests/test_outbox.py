"""The write path: a reader that falls behind gets everything in order once it reads again (the
poller finishes what the kernel refused), and one that falls too far behind (past --max-outbox)
is disconnected without holding anyone else up."""

import socket

from activitynet import connection
from activitynet.state import State
from harness import LineClient, activity, login, wait_until

PAD = "p" * 200


def sluggish_client(port):
    """A logged-in client with a tiny receive buffer, so the server's sends back up quickly."""
    client = LineClient.__new__(LineClient)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    client.sock, client.timeout, client._buffer, client.eof = sock, 20.0, b"", False
    client.send({"command": "LOGIN", "username": "anonymous"})
    client.expect("LOGIN_SUCCESS")
    return client


def stream(sender, count, chunk=500):
    """``count`` activities numbered from 0, written ``chunk`` at a time; the sender reads its own
    copies between chunks, so only the other readers can fall behind."""
    for start in range(0, count, chunk):
        sender.send_raw(b"".join(
            b'{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":{"n":%d,"p":"%s"}}\n'
            % (n, PAD.encode()) for n in range(start, min(start + chunk, count))))
        for n in range(start, min(start + chunk, count)):
            assert sender.expect("ACTIVITY_BROADCAST")["activity"]["n"] == n


def test_a_reader_that_falls_behind_gets_everything_in_order(make_server):
    # rate_limit=0: this test streams 30,000 activities from one client as fast as it can, which
    # the default flood control (500/s) would stretch to a minute; pacing is tested in test_limits_live.
    server = make_server(max_outbox=64 * 1024 * 1024, rate_limit=0)
    late = sluggish_client(server.port)
    sender = login(server.port)
    count = 30_000  # about 8 MB: more than the kernel's socket buffers hold (4 MB at most here)
    stream(sender, count)
    assert any(c["bytes_queued"] > 0 for c in server.snapshot()["clients"]), \
        "the late reader's outbox never backed up: the test did not exercise the poller"
    for n in range(count):  # only now does it read: nothing lost, nothing out of order
        assert late.expect("ACTIVITY_BROADCAST")["activity"]["n"] == n


def test_a_reader_too_slow_to_keep_up_is_disconnected_and_others_carry_on(make_server):
    server = make_server(max_outbox=1024 * 1024, rate_limit=0)  # rate_limit=0: as above
    stuck = sluggish_client(server.port)
    sender = login(server.port)
    stream(sender, 30_000)  # about 8 MB for a reader whose outbox may hold 1 MB beyond the kernel's
    wait_until(lambda: server.state.load() == 1, message="the stuck reader to be dropped")
    activity(sender, {"after": True})
    assert sender.expect("ACTIVITY_BROADCAST")["activity"]["after"] is True
    received = []
    while True:  # what the stuck reader got before the cut is a prefix, then the server closed
        message = stuck.recv()
        if message is None:
            break
        received.append(message["activity"]["n"])
    assert received == list(range(len(received))) and len(received) < 30_000


class CountingConnection(connection.Connection):
    """A Connection that records each step that puts bytes on its outbox."""

    __slots__ = ("steps",)

    def queue(self, chunks, close_reason=None):
        self.steps.append((list(chunks), close_reason))
        super().queue(chunks, close_reason)


def read_to_eof(sock):
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_sends_under_the_state_lock_are_queued_once_per_connection_when_it_is_released():
    """What a thread sends while it holds the state lock (a batch of lines: ``State.batch()``,
    verbs nested in it) reaches the outbox in one step when the outermost hold ends, in the
    order sent. A last message (``send_last``) takes what was gathered before it along, with
    the close, so nothing gathered is lost behind a close."""
    state = State("127.0.0.1", 1)
    poller = connection.Poller()
    ours, theirs = socket.socketpair()
    conn = CountingConnection(connection.PlainTransport(ours), poller, state.outgoing, 1024, 1 << 20)
    conn.steps = []
    try:
        with state.batch():
            for n in range(3):
                conn.send(b"%d\n" % n)
            with state.batch():  # a verb inside the batch: the same hold
                conn.send(b"3\n")
            assert conn.steps == [] and conn.queued_bytes() == 0
        assert conn.steps == [([b"0\n", b"1\n", b"2\n", b"3\n"], None)]
        with state.batch():
            conn.send(b"4\n")
            conn.send_last(b"bye\n", "done")
            assert conn.steps[1:] == [([b"4\n", b"bye\n"], "done")]
        assert read_to_eof(theirs) == b"0\n1\n2\n3\n4\nbye\n"
        assert conn.closed and conn.close_reason == "done"
    finally:
        conn.close()
        theirs.close()
        poller.close()
