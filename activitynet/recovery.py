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
before the link broke, and ``marks`` (our optional extension, ignored by other implementations)
says, per origin server, the highest sequence number already held, so one of our peers sends
exactly what is missing: our ids by the marks alone, since the peer at an address may be a
restarted process whose history is in another order (see ``missing_entries``), and only the
foreign ids by the position of ``after``. A peer that never asks (another implementation, or a
test speaking raw JSON) is caught up once it announces itself or after ``LIVE_AFTER`` seconds
(see ``peer_quiet``).
"""

from . import protocol
from .protocol import encode

LIVE_AFTER = 1.0


def open_as_initiator(state, conn, secret, peer_key):
    """Our half of the routine on a link we dialled."""
    state.link_up(conn, initiator=True, peer_key=peer_key, first=encode(protocol.authenticate(secret)))
    state.send_retrieve(conn, retrieve_request)
    state.send_users(conn)
    state.send_announce(conn)


def open_as_acceptor(state, conn):
    """Right after a peer's AUTHENTICATE succeeded. Our ACTIVITY_RETRIEVE and SERVER_ANNOUNCE
    follow its SERVER_ANNOUNCE (``peer_announced``), when we know which peer it is."""
    state.link_up(conn, initiator=False)
    state.send_users(conn)


def peer_announced(state, conn, first):
    """A SERVER_ANNOUNCE arrived on ``conn``; ``first`` is True for the link's first one."""
    if first:
        _acceptor_turn(state, conn)
    state.go_live(conn)


def peer_quiet(state, conn):
    """``LIVE_AFTER`` seconds passed and the peer neither asked for history nor announced
    itself (another implementation, or a script speaking raw JSON): finish our half anyway.

    On a link we dialled, the peer may just be slow (busy, or a slow network) and ask later.
    Sending it only what arrived since the link came up would put those activities *before* the
    older ones its ACTIVITY_RETRIEVE asks for, and it would drop the older ones as already seen
    (de-duplication by per-origin sequence number). So it gets the whole history, in order: a
    superset it de-duplicates, with nothing out of order. A peer that never asks (a test's fake
    server, say) still gets every activity."""
    if conn.link.initiator:
        state.go_live(conn, whole_history=True)
        return
    _acceptor_turn(state, conn)
    state.go_live(conn)


def _acceptor_turn(state, conn):
    """The acceptor's ACTIVITY_RETRIEVE and SERVER_ANNOUNCE, once per link."""
    if not conn.link.initiator and state.send_retrieve(conn, retrieve_request):
        state.send_announce(conn)


def answer_retrieve(state, conn, after, marks):
    state.answer_retrieve(conn, lambda history: missing_entries(history, after, marks))


def retrieve_request(state, link):
    """Our ACTIVITY_RETRIEVE for ``link`` (called under the state lock)."""
    after = state.last_from.get(link.peer_key, "") if link.peer_key else ""
    return protocol.activity_retrieve(after, dict(state.high))


def missing_entries(history, after, marks):
    """History entries a peer lacks, in history order.

    A peer that sends no ``marks`` (another implementation, or one holding none of our ids) gets
    the entries after ``after``, or all of them if that id is unknown. A peer that sends marks
    gets each of our ids above its mark for that id's origin, wherever the id sits in our history,
    and of the foreign ids only those after ``after``. The position of ``after`` is no proof of
    what the peer holds: it is the last id the peer received from our *address*, and if we are a
    restarted process (which may even have received that id from the peer's own answer a moment
    ago) our history is in another order than what the peer was sent, so entries before it can
    be ones the peer never saw. Marks are exact, and they keep what we send per origin gap-free,
    which the peer's de-duplication by per-origin sequence number relies on."""
    if not marks:
        return history.after_id(after or None)
    after_no = history.number_of(after) if after else None
    start = 0 if after_no is None else after_no + 1  # foreign ids from here on are sent
    missing = []
    for entry in history.after_id(None):
        activity_id = entry[1]
        origin, _, rest = activity_id.partition(":")  # cheaper than parse_id, for a whole history
        mark = marks.get(origin)
        if mark is not None:  # one of ours, from an origin the peer holds some of
            seq = rest.partition(":")[0]
            if not (seq.isdigit() and int(seq) <= mark):
                missing.append(entry)
        elif entry[0] >= start or protocol.parse_id(activity_id) is not None:
            missing.append(entry)
    return missing
