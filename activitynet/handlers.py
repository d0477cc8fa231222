"""One ``handle_<command>`` per inbound message, and the tables saying who may send what.

Every handler gets the decoded ``message`` and the ``line`` it arrived as (None for a message
inside a BUNDLE): a broadcast is relayed as the bytes received when nothing about it changes.

A connection starts as ``new``; its first REGISTER or LOGIN makes it a ``client``, a correct
AUTHENTICATE (or our own dialling) a ``server``. Each role has its own table, and a command
outside the table of the connection's role is an INVALID_MESSAGE. Handlers decide what a command
means and which reply it gets; ``State`` decides what changes and who else is told. Handlers
raise ``ProtocolError`` for failure replies and ``Goodbye`` to end a connection; the server's
connection loop is the one place that turns those into the reply and the close.

A handler gets a ``Context`` (the state, the servers' secret, the failed-login throttle, whether
AUTHENTICATE needs TLS, and the one thing it may ask of the server: to trust a connection with a
server's limits), the connection's ``Session`` and the message. Nothing here holds the ``Server``.

Guessing secrets is made slow (issue 11): a failed LOGIN or AUTHENTICATE asks the throttle how
long its reply must wait, and carries that as ``delay`` on the error; the connection's own thread
sleeps it before replying, so nobody else waits. Secrets are compared in constant time
(``credentials.same_secret``).
"""

import dataclasses
import logging
from typing import Callable

from . import protocol, schemas
from .credentials import same_secret
from .limits import LoginThrottle
from .netmap import Lineage
from .protocol import AuthenticationFail, InvalidMessage, LoginFailed
from .session import CLIENT, NEW, SERVER
from .state import State

log = logging.getLogger(__name__)

REMOVED_COMMANDS = {"LOCK_REQUEST", "LOCK_ALLOWED", "LOCK_DENIED"}


@dataclasses.dataclass(frozen=True)
class Context:
    """What handlers may use."""

    state: State
    secret: str
    trust_as_server: Callable  # (session) -> None: a server's larger line and outbox limits
    throttle: LoginThrottle = dataclasses.field(default_factory=LoginThrottle)
    tls_required: bool = False  # --tls-required: AUTHENTICATE only over TLS


class Goodbye(Exception):
    """End this connection, after sending ``message`` (a dict) if there is one."""

    def __init__(self, reason, message=None):
        super().__init__(reason)
        self.reason = reason
        self.message = message


# --- client commands ----------------------------------------------------------------------------

def handle_register(ctx, session, message, line=None):
    ctx.state.register_user(session, message["username"], message["secret"])


def handle_login(ctx, session, message, line=None):
    username = message["username"]
    key = (host_of(session.address), username)
    try:
        target = ctx.state.login(session, username, message.get("secret"))
    except LoginFailed as exc:
        exc.delay = ctx.throttle.failed(key)
        raise
    ctx.throttle.succeeded(key)
    if target is not None:
        hostname, port = target
        raise Goodbye(f"redirected to {hostname}:{port}", protocol.redirect(hostname, port))


def handle_logout(ctx, session, message, line=None):
    raise Goodbye("logged out")


def handle_activity_message(ctx, session, message, line=None):
    ctx.state.client_activity(session, message["username"], message.get("secret"), message["activity"])


# --- server commands ----------------------------------------------------------------------------

def handle_authenticate(ctx, session, message, line=None):
    if session.role == SERVER:
        raise InvalidMessage("AUTHENTICATE on a link that is already authenticated", kind="not_allowed")
    if ctx.tls_required and not session.secure:
        # Before the secret is even looked at, and before SYNC_USER: neither crosses in clear.
        raise AuthenticationFail("this server accepts AUTHENTICATE only over TLS (--tls-required); "
                                 "start the dialling server with --tls-cert, --tls-key and --tls-ca")
    key = (host_of(session.address),)
    if not same_secret(message["secret"], ctx.secret):
        error = AuthenticationFail(f"the supplied secret is incorrect: {message['secret']}")
        error.delay = ctx.throttle.failed(key)
        raise error
    ctx.throttle.succeeded(key)
    log.info("server %s authenticated", session.address, extra={"conn": session.address})
    ctx.trust_as_server(session)
    ctx.state.accept_link(session)


def handle_server_announce(ctx, session, message, line=None):
    hostname, port = message["hostname"], int(message["port"])
    lineage = message.get("lineage")
    lineage = Lineage.from_wire(lineage) if lineage is not None else None
    if ctx.state.peer_announced(session, int(message["load"]), hostname, port, lineage, message.get("map")):
        log.info("server link %s is %s:%s", session.address, hostname, port,
                 extra={"conn": session.address, "peer": f"{hostname}:{port}"})


def handle_activity_broadcast(ctx, session, message, line=None):
    relayed = line if line is not None and protocol.relayable_broadcast(message, line) else None
    ctx.state.server_activity(session, message["activity"], message["id"], relayed)


def handle_sync_user(ctx, session, message, line=None):
    ctx.state.merge_users(session, message["users"])


def handle_new_user(ctx, session, message, line=None):
    ctx.state.new_user(session, message["username"], message["secret"])


def handle_user_conflict(ctx, session, message, line=None):
    ctx.state.user_conflict(session, message["username"])


def handle_activity_retrieve(ctx, session, message, line=None):
    lineage = message.get("lineage")
    lineage = Lineage.from_wire(lineage) if lineage is not None else None
    ctx.state.peer_asked(session, message["after"], message.get("marks"), message.get("held"),
                         lineage, message.get("alone") is True)


def handle_bundle(ctx, session, message, line=None):
    """The Java implementation's envelope: each message handled in order as if it had arrived
    on this link on its own. It sends its reconnect sequence as one BUNDLE, so a BUNDLE may open
    a connection, provided it starts with AUTHENTICATE."""
    first = message["messages"][0] if message["messages"] else {}
    if session.role == NEW and first.get("command") != "AUTHENTICATE":
        raise InvalidMessage("a BUNDLE before AUTHENTICATE must start with AUTHENTICATE", kind="not_allowed")
    for inner in message["messages"]:
        dispatch_message(ctx, session, inner)


# --- failure replies received -------------------------------------------------------------------

def handle_invalid_message(ctx, session, message, line=None):
    if session.role == SERVER and message.get("refused"):  # the re-attachment rule: try the next
        log.info("server %s refused the link (%s): %s", session.address, message["refused"], message["info"],
                 extra={"conn": session.address})
    elif session.role == SERVER:
        log.error("server %s rejected our message: %s", session.address, message["info"],
                  extra={"conn": session.address})
    raise Goodbye(f"peer sent INVALID_MESSAGE: {message['info']}")


def handle_authentication_fail(ctx, session, message, line=None):
    if session.role == SERVER:
        log.error("server %s refused our secret: %s", session.address, message["info"],
                  extra={"conn": session.address})
        ctx.state.peer_refused(session)
    raise Goodbye(f"peer sent AUTHENTICATION_FAIL: {message['info']}")


# --- tables -------------------------------------------------------------------------------------

CLIENT_HANDLERS = {
    "REGISTER": handle_register,
    "LOGIN": handle_login,
    "LOGOUT": handle_logout,
    "ACTIVITY_MESSAGE": handle_activity_message,
    "INVALID_MESSAGE": handle_invalid_message,
    "AUTHENTICATION_FAIL": handle_authentication_fail,
}

SERVER_HANDLERS = {
    "AUTHENTICATE": handle_authenticate,
    "SERVER_ANNOUNCE": handle_server_announce,
    "ACTIVITY_BROADCAST": handle_activity_broadcast,
    "SYNC_USER": handle_sync_user,
    "NEW_USER": handle_new_user,
    "USER_CONFLICT": handle_user_conflict,
    "ACTIVITY_RETRIEVE": handle_activity_retrieve,
    "BUNDLE": handle_bundle,
    "INVALID_MESSAGE": handle_invalid_message,
    "AUTHENTICATION_FAIL": handle_authentication_fail,
}

# A connection that has not said what it is yet may become a client or authenticate as a server.
NEW_HANDLERS = {**CLIENT_HANDLERS, "AUTHENTICATE": handle_authenticate, "BUNDLE": handle_bundle}

HANDLERS_BY_ROLE = {NEW: NEW_HANDLERS, CLIENT: CLIENT_HANDLERS, SERVER: SERVER_HANDLERS}


def dispatch_line(ctx, session, line):
    """Handle one received line. Heartbeats are ignored where a server link may send them."""
    if line == protocol.HEARTBEAT_LINE and session.role != CLIENT:
        return
    message = schemas.decode_valid(line)  # the activity commands, decoded and validated at once
    if message is not None:
        dispatch_message(ctx, session, message, line, valid=True)
        return
    try:
        message = protocol.decode(line)
    except InvalidMessage as exc:
        exc.kind = "not_json"
        raise
    dispatch_message(ctx, session, message, line)


def dispatch_message(ctx, session, message, line=None, valid=False):
    """Handle one decoded message; ``line`` is the bytes it came in (None inside a BUNDLE),
    ``valid`` says it already passed its schema."""
    command = message.get("command")
    if command is None:
        raise InvalidMessage("the message has no 'command' field", kind="schema")
    if not isinstance(command, str):
        raise InvalidMessage(f"the field 'command' must be a string, not {protocol.type_name(command)}",
                             kind="schema")
    handler = HANDLERS_BY_ROLE[session.role].get(command)
    if handler is None:
        known = command in schemas.COMMANDS or command in SERVER_HANDLERS or command in CLIENT_HANDLERS
        raise InvalidMessage(_refusal(session.role, command), kind="not_allowed" if known else "unknown_command")
    if not valid:
        try:
            schemas.validate(message)
        except InvalidMessage as exc:
            exc.kind = "schema"
            raise
    if session.held and handler is not handle_register:
        ctx.state.send_held(session)  # REGISTER_SUCCESS replies first, once committed
    handler(ctx, session, message, line)


def host_of(address):
    """The host part of a "host:port" address (the throttle counts per source host)."""
    return address.rsplit(":", 1)[0]


def _refusal(role, command):
    """Why ``command`` is not accepted from a connection in ``role``."""
    if command == "AUTHENTICATE" and role == CLIENT:
        return "AUTHENTICATE is not accepted on a client connection"
    if command in SERVER_HANDLERS and role != SERVER:
        return f"{command} is only accepted from an authenticated server: send AUTHENTICATE first"
    if command in CLIENT_HANDLERS and role == SERVER:
        return f"{command} is a client command, not accepted on a server link"
    if command in schemas.COMMANDS:
        return f"{command} is sent by servers to clients, not accepted by a server"
    if command in REMOVED_COMMANDS:
        return f"unknown command {command}: the lock protocol was removed from this network"
    return f"unknown command {command!r}"
