"""The monitor's scenarios (issue 12): what watching a server costs the relay, and how fast the
monitor answers for a big server.

- ``monitor-overhead``: the chain of ``chain-throughput`` (a sender on A, a receiver on B) with
  ``--monitor-port`` off and on, in rounds that alternate (off, on, off, on, ...) so that the
  machine's other load falls on both alike; with the monitor on, both servers' ``/metrics`` are
  scraped every second while the stream runs. The figure is the throughput with the monitor on as
  a share of the throughput with it off (median rounds), next to the servers' CPU time per
  activity in each mode, which a busy machine disturbs less. The scrapes are checked too: every
  one answered 200, and A's count of activities from clients is the whole stream.
- ``monitor-scrape``: one server with 10,000 idle logged-in clients; the time to fetch ``/varz``,
  ``/metrics`` and every ``/connz`` page of 1,000 clients, as a scraper sees it (request sent to
  last byte read, over a new connection each time, as Prometheus does).
"""

import http.client
import json
import re
import statistics
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from .cluster import BenchmarkError, raise_open_files_limit
from .report import Target
from .scenarios import (CHAIN_WINDOW, RAW_THROUGHPUT, CpuClock, close_all, log_in_many, scenario,
                        sender_on_a_receiver_on_b, send_stream, stream_seconds, wait_received)
from .streams import percentile

MONITOR_LINE = re.compile(r"monitor on http://([\d.]+):(\d+)/")
MONITORED = ["--monitor-port", "0"]
SCRAPE_EVERY = 1.0


def monitor_address(server, timeout=30.0):
    """(host, port) of a started server's monitor, from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = MONITOR_LINE.search(server.log_text())
        if match:
            return match.group(1), int(match.group(2))
        time.sleep(0.05)
    raise BenchmarkError(f"server {server.name} did not log its monitor's address")


def fetch(address, path):
    """(status, body bytes, seconds from request to the last byte), over a new connection."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    return answer.status, body, time.perf_counter() - started


class Scraper:
    """Fetches ``/metrics`` of some monitors every ``SCRAPE_EVERY`` seconds, as Prometheus would,
    until stopped; keeps every answer's status and time."""

    def __init__(self, addresses):
        self.addresses = addresses
        self.statuses = []
        self.seconds = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _run(self):
        while True:
            for address in self.addresses:
                try:
                    status, _body, seconds = fetch(address, "/metrics")
                except OSError as exc:  # counted as a failed scrape
                    status, seconds = f"{type(exc).__name__}: {exc}", None
                self.statuses.append(status)
                if seconds is not None:
                    self.seconds.append(seconds)
            if self._stop.wait(SCRAPE_EVERY):
                return


def counter_value(metrics_text, family_name):
    for family in text_string_to_metric_families(metrics_text.decode()):
        if family.name == family_name:
            return family.samples[0].value
    return None


def one_chain(ctx, count, monitored):
    """Stream ``count`` activities from A to B. Returns (activities/s, the servers' CPU seconds
    per activity, the tallies, the scraper (None with the monitor off), A's /metrics read once
    the stream has arrived (or None))."""
    total = count + 1
    with ctx.cluster(extra=RAW_THROUGHPUT + (MONITORED if monitored else [])) as cluster, \
            sender_on_a_receiver_on_b(ctx, cluster, total) as (sender, receiver, far, echo):
        scraper = Scraper([monitor_address(server) for server in cluster.servers] if monitored else [])
        started = time.perf_counter()
        with scraper, CpuClock(cluster) as cpu:
            send_stream(sender, 1, total, [far, echo], window=CHAIN_WINDOW, progress=ctx.progress)
            complete = wait_received(ctx, receiver, [far, echo])
        final = fetch(scraper.addresses[0], "/metrics") if monitored else None
        ctx.memory(cluster)
    if not complete:
        raise BenchmarkError(f"the stream did not complete (monitor {'on' if monitored else 'off'})")
    server_cpu = sum(cpu.result[server.name] for server in cluster.servers)
    return (count / stream_seconds([far], started), server_cpu / count, [far, echo],
            (scraper if monitored else None), final)


@scenario("monitor-overhead", "chain throughput, --monitor-port on with /metrics scraped every second vs off",
          full={"count": 60_000, "rounds": 6}, short={"count": 30_000, "rounds": 2},
          smoke={"count": 2_000, "rounds": 1})
def monitor_overhead(ctx, count, rounds):
    rates = {False: [], True: []}
    cpu = {False: [], True: []}
    scrapes, scrape_seconds, last_counts, tallies = [], [], [], []
    for round_number in range(rounds):
        for monitored in (False, True):
            ctx.progress.update(f"round {round_number + 1} of {rounds}, monitor {'on' if monitored else 'off'}")
            rate, cpu_each, checked, scraper, final = one_chain(ctx, count, monitored)
            rates[monitored].append(rate)
            cpu[monitored].append(cpu_each)
            tallies += checked
            if scraper is not None:
                status, body, _seconds = final
                scrapes += [*scraper.statuses, status]
                scrape_seconds += scraper.seconds
                last_counts.append(counter_value(body, "activitynet_activities_from_clients"))
    # each mode's median round: on a shared machine one round can be far off either way
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    ctx.details["rounds"] = {"off": [round(r) for r in rates[False]], "on": [round(r) for r in rates[True]]}
    ctx.row("throughput, monitor off, median round", round(off), "activities/s",
            note=", ".join(f"{r:,.0f}" for r in rates[False]))
    ctx.row("throughput, monitor on, /metrics of A and B every second, median round", round(on), "activities/s",
            note=", ".join(f"{r:,.0f}" for r in rates[True]))
    ctx.row("throughput with the monitor on, share of off", round(100 * on / off, 1), "%", Target(">=", 97),
            f"{rounds} round{'s' if rounds > 1 else ''} each, alternating")
    cpu_off, cpu_on = (1e6 * statistics.mean(cpu[mode]) for mode in (False, True))
    ctx.row("CPU of A and B per activity, monitor off", round(cpu_off, 1), "µs")
    ctx.row("CPU of A and B per activity, monitor on", round(cpu_on, 1), "µs",
            note=(f"{100 * (cpu_on / cpu_off - 1):+.1f}% against off" if cpu_off
                  else "the stream was too short for the CPU clock's 10 ms ticks"))
    bad = sum(1 for status in scrapes if status != 200)
    ctx.row(f"/metrics scrapes answered other than 200 (of {len(scrapes)})", bad, "scrapes",
            Target("==", 0), check=True)
    if scrape_seconds:
        ctx.row("/metrics scrape while streaming, median", round(1000 * statistics.median(scrape_seconds), 2), "ms")
    wrong = sum(1 for value in last_counts if value != count + 1)
    ctx.row("A's /metrics count of activities from clients != the stream", wrong, "runs", Target("==", 0),
            f"last counts {', '.join(f'{v:,.0f}' for v in last_counts if v is not None)}", check=True)
    ctx.correctness(tallies)


@scenario("monitor-scrape", "/varz, /metrics and /connz pages of a server with 10,000 clients",
          full={"clients": 10_000, "samples": 50}, short={"clients": 10_000, "samples": 20},
          smoke={"clients": 200, "samples": 5})
def monitor_scrape(ctx, clients, samples):
    raise_open_files_limit(clients + 1000)
    with ctx.cluster(extra=MONITORED) as cluster:
        a = cluster.start("A")
        address = monitor_address(a)
        connected = []
        try:
            connected, _seconds = log_in_many([a.port], clients, ctx.progress, alone=True)
            wait_for_count(address, clients)
            timings, cpu, answers = {}, {}, {}
            pages = [f"/connz?offset={offset}&limit=1000" for offset in range(0, clients, 1000)]
            for path, paths in (("/varz", ["/varz"] * samples), ("/metrics", ["/metrics"] * samples),
                                ("/connz", pages * max(1, samples // len(pages)))):
                before = a.cpu_seconds()
                timings[path], answers[path] = timed(ctx, address, paths)
                cpu[path] = (a.cpu_seconds() - before) / len(paths)
            ctx.memory(cluster)
        finally:
            close_all(connected)
    ctx.details["milliseconds"] = {path: [round(1000 * s, 3) for s in values] for path, values in timings.items()}
    listed = [record["id"] for body in answers["/connz"][:len(pages)] for record in json.loads(body)["connections"]]
    ctx.row("/connz pages: clients missing or listed twice", abs(clients - len(set(listed))) + len(listed)
            - len(set(listed)), "clients", Target("==", 0), f"{len(listed):,} listed in {len(pages)} pages",
            check=True)
    for path, target in (("/varz", 10), ("/metrics", 10), ("/connz", 50)):
        values = sorted(timings[path])
        what = "a page of 1,000 clients" if path == "/connz" else "one scrape"
        ctx.row(f"{path} with {clients:,} clients, {what}, median", round(1000 * statistics.median(values), 2),
                "ms", Target("<", target),
                f"p90 {1000 * percentile(values, 0.9):.1f} ms, max {1000 * values[-1]:.1f} ms, {len(values)} "
                f"requests; server CPU {1000 * cpu[path]:.1f} ms each")


def wait_for_count(address, clients, timeout=60.0):
    """Until the monitor counts every client (the last logins may still be settling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body, _seconds = fetch(address, "/varz")
        if status == 200 and json.loads(body)["counts"]["clients"] == clients:
            return
        time.sleep(0.1)
    raise BenchmarkError(f"the monitor did not count {clients:,} clients within {timeout:g} s")


def timed(ctx, address, paths):
    """Seconds for each fetch of ``paths``, one after another, and the bodies; every answer must
    be 200."""
    seconds, bodies = [], []
    for number, path in enumerate(paths):
        status, body, took = fetch(address, path)
        if status != 200:
            raise BenchmarkError(f"{path} answered {status}: {body[:200]!r}")
        seconds.append(took)
        bodies.append(body)
        ctx.progress.update(f"{path.split('?')[0]} {number + 1} of {len(paths)}")
        time.sleep(0.02)  # a scraper's pace, not a flood
    return seconds, bodies
