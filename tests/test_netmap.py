"""The network map and the re-attachment rule (issue 9 items 1-3), on plain data.

``Sim`` plays the rule on a tree with no sockets: servers die or lose a link, orphans become
roots and tell their subtrees (the ``GRACE`` period), then dials, lineage updates and map gossip
happen in any order a seeded random generator picks. At every step the links must form no
cycle; once things settle, the survivors must be one tree (links = servers - 1).
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activitynet.netmap import (GRACE, JOINING, ORPHAN, SETTLED, Entry, Lineage, NetMap, Seeker,
                                accepts, candidates, dials_alone, loops, seeks)
from activitynet.protocol import InvalidMessage


def name(i):
    return f"s{i:02d}:3780"


class Sim:
    """Servers on plain data, linked by ``parent``; see the module docstring."""

    def __init__(self, parents, root, seed=0, prompt=True):
        self.rng = random.Random(seed)
        self.prompt = prompt  # orphans tell their subtrees before anyone dials (the GRACE period)
        self.cycles_seen = 0
        self.parent = dict(parents)  # child -> parent, for live links
        self.alive = {root} | set(parents)
        self.cut = set()  # frozenset({a, b}): these two cannot reach each other
        self.lineage = {root: Lineage.settled(root)}
        self.lost = {}  # orphan root -> the lineage it had when it lost its parent
        self.seekers = {s: Seeker() for s in self.alive}
        self.now = 0.0  # each dial is 10 s after the last: waits never hold the simulation up
        for server in self._top_down(root):
            if server != root:
                self.lineage[server] = self.lineage[self.parent[server]].child(server)
        self.maps = {s: NetMap(s, 1, self.lineage[s]) for s in self.alive}
        self._update_entries()
        for _ in range(len(self.alive)):  # the settled network's maps are complete
            for a, b in list(self.parent.items()):
                self.gossip(a, b)
                self.gossip(b, a)

    def _top_down(self, root):
        order, todo = [], [root]
        while todo:
            server = todo.pop(0)
            order.append(server)
            todo += sorted(c for c, p in self.parent.items() if p == server)
        return order

    def children(self, server):
        return sorted(c for c, p in self.parent.items() if p == server)

    def _update_entries(self):
        for server in self.alive:
            self.maps[server].set_own(self.parent.get(server), self.children(server), self.lineage[server])

    # --- faults (each ends with the grace period: orphans are roots and their subtrees know) ---

    def kill(self, *servers):
        for server in servers:
            self.alive.discard(server)
            self.parent.pop(server, None)
        for child, parent in list(self.parent.items()):
            if parent in servers:
                self._orphan(child)
        self._update_entries()

    def cut_link(self, child):
        self.cut.add(frozenset((child, self.parent[child])))
        self._orphan(child)
        self._update_entries()

    def restart(self, server, joins, started_ms=2):
        """``server`` comes back as a new process (new incarnation) that joins ``joins`` (none:
        it starts as a settled root, as a restarted root does)."""
        self.alive.add(server)
        self.lineage[server] = (Lineage.joining(server, started_ms) if joins
                                else Lineage.settled(server))
        self.lost[server] = self.lineage[server]
        self.seekers[server] = Seeker(joins)
        self.maps[server] = NetMap(server, started_ms, self.lineage[server])

    def _orphan(self, server):
        self.lost[server] = self.lineage[server]
        self.seekers[server].parent_lost(self.lineage[server], self.now)
        del self.parent[server]
        self.lineage[server] = self.lineage[server].orphaned()
        if self.prompt:
            self.push_all(server)

    # --- what happens afterwards, one step at a time -------------------------------------

    def push(self, server):
        """``server`` tells its children its lineage (one hop of SERVER_ANNOUNCE)."""
        for child in self.children(server):
            if loops(child, self.lineage[server]):  # the backstop: drop the link, seek again
                self._orphan(child)
            else:
                self.lineage[child] = self.lineage[server].child(child)
        self._update_entries()

    def push_all(self, server):
        for s in self._top_down(server):
            self.push(s)

    def gossip(self, a, b):
        """``a`` sends its map to its neighbour ``b``."""
        self.maps[b].merge(self.maps[a].to_wire())

    def seeking(self):
        """Roots that dial (time is not modelled: a settled root alone seeks at once)."""
        return sorted(s for s in self.alive
                      if seeks(self.lineage[s], bool(self.children(s)), alone_for=float("inf")))

    def dial(self, server):
        """One try of a root, as its ``Seeker`` decides; returns the server it attached to."""
        self.now += 10.0
        seeker = self.seekers[server]
        choice = seeker.next_dial(self.now, self.maps[server], self.lineage[server],
                                  bool(self.children(server)))
        if choice is None:
            return None
        target, alone = choice
        reachable = target in self.alive and frozenset((server, target)) not in self.cut
        accepted = reachable and accepts(self.lineage[target], self.lineage[server], alone) is None
        seeker.outcome(self.now, accepted)
        if not accepted:
            return None
        self.parent[server] = target
        self.lineage[server] = self.lineage[target].child(server)
        self._update_entries()
        return target

    def step(self):
        kind = self.rng.choice(["push", "gossip", "dial", "dial"])
        if kind == "push":
            self.push(self.rng.choice(sorted(self.alive)))
        elif kind == "gossip" and self.parent:
            a, b = self.rng.choice(sorted(self.parent.items()))
            self.gossip(*self.rng.sample([a, b], 2))
        elif self.seeking():
            self.dial(self.rng.choice(self.seeking()))

    def settle(self, random_steps=150):
        """Random steps, each checked for cycles; then everything delivered until nothing
        changes in a pass where every root tried two whole rounds."""
        for _ in range(random_steps):
            self.step()
            self._check_cycle()
        for _ in range(10 * len(self.alive)):
            before = (dict(self.parent), dict(self.lineage))
            for server in sorted(self.alive):
                self.push(server)
            for a, b in sorted(self.parent.items()):
                self.gossip(a, b)
                self.gossip(b, a)
            for server in self.seeking():
                for _ in range(2 * len(self.maps[server].entries) + 2):
                    if self.dial(server) is not None:
                        break
                    self._check_cycle()
            self._check_cycle()
            if (self.parent, self.lineage) == before:
                return self
        raise AssertionError("the network never settled")

    def _check_cycle(self):
        """With prompt orphans a cycle never forms; without, ``loops`` must break each one."""
        if self.cycle() is not None:
            assert not self.prompt, f"cycle through {self.cycle()}"
            self.cycles_seen += 1

    def cycle(self):
        for start in self.parent:
            seen, server = set(), start
            while server in self.parent:
                if server in seen:
                    return server
                seen.add(server)
                server = self.parent[server]
        return None

    def roots(self):
        return sorted(s for s in self.alive if s not in self.parent)

    def assert_one_tree(self):
        assert self.cycle() is None
        assert len(self.roots()) == 1, f"fragments rooted at {self.roots()}"
        assert len(self.parent) == len(self.alive) - 1
        for server in self.alive:  # each knows where it hangs
            chain, up = [server], server
            while up in self.parent:
                up = self.parent[up]
                chain.insert(0, up)
            assert self.lineage[server].chain() == tuple(chain)


def chain(n):
    return {name(i): name(i - 1) for i in range(1, n)}


def star(leaves):
    return {name(i): name(0) for i in range(1, leaves + 1)}


def depth3():
    """7 servers, depth 3: s00 > (s01 > (s03, s04), s02 > (s05, s06))."""
    return {name(1): name(0), name(2): name(0), name(3): name(1), name(4): name(1),
            name(5): name(2), name(6): name(2)}


# --- the rule, case by case ---------------------------------------------------------------------

def test_chain_middle_dies_the_orphan_attaches_to_its_grandparent():
    sim = Sim(chain(3), name(0))
    sim.kill(name(1))
    assert candidates(sim.maps[name(2)], sim.lost[name(2)], dead={name(1)})[0] == name(0)
    sim.settle().assert_one_tree()
    assert sim.parent == {name(2): name(0)}


def test_star_hub_dies_the_smallest_leaf_becomes_root_and_the_others_attach_to_it():
    sim = Sim(star(4), name(0))
    sim.kill(name(0))
    sim.settle().assert_one_tree()
    assert sim.roots() == [name(1)]
    assert sim.parent == {name(2): name(1), name(3): name(1), name(4): name(1)}


def test_the_root_dies_in_a_depth_3_tree_only_its_children_move():
    sim = Sim(depth3(), name(0))
    sim.kill(name(0))
    sim.settle().assert_one_tree()
    assert sim.roots() == [name(1)]
    assert sim.parent[name(2)] == name(1)
    assert sim.parent[name(5)] == name(2) and sim.parent[name(3)] == name(1)


def test_two_deaths_at_once_the_root_and_a_child():
    sim = Sim(depth3(), name(0))
    sim.kill(name(0), name(1))
    sim.settle().assert_one_tree()
    assert sim.roots() == [name(2)]  # the only living former child of the root


def test_two_middle_servers_die_at_once_in_a_chain():
    sim = Sim(chain(6), name(0))
    sim.kill(name(2), name(3))
    sim.settle().assert_one_tree()
    assert sim.parent[name(4)] == name(1)  # nearest living ancestor
    assert sim.parent[name(5)] == name(4)


def test_two_orphans_never_pick_each_other():
    """Siblings orphaned by the same death, each dialling the other at the same moment:
    exactly one of the two links is accepted."""
    sim = Sim(star(2), name(0))
    sim.kill(name(0))
    one, two = sim.lineage[name(1)], sim.lineage[name(2)]
    assert one.kind == two.kind == ORPHAN
    assert accepts(one, two) is None  # s02 may attach below s01
    assert "outranks" in accepts(two, one)  # but not s01 below s02


def test_a_cut_link_between_live_servers_heals_through_the_grandparent():
    sim = Sim(chain(3), name(0))
    sim.cut_link(name(2))  # s02 and s01 both live but cannot reach each other
    sim.settle().assert_one_tree()
    assert sim.parent == {name(1): name(0), name(2): name(0)}


def test_a_cut_link_below_the_root_heals_through_a_sibling():
    sim = Sim(depth3(), name(0))
    sim.cut_link(name(1))  # s01 cannot reach the root, which is alive with s02 below it
    sim.settle().assert_one_tree()
    assert sim.roots() == [name(0)]
    assert sim.parent[name(1)] in {name(2), name(5), name(6)}


def test_a_restarted_server_rejoins_as_a_new_leaf():
    sim = Sim(chain(3), name(0))
    sim.kill(name(1))
    sim.settle()
    sim.restart(name(1), joins=[name(0)])
    assert sim.maps[name(0)].merge(sim.maps[name(1)].to_wire())  # the new incarnation wins
    assert sim.maps[name(0)].entries[name(1)].version == (2, 0)
    sim.settle().assert_one_tree()
    assert sim.parent == {name(2): name(0), name(1): name(0)}
    assert sim.children(name(1)) == []


def test_a_restarted_root_takes_its_network_back():
    """The new root (an orphan) keeps trying its former ancestors; the restarted root, settled
    and alone, is more senior and accepts it: one network again, rooted where it was."""
    sim = Sim(depth3(), name(0))
    sim.kill(name(0))
    sim.settle()
    assert sim.roots() == [name(1)]
    sim.restart(name(0), joins=[])
    sim.settle().assert_one_tree()
    assert sim.roots() == [name(0)]
    assert sim.parent[name(1)] == name(0)


def test_a_cycle_found_late_is_broken_by_the_server_that_sees_itself():
    """The backstop, for a lineage that did not arrive in time: s01 hangs below s03, which
    still believes it hangs below s01."""
    sim = Sim(chain(4), name(0))
    sim.parent[name(1)] = name(3)  # forced: what the rule itself never does
    sim.lineage[name(1)] = sim.lineage[name(3)].child(name(1))
    sim.push(name(1))
    assert name(2) not in sim.parent  # s02 saw itself in its parent's lineage and let go
    assert sim.lineage[name(2)].kind == ORPHAN


SHAPES = {"chain": lambda: chain(7), "star": lambda: star(6), "depth3": depth3}


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SHAPES)), st.lists(st.integers(min_value=0, max_value=6),
                                                   min_size=1, max_size=3, unique=True),
       st.lists(st.integers(min_value=1, max_value=6), max_size=1, unique=True),
       st.integers(min_value=0, max_value=2**32))
def test_any_deaths_and_cuts_in_any_order_end_as_one_tree_never_a_cycle(shape, deaths, cuts, seed):
    """Up to three servers die and a link is cut at the same moment; then orphans dial,
    lineages travel and maps are gossiped in a random order. (Two cuts on top of deaths can
    leave a fragment whose only way out starts below its root: the known gap, see netmap.)"""
    sim = Sim(SHAPES[shape](), name(0), seed=seed)
    deaths = [name(d) for d in deaths]
    if len(deaths) == len(sim.alive):
        deaths.pop()
    for child in (name(c) for c in cuts):
        if child in sim.parent and child not in deaths and sim.parent[child] not in deaths:
            sim.cut_link(child)
    sim.kill(*deaths)
    sim.settle().assert_one_tree()


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SHAPES)), st.lists(st.integers(min_value=0, max_value=6),
                                                   min_size=1, max_size=3, unique=True),
       st.integers(min_value=0, max_value=2**32))
def test_lineages_that_arrive_late_may_close_a_cycle_for_a_while_but_it_is_broken(shape, deaths, seed):
    """No GRACE: orphans dial before their subtrees heard they are orphans, so an acceptor may
    trust a dead root. The backstop (``loops``) must still end with one tree."""
    sim = Sim(SHAPES[shape](), name(0), seed=seed, prompt=False)
    deaths = [name(d) for d in deaths]
    if len(deaths) == len(sim.alive):
        deaths.pop()
    sim.kill(*deaths)
    sim.settle().assert_one_tree()


def test_why_orphans_tell_their_subtrees_before_anyone_dials():
    """The root dies. Without the GRACE period a server below an orphan may still believe in
    the dead root and accept a more senior orphan, whose fragment its own root then joins: a
    cycle, until ``loops`` breaks it. With it (the rule), the same seed never makes one."""
    stale = Sim(depth3(), name(0), seed=542730139, prompt=False)
    stale.kill(name(0))
    stale.settle().assert_one_tree()
    assert stale.cycles_seen > 0
    prompt = Sim(depth3(), name(0), seed=542730139)
    prompt.kill(name(0))
    prompt.settle().assert_one_tree()  # settle checks for a cycle after every step


# --- the schedule ---------------------------------------------------------------------------

def test_seeker_redials_the_parent_through_the_grace_period_then_walks_up():
    sim = Sim(chain(4), name(0))
    before = sim.lineage[name(3)]
    sim.kill(name(2))
    seeker, view, orphan = Seeker(), sim.maps[name(3)], sim.lineage[name(3)]
    seeker.parent_lost(before, now=100.0)
    assert seeker.next_dial(100.0, view, orphan, False) == (name(2), False)
    seeker.outcome(100.0, accepted=False)
    assert seeker.next_dial(100.05, view, orphan, False) is None  # waiting FIRST_WAIT
    assert seeker.next_dial(100.1, view, orphan, False) == (name(2), False)
    seeker.outcome(100.1, accepted=False)
    later = 100.0 + GRACE
    tries = []
    while (choice := seeker.next_dial(later, view, orphan, False)) is not None:
        tries.append(choice)
        seeker.outcome(later, accepted=False)
    assert [t[0] for t in tries] == [name(2), name(1), name(0)]  # former ancestors, nearest first
    assert not any(alone for _, alone in tries)  # an orphan starts by rank
    assert seeker.failed_rounds == 1 and seeker.wait_hint(later) > 0
    retry = later + seeker.wait_hint(later)
    assert seeker.next_dial(retry, view, orphan, False) == (name(2), True)  # round 2: alone
    seeker.outcome(retry, accepted=True)
    assert seeker.lost_lineage is None and seeker.failed_rounds == 0


def test_seeker_of_a_settled_root_waits_to_be_alone_and_a_joiner_tries_its_joins():
    sim = Sim(star(2), name(0))
    settled = Seeker()
    assert settled.next_dial(0.0, sim.maps[name(0)], sim.lineage[name(0)], True) is None
    sim.kill(name(1), name(2))
    assert settled.next_dial(1.0, sim.maps[name(0)], sim.lineage[name(0)], False) is None
    assert settled.next_dial(7.0, sim.maps[name(0)], sim.lineage[name(0)], False) == (name(1), True)
    joiner = Seeker(joins=[name(5), name(6)])
    me = NetMap(name(7), 1, Lineage.joining(name(7), 1))
    assert joiner.next_dial(0.0, me, me.own.lineage, False) == (name(5), True)
    joiner.outcome(0.0, accepted=False)
    assert joiner.next_dial(0.0, me, me.own.lineage, False) == (name(6), True)


# --- the acceptor's check ---------------------------------------------------------------------

def test_accepts_refuses_itself_non_roots_ancestors_and_senior_fragments():
    root = Lineage.settled(name(0))
    a = root.child(name(1))
    b = a.child(name(2))
    assert "is this server" in accepts(a, a)
    assert "only a fragment's root" in accepts(root, b)
    assert "make a cycle" in accepts(b, Lineage(ORPHAN, 0, (name(0), name(1))))
    assert accepts(b, Lineage.joining(name(9), 5)) is None  # a newcomer joins anywhere
    assert accepts(b, b.orphaned().child(name(7)).orphaned()) is None  # a deeper orphan


def test_joining_roots_join_older_ones_so_two_that_dial_each_other_make_one_link():
    older, younger = Lineage.joining(name(5), 100), Lineage.joining(name(4), 200)
    assert accepts(older, younger) is None
    assert accepts(younger, older) is not None
    assert accepts(Lineage.settled(name(8)), older) is None


def test_a_plain_join_is_accepted_whatever_order_servers_started_in():
    """Project 1: s02 -rh s01 started before s01 -rh s00. With nothing below it s02 dials alone,
    so s01, still a joining root itself, takes it although s02 is the older process."""
    s01, s02 = Lineage.joining(name(1), 200), Lineage.joining(name(2), 100)
    assert dials_alone(s02, has_children=False, failed_rounds=0)
    assert accepts(s01, s02, alone=True) is None
    assert accepts(s01, s02) is not None  # by rank alone it would wait for s01 to attach
    assert not dials_alone(s01, has_children=True, failed_rounds=0)
    assert not dials_alone(Lineage(ORPHAN, 0, (name(0), name(1))), has_children=False, failed_rounds=0)


def test_lineage_wire_round_trip_and_clear_errors():
    lineage = Lineage(ORPHAN, 0, (name(0), name(1)), (name(2),))
    assert Lineage.from_wire(lineage.to_wire()) == lineage
    with pytest.raises(InvalidMessage, match="kind"):
        Lineage.from_wire([7, 0, [name(0)], []])
    with pytest.raises(InvalidMessage, match=r"lineage\[2\]"):
        Lineage.from_wire([JOINING, 0, ["no port"], []])
    with pytest.raises(InvalidMessage, match="at least the root"):
        Lineage.from_wire([SETTLED, 0, [], []])


# --- the map -------------------------------------------------------------------------------------

def test_map_component_subtree_and_expiry():
    sim = Sim(depth3(), name(0))
    view = sim.maps[name(3)]
    assert view.component() == sim.alive
    assert view.subtree(name(1)) == {name(1), name(3), name(4)}
    sim.kill(name(1))
    view = sim.maps[name(0)]
    assert view.component() == {name(0), name(2), name(5), name(6)}
    assert view.expire(now=0.0) == []
    assert set(view.to_wire()) == view.component()  # only what is reachable is passed on
    assert sorted(view.expire(now=view.expire_after)) == [name(1), name(3), name(4)]


def test_map_merge_ignores_what_others_say_about_us_and_rejects_bad_input():
    view = NetMap(name(0), 1, Lineage.settled(name(0)))
    assert not view.merge({name(0): Entry(None, (name(9),), (99, 9)).to_wire()})
    assert view.own.down == ()
    with pytest.raises(InvalidMessage, match="host:port"):
        view.merge({"nowhere": {"up": None, "down": [], "v": [1, 1]}})
    with pytest.raises(InvalidMessage, match=r"\.v must be"):
        view.merge({name(1): {"up": None, "down": [], "v": [1]}})


@st.composite
def entry_updates(draw):
    """A stream of versioned entries for a few servers, as their authors would emit them."""
    updates = []
    for server in range(1, 4):
        for counter in range(draw(st.integers(min_value=1, max_value=4))):
            up = draw(st.sampled_from([None, name(0), name(server + 1)]))
            updates.append({name(server): {"up": up, "down": [], "v": [1, counter]}})
    return updates


@settings(deadline=None)
@given(entry_updates(), st.randoms(use_true_random=False))
def test_maps_that_hear_the_same_entries_in_any_order_agree(updates, rnd):
    one = NetMap(name(0), 1, Lineage.settled(name(0)))
    two = NetMap(name(9), 1, Lineage.settled(name(9)))
    for update in updates:
        one.merge(update)
    shuffled = updates[:]
    rnd.shuffle(shuffled)
    for update in shuffled + shuffled:  # twice: merging is idempotent
        two.merge(update)
    for server in (name(1), name(2), name(3)):
        assert one.entries[server] == two.entries[server]
