"""Chaos: a network of server processes under random crashes, freezes and cut links, and a checker
that proves it converged (issue 3).

The world: N servers in a tree. The root and one more are *stable* (never killed; frozen at
times); the others are *unstable* (SIGKILLed and restarted on their port, frozen with SIGSTOP).
Every link goes through a ``netcut.Relay``, so it can be cut (RST), black-holed (TCP open, bytes
dropped: only the heartbeat notices) and healed; the dialling server redials through it, and each
new link's opening is split into segments delayed at random, both ways (``RandomSegments``), as a
lossy network delivers it (issue 14). Clients
log in before the servers link up (so no REDIRECT moves them): on every server a *sender*
streaming numbered activities ({"sender": "<slot>.<incarnation>", "seq": n}) and an observer,
plus extra observers on the stable servers. A client whose server is killed logs in again (a new
incarnation, a new sender key). Meanwhile unique users are registered on random servers, and
every few seconds one name is registered on two servers with two secrets at once (a conflict,
often across a partition), and logged in under where that succeeded. And clients keep logging in
to the stable servers (following a REDIRECT once: the stable servers hold more clients) and out
again (LOGOUT, or just vanishing) after a moment: every login and logout is a load change
announced to the neighbours, often in the middle of a link's opening.

After the faults stop (everything healed, thawed, restarted) the network settles: every open
client sends a probe and we wait until every open client has every probe. Then the checker:

- every client (every incarnation, every short-lived one): no activity id twice, and each
  sender's activities strictly consecutive (no duplicate, no gap, no overtaking: per-origin order
  is what the design keeps);
- every client connected from start to end: all of them received the very same activities, each
  sender's from its first one on, and every *required* activity. An activity is required when its
  sender saw it echoed and (a) the sender's server was not killed from then to the end (it keeps
  it in its history, so recovery must spread it), or (b) any start-to-end client got it (some
  surviving server had it), or (c) its server lived ``GRACE`` s longer while no fault at all was
  active (it had time to spread);
- users: LOGIN with every name and secret we used, on every server, gives the same answer
  everywhere; names registered on a server not killed afterwards exist everywhere; a name
  registered with two secrets (both REGISTER_SUCCESS, neither server killed afterwards) exists
  nowhere, and every client logged in under it was disconnected with AUTHENTICATION_FAIL.

It prints what it did and checked. ``CHAOS_SEED`` and ``CHAOS_SECONDS`` choose the run (``make
chaos SEED=n CHAOS_SECONDS=s``); the seed decides the fault schedule, so a failure can be
replayed (thread timing aside). The bounded version runs in every ``make test``. On a failure
the run's timeline (faults, client lives, what was sent, what one observer received) and every
server's log are written to ``chaos.txt`` in the test's tmp_path; ``CHAOS_DUMP=1`` writes it
for a passing run too, and ``CHAOS_DEBUG=1`` starts the servers with ``--log-level debug``.
``CHAOS_DATA_DIRS=1`` gives every server a ``--data-dir`` (in tmp_path) that a killed server keeps
when it restarts; every name that got REGISTER_SUCCESS must then exist everywhere, killed or not.
"""

import heapq
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from activitynet.testing.netcut import DOWN, OPEN, UP, RandomSegments, Relay

from harness import TIMEOUT, LineClient, wait_until
from recorder import REDIRECT_WAIT, Recorder, Redirected, log_in, try_login

DEBUG = ("--log-level", "debug") if os.environ.get("CHAOS_DEBUG") else ()
DATA_DIRS = bool(os.environ.get("CHAOS_DATA_DIRS"))
CI_SEED = 20180501
CI_SECONDS = 45
LONG_SECONDS = int(os.environ.get("CHAOS_SECONDS", "300"))

GRACE = 3.0  # (c): how long a fault-free network needs to spread an activity
SETTLE = 5.0  # a fault counts as active this long after it ended (redial, recovery)
SEND_EVERY = 0.1  # each sender
CALM_CHANCE = 0.03  # per fault decision: no new faults until all end, then a quiet spell
REGISTER_EVERY = 0.25
CONFLICT_EVERY = 3.0
CLIENT_TIMEOUT = 10.0
CHURN_EVERY = (0.2, 0.8)  # a short-lived client logs in to a stable server this often (s),
#                           or where it redirects the client to
CHURN_STAY = (0.05, 2.0)  # and stays this long
SEGMENT_DELAY = 0.5  # at most this much delay for a segment of a link's opening (s)
OPENING = 3.0  # the first seconds of each new link are split and delayed
SETTLE_TIMEOUT = 90.0

# (parent, stable) per server; server 0 is the root.
TREE = [(None, True), (0, True), (0, False), (1, False), (2, False)]
BIG_TREE = TREE + [(1, False), (4, False)]


# --- the world ----------------------------------------------------------------------------------

@dataclass
class Node:
    index: int
    parent: int | None
    stable: bool
    process: object = None
    relay: Relay | None = None  # on the link to the parent
    up: bool = True
    frozen: bool = False
    kills: list = field(default_factory=list)  # kill times

    @property
    def name(self):
        return f"{'S' if self.stable else 'U'}{self.index}"

    def killed_after(self, t):
        return any(k >= t for k in self.kills)

    def next_kill(self, t):
        return min((k for k in self.kills if k >= t), default=None)


@dataclass
class Sent:
    key: str
    seq: int
    node: int
    at: float


@dataclass
class Registration:
    name: str
    secret: str
    node: int
    at: float
    outcome: str


class World:
    """Servers, relays, clients and the record of everything that happened."""

    def __init__(self, make_process, tree, seed, data_root=None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes = []
        self.port_to_node = {}
        self.faults = []  # [kind, target, start, end]
        self.fault_counts = {}
        self.calms = 0
        self.errors = []  # exceptions in our own threads
        self.slots = []
        self.registrations = []
        self.conflicts = []  # (name, [(node, secret, at, outcome, recorder or None)])
        self.churned = []  # short-lived clients (Recorders), logged in and out during the run
        self.churn_outcomes = {}  # "logout", "vanished", "redirected", "failed" -> count
        self.stop_clients = threading.Event()
        self.stop_users = threading.Event()
        self._lock = threading.Lock()  # guards registrations, conflicts, faults
        for index, (parent, stable) in enumerate(tree):
            node = Node(index, parent, stable)
            extra = DEBUG + (("--data-dir", str(data_root / f"server-{index}")) if data_root else ())
            if parent is None:
                node.process = make_process(extra=extra)
            else:
                node.relay = Relay(self.nodes[parent].process.port)
                node.relay.cut()  # no links until every client has logged in: no redirects
                for direction in (UP, DOWN):
                    node.relay.shape(direction, RandomSegments(f"{seed}/{index}", max_delay=SEGMENT_DELAY,
                                                               window=OPENING))
                node.process = make_process(remote_port=node.relay.port, extra=extra)
            self.port_to_node[node.process.port] = index
            self.nodes.append(node)

    def relays(self):
        return [node.relay for node in self.nodes if node.relay is not None]

    def close(self):
        self.stop_users.set()
        self.stop_clients.set()
        for slot in self.slots:
            slot.join()
            for recorder in slot.incarnations:
                recorder.close()
        for _name, attempts in self.conflicts:
            for attempt in attempts:
                if attempt[4] is not None:
                    attempt[4].close()
        for recorder in self.churned:
            recorder.close()
        for relay in self.relays():
            relay.close()

    def guarded(self, target, *args):
        """Run ``target`` in a thread; an exception is recorded and fails the test."""
        def run():
            try:
                target(*args)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{threading.current_thread().name}: {exc!r}")
        thread = threading.Thread(target=run, name=getattr(target, "__name__", "worker"), daemon=True)
        thread.start()
        return thread

    def healthy_nodes(self):
        return [node for node in self.nodes if node.up and not node.frozen]

    # --- faults ----------------------------------------------------------------------------

    def _fault_started(self, kind, target):
        record = [kind, target, time.monotonic(), None]
        with self._lock:
            self.faults.append(record)
            self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
        return record

    @staticmethod
    def _fault_ended(record):
        if record[3] is None:
            record[3] = time.monotonic()

    def random_fault(self, rng, schedule):
        now = time.monotonic()
        down = sum(1 for node in self.nodes if not node.up)
        frozen = sum(1 for node in self.nodes if node.frozen)
        choices = []
        if down < 2:
            choices += [("kill", node) for node in self.nodes if not node.stable and node.up] * 3
        if frozen < 2:
            choices += [("freeze", node) for node in self.nodes if node.up and not node.frozen]
        open_relays = [node for node in self.nodes if node.relay is not None and node.relay.mode == OPEN]
        choices += [("cut", node) for node in open_relays] * 2
        choices += [("blackhole", node) for node in open_relays]
        if not choices:
            return
        kind, node = rng.choice(choices)
        if kind == "kill":
            was_frozen = node.frozen
            node.up = False
            node.frozen = False
            node.process.kill()
            node.kills.append(time.monotonic())
            record = self._fault_started("kill", node.name)
            if was_frozen:
                self._end_open_faults("freeze", node.name)
            schedule(now + rng.uniform(0.5, 4.0), lambda: self._restart(node, record))
        elif kind == "freeze":
            node.frozen = True
            node.process.freeze()
            record = self._fault_started("freeze", node.name)
            schedule(now + rng.uniform(0.5, 5.0), lambda: self._thaw(node, record))
        elif kind == "cut":
            node.relay.cut()
            record = self._fault_started("cut", f"{node.name}-{self.nodes[node.parent].name}")
            schedule(now + rng.uniform(0.3, 4.0), lambda: self._heal(node, record))
        else:
            node.relay.blackhole()
            record = self._fault_started("blackhole", f"{node.name}-{self.nodes[node.parent].name}")
            schedule(now + rng.uniform(1.0, 6.0), lambda: self._heal(node, record))

    def _end_open_faults(self, kind, target):
        with self._lock:
            for record in self.faults:
                if record[0] == kind and record[1] == target:
                    self._fault_ended(record)

    def _restart(self, node, record):
        node.process.start()
        node.up = True
        self._fault_ended(record)

    def _thaw(self, node, record):
        if node.frozen:  # not killed meanwhile
            node.process.thaw()
            node.frozen = False
        self._fault_ended(record)

    def _heal(self, node, record):
        node.relay.heal()
        self._fault_ended(record)

    def run_faults(self, seconds, rng):
        """Inject random faults for ``seconds``, then end every one of them."""
        pending = []
        counter = iter(range(10**9))

        def schedule(at, action):
            heapq.heappush(pending, (at, next(counter), action))

        started = time.monotonic()
        end = started + seconds
        next_fault = started + rng.uniform(0.3, 1.0)
        calm_until = None  # inf: waiting for every fault to end; then the end of the calm
        while True:
            now = time.monotonic()
            while pending and pending[0][0] <= now:
                heapq.heappop(pending)[2]()
            if now >= end:
                break
            if now >= next_fault and calm_until is None:
                if rng.random() < CALM_CHANCE:  # let everything end, then a quiet spell
                    calm_until = float("inf")
                else:
                    self.random_fault(rng, schedule)
                    next_fault = now + rng.uniform(0.3, 1.8)
            if calm_until == float("inf") and not pending:
                calm_until = now + SETTLE + GRACE + rng.uniform(1.0, 4.0)
            if calm_until is not None and now >= calm_until:
                calm_until = None
                next_fault = now
                self.calms += 1
            wake = min([next_fault if calm_until is None else calm_until, end] + [p[0] for p in pending[:1]])
            time.sleep(max(0.0, min(wake - time.monotonic(), 0.05)))
        while pending:  # the faults stop: heal, thaw, restart
            heapq.heappop(pending)[2]()
        for node in self.nodes:
            assert node.up and not node.frozen and (node.relay is None or node.relay.mode == OPEN)

    def quiet_during(self, start, end):
        """No fault was active (or settling) at any time in [start, end]."""
        with self._lock:
            faults = list(self.faults)
        for _kind, _target, begun, ended in faults:
            ended = (ended if ended is not None else float("inf")) + SETTLE
            if begun <= end and ended >= start:
                return False
        return True


# --- clients ------------------------------------------------------------------------------------

class Slot:
    """One client seat on a home server: an observer, or a sender streaming numbered activities.
    When its connection dies (its server was killed) it logs in again: a new incarnation."""

    def __init__(self, world, name, home, sender):
        self.world = world
        self.name = name
        self.home = home
        self.sender = sender
        self.incarnations = []
        self.sent = []
        self.thread = None

    def connect(self, first=False):
        node = self.world.nodes[self.home]
        if not (node.up and not node.frozen):
            return None
        port = node.process.port
        name = f"{self.name}.{len(self.incarnations)}"
        for _hop in range(3):
            try:
                recorder = log_in(port, name, timeout=CLIENT_TIMEOUT)
            except Redirected as redirect:
                port = redirect.port
                continue
            except (OSError, AssertionError):
                if first:
                    raise
                return None
            recorder.node = self.world.port_to_node[port]
            recorder.next_seq = 0
            self.incarnations.append(recorder)
            return recorder
        return None

    def start(self):
        self.thread = self.world.guarded(self.run)

    def run(self):
        stop = self.world.stop_clients
        recorder = self.incarnations[-1]
        while not stop.is_set():
            if not recorder.open:
                recorder = self.connect() or recorder
                if not recorder.open:
                    stop.wait(0.2)
                    continue
            if self.sender:
                at = time.monotonic()
                if recorder.send_activity({"sender": recorder.name, "seq": recorder.next_seq}):
                    self.sent.append(Sent(recorder.name, recorder.next_seq, recorder.node, at))
                    recorder.next_seq += 1
                stop.wait(SEND_EVERY)
            else:
                stop.wait(0.1)

    def join(self):
        if self.thread is not None:
            self.thread.join(timeout=TIMEOUT)

    def open_incarnation(self):
        last = self.incarnations[-1]
        return last if last.open else None


def register_on(port, username, secret):
    """REGISTER on a fresh connection: the reply command, or "error" when none came."""
    try:
        client = LineClient(port, timeout=CLIENT_TIMEOUT)
    except OSError:
        return "error"
    try:
        client.send({"command": "REGISTER", "username": username, "secret": secret})
        reply = client.recv()
        return reply["command"] if reply else "error"
    except OSError:
        return "error"
    finally:
        client.close()


def register_and_stay(port, name, username, secret):
    """REGISTER then LOGIN on one connection: (REGISTER reply, Recorder logged in or None)."""
    try:
        client = LineClient(port, timeout=CLIENT_TIMEOUT)
    except OSError:
        return "error", None
    try:
        client.send({"command": "REGISTER", "username": username, "secret": secret})
        reply = client.recv()
        if reply is None or reply["command"] != "REGISTER_SUCCESS":
            client.close()
            return (reply["command"] if reply else "error"), None
        client.send({"command": "LOGIN", "username": username, "secret": secret})
        reply = client.recv()
        if reply is None or reply["command"] != "LOGIN_SUCCESS":
            client.close()
            return "REGISTER_SUCCESS", None  # deleted already, between REGISTER and LOGIN
        try:
            after = client.recv(timeout=REDIRECT_WAIT)
        except socket.timeout:
            after = None
        if after is not None and after["command"] == "REDIRECT":
            client.close()
            return "REGISTER_SUCCESS", None
        return "REGISTER_SUCCESS", Recorder(client, name, username, secret, port,
                                            first=[after] if after else [])
    except OSError:
        client.close()
        return "error", None


def registrar(world, rng):
    number = 0
    while not world.stop_users.wait(REGISTER_EVERY):
        candidates = world.healthy_nodes()
        if not candidates:
            continue
        node = rng.choice(candidates)
        name, secret = f"user{number}", secrets.token_hex(6)
        number += 1
        at = time.monotonic()
        outcome = register_on(node.process.port, name, secret)
        with world._lock:
            world.registrations.append(Registration(name, secret, node.index, at, outcome))


def conflicter(world, rng):
    number = 0
    stable = [node for node in world.nodes if node.stable]
    while not world.stop_users.wait(CONFLICT_EVERY):
        healthy = world.healthy_nodes()
        if rng.random() < 0.5 and all(node in healthy for node in stable[:2]):
            pair = stable[:2]
        elif len(healthy) >= 2:
            pair = rng.sample(healthy, 2)
        else:
            continue
        name = f"twice{number}"
        number += 1
        attempts = [None, None]

        def attempt(i, node):
            at = time.monotonic()
            outcome, recorder = register_and_stay(node.process.port, f"{name}@{node.name}", name,
                                                  f"{name}-secret-{i}")
            attempts[i] = (node.index, f"{name}-secret-{i}", at, outcome, recorder)

        threads = [threading.Thread(target=attempt, args=(i, node)) for i, node in enumerate(pair)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with world._lock:
            world.conflicts.append((name, attempts))


def churner(world, rng):
    """Short-lived clients on the stable servers (see the module doc)."""
    number = 0
    stable = [node for node in world.nodes if node.stable]
    while not world.stop_users.wait(rng.uniform(*CHURN_EVERY)):
        node = rng.choice(stable)
        if not (node.up and not node.frozen):
            continue
        name = f"churn{number}"
        number += 1
        recorder, outcome = None, "failed"  # frozen or killed meanwhile, or redirected twice
        try:
            recorder = log_in(node.process.port, name, timeout=CLIENT_TIMEOUT)
        except Redirected as redirect:  # the stable servers hold more clients: follow it once
            with world._lock:
                world.churn_outcomes["redirected first"] = world.churn_outcomes.get("redirected first", 0) + 1
            try:
                recorder = log_in(redirect.port, name, timeout=CLIENT_TIMEOUT)
            except (Redirected, OSError, AssertionError):
                pass
        except (OSError, AssertionError):
            pass
        if recorder is not None:
            with world._lock:
                world.churned.append(recorder)
            world.stop_users.wait(rng.uniform(*CHURN_STAY))
            if rng.random() < 0.5 and recorder.send({"command": "LOGOUT"}):
                outcome = "logout"
                wait_until(lambda: not recorder.open, CLIENT_TIMEOUT, message=f"{name} to be logged out")
            else:
                outcome = "vanished"
            recorder.close()
        with world._lock:
            world.churn_outcomes[outcome] = world.churn_outcomes.get(outcome, 0) + 1


# --- the run ------------------------------------------------------------------------------------

def run_chaos(make_process, seed, seconds, tree, replay, dump=None):
    began = time.monotonic()
    print(f"\nchaos: seed {seed}, {seconds} s of faults, {len(tree)} servers (replay: {replay})", flush=True)
    world = World(make_process, tree, seed, data_root=dump.parent if DATA_DIRS and dump else None)
    try:
        report = _run(world, seconds)
    finally:
        world.close()
    report["total seconds"] = round(time.monotonic() - began, 1)
    print_report(report)
    failures = report.pop("failures")
    if dump is not None and (failures or os.environ.get("CHAOS_DUMP")):
        write_dump(world, began, failures, dump)
        print(f"  timeline, server logs and failures written to {dump}", flush=True)
    assert not world.errors, world.errors
    assert not failures, "\n".join(failures[:40]) + (f"\n... {len(failures)} in all" if len(failures) > 40 else "")


def _run(world, seconds):
    rng = world.rng
    # Log in everyone while the servers are still apart, so no REDIRECT moves anyone.
    for node in world.nodes:
        observers = 2 if node.stable else 1
        for k in range(observers):
            world.slots.append(Slot(world, f"obs{node.index}{'abc'[k]}", node.index, sender=False))
        world.slots.append(Slot(world, f"snd{node.index}", node.index, sender=True))
    for slot in world.slots:
        slot.connect(first=True)
    initial = [slot.incarnations[0] for slot in world.slots]
    for relay in world.relays():
        relay.heal()
    probe(initial, "start")

    for slot in world.slots:
        slot.start()
    users = [world.guarded(registrar, world, random.Random(rng.random())),
             world.guarded(conflicter, world, random.Random(rng.random()))]
    fault_rng = random.Random(rng.random())  # drawn before the churner's: old seeds keep their faults
    users.append(world.guarded(churner, world, random.Random(rng.random())))
    faults_began = time.monotonic()
    world.run_faults(seconds, fault_rng)
    faults_ended = time.monotonic()
    world.stop_users.set()
    for thread in users:
        thread.join(timeout=TIMEOUT * 2)
    world.stop_clients.set()
    for slot in world.slots:
        slot.join()

    # Settle: probes from every open client reach every open client.
    clients = [slot.open_incarnation() for slot in world.slots]
    clients = [c for c in clients if c is not None]
    probe(clients, "end", timeout=SETTLE_TIMEOUT)
    settled = time.monotonic()

    start_to_end = [r for r in initial if r.open]
    checker = Checker(world, initial, start_to_end)
    try:
        wait_until(lambda: not checker.activity_failures(), SETTLE_TIMEOUT, interval=0.5,
                   message="every required activity everywhere")
    except AssertionError:
        pass  # reported in detail below
    try:
        wait_until(lambda: not checker.user_failures(), SETTLE_TIMEOUT, interval=1.0,
                   message="identical user registries")
    except AssertionError:
        pass
    failures = checker.activity_failures() + checker.user_failures() + checker.client_failures()
    report = checker.report()
    report.update({
        "seed": world.seed,
        "fault seconds": round(faults_ended - faults_began, 1),
        "settle seconds (probes everywhere)": round(settled - faults_ended, 1),
        "faults": dict(sorted(world.fault_counts.items()), **{"quiet spells": world.calms}),
        "failures": failures,
    })
    return report


def probe(clients, tag, timeout=TIMEOUT * 3):
    """Every client sends a probe; wait until every client has every probe."""
    names = {c.name for c in clients}
    for client in clients:
        assert client.send_activity({"probe": tag, "from": client.name}), f"{client.name} is gone"
    for client in clients:
        client.wait(lambda r: {b.get("from") for b in r.bodies() if b.get("probe") == tag} >= names,
                    timeout, f"every {tag} probe")


# --- the checker --------------------------------------------------------------------------------

class Checker:
    def __init__(self, world, initial, start_to_end):
        self.world = world
        self.initial = initial
        self.start_to_end = start_to_end
        self.sent = [s for slot in world.slots for s in slot.sent]
        self.clients = [r for slot in world.slots for r in slot.incarnations]
        self.conflict_clients = [a[4] for _n, attempts in world.conflicts for a in attempts if a[4]]
        self.churned = list(world.churned)
        self._required_reasons = {}

    @staticmethod
    def numbered(recorder):
        return [(b["sender"], b["seq"]) for b in recorder.bodies() if "seq" in b and "sender" in b]

    def echoed(self):
        """(key, seq) that each sender saw come back."""
        out = set()
        for slot in self.world.slots:
            if slot.sender:
                for recorder in slot.incarnations:
                    out.update(p for p in self.numbered(recorder) if p[0] == recorder.name)
        return out

    def required(self):
        echoed = self.echoed()
        held = set()
        for recorder in self.start_to_end:
            held.update(self.numbered(recorder))
        reasons = {}
        for sent in self.sent:
            pair = (sent.key, sent.seq)
            if pair not in echoed:
                continue
            node = self.world.nodes[sent.node]
            if not node.killed_after(sent.at):
                reasons[pair] = "server never killed after"
            elif node.next_kill(sent.at) > sent.at + GRACE and self.world.quiet_during(sent.at, sent.at + GRACE):
                reasons[pair] = "quiet network for the grace period"
            elif pair in held:
                reasons[pair] = "a start-to-end client has it"
        self._required_reasons = reasons
        return reasons

    def activity_failures(self):
        failures = []
        for recorder in self.clients + self.conflict_clients + self.churned:
            failures += self.stream_failures(recorder)
        required = self.required()
        reference = None
        for recorder in self.start_to_end:
            got = set(self.numbered(recorder))
            missing = [p for p in required if p not in got]
            if missing:
                failures.append(f"{recorder.name}: {len(missing)} required activities missing, e.g. "
                                f"{sorted(missing)[:5]} ({required[sorted(missing)[0]]})")
            if reference is None:
                reference = (recorder.name, got)
            elif got != reference[1]:
                only = sorted(got ^ reference[1])[:5]
                failures.append(f"{recorder.name} and {reference[0]} received different activities, e.g. {only}")
            by_sender = {}
            for key, seq in self.numbered(recorder):
                by_sender.setdefault(key, []).append(seq)
            for key, seqs in by_sender.items():
                if seqs[0] != 0:
                    failures.append(f"{recorder.name}: {key}'s activities start at {seqs[0]}, not 0")
        return failures

    def stream_failures(self, recorder):
        failures = [f"{recorder.name}: {error}" for error in recorder.errors]
        ids = [m["id"] for m in recorder.broadcasts()]
        if len(ids) != len(set(ids)):
            failures.append(f"{recorder.name}: {len(ids) - len(set(ids))} activity ids received twice")
        last = {}
        for key, seq in self.numbered(recorder):
            before = last.get(key)
            if before is not None and seq != before + 1:
                failures.append(f"{recorder.name}: {key} {seq} right after {before} "
                                f"({'duplicate or overtaken' if seq <= before else 'gap'})")
            last[key] = seq
        return failures

    def client_failures(self):
        failures = []
        for recorder in self.start_to_end:
            if not recorder.open:
                failures.append(f"{recorder.name}: disconnected during the settle")
        for name, attempts in self.world.conflicts:
            if not self.must_be_gone(attempts):
                continue
            for _node, _secret, _at, _outcome, recorder in attempts:
                if recorder is None:
                    continue
                if recorder.open:
                    failures.append(f"{recorder.name}: still logged in as the conflicting {name}")
                elif not any(m["command"] == "AUTHENTICATION_FAIL" for m in recorder.received()):
                    failures.append(f"{recorder.name}: closed without AUTHENTICATION_FAIL")
        return failures

    def must_be_gone(self, attempts):
        return all(outcome == "REGISTER_SUCCESS" and not self.world.nodes[node].killed_after(at)
                   for node, _secret, at, outcome, _recorder in attempts)

    def user_failures(self):
        failures = []
        ports = [node.process.port for node in self.world.nodes]
        checks = []  # (name, [secrets], expectation)
        for reg in self.world.registrations:
            if reg.outcome == "REGISTER_FAILED":
                failures.append(f"unique name {reg.name} was refused on {self.world.nodes[reg.node].name}")
            if reg.outcome != "REGISTER_FAILED":
                must = reg.outcome == "REGISTER_SUCCESS" and (
                    DATA_DIRS or not self.world.nodes[reg.node].killed_after(reg.at))
                checks.append((reg.name, [reg.secret], "LOGIN_SUCCESS" if must else None))
        for name, attempts in self.world.conflicts:
            checks.append((name, [a[1] for a in attempts], "LOGIN_FAILED" if self.must_be_gone(attempts) else None))
        for name, secret_list, expected in checks:
            answers = {}
            for port in ports:
                answers[port] = tuple(try_login(port, name, secret) for secret in secret_list)
            distinct = set(answers.values())
            if len(distinct) > 1:
                failures.append(f"user {name}: servers disagree: {answers}")
            elif expected is not None and distinct != {tuple(expected for _ in secret_list)}:
                failures.append(f"user {name}: expected {expected} everywhere, got {distinct}")
        self.user_checks = len(checks) * len(ports)
        return failures

    def report(self):
        required = self._required_reasons or self.required()
        reasons = {}
        for reason in required.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        conflicts_gone = sum(1 for _n, attempts in self.world.conflicts if self.must_be_gone(attempts))
        outcomes = {}
        for reg in self.world.registrations:
            outcomes[reg.outcome] = outcomes.get(reg.outcome, 0) + 1
        return {
            "activities sent": len(self.sent),
            "echoed to their sender": len(self.echoed()),
            "required everywhere": dict(reasons, total=len(required)),
            "deliveries (numbered activities received, every client incarnation)":
                sum(len(self.numbered(r)) for r in self.clients),
            "deliveries to start-to-end clients": sum(len(self.numbered(r)) for r in self.start_to_end),
            "client incarnations": len(self.clients),
            "start-to-end clients checked": f"{len(self.start_to_end)} of {len(self.initial)}",
            "registrations": outcomes,
            "conflicting names": f"{len(self.world.conflicts)} ({conflicts_gone} registered twice on "
                                 f"surviving servers, checked gone)",
            "conflict clients disconnected": sum(1 for r in self.conflict_clients if not r.open),
            "short-lived clients on stable servers": dict(sorted(self.world.churn_outcomes.items())),
            "deliveries to short-lived clients": sum(len(self.numbered(r)) for r in self.churned),
            "opening segments delayed": sum(policy.delayed for relay in self.world.relays()
                                            for policy in relay.policies()),
            "LOGIN checks of the registries": getattr(self, "user_checks", 0),
        }


def write_dump(world, began, failures, path):
    """Everything needed to understand a failure: the faults in time order, each client
    incarnation's life, each server's log, and the failures."""
    offset = time.time() - time.monotonic()

    def rel(t):
        if t is None:
            return "     ...    (        ...)"
        wall = time.strftime("%H:%M:%S", time.localtime(t + offset)) + f".{int((t + offset) % 1 * 1000):03d}"
        return f"{t - began:8.3f} ({wall})"
    lines = [f"seed {world.seed}; times in seconds since the start (and wall clock)", "", "faults:"]
    for kind, target, start, end in sorted(world.faults, key=lambda f: f[2]):
        lines.append(f"  {rel(start)} -> {rel(end)}  {kind:9} {target}")
    lines += ["", "clients:"]
    for slot in world.slots:
        for recorder in slot.incarnations:
            lines.append(f"  {recorder.name:10} on {world.nodes[recorder.node].name}  "
                         f"{rel(recorder.opened_at)} -> {rel(recorder.closed_at)}  "
                         f"{len(recorder.messages)} messages")
    sent = [s for slot in world.slots for s in slot.sent]
    lines += ["", "sent (key: first..last seq, node, times):"]
    by_key = {}
    for item in sent:
        by_key.setdefault(item.key, []).append(item)
    for key, items in by_key.items():
        lines.append(f"  {key:10} {items[0].seq}..{items[-1].seq} on {world.nodes[items[0].node].name} "
                     f"{rel(items[0].at)} -> {rel(items[-1].at)}")
    lines += ["", "failures:"] + [f"  {f}" for f in failures]
    watcher = next((r for slot in world.slots for r in slot.incarnations[:1] if r.open), None)
    if watcher is not None:
        lines += ["", f"received by {watcher.name}:"]
        for at, message in list(watcher.messages):
            if message["command"] == "ACTIVITY_BROADCAST":
                body = message["activity"]
                lines.append(f"  {rel(at)} {body.get('sender', body.get('from'))} "
                             f"{body.get('seq', body.get('probe'))} {message['id']}")
    for node in world.nodes:
        lines += ["", f"log of {node.name} (port {node.process.port}):"]
        lines += ["  " + line.rstrip() for line in node.process.log_text().splitlines()]
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def print_report(report):
    print("chaos report:")
    for key, value in report.items():
        if key != "failures":
            print(f"  {key}: {value}")
    failures = report.get("failures") or []
    print(f"  failures: {len(failures)}", flush=True)


# --- the tests ----------------------------------------------------------------------------------

def test_chaos_bounded(make_process, tmp_path):
    """The CI version: a fixed seed, CI_SECONDS of faults; the whole test stays under 2 minutes."""
    run_chaos(make_process, CI_SEED, CI_SECONDS, TREE, "pytest -s tests/test_chaos.py::test_chaos_bounded",
              dump=tmp_path / "chaos.txt")


def _chaos_selected(config):
    return "chaos" in (config.getoption("-m") or "") or "CHAOS_SECONDS" in os.environ


@pytest.mark.chaos
@pytest.mark.timeout(LONG_SECONDS + 600)
def test_chaos_long(make_process, request, tmp_path):
    """``make chaos SEED=n CHAOS_SECONDS=s``: longer, bigger, seeded from the environment."""
    if not _chaos_selected(request.config):
        pytest.skip("the long chaos run: make chaos (or pytest -m chaos)")
    seed = int(os.environ.get("CHAOS_SEED") or time.time())
    run_chaos(make_process, seed, LONG_SECONDS, BIG_TREE, f"make chaos SEED={seed} CHAOS_SECONDS={LONG_SECONDS}",
              dump=tmp_path / "chaos.txt")
