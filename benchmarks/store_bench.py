"""Micro-benchmark of the durable store (activitynet/store.py) on its own, without a server.

Usage:
  python -m benchmarks.store_bench [--activities N] [--users N] [--dir DIR] [--synchronous MODE]...

Measures, for each synchronous mode (FULL is the store's setting; NORMAL for comparison):
- registrations acknowledged durable per second: pipelined (4 "connections" register
  back-to-back and a registration counts when its ticket's callback runs, where the server
  would send REGISTER_SUCCESS), from 64 connections each waiting for its commit before the next,
  and from one connection in lock-step (the commit latency);
- activities committed per second (time from the first add_activity to everything committed),
  first into an empty store and then sustained with pruning (disk_history reached, every batch
  also deletes as many as it inserts), and what add_activity costs its caller;
- commit latency under paced streams of 20,000 and 150,000 activities/s (flush() every 50 ms;
  the rate the producer thread achieved is printed);
- cold start with ``--users`` users and ``--activities`` stored activities: Store.open + load of
  the newest 100,000 (the default --history);
- reading the 200,000 newest activities back for a peer that lacks them (``missing``);
- disk bytes per stored activity (100,000 of them in commits of 500).
"""

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time

from activitynet import protocol
from activitynet.store import Store

PAD = "x" * 60


def line(origin, seq):
    activity_id = protocol.make_id(origin, seq, 1_700_000_000_000 + seq)
    activity = {"n": seq, "t": 12345.678901, "p": PAD, "authenticated_user": "user12345"}
    return activity_id, protocol.encode(protocol.activity_broadcast(activity, activity_id))


def lines(origin, first, count):
    """[(id, line, origin, seq)]: add_activity's arguments after the position."""
    return [line(origin, seq) + (origin, seq) for seq in range(first, first + count)]


def registrations_pipelined(store, connections, each, prefix):
    """Each connection registers back-to-back, as a server reads pipelined REGISTERs; a
    registration counts once the writer's callback says it is committed (when the server would
    send REGISTER_SUCCESS)."""
    acknowledged = threading.Semaphore(0)

    def register(c):
        for n in range(each):
            store.add_user(f"{prefix}{c}-{n}", "secret-0123456789").add_done_callback(
                lambda ticket: acknowledged.release())

    workers = [threading.Thread(target=register, args=(c,)) for c in range(connections)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for _ in range(connections * each):
        acknowledged.acquire()
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.join()
    return connections * each / elapsed


def registrations_lockstep(store, threads, each, prefix):
    """Each thread waits for its registration's commit before the next (a client that waits
    for REGISTER_SUCCESS): the commit latency decides."""
    def register(t):
        for n in range(each):
            store.add_user(f"{prefix}{t}-{n}", "secret-0123456789").wait()

    workers = [threading.Thread(target=register, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * each / (time.perf_counter() - start)


def activity_throughput(store, entries, first_position):
    """(committed per second, add_activity's cost to its caller in us, writer CPU per activity
    in us)."""
    before = store.status()
    start = time.perf_counter()
    for offset, entry in enumerate(entries):
        store.add_activity(first_position + offset, *entry)
    queued = time.perf_counter()
    store.flush()
    done = time.perf_counter()
    time.sleep(0.1)  # the writer notes its CPU time after each round
    after = store.status()
    count = after["activities_committed"] - before["activities_committed"]
    assert count == len(entries), "the benchmark's queue bound is too small: activities were dropped"
    writer_cpu = after["writer_cpu_s"] - before["writer_cpu_s"]
    return count / (done - start), (queued - start) / count * 1e6, writer_cpu / count * 1e6


def paced_commit_latency(store, origin, first_seq, first_position, rate, seconds, mode):
    """Flush latencies (ms) while another thread adds ``rate`` activities a second."""
    entries = lines(origin, first_seq, int(rate * seconds))
    stop = threading.Event()

    def produce():
        start = time.perf_counter()
        for offset, entry in enumerate(entries):
            if offset % 1000 == 0:
                ahead = start + offset / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            store.add_activity(first_position + offset, *entry)
        stop.set()

    producer = threading.Thread(target=produce)
    producer.start()
    latencies = []
    peak = 0
    begun = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.05)
        peak = max(peak, store.status()["queued"])
        begin = time.perf_counter()
        store.flush()
        latencies.append((time.perf_counter() - begin) * 1000)
    producer.join()
    store.flush()
    print(f"  ({mode}: asked {rate:,}/s, achieved {len(entries) / (time.perf_counter() - begun):,.0f}/s,"
          f" at most {peak:,} waiting for the disk)")
    return latencies, len(entries)


def run(mode, args, root):
    data_dir = os.path.join(root, f"store-{mode}")
    results = {}
    # No queue bound here (the default drops beyond MAX_QUEUE): the writer's own pace is measured.
    store = Store.open(data_dir, disk_history=args.activities, synchronous=mode,
                       max_queue=10 * args.activities)
    origin = store.origin
    try:
        store.add_user("warm-up", "s").wait()
        results["registrations/s pipelined, 4 connections"] = registrations_pipelined(store, 4, 12_500, "p")
        results["registrations/s 64 connections in lock-step"] = registrations_lockstep(store, 64, 100, "c")
        results["registrations/s 1 connection in lock-step"] = registrations_lockstep(store, 1, 1000, "one")
        count = args.activities
        rate, cost, writer = activity_throughput(store, lines(origin, 1, count), 1)
        results["activities/s committed, empty store"] = rate
        results["  add_activity cost to the caller, us"] = cost
        results["  writer CPU per activity, us"] = writer
        more = count // 4
        rate, cost, writer = activity_throughput(store, lines(origin, count + 1, more), count + 1)
        results["activities/s committed, pruning at disk_history"] = rate
        results["  writer CPU per activity, us "] = writer
        position = count + more + 1
        for rate in (20_000, 150_000):
            latencies, achieved = paced_commit_latency(store, origin, position, position, rate, 3.0, mode)
            position += achieved
            results[f"commit latency at {rate // 1000}k/s asked: median ms"] = statistics.median(latencies)
            results[f"commit latency at {rate // 1000}k/s asked: max ms"] = max(latencies)
        remaining = args.users - len(store.load(history=0).users)
        for n in range(max(0, remaining)):
            store.add_user(f"filler{n}", "secret-0123456789")
        store.flush()
        last = position - 1  # the benchmark's ids use seq = position
    finally:
        store.close()

    start = time.perf_counter()
    store = Store.open(data_dir, disk_history=args.activities, synchronous=mode)
    loaded = store.load(history=100_000)
    results["cold start: open + load newest 100,000, s"] = time.perf_counter() - start
    results["  users loaded"] = len(loaded.users)
    start = time.perf_counter()
    sent = sum(len(chunk) for chunk in store.missing({origin: last - 200_000}))
    results["read 200,000 a peer lacks from disk, s"] = time.perf_counter() - start
    results["  activities read"] = sent
    store.close()

    bytes_dir = os.path.join(root, f"bytes-{mode}")
    with Store.open(bytes_dir, synchronous=mode) as store:
        entries = lines(store.origin, 1, 100_000)
        for offset in range(0, len(entries), 500):  # commits of 500, as under a steady stream
            for position, entry in enumerate(entries[offset:offset + 500], start=offset + 1):
                store.add_activity(position, *entry)
            store.flush()
    size = os.path.getsize(os.path.join(bytes_dir, "activitynet.sqlite3"))
    results["disk bytes per stored activity"] = size / len(entries)
    results["  of which the line itself"] = len(entries[0][1])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activities", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--dir", help="where to put the databases (default: a temporary directory)")
    parser.add_argument("--synchronous", action="append", choices=["FULL", "NORMAL"])
    args = parser.parse_args(argv)
    modes = args.synchronous or ["FULL", "NORMAL"]
    root = tempfile.mkdtemp(prefix="store-bench-", dir=args.dir)
    try:
        table = {mode: run(mode, args, root) for mode in modes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = list(next(iter(table.values())))
    width = max(map(len, names))
    print(f"{'':{width}}  " + "  ".join(f"{mode:>12}" for mode in modes))
    for name in names:
        print(f"{name:{width}}  " + "  ".join(f"{table[mode][name]:12,.1f}" for mode in modes))


if __name__ == "__main__":
    main()
