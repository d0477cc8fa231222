"""The lock rule (activitynet/state.py): no socket is written, shut down or closed while the state
lock is held. conftest.py checks it in every test (lockcheck.py); here the instrument is shown
to catch a violation, and the paths that used to break the rule are driven on purpose."""

import socket

from activitynet import connection
from activitynet.state import State
from harness import activity, login, register, wait_until
from test_outbox import sluggish_client, stream
from test_server_links import FakeServer


def test_the_instrument_catches_a_send_under_the_state_lock(lock_rule):
    state = State("127.0.0.1", 1)
    ours, theirs = socket.socketpair()
    transport = connection.PlainTransport(ours)
    try:
        with state._locked:  # what no code may do (every verb writes after this block)
            transport.send_some(memoryview(b"x"))
        transport.send_some(memoryview(b"y"))  # after release: fine
        assert len(lock_rule.violations) == 1 and "send_some" in lock_rule.violations[0]
        assert theirs.recv(2) == b"xy"
    finally:
        lock_rule.violations.clear()  # planted on purpose
        transport.close()
        theirs.close()


def test_paths_that_used_to_write_under_the_lock_now_write_after_it(make_server, lock_rule):
    """A vanishing client's load announce, a slow consumer's close, a deleted user's goodbye:
    each is decided under the lock and written, or closed, after it."""
    server = make_server(max_outbox=1024 * 1024, rate_limit=0)  # a fast stream: no flood control
    peer = FakeServer(server.port)
    peer.authenticate()
    peer.announce(load=100)  # busy: no redirects
    peer.until("SERVER_ANNOUNCE")  # the acceptor's turn: retrieve, announce

    client = login(server.port)  # a client vanishing without LOGOUT: its load change is announced
    peer.until("SERVER_ANNOUNCE", load=1)
    client.close()
    peer.until("SERVER_ANNOUNCE", load=0)

    stuck = sluggish_client(server.port)  # a slow consumer: closed at its flush
    sender = login(server.port)
    stream(sender, 30_000)
    wait_until(lambda: server.state.load() == 1, message="the slow consumer to be dropped")
    while stuck.recv_line() is not None:  # what it got, then the close
        pass

    register(server.port, "x", "mine").close()  # a conflicting user: goodbye, then close
    x = login(server.port, "x", "mine")
    peer.send({"command": "NEW_USER", "username": "x", "secret": "theirs"})
    assert x.expect("AUTHENTICATION_FAIL")
    x.expect_closed()
    activity(sender, {"still": "served"})
    sender.expect("ACTIVITY_BROADCAST")

    assert lock_rule.calls["send_some"] > 0 and lock_rule.calls["close"] > 0, \
        "the instrument saw no socket calls: it is not installed"
    assert not lock_rule.violations, lock_rule.violations[0]
    peer.close()
