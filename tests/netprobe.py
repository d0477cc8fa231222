"""Reading the network map from running servers (issue 9), for tests and the chaos run.

A ``MapProbe`` authenticates to a server as a silent server link that never announces itself (so
it is in nobody's map, and no server counts it as a child) and keeps the network map the server
sends on SERVER_ANNOUNCE, answering with heartbeats. A network of n servers has settled when every
survivor's map holds exactly the survivors, joined by n - 1 links both ends confirm: one tree.
"""

import json
import socket
import threading
import time

import pytest

from activitynet.netmap import Entry, NetMap
from harness import SECRET, wait_until

LONG = 60.0


class MapProbe:
    """Authenticates to a server as a silent server link and keeps the latest network map the
    server announces (our extension of SERVER_ANNOUNCE), answering with heartbeats."""

    def __init__(self, port):
        self.port = port
        self.map = None
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=LONG)
        self._sock.sendall(json.dumps({"command": "AUTHENTICATE", "secret": SECRET}).encode() + b"\n")
        self._stop = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _read(self):
        for line in self._sock.makefile("rb"):
            if line.strip() == b"h":
                continue
            message = json.loads(line)
            if message.get("command") == "SERVER_ANNOUNCE" and "map" in message:
                self.map = message["map"]

    def _beat(self):
        while not self._stop.wait(1.0):
            try:
                self._sock.sendall(b"h\n")
            except OSError:
                return

    def network(self):
        """(servers in this server's network, links both ends confirm) from its latest map."""
        if self.map is None:
            return set(), 0
        me = f"127.0.0.1:{self.port}"
        netmap = NetMap(me, 0, None)
        netmap.entries = {a: Entry.from_wire(v, a) for a, v in self.map.items()}
        inside = netmap.component()
        links = sum(1 for a in inside if netmap.entries[a].up and netmap.linked(a, netmap.entries[a].up))
        return inside, links

    def close(self):
        self._stop.set()
        self._sock.close()


@pytest.fixture
def probes():
    opened = []

    def probe(server):
        opened.append(MapProbe(server.port))
        return opened[-1]
    yield probe
    for p in opened:
        p.close()


def address(server):
    return f"127.0.0.1:{server.port}"


def wait_one_network(probes, servers, timeout=LONG):
    """Wait until each of ``servers`` sees exactly ``servers`` as its network, with
    len(servers) - 1 links (one tree); returns the seconds it took."""
    want = {address(s) for s in servers}
    watching = [probes(s) for s in servers]
    started = time.monotonic()
    wait_until(lambda: all(p.network() == (want, len(want) - 1) for p in watching), timeout,
               interval=0.1, message=f"one network of {sorted(want)}: "
               + "; ".join(f"{p.port}: {p.network()}" for p in watching))
    for p in watching:
        p.close()
    return time.monotonic() - started
