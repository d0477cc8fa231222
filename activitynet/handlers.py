"""One ``handle_<command>`` per inbound message, and the tables saying who may send what.

Every handler gets the decoded ``message`` and the ``line`` it arrived as (None for a message
inside a BUNDLE): a broadcast is relayed as the bytes received when nothing about it changes.

A connection starts as ``new``; its first REGISTER or LOGIN makes it a ``client``, a correct
AUTHENTICATE (or our own dialling) a ``server``. Each role has its own table, and a command
outside the table of the connection's role is an INVALID_MESSAGE. Handlers raise
``ProtocolError`` for failure replies and ``Goodbye`` to end a connection; ``dispatch`` is the
one place that turns those into the reply and the close.
"""

import logging

from . import protocol, recovery, schemas
from .protocol import AuthenticationFail, InvalidMessage

log = logging.getLogger(__name__)

REMOVED_COMMANDS = {"LOCK_REQUEST", "LOCK_ALLOWED", "LOCK_DENIED"}


class Goodbye(Exception):
    """End this connection, after sending ``message`` (a dict) if there is one."""

    def __init__(self, reason, message=None):
        super().__init__(reason)
        self.reason = reason
        self.message = message


# --- client commands ----------------------------------------------------------------------------

def handle_register(server, conn, message, line=None):
    server.state.register_user(conn, message["username"], message["secret"])


def handle_login(server, conn, message, line=None):
    target = server.state.login(conn, message["username"], message.get("secret"))
    if target is not None:
        hostname, port = target
        raise Goodbye(f"redirected to {hostname}:{port}", protocol.redirect(hostname, port))


def handle_logout(server, conn, message, line=None):
    raise Goodbye("logged out")


def handle_activity_message(server, conn, message, line=None):
    server.state.client_activity(conn, message["username"], message.get("secret"), message["activity"])


# --- server commands ----------------------------------------------------------------------------

def handle_authenticate(server, conn, message, line=None):
    if conn.role == "server":
        raise InvalidMessage("AUTHENTICATE on a link that is already authenticated")
    if message["secret"] != server.secret:
        raise AuthenticationFail(f"the supplied secret is incorrect: {message['secret']}")
    log.info("server %s authenticated", conn.name)
    server.trust_as_server(conn)
    recovery.open_as_acceptor(server.state, conn)


def handle_server_announce(server, conn, message, line=None):
    first = server.state.announced(conn, int(message["load"]), message["hostname"], int(message["port"]))
    if first:
        log.info("server link %s is %s:%s", conn.name, message["hostname"], message["port"])
    recovery.peer_announced(server.state, conn, first)


def handle_activity_broadcast(server, conn, message, line=None):
    relayed = line if line is not None and protocol.relayable_broadcast(message, line) else None
    server.state.server_activity(conn, message["activity"], message["id"], relayed)


def handle_sync_user(server, conn, message, line=None):
    server.state.merge_users(conn, message["users"])


def handle_new_user(server, conn, message, line=None):
    server.state.new_user(conn, message["username"], message["secret"])


def handle_user_conflict(server, conn, message, line=None):
    server.state.user_conflict(conn, message["username"])


def handle_activity_retrieve(server, conn, message, line=None):
    recovery.answer_retrieve(server.state, conn, message["after"], message.get("marks"))


def handle_bundle(server, conn, message, line=None):
    """The Java implementation's envelope: each message handled in order as if it had arrived
    on this link on its own. It sends its reconnect sequence as one BUNDLE, so a BUNDLE may open
    a connection, provided it starts with AUTHENTICATE."""
    first = message["messages"][0] if message["messages"] else {}
    if conn.role == "new" and first.get("command") != "AUTHENTICATE":
        raise InvalidMessage("a BUNDLE before AUTHENTICATE must start with AUTHENTICATE")
    for inner in message["messages"]:
        dispatch_message(server, conn, inner)


# --- failure replies received -------------------------------------------------------------------

def handle_invalid_message(server, conn, message, line=None):
    if conn.role == "server":
        log.error("server %s rejected our message: %s", conn.name, message["info"])
    raise Goodbye(f"peer sent INVALID_MESSAGE: {message['info']}")


def handle_authentication_fail(server, conn, message, line=None):
    if conn.role == "server":
        log.error("server %s refused our secret: %s", conn.name, message["info"])
        raise Goodbye("authentication failed")
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

HANDLERS_BY_ROLE = {"new": NEW_HANDLERS, "client": CLIENT_HANDLERS, "server": SERVER_HANDLERS}


def dispatch_line(server, conn, line):
    """Handle one received line. Heartbeats are ignored where a server link may send them."""
    if line == protocol.HEARTBEAT_LINE and conn.role != "client":
        return
    dispatch_message(server, conn, protocol.decode(line), line)


def dispatch_message(server, conn, message, line=None):
    """Handle one decoded message; ``line`` is the bytes it came in (None inside a BUNDLE)."""
    command = message.get("command")
    if command is None:
        raise InvalidMessage("the message has no 'command' field")
    if not isinstance(command, str):
        raise InvalidMessage(f"the field 'command' must be a string, not {protocol.type_name(command)}")
    handler = HANDLERS_BY_ROLE[conn.role].get(command)
    if handler is None:
        raise InvalidMessage(_refusal(conn.role, command))
    schemas.validate(message)
    handler(server, conn, message, line)


def _refusal(role, command):
    """Why ``command`` is not accepted from a connection in ``role``."""
    if command == "AUTHENTICATE" and role == "client":
        return "AUTHENTICATE is not accepted on a client connection"
    if command in SERVER_HANDLERS and role != "server":
        return f"{command} is only accepted from an authenticated server: send AUTHENTICATE first"
    if command in CLIENT_HANDLERS and role == "server":
        return f"{command} is a client command, not accepted on a server link"
    if command in schemas.COMMANDS:
        return f"{command} is sent by servers to clients, not accepted by a server"
    if command in REMOVED_COMMANDS:
        return f"unknown command {command}: the lock protocol was removed from this network"
    return f"unknown command {command!r}"
