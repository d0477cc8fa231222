"""An instrument for the lock rule: no socket is written, shut down or closed while the state
lock is held (see activitynet/state.py).

``install(monkeypatch)`` gives every ``State`` created afterwards a lock that counts, per thread,
how deeply it is held, and makes every ``PlainTransport`` and ``TlsTransport`` record a violation
when ``send_some``, ``shutdown`` or ``close`` is called by a thread holding a state lock. conftest.py installs it for
every test; ``Watch.violations`` lists what happened where, and ``Watch.calls`` counts the
transport calls seen, so a test can show the instrument was not idle.
"""

import threading
import traceback
from collections import Counter

from activitynet import connection, state, tls


class Watch:
    def __init__(self):
        self.held = threading.local()
        self.violations = []
        self.calls = Counter()
        self._lock = threading.Lock()

    def depth(self):
        return getattr(self.held, "depth", 0)

    def record(self, name):
        with self._lock:
            self.calls[name] += 1
            if self.depth():
                self.violations.append(f"{name} with the state lock held, in "
                                       f"{threading.current_thread().name}:\n"
                                       + "".join(traceback.format_stack(limit=12)))


class TrackedLock:
    """A state lock (reentrant, as State's own) that counts, per thread, how deeply it is held."""

    def __init__(self, watch):
        self._lock = threading.RLock()
        self._watch = watch

    def acquire(self, blocking=True, timeout=-1):
        taken = self._lock.acquire(blocking, timeout)
        if taken:
            self._watch.held.depth = self._watch.depth() + 1
        return taken

    def release(self):
        self._watch.held.depth -= 1
        self._lock.release()


def install(monkeypatch):
    watch = Watch()
    original_init = state.State.__init__

    def tracked_init(self, *args, lock=None, **kwargs):
        original_init(self, *args, lock=lock or TrackedLock(watch), **kwargs)

    monkeypatch.setattr(state.State, "__init__", tracked_init)
    for transport in (connection.PlainTransport, tls.TlsTransport):
        for name in ("send_some", "shutdown", "close"):
            method = getattr(transport, name)

            def checked(self, *args, _method=method, _name=name):
                watch.record(_name)
                return _method(self, *args)

            monkeypatch.setattr(transport, name, checked)
    return watch
