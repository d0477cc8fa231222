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
  --max-line=BYTES          longest line accepted from a client [default: 1048576]
  --max-outbox=BYTES        unsent bytes after which a client is too slow and is
                            disconnected [default: 16777216]
  --log-level=LEVEL         debug, info, warning or error [default: info]
  --log-format=FORMAT       text (for people) or json (one object per line) [default: text]
  --monitor-port=PORT       serve the monitoring pages (/varz, /metrics, the live map ...)
                            on this port; 0 picks a free one (default: no monitor)
  --monitor-bind=ADDRESS    address the monitor listens on [default: 127.0.0.1]
  -h --help                 show this text

Design: a blocking accept loop starts one thread per connection (see ``run_connection``); all
shared state is in one ``State`` behind one lock; writes go through each connection's outbox
(see ``connection``). The heartbeat and the dialler run in threads of their own (``links``), and
so does the monitor (``monitor``), which reads the server through a ``MonitorView``.
"""

import dataclasses
import logging
import resource
import secrets
import signal
import socket
import sys
import threading
import time

from . import __version__, cli, handlers, logs, stats
from .connection import Connection, LineTooLong, PlainTransport, Poller
from .links import Dialer, Heartbeat
from .monitor import Monitor
from .protocol import InvalidMessage, ProtocolError, encode
from .state import State

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
# Authenticated servers are trusted with bigger lines and outboxes: a SYNC_USER or the answer to
# an ACTIVITY_RETRIEVE (up to the whole history) is queued at once.
SERVER_MAX_LINE = 64 * 1024 * 1024
SERVER_MAX_OUTBOX = 1024 * 1024 * 1024


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
    log_level: str = "info"
    log_format: str = "text"
    monitor_port: int | None = None  # None: no monitor
    monitor_bind: str = "127.0.0.1"


# Settings never shown by the monitor (/varz lists the others).
SECRET_SETTINGS = frozenset({"secret"})


class StartError(Exception):
    """The server cannot start (a port is taken, say); the message says which and why."""


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
        self.network_map = None  # set to the state's once it exists
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
        self.state = State(settings.local_host, self.port, history_size=settings.history,
                           counters=self.counters, joins=[f"{host}:{port}" for host, port in joins],
                           grace=settings.grace)
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
        self.poller = Poller()
        self.context = handlers.Context(self.state, self.secret, self._trust_as_server)
        self._conns_lock = threading.Lock()  # guards _conns
        self._conns = {}  # open Connection -> the thread serving it
        self._threads = [Heartbeat(self.state, self.stopping),
                         Dialer(self.state, self.stopping, self.serve_link)]

    @property
    def address(self):
        return self.settings.local_host, self.port

    def serve_forever(self):
        self._stopped.clear()
        try:
            self._accept_loop()
        finally:
            self._stopped.set()

    def _accept_loop(self):
        if self.monitor is not None:
            self.monitor.start()  # logs "monitor on http://host:port/" before we say we listen
        log.info("listening on %s:%d (announced as %s:%d)", self.settings.bind, self.port, *self.address)
        for thread in self._threads:
            thread.start()
        number = 0
        while not self.stopping.is_set():
            try:
                sock, _address = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                log.exception("accept failed")  # e.g. out of file descriptors; keep serving
                self.stopping.wait(0.05)
                continue
            number += 1
            self.counters.connections_accepted += 1  # only this thread bumps it
            # The connection and its session are made here, and the thread runs _serve itself:
            # one frame less on each of thousands of reader threads' stacks is a page of memory
            # each (about 4 KiB a client, measured with 2,000 idle clients).
            conn = Connection(PlainTransport(sock), self.poller, self.state.outgoing,
                              self.settings.max_line, self.settings.max_outbox)
            if not self._track(conn):
                break
            session = self.state.open_session(conn, conn.name)
            try:
                threading.Thread(target=self._serve, args=(conn, session),
                                 name=f"conn-{number}", daemon=True).start()
            except Exception:  # e.g. no thread could be started; one connection, not the server
                log.exception("cannot serve a new connection")
                conn.close("no thread")
                self.state.close_session(session)
                with self._conns_lock:
                    self._conns.pop(conn, None)

    def serve_link(self, sock, peer_key):
        """Serve a socket we dialled to ``peer_key`` as a server link until it ends (the
        dialler's thread); returns (its Session or None, why it ended)."""
        conn = Connection(PlainTransport(sock), self.poller, self.state.outgoing,
                          self.settings.server_max_line, self.settings.server_max_outbox, name=peer_key)
        if not self._track(conn):
            return None, conn.close_reason
        session = self.state.open_session(conn, conn.name)
        self.state.dial_link(session, peer_key, self.secret)
        return session, self._serve(conn, session)

    def _track(self, conn):
        """Register ``conn`` so that ``shutdown`` closes it; False (and closed) when stopping."""
        with self._conns_lock:
            if self.stopping.is_set():
                conn.close("server stopping")
                return False
            self._conns[conn] = None  # its thread, once _serve runs
            return True

    def _serve(self, conn, session):
        """Read and handle ``conn`` until it ends; returns why it ended."""
        ending = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = threading.current_thread()
        try:
            for lines in conn.batches():
                with self.state.outgoing:  # one flush per peer for the whole batch
                    ending = self._handle_lines(session, lines)
                if ending is not None:
                    break
        except LineTooLong as exc:
            ending = _ending_for(InvalidMessage(
                f"line of {exc.args[0]} bytes or more is longer than the limit of {conn.max_line} bytes",
                kind="line_too_long"))
            self.state.count_invalid("line_too_long")
        except Exception:
            log.exception("error serving %s; closing it", conn.name, extra={"conn": conn.name})
            conn.close("internal error")
        finally:
            if ending is not None:
                data, reason = ending
                log.info("closing %s: %s", conn.name, reason, extra={"conn": conn.name})
                conn.finish(data, reason) if data else conn.close(reason)
            conn.close("peer closed")
            self.state.close_session(session)
            with self._conns_lock:
                self._conns.pop(conn, None)
        return conn.close_reason

    def _handle_lines(self, session, lines):
        """Handle a batch of lines; returns (last bytes, reason) once the connection must end."""
        for line in lines:
            session.messages_in += 1
            try:
                handlers.dispatch_line(self.context, session, line)
            except (ProtocolError, handlers.Goodbye) as exc:
                if isinstance(exc, InvalidMessage):
                    self.state.count_invalid(exc.kind)
                return _ending_for(exc)
        return None

    def _trust_as_server(self, session):
        """Give an authenticated server link the larger limits servers are trusted with."""
        session.outbox.max_line = self.settings.server_max_line
        session.outbox.max_outbox = self.settings.server_max_outbox

    def request_shutdown(self):
        """Stop accepting and close every connection; does not wait (safe in a signal handler)."""
        self.stopping.set()
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
        for worker in [*self._threads, *threads]:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        if self.monitor is not None:
            self.monitor.stop(timeout=max(0.5, deadline - time.monotonic()))
        self.poller.close()

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


def _ending_for(exc):
    """The one place a protocol error or a goodbye becomes the last bytes and the close reason."""
    if isinstance(exc, ProtocolError):
        return encode(exc.reply()), f"{exc.command}: {exc.info}"
    return (encode(exc.message) if exc.message else b""), exc.reason


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
        log_level=level,
        log_format=log_format,
        monitor_port=monitor_port,
        monitor_bind=args["--monitor-bind"],
    )


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
    threading.stack_size(THREAD_STACK)
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server = Server(settings)
    except StartError as exc:
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
