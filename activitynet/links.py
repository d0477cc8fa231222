"""Server links over time: dialling and redialling a remote server, and the heartbeat.

A link we dialled (``-rh/-rp``) is redialled forever after it breaks, waiting 0.1 s, then twice as
long each failed try, up to ``MAX_RETRY_WAIT`` (or the activity interval ``-a``, if shorter), so
a repaired network is in use again within about a second. A link the peer dialled is the peer's
to repair; a peer that refused our secret is not redialled. Every authenticated link carries a
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
FIRST_RETRY = 0.1
MAX_RETRY_WAIT = 1.0  # a healed partition must be noticed within ~2 s; a try a second is cheap
STABLE = 5.0  # a link that lived this long resets the backoff


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
    """Keeps one outgoing link to ``host:port`` up until ``stopping`` is set."""

    def __init__(self, host, port, max_wait, stopping, serve_link):
        self.host = host
        self.port = port
        self.peer_key = f"{host}:{port}"
        self.max_wait = max_wait
        self.serve_link = serve_link
        super().__init__(f"dial-{self.peer_key}", stopping)

    def _run(self):
        wait = FIRST_RETRY
        tries = 0
        stopping = self.stopping
        while not stopping.is_set():
            tries += 1
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5)
            except OSError as exc:
                reason = exc.strerror or str(exc)
            else:
                log.info("connected to server %s (try %d)", self.peer_key, tries, extra={"peer": self.peer_key})
                started = time.monotonic()
                session, reason = self.serve_link(sock, self.peer_key)
                if session is not None:  # it was up (serve_link said so; a failed TLS handshake never is)
                    tries = 0
                    if session.link is not None and session.link.refused:
                        log.error("server %s refused our secret; not redialling it", self.peer_key,
                                  extra={"peer": self.peer_key})
                        return
                    if stopping.is_set():
                        return
                    if time.monotonic() - started >= STABLE:
                        wait = FIRST_RETRY
                    log.warning("link to server %s broke (%s); redialling in %.1f s", self.peer_key, reason,
                                wait, extra={"peer": self.peer_key})
                    stopping.wait(wait)
                    wait = min(wait * 2, self.max_wait)
                    continue
            # A long partition must not flood the log: the first failure, then about one a minute.
            level = logging.WARNING if tries == 1 or tries % 60 == 0 else logging.DEBUG
            log.log(level, "cannot reach server %s (%s, try %d); retrying in %.1f s",
                    self.peer_key, reason, tries, wait, extra={"peer": self.peer_key})
            stopping.wait(wait)
            wait = min(wait * 2, self.max_wait)


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
