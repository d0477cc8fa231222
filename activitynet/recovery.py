"""The recovery routine, run on every new server link: a first join or a repaired partition.

From the seed notes' memo, with our decisions from PROTOCOL.md section 4:

    initiator (dialled out)            acceptor (was dialled)
    AUTHENTICATE            ------->
    ACTIVITY_RETRIEVE       ------->   answers it from its history, then forwards live
    SYNC_USER               ------->   merges users
    SERVER_ANNOUNCE         ------->   now knows who dialled (host:port)
                            <-------   SYNC_USER (sent right after AUTHENTICATE succeeded)
                            <-------   ACTIVITY_RETRIEVE
    answers it, then live   <-------   SERVER_ANNOUNCE

Ask for what you lack, not for everything: ``after`` is the last id received from that peer
before the link broke (``PeerMemory``), and ``marks`` (our optional extension, ignored by other
implementations) says, per origin server, the highest sequence number already held, so one of our
peers sends exactly what is missing: our ids by the marks alone, since the peer at an address may
be a restarted process whose history is in another order (see ``missing_entries``), and only the
foreign ids by the position of ``after``.

The machine. One ``Link`` per authenticated server link, owned by the session of that link and
changed only under the state lock. It works on plain data and never calls anyone: each event
(``open``, ``peer_announced``, ``peer_asked``, ``tick``, ``peer_refused``) updates the record and
returns the ``Step``s to take now, in order; ``State`` turns each step into bytes under the same
lock, so nothing can come between them. Two things progress independently:

- ``asked``: our half of the routine is out (the initiator's whole opening; the acceptor's
  ACTIVITY_RETRIEVE and SERVER_ANNOUNCE);
- ``live``: the peer has been sent its backlog, so activities are forwarded to it as they arrive.

The order holds whatever arrives when (a delayed TCP segment, a login during the opening):

1. Each half goes out in one step: the initiator's AUTHENTICATE, ACTIVITY_RETRIEVE, SYNC_USER,
   SERVER_ANNOUNCE; the acceptor's ACTIVITY_RETRIEVE, SERVER_ANNOUNCE.
2. No load SERVER_ANNOUNCE goes out on a link before our half is (``may_announce_load``): our
   half's own SERVER_ANNOUNCE carries the load of that moment, so nothing is lost by waiting.
3. So the first SERVER_ANNOUNCE a server receives on a link is the peer's routine announce: the
   initiator's comes last in its opening, the acceptor's right after its ACTIVITY_RETRIEVE. Only
   that first one can move the routine on (the acceptor takes its turn; a peer that has not asked
   is caught up); later ones are load changes and only update the load. Between two of our
   servers the initiator has already been asked, and is live, when the acceptor's announce comes;
   going live on it is for the Java acceptor, which announces and never asks.
4. Nothing is forwarded on a link before the peer's backlog: our answer to its ACTIVITY_RETRIEVE,
   or, for a peer that announced without asking, what arrived since the link came up. A peer
   that neither asked nor announced, nor sent an activity, for ``LIVE_AFTER`` seconds may only
   be slow (its opening held up in the network), so it gets the whole history in order
   (``tick``), on either side: its late request then brings only repeats it drops, never
   something older after something newer, which its de-duplication by per-origin sequence
   number would drop for good.

5. A peer that cannot de-duplicate (another implementation: it asks without ``marks`` nor
   ``lineage``, or, dialled, announces before asking, as the Java acceptor does) is sent what it
   lacks and no more: never the activities it sent us (``PeerMemory.sent_by``), and, when it never
   asks, what arrived after the last activity it held when its previous link broke
   (``PeerMemory.held_up_to``). An acceptor answers such a request only once the announce after
   it says who dialled.

The backlog (an answer, a catch-up, a replay) is streamed, not queued in one piece: a
``CatchUp`` per link holds a cursor in the history, and the link's catch-up worker sends it a
bounded chunk per lock hold (``State.catch_up``), outside the lock, waiting for the outbox to
drain between chunks. The last chunk and ``live`` go in one hold, so every activity is sent by
exactly one of the two, in history order: nothing missed, nothing twice, nothing overtaking.
With a data store (``--data-dir``), what the peer lacks beyond what memory holds (its start, or
entries evicted while it is streamed) is read from disk by the same worker, outside the lock,
in order, before the memory part: a late ACTIVITY_RETRIEVE, or a peer that never asks, gets the
disk part in its place too.

Without rule 2, an acceptor's load announce sent during the opening made the initiator go live
on it and forward new activities before the acceptor's ACTIVITY_RETRIEVE asked for the backlog;
the acceptor then dropped the whole backlog as already seen (issue 14).
"""

import collections
import enum
import time

from . import protocol
from .dedup import peer_lacks

LIVE_AFTER = 1.0
QUIET_LIMIT = 10.0  # a peer that keeps sending activities but never asks nor announces


class Step(enum.Enum):
    """What a link's machine asks ``State`` to send, in order."""

    AUTHENTICATE = "AUTHENTICATE"
    USERS = "SYNC_USER"  # every user
    ASK = "ACTIVITY_RETRIEVE"  # ours: after the last id from this peer, with our marks
    ANNOUNCE = "SERVER_ANNOUNCE"  # our load
    ANSWER = "answer"  # the entries the peer's ACTIVITY_RETRIEVE lacks
    CATCH_UP = "catch up"  # the entries added since the link came up
    REPLAY = "replay"  # the whole history, in order


class Link:
    """One server link's progress through the routine (see the module docstring)."""

    __slots__ = ("initiator", "peer_key", "start_no", "opened_at", "heard_at", "since", "asked",
                 "backlog", "live", "catch_up", "request", "foreign", "refused", "load", "hostname",
                 "port", "activities_sent", "activities_received", "map_gen", "was_parent")

    def __init__(self, initiator, peer_key, start_no, now):
        self.initiator = initiator
        self.peer_key = peer_key  # "host:port" of the peer's listener, once known
        self.start_no = start_no  # history number when the link came up
        self.opened_at = now  # monotonic
        self.heard_at = now  # monotonic: when the peer last sent an activity (or the link opened)
        self.since = time.time()  # wall clock, for people
        self.asked = False
        self.backlog = None  # the Step of the peer's backlog once decided (being, or was, sent)
        self.live = False  # the backlog is out: activities are forwarded as they arrive
        self.catch_up = None  # the CatchUp streaming the backlog, until the link is live
        self.request = None  # the peer's ACTIVITY_RETRIEVE (after, marks, held)
        self.foreign = False  # another implementation, by its behaviour: it cannot de-duplicate
        self.refused = False  # the peer refused our secret: do not redial it
        self.load = None  # the peer's last announced client load
        self.hostname = None
        self.port = None
        self.activities_sent = 0
        self.activities_received = 0
        self.map_gen = -1  # the state's map generation last sent on this link (issue 9)
        self.was_parent = False  # we dialled it and it accepted: our parent (issue 9)

    @classmethod
    def dialled(cls, peer_key, start_no, now):
        return cls(True, peer_key, start_no, now)

    @classmethod
    def accepted(cls, start_no, now):
        return cls(False, None, start_no, now)

    @property
    def phase(self):
        if self.refused:
            return "refused"
        if self.live:
            return "live" if self.asked else "answered"
        if self.backlog:
            return "catching-up"
        return "asked" if self.asked else "authenticated"

    @property
    def announced(self):
        return self.hostname is not None

    def open(self):
        """The link is authenticated: the initiator's whole opening, the acceptor's SYNC_USER
        (AUTHENTICATE's success reply)."""
        if self.initiator:
            self.asked = True
            return (Step.AUTHENTICATE, Step.ASK, Step.USERS, Step.ANNOUNCE)
        return (Step.USERS,)

    def peer_announced(self, load, hostname, port):
        """A SERVER_ANNOUNCE. The first on a link is the peer's routine announce (rule 3): the
        acceptor now knows who dialled and takes its turn, and a peer that has not asked is
        caught up (a peer we dialled that announces before asking is not one of ours: the Java
        acceptor, rule 5). Later ones only update the load."""
        first = not self.announced
        self.load, self.hostname, self.port = load, hostname, port
        if self.peer_key is None:
            self.peer_key = f"{hostname}:{port}"
        if not first:
            return []
        steps = self._acceptor_turn()
        if not self.backlog:
            if self.request is not None:  # its request waited for who it is (rule 5)
                self.backlog = Step.ANSWER
            else:
                self.foreign = self.foreign or self.initiator
                self.backlog = Step.CATCH_UP
            steps.append(self.backlog)
        return steps

    def peer_asked(self, after, marks, held=None, ours=False):
        """The peer's ACTIVITY_RETRIEVE: answer it, and forward live once the answer is out.

        A request without ``marks`` (and, from a dialler, without our ``lineage``: ``ours``)
        comes from a peer that may not de-duplicate (another implementation, or a fresh server
        of ours): it must not be sent back what it sent us, and an acceptor learns who dialled
        only from the announce that follows, so the answer waits for it (rule 5).

        A request on a live link is answered again, the link not live meanwhile, so the answer
        keeps history order (the disk part too). One while an answer is under way brings nothing
        more; one with marks while a catch-up or replay is under way replaces it (the answer is
        what the peer lacks, from disk as well, in order; what was already sent it de-duplicates);
        one without marks then brings nothing more (the peer may not de-duplicate)."""
        if marks is None and not ours:
            self.foreign = True
        if self.live:
            self.live = False
        elif self.backlog is Step.ANSWER or self.backlog and self.foreign:
            return ()
        elif self.backlog is None and self.foreign and self.peer_key is None:
            self.request = (after, marks, held)
            return ()
        self.request = (after, marks, held)
        self.backlog = Step.ANSWER
        return (Step.ANSWER,)

    def tick(self, now):
        """The heartbeat's clock. The peer neither asked for history nor announced itself, and
        sent no activity, for ``LIVE_AFTER`` seconds (or ``QUIET_LIMIT`` passed since the link
        came up): finish our half anyway, and send it the whole history, in order, then live
        (rule 4). A peer that asked but never announced who it is gets its answer.

        The peer may just be slow (busy, or its opening held up in the network) and ask later.
        Sending it only what arrived since the link came up would put those activities *before*
        the older ones its ACTIVITY_RETRIEVE asks for, and it would drop the older ones as already
        seen. The whole history is a superset it de-duplicates, with nothing out of order. A peer
        that never asks (a test's fake server, say) still gets every activity.

        A peer still sending us activities is not quiet: our own acceptor's ACTIVITY_RETRIEVE
        comes right after its answer to ours, which can take seconds to read on a busy machine
        (20,000 activities); replaying the history to it meanwhile would only double the bytes."""
        if self.backlog or self.refused:
            return ()
        if now - self.heard_at < LIVE_AFTER and now - self.opened_at < QUIET_LIMIT:
            return ()
        self.backlog = Step.ANSWER if self.request is not None else Step.REPLAY
        return (*self._acceptor_turn(), self.backlog)

    def caught_up(self):
        """The last chunk of the backlog went out (in the same lock hold): forward live now."""
        self.live = True
        self.catch_up = None

    def peer_sent_activity(self, now, count=1):
        """``count`` ACTIVITY_BROADCASTs from the peer: it is busy, not quiet (see ``tick``)."""
        self.activities_received += count
        self.heard_at = now

    def peer_refused(self):
        """The peer answered AUTHENTICATION_FAIL: our secret is wrong for it."""
        self.refused = True

    @property
    def may_announce_load(self):
        """Whether a load change may be announced on this link now (rule 2)."""
        return self.asked

    def _acceptor_turn(self):
        """The acceptor's ACTIVITY_RETRIEVE and SERVER_ANNOUNCE, once per link."""
        if self.initiator or self.asked:
            return []
        self.asked = True
        return [Step.ASK, Step.ANNOUNCE]


class PeerMemory:
    """What we know of each peer address across its links (guarded by the state lock): the last
    activity id received from it (what to ask after when a link to it comes up again) and, for a
    peer that cannot de-duplicate (rule 5), the ids it sent us and the history number up to which
    it held everything when its last live link broke."""

    def __init__(self, bound=100_000):
        self.marks = {}  # peer_key -> activity id (a durable store writes it: share_peer_marks)
        self._held = {}  # peer_key -> history number
        self._sent = {}  # peer_key -> {activity id: True}, oldest first, at most ``bound``
        self._bound = bound

    def heard(self, peer_key, activity_id):
        self.marks[peer_key] = activity_id

    def last_from(self, peer_key):
        return self.marks.get(peer_key, "") if peer_key else ""

    def sent_us(self, peer_key, activity_id):
        ids = self._sent.get(peer_key)
        if ids is None:
            # OrderedDict: dropping the oldest is O(1); a plain dict's next(iter()) walks the
            # slots its earlier deletions left empty, so a long stream made it quadratic.
            ids = self._sent[peer_key] = collections.OrderedDict()
        ids[activity_id] = True
        if len(ids) > self._bound:
            ids.popitem(last=False)

    def sent_by(self, peer_key):
        """The ids ``peer_key`` sent us (a live view: test membership only)."""
        return self._sent.get(peer_key, {})

    def link_ended(self, peer_key, number):
        """A live link to ``peer_key`` broke with history number ``number`` the newest: with
        nothing in flight, the peer held every entry up to it."""
        self._held[peer_key] = number

    def held_up_to(self, peer_key):
        return self._held.get(peer_key)


# Bounds of one catch-up lock hold (see ``CatchUp.take``). A chunk that is not the last is only a
# slice of references (microseconds); the last one is also judged and joined under the lock.
# CHUNK also bounds the worker's CPU between two chances for other threads to take the GIL
# (a chunk is judged and joined outside the lock): 5,000 gave a client's round trip a p99 of
# 9 ms while a peer was caught up from 1,000,000; 1,000 gives 2-4 ms (``curve-link-up-stall``).
CHUNK = 1000
LAST_CHUNK = 1000


class CatchUp:
    """A backlog being streamed to one link: the entries after history number ``cursor`` that
    ``wanted`` keeps (all when None), in history order. Plain data; ``State`` calls ``take``
    under the lock and ``lines`` outside it, except for the last chunk (module docstring).

    With a data store, entries between the cursor and the oldest one memory holds are read from
    disk (outside the lock, before the memory part); ``marks`` and ``foreign_after`` (a history
    number: foreign ids after it are sent) let the store skip what the peer holds unread.
    ``lookup``: the id whose number only the store may know, looked up (outside the lock) before
    the answer is decided (``answer``'s ``after``)."""

    __slots__ = ("cursor", "wanted", "kind", "marks", "foreign_after", "lookup")

    def __init__(self, cursor, wanted=None, kind="replay", marks=None, foreign_after=None, lookup=None):
        self.cursor = cursor
        self.wanted = wanted  # entry -> bool; its inputs are fixed, so it may run outside the lock
        self.kind = kind
        self.marks = marks
        self.foreign_after = foreign_after
        self.lookup = lookup

    def start(self, history, disk=False):
        """Where it begins (under the lock): without a store (``disk``), entries evicted before
        the start are simply gone."""
        if not disk:
            self.cursor = max(self.cursor, history.first_no - 1)
        return self

    def on_disk(self, history):
        """The numbers [first, below) to read from disk next, or None when memory holds what
        the cursor needs (under the lock). The range reaches half-way into memory: entries keep
        being evicted while the disk is read, and a range that ended at the oldest entry held
        would leave a new gap behind every pass (a chase that never ends under a steady
        stream); half of memory is the slack the next pass would need."""
        if self.cursor + 1 < history.first_no:
            return self.cursor + 1, min(history.last_no + 1, history.first_no + history.size // 2)
        return None

    def take(self, history, chunk=CHUNK, last_chunk=LAST_CHUNK):
        """The next entries (under the lock): (entries, whether they are the last, how many were
        evicted unsent since the previous take). The last chunk is at most ``last_chunk``
        entries: whatever the history size, and whatever arrives meanwhile, a hold is bounded."""
        evicted = max(0, history.first_no - 1 - self.cursor)
        self.cursor += evicted
        last = history.last_no - self.cursor <= last_chunk
        end = history.last_no if last else min(history.last_no, self.cursor + chunk)
        entries = history.between(self.cursor, end)
        self.cursor = end
        return entries, last, evicted

    def lines(self, entries):
        wanted = self.wanted
        if wanted is None:
            return [entry[2] for entry in entries]
        return [entry[2] for entry in entries if wanted(entry)]


def not_sent_by(ids):
    """The ``wanted`` of a catch-up that leaves out ``ids`` (what the peer sent us), or None."""
    return (lambda entry: entry[1] not in ids) if ids else None


def answer(history, after, marks, held=None, sent_by=None, disk=False, after_no=None):
    """The ``CatchUp`` answering an ACTIVITY_RETRIEVE: the history entries a peer lacks, in
    history order (under the lock: O(1); the entries are judged chunk by chunk).

    A peer that sends no ``marks`` (another implementation, or one holding none of our ids) gets
    the entries after ``after``, or all of those in memory if that id is unknown, less
    ``sent_by`` (the ids it sent us: it may not de-duplicate them). A peer that sends marks
    gets each of our ids above its mark for that id's origin, wherever the id sits in our history,
    less those in its ``held`` runs (``dedup.peer_lacks``), and of the foreign ids only those
    after ``after`` (all those in memory if that id is unknown). The position of ``after`` is no
    proof of what the peer holds: it is the last id the peer received from our *address*, and if
    we are a restarted process (which may even have received that id from the peer's own answer
    a moment ago) our history is in another order than what the peer was sent, so entries before
    it can be ones the peer never saw. Marks are exact, and they keep what we send per origin
    gap-free, which the peer's de-duplication by per-origin sequence number relies on.

    With a data store (``disk``) the answer reaches back before memory: for marks, to the start
    of the disk; without, to ``after``. If memory does not hold ``after``, the returned CatchUp
    only asks for it to be looked up on disk (``lookup``); the caller then calls again with
    ``after_no``: its stored number, or ``history.first_no - 1`` if the store lacks it too."""
    if after_no is None:
        after_no = history.number_of(after) if after else None
        if after_no is None and after and disk:
            return CatchUp(0, kind="answer", lookup=after)
    if after_no is None:  # unknown: foreign ids from those memory holds now
        after_no = history.first_no - 1
    if not marks:
        return CatchUp(after_no, not_sent_by(sent_by), "answer").start(history, disk)
    split_id, parse_id = protocol.split_id, protocol.parse_id

    def wanted(entry):
        activity_id = entry[1]
        origin, seq = split_id(activity_id)
        mark = marks.get(origin)
        if mark is not None:  # one of ours, from an origin the peer holds some of
            if not seq.isdigit():
                return True
            seq = int(seq)
            return seq > mark and (not held or peer_lacks(origin, seq, marks, held))
        return entry[0] > after_no or parse_id(activity_id) is not None

    return CatchUp(0, wanted, "answer", marks, after_no).start(history, disk)


def missing_entries(history, after, marks, held=None, sent_by=None):
    """The entries ``answer`` sends from memory, all at once (for tests and small histories)."""
    catch_up = answer(history, after, marks, held, sent_by)
    entries = history.after_number(catch_up.cursor)
    return entries if catch_up.wanted is None else [e for e in entries if catch_up.wanted(e)]
