"""The activity history.

``History`` is the bounded cache of ACTIVITY_BROADCAST lines a server answers ACTIVITY_RETRIEVE
from. It is in memory (a durable store, ``store``, keeps more on disk, read for recovery outside
the lock); it does not lock: ``State`` guards it with the state lock. Whether an id is new, and
when it is published, is ``dedup.Intake``'s (any path, any order; issue 9).
"""


class History:
    """Bounded cache of ACTIVITY_BROADCAST lines in arrival order, with O(1) lookup by id and by
    history number.

    Every entry gets a history number (1, 2, ...) that is never reused, so a link can remember
    "everything after number n" even while old entries are evicted. The entries live in a ring
    of ``size`` slots, the one numbered n in slot n % size, so a catch-up (``recovery.CatchUp``)
    reads any run of them in time proportional to its length, wherever it starts: a deque's
    middle costs a walk from its end (milliseconds at a million entries, under the lock)."""

    def __init__(self, size, restored=(), last_no=0):
        """``restored``: (number, id, line) entries kept by a durable store, oldest first and
        numbered without gaps up to ``last_no`` (the store's last position; entries that are not
        are left out, as the ring finds them by number); numbering goes on after ``last_no``."""
        self.size = size
        self._slots = [None] * size  # (number, id, line bytes), entry n at n % size
        self._index = {}  # id -> number
        self.last_no = last_no
        self.first_no = last_no + 1  # the oldest number held (last_no + 1 when empty)
        self.bytes = 0  # of the lines held
        kept = list(restored)[-size:] if size else []
        if kept and kept[-1][0] == last_no and last_no - kept[0][0] == len(kept) - 1:  # else: none
            self.first_no = kept[0][0]
            for entry in kept:
                self._slots[entry[0] % size] = entry
                self._index[entry[1]] = entry[0]
                self.bytes += len(entry[2])

    def add(self, activity_id, line):
        self.last_no = number = self.last_no + 1
        if not self.size:
            self.first_no = number + 1
            return
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
        return self._slots[self.last_no % self.size][1] if len(self) else None
