"""The shortest path through the protocol: two servers, one activity."""

from harness import activity, login, register, wait_links


def test_activity_crosses_two_servers(make_server):
    a = make_server()
    b = make_server(remote=a)
    wait_links((a, 1), (b, 1))
    register(a.port, "alice", "pw").close()
    sender = login(a.port, "alice", "pw")
    receiver = login(b.port)
    activity(sender, {"text": "hello"}, "alice", "pw")
    got = receiver.expect("ACTIVITY_BROADCAST")
    assert got["activity"] == {"text": "hello", "authenticated_user": "alice"}
    assert sender.expect("ACTIVITY_BROADCAST")["id"] == got["id"]


def test_server_process_runs_with_project1_flags(make_process):
    """-rh/-rp join the second server to the first: an activity sent on the second reaches a
    client of the first (it would not if the flags were ignored)."""
    first = make_process()
    second = make_process(remote_port=first.port)
    receiver = login(first.port)
    client = login(second.port)
    activity(client, {"n": 1})
    assert client.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 1
    assert receiver.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 1
