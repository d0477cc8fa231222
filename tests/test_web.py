"""The live network map, checked as a person would: a real headless chromium loads the page of a
server's monitor and watches it while the network changes (a server dies, another re-attaches).

The monitors are real; the servers behind them are fakes whose network map the test changes. Runs
wherever Debian's ``chromium`` is installed (CI installs it) and says so when it is not.
"""

import os

import pytest

from activitynet.monitor import Monitor
from browser import CHROMIUM, Browser
from fakesource import FakeSource, client, link
from harness import login, wait_until

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed, so the live map was not checked in a browser "
                             "(apt-get install -y chromium)")

A, B, C = "127.0.0.1:3780", "127.0.0.1:3781", "127.0.0.1:3782"
PICTURE = """(() => {
  const nodes = (selector) => [...document.querySelectorAll(selector)].map((n) => n.dataset.address).sort();
  return {
    live: nodes("g.node:not(.gone)"),
    gone: nodes("g.node.gone"),
    edges: [...document.querySelectorAll("line.edge")].map((e) => [e.dataset.a, e.dataset.b].sort().join(" - ")).sort(),
    labels: Object.fromEntries([...document.querySelectorAll("g.node")].map(
      (n) => [n.dataset.address, n.querySelector(".figures").textContent])),
    self: nodes("g.node.self"),
    offline: document.body.classList.contains("offline"),
    status: document.getElementById("status").textContent,
  };
})()"""


def chain_map(b_monitor, c_monitor):
    return {"servers": [{"address": A}, {"address": B, "monitor": b_monitor},
                        {"address": C, "load": 2, "monitor": c_monitor}],
            "links": [{"a": A, "b": B}, {"a": B, "b": C}], "root": A}


@pytest.fixture
def network():
    """Servers A - B - C; A's map knows them all; B's monitor answers, C's address is not known."""
    a = FakeSource(3780, clients=[client(n) for n in range(12)], links=[link(1, B, load=5)])
    b = FakeSource(3781, clients=[client(n) for n in range(5)], links=[link(1, A), link(2, C, load=2)])
    monitors = {"a": Monitor(a).start(), "b": Monitor(b).start()}
    a.network_map = chain_map("%s:%d" % monitors["b"].address, None)
    yield a, b, monitors
    for started in monitors.values():
        started.stop()


@pytest.fixture
def browser():
    started = Browser(width=1280, height=720)
    yield started
    started.close()


def test_the_map_draws_the_network_and_follows_its_changes(network, browser, tmp_path):
    a, b, monitors = network
    browser.goto("http://%s:%d/" % monitors["a"].address)

    def picture_where(condition, message):
        return wait_until(lambda: (lambda p: p if condition(p) else None)(browser.evaluate(PICTURE)),
                          message=message)

    # three servers, two links, this server marked, each with its load
    picture = picture_where(lambda p: len(p["live"]) == 3 and len(p["edges"]) == 2
                            and p["labels"][B].startswith("5 clients"), "3 servers and 2 links drawn")
    assert picture["edges"] == [f"{A} - {B}", f"{B} - {C}"] and picture["self"] == [A]
    assert picture["labels"][A].startswith("12 clients") and picture["labels"][C] == "2 clients"
    assert picture["status"].startswith("3 servers, 2 links (the whole network)")

    # clicking a server shows its /varz, read from its own monitor
    browser.evaluate(f'document.querySelector(\'g.node[data-address="{B}"]\')'
                     '.dispatchEvent(new MouseEvent("click", {bubbles: true}))')
    details = wait_until(lambda: (lambda d: d if "counts" in d else None)(browser.evaluate(
        'document.getElementById("details").innerText')), message="B's figures shown")
    assert B in details and "origin-3781" in details and "its monitor at" in details
    shot = os.environ.get("MAP_SCREENSHOT") or str(tmp_path / "map.png")
    browser.screenshot(shot)
    assert os.path.getsize(shot) > 10_000

    # C dies: gone from the map, so it greys out and its link goes
    a.network_map = {"servers": [{"address": A}, {"address": B, "monitor": "%s:%d" % monitors["b"].address}],
                     "links": [{"a": A, "b": B}], "root": A}
    picture = picture_where(lambda p: p["gone"] == [C], "C greyed out")
    assert picture["live"] == [A, B] and picture["edges"] == [f"{A} - {B}"] and picture["labels"][C] == "gone"

    # C comes back, re-attached to A: its new link is drawn and it is no longer grey
    a.network_map = {"servers": [{"address": A}, {"address": B, "monitor": "%s:%d" % monitors["b"].address},
                                 {"address": C, "load": 1}],
                     "links": [{"a": A, "b": B}, {"a": A, "b": C}], "root": A}
    picture = picture_where(lambda p: len(p["live"]) == 3 and not p["gone"], "C back")
    assert picture["edges"] == [f"{A} - {B}", f"{A} - {C}"] and picture["labels"][C] == "1 clients"

    # B's own monitor stops answering: its figures fall back to what A knows (the map's entry)
    monitors["b"].stop()
    picture_where(lambda p: p["labels"][B] == "? clients", "B's figures no longer from its monitor")

    # this server's monitor stops: the page says so and greys the map out
    monitors["a"].stop()
    picture = picture_where(lambda p: p["offline"], "the page to notice")
    assert picture["status"].startswith("this server's monitor is not answering since")


def test_without_a_network_map_the_page_shows_the_neighbours(browser):
    alone = FakeSource(3790, clients=[client(1)], links=[link(1, "127.0.0.1:3791", load=3, live=False)])
    started = Monitor(alone).start()
    try:
        browser.goto("http://%s:%d/" % started.address)
        picture = wait_until(lambda: (lambda p: p if len(p["live"]) == 2 else None)(browser.evaluate(PICTURE)),
                             message="2 servers drawn")
        assert picture["edges"] == ["127.0.0.1:3790 - 127.0.0.1:3791"]
        assert "this server and its neighbours" in picture["status"]
        assert browser.evaluate('document.querySelector("line.edge").classList.contains("catching-up")')
    finally:
        started.stop()


def test_the_map_of_a_real_network_shows_a_killed_server(make_process, browser, tmp_path):
    """Three real servers a - b - c, the page served by b's monitor (b knows its neighbours); c is
    killed (SIGKILL): b's link to it breaks, and the page greys c out."""
    a = make_process(extra=["--monitor-port", "0"])
    b = make_process(remote_port=a.port, extra=["--monitor-port", "0"])
    c = make_process(remote_port=b.port, extra=["--monitor-port", "0"])
    monitor = b.find_log(r"monitor on (http://[\d.]+:\d+/)").group(1)
    names = {server: f"127.0.0.1:{server.port}" for server in (a, b, c)}
    client = login(c.port)
    browser.goto(monitor)

    def picture_where(condition, message):
        return wait_until(lambda: (lambda p: p if condition(p) else None)(browser.evaluate(PICTURE)),
                          timeout=60, message=message)

    picture = picture_where(lambda p: len(p["live"]) == 3 and len(p["edges"]) == 2
                            and p["labels"][names[c]].startswith("1 clients"), "a real chain of 3 drawn")
    assert picture["self"] == [names[b]]
    assert picture["edges"] == sorted([" - ".join(sorted((names[a], names[b]))),
                                       " - ".join(sorted((names[b], names[c])))])
    assert picture["labels"][names[b]].startswith("0 clients")
    browser.screenshot(os.environ.get("MAP_SCREENSHOT_REAL") or str(tmp_path / "real.png"))

    c.kill()
    picture = picture_where(lambda p: p["gone"] == [names[c]], "the killed server greyed out")
    assert picture["live"] == sorted([names[a], names[b]]) and len(picture["edges"]) == 1
    client.close()
