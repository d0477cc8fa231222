"""A real browser for tests: Debian's headless ``chromium``, driven over the DevTools protocol.

Chromium started with ``--remote-debugging-pipe`` reads protocol commands on its descriptor 3 and
writes answers and events on descriptor 4, each a JSON object ended by a NUL byte. That needs
nothing but the standard library (no WebSocket client, no driver download), and lets a test load
a page once, then look at it again and again as it updates itself, as a person watching would.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe"]


class BrowserError(Exception):
    """The browser answered a command with an error, died, or did not answer in time."""


class Browser:
    """One headless chromium with one page. ``evaluate`` runs JavaScript in it; ``close`` ends it."""

    def __init__(self, width=1280, height=800, timeout=30.0):
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="activitynet-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_descriptors():  # in the child, before exec: its 3 reads our commands, its 4 answers
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire_descriptors)  # our other descriptors are non-inheritable
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._lock = threading.Lock()  # guards _next_id, _answers
        self._answered = threading.Condition(self._lock)
        self._next_id = 0
        self._answers = {}
        self._reader = threading.Thread(target=self._read, name="chromium-reader", daemon=True)
        self._reader.start()
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._lock:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers[message["id"]] = message
                self._answered.notify_all()
        with self._lock:
            self._answers[None] = "closed"
            self._answered.notify_all()

    def _call(self, method, session=None, **params):
        with self._lock:
            self._next_id += 1
            number = self._next_id
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._lock:
            if not self._answered.wait_for(lambda: number in self._answers or None in self._answers,
                                           self.timeout):
                raise BrowserError(f"{method}: no answer in {self.timeout} s")
            if number not in self._answers:
                raise BrowserError(f"{method}: the browser closed")
            answer = self._answers.pop(number)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer["result"]

    def call(self, method, **params):
        """A DevTools command on the page."""
        return self._call(method, session=self.session, **params)

    def goto(self, url):
        """Load ``url`` and return once its document (and its scripts) have loaded."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while self.evaluate("location.href + ' ' + document.readyState") != f"{url} complete":
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not load in {self.timeout} s")
            time.sleep(0.05)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as file:
            file.write(base64.b64decode(data))

    def close(self):
        try:
            self._call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)
