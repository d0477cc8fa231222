"""One socket: bounded line reads, ordered non-blocking writes, idempotent close.

Reading is done by the connection's own thread with blocking ``recv`` calls. Writing never blocks
anyone: ``send`` appends bytes to the connection's ordered outbox, and the outbox is written with
non-blocking ``send`` calls (``MSG_DONTWAIT``) by whichever thread flushes it. When the kernel
refuses part of it, the one ``Poller`` thread finishes the write once the socket is writable. A
writer thread per connection would be simpler, but thousands of them fight over the GIL.

Batching: a reader thread handles every line of one ``recv`` inside ``batch()``; sends made
meanwhile are flushed once at the end of the batch, so a burst of N messages to one peer costs
one system call instead of N. Outside a batch a send is flushed at once.

An outbox holding more than ``max_outbox`` unsent bytes belongs to a slow consumer: it is closed.
"""

import contextlib
import logging
import os
import select
import socket
import threading
import time

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
_local = threading.local()


class LineTooLong(Exception):
    pass


@contextlib.contextmanager
def batch():
    """Defer flushes of the connections sent to inside this block to its end (see module doc)."""
    outer = getattr(_local, "dirty", None)
    if outer is not None:  # nested: the outermost batch flushes
        yield
        return
    _local.dirty = dirty = {}
    try:
        yield
    finally:
        _local.dirty = None
        for conn in dirty:
            conn.flush()


class Poller:
    """The one thread that finishes writes the kernel could not take at once."""

    def __init__(self):
        self._epoll = select.epoll()
        self._lock = threading.Lock()  # guards _waiting and _registered
        self._waiting = {}  # fd -> Connection waiting for writability
        self._registered = set()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()  # written once by close() to end the poll at once
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def wait_writable(self, conn):
        fd = conn.fileno
        mask = select.EPOLLOUT | select.EPOLLONESHOT
        with self._lock:
            if self._closed:
                return
            self._waiting[fd] = conn
            try:
                if fd in self._registered:
                    self._epoll.modify(fd, mask)
                else:
                    self._epoll.register(fd, mask)
                    self._registered.add(fd)
            except OSError:  # closed under our feet
                self._waiting.pop(fd, None)
                self._registered.discard(fd)

    def forget(self, conn):
        """Called by a closing connection, before its fd can be reused."""
        fd = conn.fileno
        with self._lock:
            if self._waiting.get(fd) is conn:
                del self._waiting[fd]
            if fd in self._registered:
                self._registered.discard(fd)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def close(self):
        with self._lock:
            self._closed = True
            self._waiting.clear()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self):
        while not self._closed:
            try:
                events = self._epoll.poll()
            except OSError:
                return
            for fd, _mask in events:
                with self._lock:
                    conn = self._waiting.pop(fd, None)
                if conn is not None:
                    conn.flush(resume=True)


class Connection:
    """A peer socket. Session fields (``role``, ``username``, ``link``) are owned by ``State``
    and change only under its lock."""

    # Slots: a server may hold 10,000 idle connections, and every byte of each one counts.
    __slots__ = ("sock", "fileno", "poller", "max_line", "max_outbox", "name", "last_heard",
                 "role", "username", "secret", "logged_in", "logged_in_at", "link", "_lock", "_chunks", "_queued",
                 "_flushing", "_rest", "_drain_waiter", "_close_when_drained", "closed",
                 "close_reason", "__weakref__")

    def __init__(self, sock, poller, max_line, max_outbox, name=None):
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fileno = sock.fileno()
        self.poller = poller
        self.max_line = max_line
        self.max_outbox = max_outbox
        try:
            host, port = sock.getpeername()[:2]
            self.name = name or f"{host}:{port}"
        except OSError:
            self.name = name or "unconnected"
        self.last_heard = time.monotonic()
        # Session, owned by State (guarded by the state lock).
        self.role = "new"  # "new" -> "client" | "server"
        self.username = None
        self.secret = None
        self.logged_in = False
        self.logged_in_at = 0.0  # wall-clock time of the login
        self.link = None
        # Outbox (guarded by self._lock).
        self._lock = threading.Lock()
        self._chunks = []
        self._queued = 0  # bytes accepted by send() and not yet taken by the kernel
        self._flushing = False  # one flusher at a time, or the poller owns the remainder
        self._rest = b""  # bytes the kernel refused, waiting for writability
        self._drain_waiter = None  # an Event, only while finish() waits for the outbox to drain
        self._close_when_drained = None  # a reason, once send_last() was called
        self.closed = False
        self.close_reason = None

    def __repr__(self):
        return f"<Connection {self.name} {self.role}>"

    # --- reading ---------------------------------------------------------------------------

    def batches(self):
        """Yield lists of complete lines (bytes, no terminator, ``\\r`` stripped, blanks dropped)
        as they arrive. Ends on EOF or close. Raises ``LineTooLong`` past ``max_line`` bytes."""
        pending = b""
        while not self.closed:
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                break
            if not data:
                if pending.strip():  # a last line without its newline (e.g. netcat at EOF)
                    yield [pending.rstrip(b"\r")]
                break
            self.last_heard = time.monotonic()
            if pending:
                data = pending + data
            lines = data.split(b"\n")
            pending = lines.pop()
            out = []
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > self.max_line:
                    break
                if line and not line.isspace():
                    out.append(line)
            else:
                line = pending[:-1] if pending.endswith(b"\r") else pending
            if out:
                yield out  # the lines before an over-long one are still answered
            if len(line) > self.max_line:
                raise LineTooLong(len(line))

    # --- writing ---------------------------------------------------------------------------

    def send(self, data):
        """Queue ``data`` (bytes) behind everything queued before; never blocks on the socket."""
        with self._lock:
            if self.closed:
                return
            self._chunks.append(data)
            self._queued += len(data)
            over = self._queued > self.max_outbox
        if over:
            log.warning("%s is too slow to read its messages (%d bytes queued); disconnecting",
                        self.name, self._queued)
            self.close("slow consumer")
            return
        dirty = getattr(_local, "dirty", None)
        if dirty is None:
            self.flush()
        else:
            dirty[self] = True

    def flush(self, resume=False):
        """Hand queued bytes to the kernel without blocking; the poller finishes what it refuses."""
        with self._lock:
            if self.closed:
                return
            if resume:
                data = self._rest
                self._rest = b""
            elif self._flushing:
                return  # the current flusher (or the poller) will pick our bytes up
            else:
                data = b""
            self._flushing = True
            if self._chunks:
                data = data + b"".join(self._chunks) if data else b"".join(self._chunks)
                self._chunks.clear()
        view = memoryview(data)
        while True:
            sent = 0
            if view:
                try:
                    sent = self.sock.send(view, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self.close(f"send failed: {exc.strerror}")
                    return
            with self._lock:
                self._queued -= sent
                view = view[sent:]
                if not view and self._chunks:
                    view = memoryview(b"".join(self._chunks))
                    self._chunks.clear()
                    continue
                if not view:
                    self._flushing = False
                    if self._drain_waiter is not None:
                        self._drain_waiter.set()
                    close_now = self._close_when_drained
                elif self.closed:
                    return
                else:
                    self._rest = bytes(view)
            if view:
                self.poller.wait_writable(self)
            elif close_now:
                self.close(self._close_when_drained)
            return

    def send_last(self, data, reason):
        """Queue ``data`` and close the connection once it has reached the kernel."""
        with self._lock:
            self._close_when_drained = reason
        self.send(data)

    def queued_bytes(self):
        return self._queued

    def finish(self, data, reason, timeout=5.0):
        """Send ``data`` last, wait (up to ``timeout``) until the kernel has it all, then close.

        For replies that end a connection (failures, REDIRECT). Only the connection's own thread
        calls it, so waiting here stalls nobody else."""
        drained = threading.Event()
        with self._lock:
            self._drain_waiter = drained
        self.send_last(data, reason)
        self.flush()
        drained.wait(timeout)
        self.close(reason)

    # --- closing ---------------------------------------------------------------------------

    def close(self, reason="closed"):
        """Idempotent. Wakes the reader thread blocked in ``recv``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.close_reason = reason
            self._chunks.clear()
            self._rest = b""
            if self._drain_waiter is not None:
                self._drain_waiter.set()
        self.poller.forget(self)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
