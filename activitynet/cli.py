"""Command-line plumbing shared by the server and the client.

The Project 1 flags are multi-letter single-dash tokens (``-lp``, ``-rh``). docopt reads those as
bundles of short options (``-rh`` becomes ``-r -h``, which prints the help and exits 0), so the
exact tokens are rewritten to long options *before* docopt sees them. Only whole tokens are
rewritten (``-lp`` and ``-lp=3780``), never substrings of values.
"""

import re

from docopt import DocoptExit, docopt


class UsageError(Exception):
    """A command line a person must fix; the message says how."""


def expand_flags(argv, aliases):
    """Rewrite the exact single-dash aliases in ``argv`` to their long options.

    ``aliases`` maps e.g. ``"-lp"`` to ``"--local-port"``. ``-lp=3780`` becomes
    ``--local-port=3780``. Everything else, values included, is left alone.
    """
    expanded = []
    for token in argv:
        flag, sep, value = token.partition("=")
        if flag in aliases:
            expanded.append(aliases[flag] + sep + value)
        else:
            expanded.append(token)
    return expanded


def parse(usage, argv, aliases):
    """Parse ``argv`` against a docopt ``usage`` text after expanding the Project 1 aliases.

    Returns the docopt dictionary, or ``None`` when help was asked for (the caller prints
    ``usage`` and exits 0). Raises ``UsageError`` for anything docopt rejects.
    """
    argv = expand_flags(argv, aliases)
    if "--help" in argv or "-h" in argv:
        return None
    try:
        return docopt(usage, argv=argv, default_help=False)
    except DocoptExit as exc:
        detail = str(exc).strip().splitlines()
        first = detail[0] if detail else ""
        if first.startswith("Warning: found unmatched"):
            # docopt lists the leftovers as reprs, e.g. [Option(None, '--bogus', 0, True)]
            names = re.findall(r"'([^']*)'", first)
            first = "unrecognised arguments: " + " ".join(names or argv)
        elif first.lower().startswith("usage:") or not first:
            first = "unrecognised arguments: " + " ".join(argv)
        raise UsageError(first) from None


def port(text, option):
    """A TCP port number from the command line (0 asks the system for a free port)."""
    if text is None or not re.fullmatch(r"\d{1,5}", text.strip()):
        raise UsageError(f"{option} must be a port number from 0 to 65535, not {text!r}")
    number = int(text)
    if number > 65535:
        raise UsageError(f"{option} must be a port number from 0 to 65535, not {text!r}")
    return number


def addresses(text, option):
    """A list of (host, port) from ``HOST:PORT[,HOST:PORT...]`` (an IPv6 host in brackets)."""
    found = []
    for item in text.split(","):
        host, colon, number = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host.strip() or not re.fullmatch(r"\d{1,5}", number) \
                or not 0 < int(number) < 65536:
            raise UsageError(f"{option} must be HOST:PORT[,HOST:PORT...] with ports from 1 to "
                             f"65535; {item.strip()!r} is not (in {text!r})")
        found.append((host, int(number)))
    return found


def positive_int(text, option, minimum=1):
    """A whole number of at least ``minimum`` from the command line."""
    if text is None or not re.fullmatch(r"\d+", text.strip()) or int(text) < minimum:
        raise UsageError(f"{option} must be a whole number of at least {minimum}, not {text!r}")
    return int(text)


def settle(program, usage, parser, argv, stdout, stderr):
    """Run ``parser(argv)`` for a command: returns ``(settings, None)``, or ``(None, exit code)``
    after printing the help (0) or a usage error (2) the way both of our commands do."""
    try:
        settings = parser(argv)
    except UsageError as exc:
        print(f"{program}: {exc}\nTry 'python -m {program} --help'.", file=stderr)
        return None, 2
    if settings is None:
        print(usage.split("\nDesign:")[0].strip(), file=stdout)
        return None, 0
    return settings, None
