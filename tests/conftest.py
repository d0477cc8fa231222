"""Fixtures: factories for servers that are always stopped after the test."""

import logging

import pytest

from activitynet.testing.netcut import Relay

import lockcheck
from certs import OPENSSL, SKIP_REASON, make_certs
from harness import LocalServer, ServerProcess, server_errors


@pytest.fixture(autouse=True)
def no_server_crashes(caplog):
    """Every test: no server thread may fail with a traceback, whatever a peer sent. (The
    connection threads catch and log unexpected exceptions to keep serving others, so a crash
    shows up as a logged traceback, not as an unhandled thread exception.)"""
    yield
    crashes = server_errors(caplog, tracebacks_only=True)
    assert not crashes, "server tracebacks:\n" + "\n".join(crashes)


@pytest.fixture(autouse=True)
def lock_rule(monkeypatch):
    """Every test: no in-process server writes, shuts down or closes a socket while holding the
    state lock (see lockcheck.py). Yields the Watch, for tests that look at it."""
    watch = lockcheck.install(monkeypatch)
    yield watch
    assert not watch.violations, "socket I/O under the state lock:\n" + "\n".join(watch.violations[:3])


@pytest.fixture
def no_server_errors(caplog):
    """Stricter, for tests of hostile input: the server may not even log an ERROR."""
    caplog.set_level(logging.WARNING)
    yield
    errors = server_errors(caplog)
    assert not errors, "server logged errors:\n" + "\n".join(errors)


@pytest.fixture
def make_server():
    """``make_server(remote=None, **settings)`` -> a LocalServer in this process."""
    servers = []

    def make(remote=None, **settings):
        server = LocalServer(remote=remote, **settings)
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def make_process():
    """``make_process(remote_port=None, ...)`` -> a started ServerProcess (python -m ...)."""
    processes = []

    def make(remote_port=None, **kwargs):
        process = ServerProcess(remote_port=remote_port, **kwargs)
        processes.append(process)
        return process.start()

    yield make
    for process in reversed(processes):
        process.stop()


@pytest.fixture
def make_relay():
    """``make_relay(target_port, **options)`` -> a ``netcut.Relay``, closed after the test."""
    relays = []

    def make(target_port, **options):
        relay = Relay(target_port, **options)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


@pytest.fixture
def recorders():
    """Recorders to close after the test: ``recorders.append(r)``."""
    opened = []
    yield opened
    for recorder in opened:
        recorder.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """The test CAs and certificates (tests/certs.py), made once a run; skips without openssl."""
    if OPENSSL is None:
        pytest.skip(SKIP_REASON)
    return make_certs(tmp_path_factory.mktemp("certs"))
