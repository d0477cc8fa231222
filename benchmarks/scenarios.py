"""The scenarios. Each starts its own servers (``Cluster``), drives them with the client library,
checks the stream every client received, and adds rows to the run's ``Context``.

Sizes come in three grades: ``full`` (the sizes the issue's targets name), ``short`` (the same
targets, smaller streams: ``make bench-short``, under two minutes) and ``smoke`` (seconds; CI
runs it for the correctness checks only, its figures mean nothing).
"""

import concurrent.futures
import contextlib
import dataclasses
import random
import secrets
import statistics
import threading
import time

from activitynet import protocol
from activitynet.client import Client, ClientError, LoginFailed

from .cluster import HOST, BenchmarkError, Cluster, raise_open_files_limit
from .report import Row, Target
from .streams import ActivityLines, Receiver, Tally, activity, percentile, totals

WAIT = 120.0  # the longest any one wait of a scenario may take before it is a failure
BATCH = 500  # activities per send_activities call when sending as fast as possible
# Flooding senders stay at most this many activities ahead of the slowest receiver, so a figure
# is what the servers sustain rather than how much their outboxes swallow (a full outbox is a
# slow consumer, and is disconnected).
CHAIN_WINDOW = 10_000
FAN_OUT_WINDOW = 2_000  # x 200 receivers
MANY_WINDOW = 500  # x 2,000 receivers
LOGIN_THREADS = 16  # clients logging in at the same moment (each waits for its LOGIN_SUCCESS)
RAW_THROUGHPUT = ["--rate-limit", "0"]  # see Context.cluster


@dataclasses.dataclass
class Scenario:
    name: str
    description: str
    run: object  # function(ctx, **sizes)
    sizes: dict  # grade -> keyword arguments


SCENARIOS = {}


def scenario(name, description, *, full, short=None, smoke=None):
    """Register a scenario; one without ``short``/``smoke`` sizes runs only in a full run."""
    def register(function):
        sizes = {"full": full, "short": short, "smoke": smoke}
        SCENARIOS[name] = Scenario(name, description, function,
                                   {grade: size for grade, size in sizes.items() if size is not None})
        return function
    return register


class Context:
    """What one scenario run reports to: rows, details for the JSON file, the progress line."""

    def __init__(self, name, progress, profile=None):
        self.name = name
        self.progress = progress
        self.rows = []
        self.details = {}
        self.profile = profile  # a Profiler, or None
        self.clusters = []
        self._memory_row = None

    def row(self, figure, value, unit, target=None, note="", check=False):
        self.rows.append(Row(self.name, figure, value, unit, target, note, check))

    def correctness(self, tallies, what="clients"):
        """The one row every scenario has: lost + duplicated + reordered + garbled, must be 0."""
        wrong = totals(tallies)
        errors = sum(wrong.values())
        bad = [t.summary() for t in tallies if t.errors][:5]
        self.details["delivery"] = {**wrong, "clients": len(tallies), "examples": bad}
        note = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in wrong.items() if v)
        self.row(f"lost, duplicated or reordered ({len(tallies):,} {what})", errors, "activities",
                 Target("==", 0), note, check=True)
        return errors == 0

    def memory(self, cluster):
        """Peak RSS (VmHWM) and CPU time of the scenario's servers, read before they stop."""
        memory = cluster.memory_mib()
        self.details["memory_mib"] = {name: {"rss": rss, "peak": peak}
                                      for name, (rss, peak) in memory.items()}
        self.details["server_cpu_seconds"] = cluster.cpu_seconds()
        peaks = [peak for _rss, peak in memory.values() if peak is not None]
        if peaks:
            self._memory_row = Row(self.name, f"peak RSS, largest of {len(peaks)} server"
                                   f"{'s' if len(peaks) > 1 else ''}", round(max(peaks), 1), "MB")

    def cluster(self, **kwargs):
        """A Cluster whose servers run with ``--rate-limit 0`` unless ``extra`` says otherwise:
        the scenarios measure raw throughput, which the default flood control (500 activities/s
        per client, issue 11) would cap. The flood scenario (hostile.py) keeps the defaults."""
        kwargs.setdefault("extra", RAW_THROUGHPUT)
        cluster = Cluster(**kwargs)
        self.clusters.append(cluster)
        if self.profile is not None:
            self.profile.attach(self.name, cluster)
        return cluster

    def finish(self, failed=False):
        """The rows, the memory row last; a failing row for any server that logged a traceback.
        After a failure, the end of every server's log goes into the details."""
        rows = self.rows + ([self._memory_row] if self._memory_row else [])
        for cluster in self.clusters:
            for server in cluster.servers:
                if server.tracebacks():
                    rows.append(Row(self.name, f"tracebacks in server {server.name}'s log",
                                    server.tracebacks(), "", Target("==", 0), check=True))
                if failed or server.tracebacks():
                    self.details.setdefault("server_logs", {})[server.name] = server.log_text()[-4000:]
        return rows


class CpuClock:
    """CPU seconds used by the servers and by this process between ``start`` and ``stop``: how
    much of the two cores the measuring itself took."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __enter__(self):
        self._servers = self.cluster.cpu_seconds()
        self._self = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc):
        servers = self.cluster.cpu_seconds()
        self.result = {
            "wall": round(time.perf_counter() - self._wall, 3),
            "benchmark": round(time.process_time() - self._self, 3),
            **{name: round(servers[name] - self._servers.get(name, 0), 3) for name in servers},
        }
        return False


# --- helpers ------------------------------------------------------------------------------------

def log_in(port, username="anonymous", secret=None, alone=False):
    """A logged-in Client. A server with neighbours may answer LOGIN_SUCCESS with a REDIRECT
    right after it: the client library waits briefly for one and follows it (``client.port`` says
    where the client ended up). A server ``alone`` has nobody to redirect to: no wait."""
    client = Client(HOST, port, username, secret, timeout=30.0,
                    **({"redirect_wait": 0.0} if alone else {}))
    client.login()
    return client


def log_in_many(ports, count, progress, label="logged in", threads=None, alone=False):
    """``count`` anonymous clients, spread round-robin over ``ports``, logged in by a few threads
    at once (as independent clients would); returns them in order and the seconds it took."""
    threads = threads or LOGIN_THREADS
    targets = [ports[i % len(ports)] for i in range(count)]
    clients = [None] * count
    finished = [0]
    lock = threading.Lock()

    def one(i):
        clients[i] = log_in(targets[i], alone=alone)
        with lock:
            finished[0] += 1

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        try:
            for future in futures:
                while True:
                    try:
                        future.result(timeout=0.2)
                        break
                    except concurrent.futures.TimeoutError:
                        progress.update(f"{label} {finished[0]:,} of {count:,}")
        except BaseException:
            for future in futures:
                future.cancel()
            close_all(clients)
            raise
    return clients, time.perf_counter() - started


def hand_over(client, tally, receiver):
    """Let the lean receiver read ``client``'s socket from now on. Anything the client library
    has already read is checked first: nothing is skipped."""
    now = time.perf_counter()
    while True:
        try:
            message = client.recv(timeout=0)
        except TimeoutError:
            break
        if message is None:
            raise BenchmarkError(f"{client} was closed by the server before the test started")
        tally.feed(protocol.encode(message), now)
    receiver.add(client.sock, tally)
    return tally


def close_all(clients):
    for client in clients:
        if client is not None:
            client.close()


def send_stream(sender, start, stop, tallies=None, window=None, batch=BATCH, progress=None):
    """Send activities ``start`` .. ``stop``-1 as fast as the sender can, in batches of ``batch``
    (one ``sendall`` each). With ``window``, never more than that many ahead of the slowest of
    ``tallies``: the throughput measured is then what the servers sustain, not how much their
    outboxes can swallow before a slow consumer is cut off."""
    deadline = time.monotonic() + WAIT
    lines = ActivityLines(sender.username, sender.secret)
    n = start
    while n < stop:
        if window is not None:
            while n - min(t.received for t in tallies) > window:
                if time.monotonic() > deadline:
                    raise BenchmarkError("the receivers stopped making progress")
                time.sleep(0.001)
        end = min(stop, n + batch)
        now = time.perf_counter()
        sender.sock.sendall(lines(n, end, now))
        n = end
        if progress is not None and tallies:
            progress.update(f"sent {n - start:,} of {stop - start:,}, "
                            f"slowest receiver has {min(t.received for t in tallies):,}")


def send_paced(sender, start, stop, rate, tallies, progress):
    """Send ``start`` .. ``stop``-1 at ``rate`` activities per second on a fixed schedule (a late
    activity goes at once; the schedule does not drift)."""
    first = time.perf_counter()
    for i in range(start, stop):
        due = first + (i - start) / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sender.send_activity(activity(i))
        if i % 100 == 0:
            progress.update(f"sent {i - start:,} of {stop - start:,} at {rate:,}/s")
    return time.perf_counter() - first


def wait_received(ctx, receiver, tallies, label="received", timeout=WAIT):
    if not receiver.wait(tallies, timeout, ctx.progress, label):
        missing = sum(t.lost for t in tallies)
        ctx.details["timeout"] = f"{missing} activities had not arrived after {timeout:g} s"
        return False
    return True


def warm_up(ctx, sender, receiver, tallies):
    """Activity 0 crosses the network before any timing starts: links are live, every receiver
    is logged in and reachable."""
    sender.send_activity(activity(0))
    if not receiver.wait(tallies, 30, ctx.progress, "warming up", at_least=1):
        raise BenchmarkError("activity 0 did not reach every client within 30 s "
                             f"({sum(t.received for t in tallies)} of {len(tallies)})")


def latencies(tallies):
    """(median, p99, max, samples) in ms over the tallies' latencies, or None."""
    values = [x for t in tallies if t.latencies for x in t.latencies]
    if not values:
        return None
    return (statistics.median(values) * 1000, percentile(values, 0.99) * 1000,
            max(values) * 1000, len(values))


def latency_rows(ctx, tallies, target_median, target_p99):
    figures = latencies(tallies)
    if figures is None:
        return
    median, p99, longest, samples = figures
    ctx.details["latency_ms"] = {"median": median, "p99": p99, "max": longest, "samples": samples}
    ctx.row("median latency", round(median, 3), "ms", Target("<", target_median))
    ctx.row("p99 latency", round(p99, 3), "ms", Target("<", target_p99))


def saturated_latency(ctx, tallies, window):
    """Latency while flooding only says how long the queue was (about ``window`` activities
    ahead of the slowest client): kept in the JSON details, not in the table."""
    figures = latencies(tallies)
    if figures is not None:
        median, p99, longest, samples = figures
        ctx.details["latency_ms_while_flooding"] = {
            "median": median, "p99": p99, "max": longest, "samples": samples,
            "note": f"one sample per read; at most {window:,} activities in flight"}


def cpu_row(ctx, cpu, count, what):
    """CPU time per activity (or delivery), all servers together: what a faster server changes
    even on a busy machine, where wall-clock figures swing with the other load."""
    servers = {name: seconds for name, seconds in cpu.items() if name not in ("wall", "benchmark")}
    ctx.row(f"server CPU per {what}, all servers", round(sum(servers.values()) / count * 1e6, 2), "us",
            note=", ".join(f"{name} {seconds / count * 1e6:.2f} us" for name, seconds in servers.items())
            + f"; the benchmark process {cpu['benchmark'] / count * 1e6:.2f} us")


def stream_seconds(tallies, started):
    """From the first timed send until the last client had the whole stream."""
    return max(t.done_at for t in tallies) - started


@contextlib.contextmanager
def sender_on_a_receiver_on_b(ctx, cluster, total, **far_options):
    """The chain scenarios' set-up: B joins A, a receiver logs in on B and a sender on A, both
    handed to one lean Receiver and warmed up. Yields (sender, receiver, far tally, echo tally)
    and always stops the receiver and closes the clients."""
    a = cluster.start("A")
    b = cluster.start("B", remote_port=a.port)
    receiver = Receiver().start()
    clients = []
    try:
        receiving = log_in(b.port)
        sender = log_in(a.port)
        clients += [receiving, sender]
        far = hand_over(receiving, Tally("receiver on B", total, **far_options), receiver)
        echo = hand_over(sender, Tally("sender (its own echo)", total), receiver)
        warm_up(ctx, sender, receiver, [far, echo])
        yield sender, receiver, far, echo
    finally:
        receiver.stop()
        close_all(clients)


# --- scenarios ----------------------------------------------------------------------------------

@scenario("chain-throughput", "1 sender on A -> 1 receiver on B (B joined A), as fast as possible",
          full={"count": 300_000}, short={"count": 100_000}, smoke={"count": 2_000})
def chain_throughput(ctx, count):
    total = count + 1
    with ctx.cluster() as cluster, \
            sender_on_a_receiver_on_b(ctx, cluster, total, sample_latency=True) as (sender, receiver, far, echo):
        started = time.perf_counter()
        with CpuClock(cluster) as cpu:
            send_stream(sender, 1, total, [far, echo], window=CHAIN_WINDOW, progress=ctx.progress)
            complete = wait_received(ctx, receiver, [far, echo])
        ctx.details["cpu_seconds_while_streaming"] = cpu.result
        ctx.memory(cluster)
    if complete:
        seconds = stream_seconds([far], started)
        ctx.row("throughput, sender to receiver on the other server", round(count / seconds),
                "activities/s", Target(">=", 21_000))
        saturated_latency(ctx, [far], CHAIN_WINDOW)
        cpu_row(ctx, cpu.result, count, "activity")
    ctx.correctness([far, echo])


@scenario("chain-latency", "1 sender on A -> 1 receiver on B at 1,000 activities/s",
          full={"count": 10_000}, short={"count": 3_000}, smoke={"count": 200})
def chain_latency(ctx, count, rate=1000):
    total = count + 1
    with ctx.cluster() as cluster, \
            sender_on_a_receiver_on_b(ctx, cluster, total, latencies=True) as (sender, receiver, far, echo):
        far.latencies.clear()
        seconds = send_paced(sender, 1, total, rate, [far], ctx.progress)
        complete = wait_received(ctx, receiver, [far, echo])
        ctx.memory(cluster)
    ctx.row("rate achieved by the sender", round(count / seconds), "activities/s")
    if complete:
        latency_rows(ctx, [far], target_median=1, target_p99=5)
    ctx.correctness([far, echo])


@scenario("fan-out", "1 sender -> 200 receivers spread over 3 servers (A <- B <- C)",
          full={"count": 5_000, "receivers": 200}, short={"count": 2_000, "receivers": 200},
          smoke={"count": 100, "receivers": 12})
def fan_out(ctx, count, receivers):
    raise_open_files_limit(receivers + 1000)
    with ctx.cluster() as cluster:
        a = cluster.start("A")
        b = cluster.start("B", remote_port=a.port)
        c = cluster.start("C", remote_port=b.port)
        receiver = Receiver().start()
        clients = []
        try:
            ports = [a.port, b.port, c.port]
            clients, _ = log_in_many(ports, receivers, ctx.progress)
            sender = log_in(a.port)
            clients.append(sender)
            total = count + 1
            spread = {}
            tallies = []
            for i, client in enumerate(clients[:-1]):
                spread[client.port] = spread.get(client.port, 0) + 1
                tallies.append(hand_over(client, Tally(f"receiver {i} on {client.port}", total,
                                                       sample_latency=True), receiver))
            echo = hand_over(sender, Tally("sender (its own echo)", total), receiver)
            ctx.details["receivers_per_server"] = {name: spread.get(port, 0)
                                                   for name, port in zip("ABC", ports)}
            warm_up(ctx, sender, receiver, tallies + [echo])
            started = time.perf_counter()
            with CpuClock(cluster) as cpu:
                send_stream(sender, 1, total, tallies + [echo], window=FAN_OUT_WINDOW,
                            progress=ctx.progress)
                complete = wait_received(ctx, receiver, tallies + [echo], "delivered (activities)")
            ctx.details["cpu_seconds_while_streaming"] = cpu.result
            ctx.memory(cluster)
        finally:
            receiver.stop()
            close_all(clients)
    if complete:
        seconds = stream_seconds(tallies, started)
        ctx.row(f"deliveries to {receivers} receivers", round(count * receivers / seconds),
                "deliveries/s", Target(">=", 100_000))
        saturated_latency(ctx, tallies, FAN_OUT_WINDOW)
        cpu_row(ctx, cpu.result, count * receivers, "delivery")
    ctx.correctness(tallies + [echo], "receivers + the sender")


@scenario("many-clients", "2,000 clients log in to one server at once, then fan-out to them all",
          full={"clients": 2_000, "count": 500}, short={"clients": 2_000, "count": 200},
          smoke={"clients": 50, "count": 20})
def many_clients(ctx, clients, count):
    raise_open_files_limit(clients + 1000)
    with ctx.cluster() as cluster:
        a = cluster.start("A")
        receiver = Receiver().start()
        connected = []
        try:
            connected, seconds = log_in_many([a.port], clients, ctx.progress, alone=True)
            ctx.row(f"time for {clients:,} clients to connect and log in ({LOGIN_THREADS} at a time)",
                    round(seconds, 3), "s", Target("<", 2))
            total = count + 1
            tallies = [hand_over(client, Tally(f"client {i}", total, sample_latency=True), receiver)
                       for i, client in enumerate(connected)]
            # The first client sends; it is one of the receivers too.
            warm_up(ctx, connected[0], receiver, tallies)
            started = time.perf_counter()
            with CpuClock(cluster) as cpu:
                send_stream(connected[0], 1, total, tallies, window=MANY_WINDOW, batch=100,
                            progress=ctx.progress)
                complete = wait_received(ctx, receiver, tallies, "delivered (activities)")
            ctx.details["cpu_seconds_while_streaming"] = cpu.result
            ctx.memory(cluster)
        finally:
            receiver.stop()
            close_all(connected)
    if complete:
        seconds = stream_seconds(tallies, started)
        ctx.row(f"deliveries to {clients:,} clients of one server", round(count * clients / seconds),
                "deliveries/s", Target(">=", 50_000), "the fan-out target within 2x")
        saturated_latency(ctx, tallies, MANY_WINDOW)
        cpu_row(ctx, cpu.result, count * clients, "delivery")
    ctx.correctness(tallies)


RECOVERY_SIZES = dict(
    full={"count": 20_000, "receivers": 5, "before": 1_000, "cut_at_least": 4.0},
    short={"count": 20_000, "receivers": 5, "before": 1_000, "cut_at_least": 4.0},
    smoke={"count": 500, "receivers": 3, "before": 50, "cut_at_least": 0.0})


ONE_CABLE = ["--grace", "3600"]  # see recovery()


@scenario("recovery", "B dials A through a relay; cut it, send 20,000 on A, heal: until B has them",
          **RECOVERY_SIZES)
def recovery(ctx, count, receivers, before, cut_at_least, sent_on="A"):
    """The relay stands for the network between B (which dialled) and A. ``sent_on`` is the side
    whose client sends during the cut; the other side's clients must catch up after the heal.
    On B's side B asks for what it lacks; on A's side A asks once B has announced itself."""
    with ctx.cluster() as cluster:
        # The relay is the one cable: without a long --grace, A and B would link again directly
        # (each knows the other's announced address) around the cut (issue 9).
        a = cluster.start("A", extra=ONE_CABLE)
        relay = cluster.relay(a.port)
        b = cluster.start("B", remote_port=relay.port, extra=ONE_CABLE)
        near_server, far_server = (a, b) if sent_on == "A" else (b, a)
        receiver = Receiver().start()
        clients = []
        try:
            # Clients on both sides, logged in one at a time so the servers' loads stay even and
            # nobody is redirected across; where each ended up decides which side it is on.
            clients, _ = log_in_many([far_server.port, near_server.port], 2 * receivers,
                                     ctx.progress, threads=1)
            sender = log_in(near_server.port)
            clients.append(sender)
            if sender.port != near_server.port:
                raise BenchmarkError(f"the sender was redirected to {sender.port}")
            total = 1 + before + count
            tallies = [hand_over(client, Tally(f"receiver {i} on {client.port}", total), receiver)
                       for i, client in enumerate(clients[:-1])]
            far = [t for t, client in zip(tallies, clients) if client.port == far_server.port]
            near = [t for t, client in zip(tallies, clients) if client.port == near_server.port]
            echo = hand_over(sender, Tally("sender (its own echo)", total), receiver)
            if not far:
                raise BenchmarkError(f"every receiver was redirected; nobody is on {far_server.name}")
            ctx.details["receivers"] = {f"on {near_server.name} (sending side)": len(near),
                                        f"on {far_server.name}": len(far)}
            warm_up(ctx, sender, receiver, tallies + [echo])
            # Before the cut: the far side's clients have 0 .. before.
            send_stream(sender, 1, 1 + before)
            for tally in far:
                tally.expect(1 + before)
            if not wait_received(ctx, receiver, far, "before the cut: received"):
                raise BenchmarkError(f"activities sent before the cut did not reach {far_server.name}")
            for tally in far:
                tally.expect(total)
            relay.blackhole()  # a cut cable: silence both ways, only the heartbeat notices
            cut_at = time.perf_counter()
            ctx.progress.update("link cut", force=True)
            send_stream(sender, 1 + before, total)
            if not wait_received(ctx, receiver, near + [echo],
                                 f"during the cut: {near_server.name} delivered"):
                raise BenchmarkError(f"{near_server.name} did not deliver what its own clients "
                                     "sent during the cut")
            leaked = sum(t.received for t in far) - len(far) * (1 + before)
            if leaked:
                raise BenchmarkError(f"{leaked} activities crossed a cut link")
            # Both servers notice the silence (heartbeat timeout) and give the link up, as they
            # would for a real cut cable, before it heals.
            noticed = _wait_for(lambda: "silent" in a.log_text() and "silent" in b.log_text(),
                                cut_at_least + 10) if cut_at_least else None
            while time.perf_counter() - cut_at < cut_at_least:
                ctx.progress.update(f"link cut for {time.perf_counter() - cut_at:.1f} s")
                time.sleep(0.05)
            relayed_before = relay.bytes_relayed()
            received_before = [t.bytes for t in far]
            healed_at = time.perf_counter()
            relay.heal()
            complete = wait_received(ctx, receiver, far, "after the heal: received", timeout=60)
            relayed = relay.bytes_relayed() - relayed_before
            missing_bytes = statistics.mean(t.bytes - b0 for t, b0 in zip(far, received_before))
            reconnected = [t for t in relay.accepted_at if t > healed_at]
            ctx.memory(cluster)
        finally:
            receiver.stop()
            close_all(clients)
    ctx.details["cut_seconds"] = round(healed_at - cut_at, 2)
    ctx.details["both_sides_noticed_the_cut"] = noticed
    if complete:
        ctx.row(f"heal -> all {count:,} at {far_server.name}'s clients",
                round(max(t.done_at for t in far) - healed_at, 3), "s", Target("<", 2))
        if reconnected:
            ctx.row("  of which: heal -> B redialled", round(reconnected[0] - healed_at, 3), "s",
                    note=f"B's redial backoff is capped by -a {cluster.interval} ms")
        ctx.row("bytes across the link / bytes of the missing activities",
                round(relayed / missing_bytes, 2), "ratio", Target("<=", 2),
                f"{relayed:,} bytes relayed for {missing_bytes:,.0f} missing")
    ctx.correctness(tallies + [echo], "clients on A and B + the sender")


@scenario("recovery-other-side", "the same with the sender on B, the side that dialled: until A "
          "has them", **RECOVERY_SIZES)
def recovery_other_side(ctx, **sizes):
    recovery(ctx, sent_on="B", **sizes)


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@scenario("late-join", "B joins A, which holds 100,000 users: time until B knows them all",
          full={"users": 100_000}, short={"users": 100_000}, smoke={"users": 1_000})
def late_join(ctx, users, connections=4, sample=200):
    with ctx.cluster() as cluster:
        a = cluster.start("A")
        accounts = [(f"user{i:06d}", secrets.token_hex(16)) for i in range(users)]
        seconds = register_all(ctx, a.port, accounts, connections)
        ctx.row(f"registering {users:,} users on A (pipelined, {connections} connections)",
                round(users / seconds), "users/s")
        # The last account of each connection: A's table holds the users in registration order
        # per connection, and SYNC_USER carries them in that order.
        lasts = [accounts[len(accounts) - 1 - i] for i in range(min(connections, users))]
        b = cluster.start("B", remote_port=a.port)
        learned_at = None
        deadline = time.monotonic() + 60
        pending = list(lasts)
        while pending and time.monotonic() < deadline:
            name, secret = pending[0]
            try:
                log_in(b.port, name, secret, alone=True).close()  # A has no clients: no REDIRECT
                pending.pop(0)
            except LoginFailed:
                time.sleep(0.005)
            ctx.progress.update(f"waiting for B to know the last users ({len(pending)} to go)")
        if not pending:
            learned_at = time.perf_counter()
        missing = 0
        for name, secret in random.Random(1).sample(accounts, min(sample, users)):
            try:
                log_in(b.port, name, secret, alone=True).close()
            except LoginFailed:
                missing += 1
        ctx.memory(cluster)
    if learned_at is not None:
        ctx.row(f"B listening -> B knows all {users:,} users", round(learned_at - b.listening_at, 3),
                "s", Target("<", 2), f"{learned_at - b.started_at:.2f} s from B's process start")
    ctx.details["sampled_users_unknown_on_B"] = missing
    ctx.row(f"users B does not know (of {min(sample, users)} sampled + the last ones)",
            missing + len(pending), "users", Target("==", 0), check=True)


def register_all(ctx, port, accounts, connections):
    """REGISTER every (name, secret) on ``port``, pipelined: each of ``connections`` clients
    sends its share without waiting, and its replies are read as they come."""
    shares = [accounts[i::connections] for i in range(connections)]
    clients = [Client(HOST, port, *share[0], timeout=30.0) for share in shares]
    done = [0] * connections

    def one(index):
        client, share = clients[index], shares[index]
        client.register()  # opens the connection; it stays open for the other REGISTERs
        done[index] = sent = 1
        while done[index] < len(share):
            while sent < len(share) and sent - done[index] < 5_000:
                for name, secret in share[sent:sent + 1000]:
                    client.send(protocol.register(name, secret))
                sent = min(len(share), sent + 1000)
            message = client.recv(timeout=30)
            if message is None or message.get("command") != "REGISTER_SUCCESS":
                raise BenchmarkError(f"REGISTER got {message}")
            done[index] += 1

    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(connections) as pool:
            futures = [pool.submit(one, i) for i in range(connections)]
            while not all(f.done() for f in futures):
                ctx.progress.update(f"registered {sum(done):,} of {len(accounts):,} users on A")
                time.sleep(0.05)
            for future in futures:
                future.result()
    finally:
        close_all(clients)
    return time.perf_counter() - started


@scenario("memory-idle-clients", "10,000 idle logged-in clients on one server: its RSS",
          full={"clients": 10_000}, short={"clients": 10_000}, smoke={"clients": 200})
def memory_idle_clients(ctx, clients, disconnect_wait=30.0):
    raise_open_files_limit(clients + 1000)
    with ctx.cluster() as cluster:
        a = cluster.start("A")
        idle_rss, _ = a.memory_mib()
        idle_threads = a.threads()
        connected = []
        try:
            connected, seconds = log_in_many([a.port], clients, ctx.progress, alone=True)
            time.sleep(0.5)  # let the server settle (threads parked, outboxes empty)
            rss, _peak = a.memory_mib()
            cpu_before = a.cpu_seconds()
            disturbed = sum(1 for client in connected if not _idle(client))
        finally:
            close_all(connected)
        # Every client goes at once (a load generator crashing, a switch failing): how long the
        # server takes to let go of them all.
        closed_at = time.perf_counter()
        while a.threads() > idle_threads and time.perf_counter() - closed_at < disconnect_wait:
            ctx.progress.update(f"{a.threads() - idle_threads:,} connection threads left")
            time.sleep(0.02)
        released = time.perf_counter() - closed_at
        left = a.threads() - idle_threads
        ctx.details["disconnect"] = {"seconds": round(released, 2), "threads_left": left,
                                     "server_cpu_seconds": round(a.cpu_seconds() - cpu_before, 2)}
        ctx.memory(cluster)
    ctx.row(f"RSS of the server with {clients:,} idle clients", round(rss, 1), "MB", Target("<", 300),
            f"{idle_rss:.0f} MB before they connected")
    ctx.row(f"logging in {clients:,} clients ({LOGIN_THREADS} at a time)", round(seconds, 2), "s")
    ctx.row("idle clients that were sent anything or dropped", disturbed, "clients", Target("==", 0),
            check=True)
    ctx.row(f"all {clients:,} disconnect at once -> server has let go of them",
            round(released, 2), "s",
            note=(f"{left:,} connections still open after {disconnect_wait:g} s; " if left else "")
            + f"{ctx.details['disconnect']['server_cpu_seconds']:.1f} s of server CPU")


def _idle(client):
    """True if nothing arrived for ``client`` since its login and its connection is open."""
    try:
        client.recv(timeout=0)  # a message, or None for a closed connection: not idle
    except TimeoutError:
        return True
    except ClientError:  # reset
        return False
    return False


@scenario("memory-history", "a history of 100,000 activities on one server: its RSS",
          full={"count": 100_000}, short={"count": 100_000}, smoke={"count": 2_000})
def memory_history(ctx, count):
    with ctx.cluster() as cluster:
        a = cluster.start("A", extra=["--history", str(max(count, 1))])
        idle_rss, _ = a.memory_mib()
        receiver = Receiver().start()
        clients = []
        try:
            sender = log_in(a.port, alone=True)
            clients.append(sender)
            echo = hand_over(sender, Tally("sender (its own echo)", count), receiver)
            send_stream(sender, 0, count, [echo], window=50_000, progress=ctx.progress)
            complete = wait_received(ctx, receiver, [echo])
            time.sleep(0.2)
            rss, peak = a.memory_mib()
        finally:
            receiver.stop()
            close_all(clients)
        ctx.memory(cluster)
    if complete:
        ctx.row(f"RSS of the server holding {count:,} activities", round(rss, 1), "MB",
                Target("<", 100), f"{idle_rss:.0f} MB at start, peak {peak:.0f} MB")
    ctx.correctness([echo], "client")


from . import curves  # noqa: E402,F401  (the scaling curves register themselves here too)
from . import monitoring  # noqa: E402,F401  (the monitor's scenarios register themselves here too)
from . import hostile  # noqa: E402,F401  (registers issue 11's scenarios; it imports from here)
from . import healing  # noqa: E402,F401 (registers the self-healing scenario; issue 9)
