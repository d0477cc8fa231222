"""Micro-benchmark of the durable store (activitynet/store.py) on its own, without a server.

Usage:
  python -m benchmarks.store_bench [--activities N] [--users N] [--dir DIR] [--synchronous MODE]...

Measures, for each synchronous mode (FULL is the store's setting; NORMAL for comparison):
- registrations acknowledged durable per second: pipelined (one thread queues them all, then
  waits for each ticket), from 64 concurrent "connections" (threads each registering and waiting
  in lock-step, as reader threads do), and from one connection in lock-step (commit latency);
- activities committed per second (time from the first add_activity to everything committed),
  first into an empty store and then sustained with pruning (disk_history reached, every batch
  also deletes as many as it inserts), and what add_activity costs its caller;
- commit latency under a paced stream of 150,000 activities/s (flush() every 50 ms);
- cold start with ``--users`` users and ``--activities`` stored activities: Store.open + load of
  the newest 100,000 (the default --history);
- disk bytes per stored activity.
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
    return [line(origin, seq) for seq in range(first, first + count)]


def registrations_pipelined(store, count, prefix):
    start = time.perf_counter()
    tickets = [store.add_user(f"{prefix}{n}", "secret-0123456789") for n in range(count)]
    for ticket in tickets:
        ticket.wait()
    return count / (time.perf_counter() - start)


def registrations_lockstep(store, threads, each, prefix):
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
    """(committed per second, add_activity cost in microseconds)."""
    start = time.perf_counter()
    for offset, (activity_id, data) in enumerate(entries):
        store.add_activity(first_position + offset, activity_id, data)
    queued = time.perf_counter()
    store.flush()
    done = time.perf_counter()
    return len(entries) / (done - start), (queued - start) / len(entries) * 1e6


def paced_commit_latency(store, origin, first_seq, first_position, rate, seconds):
    """Flush latencies (ms) while another thread adds ``rate`` activities a second."""
    entries = lines(origin, first_seq, int(rate * seconds))
    stop = threading.Event()

    def produce():
        start = time.perf_counter()
        for offset, (activity_id, data) in enumerate(entries):
            if offset % 1000 == 0:
                ahead = start + offset / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            store.add_activity(first_position + offset, activity_id, data)
        stop.set()

    producer = threading.Thread(target=produce)
    producer.start()
    latencies = []
    while not stop.is_set():
        time.sleep(0.05)
        begin = time.perf_counter()
        store.flush()
        latencies.append((time.perf_counter() - begin) * 1000)
    producer.join()
    store.flush()
    return latencies, len(entries)


def run(mode, args, root):
    data_dir = os.path.join(root, f"store-{mode}")
    results = {}
    store = Store.open(data_dir, disk_history=args.activities, synchronous=mode)
    origin = store.origin
    try:
        store.add_user("warm-up", "s").wait()
        results["registrations/s pipelined"] = registrations_pipelined(store, 50_000, "p")
        results["registrations/s 64 connections in lock-step"] = registrations_lockstep(store, 64, 300, "c")
        results["registrations/s 1 connection in lock-step"] = registrations_lockstep(store, 1, 2000, "one")
        count = args.activities
        entries = lines(origin, 1, count)
        rate, cost = activity_throughput(store, entries, 1)
        results["activities/s into an empty store"] = rate
        results["add_activity cost, us"] = cost
        entries = lines(origin, count + 1, count // 2)
        rate, _ = activity_throughput(store, entries, count + 1)
        results["activities/s sustained, pruning at disk_history"] = rate
        position = count + count // 2 + 1
        latencies, added = paced_commit_latency(store, origin, position, position, 150_000, 3.0)
        results["commit latency at 150k/s: median ms"] = statistics.median(latencies)
        results["commit latency at 150k/s: max ms"] = max(latencies)
        remaining = args.users - len(store.load(history=0).users)
        for n in range(max(0, remaining)):
            store.add_user(f"filler{n}", "secret-0123456789")
        store.flush()
    finally:
        store.close()
    size = sum(os.path.getsize(os.path.join(data_dir, name)) for name in os.listdir(data_dir))

    start = time.perf_counter()
    store = Store.open(data_dir, disk_history=args.activities, synchronous=mode)
    loaded = store.load(history=100_000)
    results["cold start (open + load), s"] = time.perf_counter() - start
    results["  users loaded"] = len(loaded.users)
    results["  activities on disk"] = args.activities
    results["  history entries loaded"] = len(loaded.history)
    store.close()
    results["disk bytes per stored activity (all tables)"] = size / args.activities
    results["  line bytes per activity"] = len(entries[0][1])
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
