"""The command line (PROTOCOL.md section 6): the Project 1 flags exactly as markers type them.

docopt would read ``-lp`` as ``-l -p`` and ``-rh`` as ``-r -h`` (help, exit 0), so the exact
Project 1 tokens are rewritten to long options first (``cli.expand_flags``). These tests pin that
mapping, the defaults, the errors a person gets for a bad command line, and the real program
started as ``python -m activitynet.server`` the way a marker starts it.
"""

import io
import os
import select
import signal
import socket
import subprocess
import sys

import pytest

from activitynet import cli, server
from activitynet.server import ALIASES, parse_settings, run
from harness import ROOT, TIMEOUT, LineClient, activity, login, register


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the alias mapping --------------------------------------------------------------------------

def test_project1_tokens_become_long_options():
    """Each Project 1 flag maps to its long option; the values stay where they were."""
    argv = ["-lp", "3780", "-lh", "host", "-rh", "host", "-rp", "3781", "-s", "secret", "-a", "5000"]
    assert cli.expand_flags(argv, ALIASES) == [
        "--local-port", "3780", "--local-host", "host", "--remote-host", "host",
        "--remote-port", "3781", "--secret", "secret", "--activity-interval", "5000"]


def test_equals_form_is_mapped_too():
    """``-lp=3780`` is the same flag as ``-lp 3780``."""
    assert cli.expand_flags(["-lp=3780", "-rh=x"], ALIASES) == ["--local-port=3780", "--remote-host=x"]


def test_only_whole_tokens_are_mapped_never_values():
    """A secret or host that happens to contain '-lp' or look like a flag prefix stays as typed."""
    argv = ["-s", "x-lp", "-lh", "-lpx", "--local-port", "1"]
    assert cli.expand_flags(argv, ALIASES) == ["--secret", "x-lp", "--local-host", "-lpx",
                                               "--local-port", "1"]


# --- parse_settings: what each flag sets ------------------------------------------------------

def test_markers_command_line_sets_every_field():
    """The command line a marker types sets every field it names."""
    settings = parse_settings(
        ["-lp", "3780", "-lh", "host", "-rh", "remote", "-rp", "3781", "-s", "secret", "-a", "5000"])
    assert (settings.local_port, settings.local_host, settings.remote_host, settings.remote_port,
            settings.secret, settings.activity_interval) == (3780, "host", "remote", 3781, "secret", 5000)


def test_rh_is_not_read_as_help():
    """docopt alone would read -rh as -r -h and print the help: the mapping must prevent that."""
    settings = parse_settings(["-rh", "localhost"])
    assert settings is not None and settings.remote_host == "localhost"


def test_equals_form_and_long_forms():
    """Long forms and ``=`` forms work, and so do the extra settings (history, line limit)."""
    settings = parse_settings(["-lp=4000", "--remote-host=r", "--remote-port", "4001", "--secret=s",
                               "--activity-interval", "250", "--history", "7", "--max-line", "100",
                               "--log-level", "DEBUG"])
    assert (settings.local_port, settings.remote_host, settings.remote_port, settings.secret,
            settings.activity_interval, settings.history, settings.max_line, settings.log_level) == \
        (4000, "r", 4001, "s", 250, 7, 100, "debug")


def test_defaults_are_those_of_project1():
    """Section 6: -lp 3780, -lh this machine's address, no -rh (start alone), -rp 3780, no -s
    (a secret is generated later), -a 5000."""
    settings = parse_settings([])
    assert settings.local_port == 3780
    assert settings.local_host == server.default_hostname()
    assert settings.remote_host is None
    assert settings.remote_port == 3780
    assert settings.secret is None
    assert settings.activity_interval == 5000


def test_port_zero_asks_for_a_free_port():
    """``-lp 0`` is allowed: the system picks a free port (the tests rely on it)."""
    assert parse_settings(["-lp", "0"]).local_port == 0


@pytest.mark.parametrize("argv, words", [
    (["-lp", "abc"], ["-lp", "port", "'abc'"]),
    (["-lp", "70000"], ["-lp", "65535", "'70000'"]),
    (["-lp", "-1"], ["-lp", "port"]),
    (["-rp", "x"], ["-rp", "port"]),
    (["-a", "0"], ["-a", "at least 1"]),
    (["-a", "soon"], ["-a", "whole number"]),
    (["-s", ""], ["-s", "empty"]),
    (["-rh", ""], ["-rh", "empty"]),
    (["--log-level", "loud"], ["--log-level", "loud"]),
    (["--max-line", "10"], ["--max-line", "at least"]),
    (["-rh"], ["--remote-host", "requires"]),
    (["-lp"], ["--local-port", "requires"]),
    (["--bogus"], ["--bogus"]),
    (["-x"], ["-x"]),
    (["stray"], ["stray"]),
])
def test_bad_command_lines_name_what_is_wrong(argv, words):
    """A bad command line raises UsageError naming the flag and the bad value."""
    with pytest.raises(cli.UsageError) as caught:
        parse_settings(argv)
    message = str(caught.value)
    for word in words:
        assert word in message, f"{message!r} should mention {word!r}"
    assert "Option(" not in message and "Warning" not in message, \
        f"docopt internals leak into the message: {message!r}"


@pytest.mark.parametrize("argv", [["-lp", "abc"], ["-lp", "70000"], ["--bogus"], ["-rh"]])
def test_run_prints_the_problem_and_returns_non_zero(argv):
    """``run`` turns a UsageError into a message on stderr and a non-zero exit code."""
    out, err = io.StringIO(), io.StringIO()
    assert run(argv, out, err) != 0
    assert out.getvalue() == ""
    assert "activitynet.server:" in err.getvalue() and "--help" in err.getvalue()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_and_returns_zero(flag):
    """``-h``/``--help`` print the usage (listing every Project 1 flag) and exit 0."""
    out, err = io.StringIO(), io.StringIO()
    assert run([flag], out, err) == 0
    text = out.getvalue()
    assert "Usage:" in text
    for alias, option in ALIASES.items():
        assert f"[{alias}]" in text and option in text
    assert err.getvalue() == ""


def test_port_already_in_use_is_a_clear_error():
    """A port another program holds: a one-line message and exit code 1, not a traceback.
    (A subprocess: a successful parse makes ``run`` configure process-wide things.)"""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "activitynet.server", "-lp", str(port), "--bind", "127.0.0.1", "-s", "x"],
            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# --- the real program -------------------------------------------------------------------------

def read_stdout_line(process, timeout=TIMEOUT):
    ready, _, _ = select.select([process.proc.stdout], [], [], timeout)
    assert ready, "nothing printed on stdout"
    return process.proc.stdout.readline().decode()


def test_generated_secret_is_printed_and_is_the_real_one(make_process):
    """No -s: the server makes up a secret and prints it on stdout; another server (here a raw
    socket) authenticates with exactly that text."""
    process = make_process(secret=None)
    line = read_stdout_line(process)
    assert line.startswith("generated secret: ")
    secret = line.split(": ", 1)[1].strip()
    assert len(secret) >= 16
    peer = LineClient(process.port)
    peer.send({"command": "AUTHENTICATE", "secret": secret})
    assert peer.expect("SYNC_USER")["users"] == {}
    peer.close()


def test_marker_style_process_speaks_raw_json_and_stops_on_sigint(make_process):
    """``python -m activitynet.server -lp <port> -lh 127.0.0.1 -s x``, then raw JSON lines as a
    marker's script sends them, then Ctrl-C: exit status 0, promptly, every client closed."""
    port = free_port()
    process = make_process(port=port, secret="x")
    assert process.port == port
    register(port, "marker", "pw").close()
    client = login(port, "marker", "pw")
    activity(client, {"text": "hi"}, "marker", "pw")
    got = client.expect("ACTIVITY_BROADCAST")
    assert got["activity"] == {"text": "hi", "authenticated_user": "marker"}
    peer = LineClient(port)
    peer.send({"command": "AUTHENTICATE", "secret": "x"})
    assert peer.expect("SYNC_USER")["users"] == {"marker": "pw"}

    process.signal(signal.SIGINT)
    assert process.proc.wait(timeout=10) == 0
    client.expect_closed()
    # the link may still carry the load drop (SERVER_ANNOUNCE) caused by the client closing first
    while (message := peer.recv()) is not None:
        assert message["command"] == "SERVER_ANNOUNCE", message
    assert process.proc.stdout.read() == b"", "with -s given, stdout stays silent"
    assert "Traceback" not in process.log_text(), process.log_text()
    assert process.find_log(r"stopped")
