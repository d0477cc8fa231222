"""Self-healing with real processes on 127.0.0.1 (issue 9): servers die for good, links are cut,
and the survivors become one network again within seconds, losing and doubling nothing.

What a server knows about its network is read from the servers themselves (``netprobe``): a
network of n servers has settled when every survivor's map holds exactly the survivors, joined by
n - 1 links both ends confirm: one tree.
The rule itself is tested on plain data in test_netmap.py, de-duplication in test_dedup.py.
"""

import socket
import time

import pytest

from activitynet.testing.netcut import Relay
from netprobe import probes, wait_one_network  # noqa: F401 (a fixture)
from test_recovery import assert_exactly, has_all, join, send_numbered

LONG = 60.0  # generous: a slow, busy 2-core machine


def exchange(recorders, clients, tag, expected):
    """Every client sends activity ``tag``; each receives all of them; returns ``expected``
    updated with what each client should now hold."""
    send_numbered_all = {c.name: tag for c in clients}
    for client in clients:
        send_numbered(client, [tag])
    for client in clients:
        expected.setdefault(client.name, []).append(tag)
    for client in clients:
        client.wait(has_all({name: [seq] for name, seq in send_numbered_all.items()}), LONG,
                    f"activities {tag} from every client")
    return expected


def dead_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chain_middle_dies_for_good(make_process, probes, recorders):
    """A <- B <- C, B killed for good: C attaches to its grandparent A and stops redialling B;
    A's and C's clients exchange activities again, every one exactly once and in order."""
    a = make_process()
    b = make_process(remote_port=a.port)
    c = make_process(remote_port=b.port, extra=["--log-level", "debug"])  # logs every dial
    wait_one_network(probes, [a, b, c])
    ca, cc = join(recorders, a.port, "ca"), join(recorders, c.port, "cc")
    expected = exchange(recorders, [ca, cc], 1, {})
    b.kill()
    for seq in range(2, 12):  # sent while the network re-forms: held, recovered, never lost
        send_numbered(ca, [seq])
        send_numbered(cc, [seq])
    expected = {"ca": list(range(1, 12)), "cc": list(range(1, 12))}
    for client in (ca, cc):
        client.wait(has_all(expected), LONG, "the other side's activities after B died")
    wait_one_network(probes, [a, c])
    dials_of_b = rf"(cannot reach|connected to) server 127\.0\.0\.1:{b.port}"
    mark = c.count_log(dials_of_b)
    expected = exchange(recorders, [ca, cc], 12, expected)
    time.sleep(2.0)  # a negative check: the redial schedule would have dialled B by now
    assert c.count_log(dials_of_b) == mark, \
        "C still redials B although it is attached to A"
    for client in (ca, cc):
        assert_exactly(client, expected)


def test_star_hub_dies(make_process, probes, recorders):
    """A hub with three leaves dies: the leaves form one network again (the most senior
    orphan is root, the others attach to it) and their clients hear each other."""
    hub = make_process()
    leaves = [make_process(remote_port=hub.port) for _ in range(3)]
    wait_one_network(probes, [hub, *leaves])
    clients = [join(recorders, leaf.port, f"l{i}") for i, leaf in enumerate(leaves)]
    expected = exchange(recorders, clients, 1, {})
    hub.kill()
    wait_one_network(probes, leaves)
    expected = exchange(recorders, clients, 2, expected)
    for client in clients:
        assert_exactly(client, expected)


def test_root_dies_in_a_depth_3_tree(make_process, probes, recorders):
    """R <- (M1 <- L1), (M2 <- L2): the root dies; M1 and M2 are orphans of equal path length,
    the one with the smaller address leads; everyone is one network again."""
    r = make_process()
    m1, m2 = make_process(remote_port=r.port), make_process(remote_port=r.port)
    l1, l2 = make_process(remote_port=m1.port), make_process(remote_port=m2.port)
    survivors = [m1, m2, l1, l2]
    wait_one_network(probes, [r, *survivors])
    clients = [join(recorders, s.port, f"c{i}") for i, s in enumerate(survivors)]
    expected = exchange(recorders, clients, 1, {})
    r.kill()
    for client in clients:  # sent while re-forming
        send_numbered(client, [2, 3])
        expected[client.name] += [2, 3]
    wait_one_network(probes, survivors)
    for client in clients:
        client.wait(has_all(expected), LONG, "activities sent while the network re-formed")
    expected = exchange(recorders, clients, 4, expected)
    for client in clients:
        assert_exactly(client, expected)


def test_two_die_at_once(make_process, probes, recorders):
    """R <- (M1 <- L1), (M2 <- L2): both middles die together; each leaf walks up to R."""
    r = make_process()
    m1, m2 = make_process(remote_port=r.port), make_process(remote_port=r.port)
    l1, l2 = make_process(remote_port=m1.port), make_process(remote_port=m2.port)
    wait_one_network(probes, [r, m1, m2, l1, l2])
    clients = [join(recorders, s.port, f"c{i}") for i, s in enumerate((r, l1, l2))]
    expected = exchange(recorders, clients, 1, {})
    m1.proc.kill()
    m2.proc.kill()
    m1.proc.wait(), m2.proc.wait()
    wait_one_network(probes, [r, l1, l2])
    expected = exchange(recorders, clients, 2, expected)
    for client in clients:
        assert_exactly(client, expected)


def test_cut_link_between_live_servers_heals_through_another_path(make_process, probes, recorders):
    """A <- B <-relay- C: the relay (C's only way to B so far) is cut and stays cut. C redials
    it for the grace period, then attaches by another path (B at the address it announced);
    nothing is lost or doubled, and the network is one tree again."""
    a = make_process()
    b = make_process(remote_port=a.port)
    with Relay(b.port) as relay:
        c = make_process(remote_port=relay.port)
        wait_one_network(probes, [a, b, c])
        ca, cc = join(recorders, a.port, "ca"), join(recorders, c.port, "cc")
        expected = exchange(recorders, [ca, cc], 1, {})
        relay.cut()
        for client in (ca, cc):
            send_numbered(client, [2, 3])
            expected[client.name] += [2, 3]
        wait_one_network(probes, [a, b, c])
        assert relay.mode == "cut" and relay.connections() == 0
        for client in (ca, cc):
            client.wait(has_all(expected), LONG, "activities sent during the cut")
        expected = exchange(recorders, [ca, cc], 4, expected)
    for client in (ca, cc):
        assert_exactly(client, expected)


def test_restarted_server_joins_as_a_new_leaf(make_process, probes, recorders):
    """A <- B <- C, B killed; once A and C are one network, B restarts on its old address and
    joins as a new leaf: three servers, two links."""
    a = make_process()
    b = make_process(remote_port=a.port)
    c = make_process(remote_port=b.port)
    wait_one_network(probes, [a, b, c])
    b.kill()
    wait_one_network(probes, [a, c])
    b.start()
    wait_one_network(probes, [a, b, c])
    clients = [join(recorders, s.port, n) for n, s in (("ca", a), ("cb", b), ("cc", c))]
    expected = exchange(recorders, clients, 1, {})
    for client in clients:
        assert_exactly(client, expected)


def test_join_tries_seeds_in_order(make_process, probes, recorders):
    """--join with a dead seed first: the next one is tried, and the server joins."""
    a = make_process()
    b = make_process(extra=["--join", f"127.0.0.1:{dead_port()},127.0.0.1:{a.port}"])
    wait_one_network(probes, [a, b])
    c = make_process(remote_port=dead_port(), extra=["--join", f"127.0.0.1:{b.port}"])  # -rh first
    wait_one_network(probes, [a, b, c])
    clients = [join(recorders, s.port, n) for n, s in (("ca", a), ("cc", c))]
    expected = exchange(recorders, clients, 1, {})
    for client in clients:
        assert_exactly(client, expected)


# --- the wiring in State, on plain data (no sockets) ---------------------------------------------

from activitynet import protocol  # noqa: E402
from activitynet.netmap import Lineage  # noqa: E402
from activitynet.state import State  # noqa: E402
from test_recovery import ORIGIN_B, accept_peer, logged_in_client, new_session, own, take  # noqa: E402


def dialled_by(state, lineage, alone=False):
    """A server dialled ``state`` and asks for history with its ``lineage`` (our extension)."""
    session = new_session(state, lineage.address())
    state.accept_link(session)
    state.peer_asked(session, "", {}, None, lineage, alone)
    return session


def test_acceptor_refuses_a_cycle_and_a_senior_fragment_with_a_machine_field():
    me = State("127.0.0.1", 4000, joins=["127.0.0.1:3999"])
    parent = new_session(me, "parent")
    me.dial_link(parent, "127.0.0.1:3999", "secret")
    me.peer_announced(parent, 0, "127.0.0.1", 3999, Lineage.settled("127.0.0.1:3999"))
    assert me.lineage.chain() == ("127.0.0.1:3999", "127.0.0.1:4000")
    with pytest.raises(protocol.Refused) as refused:  # our own parent dialling us: a cycle
        dialled_by(me, Lineage.settled("127.0.0.1:3999"))
    assert refused.value.reply()["refused"] == "cycle"
    with pytest.raises(protocol.Refused) as refused:  # a settled root senior to ours (by address)
        dialled_by(me, Lineage.settled("127.0.0.1:1000"))
    assert refused.value.reply()["refused"] == "rank"
    child = dialled_by(me, Lineage.joining("127.0.0.1:5001", 1))  # a joiner hangs below us
    assert "127.0.0.1:5001" in me.network()["servers"][[s["address"] for s in me.network()["servers"]]
                                                       .index("127.0.0.1:4000")]["children"]
    assert take(child, "ACTIVITY_BROADCAST") == []  # answered: nothing to send yet


def test_losing_the_parent_makes_an_orphan_root_and_tells_the_subtree():
    me = State("127.0.0.1", 4000, joins=["127.0.0.1:3999"])
    parent = new_session(me, "parent")
    me.dial_link(parent, "127.0.0.1:3999", "secret")
    me.peer_announced(parent, 0, "127.0.0.1", 3999, Lineage.settled("127.0.0.1:3999"))
    child = dialled_by(me, Lineage.joining("127.0.0.1:5001", 1))
    me.peer_announced(child, 0, "127.0.0.1", 5001)
    take(child)
    me.close_session(parent)
    assert me.lineage.is_root() and me.lineage.kind == 1  # an orphan, ranked by its old path
    announces = take(child, "SERVER_ANNOUNCE")
    assert announces and announces[-1]["lineage"] == [1, 0, ["127.0.0.1:3999", "127.0.0.1:4000"], []]
    assert me.next_dial(0.0) is None or me.next_dial(0.0)[0] == "127.0.0.1:3999"  # the grace redial


def test_101_after_102_is_delivered_and_in_order():
    """The issue's example: a second path delivers 102 before 101. Both reach the client, in order."""
    state = new_state_b()
    left, right = accept_peer(state, "left", 5000), accept_peer(state, "right", 5001)
    client = logged_in_client(state, "anonymous", None)
    for seq in (1, 2, 3):
        state.server_activity(left, {"n": seq}, own(ORIGIN_B, seq))
    state.server_activity(right, {"n": 5}, own(ORIGIN_B, 5))  # ahead of a gap: held
    assert [m["activity"]["n"] for m in take(client, "ACTIVITY_BROADCAST")] == [1, 2, 3]
    state.server_activity(left, {"n": 4}, own(ORIGIN_B, 4))
    state.server_activity(left, {"n": 5}, own(ORIGIN_B, 5))  # the copy from the other path
    assert [m["activity"]["n"] for m in take(client, "ACTIVITY_BROADCAST")] == [4, 5]
    assert state.counters.activities_deduplicated == 1


def new_state_b():
    return State("127.0.0.1", 4000, history_size=100, origin="c" * 16)


def test_answer_skips_what_the_asker_holds_above_its_mark():
    from activitynet.recovery import missing_entries
    from test_recovery import history_of
    history = history_of([own(ORIGIN_B, n) for n in range(1, 8)])
    got = missing_entries(history, "", {ORIGIN_B: 2}, {ORIGIN_B: [[5, 6]]})
    assert [entry[1] for entry in got] == [own(ORIGIN_B, n) for n in (3, 4, 7)]
