"""Server links over time: dialling and redialling a remote server, and the heartbeat.

A link we dialled (``-rh/-rp``) is redialled forever after it breaks, waiting 0.1 s, then twice as
long each failed try, up to ``MAX_RETRY_WAIT`` (or the activity interval ``-a``, if shorter), so
a repaired network is in use again within about a second. A link the peer dialled is the peer's
to repair. Every authenticated link carries a heartbeat line ``h`` about every second; a link
silent for ``SILENCE`` seconds is dead (a frozen peer, a cut cable) and is closed.
"""

import logging
import socket
import threading
import time

from . import protocol, recovery
from .connection import Connection, batch

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0
SILENCE = 3.0
FIRST_RETRY = 0.1
MAX_RETRY_WAIT = 1.0  # a healed partition must be noticed within ~2 s; a try a second is cheap
STABLE = 5.0  # a link that lived this long resets the backoff


class Dialer:
    """Keeps one outgoing link to ``host:port`` up for as long as the server runs."""

    def __init__(self, server, host, port, max_wait):
        self.server = server
        self.host = host
        self.port = port
        self.peer_key = f"{host}:{port}"
        self.max_wait = max_wait
        self.thread = threading.Thread(target=self._run, name=f"dial-{self.peer_key}", daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        wait = FIRST_RETRY
        tries = 0
        stopping = self.server.stopping
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
            conn = Connection(sock, self.server.poller, 0, 0, name=self.peer_key)
            self.server.trust_as_server(conn)
            reason = self.server.run_connection(conn, opening=self._open)
            if reason == "authentication failed":
                log.error("server %s refused our secret; not redialling it", self.peer_key)
                return
            if stopping.is_set():
                return
            if time.monotonic() - started >= STABLE:
                wait = FIRST_RETRY
            log.warning("link to server %s broke (%s); redialling in %.1f s", self.peer_key, reason, wait)
            stopping.wait(wait)
            wait = min(wait * 2, self.max_wait)

    def _open(self, conn):
        with batch():
            recovery.open_as_initiator(self.server.state, conn, self.server.secret, self.peer_key)


class Heartbeat:
    """One thread for all links: send ``h``, close silent links, catch up peers that never ask."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        state = self.server.state
        while not self.server.stopping.wait(HEARTBEAT_EVERY):
            now = time.monotonic()
            with state.lock:
                links = list(state.links.items())
            with batch():
                for conn, link in links:
                    if now - conn.last_heard > SILENCE:
                        log.warning("server link %s silent for %.1f s; closing it", conn.name, now - conn.last_heard)
                        conn.close("silent")
                        continue
                    conn.send(protocol.HEARTBEAT)
                    if not link.live and now - link.since >= recovery.LIVE_AFTER:
                        recovery.peer_quiet(state, conn)
