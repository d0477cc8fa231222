"""The server's lifecycle verbs keep socketserver's promises, and ``State.snapshot()`` gives the
shape ARCH.md documents (the status endpoint and the tests read it)."""

import threading

from activitynet.server import Server, Settings
from harness import SECRET, activity, login, wait_links, wait_until


def test_shutdown_waits_for_serve_forever_and_server_close_joins_its_threads():
    server = Server(Settings(local_port=0, local_host="127.0.0.1", bind="127.0.0.1", secret=SECRET))
    returned = []
    original = server._accept_loop
    server._accept_loop = lambda: (original(), returned.append(True))  # serve_forever's loop
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    clients = [login(server.port) for _ in range(3)]
    wait_until(lambda: server.state.load() == 3, message="three clients")
    workers = [t for t in threading.enumerate() if t.name.startswith("conn-")]
    server.shutdown()
    assert returned, "shutdown returned before serve_forever's loop did"
    server.server_close()
    assert not [t for t in workers if t.is_alive()], "server_close left connection threads running"
    for client in clients:
        client.expect_closed()


def test_shutdown_before_serve_forever_does_not_hang():
    server = Server(Settings(local_port=0, local_host="127.0.0.1", bind="127.0.0.1", secret=SECRET))
    server.shutdown()
    server.server_close()


def test_snapshot_is_plain_data_of_the_documented_shape(make_server):
    a = make_server()
    b = make_server(remote=a)
    wait_links((a, 1), (b, 1))
    client = login(a.port)
    activity(client, {"n": 1})
    client.expect("ACTIVITY_BROADCAST")
    snap = a.snapshot()
    assert set(snap) == {"origin", "hostname", "port", "clients", "client_count", "client_bytes_queued",
                         "links", "users", "blocked", "logged_in_names", "history", "pending"}
    assert snap["client_count"] == 1
    without = a.server.state.snapshot(clients=False)  # what the monitor reads for all but /connz
    assert "clients" not in without and set(without) == set(snap) - {"clients"}
    assert (snap["hostname"], snap["port"], snap["users"], snap["blocked"]) == ("127.0.0.1", a.port, 0, 0)
    assert snap["logged_in_names"] == 1 and snap["pending"] == 0
    assert snap["history"]["entries"] == 1 and snap["history"]["bytes"] > 0
    (me,) = snap["clients"]
    assert set(me) == {"id", "address", "user", "since", "messages_in", "messages_out", "bytes_queued"}
    assert (me["user"], me["messages_in"], me["messages_out"]) == ("anonymous", 2, 2)
    assert snap["client_bytes_queued"] == me["bytes_queued"]
    (link,) = snap["links"]
    assert set(link) == {"id", "address", "peer", "initiator", "since", "phase", "live", "load",
                         "bytes_queued", "last_heard_s", "activities_sent", "activities_received"}
    assert (link["peer"], link["initiator"], link["phase"], link["live"]) == \
        (f"127.0.0.1:{b.port}", False, "live", True)
    assert link["activities_sent"] == 1 and link["activities_received"] == 0
    (other,) = b.links()
    assert other["initiator"] and other["peer"] == f"127.0.0.1:{a.port}"
