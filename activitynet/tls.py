"""TLS for server links (and for clients that ask for it), from the standard library's ``ssl``.

``--tls-cert FILE --tls-key FILE --tls-ca FILE`` build two contexts once at start-up:
``server_context`` for the listening port and ``client_context`` for links this server dials.
Each side shows its certificate and checks the other's against the CA: a dialled peer must
present a certificate from the CA naming the host we dialled; a peer dialling us is checked when
it shows one (clients usually do not), so a server from another CA is refused either way.
``check_files`` reports unreadable, malformed or mismatched files in words a person can act on.

One port serves both: ``sniff`` peeks at the first byte a connection sends. A TLS record starts
with 0x16 (a handshake); a JSON line starts with ``{`` or whitespace, and anything else is left to
the line reader to refuse as it always did. The peek waits in the connection's own thread, so a
peer that connects and says nothing costs that thread only, until the login deadline.

Concurrency (``TlsTransport``). A connection is read by its own thread, which blocks, and written
by whichever thread flushes its outbox, which must not block. OpenSSL forbids using one SSL
object from two threads at once (SSL_read may write and SSL_write may read, e.g. during a key
update), and CPython's ``_ssl`` releases the GIL around both without a lock of its own (3.13.6
added one and removed it again because a blocked reader then starved every writer, gh-137583).
So here the socket is non-blocking after the handshake, every call into the SSL object holds the
transport's lock for one non-blocking step, and the reader *waits outside the lock* with
``poll`` until the socket is readable. A reader always tries SSL_read before it waits, so bytes
OpenSSL has already decrypted are never stranded behind a ``poll``. Only SSL_read consumes input:
TLS 1.3 is required (no renegotiation), so SSL_write never reads application data.

Writes are cut into chunks of ``SEND_CHUNK`` bytes. When OpenSSL says "want write" it has already
taken part of a chunk and requires the retry to offer the same bytes; the transport remembers the
chunk's length, and its caller, an ordered outbox, always retries with what it has not sent.
"""

import contextlib
import select
import socket
import ssl
import threading

HANDSHAKE_BYTE = 0x16
SEND_CHUNK = 64 * 1024
RECV_SIZE = 64 * 1024


class TlsConfigError(Exception):
    """The TLS files cannot be used; ``str()`` says which file and why."""


class TlsHandshakeError(Exception):
    """A TLS handshake failed; ``str()`` says why in words for the log."""


# --- contexts -------------------------------------------------------------------------------------

def _base_context(protocol, ca):
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # see the module docstring: no renegotiation
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"--tls-ca {ca}: {_why(exc, 'is not a PEM file of CA certificates')}") from None
    if not context.get_ca_certs():
        raise TlsConfigError(f"--tls-ca {ca}: holds no CA certificate (a certificate without "
                             "'CA:TRUE' cannot sign others)")
    return context


def _load_chain(context, cert, key):
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsConfigError(f"{option} {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsConfigError(f"--tls-key {key} is not the key of the certificate in --tls-cert "
                                 f"{cert}") from None
        detail = _why(exc, None)
        raise TlsConfigError(f"--tls-cert {cert} / --tls-key {key}: expected a PEM certificate and "
                             f"its unencrypted PEM key" + (f" ({detail})" if detail else "")) from None


def server_context(cert, key, ca):
    """The listening side: shows ``cert``, checks a certificate the peer shows against ``ca``."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, ca)
    _load_chain(context, cert, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca, cert=None, key=None):
    """The dialling side: requires the peer's certificate to come from ``ca`` and to name the
    host dialled; shows ``cert`` when given (servers do, clients need not)."""
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT, ca)  # CERT_REQUIRED and check_hostname
    if cert is not None:
        _load_chain(context, cert, key)
    return context


def check_files(cert, key, ca):
    """Both contexts, after proving they work together: a handshake between them in memory.

    Catches at start-up what would otherwise fail every link later: a certificate not signed by
    the CA, an expired one. Returns ``(server_context, client_context)``."""
    server = server_context(cert, key, ca)
    client = client_context(ca, cert, key)
    probe = client_context(ca, cert, key)
    probe.check_hostname = False  # the names are checked per dialled host, not here
    try:
        _memory_handshake(server, probe)
    except ssl.SSLError as exc:
        why = _why(exc, "handshake failed")
        if "purpose" in why:
            why += (" (a server both listens and dials, so its certificate's extendedKeyUsage must "
                    "allow serverAuth and clientAuth, or be left out)")
        raise TlsConfigError(f"--tls-cert {cert} does not verify against --tls-ca {ca}: {why}") from None
    return server, client


def _memory_handshake(server_ctx, client_ctx):
    """Run a full handshake between two contexts through memory buffers, in this thread."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    client = client_ctx.wrap_bio(to_client, to_server, server_side=False)
    done = {server: False, client: False}
    for _step in range(20):  # a TLS 1.3 handshake takes 2-3 rounds
        for side in (client, server):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return
    raise ssl.SSLError("the handshake did not finish")


# OpenSSL's reasons for files it cannot use, in words for the person who gave them.
_REASONS = {"PEM lib": "not in PEM format",
            "NO_CERTIFICATE_OR_CRL_FOUND": "holds no PEM certificate"}


def _why(exc, fallback):
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "verify_message", None) or exc.reason
        return _REASONS.get(reason, reason) or fallback
    return exc.strerror or str(exc) or fallback


# --- telling TLS from plain on one port -----------------------------------------------------------

def sniff(sock, timeout):
    """What the peer on ``sock`` speaks, from its first byte, without consuming it.

    Returns "tls", "plain", "closed" (EOF or error before any byte) or "silent" (nothing within
    ``timeout`` seconds). Blocks this thread only; leaves ``sock`` blocking again."""
    try:
        sock.settimeout(timeout)
        first = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return "silent"
    except OSError:
        return "closed"
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)
    if not first:
        return "closed"
    return "tls" if first[0] == HANDSHAKE_BYTE else "plain"


# --- the transport --------------------------------------------------------------------------------

class TlsTransport:
    """One TLS connection with the Transport interface of ``connection``: ``recv(n)`` blocks the
    reader (b"" at EOF), ``send_some(view)`` never blocks (0 when it would), ``fileno()``,
    ``shutdown()``, ``close()``, ``peer``. See the module docstring for the locking."""

    __slots__ = ("_ssl", "_lock", "_poll", "_pending", "_closed", "_waiting", "peer", "version",
                 "peer_cert")

    def __init__(self, ssl_sock):
        self._ssl = ssl_sock
        self._lock = threading.Lock()  # held for each single non-blocking call into OpenSSL
        self._pending = 0  # length of a chunk OpenSSL took part of ("want write"); retried first
        self._closed = False
        self._waiting = False  # the reader is in poll(), outside the lock
        try:
            self.peer = ssl_sock.getpeername()[:2]
        except OSError:
            self.peer = ("unconnected", 0)
        self.version = ssl_sock.version()
        self.peer_cert = ssl_sock.getpeercert() or None  # None: the peer showed no certificate
        ssl_sock.setblocking(False)
        self._poll = select.poll()  # poll, not select: descriptors pass 1024 with many clients
        self._poll.register(ssl_sock.fileno(), select.POLLIN)

    @classmethod
    def accept(cls, sock, context, timeout, on_wrapped=None):
        """Handshake as the server on an accepted socket (its first byte sniffed as "tls").
        ``timeout`` None: no timeout of its own (the server's login deadline ends a stalled
        handshake by shutting down the socket ``on_wrapped(ssl_sock)`` is given first)."""
        def wrap():
            ssl_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            if on_wrapped is not None:
                on_wrapped(ssl_sock)
            return ssl_sock
        return cls._handshake(sock, timeout, wrap)

    @classmethod
    def connect(cls, sock, context, hostname, timeout):
        """Handshake as the client on a connected socket; ``hostname`` must be named by the
        peer's certificate."""
        return cls._handshake(sock, timeout, lambda: context.wrap_socket(
            sock, server_hostname=hostname, do_handshake_on_connect=False))

    @classmethod
    def _handshake(cls, sock, timeout, wrap):
        try:
            ssl_sock = wrap()
        except (OSError, ValueError) as exc:
            sock.close()
            raise TlsHandshakeError(f"cannot start TLS: {exc}") from None
        try:
            ssl_sock.settimeout(timeout)
            ssl_sock.do_handshake()
            return cls(ssl_sock)
        except ssl.SSLCertVerificationError as exc:
            reason = f"certificate refused: {exc.verify_message}"
        except ssl.SSLError as exc:
            reason = f"TLS handshake failed: {exc.reason or exc}"
        except TimeoutError:
            reason = f"TLS handshake not finished within {timeout:g} s"
        except OSError as exc:
            reason = f"connection lost during the TLS handshake: {exc.strerror or exc}"
        ssl_sock.close()
        raise TlsHandshakeError(reason)

    def fileno(self):
        return self._ssl.fileno()

    def recv(self, n=RECV_SIZE):
        """Up to ``n`` bytes of plaintext, waiting for them; b"" at EOF or once closed."""
        while True:
            with self._lock:
                if self._closed:
                    return b""
                chunks, size, wait = [], 0, select.POLLIN
                while size < n:  # take every record already here in one call
                    try:
                        data = self._ssl.recv(n - size)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLWantWriteError:  # a key update's reply could not be sent yet
                        wait = select.POLLOUT
                        break
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        data = b""
                    except (ssl.SSLError, OSError):
                        if chunks:
                            break
                        return b""  # a broken record or a reset: to the reader, the end
                    if not data:
                        if chunks:
                            break
                        return b""
                    chunks.append(data)
                    size += len(data)
                if chunks:
                    return b"".join(chunks)
                self._poll.modify(self._ssl.fileno(), wait)
                self._waiting = True  # close() now leaves the descriptor to us (see close)
            try:
                self._poll.poll()  # outside the lock: writers go on while this reader waits
            except OSError:
                pass
            with self._lock:
                self._waiting = False
                if self._closed:
                    self._release()
                    return b""

    def send_some(self, view):
        """Encrypt and hand to the kernel as much of ``view`` as it takes now; returns how many
        bytes of ``view`` were taken (0 when none). After a return short of ``len(view)`` the next
        call must start with the bytes not taken (an ordered outbox does)."""
        sent = 0
        with self._lock:
            if self._closed:
                raise OSError("send on a closed TLS transport")
            while sent < len(view):
                size = self._pending or min(SEND_CHUNK, len(view) - sent)
                try:
                    sent += self._ssl.send(view[sent:sent + size])
                    self._pending = 0
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self._pending = size
                    break
                except ssl.SSLError as exc:
                    raise OSError(f"TLS send failed: {exc.reason or exc}") from None
        return sent

    def shutdown(self):
        """Wake a reader waiting in ``recv`` (it returns b""); the peer sees the end. The plain
        socket call, not SSLSocket's, which would drop the SSL object under a reader's feet."""
        self._closed = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._ssl, socket.SHUT_RDWR)

    def close(self):
        """Idempotent. The descriptor is closed here, or, while a reader waits in ``poll``, by
        that reader once ``shutdown`` has woken it: closed under its feet, the number could be
        reused by a new connection and the reader would wait on a stranger's socket."""
        self.shutdown()
        with self._lock:  # never free the SSL object while a call is inside it
            if not self._waiting:
                self._release()

    def _release(self):
        """Close the descriptor (call with the lock held)."""
        self._ssl.close()

