"""An instrument for the lock rule: no socket is written, shut down or closed while the state
lock is held (see activitynet/state.py).

``install(monkeypatch)`` makes every ``State`` created afterwards count, per thread, how deeply
it holds its lock, and makes every ``PlainTransport`` and ``TlsTransport`` record a violation when ``send_some``,
``shutdown`` or ``close`` is called by a thread holding a state lock. conftest.py installs it for
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


def install(monkeypatch):
    watch = Watch()
    original = state._Locked

    class TrackedLocked(original):
        __slots__ = ()

        def __enter__(self):
            super().__enter__()
            watch.held.depth = watch.depth() + 1

        def __exit__(self, *exc):
            watch.held.depth -= 1
            super().__exit__(*exc)

    monkeypatch.setattr(state, "_Locked", TrackedLocked)
    for transport in (connection.PlainTransport, tls.TlsTransport):
        for name in ("send_some", "shutdown", "close"):
            method = getattr(transport, name)

            def checked(self, *args, _method=method, _name=name):
                watch.record(_name)
                return _method(self, *args)

            monkeypatch.setattr(transport, name, checked)
    return watch
