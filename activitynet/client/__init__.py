"""The activitynet client, in two modules: ``library`` (the ``Client`` class and its errors, for
scripts, benchmarks and tests) and ``terminal`` (``python -m activitynet.client``, a person at a
terminal). The library's public names are re-exported here: ``from activitynet.client import
Client``.
"""

from .library import (ANONYMOUS, FATAL_ERRORS, AuthenticationFailed, Client, ClientError,
                      ConnectionLost, InvalidMessage, LoginFailed, RegisterFailed, ReplyTimeout,
                      TooManyRedirects, UnexpectedReply, error_for, failover_order,
                      generate_secret, redirect_target, tls_context)

__all__ = ["ANONYMOUS", "FATAL_ERRORS", "AuthenticationFailed", "Client", "ClientError",
           "ConnectionLost", "InvalidMessage", "LoginFailed", "RegisterFailed", "ReplyTimeout",
           "TooManyRedirects", "UnexpectedReply", "error_for", "failover_order",
           "generate_secret", "redirect_target", "tls_context"]
