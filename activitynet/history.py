"""The activity history and de-duplication by id.

``History`` is the bounded cache of ACTIVITY_BROADCAST lines a server answers ACTIVITY_RETRIEVE
from; ``Seen`` decides whether an id arrives for the first time. Both are in memory and replaceable
by durable ones with the same verbs; neither locks: ``State`` guards them with the state lock.

De-duplication: our own ids carry (origin, sequence number), and every origin numbers its
activities from 1 in the order it sent them, which is the order every server receives them in
(recovery keeps it so). One high-water mark per origin therefore says exactly what was seen, in
constant memory. Foreign ids are opaque: they are remembered one by one, in a bounded set.
"""

from collections import OrderedDict


class History:
    """Bounded cache of ACTIVITY_BROADCAST lines in arrival order, with O(1) lookup by id and by
    history number.

    Every entry gets a history number (1, 2, ...) that is never reused, so a link can remember
    "everything after number n" even while old entries are evicted. The entries live in a ring
    of ``size`` slots, the one numbered n in slot n % size, so a catch-up (``recovery.CatchUp``)
    reads any run of them in time proportional to its length, wherever it starts: a deque's
    middle costs a walk from its end (milliseconds at a million entries, under the lock)."""

    def __init__(self, size):
        self.size = size
        self._slots = [None] * size  # (number, id, line bytes), entry n at n % size
        self._index = {}  # id -> number
        self.first_no = 1  # the oldest number held (last_no + 1 when empty)
        self.last_no = 0
        self.bytes = 0  # of the lines held

    def add(self, activity_id, line):
        self.last_no = number = self.last_no + 1
        slot = number % self.size
        old = self._slots[slot]
        if old is not None:  # the ring is full: the oldest entry goes
            del self._index[old[1]]
            self.bytes -= len(old[2])
            self.first_no = old[0] + 1
        self._slots[slot] = (number, activity_id, line)
        self._index[activity_id] = number
        self.bytes += len(line)

    def __contains__(self, activity_id):
        return activity_id in self._index

    def __len__(self):
        return self.last_no - self.first_no + 1

    def between(self, after, upto):
        """Entries with numbers in (``after``, ``upto``], of those held, oldest first."""
        low = max(after + 1, self.first_no)
        high = min(upto, self.last_no)
        if low > high:
            return []
        start, stop = low % self.size, high % self.size
        if start <= stop:
            return self._slots[start:stop + 1]
        return self._slots[start:] + self._slots[:stop + 1]

    def after_number(self, number):
        """Entries added after history number ``number``."""
        return self.between(number, self.last_no)

    def number_of(self, activity_id):
        """The history number of ``activity_id``, or None if it is not (or no longer) cached."""
        return self._index.get(activity_id)

    def after_id(self, activity_id):
        """Entries after ``activity_id``, or all of them if it is not (or no longer) cached."""
        number = self._index.get(activity_id)
        return self.after_number(number if number is not None else 0)

    def last_id(self):
        return self._slots[self.last_no % self.size][1] if self.last_no else None


class Seen:
    """Which activity ids this server has accepted (see the module docstring)."""

    def __init__(self, foreign_bound):
        self._high = {}  # origin -> highest sequence number accepted
        self._foreign = OrderedDict()  # foreign ids, oldest first, at most foreign_bound
        self._foreign_bound = foreign_bound

    def first_sighting(self, activity_id, parsed):
        """Record ``activity_id`` (``parsed`` is ``protocol.parse_id`` of it); False if seen."""
        if parsed is not None:
            origin, seq, _sent = parsed
            if seq <= self._high.get(origin, 0):
                return False
            self._high[origin] = seq
            return True
        if activity_id in self._foreign:
            return False
        self._foreign[activity_id] = True
        if len(self._foreign) > self._foreign_bound:
            self._foreign.popitem(last=False)
        return True

    def marks(self):
        """{origin: highest sequence number held}, a copy (sent as ACTIVITY_RETRIEVE's marks)."""
        return dict(self._high)
