"""De-duplication and per-sender order on any path (issue 9 item 4), on plain data.

The property tests model what the network does to one server's intake: the activities of a
few origins reach it along two paths (an old parent and a new one, or two paths that briefly
coexist while the network re-forms). Each path may carry any part of them, twice, in any order;
between them they carry everything. Whatever the interleaving, every activity is published once,
and each origin's in sequence order.
"""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from activitynet import protocol
from activitynet.dedup import Intake, Reorder, SeenIds, SeqSet, peer_lacks

ORIGINS = ["a" * 16, "b" * 16, "c" * 16]
# no per-example deadline: the suite must pass on a slow, busy machine
PLAIN = settings(deadline=None)
MANY = settings(max_examples=300, deadline=None)


def own_id(origin, seq):
    return protocol.make_id(origin, seq, 1_700_000_000_000 + seq)


def feed(intake, arrivals, now=0.0):
    """Feed ``arrivals`` (activity ids) to ``intake``; the ids published, in publication order."""
    published = []
    for activity_id in arrivals:
        published += intake.receive(activity_id, protocol.parse_id(activity_id), activity_id, now)
    return published


def per_origin(published):
    seqs = {}
    for activity_id in published:
        parsed = protocol.parse_id(activity_id)
        if parsed is not None:
            seqs.setdefault(parsed[0], []).append(parsed[1])
    return seqs


# --- SeqSet --------------------------------------------------------------------------------------

def test_seq_set_takes_101_after_102():
    """The bug of issue 9: with a high-water mark, 101 after 102 was 'already seen'."""
    seen = SeqSet()
    assert all(seen.add(seq) for seq in range(1, 101))
    assert seen.add(102)
    assert seen.add(101)
    assert not seen.add(101) and not seen.add(102) and not seen.add(7)
    assert seen.runs() == [(1, 102)]
    assert seen.mark() == 102


def test_seq_set_mark_is_the_end_of_the_first_run():
    seen = SeqSet()
    for seq in [5, 6, 7, 9, 12, 13]:
        seen.add(seq)
    assert seen.mark() == 7
    assert seen.runs() == [(5, 7), (9, 9), (12, 13)]
    seen.add(8)
    assert seen.runs() == [(5, 9), (12, 13)]
    assert 3 not in seen and 10 not in seen and 13 in seen
    assert seen.add(3)  # below the first sighting: never seen, so new
    assert seen.mark() == 3


def test_seq_set_is_bounded_by_giving_up_the_narrowest_gap():
    seen = SeqSet(max_runs=3)
    for seq in [1, 10, 20]:
        seen.add(seq)
    seen.add(22)  # four runs: the narrowest gap (21) is given up
    assert seen.runs() == [(1, 1), (10, 10), (20, 22)]
    assert seen.forgotten == 1
    assert 21 in seen


@PLAIN
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=200))
def test_seq_set_agrees_with_a_plain_set(seqs):
    seen, model = SeqSet(), set()
    for seq in seqs:
        assert seen.add(seq) == (seq not in model)
        model.add(seq)
    for seq in range(0, 62):
        assert (seq in seen) == (seq in model)
    if model:
        first_gap = next(s for s in range(min(model), 62) if s not in model)
        assert seen.mark() == first_gap - 1
    runs = seen.runs()
    assert all(hi + 1 < next_lo for (_lo, hi), (next_lo, _hi) in zip(runs, runs[1:]))


# --- Reorder -------------------------------------------------------------------------------------

def test_reorder_holds_back_until_the_gap_fills():
    order = Reorder(hold_for=3.0)
    assert order.arrive("o", 1, "1", now=0) == ["1"]
    assert order.arrive("o", 3, "3", now=0) == []
    assert order.arrive("o", 4, "4", now=0) == []
    assert order.gaps() == {"o": (2, 2)}
    assert order.arrive("o", 2, "2", now=1) == ["2", "3", "4"]
    assert order.held == 0 and order.gaps() == {}


def test_reorder_gives_up_a_gap_after_hold_for_and_still_delivers_the_late_one():
    order = Reorder(hold_for=3.0)
    order.arrive("o", 1, "1", now=0)
    order.arrive("o", 4, "4", now=0)
    order.arrive("o", 5, "5", now=1)
    assert order.next_deadline() == 3.0
    assert order.expire(2.9) == []
    assert order.expire(3.0) == ["4", "5"]
    assert order.given_up == 2
    assert order.arrive("o", 6, "6", now=4) == ["6"]
    assert order.arrive("o", 2, "2", now=5) == ["2"]  # late: out of order, but never dropped
    assert order.late == 1


def test_reorder_holds_an_origin_first_seen_above_1():
    """Our numbers start at 1: the first ones may be on their way along another path."""
    order = Reorder(hold_for=3.0)
    assert order.arrive("o", 3, "3", now=0) == []
    assert order.arrive("o", 1, "1", now=0) == ["1"]
    assert order.arrive("o", 2, "2", now=0) == ["2", "3"]
    # history from before our time: released, in order, once hold_for has passed
    assert order.arrive("p", 40, "40", now=0) == [] and order.arrive("p", 41, "41", now=0) == []
    assert order.expire(3.0) == ["40", "41"]
    assert order.arrive("p", 42, "42", now=3) == ["42"]


def test_reorder_is_bounded_by_giving_up_the_oldest_gap():
    order = Reorder(hold_for=60.0, max_held=3)
    order.arrive("o", 1, "o1", now=0)
    order.arrive("p", 1, "p1", now=0)
    assert order.arrive("o", 3, "o3", now=0) == []
    assert order.arrive("p", 3, "p3", now=1) == []
    assert order.arrive("p", 4, "p4", now=1) == []
    assert order.arrive("p", 5, "p5", now=2) == ["o3"]  # the fourth held: o's gap is the oldest
    assert order.held == 3


# --- Intake: the server's one call per inbound activity -----------------------------------------

def test_intake_publishes_each_once_in_order_across_two_paths():
    intake = Intake(foreign_bound=100)
    a = ORIGINS[0]
    old_parent = [own_id(a, s) for s in (1, 2, 3)]
    new_parent = [own_id(a, s) for s in (2, 3, 5, 4, 6)] + ["foreign-x", "foreign-x"]
    published = feed(intake, old_parent[:1] + new_parent[:3] + old_parent[1:] + new_parent[3:])
    assert published == [own_id(a, s) for s in range(1, 7)] + ["foreign-x"]
    assert intake.marks() == {a: 6}
    assert not intake.is_new(own_id(a, 4), protocol.parse_id(own_id(a, 4)))
    assert intake.is_new(own_id(a, 7), protocol.parse_id(own_id(a, 7)))


def test_intake_marks_and_extras_say_what_is_held():
    intake = Intake(foreign_bound=100)
    a, b = ORIGINS[:2]
    feed(intake, [own_id(a, s) for s in (1, 2, 3, 5, 6, 9)] + [own_id(b, 1)])
    assert intake.marks() == {a: 3, b: 1}
    assert intake.extras() == {a: [[5, 6], [9, 9]]}
    assert intake.extras(limit=1) == {a: [[5, 6]]}


def test_foreign_ids_are_remembered_within_a_bound():
    seen = SeenIds(bound=2)
    assert seen.add("x") and seen.add("y") and not seen.add("x")
    assert seen.add("z")  # "x" is forgotten
    assert "x" not in seen and len(seen) == 2


@st.composite
def two_paths(draw):
    """Per origin 1..n; each path carries a random part (maybe twice, in any order); together all."""
    counts = draw(st.lists(st.integers(min_value=1, max_value=25), min_size=1, max_size=3))
    everything = [own_id(ORIGINS[i], s) for i, n in enumerate(counts) for s in range(1, n + 1)]
    everything += [f"foreign-{k}" for k in range(draw(st.integers(min_value=0, max_value=5)))]
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32)))
    paths = [[], []]
    for activity_id in everything:
        carriers = rng.choice([[0], [1], [0, 1]])
        for path in carriers:
            paths[path] += [activity_id] * rng.choice([1, 1, 1, 2])
    in_order = draw(st.booleans())  # links are FIFO: each path in order, or (harder) shuffled
    for path in paths:
        if not in_order:
            rng.shuffle(path)
    arrivals = []
    while paths[0] or paths[1]:  # a random interleaving of the two
        path = paths[rng.randrange(2)] if paths[0] and paths[1] else (paths[0] or paths[1])
        arrivals.append(path.pop(0))
    return everything, arrivals


@MANY
@given(two_paths())
def test_any_interleaving_of_two_paths_publishes_all_once_in_sender_order(case):
    everything, arrivals = case
    intake = Intake(foreign_bound=1000)
    published = feed(intake, arrivals)
    assert sorted(published) == sorted(everything)  # nothing lost, nothing twice
    for origin, seqs in per_origin(published).items():
        assert seqs == list(range(1, len(seqs) + 1)), origin  # in each sender's order
    assert intake.order.held == 0 and intake.order.late == 0


@MANY
@given(two_paths(), st.lists(st.integers(min_value=0, max_value=10), min_size=1))
def test_giving_up_gaps_at_any_time_still_loses_nothing_and_doubles_nothing(case, expiries):
    """Time passes while paths deliver: gaps are given up and their activities come late. Order
    may then bend (counted in ``late``), but every activity is still published exactly once."""
    everything, arrivals = case
    intake = Intake(foreign_bound=1000, hold_for=1.0)
    published, now = [], 0.0
    for step, activity_id in enumerate(arrivals):
        if expiries[step % len(expiries)] == 0:
            now += 2.0
            published += intake.expire(now)
        published += intake.receive(activity_id, protocol.parse_id(activity_id), activity_id, now)
    published += intake.expire(now + 2.0)
    assert sorted(published) == sorted(everything)
    if intake.order.late == 0:
        for seqs in per_origin(published).values():
            assert seqs == sorted(seqs)


@PLAIN
@given(st.sets(st.integers(min_value=1, max_value=40)), st.integers(min_value=1, max_value=45))
def test_peer_lacks_exactly_what_marks_and_extras_do_not_cover(held, seq):
    """The contract of ACTIVITY_RETRIEVE's marks: the sender sends what ``peer_lacks`` says,
    which is everything the asker does not hold, except numbers before its first sighting."""
    intake = Intake(foreign_bound=10)
    origin = ORIGINS[0]
    feed(intake, [own_id(origin, s) for s in sorted(held)])
    lacks = peer_lacks(origin, seq, intake.marks(), intake.extras(limit=100))
    if not held:
        assert lacks
    elif seq < min(held):
        assert not lacks  # before our time: not asked for
    else:
        assert lacks == (seq not in held)


def test_a_restarted_origin_resuming_above_its_reservation_is_not_held():
    """A durable counter resumes at 1,000,001 after a restart: peers learn it ("resumes" in the
    map) and stop waiting for the numbers it skipped; an earlier gap of its own still waits."""
    intake = Intake(100)
    intake.restore({"o": 5})  # from the store: 1..5 seen before our own restart
    assert intake.receive("o:3:0", ("o", 3, 0), "dup", 0.0) == []
    assert intake.receive("o:1000002:0", ("o", 1000002, 0), "b", 0.0) == []  # held: 6.. missing
    assert intake.order.resume("o", 1000001) == []  # skipped to 1000001, which is not here yet
    assert intake.receive("o:1000001:0", ("o", 1000001, 0), "a", 0.0) == ["a", "b"]
    intake.receive("p:1:0", ("p", 1, 0), "p1", 0.0)
    assert intake.receive("p:3:0", ("p", 3, 0), "p3", 0.0) == []
    assert intake.order.resume("p", 4) == []  # 2 is a gap of its own: still waited for
    assert intake.receive("p:2:0", ("p", 2, 0), "p2", 0.0) == ["p2", "p3"]
