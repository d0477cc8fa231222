"""De-duplication and per-sender order that hold on any path (issue 9, item 4).

An activity can reach a server on more than one path: a parent switch replays history from a
new neighbour, a second path briefly exists while the network re-forms, another implementation
pushes what it thinks we lack. The old rule, "new if its sequence number is above the highest
seen from its origin", drops 101 when 102 arrived first. Here each origin's seen numbers are a
set of disjoint runs, so any number is judged exactly, whatever the arrival order:

``SeqSet``    the sequence numbers seen from one origin, as sorted runs ``[lo, hi]``. Normally one
              run; a gap adds one. Bounded: past ``max_runs`` the narrowest gap is given up (its
              numbers count as seen), the only case where a late copy would be dropped, counted in
              ``forgotten``.
``SeenIds``   foreign (opaque) ids, bounded, oldest forgotten first (they cannot be ordered).
``Reorder``   per-origin delivery order: an activity that arrives ahead of a gap is held back until
              the gap fills, or until ``hold_for`` seconds pass, when the gap is given up and the
              held ones are released in order (the server fetches the gap meanwhile, see ``gaps``).
              Our sequence numbers start at 1, so an origin first seen above 1 is held too: its
              first activities may be on their way along another path. When they are history from
              before our time (a cache that dropped them), the wait costs ``hold_for`` once.
              One that arrives after its gap was given up is released at once, out of order: never
              drop a new activity. At most ``max_held`` are held; past that the oldest gap is given
              up at once.
``Intake``    the three together: the one call the state makes per inbound activity.

The marks a server sends in ACTIVITY_RETRIEVE keep their meaning: ``Intake.marks()`` gives, per
origin, the end of the first run ("I hold every number of this origin from my first sighting up
to here"), and ``Intake.extras()`` the runs held above it, so a peer can skip those too
(``peer_lacks`` is the sender's side of that contract). Numbers below an origin's first sighting
were never asked for and are not wanted (history before our time); they are still accepted as new
if they come.

Nothing here locks: the state calls it under its one lock.
"""

import bisect
from collections import OrderedDict

HOLD_FOR = 3.0  # seconds an activity waits for an earlier one of its sender before the gap is given up
MAX_HELD = 10_000  # activities held back at once, all origins together
MAX_RUNS = 1_000  # runs remembered per origin (so at most MAX_RUNS - 1 open gaps)


class SeqSet:
    """Sequence numbers seen from one origin, as sorted disjoint runs; see the module docstring."""

    __slots__ = ("_lo", "_hi", "max_runs", "forgotten")

    def __init__(self, max_runs=MAX_RUNS):
        self._lo = []  # run starts, ascending
        self._hi = []  # run ends; _hi[i] + 1 < _lo[i + 1] (runs never touch)
        self.max_runs = max_runs
        self.forgotten = 0  # numbers given up as seen without being seen (bound reached)

    def add(self, seq):
        """Record ``seq``; True if it was not seen before."""
        hi = self._hi
        if hi and seq == hi[-1] + 1:  # the hot path: the next one in order
            hi[-1] = seq
            return True
        lo = self._lo
        i = bisect.bisect_right(lo, seq)  # runs 0..i-1 start at or below seq
        if i and seq <= hi[i - 1]:
            return False
        joins_left = i and hi[i - 1] + 1 == seq
        joins_right = i < len(lo) and lo[i] - 1 == seq
        if joins_left and joins_right:
            hi[i - 1] = hi[i]
            del lo[i], hi[i]
        elif joins_left:
            hi[i - 1] = seq
        elif joins_right:
            lo[i] = seq
        else:
            lo.insert(i, seq)
            hi.insert(i, seq)
            if len(lo) > self.max_runs:
                self._close_narrowest_gap()
        return True

    def add_next(self, first, last):
        """Record ``first`` .. ``last`` when ``first`` is the next number after every one seen
        (as many ``add`` calls would); False, recording nothing, otherwise."""
        hi = self._hi
        if not hi or first != hi[-1] + 1:
            return False
        hi[-1] = last
        return True

    def __contains__(self, seq):
        i = bisect.bisect_right(self._lo, seq)
        return bool(i) and seq <= self._hi[i - 1]

    def mark(self):
        """End of the first run: every number from the first one seen up to here is held."""
        return self._hi[0] if self._hi else 0

    def runs(self):
        return list(zip(self._lo, self._hi))

    def _close_narrowest_gap(self):
        lo, hi = self._lo, self._hi
        i = min(range(1, len(lo)), key=lambda k: lo[k] - hi[k - 1])
        self.forgotten += lo[i] - hi[i - 1] - 1
        hi[i - 1] = hi[i]
        del lo[i], hi[i]


class SeenIds:
    """Foreign ids seen lately: a bounded insertion-ordered set, oldest forgotten first."""

    def __init__(self, bound):
        self.bound = bound
        self._ids = OrderedDict()

    def add(self, activity_id):
        """Record ``activity_id``; True if it was not seen (or was forgotten) before."""
        if activity_id in self._ids:
            return False
        self._ids[activity_id] = None
        if len(self._ids) > self.bound:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, activity_id):
        return activity_id in self._ids

    def __len__(self):
        return len(self._ids)


class Reorder:
    """Per-origin delivery order with a bounded hold-back; see the module docstring.

    ``arrive`` and ``expire`` return the items to deliver now, in delivery order. Items are opaque
    (the state passes the encoded line)."""

    def __init__(self, hold_for=HOLD_FOR, max_held=MAX_HELD):
        self.hold_for = hold_for
        self.max_held = max_held
        self._next = {}  # origin -> the sequence number to deliver next
        self._held = {}  # origin -> {seq: (item, deadline)}
        self.held = 0
        self.late = 0  # delivered after their gap was given up (out of order, but not lost)
        self.given_up = 0  # sequence numbers never seen when their gap was given up

    def arrive(self, origin, seq, item, now):
        """A new activity (never seen before) from ``origin``."""
        expected = self._next.get(origin, 1)
        if seq == expected:  # the next one: the hot path
            self._next[origin] = seq + 1
            if origin not in self._held:
                return [item]
            return [item] + self._drain(origin)
        if seq < expected:
            self.late += 1
            return [item]
        self._held.setdefault(origin, {})[seq] = (item, now + self.hold_for)
        self.held += 1
        if self.held > self.max_held:
            return self._give_up(min(self._held, key=self._oldest_deadline))
        return []

    def due(self, origin, seq):
        """Whether ``arrive`` would release ``seq`` of ``origin`` at once, alone: it is the next
        one expected and nothing of ``origin`` is held."""
        return self._next.get(origin, 1) == seq and origin not in self._held

    def skip_to(self, origin, seq):
        """Expect ``seq`` next from ``origin`` (its sender says nothing below is coming)."""
        if seq > self._next.get(origin, 1):
            self._next[origin] = seq

    def resume(self, origin, first):
        """``origin`` says its numbers resume at ``first`` (a restart with a durable counter that
        skipped the rest of its reservation): nothing between what we expect and ``first`` is
        coming, so stop waiting for it, unless something below ``first`` is held (a gap of its
        own, still on its way). Returns what that releases."""
        held = self._held.get(origin)
        if held and min(held) < first:
            return []
        self.skip_to(origin, first)
        return self._drain(origin) if held else []

    def expire(self, now):
        """Give up every gap whose oldest held activity has waited ``hold_for``; release them."""
        released = []
        for origin in [o for o in self._held if self._oldest_deadline(o) <= now]:
            released += self._give_up(origin)
        return released

    def next_deadline(self):
        """When ``expire`` next has something to do (None if nothing is held)."""
        return min((self._oldest_deadline(o) for o in self._held), default=None)

    def gaps(self):
        """{origin: (first missing, last missing)} for each origin with activities held back:
        what to ask the neighbours for while waiting."""
        return {origin: (self._next.get(origin, 1), min(held) - 1) for origin, held in self._held.items()}

    def _oldest_deadline(self, origin):
        # held in arrival order and time only grows, so the first one waited longest
        return next(iter(self._held[origin].values()))[1]

    def _give_up(self, origin):
        first_held = min(self._held[origin])
        self.given_up += first_held - self._next.get(origin, 1)
        self._next[origin] = first_held
        return self._drain(origin)

    def _drain(self, origin):
        held = self._held[origin]
        seq = self._next[origin]
        released = []
        while seq in held:
            released.append(held.pop(seq)[0])
            seq += 1
        self._next[origin] = seq
        self.held -= len(released)
        if not held:
            del self._held[origin]
        return released


class Intake:
    """Everything a server decides about one inbound activity: new or not, deliver when.

    ``receive(activity_id, parsed, item, now)`` takes ``parsed`` = ``protocol.parse_id(id)``
    (origin, seq, sent) or None for a foreign id, and returns the items to publish now, in order:
    ``[]`` for a copy already seen (or one held back), possibly several when a gap fills."""

    def __init__(self, foreign_bound, hold_for=HOLD_FOR, max_held=MAX_HELD, max_runs=MAX_RUNS):
        self.max_runs = max_runs
        self._seen = {}  # origin -> SeqSet
        self.foreign = SeenIds(foreign_bound)
        self.order = Reorder(hold_for, max_held)
        self.duplicates = 0  # copies received of activities already seen (the cost of extra paths)

    def receive(self, activity_id, parsed, item, now):
        if parsed is None:
            if self.foreign.add(activity_id):
                return [item]
            self.duplicates += 1
            return []
        origin, seq = parsed[0], parsed[1]
        seen = self._seen.get(origin)
        if seen is None:
            seen = self._seen[origin] = SeqSet(self.max_runs)
        if not seen.add(seq):
            self.duplicates += 1
            return []
        return self.order.arrive(origin, seq, item, now)

    def receive_run(self, origin, first, last):
        """``receive`` of ``origin``'s numbers ``first`` .. ``last`` at once, for the usual case
        of a stream relayed in order: True when they are all new and due now (recorded as that
        many ``receive`` calls would). False, recording nothing, for anything else: then
        ``receive`` each."""
        seen = self._seen.get(origin)
        if seen is None or not self.order.due(origin, first) or not seen.add_next(first, last):
            return False
        self.order.skip_to(origin, last + 1)
        return True

    def sent_all(self, origin, seqs):
        """``sent`` of each of ``seqs`` (ascending), in one call when they are consecutive."""
        seen = self._seen.get(origin)
        if seen is not None and seqs[-1] - seqs[0] == len(seqs) - 1 and seen.add_next(seqs[0], seqs[-1]):
            self.order.skip_to(origin, seqs[-1] + 1)
            return
        for seq in seqs:
            self.sent(origin, seq)

    def sent(self, origin, seq):
        """Our own activity ``seq`` of ``origin``: seen, never held (we number in order, but a
        durable counter may resume above 1), and the next one expected is ``seq + 1``."""
        seen = self._seen.get(origin)
        if seen is None:
            seen = self._seen[origin] = SeqSet(self.max_runs)
        seen.add(seq)
        self.order.skip_to(origin, seq + 1)

    def restore(self, marks):
        """Seed from a durable store: per origin, every number from 1 up to ``marks[origin]`` was
        seen and published before the restart."""
        for origin, mark in marks.items():
            if mark > 0:
                seen = self._seen[origin] = SeqSet(self.max_runs)
                seen._lo, seen._hi = [1], [mark]
                self.order.skip_to(origin, mark + 1)

    def is_new(self, activity_id, parsed):
        """Whether ``receive`` would take this id as new (no side effect)."""
        if parsed is None:
            return activity_id not in self.foreign
        seen = self._seen.get(parsed[0])
        return seen is None or parsed[1] not in seen

    def expire(self, now):
        return self.order.expire(now)

    def marks(self):
        """{origin: end of the first run} for ACTIVITY_RETRIEVE's ``marks``."""
        return {origin: seen.mark() for origin, seen in self._seen.items()}

    def extras(self, limit=64):
        """{origin: [[lo, hi], ...]} runs held above each origin's mark (at most ``limit`` runs
        in all, lowest first per origin): the optional ``held`` of ACTIVITY_RETRIEVE."""
        extras = {}
        budget = limit
        for origin, seen in self._seen.items():
            runs = seen.runs()[1:1 + budget]
            if runs:
                extras[origin] = [list(run) for run in runs]
                budget -= len(runs)
            if budget <= 0:
                break
        return extras

    def forgotten(self):
        return sum(seen.forgotten for seen in self._seen.values())


def peer_lacks(origin, seq, marks, extras):
    """The sender's side of ACTIVITY_RETRIEVE's marks: does a peer that sent ``marks`` (origin ->
    mark) and ``extras`` (origin -> [[lo, hi], ...] held above the mark) lack ``origin:seq``?
    An origin missing from the marks is one the peer holds none of."""
    mark = marks.get(origin)
    if mark is None:
        return True
    if seq <= mark:
        return False
    return not any(lo <= seq <= hi for lo, hi in extras.get(origin, ()))
