"""The monitoring port, against a real HTTP server fed by a fake server (``fakesource``): every
endpoint, the bad requests, the bounds that keep the monitor from ever holding up the relay."""

import http.client
import json
import logging
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from activitynet import monitor, stats
from activitynet.monitor import Monitor
from fakesource import FakeSource, client, link
from harness import wait_until

CHAIN = {"servers": [{"address": "127.0.0.1:3780"}, {"address": "127.0.0.1:3781", "load": 5},
                     {"address": "127.0.0.1:3782", "load": 2, "monitor": "127.0.0.1:9999"}],
         "links": [{"a": "127.0.0.1:3780", "b": "127.0.0.1:3781"},
                   {"a": "127.0.0.1:3781", "b": "127.0.0.1:3782"}],
         "root": "127.0.0.1:3780"}


@pytest.fixture
def source():
    return FakeSource(clients=[client(n, user=f"user{n % 3}", queued=n) for n in range(25)],
                      links=[link(1, "127.0.0.1:3781", load=5), link(2, None, live=False, phase="catching up")])


@pytest.fixture
def running(source):
    started = Monitor(source).start()
    yield started
    started.stop()


def get(running, path, method="GET"):
    """(status, headers, body: parsed JSON or bytes) of one request."""
    conn = http.client.HTTPConnection(*running.address, timeout=10)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        body = answer.read()
        if body and answer.getheader("Content-Type", "").startswith("application/json"):
            body = json.loads(body)
        return answer.status, answer, body
    finally:
        conn.close()


def raw(running, data):
    """Send raw bytes; the status code and JSON body of the answer."""
    with socket.create_connection(running.address, timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _sep, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- the endpoints ----------------------------------------------------------------------------------

def test_healthz_is_ok_while_serving_and_503_while_stopping_or_when_the_store_fails(running, source):
    assert get(running, "/healthz")[::2] == (200, {"status": "ok"})
    source.healthy = False
    status, _answer, body = get(running, "/healthz")
    assert status == 503 and body["status"] == "failing" and "store" in body["error"]
    source.healthy = True
    source.stopping.set()
    assert get(running, "/healthz")[::2] == (503, {"status": "stopping"})


def test_varz_gives_identity_settings_counts_and_counters(running, source):
    source.counters.activities_from_clients += 7
    source.counters.invalid_messages["schema"] += 2
    status, answer, varz = get(running, "/varz")
    assert status == 200 and answer.getheader("Access-Control-Allow-Origin") == "*"
    assert varz["server"]["address"] == "127.0.0.1:3780" and varz["server"]["origin"] == "origin-3780"
    assert 3724 < varz["server"]["uptime_s"] < 3725 + 60
    assert varz["settings"]["history"] == 100000
    assert varz["counts"] == {"clients": 25, "logged_in_names": 3, "users": 3, "blocked": 1, "links": 2,
                              "live_links": 1, "pending": 2, "history_entries": 42, "history_bytes": 4200,
                              "bytes_queued": sum(range(25))}
    assert varz["counters"]["activities_from_clients"] == 7
    assert varz["counters"]["invalid_messages"]["schema"] == 2
    assert set(varz["counters"]) == {f.attribute for f in stats.FIELDS} | {"invalid_messages"}


def test_rates_are_per_second_over_the_last_seconds(source):
    now = [100.0]
    meter = monitor.RateMeter(source.counter_values, clock=lambda: now[0])
    assert set(meter.rates().values()) == {None}, "no time has passed: no rate yet"
    for second in range(monitor.RATE_WINDOW + 3):
        now[0] += 1.0
        source.counters.activities_from_clients += 50 if second < 3 else 10
        source.counters.bytes_out += 1000
        meter.sample()
    now[0] += 0.5
    source.counters.activities_from_clients += 5
    rates = meter.rates()
    assert rates["activities_from_clients_per_s"] == 10.0, "the last seconds only, up to now"
    # from the oldest sample kept (RATE_WINDOW - 1 s before the last) to now, half a second later
    span = monitor.RATE_WINDOW - 1 + 0.5
    assert rates["bytes_out_per_s"] == round((monitor.RATE_WINDOW - 1) * 1000 / span, 3)
    assert rates["activities_delivered_per_s"] == 0.0


def test_a_running_monitor_samples_rates_by_itself(running, source):
    def rate():
        source.counters.activities_delivered += 10
        return get(running, "/varz")[2]["rates"]["activities_delivered_per_s"]
    wait_until(lambda: (rate() or 0) > 0, message="a delivery rate above 0")


def test_connz_pages_through_the_clients(running):
    status, _answer, page = get(running, "/connz?offset=20&limit=10")
    assert status == 200 and page["total"] == 25 and (page["offset"], page["limit"]) == (20, 10)
    assert [c["id"] for c in page["connections"]] == [20, 21, 22, 23, 24]
    first = get(running, "/connz")[2]
    assert first["limit"] == monitor.DEFAULT_PAGE and len(first["connections"]) == 25
    assert set(first["connections"][0]) == {"id", "address", "user", "since", "messages_in",
                                            "messages_out", "bytes_queued"}


@pytest.mark.parametrize("query, complaint", [
    ("limit=0", "limit must be a whole number from 1 to 10000, not '0'"),
    ("limit=10001", "limit must be a whole number from 1 to 10000, not '10001'"),
    ("limit=ten", "limit must be a whole number from 1 to 10000, not 'ten'"),
    ("offset=-1", "offset must be a whole number of at least 0, not '-1'"),
    ("offset=", "offset must be a whole number of at least 0, not ''"),
    ("offset=%C2%B2", "offset must be a whole number of at least 0, not '²'"),
])
def test_bad_paging_is_a_400_that_says_what_to_send(running, query, complaint):
    assert get(running, "/connz?" + query)[::2] == (400, {"error": complaint})


def test_linksz_lists_the_server_links(running):
    status, _answer, body = get(running, "/linksz")
    assert status == 200 and body["total"] == 2
    live, catching_up = body["links"]
    assert live["peer"] == "127.0.0.1:3781" and live["live"] and live["load"] == 5
    assert catching_up["peer"] is None and not catching_up["live"] and catching_up["phase"] == "catching up"


def test_networkz_without_a_map_is_this_server_and_its_neighbours(running):
    network = get(running, "/networkz")[2]
    assert network["source"] == "neighbours" and network["self"] == "127.0.0.1:3780"
    addresses = [s["address"] for s in network["servers"]]
    assert addresses == ["127.0.0.1:3780", "127.0.0.1:3781", "127.0.0.1:50002"]  # unannounced: socket address
    me = network["servers"][0]
    assert me["self"] and me["load"] == 25 and me["links"] == 2 and me["uptime_s"] > 3700
    assert [(l["b"], l["live"]) for l in network["links"]] == [("127.0.0.1:3781", True), ("127.0.0.1:50002", False)]


def test_networkz_shows_the_network_map_once_there_is_one(running, source):
    source.network_map = CHAIN
    network = get(running, "/networkz")[2]
    assert network["source"] == "network map" and network["root"] == "127.0.0.1:3780"
    by_address = {s["address"]: s for s in network["servers"]}
    assert by_address["127.0.0.1:3781"]["links"] == 2 and by_address["127.0.0.1:3781"]["load"] == 5
    assert by_address["127.0.0.1:3782"]["monitor"] == "127.0.0.1:9999"
    assert by_address["127.0.0.1:3780"]["load"] == 25, "this server's own figures win"
    assert network["links"][0]["live"] is True, "this server's own link carries its state"
    assert network["links"][1]["live"] is None, "a link between two others: not known here"


def test_networkz_passes_on_what_the_map_says_of_each_server(running, source):
    source.network_map = {"servers": CHAIN["servers"] + [{"address": "127.0.0.1:3784", "alive": False}],
                          "links": CHAIN["links"], "root": None}
    network = get(running, "/networkz")[2]
    gone = [s for s in network["servers"] if s["address"] == "127.0.0.1:3784"]
    assert gone == [{"address": "127.0.0.1:3784", "load": None, "monitor": None, "alive": False,
                     "self": False, "links": 0}]
    assert network["root"] is None


def test_metrics_parse_with_prometheus_clients_own_parser(running, source):
    source.counters.activities_delivered += 1234
    source.counters.bytes_in += 99
    source.counters.invalid_messages["not_json"] += 3
    status, answer, text = get(running, "/metrics")
    assert status == 200 and answer.getheader("Content-Type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.name.startswith("activitynet_")
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("activitynet_activities_delivered_total", ())] == 1234
    assert samples[("activitynet_received_bytes_total", ())] == 99
    assert samples[("activitynet_invalid_messages_total", (("reason", "not_json"),))] == 3
    assert samples[("activitynet_clients", ())] == 25
    assert samples[("activitynet_link_live", (("link", "1"), ("peer", "127.0.0.1:3781")))] == 1
    assert samples[("activitynet_link_live", (("link", "2"), ("peer", "127.0.0.1:50002")))] == 0
    assert samples[("activitynet_link_activities_sent_total", (("link", "2"), ("peer", "127.0.0.1:50002")))] == 20
    info = samples[("activitynet_server_info", (("address", "127.0.0.1:3780"), ("origin", "origin-3780"),
                                                ("version", "0.1.0")))]
    assert info == 1
    for field in stats.FIELDS:
        assert (field.metric + "_total", ()) in samples, field


def test_counters_are_plain_ints_and_have_prometheus_names():
    counters = stats.Counters()
    counters.logins += 1
    assert counters.as_dict()["logins"] == 1 and type(counters.logins) is int
    metrics = [f.metric for f in stats.FIELDS]
    assert len(set(metrics)) == len(metrics) and len({f.attribute for f in stats.FIELDS}) == len(metrics)
    for name in metrics:
        assert name.startswith("activitynet_") and not name.endswith("_total"), name


def test_the_page_and_its_files_are_served(running):
    status, answer, html = get(running, "/")
    assert status == 200 and answer.getheader("Content-Type").startswith("text/html")
    assert b'src="map.js"' in html and b'href="map.css"' in html
    assert b"http" not in html.replace(b'xmlns="http://www.w3.org/2000/svg"', b""), "nothing from elsewhere"
    assert get(running, "/map.js")[1].getheader("Content-Type").startswith("text/javascript")
    assert get(running, "/map.css")[1].getheader("Content-Type").startswith("text/css")


def test_head_gives_the_headers_only(running):
    status, answer, body = get(running, "/varz", method="HEAD")
    assert status == 200 and body == b"" and int(answer.getheader("Content-Length")) > 100


# --- bad requests ------------------------------------------------------------------------------------

def test_an_unknown_path_is_a_404_naming_the_pages_there_are(running):
    status, _answer, body = get(running, "/nope")
    assert status == 404 and "/nope" in body["error"] and "/varz" in body["error"]


@pytest.mark.parametrize("method", ["POST", "DELETE", "BREW"])
def test_other_methods_are_a_405_with_allow(running, method):
    status, answer, body = get(running, "/varz", method=method)
    assert status == 405 and body == {"error": "only GET and HEAD are served"}
    assert answer.getheader("Allow") == "GET, HEAD"


def test_a_huge_request_line_is_a_414(running):
    assert raw(running, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n") == (
        414, {"error": "the request line is longer than 65536 bytes"})


def test_a_request_line_that_is_not_http_is_a_400(running):
    status, body = raw(running, b"HELLO THERE FRIEND AGAIN\r\n\r\n")
    assert status == 400 and body["error"]


def test_an_error_in_a_handler_is_a_500_logged_and_the_monitor_keeps_serving(running, source, caplog):
    source.snapshot = lambda clients=True: 1 / 0
    status, _answer, body = get(running, "/varz")
    assert status == 500 and body == {"error": "internal error answering /varz; see the server's log"}
    logged = [r for r in caplog.records if r.name == "activitynet.monitor" and r.exc_info]
    assert logged and "ZeroDivisionError" in caplog.text
    caplog.clear()  # the traceback was wanted here (conftest fails tests whose servers log one)
    assert get(running, "/healthz")[0] == 200


def test_requests_beyond_the_bound_are_refused_at_once_and_the_rest_still_served(running):
    silent = [socket.create_connection(running.address, timeout=10) for _ in range(monitor.MAX_REQUESTS)]
    try:
        wait_until(lambda: running.httpd.slots._value == 0, message="every request slot taken")
        started = time.monotonic()
        status, _answer, body = get(running, "/healthz")
        assert status == 503 and "retry" in body["error"]
        assert time.monotonic() - started < 2, "refused without waiting for a slot"
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: get(running, "/healthz")[0] == 200, message="the monitor to serve again")


def test_stop_returns_promptly_even_with_a_silent_client_connected(source):
    started = Monitor(source).start()
    silent = socket.create_connection(started.address, timeout=10)
    wait_until(lambda: started.httpd.slots._value == monitor.MAX_REQUESTS - 1, message="a slot taken")
    begun = time.monotonic()
    started.stop()
    assert time.monotonic() - begun < monitor.REQUEST_TIMEOUT
    assert not any(t.is_alive() for t in started._threads)
    silent.close()


def test_many_concurrent_scrapes_all_get_an_answer(running):
    results = []

    def scrape():
        for _ in range(5):
            results.append(get(running, "/metrics")[0])

    threads = [threading.Thread(target=scrape) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 60 and set(results) <= {200, 503} and results.count(200) >= 5


def test_request_lines_are_logged_at_debug_only(running, caplog):
    caplog.set_level(logging.DEBUG, logger="activitynet.monitor")
    get(running, "/healthz")
    wait_until(lambda: any("GET /healthz" in r.getMessage() for r in caplog.records),
               message="the request logged")
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "GET /healthz" in r.getMessage())
