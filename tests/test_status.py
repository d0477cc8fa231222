"""``python -m activitynet.status``: the network as a tree, read from real monitors (fed by fake
servers), as a person or a script would run it."""

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from activitynet import status
from activitynet.monitor import Monitor
from fakesource import FakeSource, client, link
from harness import ROOT, wait_until


@pytest.fixture
def network():
    """Four servers: 3780 (asked) - 3781 - {3782, 3783}; the monitors of 3780 and 3781 run, 3782's
    monitor address is known but nothing answers there, 3783's is not known."""
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))  # a port that refuses connections: bound, never listening
    asked = FakeSource(3780, clients=[client(n) for n in range(12)], links=[link(1, "127.0.0.1:3781", load=5)])
    middle = FakeSource(3781, clients=[client(n) for n in range(5)])
    middle.started_at = asked.started_at + 3725 - 1955  # up 32 min 35 s
    monitors = [Monitor(asked).start(), Monitor(middle).start()]
    asked.network_map = {
        "servers": [{"address": "127.0.0.1:3780"},
                    {"address": "127.0.0.1:3781", "monitor": "%s:%d" % monitors[1].address},
                    {"address": "127.0.0.1:3782", "load": 2, "monitor": "127.0.0.1:%d" % nobody.getsockname()[1]},
                    {"address": "127.0.0.1:3783", "load": 0}],
        "links": [{"a": "127.0.0.1:3781", "b": "127.0.0.1:3783"}, {"a": "127.0.0.1:3780", "b": "127.0.0.1:3781"},
                  {"a": "127.0.0.1:3781", "b": "127.0.0.1:3782"}],
        "root": None}
    yield asked, monitors
    for started in monitors:
        started.stop()
    nobody.close()


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = status.run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def address(started):
    return "%s:%d" % started.address


def test_the_map_is_a_tree_with_one_line_per_server(network):
    asked, monitors = network
    for started in monitors:  # rates exist a moment after start
        wait_until(lambda: started.rates.rates()["activities_from_clients_per_s"] is not None)
    code, out, err = run(address(monitors[0]))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("4 servers, 3 links (the whole network, asked 127.0.0.1:3780; * = asked)")
    names = [re.match(r"(.*?\S)  ", line).group(1) for line in lines[1:]]
    assert names == ["127.0.0.1:3780 *", "└─ 127.0.0.1:3781", "   ├─ 127.0.0.1:3782", "   └─ 127.0.0.1:3783"]
    cells = [line.split() for line in lines[1:]]
    assert cells[0][2:] == ["12", "clients", "1", "link", "up", "1h02m", "0.0", "act/s"]
    assert cells[1][2:7] == ["5", "clients", "3", "links", "up"], "from its own monitor"
    assert cells[1][7].startswith("32m3") and cells[1][8:] == ["0.0", "act/s"]
    assert cells[2][2:] == ["2", "clients", "1", "link", "up", "?", "?", "act/s"], "what the map says"
    assert cells[3][2:] == ["0", "clients", "1", "link", "up", "?", "?", "act/s"]
    widths = {len(line) for line in lines[1:]}
    assert len(widths) == 1, "columns line up"


def test_json_gives_the_network_and_every_known_servers_figures(network):
    _asked, monitors = network
    code, out, _err = run("--json", address(monitors[0]))
    assert code == 0
    gathered = json.loads(out)
    assert gathered["network"]["self"] == "127.0.0.1:3780" and len(gathered["network"]["servers"]) == 4
    figures = gathered["varz"]
    assert figures["127.0.0.1:3780"]["counts"]["clients"] == 12
    assert figures["127.0.0.1:3781"]["counts"]["clients"] == 5
    assert figures["127.0.0.1:3782"] is None and figures["127.0.0.1:3783"] is None


def test_without_a_network_map_it_shows_the_neighbours():
    alone = FakeSource(3790, links=[link(1, "127.0.0.1:3791", load=3), link(2, "127.0.0.1:3792", load=1)])
    started = Monitor(alone).start()
    try:
        code, out, _err = run(address(started))
    finally:
        started.stop()
    assert code == 0
    lines = out.splitlines()
    assert "this server and its neighbours" in lines[0]
    assert [re.match(r"(.*?\S)  ", line).group(1) for line in lines[1:]] == [
        "127.0.0.1:3790 *", "├─ 127.0.0.1:3791", "└─ 127.0.0.1:3792"]
    assert lines[2].split()[2:4] == ["3", "clients"]


def test_nothing_answering_is_a_clear_error_and_exit_1():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        code, out, err = run(f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert err == f"activitynet.status: no monitor answers at 127.0.0.1:{port} (Connection refused)\n"


def test_a_port_that_never_answers_is_exit_1_after_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts (in the kernel), never answers
        code, _out, err = run("--timeout", "0.5", "127.0.0.1:%d" % silent.getsockname()[1])
    assert code == 1 and "no monitor answers at 127.0.0.1:" in err and "timed out" in err


def test_an_http_server_that_is_not_a_monitor_is_exit_1():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=other.serve_forever)
    thread.start()
    try:
        code, _out, err = run("127.0.0.1:%d" % other.server_address[1])
    finally:
        other.shutdown()
        other.server_close()
        thread.join()
    port = other.server_address[1]
    assert code == 1
    assert err == (f"activitynet.status: http://127.0.0.1:{port}/networkz answered HTTP 404: "
                   f"is 127.0.0.1:{port} an activitynet monitor?\n")


@pytest.mark.parametrize("argv, complaint", [
    (["localhost"], "ADDRESS must be HOST:PORT (a server's --monitor-port), not 'localhost'"),
    (["127.0.0.1:99999"], "the port of ADDRESS must be a port number from 0 to 65535, not '99999'"),
    (["--timeout", "0", "127.0.0.1:1"], "--timeout must be a number of seconds above 0, not '0'"),
    (["--bogus"], "unrecognised arguments: --bogus"),
    (["a:1", "b:2"], "unrecognised arguments: b:2"),
])
def test_usage_errors_exit_2_and_say_what_to_fix(argv, complaint):
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"activitynet.status: {complaint}", "Try 'python -m activitynet.status --help'."]


def test_help_is_the_usage_text():
    code, out, _err = run("--help")
    assert code == 0 and out.startswith("activitynet status") and "--watch" in out and "Design:" not in out


def test_watch_redraws_every_second_until_interrupted(network):
    _asked, monitors = network
    proc = subprocess.Popen([sys.executable, "-m", "activitynet.status", "--watch", address(monitors[0])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        output = b""
        os.set_blocking(proc.stdout.fileno(), False)

        def frames():
            nonlocal output
            output += proc.stdout.read() or b""
            return output.count(status.CLEAR.encode()) >= 3
        wait_until(frames, message="three frames")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    frame = output.decode().split(status.CLEAR)[1]
    assert frame.splitlines()[1].startswith("127.0.0.1:3780 *")
