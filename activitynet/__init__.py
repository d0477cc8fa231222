"""activitynet: the Activity Streamer protocol on a network of servers that survives crashes and
partitions. See README.rst for running it and PROTOCOL.md for the contract."""

__version__ = "0.1.0"
