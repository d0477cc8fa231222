"""The servers of a scenario: real processes and relays (``activitynet.testing``, shared with the
tests: ``ServerProcess``, and ``Relay``, which can cut a link between two of them).

Every server is ``python -m activitynet.server -lp 0 ... --bind 127.0.0.1 -lh 127.0.0.1``, found
by the ``listening on HOST:PORT`` line it logs at start. A ``Cluster`` owns the servers of one
scenario and stops them all when its ``with`` block ends, however it ends (failure, Ctrl-C).
"""

import resource
import subprocess

from activitynet.testing import HOST, Relay, ServerDidNotStart, ServerProcess

SECRET = "bench-secret"


class BenchmarkError(Exception):
    """A scenario could not run (a server did not start, a client could not log in, ...)."""


def raise_open_files_limit(wanted, raise_hard=False):
    """Let this process hold ``wanted`` sockets (up to the hard limit, or past it with
    ``raise_hard`` where the system allows, e.g. as root); returns the soft limit. Servers started
    afterwards inherit the limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_hard and hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
            hard = wanted
        except (ValueError, OSError):
            pass
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
