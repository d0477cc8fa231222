"""The self-healing scenario (issue 9): 7 servers in a tree of depth 3, R <- (M1 <- L1, L2),
(M2 <- L3, L4); one killed for good (a leaf, a middle one, the root) or two at once (the root and
a middle one), ``runs`` times each, with a sender and a receiver on every server sending
throughout.

The servers run in this process (``activitynet.server.Server``), so what they know is read from
them directly: ``State.network()`` (one network: every survivor's map holds exactly the
survivors, with servers - 1 links both ends confirm) and ``State.snapshot()`` (activities received
per link) and the servers' counters (duplicates dropped). A kill closes every socket of the server at once, as SIGKILL
does, so the survivors detect the death at the kill: the time to one network is measured from it.
Figures: seconds from the kill to one network (median, p99); lost, duplicated or reordered at the
clients of survivors; link crossings of one broadcast after settling (must be servers - 1); and
what re-forming cost: activities received on the new links per activity they brought that was new.
"""

import json
import logging
import resource
import socket
import statistics
import threading
import time

from activitynet.server import Server, Settings

from .report import Target
from .scenarios import scenario

SECRET = "bench-secret"
TREE = {"R": None, "M1": "R", "M2": "R", "L1": "M1", "L2": "M1", "L3": "M2", "L4": "M2"}
KILLS = {"leaf": ("L1",), "middle": ("M1",), "root": ("R",), "two": ("R", "M1")}
SEND_EVERY = 0.02  # each sender, throughout: activities race the re-forming
WAIT = 60.0


class Peer:
    """A raw client: logs in, sends numbered activities, records the ones it receives."""

    def __init__(self, port, name):
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.sendall(b'{"command": "LOGIN", "username": "anonymous"}\n')
        self.got = []  # (sender, seq, id)
        self.lock = threading.Lock()
        self.reader = self.sock.makefile("rb")
        first = json.loads(self.reader.readline())
        assert first["command"] == "LOGIN_SUCCESS", first
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in self.reader:
                message = json.loads(line)
                if message.get("command") == "ACTIVITY_BROADCAST":
                    body = message["activity"]
                    with self.lock:
                        self.got.append((body.get("sender"), body.get("seq"), message["id"]))
        except (OSError, ValueError):
            pass

    def send(self, seq):
        line = json.dumps({"command": "ACTIVITY_MESSAGE", "username": "anonymous",
                           "activity": {"sender": self.name, "seq": seq}}) + "\n"
        try:
            self.sock.sendall(line.encode())
            return True
        except OSError:
            return False

    def received(self):
        with self.lock:
            return list(self.got)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def start(remote_port=None):
    settings = Settings(local_port=0, local_host="127.0.0.1", bind="127.0.0.1", secret=SECRET,
                        remote_host="127.0.0.1" if remote_port else None, remote_port=remote_port or 0)
    server = Server(settings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def one_network(servers):
    want = {f"127.0.0.1:{s.port}" for s in servers}
    for server in servers:
        network = server.state.network()
        inside = {s["address"] for s in network["servers"] if s["alive"]}
        if inside != want or len(network["links"]) != len(want) - 1:
            return False
    return True


def wait(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def received_on_links(servers, since=None):
    total = 0
    for server in servers:
        for link in server.state.snapshot()["links"]:
            if since is None or link["since"] >= since:
                total += link["activities_received"]
    return total


def quiet_count(servers, quiet=0.3):
    """``received_on_links`` once it stayed the same for ``quiet`` seconds (nothing in flight)."""
    last, since = received_on_links(servers), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = received_on_links(servers)
        if now != last:
            last, since = now, time.monotonic()
    return last


def one_run(kind):
    """One tree, one kill; returns the run's figures."""
    servers = {}
    for name, parent in TREE.items():
        servers[name] = start(servers[parent].port if parent else None)
    peers = {}
    try:
        wait(lambda: one_network(list(servers.values())), "the tree to form")
        receivers = {name: Peer(s.port, f"r-{name}") for name, s in servers.items()}
        senders = {name: Peer(s.port, f"s-{name}") for name, s in servers.items()}
        peers = {peer.name: peer for peer in [*receivers.values(), *senders.values()]}
        stop = threading.Event()
        sent = {name: [] for name in senders}

        def send_loop(name):
            seq = 0
            while not stop.wait(SEND_EVERY):
                seq += 1
                if not senders[name].send(seq):
                    return
                sent[name].append(seq)
        threads = [threading.Thread(target=send_loop, args=(n,), daemon=True) for n in senders]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # traffic flowing before the kill (the pace of the scenario)
        dead = KILLS[kind]
        survivors = [s for n, s in servers.items() if n not in dead]
        duplicates_before = sum(s.counters.activities_deduplicated for s in survivors)
        killed_at_wall = time.time()
        killed_at = time.monotonic()
        for name in dead:
            servers[name].request_shutdown()
        wait(lambda: one_network(survivors), "one network of the survivors")
        healed = time.monotonic() - killed_at
        time.sleep(0.5)  # traffic over the healed network too
        stop.set()
        for thread in threads:
            thread.join()
        # every activity a surviving server accepted (echoed to its sender), at every survivor's clients
        alive = [n for n in servers if n not in dead]
        accepted = {f"s-{n}": {seq for sender, seq, _ in senders[n].received() if sender == f"s-{n}"}
                    for n in alive}

        def complete():
            return all(accepted[s] <= {q for x, q, _ in peers[p].received() if x == s}
                       for p in [f"r-{n}" for n in alive] for s in accepted)
        wait(complete, "every accepted activity at every survivor's receiver")
        wrong = 0
        for n in alive:
            got = receivers[n].received()
            ids = [i for _, _, i in got]
            wrong += len(ids) - len(set(ids))
            for s in {x for x, _, _ in got}:
                seqs = [q for x, q, _ in got if x == s]
                wrong += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        resent = received_on_links(survivors, since=killed_at_wall)
        duplicates = sum(s.counters.activities_deduplicated for s in survivors) - duplicates_before
        # one broadcast after settling: how many links it crosses (once nothing else is in flight)
        before = quiet_count(survivors)
        probe = senders[alive[0]]
        probe.send(10**9)
        wait(lambda: all(any(q == 10**9 for _, q, _ in receivers[n].received()) for n in alive),
             "the probe everywhere")
        wait(lambda: received_on_links(survivors) - before >= len(survivors) - 1, "the probe's crossings", 5)
        time.sleep(0.2)  # a copy crossing one more link (a cycle) would show by now
        crossings = received_on_links(survivors) - before
        return {"healed_s": healed, "wrong": wrong, "crossings": crossings, "links_wanted": len(survivors) - 1,
                "resent": resent, "new_on_new_links": resent - duplicates}
    finally:
        for peer in peers.values():
            peer.close()
        for server in servers.values():
            server.request_shutdown()
        for server in servers.values():
            server.server_close()


@scenario("self-healing", "7 servers, depth 3: a leaf, a middle one, the root, or two die for good",
          full={"runs": 20}, short={"runs": 3}, smoke={"runs": 1})
def self_healing(ctx, runs):
    logging.getLogger("activitynet").setLevel(logging.ERROR)  # deaths are the point: no warnings
    results = {}
    for kind in KILLS:
        results[kind] = []
        for i in range(runs):
            ctx.progress.update(f"{kind}: run {i + 1} of {runs}")
            results[kind].append(one_run(kind))
    ctx.details["runs"] = results
    everything = [r for rs in results.values() for r in rs]
    for kind, rs in results.items():
        times = sorted(r["healed_s"] for r in rs)
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        ctx.row(f"{kind}: kill to one network, median of {len(rs)}", round(statistics.median(times), 2), "s",
                Target("<", 3.0))
        ctx.row(f"{kind}: kill to one network, p99 of {len(rs)}", round(p99, 2), "s", Target("<", 5.0))
    bad = [r for r in everything if r["crossings"] != r["links_wanted"]]
    ctx.row("broadcast link crossings after settling (servers - 1 each run)",
            sum(r["crossings"] for r in everything), "crossings", Target("==", sum(r["links_wanted"] for r in everything)),
            f"{len(bad)} runs off" if bad else "", check=True)
    resent = sum(r["resent"] for r in everything)
    new = sum(r["new_on_new_links"] for r in everything)
    ctx.row("re-forming: activities on new links per new one", round(resent / new, 2) if new else 0.0,
            "x", Target("<=", 2.0), f"{resent} received on new links, {new} of them new")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    ctx.row("peak RSS of this process (the servers run in it)", round(peak, 1), "MB")
    wrong = sum(r["wrong"] for r in everything)
    ctx.row(f"lost, duplicated or reordered ({len(everything)} runs)", wrong, "activities",
            Target("==", 0), check=True)
