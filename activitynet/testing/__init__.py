"""Support for the tests and the benchmarks; the server itself never imports it.

- ``process``: real server processes, started as markers would (``python -m activitynet.server``
  with the Project 1 flags), their logs, signals (a crash, a frozen machine) and measurements.
- ``netcut``: a TCP relay between two servers that can cut, black-hole, heal, delay and split
  the link's segments.

Both ``tests/`` and ``benchmarks/`` import them from here, so there is one implementation of each.
"""

from .netcut import Relay
from .process import HOST, ServerDidNotStart, ServerProcess

__all__ = ["HOST", "Relay", "ServerDidNotStart", "ServerProcess"]
