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
exactly what is missing. A peer that never asks (another implementation, or a test speaking raw
JSON) is caught up from the history position at link-up once it announces itself, or after
``LIVE_AFTER`` seconds.
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
    itself (another implementation, or a script speaking raw JSON): finish our half anyway."""
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
    """History entries a peer lacks: those after ``after`` (all if unknown), less those that its
    ``marks`` say it already holds."""
    entries = history.after_id(after) if after else history.after_id(None)
    if not marks:
        return entries
    missing = []
    for entry in entries:
        parsed = protocol.parse_id(entry[1])
        if parsed is not None and parsed[1] <= marks.get(parsed[0], 0):
            continue
        missing.append(entry)
    return missing
