"""The scaling curves of the full run (issue 13, item 5): one figure measured at several sizes.

Each curve is a scenario like the others (rows, checks, the servers' memory) that also leaves its
points in ``ctx.details["curve"]``; ``plots.draw`` turns those into PNG files after the run. They
run in the full suite and, at their smallest, in the smoke run; ``--short`` leaves them out (the
1,000,000-activity history alone takes a minute).

- ``curve-chain-latency``: one chain of servers, S1 <- S2 <- ... <- Sn, a sender on S1 and a
  receiver on each measured Sk in turn: sequential round trips, one activity in flight at a time.
- ``curve-link-up-stall``: a server's history is filled to each size in turn; then a new peer
  (a raw connection that AUTHENTICATEs and asks for everything) is caught up while a client on
  the same server measures round trips, one after another.
- ``curve-memory-clients``: clients log in to one server in steps; its RSS after each step.
- ``curve-senders``: k senders on A, one receiver on B (B joined A), each sender its own stream;
  every sender is a logged-in client, so it also receives every activity (k + 1 deliveries each).
"""

import contextlib
import socket
import statistics
import threading
import time

from activitynet import protocol

from .cluster import HOST, SECRET, BenchmarkError, raise_open_files_limit
from .report import Target
from .scenarios import (RAW_THROUGHPUT, WAIT, close_all, hand_over, latencies, log_in, log_in_many, scenario,
                        send_paced, wait_received, warm_up, _idle)
from .streams import _SEQ, PAD, MultiTally, Receiver, Tally, activity, percentile


def curve(ctx, name, title, xlabel, ylabel, x, series, log_x=False, log_y=False):
    """Leave one curve's points for ``plots.draw``: ``series`` is {label: [y per x]}."""
    ctx.details["curve"] = {"file": f"{name}.png", "title": title, "xlabel": xlabel,
                            "ylabel": ylabel, "x": list(x), "series": series,
                            "log_x": log_x, "log_y": log_y}


# --- end-to-end latency against chain length ----------------------------------------------------

@scenario("curve-chain-latency", "a chain of up to 16 servers: sequential round trips from a "
          "sender on S1 to a receiver on each Sk", short=None,
          full={"servers": 16, "lengths": [1, 2, 4, 8, 12, 16], "count": 300},
          smoke={"servers": 3, "lengths": [1, 2, 3], "count": 20})
def chain_latency_curve(ctx, servers, lengths, count, per_hop_at=12, warm=20):
    """One activity at a time (the next is sent once the last has arrived), as issue 13 measured
    it: what each server adds is not hidden behind queueing in the benchmark process."""
    with ctx.cluster() as cluster:
        chain = [cluster.start("S1")]
        for k in range(2, servers + 1):
            ctx.progress.update(f"starting S{k}")
            chain.append(cluster.start(f"S{k}", remote_port=chain[-1].port))
        sender = log_in(chain[0].port)
        tallies, echoes, sent = {}, [], 0
        try:
            for k in lengths:
                ctx.progress.update(f"round trips through {k} server{'s' if k > 1 else ''}")
                receiver = None
                if k > 1:  # a second client on S1 would be redirected: S1's receiver is the sender
                    receiver = log_in(chain[k - 1].port)
                    if receiver.port != chain[k - 1].port:
                        raise BenchmarkError(f"the receiver for S{k} was redirected to {receiver.port}")
                try:
                    tallies[k], echo = round_trips(sender, receiver, sent, warm + count, f"S{k}")
                finally:
                    if receiver is not None:
                        receiver.close()
                echoes += [echo] if echo is not tallies[k] else []
                sent += warm + count
                del tallies[k].latencies[:warm]  # links warming up, first-use costs
            ctx.memory(cluster)
        finally:
            sender.close()
    points = {k: latencies([tally]) for k, tally in tallies.items()}
    complete = all(tally.done for tally in tallies.values())
    if complete:
        xs = sorted(points)
        curve(ctx, "latency-vs-chain-length", "End-to-end latency against chain length",
              "servers in the chain (sender on the first, receiver on the last)", "latency (ms)", xs,
              {"median": [points[k][0] for k in xs], "p99": [points[k][1] for k in xs]})
        ctx.details["latency_ms_by_length"] = {k: {"median": p[0], "p99": p[1], "max": p[2]}
                                               for k, p in points.items()}
        for k in xs:
            ctx.row(f"{k:2} server{'s' if k > 1 else ' '}: median / p99 latency",
                    round(points[k][0], 3), "ms", note=f"p99 {points[k][1]:.3f} ms")
        at = per_hop_at if per_hop_at in points else max(points)
        ctx.row(f"per server on the chain of {at}: median latency / {at}", round(points[at][0] / at, 3),
                "ms", Target("<=", 0.12), "issue 13, item 2: about 0.1 ms")
        ctx.row(f"per server on the chain of {at}: p99 latency / {at}", round(points[at][1] / at, 3),
                "ms", Target("<=", 0.25))
    ctx.correctness([*echoes, *tallies.values()], "clients on the chain")


def round_trips(sender, receiver, base, count, where):
    """Send activities ``base`` .. ``base + count``-1 one at a time, each once the receiver has it
    (``receiver`` None: the sender's own echo is timed). Returns the receiver's and the sender's
    Tally (latencies, order, duplicates); the echo is read between round trips, untimed."""
    echo = _stream_part(f"sender on S1 (its echo, with {where})", base, count, latencies=receiver is None)
    tally = echo
    _take_buffered(sender, echo)
    if receiver is not None:
        tally = _stream_part(f"receiver on {where}", base, count, latencies=True)
        fresh = _FromOn(tally, base)
        _take_buffered(receiver, fresh)
    for i in range(count):
        sender.send_activity(activity(base + i, time.perf_counter()))
        if receiver is not None:
            _read_until(receiver.sock, fresh, i + 1)
        _read_until(sender.sock, echo, i + 1)
    return tally, echo


def _stream_part(name, base, count, latencies=False):
    tally = Tally(name, count, latencies=latencies)
    tally.highest = base - 1  # this part of the stream starts at ``base``
    return tally


class _FromOn:
    """A Tally's feed that leaves out activities numbered below ``base``: the last ones sent to
    the previous receiver may still be crossing the chain when the next receiver logs in, and
    they are rightly delivered to it (the protocol's clock slack), once."""

    def __init__(self, tally, base):
        self.tally = tally
        self.name = tally.name
        self._base = base
        self._pending = b""

    @property
    def received(self):
        return self.tally.received

    def feed(self, data, now):
        data = self._pending + data
        end = data.rfind(b"\n") + 1
        body, self._pending = data[:end], data[end:]
        lines = [line for line in body.splitlines(keepends=True)
                 if not ((n := _SEQ.search(line)) and int(n.group(1)) < self._base)]
        if lines:
            self.tally.feed(b"".join(lines), now)


def _take_buffered(client, tally):
    """What the client library read past its LOGIN_SUCCESS is checked too: nothing is skipped."""
    now = time.perf_counter()
    while True:
        try:
            message = client.recv(timeout=0)
        except TimeoutError:
            return
        if message is None:
            raise BenchmarkError(f"{tally.name}: closed by the server before the test started")
        tally.feed(protocol.encode(message), now)


def _read_until(sock, tally, received):
    """Feed ``tally`` from ``sock`` until it holds ``received`` activities."""
    deadline = time.monotonic() + WAIT
    while tally.received < received:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{tally.name}: an activity did not arrive in {WAIT:g} s")
        data = sock.recv(1 << 16)
        if not data:
            raise BenchmarkError(f"{tally.name}: the server closed the connection")
        tally.feed(data, time.perf_counter())


# --- link-up stall against history size ---------------------------------------------------------

class CatchingUpPeer:
    """A raw server connection that AUTHENTICATEs, asks for the whole history and counts the
    ACTIVITY_BROADCASTs it gets, sending heartbeats so it is not closed as silent."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.broadcasts = 0
        self.done_at = None
        self.expected = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="catching-up-peer", daemon=True)
        self._beat = threading.Thread(target=self._heartbeat, name="peer-heartbeat", daemon=True)

    def start(self, expected):
        self.expected = expected
        self.sock.sendall(protocol.encode(protocol.authenticate(SECRET))
                          + protocol.encode(protocol.activity_retrieve(""))
                          + protocol.encode(protocol.server_announce(0, "catching-up.example", 1)))
        self.sent_at = time.perf_counter()
        self._thread.start()
        self._beat.start()
        return self

    def _heartbeat(self):
        while not self._stop.wait(0.5):
            with contextlib.suppress(OSError):
                self.sock.sendall(protocol.HEARTBEAT)

    def _read(self):
        marker = b'"p":"' + PAD.encode()  # the filler's activities, not the probe's
        pending = b""
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            data = pending + data
            end = data.rfind(b"\n") + 1
            self.broadcasts += data.count(marker, 0, end)
            pending = data[end:]
            if self.done_at is None and self.broadcasts >= self.expected:
                self.done_at = time.perf_counter()

    def close(self):
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def fill(ctx, port, start, stop, batch=1000):
    """Send activities ``start`` .. ``stop``-1 to the server's history from a fresh client, its
    echo drained by a Receiver (a full outbox is a slow consumer)."""
    receiver = Receiver().start()
    client = log_in(port, alone=True)
    try:
        echo = hand_over(client, Tally("filler (its own echo)", stop - start), receiver)
        echo.highest = start - 1  # its stream starts at ``start``
        lines = ('{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":'
                 '{"n":%d,"t":0,"p":"' + PAD + '"}}\n')
        n = start
        while n < stop:
            while n - start - echo.received > 50_000:
                time.sleep(0.001)
            end = min(stop, n + batch)
            client.sock.sendall("".join(lines % i for i in range(n, end)).encode())
            n = end
            ctx.progress.update(f"history filled to {n:,}")
        if not receiver.wait([echo], WAIT):
            raise BenchmarkError(f"filling the history stopped at {start + echo.received:,}")
    finally:
        receiver.stop()
        client.close()


def probe_round_trips(port, until, deadline, at_least=20):
    """Sequential round trips (an activity, then its echo) from a fresh client until
    ``until()``, and at least ``at_least`` of them; returns their durations in ms."""
    client = log_in(port, alone=True)
    times = []
    try:
        i = 0
        while not until() or len(times) < at_least:
            if time.monotonic() > deadline:
                raise BenchmarkError("the peer was not caught up in time")
            started = time.perf_counter()
            client.send_activity({"probe": i})
            while True:
                message = client.recv(timeout=30)
                if message is None:
                    raise BenchmarkError("the probe client was closed")
                if message.get("command") == "ACTIVITY_BROADCAST" and message["activity"].get("probe") == i:
                    break
            times.append((time.perf_counter() - started) * 1000)
            i += 1
    finally:
        client.close()
    return times


@scenario("curve-link-up-stall", "a new peer caught up from a history of 10,000 to 1,000,000: "
          "a client's round trips meanwhile", short=None,
          full={"sizes": [10_000, 100_000, 300_000, 1_000_000]},
          smoke={"sizes": [1_000, 3_000]})
def link_up_stall_curve(ctx, sizes):
    results = {}
    caught_up = {}
    # Room for the probes' own activities too: the filler's must all stay in the history.
    with ctx.cluster(extra=RAW_THROUGHPUT + ["--history", str(max(sizes) + 20_000)]) as cluster:
        a = cluster.start("A")
        filled = 0
        for size in sizes:
            fill(ctx, a.port, filled, size)
            filled = size
            before = probe_round_trips(a.port, _count_down(300), time.monotonic() + WAIT)
            peer = CatchingUpPeer(a.port)
            try:
                ctx.progress.update(f"a peer catches up from {size:,}", force=True)
                peer.start(size)
                during = probe_round_trips(a.port, lambda: peer.done_at is not None,
                                           time.monotonic() + WAIT)
                caught_up[size] = (peer.broadcasts, peer.done_at - peer.sent_at)
            finally:
                peer.close()
            results[size] = {"before_p99": percentile(before, 0.99), "p99": percentile(during, 0.99),
                             "max": max(during), "median": statistics.median(during),
                             "samples": len(during), "catch_up_s": caught_up[size][1]}
        ctx.memory(cluster)
    ctx.details["round_trip_ms_by_history"] = results
    xs = sorted(results)
    curve(ctx, "link-up-stall-vs-history", "A client's round trip while a new peer is caught up",
          "activities in the history (log scale)", "round trip (ms, log scale)", xs,
          {"max": [results[s]["max"] for s in xs], "p99": [results[s]["p99"] for s in xs],
           "p99 before the link-up": [results[s]["before_p99"] for s in xs]}, log_x=True, log_y=True)
    for size in xs:
        r = results[size]
        ctx.row(f"history {size:>9,}: round trip p99 while a peer catches up", round(r["p99"], 3), "ms",
                note=f"max {r['max']:.1f} ms, {r['samples']} round trips, p99 before "
                     f"{r['before_p99']:.2f} ms; catch-up took {r['catch_up_s']:.2f} s")
    ctx.row(f"round trip p99 while a peer catches up from {xs[-1]:,}", round(results[xs[-1]]["p99"], 3),
            "ms", Target("<", 5), "issue 13, item 3")
    short_of = sum(size - got for size, (got, _s) in caught_up.items() if got < size)
    ctx.row("activities the new peer was not sent (all sizes)", short_of, "activities",
            Target("==", 0), check=True)


def _count_down(n):
    left = [n]

    def done():
        left[0] -= 1
        return left[0] < 0
    return done


# --- server memory against connected clients ----------------------------------------------------

@scenario("curve-memory-clients", "clients log in to one server in steps up to 20,000: its RSS",
          short=None, full={"steps": [1_000, 2_000, 5_000, 10_000, 20_000]},
          smoke={"steps": [50, 100]})
def memory_clients_curve(ctx, steps):
    wanted = max(steps)
    limit = raise_open_files_limit(wanted + 1000, raise_hard=True)
    # Where the hard limit cannot be raised (a container), the last step is as close as it allows:
    # each side holds one descriptor per client plus a few of its own.
    steps = sorted({min(step, limit - 200) for step in steps})
    points = {}
    with ctx.cluster() as cluster:
        a = cluster.start("A")
        idle_rss, _ = a.memory_mib()
        connected = []
        try:
            for step in steps:
                more, _seconds = log_in_many([a.port], step - len(connected), ctx.progress,
                                             label=f"towards {step:,}: logged in", alone=True)
                connected += more
                time.sleep(0.5)  # let the server settle (threads parked, outboxes empty)
                points[step] = a.memory_mib()[0]
            disturbed = sum(1 for client in connected[::max(1, len(connected) // 200)]
                            if not _idle(client))
            ctx.memory(cluster)
        finally:
            close_all(connected)
    xs = sorted(points)
    curve(ctx, "memory-vs-clients", "Server memory against connected clients",
          "logged-in idle clients", "server RSS (MB)", xs, {"RSS": [points[x] for x in xs]})
    ctx.details["rss_mib_by_clients"] = points
    for x in xs:
        ctx.row(f"RSS with {x:>6,} idle clients", round(points[x], 1), "MB")
    per_client = (points[xs[-1]] - idle_rss) * 1024 / xs[-1]
    ctx.row("RSS per client (at the last step, less the idle server)", round(per_client, 1), "KB",
            Target("<", 30), f"{idle_rss:.0f} MB before any client"
            + ("" if wanted == xs[-1] else f"; {xs[-1]:,}, not {wanted:,}: open-files limit {limit:,}"))
    ctx.row("sampled idle clients that were sent anything or dropped", disturbed, "clients",
            Target("==", 0), check=True)


# --- throughput against concurrent senders ------------------------------------------------------

@scenario("curve-senders", "1 to 64 senders on A, 1 receiver on B: activities/s", short=None,
          full={"senders": [1, 2, 4, 8, 16, 32, 64], "count": 100_000},
          smoke={"senders": [1, 2], "count": 1_000})
def senders_curve(ctx, senders, count, batch=100, window=2_000):
    raise_open_files_limit(max(senders) + 1000)
    results = {}
    tallies_all = []
    for k in senders:
        per_sender = count // k
        with ctx.cluster() as cluster:
            # The senders log in while A is alone, so none is redirected to B; then B joins.
            a = cluster.start("A")
            receiver = Receiver().start()
            clients = []
            try:
                clients, _ = log_in_many([a.port], k, ctx.progress, alone=True)
                b = cluster.start("B", remote_port=a.port)
                far = log_in(b.port)
                clients.append(far)
                if far.port != b.port:
                    raise BenchmarkError("the receiver on B was redirected")
                tallies = [hand_over(client, MultiTally(f"sender {i} (all streams)", k, per_sender + 1),
                                     receiver) for i, client in enumerate(clients[:-1])]
                tallies.append(hand_over(far, MultiTally("receiver on B", k, per_sender + 1), receiver))
                for i, sender in enumerate(clients[:-1]):  # activity 0 of every stream, links live
                    sender.sock.sendall(_stream_lines(i, 0, 1))
                if not receiver.wait(tallies, 30, ctx.progress, "warming up", at_least=k):
                    raise BenchmarkError("activity 0 of every sender did not reach every client")
                started = time.perf_counter()
                threads = [threading.Thread(target=_send_stream, name=f"sender-{i}",
                                            args=(sender, i, 1, per_sender + 1, tallies[-1], window, batch))
                           for i, sender in enumerate(clients[:-1])]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                complete = wait_received(ctx, receiver, tallies, f"{k} senders: received")
                seconds = tallies[-1].done_at - started if complete else None
                ctx.memory(cluster)
            finally:
                receiver.stop()
                close_all(clients)
        tallies_all += tallies
        if seconds:
            results[k] = per_sender * k / seconds
            ctx.row(f"{k:2} sender{'s' if k > 1 else ' '}: activities/s at the receiver on B",
                    round(results[k]), "activities/s", note=f"{results[k] * (k + 1):,.0f} deliveries/s")
    xs = sorted(results)
    curve(ctx, "throughput-vs-senders", "Throughput against concurrent senders (2-server chain)",
          "concurrent senders on A (log scale)", "per second (log scale)", xs,
          {"activities/s at the receiver on B": [results[x] for x in xs],
           "deliveries/s (every sender receives every activity too)": [results[x] * (x + 1) for x in xs]},
          log_x=True, log_y=True)
    ctx.details["activities_per_s_by_senders"] = results
    if xs:
        # Each activity goes to k + 1 clients, so activities/s must fall as k grows; what must
        # not fall is the work the relay gets done: deliveries per second.
        ctx.row(f"deliveries/s with {xs[-1]} senders / with 1",
                round(results[xs[-1]] * (xs[-1] + 1) / (results[xs[0]] * (xs[0] + 1)), 2),
                "ratio", Target(">=", 1), "more senders must not collapse the relay")
    ctx.correctness(tallies_all, "clients, all runs")


def _stream_lines(sender, start, stop):
    template = ('{"command":"ACTIVITY_MESSAGE","username":"anonymous","activity":'
                '{"s":%d,"n":%%d,"p":"%s"}}\n' % (sender, PAD))
    return "".join(template % n for n in range(start, stop)).encode()


def _send_stream(client, sender, start, stop, far, window, batch):
    """One sender's stream, at most ``window`` ahead of what the receiver on B has of it."""
    deadline = time.monotonic() + WAIT
    n = start
    while n < stop:
        while n - far.received_of(sender) > window:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        end = min(stop, n + batch)
        client.sock.sendall(_stream_lines(sender, n, end))
        n = end
