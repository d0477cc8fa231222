"""activitynet client: join an activitynet network from a terminal.

Usage:
  activitynet.client [options]

Run it as "python -m activitynet.client". Project 1 example: -u alice -rh localhost -rp 3780 -s abc

Options (the Project 1 flag in brackets):
  --username=NAME        [-u] the user to log in as [default: anonymous]
  --secret=SECRET        [-s] the user's secret. A username without a secret registers that
                         user first, with a generated secret that is printed
  --remote-host=HOST     [-rh] the server to connect to [default: localhost]
  --remote-port=PORT     [-rp] its port [default: 3780]
  --servers=LIST         more servers, tried in order after -rh/-rp when that one cannot be
                         reached or goes away: HOST:PORT[,HOST:PORT...]
  --tls                  talk to the servers over TLS, checking their certificates
  --tls-ca=FILE          the CA certificate(s) (PEM) to check them against; implies --tls
                         (without it: the system's trusted CAs)
  --json                 print each received message as one raw JSON line
  --no-reconnect         exit (status 1) when the server goes away, instead of reconnecting
  --max-redirects=N      most REDIRECTs followed in a row [default: 10]
  --log-level=LEVEL      debug, info, warning or error [default: warning]
  -h --help              show this text

Each line typed is sent as an activity: a JSON object as it is, any other text as
{"message": "<text>"}; blank lines are ignored. Received activities are printed as
"<sender>: <content>". Ctrl-D (end of input) or Ctrl-C logs out and exits with status 0, also
while reconnecting. When the server goes away the client logs in again, on the next of the
servers given (-rh/-rp, then --servers), 0.2 s doubling up to 5 s apart. stdout carries only
what was received; status lines (the generated secret, redirects, lost and restored
connections, errors) go to stderr. Exit status: 0 after logging out, 1 on a failure reply or a
lost connection that is not restored, 2 for a bad command line.

Design: one ``Client`` (activitynet.client.library) owns the connection for the whole session,
reconnections included. A ``Session`` runs two threads: the main thread reads stdin and queues
activities; the network thread alone drives the ``Client``: it sends what is queued, prints
what arrives, and calls ``Client.reconnect`` when the server goes away. The queue is guarded by
``Session._lock``, and a pipe wakes the network thread.
"""

import codecs
import collections
import contextlib
import io
import logging
import os
import select
import ssl
import sys
import threading
import time

from .. import cli, protocol
from .library import (ANONYMOUS, FATAL_ERRORS, Client, ClientError, ConnectionLost, ReplyTimeout,
                      error_for, one_line, tls_context)

log = logging.getLogger(__name__)

ALIASES = {"-u": "--username", "-s": "--secret", "-rh": "--remote-host", "-rp": "--remote-port"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOGOUT_WAIT = 1.0  # after LOGOUT, how long to keep printing what is still arriving
PROGRAM = "activitynet.client"


# --- what a person types and reads --------------------------------------------------------------

def activity_from_line(line):
    """The activity to send for one line typed: a JSON object as it is, other text wrapped as
    {"message": text}; None for a blank line."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith("{"):
        try:
            return protocol.decode(stripped.encode(protocol.ENCODING, "surrogatepass"))
        except protocol.InvalidMessage:
            pass  # not JSON, or JSON the servers would refuse (NaN, ...): send it as text
    return {"message": text}


def format_activity(activity):
    """One readable line: the sender, then the content (just the text of a plain message)."""
    if not isinstance(activity, dict):
        return f"?: {one_line(activity)}"
    sender = activity.get("authenticated_user", "?")
    rest = {key: value for key, value in activity.items() if key != "authenticated_user"}
    text = rest.get("message")
    if len(rest) == 1 and isinstance(text, str) and text.isprintable():
        return f"{sender}: {text}"
    return f"{sender}: {one_line(rest)}"


# --- the command line ---------------------------------------------------------------------------

class Options:
    def __init__(self, args):
        self.username = args["--username"]
        self.secret = args["--secret"]
        self.host = args["--remote-host"]
        self.port = remote_port(args["--remote-port"])
        self.servers = [] if args["--servers"] is None else cli.addresses(args["--servers"],
                                                                           "--servers")
        self.tls_ca = args["--tls-ca"]
        self.ssl_context = None
        if args["--tls"] or self.tls_ca is not None:
            self.ssl_context = ssl_context(self.tls_ca)
        self.json = args["--json"]
        self.reconnect = not args["--no-reconnect"]
        self.max_redirects = cli.positive_int(args["--max-redirects"], "--max-redirects", minimum=0)
        self.log_level = args["--log-level"].lower()
        if not self.username:
            raise cli.UsageError("-u/--username must not be empty")
        if self.secret is not None and not self.secret:
            raise cli.UsageError("-s/--secret must not be empty")
        if not self.host.strip():
            raise cli.UsageError("-rh/--remote-host must not be empty")
        if self.log_level not in LOG_LEVELS:
            raise cli.UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                                 f"not {self.log_level!r}")


def remote_port(text):
    try:
        number = cli.port(text, "-rp/--remote-port")
    except cli.UsageError:
        number = 0
    if number == 0:  # 0 means "any free port" to a listener, nothing to a client
        raise cli.UsageError(f"-rp/--remote-port must be a port number from 1 to 65535, not {text!r}")
    return number


def ssl_context(cafile):
    """The TLS context for --tls/--tls-ca; a CA file that cannot be used is a usage error."""
    if cafile is not None and not cafile.strip():
        raise cli.UsageError("--tls-ca must name a file of CA certificates (PEM)")
    try:
        return tls_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        if reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            reason = "it holds no PEM certificate"
        raise cli.UsageError(f"--tls-ca {cafile!r} cannot be used as CA certificates (PEM): "
                             f"{reason}") from None


def parse_options(argv):
    """Options from the command line; None when help was asked for. Raises UsageError."""
    args = cli.parse(__doc__, argv, ALIASES)
    return None if args is None else Options(args)


class Output:
    """Whole lines to stdout and stderr, one writer at a time."""

    def __init__(self, stdout, stderr):
        self.stdout = stdout
        self.stderr = stderr
        self.lock = threading.Lock()

    def lines(self, lines):
        if lines:
            with self.lock:
                self.stdout.write("".join(line + "\n" for line in lines))
                self.stdout.flush()

    def status(self, text):
        with self.lock:
            self.stderr.write(f"{PROGRAM}: {text}\n")
            self.stderr.flush()

    def error(self, text):
        self.status(f"error: {text}")


class Fatal(Exception):
    """End the session with status 1; the message has been printed."""


class Session:
    """The command-line client: see the module docstring's Design paragraph."""

    def __init__(self, options, out):
        self.options = options
        self.out = out
        self.client = Client(options.host, options.port, options.username, options.secret,
                             servers=options.servers, max_redirects=options.max_redirects,
                             ssl_context=options.ssl_context)
        self.result = None
        self._lock = threading.Lock()  # guards _outgoing, _stopping, _woken
        self._outgoing = collections.deque()
        self._stopping = False
        self._woken = False
        self.stop_event = threading.Event()  # set with _stopping, for waits in the network thread
        self.done = threading.Event()  # the network thread has finished
        self._wake_r, self._wake_w = os.pipe()  # wakes the network thread
        self._done_r, self._done_w = os.pipe()  # wakes the main thread
        for fd in (self._wake_w, self._done_w):
            os.set_blocking(fd, False)
        self._shown_redirects = 0

    def run(self, stdin):
        """Start up, then read ``stdin`` until it ends or the session fails; the exit status."""
        network = None
        # Ctrl-C (KeyboardInterrupt) may strike anywhere in here: whatever happens, a client that
        # logged in logs out, by the network thread if it runs, else right here.
        try:
            try:
                self.start()
            except (ClientError, OSError) as exc:
                self.out.error(describe(exc, self.client))
                return 1
            network = threading.Thread(target=self._network, name="network", daemon=True)
            network.start()
            self.read_input(stdin)
        finally:
            self.stop()
            if network is not None and network.ident is not None:
                network.join(LOGOUT_WAIT + 2 * self.client.timeout)
            else:
                if self.client.logged_in:
                    self.client.logout()
                self.client.close()
            if network is None or not network.is_alive():
                self._close_pipes()
        return self.result if self.result is not None else 0

    def start(self):
        o, client = self.options, self.client
        if o.username != ANONYMOUS and o.secret is None:
            client.register()
            self.out.status(f"registered {o.username} with the generated secret {client.secret} "
                            f"(log in again with: -u {o.username} -s {client.secret})")
        client.login()
        self._show_redirects()
        self.out.status(f"logged in as {o.username} at {client.host}:{client.port}")

    # --- main thread -----------------------------------------------------------------------

    def read_input(self, stdin):
        """Queue an activity per line until stdin ends or the network thread finishes."""
        try:
            fd = stdin.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            fd = None
        if fd is None:  # an in-memory stream (tests): it cannot block
            for line in stdin or ():
                if self.done.is_set():
                    return
                self.submit(activity_from_line(line))
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._done_r, select.POLLIN)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            ready = {ready_fd for ready_fd, _ in poller.poll()}
            if self._done_r in ready:
                return
            data = os.read(fd, 65536)
            text = pending + decoder.decode(data, final=not data)
            lines = text.split("\n")
            pending = lines.pop()
            if not data and pending:
                lines.append(pending)
            for line in lines:
                self.submit(activity_from_line(line))
            if not data:
                return

    def submit(self, activity):
        if activity is None:
            return
        with self._lock:
            self._outgoing.append(activity)
            wake = not self._woken
            self._woken = True
        if wake:
            _poke(self._wake_w)

    def stop(self):
        """Ask the network thread to send what is queued, log out and finish."""
        with self._lock:
            self._stopping = True
        self.stop_event.set()
        _poke(self._wake_w)

    # --- network thread --------------------------------------------------------------------

    def _network(self):
        try:
            code = self._serve()
        except Fatal:
            code = 1
        except BrokenPipeError:  # whoever read our stdout has gone; nobody to talk to
            code = 0
        except Exception:
            log.exception("the network thread failed")
            self.out.error("internal error (see the log above)")
            code = 1
        self.client.close()
        self.result = code
        self.done.set()
        _poke(self._done_w)

    def _serve(self):
        client = self.client
        while True:
            with self._lock:
                batch = list(self._outgoing)
                self._outgoing.clear()
                self._woken = False
            lost = False
            if batch:
                try:
                    client.send_activities(batch)
                except ConnectionLost:
                    with self._lock:
                        self._outgoing.extendleft(reversed(batch))  # resent once reconnected
                    lost = True
            with self._lock:
                finished = self._stopping and not self._outgoing
            if finished and not lost:
                self._logout()
                return 0
            if not lost:
                lost = not self._drain()
            if lost:
                with self._lock:
                    stopping = self._stopping
                if stopping or not self._reconnect():
                    self._report_unsent()  # the input has ended: nothing more to wait for
                    return 0
                continue
            poller = select.poll()
            poller.register(client.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            if self._wake_r in {fd for fd, _ in poller.poll()}:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def _drain(self):
        """Print everything received so far; False once the connection has ended."""
        printed = []
        try:
            while True:
                try:
                    message = self.client.recv(timeout=0)
                except FATAL_ERRORS as exc:  # garbage, or a failure following a late REDIRECT
                    self.out.lines(printed)
                    printed = []
                    self.out.error(describe(exc, self.client))
                    raise Fatal from None
                except (ClientError, OSError) as exc:
                    if isinstance(exc, TimeoutError) and not isinstance(exc, ReplyTimeout):
                        return True  # nothing more has arrived
                    log.info("%s", exc)
                    return False
                finally:
                    self._show_redirects()
                if message is None:
                    return False
                self._show(message, printed)
                if len(printed) >= 1000:
                    self.out.lines(printed)
                    printed = []
        finally:
            self.out.lines(printed)

    def _show(self, message, printed):
        if self.options.json:
            printed.append(one_line(message))
        error = error_for(message)
        if error is not None:
            self.out.lines(printed)
            printed.clear()
            self.out.error(describe(error, self.client))
            raise Fatal
        command = message.get("command")
        if command == "ACTIVITY_BROADCAST":
            if not self.options.json:
                printed.append(format_activity(message.get("activity")))
        elif not self.options.json:
            self.out.status(f"the server sent {one_line(message)}")

    def _show_redirects(self):
        for host, port in self.client.redirects[self._shown_redirects:]:
            self.out.status(f"redirected to {host}:{port}")
        self._shown_redirects = len(self.client.redirects)

    def _logout(self):
        """LOGOUT, then print what the server still sends until it closes (briefly)."""
        client = self.client
        client.logout()
        deadline = time.monotonic() + LOGOUT_WAIT
        printed = []
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                message = client.recv(remaining)
                if message is None:
                    break
                with contextlib.suppress(Fatal):
                    self._show(message, printed)
        except (ClientError, OSError):
            pass
        finally:
            self.out.lines(printed)
            client.close()

    def _reconnect(self):
        """Log in again after the connection was lost: True when back, False when stopping."""
        client = self.client
        where = f"{client.host}:{client.port}"
        client.close()
        if not self.options.reconnect:
            self.out.error(f"lost the connection to {where}")
            raise Fatal
        self.out.status(f"lost the connection to {where}; reconnecting")
        try:
            back = client.reconnect(self.stop_event)
        except FATAL_ERRORS as exc:
            self.out.error(describe(exc, client))
            raise Fatal from None
        finally:
            self._show_redirects()
        if back:
            self.out.status(f"reconnected as {client.username} at {client.host}:{client.port}")
        return back

    def _report_unsent(self):
        with self._lock:
            unsent = len(self._outgoing)
        if unsent:
            self.out.error(f"the connection was lost; {unsent} activities were not sent")

    def _close_pipes(self):
        for fd in (self._wake_r, self._wake_w, self._done_r, self._done_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _poke(fd):
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"x")


def describe(exc, client):
    """One line a person can act on; ``client`` says where it happened."""
    if isinstance(exc, ClientError):
        return str(exc)
    where = f"{client.host}:{client.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the certificate of {where} was not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where} failed: {exc.reason or exc} (does it speak TLS on that port?)"
    return f"cannot connect to {where}: {exc.strerror or exc}"


def run(argv, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr):
    """The client command; returns the exit status."""
    out = Output(stdout, stderr)
    options, status = cli.settle(PROGRAM, __doc__, parse_options, argv, stdout, stderr)
    if options is None:
        return status
    logging.getLogger("activitynet.client").setLevel(options.log_level.upper())
    try:
        return Session(options, out).run(stdin)
    except KeyboardInterrupt:  # Ctrl-C: Session.run has logged out on its way out
        return 0


def main():
    # A lone surrogate ("\\ud800" is valid JSON) or a character the terminal cannot show is
    # printed as its escape; in a JSON string that is the same JSON.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s")
    sys.exit(run(sys.argv[1:]))
