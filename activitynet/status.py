"""activitynet status: the network as a tree in the terminal, like IRC's MAP.

Usage:
  activitynet.status [options] [ADDRESS]

ADDRESS is the monitor of any server of the network (its --monitor-port), as HOST:PORT
[default: 127.0.0.1:8222]. One line per server: its client load, links, uptime and the
activities its clients send per second ("?" where neither it nor its monitor is known here).

Options:
  --json          print the network and each server's figures as JSON, for scripts
  --watch         redraw every second until Ctrl-C
  --timeout=SEC   seconds to wait for each answer [default: 3]
  -h --help       show this text

Design: reads the server's /networkz, then the /varz of every server whose monitor address the
network map carries (the others show what the asked server knows of them). Exit status: 0, 1 when
the monitor does not answer, 2 for a usage error.
"""

import dataclasses
import json
import sys
import time
import urllib.error
import urllib.request

from . import cli

DEFAULT_ADDRESS = "127.0.0.1:8222"
CLEAR = "\x1b[H\x1b[2J"


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8222
    json: bool = False
    watch: bool = False
    timeout: float = 3.0


class Unreachable(Exception):
    """The monitor did not answer, or answered something that is not a monitor's answer."""


def parse_settings(argv):
    """Settings from the command line; ``None`` when help was asked for. Raises UsageError."""
    args = cli.parse(__doc__, argv, {})
    if args is None:
        return None
    host, port = split_address(args["ADDRESS"] or DEFAULT_ADDRESS)
    try:
        timeout = float(args["--timeout"])
    except ValueError:
        timeout = 0
    if not 0 < timeout <= 600:
        raise cli.UsageError(f"--timeout must be a number of seconds above 0, not {args['--timeout']!r}")
    return Settings(host=host, port=port, json=args["--json"], watch=args["--watch"], timeout=timeout)


def split_address(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise cli.UsageError(f"ADDRESS must be HOST:PORT (a server's --monitor-port), not {text!r}")
    return host, cli.port(port, "the port of ADDRESS")


def fetch(host, port, path, timeout):
    """The JSON a monitor answers at ``path``; Unreachable says why there is none."""
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url} answered HTTP {exc.code}: is {host}:{port} an activitynet monitor?") from None
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise Unreachable(f"no monitor answers at {host}:{port} ({reason})") from None
    except (OSError, ValueError) as exc:
        raise Unreachable(f"no monitor answers at {host}:{port} ({exc})") from None


def gather(settings):
    """``{"network": /networkz, "varz": {address: /varz or None}}`` for the whole network."""
    network = fetch(settings.host, settings.port, "/networkz", settings.timeout)
    figures = {}
    for server in network["servers"]:
        if server.get("self"):
            figures[server["address"]] = fetch(settings.host, settings.port, "/varz", settings.timeout)
            continue
        monitor = server.get("monitor")
        figures[server["address"]] = None
        if monitor and server.get("alive", True):
            host, _sep, port = monitor.rpartition(":")
            try:
                figures[server["address"]] = fetch(host, int(port), "/varz", settings.timeout)
            except (Unreachable, ValueError):
                pass
    return {"network": network, "varz": figures}


def tree(network):
    """``[(prefix, server)]`` in drawing order: breadth of the map from its root (or the asked
    server), children in address order; parts the root does not reach follow, each from its
    smallest address."""
    servers = {s["address"]: s for s in network["servers"]}
    neighbours = {address: [] for address in servers}
    for link in network["links"]:
        if link["a"] in servers and link["b"] in servers:
            neighbours[link["a"]].append(link["b"])
            neighbours[link["b"]].append(link["a"])
    placed, lines = set(), []

    def walk(address, prefix, child_prefix):
        lines.append((prefix, servers[address]))
        children = [n for n in sorted(neighbours[address]) if n not in placed]
        placed.update(children)
        for number, child in enumerate(children):
            last = number == len(children) - 1
            walk(child, child_prefix + ("└─ " if last else "├─ "), child_prefix + ("   " if last else "│  "))

    root = network.get("root") or network["self"]
    for start in [root] + sorted(servers):
        if start in servers and start not in placed:
            placed.add(start)
            walk(start, "", "")
    return lines


def uptime(seconds):
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def row(server, varz):
    """(load, links, uptime, rate) of one server, from its /varz when known, else from the map."""
    if varz is not None:
        load, up = varz["counts"]["clients"], varz["server"]["uptime_s"]
        rate = varz["rates"]["activities_from_clients_per_s"]
    else:
        load, up, rate = server.get("load"), server.get("uptime_s"), server.get("activities_per_s")
    links = server.get("links", 0)
    return (f"{'?' if load is None else load} clients", f"{links} link{'' if links == 1 else 's'}",
            f"up {uptime(up)}", f"{'?' if rate is None else f'{rate:.1f}'} act/s")


def render(gathered):
    """The MAP as text lines."""
    network, figures = gathered["network"], gathered["varz"]
    lines = tree(network)
    names = [prefix + server["address"] + (" *" if server.get("self") else "")
             + ("" if server.get("alive", True) else " (gone)") for prefix, server in lines]
    rows = [row(server, figures.get(server["address"])) for _prefix, server in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
    name_width = max(map(len, names), default=0)
    seen = "the whole network" if network.get("source") == "network map" else "this server and its neighbours"
    links = len(network["links"])
    out = [f"{len(lines)} servers, {links} link{'' if links == 1 else 's'} ({seen}, asked {network['self']}; * = asked)"]
    for name, cells in zip(names, rows):
        out.append(f"{name:<{name_width}}  " + "  ".join(
            f"{cell:<{width}}" if i in (1, 2) else f"{cell:>{width}}" for i, (cell, width) in enumerate(zip(cells, widths))))
    return out


def show(settings, stdout):
    gathered = gather(settings)
    if settings.json:
        print(json.dumps(gathered, indent=2, sort_keys=True), file=stdout)
    else:
        print("\n".join(render(gathered)), file=stdout)


def run(argv, stdout=sys.stdout, stderr=sys.stderr):
    """The status command; returns the exit code."""
    settings, status = cli.settle("activitynet.status", __doc__, parse_settings, argv, stdout, stderr)
    if settings is None:
        return status
    if not settings.watch:
        try:
            show(settings, stdout)
        except Unreachable as exc:
            print(f"activitynet.status: {exc}", file=stderr)
            return 1
        return 0
    try:
        while True:
            print(CLEAR, end="", file=stdout)
            try:
                show(settings, stdout)
            except Unreachable as exc:  # keep watching: the server may come back
                print(f"activitynet.status: {exc} ({time.strftime('%H:%M:%S')})", file=stdout)
            stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def main():
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
