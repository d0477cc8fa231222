"""The activity history.

``History`` is the bounded cache of ACTIVITY_BROADCAST lines a server answers ACTIVITY_RETRIEVE
from. It is in memory and replaceable by a durable one with the same verbs; it does not lock:
``State`` guards it with the state lock. Whether an id is new, and when it is published, is
``dedup.Intake``'s (any path, any order; issue 9).
"""

import itertools
from collections import deque


class History:
    """Bounded cache of ACTIVITY_BROADCAST lines in arrival order, with O(1) lookup by id.

    Every entry gets a history number (1, 2, ...) that is never reused, so a link can remember
    "everything after number n" even while old entries are evicted."""

    def __init__(self, size, restored=(), last_no=0):
        """``restored``: (number, id, line) entries kept by a durable store, oldest first and
        numbered without gaps; numbering goes on after ``last_no`` (the store's last position)."""
        self.size = size
        self._entries = deque(restored[-size:] if size else ())  # (number, id, line bytes)
        self._index = {entry[1]: entry[0] for entry in self._entries}  # id -> number
        self._numbers = itertools.count(last_no + 1)
        self.last_no = last_no
        self.bytes = sum(len(entry[2]) for entry in self._entries)  # of the lines held

    def add(self, activity_id, line):
        self.last_no = number = next(self._numbers)
        self._entries.append((number, activity_id, line))
        self._index[activity_id] = number
        self.bytes += len(line)
        if len(self._entries) > self.size:
            _, old_id, old_line = self._entries.popleft()
            del self._index[old_id]
            self.bytes -= len(old_line)

    def __contains__(self, activity_id):
        return activity_id in self._index

    def __len__(self):
        return len(self._entries)

    def after_number(self, number):
        """Entries added after history number ``number``."""
        if not self._entries:
            return []
        start = max(0, number - self._entries[0][0] + 1)
        return list(itertools.islice(self._entries, start, None))

    @property
    def first_no(self):
        """The number of the oldest entry held (``last_no + 1`` when empty): older ones were
        evicted, and only a durable store may still hold them."""
        return self._entries[0][0] if self._entries else self.last_no + 1

    def number_of(self, activity_id):
        """The history number of ``activity_id``, or None if it is not (or no longer) cached."""
        return self._index.get(activity_id)

    def after_id(self, activity_id):
        """Entries after ``activity_id``, or all of them if it is not (or no longer) cached."""
        number = self._index.get(activity_id)
        return self.after_number(number) if number is not None else list(self._entries)

    def last_id(self):
        return self._entries[-1][1] if self._entries else None
