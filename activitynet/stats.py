"""Counters since start: what a server has done, for the monitor (``/varz``, ``/metrics``).

Counting must cost the relay nothing it would notice, so a ``Counters`` is a plain object with int
attributes that the code owning an event bumps with ``+=``: no lock of its own, no library call
per activity. The monitor only reads them (an int read is atomic), at scrape time.

``+=`` on an attribute is a read, an add and a write: two threads bumping the same counter at
once can lose one. So every counter is bumped either under the state lock (all the activity,
login, link and refusal counters: their events are decided there anyway, see ``state``) or by
the one thread that owns it (``connections_accepted``, by the accept loop). Bytes are counted
per connection (read by its reader thread, written under its outbox lock) and added to
``bytes_in``/``bytes_out`` when the connection closes; ``State.traffic()`` adds the open ones at
read time. The field table ``FIELDS`` is the one list of counters: ``/varz``, ``/metrics`` and
the tests all read it, so a new counter is added in exactly one place.

The rate limiter (issue 11) never refuses: it pauses a client's reads. ``clients_rate_limited``
counts each client once, at its first pause (``State.count_rate_limited``).
"""

import dataclasses

# Why a message was refused with INVALID_MESSAGE (or a connection refused before its first
# line): a short fixed set, so /metrics has a bounded number of series. Code that refuses
# something picks the kind here; the human text stays in the reply's ``info``.
INVALID_REASONS = (
    "not_json",             # a line that is not a JSON object
    "schema",               # JSON, but a field is missing or of the wrong type
    "unknown_command",      # a command PROTOCOL.md does not have
    "not_allowed",          # a known command this connection may not send (yet), e.g. before login
    "line_too_long",        # longer than --max-line
    "login_timeout",        # no login/authentication in time
    "too_many_connections", # refused at accept time by a connection limit
    "rate_limited",         # over a rate limit
    "other",                # anything else (say what in the reply's info)
)


@dataclasses.dataclass(frozen=True)
class Field:
    """One counter: the attribute bumped by the server and how /metrics names it."""

    attribute: str
    metric: str  # the Prometheus family name (the exposition adds ``_total``)
    help: str


FIELDS = (
    Field("activities_from_clients", "activitynet_activities_from_clients",
          "Activities accepted from this server's clients."),
    Field("activities_from_servers", "activitynet_activities_from_servers",
          "New activities received from server links (after de-duplication)."),
    Field("activities_relayed", "activitynet_activities_relayed",
          "Activities sent to server links (one per link sent to), live or as a link's backlog."),
    Field("activities_delivered", "activitynet_activities_delivered",
          "Activities delivered to clients (one per client delivered to)."),
    Field("activities_deduplicated", "activitynet_activities_deduplicated",
          "Activities received again over another path and dropped as already seen."),
    Field("bytes_in", "activitynet_received_bytes", "Bytes read from all connections."),
    Field("bytes_out", "activitynet_sent_bytes", "Bytes written to all connections."),
    Field("connections_accepted", "activitynet_connections_accepted",
          "Connections accepted on the relay port."),
    Field("logins", "activitynet_logins", "Successful client logins."),
    Field("login_failures", "activitynet_login_failures", "Refused client logins."),
    Field("registrations", "activitynet_registrations", "Users registered on this server."),
    Field("redirects", "activitynet_redirects", "Clients redirected to a less loaded server."),
    Field("slow_consumers_cut", "activitynet_slow_consumers_cut",
          "Connections closed because they read too slowly (outbox over its limit)."),
    Field("clients_rate_limited", "activitynet_rate_limited_clients",
          "Clients whose reads were paused by the rate limit (each counted once)."),
    Field("recoveries_run", "activitynet_recoveries",
          "Recovery routines run (one per new server link)."),
    Field("activities_recovered", "activitynet_recovered_activities",
          "New activities received on a server link that were sent before the link came up "
          "(its backlog), by their id's send time."),
)


class Counters:
    """Counters since start; see the module docstring for who may bump what."""

    def __init__(self):
        for field in FIELDS:
            setattr(self, field.attribute, 0)
        # INVALID_MESSAGE by reason kind; bump as ``counters.invalid_messages["schema"] += 1``
        self.invalid_messages = dict.fromkeys(INVALID_REASONS, 0)

    def as_dict(self):
        """A plain copy, for JSON."""
        values = {field.attribute: getattr(self, field.attribute) for field in FIELDS}
        values["invalid_messages"] = dict(self.invalid_messages)
        return values
