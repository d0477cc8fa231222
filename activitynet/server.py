"""activitynet server: relays activities between clients over a network of servers.

Usage:
  activitynet.server [options]

Run it as "python -m activitynet.server". Project 1 example: -lp 3781 -rh localhost -rp 3780 -s abc

Options (the Project 1 flag in brackets):
  --local-port=PORT         [-lp] port to listen on; 0 picks a free one [default: 3780]
  --local-host=HOST         [-lh] hostname other servers and redirected clients use to reach
                            this one (default: this machine's address)
  --remote-host=HOST        [-rh] a server of the network to join (default: start alone)
  --remote-port=PORT        [-rp] its port [default: 3780]
  --join=HOST:PORT,...      more servers of the network to join, tried in order after -rh/-rp;
                            the network heals itself when servers die (README: re-attachment)
  --grace=SECONDS           how long a lost parent is redialled before this server attaches
                            elsewhere (a settled root left alone waits twice as long) [default: 2]
  --secret=SECRET           [-s] the servers' shared secret (default: generate and print one)
  --activity-interval=MS    [-a] activity interval in ms (accepted for Project 1; a lost
                            parent is redialled at least once a second) [default: 5000]
  --bind=ADDRESS            address to listen on [default: 0.0.0.0]
  --history=N               activities kept for partition recovery [default: 100000]
  --data-dir=DIR            keep users, blocked names, this server's identity and the
                            activity history in DIR, across restarts (default: in memory
                            only; every start is a fresh server)
  --disk-history=N          activities kept in --data-dir for recovery [default: 1000000]
  --max-line=BYTES          longest line accepted from a client [default: 1048576]
  --max-outbox=BYTES        unsent bytes past which a client is watched: it is disconnected
                            if it reads under 1 MB/s, or at 4x this [default: 16777216]
  --login-timeout=SECONDS   close a connection that has not logged in, registered or
                            authenticated this long after connecting; 0: never [default: 30]
  --max-connections=N       most connections open at once (default: the open-files limit
                            less 128, said at start)
  --max-pending-per-address=N  connections from one address not logged in yet [default: 2048]
  --rate-limit=N            activities a second per client connection once its burst is
                            spent; reads pause, nothing is dropped; 0: off [default: 500]
  --rate-burst=N            activities a client may send at once; 0: off [default: 1000]
  --tls-cert=FILE           this server's certificate (PEM); with --tls-key and --tls-ca,
                            links it dials use TLS and its port also accepts TLS
  --tls-key=FILE            the certificate's unencrypted private key (PEM)
  --tls-ca=FILE             the CA certificate(s) peers' certificates must come from
  --tls-required            refuse AUTHENTICATE over plain TCP (needs the --tls-* files)
  --log-level=LEVEL         debug, info, warning or error [default: info]
  --log-format=FORMAT       text (for people) or json (one object per line) [default: text]
  --monitor-port=PORT       serve the monitoring pages (/varz, /metrics, the live map ...)
                            on this port; 0 picks a free one (default: no monitor)
  --monitor-bind=ADDRESS    address the monitor listens on [default: 127.0.0.1]
  -h --help                 show this text

Design: a blocking accept loop hands each connection to a spawner thread, which starts one
thread per connection (see ``_spawn``); all shared state is in one ``State`` behind one lock;
writes go through each connection's outbox (see ``connection``). The heartbeat and the
dialler run in threads of their own (``links``), and so does the monitor (``monitor``), which
reads the server through a ``MonitorView``.

Limits (issue 11; the reasons for each default are in ``limits``). The accept loop admits a
connection (``--max-connections``, ``--max-pending-per-address``) before it costs a thread; one
refused gets an INVALID_MESSAGE and is closed. Every accepted connection has a login deadline,
kept by one thread for all (``--login-timeout``, counted from accept). A client's reader spends
tokens of its ``TokenBucket`` for each line and, when the bucket is empty, stops reading for a
while: the flooder's own TCP buffers fill and it stalls, nothing is dropped or reordered, and
nobody else waits (``--rate-limit``, ``--rate-burst``; server links are exempt). A failed LOGIN
or AUTHENTICATE reply is delayed by the failing connection's own thread (``handlers``). Each
limit that bites is logged once a minute per address (``LimitLog``), not once per message.

TLS: with ``--tls-cert/--tls-key/--tls-ca`` the dialler speaks TLS and checks the peer against
the CA; the listening port serves plain and TLS connections, told apart by their first byte
(``tls.sniff``, in the connection's own thread).
"""

import contextlib
import ctypes
import dataclasses
import itertools
import logging
import queue
import resource
import secrets
import signal
import socket
import sys
import threading
import time

from . import __version__, cli, handlers, limits, logs, schemas, stats, tls
from .connection import Connection, LineTooLong, PlainTransport, Poller
from .limits import Admission, Deadlines, LimitLog, LoginThrottle, Refused, TokenBucket, activity_cost
from .links import Dialer, Heartbeat
from .monitor import Monitor
from .protocol import HEARTBEAT_LINE, InvalidMessage, ProtocolError, encode
from .session import CLIENT, NEW, SERVER
from .state import State
from .store import Store, StoreError

log = logging.getLogger("activitynet.server" if __name__ == "__main__" else __name__)

ALIASES = {"-lp": "--local-port", "-lh": "--local-host", "-rh": "--remote-host",
           "-rp": "--remote-port", "-s": "--secret", "-a": "--activity-interval"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LISTEN_BACKLOG = 4096
THREAD_STACK = 256 * 1024  # thousands of reader threads; our call depth is shallow
# Every thread waiting for the GIL wakes once per switch interval. With 10,000 reader threads
# woken at once (a mass disconnect), the default 5 ms made the wake-ups themselves the work:
# 10,000 clients leaving took 15-30 s and 25-50 s of CPU; at 0.1 s it takes under 2 s. Our
# threads block on I/O long before any interval ends, so steady-state latency is unchanged
# (see BENCHMARKS.rst).
SWITCH_INTERVAL = 0.1
# Authenticated servers are trusted with bigger lines and outboxes: a SYNC_USER is queued at once
# (a link's backlog is streamed with backpressure: ``State.catch_up``).
SERVER_MAX_LINE = 64 * 1024 * 1024
SERVER_MAX_OUTBOX = 1024 * 1024 * 1024
# A reader thread holds the state lock for this many lines of a batch at most (about 0.2 ms of
# work): fewer lock round trips and outbox appends, a bounded wait for everyone else.
LINES_PER_HOLD = 64
# A client in debt to its bucket reads on until the debt is worth this many seconds, then sleeps
# it all at once: 20 short sleeps a second instead of one per line, the same rate on average.
MIN_PAUSE = 0.05
# A refused connection is sent its INVALID_MESSAGE and a FIN, and closed this much later: closed
# at once with the peer's LOGIN unread, the kernel would send a RST that can destroy the reply
# before the peer reads it. At most REFUSED_LINGERING wait (their descriptors come out of the
# limits.FD_RESERVE), past that they are closed at once.
REFUSED_LINGER = 1.0
REFUSED_LINGERING = 64
TLS_HANDSHAKE_TIMEOUT = 10.0  # for links we dial (an accepted one has its login deadline)
# glibc keeps memory freed by thousands of ended connection threads instead of returning it: 2,000
# silent connections left RSS 3-7 MB higher after each round while Python's own allocations
# (tracemalloc) stayed flat, and malloc_trim gave it back. So every TRIM_EVERY closed connections
# the thread closing the last one calls malloc_trim (a few milliseconds; a no-op elsewhere).
TRIM_EVERY = 1000


@dataclasses.dataclass
class Settings:
    local_port: int = 3780
    local_host: str = "127.0.0.1"
    remote_host: str | None = None
    remote_port: int = 3780
    joins: list = dataclasses.field(default_factory=list)  # --join: [(host, port)], after -rh/-rp
    grace: float = 2.0
    secret: str | None = None
    activity_interval: int = 5000
    bind: str = "0.0.0.0"
    history: int = 100_000
    max_line: int = 1024 * 1024
    max_outbox: int = 16 * 1024 * 1024
    server_max_line: int = SERVER_MAX_LINE
    server_max_outbox: int = SERVER_MAX_OUTBOX
    login_timeout: float = limits.DEFAULT_LOGIN_TIMEOUT  # 0: no deadline
    max_connections: int | None = None  # None: from the open-files limit (default_max_connections)
    max_pending_per_address: int = limits.DEFAULT_MAX_PENDING_PER_ADDRESS
    rate_limit: float = limits.DEFAULT_RATE  # 0: no flood control
    rate_burst: int = limits.DEFAULT_BURST
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_required: bool = False
    log_level: str = "info"
    log_format: str = "text"
    monitor_port: int | None = None  # None: no monitor
    monitor_bind: str = "127.0.0.1"
    data_dir: str | None = None
    disk_history: int = 1_000_000


# Settings never shown by the monitor (/varz lists the others).
SECRET_SETTINGS = frozenset({"secret"})


class StartError(Exception):
    """The server cannot start (a port is taken, say); the message says which and why."""


class Arrival:
    """An accepted connection until it ends: its admission ticket, and what its login deadline
    acts on. ``expire`` runs on the deadlines thread and must not block."""

    __slots__ = ("sock", "ticket", "conn", "expired", "_lock")

    def __init__(self, sock, ticket):
        self.sock = sock  # the accepted socket; the TLS socket once the handshake starts
        self.ticket = ticket
        self.conn = None
        self.expired = False
        self._lock = threading.Lock()  # guards sock, conn and expired

    def wrapped(self, ssl_sock):
        with self._lock:
            self.sock = ssl_sock

    def attach(self, conn):
        """The connection is made; False if the deadline passed first (it has been ended)."""
        with self._lock:
            self.conn = conn
            return not self.expired

    def expire(self, line, reason):
        with self._lock:
            self.expired = True
            conn, sock = self.conn, self.sock
        if conn is not None:
            conn.send_last(line, reason)
            return
        # Still sniffing or in the TLS handshake: tell a plain peer why, and wake that thread
        # (socket.socket's shutdown: an SSLSocket's own would unwrap it under the handshake).
        if not isinstance(sock, tls.ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.send(line, socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Server:
    """One activitynet server: ``serve_forever`` until ``shutdown``, then ``server_close``.

    As in ``socketserver``: ``shutdown`` asks ``serve_forever`` to stop and waits until it has
    returned (so it must be called from another thread; a signal handler in the serving thread
    calls ``request_shutdown`` instead), and ``server_close`` releases the listener and joins
    the threads the server started, each with a timeout."""

    JOIN_TIMEOUT = 5.0

    def __init__(self, settings):
        self.settings = settings
        self.secret = settings.secret or generate_secret()
        self.started_at = time.time()
        self.stopping = threading.Event()
        self._stopped = threading.Event()  # set while serve_forever is not running
        self._stopped.set()
        self.counters = stats.Counters()
        # Plug-in points for the monitor: callables returning what is wrong (a string) or None
        # (a durable store's status, say), and the network map (see ``MonitorView``).
        self.health_checks = []
        self.network_map = None  # set to the state's once it exists (``_listen``)
        # StoreError for a bad data directory (locked, not ours, newer): before the listener
        opening = time.perf_counter()
        self.store = Store.open(settings.data_dir, settings.disk_history) if settings.data_dir else None
        try:
            self._listen(settings)
        except BaseException:
            if self.store is not None:
                self.store.close()
            raise
        if self.store is not None:
            snapshot = self.state.snapshot()
            log.info("data store %s: %d users, %d blocked names, %d activities in memory, origin %s; "
                     "loaded in %.3f s", self.store.path, snapshot["users"], snapshot["blocked"],
                     snapshot["history"]["entries"], self.state.origin, time.perf_counter() - opening)
            self.health_checks.append(self._store_problem)
        self.poller = Poller()
        self.context = handlers.Context(self.state, self.secret, self._trust_as_server,
                                        throttle=LoginThrottle(), tls_required=settings.tls_required)
        self._departures = itertools.count()  # accepted connections ended (next() is atomic)
        self._conns_lock = threading.Lock()  # guards _conns
        self._conns = {}  # open Connection -> the thread serving it
        self._catch_ups = set()  # the links' catch-up threads running (guarded by _conns_lock)
        self._arrivals = queue.SimpleQueue()  # accepted, waiting for their thread; None: stop
        self._threads = [Heartbeat(self.state, self.stopping), _Thread(self._spawn, "spawner"),
                         Dialer(self.state, self.stopping, self.serve_link)]

    def _listen(self, settings):
        """The listener, the state (from the store, if any), TLS, limits and the monitor."""
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((settings.bind, settings.local_port))
        except OSError as exc:
            self.listener.close()
            raise StartError(f"cannot listen on {settings.bind}:{settings.local_port}: "
                             f"{exc.strerror or exc}") from exc
        self.listener.listen(LISTEN_BACKLOG)
        self.port = self.listener.getsockname()[1]
        joins = ([(settings.remote_host, settings.remote_port)] if settings.remote_host else []) + settings.joins
        try:
            self.state = State(settings.local_host, self.port, history_size=settings.history,
                               counters=self.counters, store=self.store, catch_up_runner=self._start_catch_up,
                               joins=[f"{host}:{port}" for host, port in joins], grace=settings.grace)
        except BaseException:
            self.listener.close()
            raise
        self.tls_server = self.tls_client = None
        if settings.tls_cert:
            try:
                self.tls_server, self.tls_client = tls.check_files(settings.tls_cert, settings.tls_key,
                                                                   settings.tls_ca)
            except tls.TlsConfigError:
                self.listener.close()
                raise
        self.max_connections = settings.max_connections or limits.default_max_connections(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.admission = Admission(self.max_connections, settings.max_pending_per_address)
        self.deadlines = Deadlines(self._login_overdue, name="login-deadlines")
        self.lingering = Deadlines(_close_quietly, name="refused-closer")
        self.limit_log = LimitLog()
        self.monitor = None
        if settings.monitor_port is not None:
            try:
                self.monitor = Monitor(MonitorView(self), settings.monitor_bind, settings.monitor_port)
            except OSError as exc:
                self.listener.close()
                raise StartError(f"cannot listen for the monitor on {settings.monitor_bind}:"
                                 f"{settings.monitor_port}: {exc.strerror or exc}") from exc
            self.state.set_monitor(f"{settings.local_host}:{self.monitor.address[1]}")  # in our map entry
        self.network_map = self.state.network  # issue 9's map, for the monitor's /networkz

    @property
    def address(self):
        return self.settings.local_host, self.port

    def _store_problem(self):
        """The monitor's health check (``health_checks``): the store's error while it fails."""
        status = self.store.status()
        return f"data store {status['path']} cannot write: {status['error']}" if status["failing"] else None

    def store_status(self):
        """The data store's ``status()`` (plain data; ``failing`` is True while the disk refuses
        writes: the server still relays), or None without --data-dir. For health checks."""
        return None if self.store is None else self.store.status()

    def serve_forever(self):
        self._stopped.clear()
        try:
            self._accept_loop()
        finally:
            self._stopped.set()

    def _accept_loop(self):
        if self.monitor is not None:
            self.monitor.start()  # logs "monitor on http://host:port/" before we say we listen
        for thread in self._threads:
            thread.start()
        self.deadlines.start()
        self.lingering.start()
        # Said once every thread runs: a script that waits for this line sees the server whole
        # (the benchmarks count its idle threads from here).
        log.info("listening on %s:%d (announced as %s:%d); %s", self.settings.bind, self.port,
                 *self.address, self._limits_said())
        login_timeout = self.settings.login_timeout
        while not self.stopping.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                log.exception("accept failed")  # e.g. out of file descriptors; keep serving
                self.stopping.wait(0.05)
                continue
            self.counters.connections_accepted += 1  # only this thread bumps it
            try:
                ticket = self.admission.admit(address[0])
            except Refused as exc:
                self._refuse(sock, address, str(exc))
                continue
            arrival = Arrival(sock, ticket)
            if login_timeout:
                self.deadlines.add(arrival, time.monotonic() + login_timeout, arrival)
            self._arrivals.put(arrival)

    def _spawn(self):
        """The spawner thread: one connection thread per arrival. Starting a thread waits until
        it runs (a few hundred microseconds, more on a busy machine); done here rather than in
        the accept loop, a burst of connections is accepted, and its deadlines counted, as it
        comes, not as fast as threads can be started."""
        number = 0
        while True:
            arrival = self._arrivals.get()
            if arrival is None or self.stopping.is_set():
                break
            number += 1
            served = None
            try:
                if self.tls_server is None:
                    # Plain only: the connection and its session are made here, and the thread
                    # runs _serve itself: one frame less on each of thousands of reader threads'
                    # stacks is a page of memory each (about 4 KiB a client, measured with 2,000
                    # idle clients). With TLS the thread first reads the first byte (_serve_tls).
                    served = self._open(arrival, PlainTransport(arrival.sock))
                    if served is None:
                        continue
                    target, args = self._serve, served
                else:
                    target, args = self._serve_tls, (arrival,)
                threading.Thread(target=target, args=args, name=f"conn-{number}", daemon=True).start()
            except Exception:  # e.g. no thread could be started; one connection, not the server
                log.exception("cannot serve a new connection")
                if served is not None:
                    conn, session, _arrival = served
                    conn.close("no thread")
                    self.state.close_session(session)
                    with self._conns_lock:
                        self._conns.pop(conn, None)
                self._departed(arrival)
                _close_quietly(arrival.sock)
        while arrival is not None:  # stopping: the ones never started are closed here
            self._departed(arrival)
            _close_quietly(arrival.sock)
            arrival = self._arrivals.get()

    def _limits_said(self):
        """The start-up line's account of the limits (README.rst, "Limits")."""
        s = self.settings
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        said = [f"at most {self.max_connections} connections"
                + ("" if s.max_connections else f" (open-files limit {soft} less {limits.FD_RESERVE})"),
                f"{s.max_pending_per_address} not logged in per address",
                f"login within {s.login_timeout:g} s" if s.login_timeout else "no login deadline",
                f"{s.rate_limit:g} activities/s per client after a burst of {s.rate_burst}"
                if s.rate_limit and s.rate_burst else "no flood control"]
        if self.tls_server is not None:
            said.append("TLS on links" + (", required for AUTHENTICATE" if s.tls_required else ""))
        return ", ".join(said)

    def _refuse(self, sock, address, info):
        """Past a connection limit: INVALID_MESSAGE, FIN, and the close a little later (see
        REFUSED_LINGER). Never blocks the accept loop."""
        self.state.count_invalid("too_many_connections")
        with contextlib.suppress(OSError):
            sock.send(encode(InvalidMessage(info).reply()), socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
        self._limit_bit("refused", address[0], "refused a connection from %s:%d: %s", *address[:2], info)
        if len(self.lingering) >= REFUSED_LINGERING:
            sock.close()
        else:
            self.lingering.add(sock, time.monotonic() + REFUSED_LINGER, sock)

    def _login_overdue(self, arrival):
        """The deadlines thread: ``arrival`` did not log in within --login-timeout."""
        timeout = self.settings.login_timeout
        info = (f"no LOGIN, REGISTER or AUTHENTICATE within {timeout:g} s of connecting "
                "(--login-timeout); closing the connection")
        host, port = _peer_of(arrival.sock)
        self.state.count_invalid("login_timeout")
        self._limit_bit("deadline", host, "closing %s:%s: not logged in within %g s", host, port, timeout)
        arrival.expire(encode(InvalidMessage(info).reply()), f"not logged in within {timeout:g} s")

    def _limit_bit(self, limit, host, message, *args):
        """Log that a limit bit for ``host``: once a minute per limit and address."""
        quiet = self.limit_log.bite((limit, host))
        if quiet is not None:
            log.warning(message + (f" ({quiet} more like it from this address since the last line)"
                                   if quiet else ""), *args)

    def _departed(self, arrival):
        """An accepted connection ended: its deadline and its place in the counts go."""
        self.deadlines.cancel(arrival)
        arrival.ticket.release()
        if next(self._departures) % TRIM_EVERY == TRIM_EVERY - 1:
            release_free_memory()

    def _logged_in(self, arrival):
        """It logged in, registered or authenticated: no deadline, no longer pending."""
        self.deadlines.cancel(arrival)
        arrival.ticket.settle()

    def _open(self, arrival, transport):
        """The Connection and Session of an accepted ``arrival`` over ``transport``, for _serve;
        None (and closed) when the server is stopping."""
        conn = Connection(transport, self.poller, self.state.outgoing,
                          self.settings.max_line, self.settings.max_outbox)
        if not arrival.attach(conn):  # overdue before it was even set up
            conn.close("not logged in in time")
        if not self._track(conn):
            self._departed(arrival)
            return None
        session = self.state.open_session(conn, conn.name, secure=not isinstance(transport, PlainTransport))
        if self.settings.rate_limit and self.settings.rate_burst:
            session.bucket = TokenBucket(self.settings.rate_limit, self.settings.rate_burst)
        return conn, session, arrival

    def _serve_tls(self, arrival):
        """A connection thread when TLS is on: plain or TLS by the first byte, then _serve."""
        try:
            transport = self._open_transport(arrival)
        except Exception:
            log.exception("error opening a connection; closing it")
            transport = None
        if transport is None:
            self._departed(arrival)
            return
        served = self._open(arrival, transport)
        if served is not None:
            self._serve(*served)

    def _open_transport(self, arrival):
        """Plain or TLS as the first byte says; None when the peer went away, sent nothing
        before its deadline, or failed the handshake."""
        sock = arrival.sock
        kind = tls.sniff(sock, None)  # the login deadline ends a silent peer
        if kind == "plain":
            return PlainTransport(sock)
        if kind != "tls":
            sock.close()
            return None
        host, port = _peer_of(sock)
        try:
            return tls.TlsTransport.accept(sock, self.tls_server, None, on_wrapped=arrival.wrapped)
        except tls.TlsHandshakeError as exc:
            if not arrival.expired:
                self._limit_bit("tls", host, "TLS connection from %s:%s refused: %s", host, port, exc)
            return None

    def serve_link(self, sock, peer_key):
        """Serve a socket we dialled to ``peer_key`` as a server link until it ends (the
        dialler's thread); returns (its Session or None, why it ended)."""
        secure = self.tls_client is not None
        if secure:
            try:
                transport = tls.TlsTransport.connect(sock, self.tls_client, peer_key.rsplit(":", 1)[0],
                                                     TLS_HANDSHAKE_TIMEOUT)
            except tls.TlsHandshakeError as exc:
                return None, str(exc)
        else:
            transport = PlainTransport(sock)
        log.info("connected to server %s%s", peer_key, f" over {transport.version}" if secure else "")
        conn = Connection(transport, self.poller, self.state.outgoing,
                          self.settings.server_max_line, self.settings.server_max_outbox, name=peer_key)
        ticket = self.admission.admit(peer_key, dialled=True)
        try:
            if not self._track(conn):
                return None, conn.close_reason
            session = self.state.open_session(conn, conn.name, secure=secure)
            self.state.dial_link(session, peer_key, self.secret)
            return session, self._serve(conn, session)
        finally:
            ticket.release()

    def _track(self, conn):
        """Register ``conn`` so that ``shutdown`` closes it; False (and closed) when stopping."""
        with self._conns_lock:
            if self.stopping.is_set():
                conn.close("server stopping")
                return False
            self._conns[conn] = None  # its thread, once _serve runs
            return True

    def _serve(self, conn, session, arrival=None):
        """Read and handle ``conn`` until it ends; returns why it ended. ``arrival``: an
        accepted connection's deadline and admission ticket (None for a link we dialled)."""
        ending = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = threading.current_thread()
        try:
            for lines in conn.batches():
                ending = self._handle_batch(session, lines, arrival)
                if ending is not None:
                    break
        except LineTooLong as exc:
            ending = self._send_held(session) or _ending_for(InvalidMessage(
                f"line of {exc.args[0]} bytes or more is longer than the limit of {conn.max_line} bytes",
                kind="line_too_long"))
            self.state.count_invalid("line_too_long")
        except Exception:
            log.exception("error serving %s; closing it", conn.name, extra={"conn": conn.name})
            conn.close("internal error")
        finally:
            if ending is not None:
                data, reason, delay = ending
                log.info("closing %s: %s", conn.name, reason, extra={"conn": conn.name})
                if delay:  # a guessed secret: this thread waits, nobody else does
                    self._limit_bit("guessing", _host(conn.name), "repeated failed logins from %s: "
                                    "the failure reply waits %.2f s", conn.name, delay)
                    self.stopping.wait(delay)
                conn.finish(data, reason) if data else conn.close(reason)
            conn.close("peer closed")
            self.state.close_session(session)
            if arrival is not None:
                self._departed(arrival)
            with self._conns_lock:
                self._conns.pop(conn, None)
        return conn.close_reason

    def _handle_batch(self, session, lines, arrival):
        """Handle the lines of one read, pausing for the client's bucket between them; returns
        (last bytes, reason, delay) once the connection must end."""
        start = 0
        while start < len(lines):
            with self.state.outgoing:  # one flush per peer for the lines handled before a pause
                ending, start, pause = self._handle_lines(session, lines, start, arrival)
            if ending is not None:
                return ending
            if pause:
                if session.bucket.paused == 1:  # its first pause: one more rate-limited client
                    self.state.count_rate_limited()
                self._limit_bit("rate", _host(session.address), "client %s sends faster than "
                                "--rate-limit %g/s (burst %d): pausing its reads, nothing is dropped",
                                session.address, self.settings.rate_limit, self.settings.rate_burst)
                self.stopping.wait(pause)
        return None

    def _handle_lines(self, session, lines, start, arrival):
        """Handle ``lines[start:]``; returns (ending or None, where to go on, seconds to pause):
        stops early once the client's bucket says to pause. The state lock is taken once per
        LINES_PER_HOLD lines, not once per line; the pause is the caller's, never under it.
        A logged-in client's or a link's run of activities goes to the state as one
        (``_handle_activities``); a line alone goes the usual way, a few microseconds faster."""
        bucket = session.bucket
        index = start
        result = None
        while index < len(lines) and result is None:
            end = min(index + LINES_PER_HOLD, len(lines))
            if end - index > 1 and session.held is None and (arrival is None or not arrival.ticket.pending):
                taken, result = self._handle_activities(session, lines, index, end, bucket)
                if taken != index:
                    index = taken
                    continue
            if _outside_the_hold(session, lines[index]):
                result = self._handle_line(session, lines, index, arrival, bucket)
                index += 1
                continue
            with self.state.batch():
                while index < end and result is None and not _outside_the_hold(session, lines[index]):
                    result = self._handle_line(session, lines, index, arrival, bucket)
                    index += 1
        ending, index, wait = result or (None, len(lines), 0.0)
        if session.held:  # replies waiting for a commit: out before the flush or the last reply
            ending = self._send_held(session) or ending
        return ending, index, wait

    def _handle_activities(self, session, lines, index, end, bucket):
        """``lines[index:end]`` in one call to the state, when they are all activities a
        client (ACTIVITY_MESSAGE) or a link (ACTIVITY_BROADCAST, heartbeats between them) sends,
        each flat (``schemas.decode_activities``): the traffic of a busy connection, handled as
        each line would be, for a fraction of the cost. Returns (where to go on, None or what
        ``_handle_lines`` returns); (``index``, None) when the lines are anything else."""
        chunk = lines[index:end]
        if session.role == SERVER:
            if HEARTBEAT_LINE in chunk:
                chunk = [line for line in chunk if line != HEARTBEAT_LINE]
                if not chunk:
                    session.messages_in += end - index
                    return end, None
            messages = schemas.decode_activities(chunk, "ACTIVITY_BROADCAST")
            if messages is None or any(map(bytes.__contains__, chunk, itertools.repeat(b"\r"))):
                return index, None  # a "\r" is not relayed as received
            session.messages_in += end - index
            self.state.server_activities(session, messages, chunk)
            return end, None
        if session.role != CLIENT:
            return index, None
        messages = schemas.decode_activities(chunk, "ACTIVITY_MESSAGE")
        if messages is None:
            return index, None
        result = None
        if bucket is not None:
            for count, line in enumerate(chunk, 1):
                wait = bucket.take(activity_cost(len(line)))
                if wait >= MIN_PAUSE:  # these lines, then the pause (as ``_handle_line`` would)
                    end = index + count
                    messages = messages[:count]
                    result = None, end, wait
                    break
        session.messages_in += end - index
        try:
            self.state.client_activities(session, messages)
        except (ProtocolError, handlers.Goodbye) as exc:
            if isinstance(exc, InvalidMessage):
                self.state.count_invalid(exc.kind)
            return end, (_ending_for(exc), len(lines), 0.0)
        return end, result

    def _handle_line(self, session, lines, index, arrival, bucket):
        """Handle ``lines[index]``; None to go on, else what ``_handle_lines`` returns."""
        line = lines[index]
        session.messages_in += 1
        try:
            handlers.dispatch_line(self.context, session, line)
        except (ProtocolError, handlers.Goodbye) as exc:
            if isinstance(exc, InvalidMessage):
                self.state.count_invalid(exc.kind)
            return _ending_for(exc), len(lines), 0.0
        if arrival is not None and arrival.ticket.pending and session.role != NEW:
            self._logged_in(arrival)
        if bucket is not None and session.role != SERVER:  # server links are exempt
            wait = bucket.take(activity_cost(len(line)))
            if wait >= MIN_PAUSE:
                return None, index + 1, wait
        return None

    def _send_held(self, session):
        """Replies held for a commit go out before the batch's flush or the last reply
        (``State.send_held``); returns an ending if one could not be committed."""
        try:
            self.state.send_held(session)
        except ProtocolError as exc:
            return _ending_for(exc)
        return None

    def _start_catch_up(self, session):
        """A link's backlog is streamed by a thread of its own (``State.catch_up``): it reads
        the disk and waits for the outbox to drain between chunks, which neither the link's
        reader (the peer's messages must keep being read: two servers waiting on each other's
        drain would deadlock) nor the heartbeat (every link's clock) may do."""
        thread = threading.Thread(target=self._catch_up, args=(session,), name=f"catch-up-{session.address}",
                                  daemon=True)
        with self._conns_lock:
            self._catch_ups.add(thread)
        thread.start()

    def _catch_up(self, session):
        try:
            self.state.catch_up(session)
        except Exception:
            log.exception("catching up %s failed; closing it", session.address, extra={"conn": session.address})
            session.outbox.close("internal error")
        finally:
            with self._conns_lock:
                self._catch_ups.discard(threading.current_thread())

    def _trust_as_server(self, session):
        """Give an authenticated server link the larger limits servers are trusted with."""
        session.outbox.max_line = self.settings.server_max_line
        session.outbox.max_outbox = self.settings.server_max_outbox

    def request_shutdown(self):
        """Stop accepting and close every connection; does not wait (safe in a signal handler)."""
        self.stopping.set()
        self._arrivals.put(None)  # SimpleQueue.put is reentrant: safe here
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close("server stopping")

    def shutdown(self):
        """``request_shutdown``, then wait until ``serve_forever`` has returned."""
        self.request_shutdown()
        self._stopped.wait()

    def server_close(self):
        """Release the listener, join the threads this server started (``JOIN_TIMEOUT`` in all),
        stop the monitor (which answers /healthz 503 until then) and the poller."""
        self.request_shutdown()
        self.listener.close()
        deadline = time.monotonic() + self.JOIN_TIMEOUT
        with self._conns_lock:
            threads = [thread for thread in self._conns.values() if thread is not None]
            threads += self._catch_ups
        for worker in [*self._threads, *threads]:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        self.deadlines.close()
        for sock in self.lingering.close():
            _close_quietly(sock)
        if self.monitor is not None:
            self.monitor.stop(timeout=max(0.5, deadline - time.monotonic()))
        self.poller.close()
        if self.store is not None:
            self.store.close()  # commits what is queued, then releases the data directory

    def public_settings(self):
        """The settings in force, for the monitor: everything but secrets."""
        return {name: value for name, value in dataclasses.asdict(self.settings).items()
                if name not in SECRET_SETTINGS}


class MonitorView:
    """What the monitor reads of a server (``monitor.Source``): copies, never live structures.

    The network map plugs in here: ``server.network_map``, once set, is a callable returning
    ``{"servers": [{"address": "h:p", "load": n, "monitor": "h:p" or None, "alive": bool}],
    "links": [{"a": "h:p", "b": "h:p"}], "root": "h:p" or None}`` (or None while it knows
    nothing); until then /networkz shows this server and its neighbours. Health checks plug in
    through ``server.health_checks`` (see ``health``)."""

    # Summing every connection's bytes costs O(connections) under the state lock (a few ms with
    # 10,000 clients), so a total is reused for this long: the monitor's sampler refreshes it
    # every second, and a scrape in between costs O(links).
    TRAFFIC_FRESH = 1.0

    def __init__(self, server):
        self.server = server
        self.counters = server.counters
        self.stopping = server.stopping
        self._traffic_lock = threading.Lock()  # guards _traffic, _traffic_at
        self._traffic = (0, 0)
        self._traffic_at = None

    def snapshot(self, clients=True):
        snapshot = self.server.state.snapshot(clients=clients)
        snapshot.update(version=__version__, started_at=self.server.started_at,
                        settings=self.server.public_settings())
        return snapshot

    def counter_values(self):
        """The counters since start as plain data, with the bytes of open connections added
        (at most ``TRAFFIC_FRESH`` seconds old; never smaller than a total given before)."""
        values = self.counters.as_dict()
        with self._traffic_lock:
            now = time.monotonic()
            if self._traffic_at is None or now - self._traffic_at >= self.TRAFFIC_FRESH:
                self._traffic, self._traffic_at = self.server.state.traffic(), now
            values["bytes_in"], values["bytes_out"] = self._traffic
        return values

    def health(self):
        """None while healthy, else what is failing (e.g. a durable store's error)."""
        problems = [problem for problem in (check() for check in self.server.health_checks) if problem]
        return "; ".join(problems) or None

    def network(self):
        network_map = self.server.network_map
        return network_map() if network_map is not None else None


def _outside_the_hold(session, line):
    """Whether a reader handles ``line`` outside the batch hold of the state lock because its
    handling waits: any line but a REGISTER after REGISTERs whose replies wait for the data store
    (``State.send_held``), and a peer's ACTIVITY_RETRIEVE (answered from disk, with a data
    store). A byte test, so a false positive costs only a lock hand-over; were one missed, the
    handling would still be correct, only under the lock."""
    if session.held is not None:
        return b'"command":"REGISTER"' not in line and b'"command": "REGISTER"' not in line
    return session.role == SERVER and b"ACTIVITY_RETRIEVE" in line


def _ending_for(exc):
    """The one place a protocol error or a goodbye becomes the last bytes, the close reason and
    how long the reply waits (a failed login's ``delay``, see ``handlers``)."""
    if isinstance(exc, ProtocolError):
        return encode(exc.reply()), f"{exc.command}: {exc.info}", getattr(exc, "delay", 0.0)
    return (encode(exc.message) if exc.message else b""), exc.reason, 0.0


class _Thread:
    """A daemon thread with the start/join of the others in ``Server._threads``."""

    def __init__(self, target, name):
        self.thread = threading.Thread(target=target, name=name, daemon=True)

    def start(self):
        self.thread.start()

    def join(self, timeout):
        if self.thread.ident is not None:  # started
            self.thread.join(timeout)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory():
    """Give memory the C allocator holds but nobody uses back to the system (see TRIM_EVERY)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _close_quietly(sock):
    with contextlib.suppress(OSError):
        sock.close()


def _peer_of(sock):
    try:
        return sock.getpeername()[:2]
    except OSError:
        return "unknown", 0


def _host(address):
    return address.rsplit(":", 1)[0]


def generate_secret():
    return secrets.token_hex(13)


def default_hostname():
    """This machine's address as others would see it, falling back to loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def parse_settings(argv):
    """Settings from the command line; ``None`` when help was asked for. Raises UsageError."""
    args = cli.parse(__doc__, argv, ALIASES)
    if args is None:
        return None
    level = args["--log-level"].lower()
    if level not in LOG_LEVELS:
        raise cli.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    log_format = args["--log-format"].lower()
    if log_format not in logs.FORMATS:
        raise cli.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}, not {log_format!r}")
    monitor_port = args["--monitor-port"]
    if monitor_port is not None:
        monitor_port = cli.port(monitor_port, "--monitor-port")
    if not args["--monitor-bind"].strip():
        raise cli.UsageError("--monitor-bind must not be empty")
    remote_host = args["--remote-host"]
    if remote_host is not None and not remote_host.strip():
        raise cli.UsageError("-rh/--remote-host must not be empty")
    secret = args["--secret"]
    if secret is not None and not secret:
        raise cli.UsageError("-s/--secret must not be empty")
    return Settings(
        local_port=cli.port(args["--local-port"], "-lp/--local-port"),
        local_host=args["--local-host"] or default_hostname(),
        remote_host=remote_host,
        remote_port=cli.port(args["--remote-port"], "-rp/--remote-port"),
        joins=cli.addresses(args["--join"], "--join") if args["--join"] is not None else [],
        grace=cli.positive_int(args["--grace"], "--grace"),
        secret=secret,
        activity_interval=cli.positive_int(args["--activity-interval"], "-a/--activity-interval"),
        bind=args["--bind"],
        history=cli.positive_int(args["--history"], "--history"),
        max_line=cli.positive_int(args["--max-line"], "--max-line", minimum=64),
        max_outbox=cli.positive_int(args["--max-outbox"], "--max-outbox", minimum=1024),
        login_timeout=cli.positive_int(args["--login-timeout"], "--login-timeout", minimum=0),
        max_connections=(None if args["--max-connections"] is None else
                         cli.positive_int(args["--max-connections"], "--max-connections")),
        max_pending_per_address=cli.positive_int(args["--max-pending-per-address"],
                                                 "--max-pending-per-address"),
        rate_limit=cli.positive_int(args["--rate-limit"], "--rate-limit", minimum=0),
        rate_burst=cli.positive_int(args["--rate-burst"], "--rate-burst", minimum=0),
        **tls_settings(args),
        log_level=level,
        log_format=log_format,
        monitor_port=monitor_port,
        monitor_bind=args["--monitor-bind"],
        data_dir=_data_dir(args["--data-dir"]),
        disk_history=cli.positive_int(args["--disk-history"], "--disk-history"),
    )


def tls_settings(args):
    """The --tls-* options: all three files or none; --tls-required only with them."""
    files = {name: args[f"--tls-{name}"] for name in ("cert", "key", "ca")}
    given = [name for name, path in files.items() if path]
    if given and len(given) < 3:
        missing = ", ".join(f"--tls-{name}" for name in files if name not in given)
        raise cli.UsageError(f"TLS needs --tls-cert, --tls-key and --tls-ca together; {missing} missing")
    if args["--tls-required"] and not given:
        raise cli.UsageError("--tls-required needs --tls-cert, --tls-key and --tls-ca")
    return {f"tls_{name}": path for name, path in files.items()} | {"tls_required": args["--tls-required"]}


def _data_dir(value):
    if value is not None and not value.strip():
        raise cli.UsageError("--data-dir must not be empty")
    return value


def raise_open_files_limit():
    """Allow as many connections as the hard limit permits (one descriptor each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def run(argv, stdout=sys.stdout, stderr=sys.stderr):
    """The server command; returns the exit code."""
    settings, status = cli.settle("activitynet.server", __doc__, parse_settings, argv, stdout, stderr)
    if settings is None:
        return status
    logs.configure(settings.log_level, settings.log_format, stderr)
    raise_open_files_limit()
    schemas.load()  # build the validators now, not on the first message (~40 ms)
    threading.stack_size(THREAD_STACK)
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server = Server(settings)
    except tls.TlsConfigError as exc:
        print(f"activitynet.server: {exc}", file=stderr)
        return 2
    except (StartError, StoreError) as exc:
        print(f"activitynet.server: {exc}", file=stderr)
        return 1
    if settings.secret is None:
        print(f"generated secret: {server.secret}", file=stdout, flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.request_shutdown())
    try:
        server.serve_forever()
    finally:
        server.server_close()
    log.info("stopped")
    return 0


def main():
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
