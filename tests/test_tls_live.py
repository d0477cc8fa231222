"""TLS (issue 11, item 6) on real server processes: links in a chain over TLS, plain and TLS
clients on one port, --tls-required refusing a plain AUTHENTICATE, a certificate from another CA
refused, bad TLS files refused at start, and the login deadline ending a stalled handshake.

Certificates are made for each run with the openssl command (tests/certs.py). The TLS clients
here are raw ``ssl`` sockets speaking JSON lines; our client library's ``--tls`` is tested with it.
"""

import socket
import ssl
import subprocess
import sys
import time

import pytest

from activitynet.client import Client
from certs import OPENSSL, SKIP_REASON
from harness import ROOT, SECRET, LineClient, activity, login, wait_until

pytestmark = pytest.mark.skipif(OPENSSL is None, reason=SKIP_REASON)


def tls_flags(identity, required=False):
    flags = ["--tls-cert", identity.cert, "--tls-key", identity.key, "--tls-ca", identity.ca]
    return flags + (["--tls-required"] if required else [])


class TlsLineClient(LineClient):
    """A LineClient over TLS, checking the server against ``ca`` (as our client's --tls-ca)."""

    def __init__(self, port, ca, cert=None, key=None):
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.timeout, self._buffer, self.eof = 20.0, b"", False


def test_a_chain_of_three_servers_links_over_tls(make_process, certs):
    a = make_process(extra=tls_flags(certs.server))
    b = make_process(remote_port=a.port, extra=tls_flags(certs.server))
    c = make_process(remote_port=b.port, extra=tls_flags(certs.server))
    for dialler, target in ((b, a), (c, b)):
        wait_until(lambda: dialler.find_log(rf"connected to server 127\.0\.0\.1:{target.port} over TLSv1\.3"),
                   message="a TLS link")
    wait_until(lambda: a.find_log(r"server 127\.0\.0\.1:\d+ authenticated")
               and b.find_log(r"server 127\.0\.0\.1:\d+ authenticated"), message="both links up")
    first, last = login(a.port), login(c.port)  # plain clients, as Project 1's
    wait_until(lambda: _delivered(first, last), timeout=20, message="an activity across the chain")
    activity(last, {"back": "again"})
    wait_until(lambda: _has(first, "back"), message="an activity back along the chain")


def _delivered(sender, receiver):
    """Send a probe from ``sender``; True once ``receiver`` got it (links may still be starting)."""
    activity(sender, {"probe": True})
    return _has(receiver, "probe", timeout=1)


def _has(client, key, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = client.recv(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            return False
        if message is None:
            return False
        if message["command"] == "ACTIVITY_BROADCAST" and key in message["activity"]:
            return True
    return False


def test_plain_and_tls_clients_share_one_port(make_process, certs):
    server = make_process(extra=tls_flags(certs.server))
    secure = TlsLineClient(server.port, certs.ca)
    secure.send({"command": "LOGIN", "username": "anonymous"})
    secure.expect("LOGIN_SUCCESS")
    plain = login(server.port)
    activity(plain, {"from": "plain"})
    assert secure.expect("ACTIVITY_BROADCAST")["activity"]["from"] == "plain"
    activity(secure, {"from": "tls"})
    messages = [plain.expect("ACTIVITY_BROADCAST")["activity"]["from"] for _ in range(2)]
    assert messages == ["plain", "tls"]
    assert secure.sock.version() == "TLSv1.3"


def test_our_client_library_over_tls_talks_to_a_plain_client(make_process, certs):
    server = make_process(extra=tls_flags(certs.server))
    with Client("127.0.0.1", server.port, tls_ca=certs.ca, redirect_wait=0) as secure:
        secure.login()
        assert secure.sock.version() == "TLSv1.3"
        plain = login(server.port)
        activity(plain, {"to": "tls"})
        assert _received(secure)["to"] == "tls"
        secure.send_activity({"to": "plain"})
        assert [plain.expect("ACTIVITY_BROADCAST")["activity"]["to"] for _ in range(2)] == ["tls", "plain"]
    with pytest.raises(ssl.SSLCertVerificationError):  # a client trusting another CA
        Client("127.0.0.1", server.port, tls_ca=certs.other_ca, redirect_wait=0).login()


def _received(client):
    while True:
        message = client.recv(timeout=20)
        assert message is not None, "the server closed the TLS client"
        if message["command"] == "ACTIVITY_BROADCAST":
            return message["activity"]


def test_tls_required_refuses_a_plain_authenticate_before_any_user_is_sent(make_process, certs):
    server = make_process(extra=tls_flags(certs.server, required=True))
    alice = LineClient(server.port)
    alice.send({"command": "REGISTER", "username": "alice", "secret": "private"})
    alice.expect("REGISTER_SUCCESS")

    plain = LineClient(server.port)
    plain.send({"command": "AUTHENTICATE", "secret": SECRET})  # the right secret, in clear
    refusal = plain.expect("AUTHENTICATION_FAIL")  # the very next line: no SYNC_USER before it
    assert "only over TLS (--tls-required)" in refusal["info"], refusal
    plain.expect_closed()

    secure = TlsLineClient(server.port, certs.ca, certs.server.cert, certs.server.key)
    secure.send({"command": "AUTHENTICATE", "secret": SECRET})
    assert secure.expect("SYNC_USER")["users"] == {"alice": "private"}
    secure.close()
    client = login(server.port)  # clients may still log in over plain TCP
    client.close()


def test_a_plain_server_dialling_a_tls_required_server_is_refused(make_process, certs):
    a = make_process(extra=tls_flags(certs.server, required=True))
    b = make_process(remote_port=a.port)  # no TLS files
    wait_until(lambda: b.find_log(r"refused our secret; not redialling it"), message="b to give up")
    assert a.find_log(r"only over TLS")


def test_a_server_with_a_certificate_from_another_ca_is_refused(make_process, certs):
    a = make_process(extra=tls_flags(certs.server))
    b = make_process(remote_port=a.port, extra=tls_flags(certs.other))  # trusts only other-ca
    wait_until(lambda: b.find_log(r"cannot reach server 127\.0\.0\.1:\d+ \(certificate refused"),
               message="b to refuse a's certificate")
    wait_until(lambda: a.find_log(r"TLS connection from 127\.0\.0\.1:\d+ refused"),
               message="a to log the failed handshake")
    assert not a.find_log(r"authenticated")
    # And a TLS client that trusts another CA does not get through either.
    with pytest.raises(ssl.SSLCertVerificationError):
        TlsLineClient(a.port, certs.other_ca)
    # A dialler showing a certificate of another CA is refused by the listener itself (with TLS
    # 1.3 the refusal may arrive after the dialler thinks its handshake is done).
    try:
        peer = TlsLineClient(a.port, certs.ca, certs.other.cert, certs.other.key)
        peer.send({"command": "AUTHENTICATE", "secret": SECRET})
        outcome = peer.recv()
    except (ssl.SSLError, OSError) as exc:
        outcome = exc
    assert outcome is None or isinstance(outcome, (ssl.SSLError, OSError)), outcome
    assert not a.find_log(r"authenticated")


def test_a_stalled_tls_handshake_ends_at_the_login_deadline(make_process, certs):
    server = make_process(extra=tls_flags(certs.server) + ["--login-timeout", "2"])
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    started = time.monotonic()
    assert stalled.recv(100) == b""
    took = time.monotonic() - started
    assert 1.5 < took < 4.0, f"closed after {took:.2f} s; the deadline is 2 s"
    silent = LineClient(server.port)  # with TLS on, a silent plain connection is still told why
    assert "within 2 s" in silent.expect("INVALID_MESSAGE", timeout=10)["info"]


@pytest.mark.parametrize("flags, words", [
    (["--tls-cert", "x.pem"], "TLS needs --tls-cert, --tls-key and --tls-ca together"),
    (["--tls-required"], "--tls-required needs --tls-cert, --tls-key and --tls-ca"),
])
def test_incomplete_tls_options_are_usage_errors(flags, words):
    result = subprocess.run([sys.executable, "-m", "activitynet.server", "-lp", "0", *flags],
                            cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_unusable_tls_files_stop_the_server_at_start_with_the_file_named(certs, tmp_path):
    missing = str(tmp_path / "nowhere.pem")
    result = subprocess.run([sys.executable, "-m", "activitynet.server", "-lp", "0", "--bind", "127.0.0.1",
                             "--tls-cert", certs.other.cert, "--tls-key", certs.other.key,
                             "--tls-ca", certs.ca], cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"--tls-cert {certs.other.cert} does not verify against --tls-ca {certs.ca}" in result.stderr
    result = subprocess.run([sys.executable, "-m", "activitynet.server", "-lp", "0", "--bind", "127.0.0.1",
                             "--tls-cert", missing, "--tls-key", certs.server.key, "--tls-ca", certs.ca],
                            cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"--tls-cert {missing}" in result.stderr, result.stderr


def test_the_tls_start_up_line_says_so(make_process, certs):
    server = make_process(extra=tls_flags(certs.server, required=True))
    line = server.find_log(r"listening on").string
    assert "TLS on links, required for AUTHENTICATE" in line, line
