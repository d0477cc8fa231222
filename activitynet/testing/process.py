"""Real server processes, started as markers would.

Both ``tests/`` and ``benchmarks/`` start servers with ``python -m activitynet.server`` and the
Project 1 flags, find the port each listens on from its start-up line, read its log, signal it
(a crash is SIGKILL, a frozen machine SIGSTOP) and measure it. This is the one implementation
of that; it lives in the package so both can import it. It is not used by the server itself.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]  # the source tree (PYTHONPATH for the servers)
START_TIMEOUT = 20.0
LISTENING = re.compile(r"listening on \S+:(\d+)")


class ServerDidNotStart(Exception):
    """The process exited, or did not log that it listens, within the time allowed."""


class ServerProcess:
    """One ``python -m activitynet.server`` process on 127.0.0.1; ``start()`` again after a
    ``kill()`` restarts it on the same port."""

    def __init__(self, name=None, remote_port=None, secret="test-secret", port=0, interval=500,
                 extra=(), stdout=subprocess.PIPE):
        self.name = name
        self.remote_port = remote_port
        self.secret = secret  # None: the server generates one and prints it on stdout
        self.port = port  # 0 until the first start has found the real one
        self.interval = interval
        self.extra = list(extra)
        self.stdout = stdout
        self.proc = None
        self.started_at = None  # perf_counter when the process was last spawned
        self.listening_at = None  # perf_counter when its "listening on" line was read
        self.rss_kib = self.peak_rss_kib = None  # last measured, kept after the stop
        self._log = []
        self._log_lock = threading.Lock()  # guards _log
        self._listening = threading.Event()

    def __repr__(self):
        return f"<ServerProcess {self.name or ''} {HOST}:{self.port}>"

    def args(self):
        args = [sys.executable, "-m", "activitynet.server", "-lp", str(self.port), "-lh", HOST,
                "--bind", HOST, "-a", str(self.interval)]
        if self.secret is not None:
            args += ["-s", self.secret]
        if self.remote_port is not None:
            args += ["-rh", HOST, "-rp", str(self.remote_port)]
        return args + self.extra

    # --- starting ---------------------------------------------------------------------------

    def spawn(self):
        """Start the process without waiting for it to listen (see ``wait_listening``)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._listening = listening = threading.Event()
        self.listening_at = None
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=self.stdout,
                                     stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        threading.Thread(target=self._drain, args=(self.proc, listening), daemon=True,
                         name=f"log-{self.name or self.proc.pid}").start()
        return self

    def wait_listening(self, timeout=START_TIMEOUT):
        if not self._listening.wait(timeout) or self.listening_at is None:
            raise ServerDidNotStart(f"server {self.name or ''} did not start listening within "
                                    f"{timeout} s:\n" + self.log_text()[-3000:])
        return self

    def start(self, timeout=START_TIMEOUT):
        """Start (or restart, on the same port) and wait until it listens."""
        return self.spawn().wait_listening(timeout)

    def _drain(self, proc, listening):
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            if not listening.is_set():
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(1))
                    self.listening_at = time.perf_counter()
                    listening.set()
            with self._log_lock:
                self._log.append(line)
        listening.set()  # EOF: wake a waiter, who sees listening_at is None

    # --- its log (stderr) -------------------------------------------------------------------

    def log_mark(self):
        """Where the log ends now, for ``find_log(..., since=)``."""
        with self._log_lock:
            return len(self._log)

    def find_log(self, pattern, since=0):
        """The first match of ``pattern`` in a log line (from line ``since`` on), or None."""
        with self._log_lock:
            lines = self._log[since:]
        for line in lines:
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def count_log(self, pattern):
        with self._log_lock:
            return sum(1 for line in self._log if re.search(pattern, line))

    def log_text(self):
        with self._log_lock:
            return "".join(self._log)

    def tracebacks(self):
        return self.count_log(r"^Traceback")

    # --- signals ----------------------------------------------------------------------------

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum):
        self.proc.send_signal(signum)

    def kill(self):
        """SIGKILL: a crash, no goodbye to anyone."""
        self.proc.kill()
        self.proc.wait(timeout=START_TIMEOUT)

    def freeze(self):
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout=START_TIMEOUT):
        """SIGTERM (SIGKILL after ``timeout``), thawing it first; returns the exit status, or
        None if it was not running. Measures its memory first."""
        if not self.alive():
            return None
        self.memory_mib()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    # --- measurements (from /proc) ----------------------------------------------------------

    def memory_mib(self):
        """(current RSS, peak RSS) in MiB, remembered so they can be read after the stop."""
        rss, hwm = memory_kib(self.proc.pid)
        if rss is not None:
            self.rss_kib, self.peak_rss_kib = rss, hwm
        return (None if self.rss_kib is None else self.rss_kib / 1024,
                None if self.peak_rss_kib is None else self.peak_rss_kib / 1024)

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def threads(self):
        """How many threads the server has (one per connection, plus a few), or None."""
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return None


def memory_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB, from /proc/<pid>/status; (None, None) once it is gone."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS
