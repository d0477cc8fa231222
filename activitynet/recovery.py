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

Without rule 2, an acceptor's load announce sent during the opening made the initiator go live
on it and forward new activities before the acceptor's ACTIVITY_RETRIEVE asked for the backlog;
the acceptor then dropped the whole backlog as already seen (issue 14).
"""

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
                 "live", "refused", "load", "hostname", "port", "activities_sent",
                 "activities_received", "map_gen", "was_parent")

    def __init__(self, initiator, peer_key, start_no, now):
        self.initiator = initiator
        self.peer_key = peer_key  # "host:port" of the peer's listener, once known
        self.start_no = start_no  # history number when the link came up
        self.opened_at = now  # monotonic
        self.heard_at = now  # monotonic: when the peer last sent an activity (or the link opened)
        self.since = time.time()  # wall clock, for people
        self.asked = False
        self.live = False
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
        caught up. Later ones only update the load."""
        first = not self.announced
        self.load, self.hostname, self.port = load, hostname, port
        if self.peer_key is None:
            self.peer_key = f"{hostname}:{port}"
        if not first:
            return []
        steps = self._acceptor_turn()
        if not self.live:
            self.live = True
            steps.append(Step.CATCH_UP)
        return steps

    def peer_asked(self):
        """The peer's ACTIVITY_RETRIEVE: answer it, and forward live from then on."""
        self.live = True
        return (Step.ANSWER,)

    def tick(self, now):
        """The heartbeat's clock. The peer neither asked for history nor announced itself, and
        sent no activity, for ``LIVE_AFTER`` seconds (or ``QUIET_LIMIT`` passed since the link
        came up): finish our half anyway, and send it the whole history, in order, then live
        (rule 4).

        The peer may just be slow (busy, or its opening held up in the network) and ask later.
        Sending it only what arrived since the link came up would put those activities *before*
        the older ones its ACTIVITY_RETRIEVE asks for, and it would drop the older ones as already
        seen. The whole history is a superset it de-duplicates, with nothing out of order. A peer
        that never asks (a test's fake server, say) still gets every activity.

        A peer still sending us activities is not quiet: our own acceptor's ACTIVITY_RETRIEVE
        comes right after its answer to ours, which can take seconds to read on a busy machine
        (20,000 activities); replaying the history to it meanwhile would only double the bytes."""
        if self.live or self.refused:
            return ()
        if now - self.heard_at < LIVE_AFTER and now - self.opened_at < QUIET_LIMIT:
            return ()
        self.live = True
        return (*self._acceptor_turn(), Step.REPLAY)

    def peer_sent_activity(self, now):
        """An ACTIVITY_BROADCAST from the peer: it is busy, not quiet (see ``tick``)."""
        self.activities_received += 1
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
    """The last activity id received from each peer address, across links: what to ask after
    when a link to that address comes up again (guarded by the state lock)."""

    def __init__(self):
        self.marks = {}  # peer_key -> activity id (a durable store writes it: share_peer_marks)

    def heard(self, peer_key, activity_id):
        self.marks[peer_key] = activity_id

    def last_from(self, peer_key):
        return self.marks.get(peer_key, "") if peer_key else ""


def missing_entries(history, after, marks, held=None):
    """History entries a peer lacks, in history order.

    A peer that sends no ``marks`` (another implementation, or one holding none of our ids) gets
    the entries after ``after``, or all of them if that id is unknown. A peer that sends marks
    gets each of our ids above its mark for that id's origin, wherever the id sits in our history,
    and of the foreign ids only those after ``after``. The position of ``after`` is no proof of
    what the peer holds: it is the last id the peer received from our *address*, and if we are a
    restarted process (which may even have received that id from the peer's own answer a moment
    ago) our history is in another order than what the peer was sent, so entries before it can
    be ones the peer never saw. Marks are exact, and they keep what we send per origin gap-free,
    which the peer's de-duplication by per-origin sequence number relies on. ``held`` (origin ->
    runs held above the mark, see ``dedup.peer_lacks``) skips what the peer holds beyond its mark."""
    if not marks:
        return history.after_id(after or None)
    after_no = history.number_of(after) if after else None
    start = 0 if after_no is None else after_no + 1  # foreign ids from here on are sent
    missing = []
    split_id = protocol.split_id
    for entry in history.after_id(None):
        activity_id = entry[1]
        origin, seq = split_id(activity_id)
        mark = marks.get(origin)
        if mark is not None:  # one of ours, from an origin the peer holds some of
            if not seq.isdigit() or int(seq) > mark and (not held or peer_lacks(origin, int(seq), marks, held)):
                missing.append(entry)
        elif entry[0] >= start or protocol.parse_id(activity_id) is not None:
            missing.append(entry)
    return missing
