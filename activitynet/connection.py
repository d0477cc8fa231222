"""One connection's bytes: a transport, bounded line reads, an ordered non-blocking outbox.

Reading is done by the connection's own thread with blocking ``recv`` calls. Writing never blocks
anyone: ``send`` appends bytes to the connection's ordered outbox, and the outbox is handed to the
transport's non-blocking ``send_some`` by whichever thread flushes it. When the kernel refuses part
of it, the one ``Poller`` thread finishes the write once the socket is writable. A writer thread
per connection would be simpler, but thousands of them fight over the GIL.

When bytes are flushed: ``send`` only queues. Inside an ``Outgoing`` section (per thread), the
connections sent to are flushed once, when the outermost section ends; outside one, at once. The
state lock is always taken inside a section and released before it ends (see ``state``), so no
socket is written, shut down or closed while the state lock is held, by construction. A reader
thread also handles every line of one ``recv`` inside a section, so a burst of N messages to one
peer costs one system call instead of N.

Slow consumers (``limits.SlowConsumerRule``): an outbox holding more than ``max_outbox`` unsent
bytes is watched; it is closed when its reader drained less than 1 MB/s over a whole 5 s window,
or at once past four times ``max_outbox`` (memory stays bounded). So a reader that keeps reading
is not cut because a burst or a flooder filled its outbox, and one that stopped reading is. The
close happens at its next flush (so never under the state lock either).

A transport is what a connection needs of a socket; a plain socket and a TLS socket both provide
it: ``recv(n)`` (blocking, ``b""`` at EOF), ``send_some(view)`` (non-blocking: how many bytes the
kernel took, 0 when it would block), ``fileno()``, ``shutdown()``, ``close()`` and ``peer``.
"""

import contextlib
import logging
import os
import select
import socket
import threading
import time

from .limits import SlowConsumerRule

log = logging.getLogger(__name__)

SLOW_CONSUMER_RULE = SlowConsumerRule()

RECV_SIZE = 64 * 1024
SLOW_CONSUMER = "slow consumer"  # the close reason of an outbox over its limit


class LineTooLong(Exception):
    pass


class PlainTransport:
    """A TCP socket. It stays blocking for the reader; sends pass ``MSG_DONTWAIT`` instead
    (a TLS transport cannot: ``SSLSocket.send`` refuses flags)."""

    __slots__ = ("sock", "peer")

    def __init__(self, sock):
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            self.peer = sock.getpeername()[:2]
        except OSError:
            self.peer = None

    def recv(self, size):
        return self.sock.recv(size)

    def send_some(self, view):
        try:
            return self.sock.send(view, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    def fileno(self):
        return self.sock.fileno()

    def shutdown(self):
        self.sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.sock.close()


class Outgoing:
    """Per thread: the connections sent to inside the current section, flushed when the
    outermost section ends (see the module docstring). ``with outgoing:`` is a section; they
    nest. ``holding(lock)`` gives the same sections with ``lock`` held inside them: taken once
    the section is open, released before it ends and flushes.

    While a thread holds the lock, what it sends is gathered per connection and put on each
    outbox once, just before the outermost hold releases the lock: a batch of N activities to
    one peer costs one outbox append instead of N, and the order stays the one decided under
    the lock."""

    __slots__ = ("local", "lock")

    def __init__(self, local=None, lock=None):
        # Per thread: .depth, .dirty (dict as ordered set), .held (lock holds), .pending
        # (connection -> chunks gathered under the lock, None while the lock is not held).
        self.local = local or threading.local()
        self.lock = lock

    def holding(self, lock):
        return Outgoing(self.local, lock)

    def __enter__(self):
        local = self.local
        depth = getattr(local, "depth", 0)
        if not depth:
            local.dirty = {}
            local.held = 0
            local.pending = None
        local.depth = depth + 1
        if self.lock is not None:
            try:
                self.lock.acquire()
            except BaseException:
                self._leave()
                raise
            if not local.held:
                local.pending = {}
            local.held += 1
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            local = self.local
            local.held -= 1
            if not local.held:
                pending = local.pending
                local.pending = None
                try:
                    for conn, chunks in pending.items():
                        conn.queue(chunks)
                finally:
                    self.lock.release()
            else:
                self.lock.release()
        self._leave()

    def _leave(self):
        local = self.local
        local.depth -= 1
        if not local.depth:
            dirty = local.dirty
            local.dirty = None
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
    """A peer's bytes over a transport; see the module docstring."""

    # Slots: a server may hold 10,000 idle connections, and every byte of each one counts.
    __slots__ = ("transport", "fileno", "poller", "outgoing", "max_line", "max_outbox", "name",
                 "last_heard", "_lock", "_chunks", "_queued", "_watch", "_flushing", "_rest",
                 "_drain_waiter", "_close_when_drained", "_too_slow", "closed", "close_reason",
                 "bytes_in", "bytes_out",
                 "__weakref__")

    def __init__(self, transport, poller, outgoing, max_line, max_outbox, name=None):
        self.transport = transport
        self.fileno = transport.fileno()
        self.poller = poller
        self.outgoing = outgoing
        self.max_line = max_line
        self.max_outbox = max_outbox
        peer = transport.peer
        self.name = name or (f"{peer[0]}:{peer[1]}" if peer else "unconnected")
        self.last_heard = time.monotonic()
        # Outbox (guarded by self._lock).
        self._lock = threading.Lock()
        self._chunks = []
        self._queued = 0  # bytes accepted by send() and not yet taken by the kernel
        self._watch = None  # the slow-consumer rule's record while over max_outbox
        self._flushing = False  # one flusher at a time, or the poller owns the remainder
        self._rest = b""  # bytes the kernel refused, waiting for writability
        self._drain_waiter = None  # an Event, only while finish() waits for the outbox to drain
        self._close_when_drained = None  # a reason, once send_last() was called
        self._too_slow = None  # why it is too slow (SlowConsumerRule): closed at the next flush
        self.closed = False
        self.close_reason = None
        # Traffic, for the monitor: bytes_in is written only by the reader thread, bytes_out
        # only under self._lock; ``State`` adds both to its counters when the session closes.
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self):
        return f"<Connection {self.name}>"

    @property
    def address(self):
        return self.name

    # --- reading ---------------------------------------------------------------------------

    def batches(self):
        """Yield lists of complete lines (bytes, no terminator, ``\\r`` stripped, blanks dropped)
        as they arrive. Ends on EOF or close. Raises ``LineTooLong`` past ``max_line`` bytes."""
        pending = b""
        recv = self.transport.recv
        while not self.closed:
            try:
                data = recv(RECV_SIZE)
            except OSError:
                break
            if not data:
                if pending.strip():  # a last line without its newline (e.g. netcat at EOF)
                    yield [pending.rstrip(b"\r")]
                break
            self.last_heard = time.monotonic()
            self.bytes_in += len(data)
            if pending:
                data = pending + data
            lines = data.split(b"\n")
            pending = lines.pop()
            if (b"\r" in data or b"" in lines or any(map(bytes.isspace, lines))
                    or (len(data) > self.max_line and max(map(len, lines), default=0) > self.max_line)):
                out = []  # line by line (rare): terminators, blank and over-long lines
                for line in lines:
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if len(line) > self.max_line:
                        break
                    if line and not line.isspace():
                        out.append(line)
                else:
                    line = pending[:-1] if pending.endswith(b"\r") else pending
            else:
                out, line = lines, pending  # the usual case: every line as it is
            if out:
                yield out  # the lines before an over-long one are still answered
            if len(line) > self.max_line:
                raise LineTooLong(len(line))

    # --- writing ---------------------------------------------------------------------------

    def send(self, data):
        """Queue ``data`` (bytes) behind everything queued before; never touches the socket
        itself (the flush comes at the end of this thread's ``Outgoing`` section). Under the
        state lock it is only gathered, and queued when the lock is released (see Outgoing)."""
        pending = getattr(self.outgoing.local, "pending", None)
        if pending is None:
            self.queue([data])
        else:
            chunks = pending.get(self)
            if chunks is None:
                pending[self] = [data]
            else:
                chunks.append(data)

    def queue(self, chunks, close_reason=None):
        """Put ``chunks`` (a list of bytes) on the outbox in one step; ``close_reason``: close
        the connection once they reach the kernel."""
        size = 0
        for chunk in chunks:
            size += len(chunk)
        with self._lock:
            if self.closed:
                return
            if close_reason is not None:
                self._close_when_drained = close_reason
            self._chunks += chunks
            self._queued += size
            if self._queued > self.max_outbox:
                if not self._too_slow:
                    self._too_slow, self._watch = SLOW_CONSUMER_RULE.judge(
                        self.max_outbox, self._queued, self.bytes_out, time.monotonic(), self._watch)
            elif self._watch is not None:  # back under the limit: a later episode starts afresh
                self._watch = None
        dirty = getattr(self.outgoing.local, "dirty", None)
        if dirty is None:  # outside any section: now
            self.flush()
        else:
            dirty[self] = True

    def flush(self, resume=False):
        """Hand queued bytes to the kernel without blocking; the poller finishes what it refuses."""
        with self._lock:
            if self.closed:
                return
            if self._too_slow:
                data = None
            elif resume:
                data = self._rest
                self._rest = b""
            elif self._flushing:
                return  # the current flusher (or the poller) will pick our bytes up
            else:
                data = b""
            if data is not None:
                self._flushing = True
                if self._chunks:
                    data = data + b"".join(self._chunks) if data else b"".join(self._chunks)
                    self._chunks.clear()
        if data is None:
            log.warning("%s is too slow to read its messages (%s); disconnecting",
                        self.name, self._too_slow, extra={"conn": self.name})
            self.close(SLOW_CONSUMER)
            return
        view = memoryview(data)
        send_some = self.transport.send_some
        while True:
            sent = 0
            if view:
                try:
                    sent = send_some(view)
                except OSError as exc:
                    self.close(f"send failed: {exc.strerror or exc}")
                    return
            with self._lock:
                self._queued -= sent
                self.bytes_out += sent  # also the drain rate the slow-consumer rule reads
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
                self.close(close_now)
            return

    def send_last(self, data, reason):
        """Queue ``data`` and close the connection once it has reached the kernel. What was
        gathered for it under the state lock goes first, in the same step, so that nothing
        is queued after the close was decided and no flush closes before ``data`` is out."""
        pending = getattr(self.outgoing.local, "pending", None)
        chunks = (pending.pop(self, None) if pending is not None else None) or []
        chunks.append(data)
        self.queue(chunks, close_reason=reason)

    def queued_bytes(self):
        return self._queued

    def finish(self, data, reason, timeout=5.0):
        """Send ``data`` last, wait (up to ``timeout``) until the kernel has it all, then close.

        For replies that end a connection (failures, REDIRECT). Only the connection's own thread
        calls it, outside any section, so waiting here stalls nobody else."""
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
            self.transport.shutdown()
        with contextlib.suppress(OSError):
            self.transport.close()
