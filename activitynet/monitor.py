"""The monitoring port: what a server is doing, over HTTP, for people, scripts and Prometheus.

``--monitor-port`` starts a ``Monitor``: a small HTTP server (``http.server``) in threads of its
own, answering read-only GETs:

  /healthz   200 {"status": "ok"}; 503 while stopping or when the durable store is failing
  /varz      identity, settings, counts, counters since start and rates
  /connz     client connections, paged: ?offset=0&limit=100
  /linksz    server links
  /networkz  the network as this server sees it (servers and links)
  /metrics   the same figures in the Prometheus text format
  /          the live network map (``activitynet/web``)

It reads a *source*, a narrow view of the server (see ``Source``): one plain-data snapshot
per request (the state lock is held only to copy) and the counters since start, read as plain
ints (the relay bumps them with ``+=``; see ``stats``). Nothing here touches the relay's live
structures, so a monitor request costs the relay one copy under its lock and nothing else.

The monitor can never stop or slow the relay: at most ``MAX_REQUESTS`` requests are served at
once (one thread each, with a socket timeout); more are answered 503 at once without a thread.
Requests are HTTP/1.0 (one per connection), request lines and headers are bounded by
``http.server``, every error is a JSON body with a 4xx or 5xx status, and an exception in a
handler is logged and answered 500 without touching anything else. Rates are sampled once a
second by a thread of the monitor's own, so a one-off request still gets them.

JSON answers carry ``Access-Control-Allow-Origin: *``: they are read-only, and the map page
served by one server reads the ``/varz`` of the others' monitors.
"""

import collections
import http.server
import importlib.resources
import json
import logging
import socket
import socketserver
import sys
import threading
import time
import typing
import urllib.parse

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import stats

log = logging.getLogger(__name__)

MAX_REQUESTS = 8  # served at once; the rest get 503 without costing a thread
REQUEST_TIMEOUT = 5.0  # seconds a silent HTTP client may hold one of those
DEFAULT_PAGE = 100
MAX_PAGE = 10_000
RATE_WINDOW = 5  # seconds of samples a rate is averaged over
# What the rates are taken of (counter attribute -> rate name in /varz)
RATED = {
    "activities_from_clients": "activities_from_clients_per_s",
    "activities_from_servers": "activities_from_servers_per_s",
    "activities_delivered": "activities_delivered_per_s",
    "activities_relayed": "activities_relayed_per_s",
    "bytes_in": "bytes_in_per_s",
    "bytes_out": "bytes_out_per_s",
}
STATIC = {  # the page's files (package data in activitynet/web) and their content types
    "/": ("index.html", "text/html; charset=utf-8"),
    "/map.css": ("map.css", "text/css; charset=utf-8"),
    "/map.js": ("map.js", "text/javascript; charset=utf-8"),
}


class Source(typing.Protocol):
    """What the monitor reads; the server provides one (tests provide a fake).

    ``network()`` may be missing: without it ``/networkz`` shows this server and its neighbours.
    """

    stopping: threading.Event  # set once the server shuts down

    def counter_values(self):
        """The counters since start: ``stats.Counters.as_dict()`` of the server's counters, with
        figures the server sums at read time (bytes of open connections) filled in."""

    def snapshot(self, clients=True):
        """Plain data, the shape of ``State.snapshot()`` (see ARCH.md) plus ``"version"``,
        ``"started_at"`` (unix time), ``"settings"`` (a dict, secrets left out),
        ``"client_count"`` and ``"client_bytes_queued"``. With ``clients=False`` the ``"clients"``
        list is left out, with a ``slice`` it holds only that page: copying 10,000 client records
        costs milliseconds, and only /connz needs a page of them."""

    def health(self):
        """None while healthy, else what is failing, in words (a durable store's error, say)."""

    def network(self):
        """The network map, ``{"servers": [{"address": "h:p", ...}], "links": [{"a": "h:p",
        "b": "h:p"}], "root": "h:p" or None}``, or None while unknown. Extra fields of a server
        (``load``, ``monitor``: its monitor's "h:p", ``alive``, ...) are passed on to /networkz."""


class BadRequest(Exception):
    """A request a person must fix; the message says how (answered 400)."""


# --- views: plain data in, plain data out ---------------------------------------------------------

def address_of(snapshot):
    return f"{snapshot['hostname']}:{snapshot['port']}"


def varz(snapshot, counters, rates, now):
    links = snapshot["links"]
    return {
        "server": {
            "origin": snapshot["origin"],
            "address": address_of(snapshot),
            "version": snapshot["version"],
            "started_at": snapshot["started_at"],
            "start_time": iso_time(snapshot["started_at"]),
            "uptime_s": round(now - snapshot["started_at"], 3),
        },
        "settings": snapshot["settings"],
        "counts": {
            "clients": snapshot["client_count"],
            "logged_in_names": snapshot["logged_in_names"],
            "users": snapshot["users"],
            "blocked": snapshot["blocked"],
            "links": len(links),
            "live_links": sum(1 for link in links if link["live"]),
            "pending": snapshot["pending"],
            "history_entries": snapshot["history"]["entries"],
            "history_bytes": snapshot["history"]["bytes"],
            "bytes_queued": snapshot["client_bytes_queued"] + sum(link["bytes_queued"] for link in links),
        },
        "counters": counters,
        "rates": rates,
        "now": now,
    }


def page_bounds(query):
    """``(offset, limit)`` from a /connz query string; BadRequest says what is wrong."""
    fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    offset = whole_number(fields.get("offset", "0"), "offset", 0, None)
    limit = whole_number(fields.get("limit", str(DEFAULT_PAGE)), "limit", 1, MAX_PAGE)
    return offset, limit


def whole_number(text, name, low, high):
    if not (text.isascii() and text.isdigit()) or int(text) < low or (high is not None and int(text) > high):
        limits = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise BadRequest(f"{name} must be a whole number {limits}, not {text!r}")
    return int(text)


def connz(snapshot, offset, limit):
    """``snapshot`` holds the page of clients from ``offset`` (``snapshot(clients=slice)``)."""
    return {"total": snapshot["client_count"], "offset": offset, "limit": limit,
            "connections": snapshot["clients"][:limit]}


def linksz(snapshot):
    return {"total": len(snapshot["links"]), "links": snapshot["links"]}


def neighbourhood(snapshot):
    """The network as far as this server knows without a network map: itself and its links."""
    me = address_of(snapshot)
    servers, links = [{"address": me}], []
    for link in snapshot["links"]:
        peer = link["peer"] or link["address"]
        servers.append({"address": peer, "load": link["load"]})
        links.append({"a": me, "b": peer})
    return {"servers": servers, "links": links, "root": None}


def networkz(snapshot, network_map, figures):
    """The network for /networkz: ``network_map`` (or the neighbourhood when it is None), with
    this server's own ``figures`` (clients, uptime, rates) and its links' phases filled in."""
    me = address_of(snapshot)
    known = network_map if network_map is not None else neighbourhood(snapshot)
    servers = {}
    for server in known["servers"]:
        entry = {"address": server["address"], "load": None, "monitor": None, "alive": True}
        entry.update(server)
        entry["self"] = entry["address"] == me
        servers[entry["address"]] = entry
    servers.setdefault(me, {"address": me, "monitor": None, "alive": True, "self": True})
    servers[me].update(figures, origin=snapshot["origin"], load=snapshot["client_count"])
    mine = {(link["peer"] or link["address"]): link for link in snapshot["links"]}
    links = []
    for link in known["links"]:
        entry = {"a": link["a"], "b": link["b"], "live": None, "phase": None}
        entry.update(link)
        other = link["b"] if link["a"] == me else link["a"] if link["b"] == me else None
        if other in mine:
            entry.update(live=mine[other]["live"], phase=mine[other]["phase"])
        links.append(entry)
        for end in (link["a"], link["b"]):
            servers.setdefault(end, {"address": end, "load": None, "monitor": None, "alive": True,
                                     "self": False})
    for server in servers.values():
        server["links"] = sum(1 for link in links if server["address"] in (link["a"], link["b"]))
    return {"self": me, "root": known.get("root"),
            "source": "neighbours" if network_map is None else "network map",
            "servers": sorted(servers.values(), key=lambda s: s["address"]), "links": links}


def iso_time(unix):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


# --- rates ---------------------------------------------------------------------------------------

class RateMeter:
    """Per-second rates of some counters over the last ``RATE_WINDOW`` seconds or so: from the
    oldest of the samples the monitor's sampler thread takes once a second to the counters' values
    now (reads of plain ints; no lock)."""

    MIN_SPAN = 0.2  # seconds; a rate over less is noise

    def __init__(self, counter_values, clock=time.monotonic):
        self.counter_values = counter_values  # () -> {counter: value}, e.g. Source.counter_values
        self.clock = clock
        self._samples = collections.deque(maxlen=RATE_WINDOW)  # (time, values)
        self.sample()

    def _values(self):
        values = self.counter_values()
        return tuple(values[name] for name in RATED)

    def sample(self):
        self._samples.append((self.clock(), self._values()))  # deque.append is atomic

    def rates(self, counter_values=None):
        """``{rate name: per second}``; None in the first moments after start. Give the
        ``counter_values`` just read, if any, so they are not read twice."""
        t0, first = self._samples[0]
        now = self.clock()
        values = self._values() if counter_values is None else tuple(counter_values[name] for name in RATED)
        if now - t0 < self.MIN_SPAN:
            return dict.fromkeys(RATED.values())
        return {name: round((b - a) / (now - t0), 3) for name, a, b in zip(RATED.values(), first, values)}


# --- /metrics --------------------------------------------------------------------------------------

class MetricsCollector:
    """A prometheus_client collector that reads the source at scrape time, so counting costs the
    relay a plain ``+=`` and never a library call."""

    def __init__(self, source):
        self.source = source

    def describe(self):
        return []  # unknown until scraped; keeps registration from calling collect()

    def collect(self):
        snapshot = self.source.snapshot(clients=False)
        counters = self.source.counter_values()
        info = InfoMetricFamily("activitynet_server", "This server's identity.")
        info.add_metric([], {"origin": snapshot["origin"], "address": address_of(snapshot),
                             "version": snapshot["version"]})
        yield info
        yield GaugeMetricFamily("activitynet_start_time_seconds", "Start time (unix seconds).",
                                value=snapshot["started_at"])
        for field in stats.FIELDS:
            yield CounterMetricFamily(field.metric, field.help, value=counters[field.attribute])
        invalid = CounterMetricFamily("activitynet_invalid_messages",
                                      "Messages refused with INVALID_MESSAGE, by reason.", labels=["reason"])
        for reason, count in counters["invalid_messages"].items():
            invalid.add_metric([reason], count)
        yield invalid
        links = snapshot["links"]
        gauges = (
            ("activitynet_clients", "Logged-in client connections.", snapshot["client_count"]),
            ("activitynet_logged_in_names", "Distinct user names logged in.", snapshot["logged_in_names"]),
            ("activitynet_registered_users", "Registered users known to this server.", snapshot["users"]),
            ("activitynet_blocked_names", "User names blocked network-wide.", snapshot["blocked"]),
            ("activitynet_server_links", "Authenticated server links.", len(links)),
            ("activitynet_pending_connections", "Connections not yet logged in or authenticated.",
             snapshot["pending"]),
            ("activitynet_history_entries", "Activities kept for recovery.", snapshot["history"]["entries"]),
            ("activitynet_history_bytes", "Bytes of activities kept for recovery.", snapshot["history"]["bytes"]),
            ("activitynet_client_queued_bytes", "Bytes waiting in client outboxes.",
             snapshot["client_bytes_queued"]),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        yield from link_metrics(links)


def link_metrics(links):
    labels = ["peer", "link"]
    families = {
        "live": GaugeMetricFamily("activitynet_link_live", "1 once a link is caught up and live.", labels=labels),
        "load": GaugeMetricFamily("activitynet_link_peer_clients", "The peer's announced client load.",
                                  labels=labels),
        "bytes_queued": GaugeMetricFamily("activitynet_link_queued_bytes", "Bytes waiting in the link's outbox.",
                                          labels=labels),
        "last_heard_s": GaugeMetricFamily("activitynet_link_last_heard_seconds",
                                          "Seconds since anything was heard on the link.", labels=labels),
        "activities_sent": CounterMetricFamily("activitynet_link_activities_sent",
                                               "Activities sent on the link.", labels=labels),
        "activities_received": CounterMetricFamily("activitynet_link_activities_received",
                                                   "Activities received on the link.", labels=labels),
    }
    for link in links:
        values = [link["peer"] or link["address"], str(link["id"])]
        for key, family in families.items():
            if link[key] is not None:
                family.add_metric(values, float(link[key]))
    yield from families.values()


# --- HTTP ------------------------------------------------------------------------------------------

class MonitorHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``MAX_REQUESTS`` requests in flight."""

    daemon_threads = True  # never keeps the process alive; ``Monitor.stop`` waits for them
    allow_reuse_address = True

    def __init__(self, address, handler, monitor):
        self.monitor = monitor
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._active_lock = threading.Lock()  # guards _active
        self._active = set()  # sockets of the requests being served, cut short by ``cut_requests``
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer's own server_bind asks the resolver for a fully qualified name, which can
        # hang on a machine without DNS; the name is not used here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            refuse_busy(request)
            self.shutdown_request(request)
            return
        # tracked from here, not from inside its thread: ``cut_requests`` must also reach a
        # request whose thread has not run yet (a browser's preconnect sends nothing for seconds)
        with self._active_lock:
            self._active.add(request)
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started: this request only
            with self._active_lock:
                self._active.discard(request)
            self.slots.release()
            log.exception("monitor: cannot serve a request")
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.discard(request)
            self.slots.release()

    def cut_requests(self):
        """End the requests being served (a silent client would hold its thread until timeout)."""
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # a client that hung up or timed out mid-request; nothing of ours failed
        log.debug("monitor: connection from %s:%d ended: %r", *client_address[:2], sys.exc_info()[1])


def refuse_busy(sock):
    """Answer 503 on the accepting thread: a short write to a fresh socket does not block."""
    body = json.dumps({"error": f"the monitor is serving {MAX_REQUESTS} requests already; retry"}).encode()
    head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n\r\n").encode()
    try:
        sock.settimeout(0.5)
        sock.sendall(head + body)
    except OSError:
        pass


ERROR_TEXT = {  # http.server's own refusals, said so a person knows what to change
    400: "bad request",
    404: "not found",
    405: "only GET and HEAD are served",
    408: "the request did not arrive in time",
    414: "the request line is longer than 65536 bytes",
    431: "the request headers are too long or too many",
}


class MonitorHandler(http.server.BaseHTTPRequestHandler):
    server_version = "activitynet-monitor"
    timeout = REQUEST_TIMEOUT
    # http.server's default, HTTP/0.9, answers a garbled request line with a body and no status
    # line; every answer here has a status and a JSON body
    default_request_version = "HTTP/1.0"

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        monitor = self.server.monitor
        try:
            if url.path in STATIC:
                name, content_type = STATIC[url.path]
                self.reply(200, monitor.static[name], content_type)
            elif url.path in ROUTES:
                status, body = ROUTES[url.path](monitor, url.query)
                if isinstance(body, bytes):
                    self.reply(status, body, CONTENT_TYPE_LATEST)
                else:
                    self.reply_json(status, body)
            else:
                self.reply_json(404, {"error": f"no such page: {url.path}; try one of "
                                               f"{', '.join(sorted(ROUTES) + ['/'])}"})
        except BadRequest as exc:
            self.reply_json(400, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):  # the asker went away: nobody to answer
            self.close_connection = True
            log.debug("monitor: %s went away before its answer to %s", self.address_string(), self.path)
        except Exception:
            log.exception("monitor: error answering %s", self.path)
            self.reply_json(500, {"error": f"internal error answering {url.path}; see the server's log"})

    do_HEAD = do_GET

    def do_not_allowed(self):
        self.send_error(405)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_CONNECT = do_TRACE = do_not_allowed

    def send_error(self, code, message=None, explain=None):
        """Every refusal http.server makes itself, as JSON (an unknown method is a 405)."""
        if code == 501:  # http.server's answer to a method it has no do_ method for
            code = 405
        self.close_connection = True
        text = ERROR_TEXT.get(code) or message or "error"
        self.reply_json(code, {"error": text}, allow=(code == 405))

    def reply_json(self, status, body, allow=False):
        data = json.dumps(body, separators=(",", ":")).encode()
        self.reply(status, data, "application/json", allow)

    def reply(self, status, data, content_type, allow=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Access-Control-Allow-Origin", "*")
        if allow:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (http.server's name)
        log.debug("monitor: %s %s", self.address_string(), format % args)


def route_healthz(monitor, _query):
    source = monitor.source
    if source.stopping.is_set():
        return 503, {"status": "stopping"}
    problem = source.health()
    if problem:
        return 503, {"status": "failing", "error": problem}
    return 200, {"status": "ok"}


def route_varz(monitor, _query):
    counters = monitor.source.counter_values()
    return 200, varz(monitor.source.snapshot(clients=False), counters, monitor.rates.rates(counters), time.time())


def route_connz(monitor, query):
    offset, limit = page_bounds(query)
    return 200, connz(monitor.source.snapshot(clients=slice(offset, offset + limit)), offset, limit)


def route_linksz(monitor, _query):
    return 200, linksz(monitor.source.snapshot(clients=False))


def route_networkz(monitor, _query):
    source = monitor.source
    snapshot = source.snapshot(clients=False)
    network_map = source.network() if hasattr(source, "network") else None
    now = time.time()
    rates = monitor.rates.rates()
    figures = {"uptime_s": round(now - snapshot["started_at"], 3),
               "activities_per_s": rates["activities_from_clients_per_s"],
               "delivered_per_s": rates["activities_delivered_per_s"]}
    return 200, networkz(snapshot, network_map, figures)


def route_metrics(monitor, _query):
    return 200, generate_latest(monitor.registry)


ROUTES = {"/healthz": route_healthz, "/varz": route_varz, "/connz": route_connz,
          "/linksz": route_linksz, "/networkz": route_networkz, "/metrics": route_metrics}


class Monitor:
    """The monitoring HTTP server of one activitynet server: ``start()``, then ``stop()``, which
    returns once no request is being served any more."""

    def __init__(self, source, bind="127.0.0.1", port=0):
        self.source = source
        self.rates = RateMeter(source.counter_values)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(source))
        web = importlib.resources.files("activitynet.web")
        self.static = {name: web.joinpath(name).read_bytes() for name, _type in STATIC.values()}
        self.httpd = MonitorHTTPServer((bind, port), MonitorHandler, self)
        self.address = self.httpd.server_address[:2]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                             name="monitor-http", daemon=True),
            threading.Thread(target=self._sample, name="monitor-rates", daemon=True),
        ]

    def start(self):
        for thread in self._threads:
            thread.start()
        log.info("monitor on http://%s:%d/", *self.address)
        return self

    def _sample(self):
        while not self._stop.wait(1.0):
            self.rates.sample()

    def stop(self, timeout=5.0):
        self._stop.set()
        if self._threads[0].is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.cut_requests()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        deadline = time.monotonic() + timeout
        for _ in range(MAX_REQUESTS):  # wait for the requests in flight
            if not self.httpd.slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                log.warning("monitor: a request was still being served after %.0f s", timeout)
                break
