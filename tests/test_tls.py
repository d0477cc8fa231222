"""TLS pieces on real sockets over 127.0.0.1: the contexts built from --tls-cert/--tls-key/--tls-ca
and their errors, telling TLS from plain by the first byte, and TlsTransport carrying data both
ways at once (a reader blocked in recv while another thread sends) without loss or reordering.
Certificates are made for each run with the openssl command (tests/certs.py)."""

import random
import select
import socket
import sys
import threading
import time

import pytest

from activitynet import tls
from activitynet.tls import TlsConfigError, TlsHandshakeError, TlsTransport
from certs import OPENSSL, SKIP_REASON
from harness import TIMEOUT, wait_until

pytestmark = pytest.mark.skipif(OPENSSL is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def contexts(certs):
    return tls.check_files(certs.server.cert, certs.server.key, certs.ca)


@pytest.fixture
def pair():
    """``pair()`` -> (accepted socket, connected socket) over 127.0.0.1, closed after the test."""
    listener = socket.create_server(("127.0.0.1", 0))
    opened = []

    def make():
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
        opened.extend([client, server])
        return server, client

    yield make
    for sock in opened:
        sock.close()
    listener.close()


def handshake(pair, server_ctx, client_ctx, hostname="localhost"):
    """Both ends of a TLS connection: (server transport, client transport)."""
    raw_server, raw_client = pair()
    result = {}

    def accept():
        try:
            result["server"] = TlsTransport.accept(raw_server, server_ctx, timeout=TIMEOUT)
        except TlsHandshakeError as exc:
            result["server"] = exc

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        client = TlsTransport.connect(raw_client, client_ctx, hostname, timeout=TIMEOUT)
    finally:
        thread.join(TIMEOUT)
    if isinstance(result["server"], Exception):
        raise result["server"]
    return result["server"], client


def send_all(transport, data):
    """What an outbox does: non-blocking sends, waiting for writability when refused.
    Returns how many times the kernel refused (0 returned by send_some)."""
    view, refused = memoryview(data), 0
    poller = select.poll()
    poller.register(transport.fileno(), select.POLLOUT)
    while view:
        sent = transport.send_some(view)
        if sent == 0:
            refused += 1
            assert poller.poll(TIMEOUT * 1000), "never writable again"
        view = view[sent:]
    return refused


def recv_exactly(transport, size):
    chunks, got = [], 0
    while got < size:
        data = transport.recv(65536)
        assert data, f"EOF after {got} of {size} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


# --- contexts and their errors -------------------------------------------------------------------

def test_a_certificate_from_another_ca_is_refused_at_start_up(certs):
    with pytest.raises(TlsConfigError, match="does not verify against --tls-ca"):
        tls.check_files(certs.other.cert, certs.other.key, certs.ca)


def test_a_certificate_that_may_only_serve_is_refused_at_start_up_with_the_fix(certs):
    with pytest.raises(TlsConfigError, match="certificate purpose .*serverAuth and clientAuth"):
        tls.check_files(certs.server_only.cert, certs.server_only.key, certs.ca)


def test_a_key_that_is_not_the_certificates_own_is_named(certs):
    with pytest.raises(TlsConfigError, match=r"--tls-key .*other\.key is not the key of the certificate"):
        tls.check_files(certs.server.cert, certs.other.key, certs.ca)


@pytest.mark.parametrize("option", ["--tls-cert", "--tls-key", "--tls-ca"])
def test_a_missing_file_is_named_with_its_option(certs, tmp_path, option):
    files = {"--tls-cert": certs.server.cert, "--tls-key": certs.server.key, "--tls-ca": certs.ca}
    files[option] = str(tmp_path / "missing.pem")
    with pytest.raises(TlsConfigError, match=rf"{option} .*missing\.pem: No such file"):
        tls.check_files(files["--tls-cert"], files["--tls-key"], files["--tls-ca"])


def test_files_of_the_wrong_kind_are_explained(certs, tmp_path):
    with pytest.raises(TlsConfigError, match="--tls-ca .*holds no PEM certificate"):
        tls.check_files(certs.server.cert, certs.server.key, certs.server.key)
    with pytest.raises(TlsConfigError, match="--tls-ca .*holds no CA certificate"):
        tls.check_files(certs.server.cert, certs.server.key, certs.server.cert)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="expected a PEM certificate and its unencrypted PEM key"):
        tls.check_files(str(garbage), certs.server.key, certs.ca)


def test_contexts_insist_on_tls_1_3_and_on_verifying_the_dialled_peer(contexts):
    server_ctx, client_ctx = contexts
    assert server_ctx.minimum_version == client_ctx.minimum_version == tls.ssl.TLSVersion.TLSv1_3
    assert client_ctx.check_hostname and client_ctx.verify_mode == tls.ssl.CERT_REQUIRED
    assert server_ctx.verify_mode == tls.ssl.CERT_OPTIONAL  # plain-client-like TLS clients show none


# --- sniffing ------------------------------------------------------------------------------------

def test_sniff_tells_a_json_line_from_a_tls_hello_without_consuming_it(pair, contexts):
    server, client = pair()
    client.sendall(b'{"command":"LOGIN","username":"anonymous"}\n')
    assert tls.sniff(server, timeout=TIMEOUT) == "plain"
    assert server.recv(1) == b"{"  # still there for the line reader
    assert server.gettimeout() is None  # and the socket is blocking again

    server, client = pair()
    client_ctx = contexts[1]
    threading.Thread(target=lambda: _try_handshake(client, client_ctx), daemon=True).start()
    assert tls.sniff(server, timeout=TIMEOUT) == "tls"
    assert server.recv(1, socket.MSG_PEEK) == bytes([tls.HANDSHAKE_BYTE])


def _try_handshake(sock, context):
    try:
        TlsTransport.connect(sock, context, "localhost", timeout=2)
    except TlsHandshakeError:
        pass


def test_sniff_reports_a_silent_peer_after_its_timeout_and_a_closed_one_at_once(pair):
    server, client = pair()
    started = time.monotonic()
    assert tls.sniff(server, timeout=0.2) == "silent"
    assert time.monotonic() - started < TIMEOUT
    client.close()
    assert tls.sniff(server, timeout=TIMEOUT) == "closed"


# --- handshakes ----------------------------------------------------------------------------------

def test_a_link_handshake_verifies_both_ends(pair, contexts):
    server, client = handshake(pair, *contexts)
    try:
        assert server.version == client.version == "TLSv1.3"
        assert server.peer_cert is not None, "the dialling server showed its certificate"
        assert dict(x[0] for x in client.peer_cert["subject"])["commonName"] == "localhost"
        assert client.peer[0] == server.peer[0] == "127.0.0.1"
    finally:
        server.close()
        client.close()


def test_a_server_with_a_certificate_from_another_ca_is_refused_when_dialled(pair, certs, contexts):
    rogue_ctx = tls.server_context(certs.other.cert, certs.other.key, certs.other_ca)
    rogue_ctx.verify_mode = tls.ssl.CERT_NONE  # so that only the dialler's check is tested
    raw_server, raw_client = pair()
    threading.Thread(target=_try_accept, args=(raw_server, rogue_ctx), daemon=True).start()
    with pytest.raises(TlsHandshakeError, match="certificate refused: .*(local issuer|self-signed)"):
        TlsTransport.connect(raw_client, contexts[1], "localhost", timeout=TIMEOUT)


def _try_accept(sock, context):
    try:
        TlsTransport.accept(sock, context, timeout=TIMEOUT).close()
    except TlsHandshakeError:
        pass


def test_a_dialler_showing_a_certificate_from_another_ca_is_refused_by_the_listener(pair, certs, contexts):
    intruder_ctx = tls.client_context(certs.ca, certs.other.cert, certs.other.key)
    # TLS 1.3: the dialler's side finishes first; the listener checks its certificate after
    with pytest.raises(TlsHandshakeError, match="certificate refused: unable to get local issuer"):
        handshake(pair, contexts[0], intruder_ctx)


def test_a_peer_not_named_by_the_certificate_is_refused(pair, contexts):
    with pytest.raises(TlsHandshakeError, match="certificate refused: Hostname mismatch"):
        handshake(pair, *contexts, hostname="elsewhere.example")


def test_a_tls_client_without_a_certificate_is_served(pair, certs, contexts):
    server, client = handshake(pair, contexts[0], tls.client_context(certs.ca))
    try:
        assert server.peer_cert is None
        send_all(client, b"hello\n")
        assert recv_exactly(server, 6) == b"hello\n"
    finally:
        server.close()
        client.close()


def test_a_plain_line_where_tls_is_expected_fails_the_handshake_cleanly(pair, contexts):
    raw_server, raw_client = pair()
    raw_client.sendall(b'{"command":"AUTHENTICATE","secret":"x"}\n')
    with pytest.raises(TlsHandshakeError, match="TLS handshake failed"):
        TlsTransport.accept(raw_server, contexts[0], timeout=TIMEOUT)


def test_a_peer_that_never_finishes_its_handshake_times_out(pair, contexts):
    raw_server, _raw_client = pair()
    with pytest.raises(TlsHandshakeError, match="not finished within 0.2 s"):
        TlsTransport.accept(raw_server, contexts[0], timeout=0.2)


# --- the transport -------------------------------------------------------------------------------

def test_both_directions_at_once_arrive_whole_and_in_order(pair, contexts):
    """Each end has a reader thread blocked in recv while the main thread sends 8 MB: the
    one-step lock lets the writer through, and nothing is lost, duplicated or reordered."""
    server, client = handshake(pair, *contexts)
    size = 8 * 1024 * 1024
    payloads = {end: random.Random(seed).randbytes(size) for seed, end in enumerate((server, client))}
    received = {}

    def read(end):
        received[end] = recv_exactly(end, size)

    readers = [threading.Thread(target=read, args=(end,)) for end in (server, client)]
    for thread in readers:
        thread.start()
    writers = [threading.Thread(target=send_all, args=(end, payloads[end])) for end in (server, client)]
    for thread in writers:
        thread.start()
    for thread in writers + readers:
        thread.join(TIMEOUT * 3)
    try:
        assert received[client] == payloads[server]
        assert received[server] == payloads[client]
    finally:
        server.close()
        client.close()


def test_a_refused_send_is_resumed_with_the_same_bytes(pair, contexts):
    """The peer does not read yet, so the kernel refuses us in the middle of a chunk: OpenSSL
    holds part of a record, and the retry (what the poller does) completes it exactly once."""
    raw_server, raw_client = pair()
    raw_server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "server", TlsTransport.accept(raw_server, contexts[0], timeout=TIMEOUT)))
    thread.start()
    client = TlsTransport.connect(raw_client, contexts[1], "localhost", timeout=TIMEOUT)
    thread.join(TIMEOUT)
    server = result["server"]
    data = random.Random(7).randbytes(128 * 1024)  # tiny buffers move slowly: keep it short
    sent = server.send_some(memoryview(data))
    assert sent < len(data) and server._pending, "the kernel never refused: nothing was tested"
    writer = threading.Thread(target=send_all, args=(server, data[sent:]))
    writer.start()
    try:
        assert recv_exactly(client, len(data)) == data
        writer.join(TIMEOUT)
    finally:
        server.close()
        client.close()


def blocked_in_recv(thread):
    """Whether ``thread`` is inside TlsTransport.recv (waiting in poll: its innermost Python frame)."""
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code is TlsTransport.recv.__code__


def reader_waiting_in_recv(transport):
    """A thread blocked in ``transport.recv()``, and the list its result will be appended to."""
    results = []
    reader = threading.Thread(target=lambda: results.append(transport.recv()))
    reader.start()
    wait_until(lambda: blocked_in_recv(reader), message="the reader to wait in recv")
    return reader, results


def test_shutdown_wakes_a_reader_blocked_in_recv(pair, contexts):
    server, client = handshake(pair, *contexts)
    reader, results = reader_waiting_in_recv(server)
    server.shutdown()
    reader.join(TIMEOUT)
    assert results == [b""]
    assert client.recv() == b""  # the peer sees the end too
    server.close()
    client.close()
    with pytest.raises(OSError):
        server.send_some(memoryview(b"late"))


def test_close_while_a_reader_waits_ends_the_reader_not_the_process(pair, contexts):
    """What Connection.close does from another thread (the deadline thread, a slow-consumer
    cut): the waiting reader returns b"" and nothing raises in either thread."""
    server, client = handshake(pair, *contexts)
    reader, results = reader_waiting_in_recv(server)
    server.close()
    reader.join(TIMEOUT)
    assert results == [b""]
    assert server.fileno() == -1, "the woken reader closes the descriptor it was waiting on"
    server.close()  # idempotent
    client.close()


def test_the_peer_closing_is_eof(pair, contexts):
    server, client = handshake(pair, *contexts)
    send_all(client, b"last words\n")
    client.close()
    assert recv_exactly(server, 11) == b"last words\n"
    wait_until(lambda: server.recv() == b"", message="EOF after the peer closed")
    server.close()
