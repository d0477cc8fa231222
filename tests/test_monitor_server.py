"""The monitor of a real server (``--monitor-port``): every page read from running processes while
activities flow, a slow reader is cut and a partition heals, with ``/metrics`` read by
prometheus_client's own parser. The pages' details (paging, errors, rates) are in test_monitor.py,
against a fake server; here the figures must be the server's own.

A server started with ``--monitor-port 0`` logs where its monitor listens
("monitor on http://127.0.0.1:PORT/"), before it logs that it listens for peers.
"""

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from activitynet import __version__, stats
from harness import ROOT, SECRET, LineClient, LocalServer, activity, login, register, wait_until
from test_outbox import sluggish_client, stream

MONITORED = ["--monitor-port", "0"]
LONG = 60.0


def monitor_of(process):
    """The "host:port" of a started server process's monitor, from its log."""
    match = process.find_log(r"monitor on http://([\d.]+):(\d+)/")
    assert match, "no monitor address in the log:\n" + process.log_text()
    return f"{match.group(1)}:{match.group(2)}"


def get(monitor, path):
    """(status, body): JSON decoded, or text for /metrics and the page."""
    try:
        with urllib.request.urlopen(f"http://{monitor}{path}", timeout=20) as answer:
            status, data, kind = answer.status, answer.read(), answer.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        status, data, kind = error.code, error.read(), error.headers["Content-Type"]
    return status, (json.loads(data) if kind == "application/json" else data.decode())


def varz(monitor):
    status, body = get(monitor, "/varz")
    assert status == 200, body
    return body


def counters(monitor):
    return varz(monitor)["counters"]


def metrics(monitor):
    """{sample name with labels: value}, parsed by prometheus_client."""
    status, text = get(monitor, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_counter(monitor, name, at_least, timeout=LONG):
    return wait_until(lambda: (lambda v: v if v >= at_least else None)(counters(monitor)[name]), timeout,
                      message=f"{name} >= {at_least} at {monitor}")


def refused_with(port, line):
    """Send ``line`` on a new connection; the server answers INVALID_MESSAGE and closes."""
    client = LineClient(port)
    try:
        client.send_raw(line)
        client.expect("INVALID_MESSAGE")
        client.expect_closed()
    finally:
        client.close()


# --- one server ------------------------------------------------------------------------------------

def test_every_page_of_a_real_server(make_process):
    server = make_process(extra=MONITORED, secret="do-not-show-me")
    monitor = monitor_of(server)
    assert get(monitor, "/healthz") == (200, {"status": "ok"})

    client = register(server.port, "ada", "pw")
    client.send({"command": "LOGIN", "username": "ada", "secret": "pw"})
    client.expect("LOGIN_SUCCESS")
    status, body = get(monitor, "/varz")
    assert status == 200
    assert body["server"]["address"] == f"127.0.0.1:{server.port}" and body["server"]["version"] == __version__
    assert body["server"]["uptime_s"] >= 0
    assert body["settings"]["local_port"] == 0 and body["settings"]["monitor_port"] == 0
    assert "secret" not in body["settings"] and "do-not-show-me" not in json.dumps(body)
    assert body["counts"]["clients"] == 1 and body["counts"]["users"] == 1 and body["counts"]["links"] == 0
    assert body["counters"]["registrations"] == 1 and body["counters"]["logins"] == 1
    assert set(body["counters"]) == {f.attribute for f in stats.FIELDS} | {"invalid_messages"}

    status, page = get(monitor, "/connz?limit=1")
    assert status == 200 and page["total"] == 1
    (record,) = page["connections"]
    assert record["user"] == "ada" and record["messages_in"] == 2 and record["messages_out"] == 2

    assert get(monitor, "/linksz") == (200, {"total": 0, "links": []})
    status, network = get(monitor, "/networkz")
    assert status == 200 and network["self"] == f"127.0.0.1:{server.port}"
    assert [s["address"] for s in network["servers"]] == [network["self"]] and network["links"] == []
    assert network["servers"][0]["load"] == 1

    samples = metrics(monitor)
    assert samples["activitynet_logins_total"] == 1 and samples["activitynet_clients"] == 1
    assert samples[f"activitynet_server_info{{address=127.0.0.1:{server.port},origin={body['server']['origin']},"
                   f"version={__version__}}}"] == 1

    status, html = get(monitor, "/")
    assert status == 200 and "<svg" in html

    # bad requests: a 4xx with a JSON error, and the server carries on
    status, body = get(monitor, "/nothing-here")
    assert status == 404 and "/varz" in body["error"]
    status, body = get(monitor, "/connz?limit=0")
    assert status == 400 and "limit" in body["error"]
    with socket.create_connection(tuple_of(monitor), timeout=20) as sock:
        sock.sendall(b"GET /" + b"x" * 70_000 + b" HTTP/1.0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 414")
    request = urllib.request.Request(f"http://{monitor}/varz", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=20)
    assert refused.value.code == 405 and json.loads(refused.value.read())["error"]
    activity(client, {"still": "served"}, "ada", "pw")
    assert client.expect("ACTIVITY_BROADCAST")["activity"]["still"] == "served"
    client.close()


def tuple_of(monitor):
    host, port = monitor.rsplit(":", 1)
    return host, int(port)


def test_refusals_are_counted_by_reason(make_process):
    server = make_process(extra=MONITORED)
    monitor = monitor_of(server)
    refused_with(server.port, b"this is not json\n")
    refused_with(server.port, b'{"command": "SHOUT"}\n')
    refused_with(server.port, b'{"command": "LOGIN"}\n')  # no username
    refused_with(server.port, b'{"command": "SERVER_ANNOUNCE", "id": "x", "load": 0, '
                              b'"hostname": "h", "port": 1}\n')  # before AUTHENTICATE
    too_long = LineClient(server.port)  # the server may close before reading it all: not waited for
    with contextlib.suppress(OSError):
        too_long.send_raw(b'{"command": "LOGIN", "username": "' + b"x" * 1_100_000 + b'"}\n')
    too_long.close()
    reasons = wait_until(lambda: (lambda r: r if sum(r.values()) == 5 else None)(
        counters(monitor)["invalid_messages"]), message="five refusals counted")
    assert reasons == {**dict.fromkeys(stats.INVALID_REASONS, 0), "not_json": 1, "unknown_command": 1,
                       "schema": 1, "not_allowed": 1, "line_too_long": 1}
    samples = metrics(monitor)
    assert samples["activitynet_invalid_messages_total{reason=not_json}"] == 1
    assert samples["activitynet_invalid_messages_total{reason=line_too_long}"] == 1
    failed = LineClient(server.port)
    failed.send({"command": "LOGIN", "username": "nobody", "secret": "x"})
    failed.expect("LOGIN_FAILED")
    wait_counter(monitor, "login_failures", 1)
    assert counters(monitor)["invalid_messages"] == reasons, "a failed login is not an INVALID_MESSAGE"


# --- a network ------------------------------------------------------------------------------------

def test_counters_move_as_activities_flow_through_a_chain(make_process):
    a = make_process(extra=MONITORED)
    b = make_process(remote_port=a.port, extra=MONITORED)
    on_a, on_b = monitor_of(a), monitor_of(b)
    wait_until(lambda: [l["live"] for l in get(on_a, "/linksz")[1]["links"]] == [True], LONG,
               message="a's link to b live")
    sender, receiver = login(a.port), login(b.port)
    before = counters(on_a)["bytes_in"]
    for n in range(20):
        activity(sender, {"n": n})
    for n in range(20):
        assert sender.expect("ACTIVITY_BROADCAST")["activity"]["n"] == n
        assert receiver.expect("ACTIVITY_BROADCAST")["activity"]["n"] == n

    mine = wait_counter(on_a, "activities_relayed", 20)
    assert mine and counters(on_a)["activities_from_clients"] == 20
    got = counters(on_a)
    assert got["activities_delivered"] == 20 and got["activities_relayed"] == 20
    # bytes are summed over the connections about once a second (the monitor reuses the total)
    wait_until(lambda: counters(on_a)["bytes_in"] > before + 20 * 50, message="a's bytes in to grow")
    assert counters(on_a)["bytes_out"] > 0
    theirs = wait_counter(on_b, "activities_delivered", 20)
    assert theirs and counters(on_b)["activities_from_servers"] == 20
    assert counters(on_b)["activities_from_clients"] == 0

    (link,) = get(on_a, "/linksz")[1]["links"]
    assert link["peer"] == f"127.0.0.1:{b.port}" and not link["initiator"]
    assert link["activities_sent"] == 20 and link["phase"] == "live" and link["last_heard_s"] < 5
    (link,) = get(on_b, "/linksz")[1]["links"]
    assert link["peer"] == f"127.0.0.1:{a.port}" and link["initiator"] and link["activities_received"] == 20
    (record,) = get(on_a, "/connz")[1]["connections"]
    assert record["messages_in"] == 21 and record["messages_out"] == 21  # LOGIN + 20, each answered

    status, network = get(on_b, "/networkz")
    assert status == 200 and network["source"] == "network map"  # issue 9's, State.network()
    assert {s["address"] for s in network["servers"]} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert network["links"][0]["live"] is True
    samples = metrics(on_b)
    assert samples["activitynet_activities_from_servers_total"] == 20
    assert samples[f"activitynet_link_activities_received_total{{link={link['id']},peer=127.0.0.1:{a.port}}}"] == 20
    rates = wait_until(lambda: (lambda r: r if r["activities_from_clients_per_s"] else None)(
        varz(on_a)["rates"]), message="a rate")
    assert rates["activities_from_clients_per_s"] > 0


def test_an_activity_heard_twice_is_counted_as_deduplicated(make_process):
    server = make_process(extra=MONITORED)
    monitor = monitor_of(server)
    peer = LineClient(server.port)  # a server, as far as this one can tell
    peer.send({"command": "AUTHENTICATE", "secret": SECRET})
    peer.expect("SYNC_USER")
    broadcast = {"command": "ACTIVITY_BROADCAST", "id": "elsewhere-1",
                 "activity": {"authenticated_user": "anonymous", "n": 1}}
    peer.send(broadcast)
    peer.send(broadcast)
    wait_counter(monitor, "activities_deduplicated", 1)
    assert counters(monitor)["activities_from_servers"] == 1
    assert counters(monitor)["recoveries_run"] == 1
    peer.close()


def test_a_slow_consumer_cut_is_counted(make_process):
    server = make_process(extra=[*MONITORED, "--max-outbox", str(1024 * 1024)])
    monitor = monitor_of(server)
    stuck = sluggish_client(server.port)
    sender = login(server.port)
    stream(sender, 30_000)  # about 8 MB for a reader whose outbox may hold 1 MB beyond the kernel's
    wait_counter(monitor, "slow_consumers_cut", 1)
    assert varz(monitor)["counts"]["clients"] == 1
    assert metrics(monitor)["activitynet_slow_consumers_cut_total"] == 1
    stuck.close()


def test_a_recovery_is_counted_with_the_activities_it_brought(make_process, make_relay):
    """a <-relay- b: the cable is cut, a's client sends, the cable heals; b recovers them."""
    a = make_process(extra=MONITORED)
    relay = make_relay(a.port)
    b = make_process(remote_port=relay.port, extra=MONITORED)
    on_a, on_b = monitor_of(a), monitor_of(b)
    wait_counter(on_b, "recoveries_run", 1)
    wait_until(lambda: [l["live"] for l in get(on_b, "/linksz")[1]["links"]] == [True], LONG,
               message="b's link live")
    sender, receiver = login(a.port), login(b.port)
    activity(sender, {"n": 0})
    assert sender.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 0
    assert receiver.expect("ACTIVITY_BROADCAST")["activity"]["n"] == 0
    assert counters(on_b)["activities_recovered"] == 0, "live traffic is not recovered"

    relay.cut()
    wait_until(lambda: get(on_a, "/linksz")[1]["total"] == 0, LONG, message="a notices the cut")
    for n in range(1, 6):
        activity(sender, {"n": n})
        assert sender.expect("ACTIVITY_BROADCAST")["activity"]["n"] == n
    relay.heal()
    for n in range(1, 6):
        assert receiver.expect("ACTIVITY_BROADCAST", timeout=LONG)["activity"]["n"] == n
    got = wait_counter(on_b, "activities_recovered", 5)
    assert got == 5
    assert counters(on_b)["recoveries_run"] >= 2 and counters(on_a)["recoveries_run"] >= 2
    wait_until(lambda: [l["phase"] for l in get(on_b, "/linksz")[1]["links"]] == ["live"], LONG,
               message="b's new link live")
    assert metrics(on_b)["activitynet_recovered_activities_total"] == 5


# --- start, stop, health, logs --------------------------------------------------------------------

def test_healthz_is_503_while_shutting_down_and_when_a_health_check_fails():
    server = LocalServer(monitor_port=0)
    monitor = "%s:%d" % server.server.monitor.address
    try:
        assert get(monitor, "/healthz") == (200, {"status": "ok"})
        server.server.health_checks.append(lambda: "the store cannot write: disk full")
        status, body = get(monitor, "/healthz")
        assert status == 503 and body == {"status": "failing", "error": "the store cannot write: disk full"}
        server.server.health_checks.clear()
        server.server.shutdown()  # serving has stopped; the monitor answers until server_close
        assert get(monitor, "/healthz") == (503, {"status": "stopping"})
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(tuple_of(monitor), timeout=5).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("monitor")], \
        "server_close joined the monitor's threads"


def test_json_logs_one_object_per_line(make_process):
    server = make_process(extra=[*MONITORED, "--log-format", "json"])
    client = LineClient(server.port)
    address = "127.0.0.1:%d" % client.sock.getsockname()[1]
    client.send_raw(b"not json\n")
    client.expect("INVALID_MESSAGE")
    wait_until(lambda: server.find_log(r"closing 127.0.0.1"), message="a line about the connection")
    client.close()
    lines = [json.loads(line) for line in server.log_text().splitlines()]
    assert {"time", "level", "logger", "thread", "message"} <= set(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["time"])
    assert any(line["message"].startswith("monitor on http://127.0.0.1:") for line in lines)
    assert any(line["message"].startswith("listening on") for line in lines)
    (closing,) = [line for line in lines if line["message"].startswith("closing")]
    assert closing["conn"] == address and "not valid JSON" in closing["message"]


def test_a_monitor_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "activitynet.server", "-lp", "0", "-s", "x",
                               "--bind", "127.0.0.1", "--monitor-port", str(port)],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert done.returncode == 1
    assert f"cannot listen for the monitor on 127.0.0.1:{port}" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "activitynet.server", "--log-format", "xml"],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert bad.returncode == 2 and "--log-format must be one of text, json, not 'xml'" in bad.stderr


# --- the status command against a real network ---------------------------------------------------

def test_the_status_command_draws_a_real_network(make_process):
    a = make_process(extra=MONITORED)
    b = make_process(remote_port=a.port, extra=MONITORED)
    c = make_process(remote_port=b.port, extra=MONITORED)
    on_b = monitor_of(b)
    wait_until(lambda: sum(l["live"] for l in get(on_b, "/linksz")[1]["links"]) == 2, LONG,
               message="b linked to a and c")
    client = login(b.port)  # one: a second would be redirected to a less loaded neighbour

    def status(*argv):
        return subprocess.run([sys.executable, "-m", "activitynet.status", *argv, on_b],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))

    done = status()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("3 servers, 2 links (the whole network")  # b's network map (issue 9)
    rows = {re.search(r"127\.0\.0\.1:(\d+)", line).group(1): line for line in lines[1:]}
    assert set(rows) == {str(a.port), str(b.port), str(c.port)}
    assert rows[str(b.port)].split()[-9:-3] == ["*", "1", "clients", "2", "links", "up"], rows
    for neighbour in (a, c):  # their monitors are known from the map: their own figures
        assert rows[str(neighbour.port)].split()[-8:-3] == ["0", "clients", "1", "link", "up"]
    done = status("--json")
    gathered = json.loads(done.stdout)
    assert gathered["varz"][f"127.0.0.1:{b.port}"]["counts"]["clients"] == 1
    client.close()


def test_a_network_map_plugs_into_networkz():
    """The self-healing network map (``State.network``) is plugged in by default; any callable set
    as ``server.network_map`` (giving servers and links) replaces it."""
    server = LocalServer(monitor_port=0)
    monitor = "%s:%d" % server.server.monitor.address
    me = f"127.0.0.1:{server.port}"
    try:
        network = get(monitor, "/networkz")[1]
        assert network["source"] == "network map" and [s["address"] for s in network["servers"]] == [me]
        server.server.network_map = lambda: {
            "servers": [{"address": me}, {"address": "127.0.0.1:1", "load": 4, "monitor": "127.0.0.1:2"}],
            "links": [{"a": me, "b": "127.0.0.1:1"}], "root": me}
        status, network = get(monitor, "/networkz")
        assert status == 200 and network["source"] == "network map" and network["root"] == me
        far = next(s for s in network["servers"] if s["address"] == "127.0.0.1:1")
        assert (far["load"], far["monitor"], far["links"]) == (4, "127.0.0.1:2", 1)
    finally:
        server.stop()
