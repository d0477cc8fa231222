"""Networks of servers behave as one (PROTOCOL.md sections 1 and 3).

Servers started one after another, each joining an earlier one with -rh/-rp, form a tree. Over any
tree: an activity sent anywhere reaches every logged-in client once, a sender's activities arrive
in the order sent, a user registered anywhere can log in anywhere (also on a server that joined
later), and REDIRECT spreads clients using each server's neighbours' announced loads.
"""

import pytest

from harness import LineClient, activity, login, register, wait_links, wait_until


def chain(make_server, length):
    """s0 <- s1 <- ... : each server joins the one before it."""
    servers = [make_server()]
    for _ in range(length - 1):
        servers.append(make_server(remote=servers[-1]))
    wait_links(*[(s, 1 if i in (0, length - 1) else 2) for i, s in enumerate(servers)])
    return servers


def star(make_server, leaves):
    hub = make_server()
    spokes = [make_server(remote=hub) for _ in range(leaves)]
    wait_links((hub, leaves), *[(s, 1) for s in spokes])
    return hub, spokes


def neighbour_loads(server):
    return sorted((int(link["peer"].rsplit(":", 1)[1]) if link["peer"] else None, link["load"])
                  for link in server.links())


def test_five_server_chain_delivers_1000_activities_in_order_exactly_once(make_server):
    """Four hops: every activity once, in the order sent, at every client, sender included."""
    servers = chain(make_server, 5)
    register(servers[0].port, "sender", "pw").close()
    sender = login(servers[0].port, "sender", "pw")
    receiver = login(servers[-1].port)
    middle = login(servers[2].port)
    count = 1000
    sender.send_raw(b"".join(
        b'{"command":"ACTIVITY_MESSAGE","username":"sender","secret":"pw","activity":{"n":%d}}\n' % n
        for n in range(count)))
    got = [receiver.expect("ACTIVITY_BROADCAST") for _ in range(count)]
    assert [m["activity"] for m in got] == [{"n": n, "authenticated_user": "sender"} for n in range(count)]
    assert len({m["id"] for m in got}) == count
    own = [sender.expect("ACTIVITY_BROADCAST") for _ in range(count)]
    assert [m["id"] for m in own] == [m["id"] for m in got], "the sender gets all its own back"
    assert [middle.expect("ACTIVITY_BROADCAST")["id"] for _ in range(count)] == [m["id"] for m in got]
    # exactly once: the next thing anyone sees is a fresh marker
    activity(sender, {"n": "end"}, "sender", "pw")
    for client in (receiver, sender, middle):
        assert client.expect("ACTIVITY_BROADCAST")["activity"]["n"] == "end"
    for server in servers:
        assert server.snapshot()["history"]["entries"] == count + 1


def test_activities_flow_both_ways_along_a_chain(make_server):
    """Two senders at opposite ends: each sender's order holds at both ends."""
    servers = chain(make_server, 3)
    left, right = login(servers[0].port), login(servers[2].port)
    for n in range(50):
        activity(left, {"side": "left", "n": n})
        activity(right, {"side": "right", "n": n})
    for client in (left, right):
        got = [client.expect("ACTIVITY_BROADCAST")["activity"] for _ in range(100)]
        for side in ("left", "right"):
            assert [a["n"] for a in got if a["side"] == side] == list(range(50)), "per-sender order"


def test_star_delivers_from_every_leaf_to_every_client_once(make_server):
    """A hub and four leaves: an activity from any leaf reaches every client once."""
    hub, leaves = star(make_server, 4)
    # one client per server, so that no login is redirected (the senders receive everything too)
    senders = [login(leaf.port) for leaf in leaves]
    watchers = [login(hub.port)]
    for k, sender in enumerate(senders):
        for n in range(3):
            activity(sender, {"from": k, "n": n})
        activity(sender, {"from": k, "end": True})
    for client in senders + watchers:
        seen = {k: [] for k in range(len(senders))}
        ends = set()
        while len(ends) < len(senders):
            got = client.expect("ACTIVITY_BROADCAST")["activity"]
            if got.get("end"):
                assert got["from"] not in ends, "an end marker arrived twice"
                ends.add(got["from"])
            else:
                assert got["from"] not in ends, "an activity overtook its sender's end marker"
                seen[got["from"]].append(got["n"])
        assert seen == {k: [0, 1, 2] for k in range(len(senders))}, "each once, in the order sent"


def test_a_user_registered_anywhere_logs_in_anywhere(make_server):
    """NEW_USER spreads a registration: log in anywhere, and the name is taken everywhere."""
    hub, leaves = star(make_server, 3)
    register(leaves[0].port, "roamer", "pw").close()
    everywhere = [hub, *leaves]
    wait_until(lambda: all(s.users().get("roamer") == "pw" for s in everywhere),
               message="roamer to reach every server")
    for server in everywhere:
        login(server.port, "roamer", "pw").close()
        refused = LineClient(server.port)
        refused.send({"command": "LOGIN", "username": "roamer", "secret": "wrong"})
        refused.expect("LOGIN_FAILED")
        refused.expect_closed()
    taken = LineClient(leaves[2].port)
    taken.send({"command": "REGISTER", "username": "roamer", "secret": "other"})
    taken.expect("REGISTER_FAILED", info="roamer is already registered with the system")
    taken.expect_closed()


def test_a_server_joining_later_learns_every_user(make_server):
    """Section 1: a server joining after registrations learns every user (SYNC_USER)."""
    first = make_server()
    for n in range(5):
        register(first.port, f"early{n}", f"pw{n}").close()
    late = make_server(remote=make_server(remote=first))
    wait_until(lambda: all(late.users().get(f"early{n}") == f"pw{n}" for n in range(5)),
               message="the late server to learn the users")
    client = login(late.port, "early3", "pw3")
    activity(client, {"hi": "from the late server"}, "early3", "pw3")
    client.expect("ACTIVITY_BROADCAST")


# --- redirects --------------------------------------------------------------------------------

def test_redirect_to_the_least_loaded_neighbour(make_server):
    """REDIRECT right after LOGIN_SUCCESS when a neighbour's load is at least 2 below ours,
    counting the new client; the least loaded wins; the redirected client is closed and does
    not count."""
    a = make_server()
    a_clients = [login(a.port) for _ in range(3)]  # alone: nowhere to redirect to
    b, c = make_server(remote=a), make_server(remote=a)
    wait_links((a, 2), (b, 1), (c, 1))
    b_client = login(b.port)  # b's only neighbour, a, has 3: no redirect
    wait_until(lambda: neighbour_loads(a) == sorted([(b.port, 1), (c.port, 0)]),
               message="a to hear b's and c's loads")
    newcomer = LineClient(a.port)
    newcomer.send({"command": "LOGIN", "username": "anonymous"})
    newcomer.expect("LOGIN_SUCCESS")
    newcomer.expect("REDIRECT", hostname="127.0.0.1", port=c.port)
    newcomer.expect_closed()
    assert a.state.load() == 3, "the redirected client does not count"
    # following the redirect: c has 0, its neighbour a has 3, so the client stays there
    moved = LineClient(c.port)
    moved.send({"command": "LOGIN", "username": "anonymous"})
    moved.expect("LOGIN_SUCCESS")
    activity(moved, {"moved": True})
    assert moved.expect("ACTIVITY_BROADCAST")["activity"]["moved"] is True
    for client in a_clients + [b_client]:
        assert client.expect("ACTIVITY_BROADCAST")["activity"]["moved"] is True


def test_no_redirect_when_the_difference_is_one(make_server):
    """The boundary of the rule: a difference of 1 stays, a difference of 2 moves."""
    a = make_server()
    first = login(a.port)
    b = make_server(remote=a)
    wait_links((a, 1), (b, 1))
    on_b = login(b.port)
    wait_until(lambda: neighbour_loads(a) == [(b.port, 1)], message="a to hear b's load")
    second = login(a.port)  # a would have 2, b has 1: a difference of 1, stay
    wait_until(lambda: a.state.load() == 2, message="the second client counted")
    third = LineClient(a.port)  # a would have 3, b has 1: a difference of 2, go
    third.send({"command": "LOGIN", "username": "anonymous"})
    third.expect("LOGIN_SUCCESS")
    third.expect("REDIRECT", hostname="127.0.0.1", port=b.port)
    third.expect_closed()
    assert a.state.load() == 2
    for client in (first, second, on_b):
        activity(client, {"still": "here"})
        client.expect("ACTIVITY_BROADCAST")


def test_registered_users_are_redirected_too(make_server):
    """The redirect rule applies to every login, not only anonymous ones."""
    a = make_server()
    register(a.port, "uma", "pw").close()
    keep = [login(a.port) for _ in range(2)]
    b = make_server(remote=a)
    wait_until(lambda: neighbour_loads(a) == [(b.port, 0)], message="a to hear b's load")
    wait_until(lambda: b.users().get("uma") == "pw", message="b to learn uma")
    client = LineClient(a.port)
    client.send({"command": "LOGIN", "username": "uma", "secret": "pw"})
    client.expect("LOGIN_SUCCESS", info="logged in as user uma")
    client.expect("REDIRECT", port=b.port)
    client.expect_closed()
    login(b.port, "uma", "pw")  # and uma can log in where it was sent
    assert len(keep) == a.state.load()


@pytest.mark.parametrize("loads, expected", [
    ((5, []), None),
    ((1, [(0, "b", 1)]), None),
    ((2, [(0, "b", 1)]), ("b", 1)),
    ((2, [(1, "b", 1)]), None),
    ((3, [(1, "b", 1)]), ("b", 1)),
    ((6, [(3, "b", 1), (2, "c", 2), (4, "d", 3)]), ("c", 2)),
    ((6, [(5, "b", 1), (6, "c", 2)]), None),
])
def test_redirect_rule(loads, expected):
    """The rule on its own: (our load counting the new client, [(load, host, port)]) -> target."""
    from activitynet.state import redirect_target
    assert redirect_target(*loads) == expected
