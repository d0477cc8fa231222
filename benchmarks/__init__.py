"""The activitynet benchmark suite: ``python -m benchmarks`` (``make bench``).

Each scenario starts real servers as processes (``cluster``), drives them with the client library
(``activitynet.client``), checks that every client received the whole stream once and in order
(``streams``), and reports throughput, latency and the servers' peak memory as rows of one table
(``report``). The scenarios and their targets, from issue 5, are in ``scenarios``.
"""
