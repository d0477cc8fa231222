"""Real servers as processes (``activitynet.testing.ServerProcess``, shared with the tests) and a
relay that can cut a link between two of them.

Every server is ``python -m activitynet.server -lp 0 ... --bind 127.0.0.1 -lh 127.0.0.1``, found
by the ``listening on HOST:PORT`` line it logs at start. A ``Cluster`` owns the servers of one
scenario and stops them all when its ``with`` block ends, however it ends (failure, Ctrl-C).
"""

import contextlib
import resource
import selectors
import socket
import struct
import subprocess
import threading
import time

from activitynet.testing import HOST, ServerDidNotStart, ServerProcess

SECRET = "bench-secret"


class BenchmarkError(Exception):
    """A scenario could not run (a server did not start, a client could not log in, ...)."""


def raise_open_files_limit(wanted):
    """Let this process hold ``wanted`` sockets (up to the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def wait_listening(server):
    try:
        server.wait_listening()
    except ServerDidNotStart as exc:
        raise BenchmarkError(str(exc)) from None


class Cluster:
    """The servers (and relays) of one scenario; ``with Cluster() as c:`` stops them all."""

    def __init__(self, interval=500, extra=()):
        self.interval = interval
        self.extra = list(extra)
        self.servers = []
        self.relays = []
        self.on_start = []  # callables(server), e.g. a profiler attaching itself
        self.on_close = []  # callables(), after every server has stopped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for relay in self.relays:
            relay.close()
        for server in reversed(self.servers):
            server.stop()
        for hook in self.on_close:
            hook()

    def start(self, name, remote_port=None, extra=(), wait=True):
        server = ServerProcess(name, remote_port=remote_port, secret=SECRET, interval=self.interval,
                               extra=self.extra + list(extra), stdout=subprocess.DEVNULL)
        self.servers.append(server)
        server.spawn()
        if wait:
            wait_listening(server)
        for hook in self.on_start:
            hook(server)
        return server

    def relay(self, target_port):
        relay = Relay(target_port)
        self.relays.append(relay)
        return relay

    def cpu_seconds(self):
        """{server name: CPU seconds used so far}."""
        return {server.name: server.cpu_seconds() for server in self.servers if server.alive()}

    def memory_mib(self):
        """{server name: (rss, peak rss)} in MiB, right now."""
        return {server.name: server.memory_mib() for server in self.servers}


# --- a link that can be cut ---------------------------------------------------------------------

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _reset(sock):
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    __slots__ = ("dialler", "upstream", "dead")

    def __init__(self, dialler, upstream):
        self.dialler = dialler
        self.upstream = upstream  # None for a connection accepted while cut
        self.dead = upstream is None  # a black hole: read and discard, send nothing


class Relay:
    """A TCP relay between a dialling server and ``target_port``, run by one thread.

    ``cut()`` is a cable cut: the link goes silent both ways and bytes in flight are lost (read
    and discarded); connections made while cut are black holes too, so each server only notices
    through its heartbeat timeout. ``heal()`` resets the dead connections (what a peer that had
    given up answers once packets flow again) and relays new ones. Bytes are counted per direction
    so a test can see how much recovery sent.
    """

    def __init__(self, target_port):
        self.target_port = target_port
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()  # guards _pairs, _cut, counters
        self._pairs = []
        self._cut = False
        self.to_target = 0  # bytes relayed dialler -> target
        self.to_dialler = 0  # bytes relayed target -> dialler
        self.accepted = 0
        self.accepted_at = []  # perf_counter of each relayed (live) connection
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pending = []  # actions for the relay thread
        self._stopping = False
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    def bytes_relayed(self):
        with self._lock:
            return self.to_target + self.to_dialler

    def cut(self):
        self._call("cut")

    def heal(self):
        self._call("heal")

    def close(self):
        self._call("stop")
        self._thread.join(timeout=5)

    def _call(self, action):
        done = threading.Event()
        with self._lock:
            self._pending.append((action, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(5):
            raise BenchmarkError(f"relay did not {action}")

    def _run(self):
        try:
            while not self._stopping:
                for key, _mask in self._selector.select(1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(4096)
                        self._do_pending()
                    else:
                        self._pump(key.fileobj, *key.data)
        finally:
            for pair in self._pairs:
                self._drop(pair, reset=True)
            for sock in (self._listener, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    sock.close()
            self._selector.close()

    def _do_pending(self):
        with self._lock:
            pending, self._pending = self._pending, []
        for action, done in pending:
            if action == "cut":
                with self._lock:
                    self._cut = True
                for pair in self._pairs:
                    pair.dead = True
            elif action == "heal":
                for pair in list(self._pairs):
                    self._drop(pair, reset=True)
                with self._lock:
                    self._cut = False
            elif action == "stop":
                self._stopping = True
            done.set()

    def _accept(self):
        try:
            dialler, _ = self._listener.accept()
        except OSError:
            return
        upstream = None
        with self._lock:
            cut = self._cut
        if not cut:
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            except OSError:
                _reset(dialler)
                return
            for sock in (dialler, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(10)
            with self._lock:
                self.accepted += 1
                self.accepted_at.append(time.perf_counter())
        pair = _Pair(dialler, upstream)
        self._pairs.append(pair)
        self._selector.register(dialler, selectors.EVENT_READ, (pair, True))
        if upstream is not None:
            self._selector.register(upstream, selectors.EVENT_READ, (pair, False))

    def _pump(self, sock, pair, from_dialler):
        try:
            data = sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            if pair.dead:  # one end gave up; the other end hears nothing of it (cut cable)
                self._close_end(pair, sock)
            else:
                self._drop(pair, reset=False)
            return
        if pair.dead:
            return  # lost on the cut cable
        other = pair.upstream if from_dialler else pair.dialler
        try:
            other.sendall(data)
        except OSError:
            self._drop(pair, reset=False)
            return
        with self._lock:
            if from_dialler:
                self.to_target += len(data)
            else:
                self.to_dialler += len(data)

    def _close_end(self, pair, sock):
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()
        if sock is pair.dialler:
            pair.dialler = None
        else:
            pair.upstream = None
        if pair.dialler is None and pair.upstream is None and pair in self._pairs:
            self._pairs.remove(pair)

    def _drop(self, pair, reset):
        if pair in self._pairs:
            self._pairs.remove(pair)
        for sock in (pair.dialler, pair.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
