"""Server links over time: dialling and redialling a remote server, and the heartbeat.

A link we dialled (``-rh/-rp``) is redialled forever after it breaks, waiting 0.1 s, then twice as
long each failed try, up to ``MAX_RETRY_WAIT`` (or the activity interval ``-a``, if shorter), so
a repaired network is in use again within about a second. A link the peer dialled is the peer's
to repair; a peer that refused our secret is not redialled. Every authenticated link carries a
heartbeat line ``h`` about every second; a link silent for ``SILENCE`` seconds is dead (a frozen
peer, a cut cable) and is closed.

Neither holds the ``Server``: the dialler gets a function that serves one dialled socket as a
link until it ends (``serve_link(sock, peer_key) -> Session``), the heartbeat gets the state.
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


class Dialer:
    """Keeps one outgoing link to ``host:port`` up until ``stopping`` is set."""

    def __init__(self, host, port, max_wait, stopping, serve_link):
        self.host = host
        self.port = port
        self.peer_key = f"{host}:{port}"
        self.max_wait = max_wait
        self.stopping = stopping
        self.serve_link = serve_link
        self.thread = threading.Thread(target=self._run, name=f"dial-{self.peer_key}", daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout):
        if self.thread.ident is not None:  # started
            self.thread.join(timeout)

    def _run(self):
        wait = FIRST_RETRY
        tries = 0
        stopping = self.stopping
        while not stopping.is_set():
            tries += 1
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5)
            except OSError as exc:
                # A long partition must not flood the log: the first failure, then about one a minute.
                level = logging.WARNING if tries == 1 or tries % 60 == 0 else logging.DEBUG
                log.log(level, "cannot reach server %s (%s, try %d); retrying in %.1f s",
                        self.peer_key, exc.strerror or exc, tries, wait)
                stopping.wait(wait)
                wait = min(wait * 2, self.max_wait)
                continue
            log.info("connected to server %s (try %d)", self.peer_key, tries)
            tries = 0
            started = time.monotonic()
            session, reason = self.serve_link(sock, self.peer_key)
            if session is not None and session.link is not None and session.link.refused:
                log.error("server %s refused our secret; not redialling it", self.peer_key)
                return
            if stopping.is_set():
                return
            if time.monotonic() - started >= STABLE:
                wait = FIRST_RETRY
            log.warning("link to server %s broke (%s); redialling in %.1f s", self.peer_key, reason, wait)
            stopping.wait(wait)
            wait = min(wait * 2, self.max_wait)


class Heartbeat:
    """One thread for all links: ``state.tick`` (``h``, the recovery clock), then close the
    silent links it names (outside the state lock)."""

    def __init__(self, state, stopping):
        self.state = state
        self.stopping = stopping
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout):
        if self.thread.ident is not None:  # started
            self.thread.join(timeout)

    def _run(self):
        while not self.stopping.wait(HEARTBEAT_EVERY):
            now = time.monotonic()
            for outbox in self.state.tick(now, SILENCE):
                log.warning("server link %s silent for %.1f s; closing it", outbox.name, now - outbox.last_heard)
                outbox.close("silent")
