"""Scenarios of the durable store (``--data-dir``, issue 10): the cost of durability side by side
with memory, acknowledged-durable registrations, a cold start from a large store, and recovery
from disk after a heal. Registered in ``SCENARIOS`` like the others (imported by
``benchmarks.scenarios``); every data directory is a fresh temporary one, removed afterwards.
"""

import os
import shutil
import sqlite3
import statistics
import tempfile
import time

from activitynet import protocol, store
from activitynet.store import Store

from .cluster import BenchmarkError, Cluster
from .report import Target
from .scenarios import (CHAIN_WINDOW, RAW_THROUGHPUT, CpuClock, close_all, hand_over, log_in, register_all,
                        scenario, send_stream, sender_on_a_receiver_on_b, stream_seconds,
                        wait_received, warm_up)
from .streams import PAD, Receiver, Tally


class DataCluster(Cluster):
    """A Cluster whose every server gets its own ``--data-dir`` under ``root`` (and ``extra``)."""

    def __init__(self, root, **kwargs):
        super().__init__(**kwargs)
        self.root = root

    def start(self, name, remote_port=None, extra=(), wait=True):
        return super().start(name, remote_port, ["--data-dir", self.data_dir(name), *extra], wait)

    def data_dir(self, name):
        return os.path.join(self.root, name)

    def disk_bytes(self, name):
        directory = self.data_dir(name)
        return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                   if f.startswith(store.DB_NAME))


class _TemporaryRoot:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="activitynet-bench-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def _data_cluster(ctx, root, **kwargs):
    """``ctx.cluster`` with data directories (the profiler and the tracebacks row see it too),
    with its ``--rate-limit 0`` as well: raw throughput, like the in-memory side."""
    kwargs.setdefault("extra", RAW_THROUGHPUT)
    cluster = DataCluster(root, **kwargs)
    ctx.clusters.append(cluster)
    if ctx.profile is not None:
        ctx.profile.attach(ctx.name, cluster)
    return cluster


def _chain(ctx, cluster, count):
    """The chain-throughput measurement on ``cluster``: activities/s sender on A to receiver
    on B, or None if the stream did not complete; also checks delivery."""
    total = count + 1
    with sender_on_a_receiver_on_b(ctx, cluster, total) as (sender, receiver, far, echo):
        started = time.perf_counter()
        with CpuClock(cluster) as cpu:
            send_stream(sender, 1, total, [far, echo], window=CHAIN_WINDOW, progress=ctx.progress)
            complete = wait_received(ctx, receiver, [far, echo])
    return (count / stream_seconds([far], started) if complete else None), cpu.result, [far, echo]


@scenario("durable-chain", "chain throughput with --data-dir on both servers vs in memory, "
          "in one run; disk bytes per stored activity",
          full={"count": 300_000, "rounds": 6}, short={"count": 100_000},
          smoke={"count": 2_000, "rounds": 1})
def durable_chain(ctx, count, rounds=2):
    """Rounds interleave the two sides in the order memory, data dir, data dir, memory, ... (so
    a steady change in the machine's load favours neither) and each side's best counts: on
    these machines the load moves a round's figure by up to a third (the full run takes six of
    each). The servers' CPU per activity, less sensitive to that, says what the store costs."""
    rates = {"in memory": [], "data dir": []}
    cpu = {"in memory": [], "data dir": []}
    tallies = []
    stored_on_a = 0

    def in_memory():
        with ctx.cluster() as cluster:
            rate, used, checked = _chain(ctx, cluster, count)
            rates["in memory"].append(rate)
            cpu["in memory"].append(used)
            tallies.extend(checked)

    def with_data_dirs():
        nonlocal stored_on_a, disk_bytes
        with _TemporaryRoot() as root, _data_cluster(ctx, root) as cluster:
            rate, used, checked = _chain(ctx, cluster, count)
            rates["data dir"].append(rate)
            cpu["data dir"].append(used)
            tallies.extend(checked)
            a = cluster.servers[0]
            stored_on_a = 0
            deadline = time.monotonic() + 30
            while stored_on_a < count and time.monotonic() < deadline:  # the writer's last commits
                stored_on_a = _stored(cluster.data_dir("A"))
                time.sleep(0.05)
            ctx.memory(cluster)
            a.stop()  # a clean stop checkpoints the WAL into the database file
            disk_bytes = cluster.disk_bytes("A")

    disk_bytes = 0
    for round_number in range(rounds):
        for side in ((in_memory, with_data_dirs) if round_number % 2 == 0 else (with_data_dirs, in_memory)):
            side()
    ctx.details["cpu_seconds"] = cpu
    ctx.details["rates"] = rates
    if all(rates["in memory"]) and all(rates["data dir"]):
        memory_rate, disk_rate = max(rates["in memory"]), max(rates["data dir"])
        rounds_note = f"best of {rounds}: " + ", ".join(f"{r:,.0f}" for r in rates["in memory"])
        ctx.row("throughput in memory", round(memory_rate), "activities/s", note=rounds_note)
        ctx.row("throughput with --data-dir", round(disk_rate), "activities/s",
                note=f"best of {rounds}: " + ", ".join(f"{r:,.0f}" for r in rates["data dir"]))
        ctx.row("--data-dir / in memory", round(100 * disk_rate / memory_rate, 1), "%", Target(">=", 90))
        per_activity = {mode: statistics.median((used["A"] + used["B"]) / count * 1e6 for used in rounds_used)
                        for mode, rounds_used in cpu.items()}
        ctx.row("CPU of A and B per activity, --data-dir less in memory (median rounds)",
                round(per_activity["data dir"] - per_activity["in memory"], 2), "µs",
                note=f"{per_activity['data dir']:.2f} against {per_activity['in memory']:.2f} µs")
    if stored_on_a:
        ctx.row("disk bytes per stored activity (A, ~180-byte lines)", round(disk_bytes / stored_on_a, 1),
                "bytes", note=f"{disk_bytes:,} bytes for {stored_on_a:,} activities")
    ctx.row("activities stored on A", stored_on_a, "activities", Target(">=", count + 1), check=True)
    ctx.correctness(tallies, "clients, every round")


def _stored(directory):
    """Activities committed in a server's data directory (read-only, beside the server)."""
    path = os.path.join(directory, store.DB_NAME)
    if not os.path.exists(path):
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        return db.execute("SELECT coalesce(sum(count), 0) FROM segments").fetchone()[0]
    finally:
        db.close()


@scenario("durable-registrations", "100,000 REGISTERs on a server with --data-dir, pipelined over "
          "4 connections: REGISTER_SUCCESS only once committed",
          full={"users": 100_000}, short={"users": 100_000}, smoke={"users": 1_000})
def durable_registrations(ctx, users, connections=4):
    with _TemporaryRoot() as root, _data_cluster(ctx, root) as cluster:
        a = cluster.start("A")
        accounts = [(f"user{i:06d}", f"secret{i}") for i in range(users)]
        seconds = register_all(ctx, a.port, accounts, connections)
        ctx.memory(cluster)
        a.stop()
        with Store.open(cluster.data_dir("A")) as kept:
            stored = len(kept.load(0).users)
    ctx.row(f"acknowledged-durable registrations ({connections} connections, pipelined)",
            round(users / seconds), "users/s", Target(">=", 10_000))
    ctx.row("users in the store after a stop", stored, "users", Target("==", users), check=True)


def _fill(directory, users, activities, origins=3):
    """A data directory holding ``users`` users and ``activities`` activities (about 180-byte
    lines, from ``origins`` origins), written through the Store as a server would."""
    with Store.open(directory, disk_history=activities) as filling:
        for i in range(users):
            filling.add_user(f"user{i:06d}", f"secret{i}")
        names = [protocol.new_origin() for _ in range(origins)]
        for position in range(1, activities + 1):
            origin = names[position % origins]
            seq = position // origins + 1
            activity_id = protocol.make_id(origin, seq, 1_700_000_000_000 + position)
            line = protocol.encode(protocol.activity_broadcast(
                {"n": position, "p": PAD, "authenticated_user": "anonymous"}, activity_id))
            filling.add_activity(position, activity_id, line, origin, seq)
            if position % 100_000 == 0:
                filling.flush()
        filling.flush()


@scenario("durable-cold-start", "a server started on a data dir holding 100,000 users and "
          "1,000,000 activities: time to listen, memory bounded by --history",
          full={"users": 100_000, "activities": 1_000_000},
          short={"users": 100_000, "activities": 1_000_000},
          smoke={"users": 1_000, "activities": 20_000})
def durable_cold_start(ctx, users, activities):
    with _TemporaryRoot() as root:
        ctx.progress.update(f"writing {activities:,} activities and {users:,} users", force=True)
        started = time.perf_counter()
        _fill(os.path.join(root, "A"), users, activities)
        ctx.details["fill_seconds"] = round(time.perf_counter() - started, 1)
        figures = {}
        restored = {}  # --history -> (users, activities in memory) the server says it loaded
        for history in (100_000, 10_000):
            with _data_cluster(ctx, root) as cluster:
                a = cluster.start("A", extra=["--history", str(history)])
                listening = a.listening_at - a.started_at
                # a login proves the users are loaded (they are, before it listens)
                client = log_in(a.port, "user000000", "secret0", alone=True)
                client.close()
                rss, peak = a.memory_mib()
                loaded = a.find_log(r": (\d+) users, \d+ blocked names, (\d+) activities in memory, "
                                    r".*loaded in ([0-9.]+) s")
                figures[history] = (listening, float(loaded.group(3)) if loaded else None, peak or rss)
                restored[history] = (int(loaded.group(1)), int(loaded.group(2))) if loaded else (0, 0)
                disk_mb = cluster.disk_bytes("A") / 2**20
    for history, (listening, loading, peak) in figures.items():
        ctx.row(f"process start -> listening (--history {history:,})", round(listening, 3), "s",
                Target("<", 2))
        if loading is not None:
            ctx.row("  of which: open the store and load it", loading, "s")
        ctx.row(f"  peak RSS (--history {history:,})", round(peak, 1), "MB")
    wrong = sum(abs(users - got_users) + abs(min(history, activities) - got_activities)
                for history, (got_users, got_activities) in restored.items())
    ctx.details["restored"] = restored
    ctx.row("users and activities not loaded as expected (both starts)", wrong, "", Target("==", 0),
            check=True)
    ctx.row(f"peak RSS, --history 100,000, {activities:,} activities on disk",
            round(figures[100_000][2], 1), "MB", Target("<", round(disk_mb)),
            f"the database is {disk_mb:.0f} MB: memory follows --history, not the disk")


@scenario("durable-recovery", "B (with --data-dir) cut off while A's client sends 200,000; "
          "A keeps 10,000 in memory: after the heal, until B's client has them all",
          full={"count": 200_000}, short={"count": 200_000}, smoke={"count": 5_000})
def durable_recovery(ctx, count, history=10_000):
    history = min(history, count // 4)
    with _TemporaryRoot() as root, _data_cluster(ctx, root) as cluster:
        memory = ["--history", str(history)]
        # The relay is the one cable: without a long --grace, A and B would link again directly
        # (each knows the other's announced address) around the cut (issue 9) while A's client
        # is still sending.
        memory += ["--grace", "3600"]
        a = cluster.start("A", extra=memory)
        relay = cluster.relay(a.port)
        b = cluster.start("B", remote_port=relay.port, extra=memory)
        receiver = Receiver().start()
        clients = []
        try:
            far_client = log_in(b.port)
            sender = log_in(a.port)
            clients += [far_client, sender]
            total = count + 1
            far = hand_over(far_client, Tally("receiver on B", total), receiver)
            echo = hand_over(sender, Tally("sender (its own echo)", total), receiver)
            warm_up(ctx, sender, receiver, [far, echo])
            relay.cut()
            send_stream(sender, 1, total, progress=ctx.progress)
            if not wait_received(ctx, receiver, [echo], "during the cut: A delivered"):
                raise BenchmarkError("A did not deliver its own client's activities")
            deadline = time.monotonic() + 60
            while _stored(cluster.data_dir("A")) < total:  # A's writer commits the last ones
                if time.monotonic() > deadline:
                    raise BenchmarkError("A did not store the activities within 60 s")
                time.sleep(0.05)
            healed_at = time.perf_counter()
            relay.heal()
            complete = wait_received(ctx, receiver, [far], "after the heal: received", timeout=60)
            from_disk = a.find_log(r"sent \S+ (\d+) activities from disk \(.*\) in ([0-9.]+) s")
            ctx.memory(cluster)
        finally:
            receiver.stop()
            close_all(clients)
    if complete:
        ctx.row(f"heal -> all {count:,} at B's client ({history:,} in A's memory)",
                round(far.done_at - healed_at, 3), "s", Target("<", 3),
                f"{count / (far.done_at - healed_at):,.0f} activities/s into B and on to its client")
    if from_disk:
        ctx.row("  of which: A reads and queues its disk part", float(from_disk.group(2)), "s")
    ctx.row("of them sent from A's disk", int(from_disk.group(1)) if from_disk else 0, "activities",
            Target(">=", count - history), check=True)
    ctx.correctness([far, echo], "clients on A and B")
