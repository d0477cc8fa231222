"""A stand-in for a running server, as the monitor sees one (``monitor.Source``): plain data the
test changes between requests, and real ``Counters``. Lets the monitor, the page and the status
command be tested against a real HTTP server without a relay behind it."""

import threading
import time

from activitynet import __version__
from activitynet.stats import Counters


def client(number, user="anonymous", since=None, queued=0):
    return {"id": number, "address": f"127.0.0.1:{40000 + number}", "user": user,
            "since": since or time.time() - 60, "messages_in": number % 7, "messages_out": number % 11,
            "bytes_queued": queued}


def link(number, peer, live=True, load=0, phase="live", initiator=False):
    return {"id": number, "address": f"127.0.0.1:{50000 + number}", "peer": peer, "initiator": initiator,
            "since": time.time() - 30, "phase": phase, "live": live, "load": load, "bytes_queued": 0,
            "last_heard_s": 0.5, "activities_sent": 10 * number, "activities_received": 20 * number}


class FakeSource:
    """The monitor's view of a server; every field may be changed by the test at any time."""

    def __init__(self, port=3780, clients=(), links=(), network=None):
        self.counters = Counters()
        self.stopping = threading.Event()
        self.healthy = True
        self.network_map = network
        self.started_at = time.time() - 3725  # up 1 h 2 min 5 s
        self.hostname, self.port = "127.0.0.1", port
        self.clients = list(clients)
        self.links = list(links)
        self.users = 3
        self.snapshots = 0

    @property
    def address(self):
        return f"{self.hostname}:{self.port}"

    def snapshot(self, clients=True):
        self.snapshots += 1
        snapshot = {
            "origin": f"origin-{self.port}", "hostname": self.hostname, "port": self.port,
            "client_count": len(self.clients),
            "client_bytes_queued": sum(c["bytes_queued"] for c in self.clients),
            "links": [dict(l) for l in self.links],
            "users": self.users, "blocked": 1, "logged_in_names": len({c["user"] for c in self.clients}),
            "history": {"entries": 42, "bytes": 4200}, "pending": 2,
            "version": __version__, "started_at": self.started_at,
            "settings": {"local_port": self.port, "history": 100000, "max_outbox": 16777216},
        }
        if clients is True:
            snapshot["clients"] = [dict(c) for c in self.clients]
        elif isinstance(clients, slice):
            snapshot["clients"] = [dict(c) for c in self.clients[clients]]
        return snapshot

    def counter_values(self):
        return self.counters.as_dict()

    def health(self):
        return None if self.healthy else "the durable store cannot write: disk full"

    def network(self):
        return self.network_map
