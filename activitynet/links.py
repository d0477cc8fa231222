"""Server links over time: dialling and redialling a remote server, and the heartbeat.

Whom a server dials, and when, is the re-attachment rule's (``netmap.Seeker``, asked through the
state): the ``-rh/-rp`` and ``--join`` servers in order at first; a lost parent is redialled for
``netmap.GRACE`` seconds (waits of 0.1 s doubling to 1 s), then the server attaches elsewhere. A
link the peer dialled is the peer's to repair; a peer that refused our secret is not redialled. Every authenticated link carries a
heartbeat line ``h`` about every second; a link silent for ``SILENCE`` seconds is dead (a frozen
peer, a cut cable) and is closed.

Neither holds the ``Server``: the dialler gets a function that serves one dialled socket as a
link until it ends (``serve_link(sock, peer_key) -> (Session or None, why it ended)``; None when
the link never came up, e.g. a TLS handshake the peer refused: that counts as a failed try, logged
like an unreachable peer), the heartbeat gets the state.
"""

import logging
import socket
import threading
import time

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0
SILENCE = 3.0


class _Worker:
    """A daemon thread running ``self._run`` until ``stopping`` is set."""

    def __init__(self, name, stopping):
        self.stopping = stopping
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout):
        if self.thread.ident is not None:  # started
            self.thread.join(timeout)


class Dialer(_Worker):
    """The one thread that dials other servers, whom and when the state's ``netmap.Seeker``
    says (``state.next_dial``): the configured servers at first, a lost parent for ``GRACE``,
    then candidates round after round with bounded backoff, while this server is a root that
    seeks; it serves each dialled socket as a link until it ends. A server attached by any path
    does not dial; a peer that refused our secret is never dialled again."""

    def __init__(self, state, stopping, serve_link):
        self.state = state
        self.serve_link = serve_link
        self._failures = {}  # address -> failed tries in a row (to keep the log short)
        super().__init__("dialler", stopping)

    def _run(self):
        state, stopping = self.state, self.stopping
        while not stopping.is_set():
            dial = state.next_dial(time.monotonic())
            if dial is None:
                stopping.wait(state.dial_wait(time.monotonic()))
                continue
            address, alone = dial
            host, _, port = address.rpartition(":")
            if alone:
                log.debug("dialling server %s alone: refusing other links until it answers", address,
                         extra={"peer": address})
            session = None
            try:
                sock = socket.create_connection((host, int(port)), timeout=5)
            except OSError as exc:
                reason = exc.strerror or str(exc)
            else:
                session, reason = self.serve_link(sock, address)  # None: never up (a failed TLS handshake)
            state.dial_ended(session, time.monotonic())
            if session is None:
                tries = self._failures[address] = self._failures.get(address, 0) + 1
                # A long partition must not flood the log: the first failure, then about one a minute.
                level = logging.WARNING if tries == 1 or tries % 60 == 0 else logging.DEBUG
                log.log(level, "cannot reach server %s (%s, try %d)", address, reason, tries,
                        extra={"peer": address})
                continue
            self._failures.pop(address, None)
            if session.link is not None and session.link.refused:
                log.error("server %s refused our secret; not redialling it", address, extra={"peer": address})
            elif not stopping.is_set():
                log.warning("link to server %s ended (%s)", address, reason, extra={"peer": address})


class Heartbeat(_Worker):
    """One thread for all links: ``state.tick`` (``h``, the recovery clock), then close the
    silent links it names (outside the state lock)."""

    def __init__(self, state, stopping):
        self.state = state
        super().__init__("heartbeat", stopping)

    def _run(self):
        while not self.stopping.wait(HEARTBEAT_EVERY):
            now = time.monotonic()
            for outbox in self.state.tick(now, SILENCE):
                log.warning("server link %s silent for %.1f s; closing it", outbox.name, now - outbox.last_heard,
                            extra={"conn": outbox.name})
                outbox.close("silent")
