"""What a benchmark run produces: rows of (scenario, figure, value, unit, target, pass/fail), one
table on stdout, the same rows as JSON, and a progress line on stderr while a scenario runs."""

import dataclasses
import json
import math
import operator
import os
import platform
import sys
import time

_OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


@dataclasses.dataclass
class Target:
    """``value <op> bound``, e.g. Target(">=", 21000)."""

    op: str
    bound: float

    def met_by(self, value):
        return value is not None and _OPERATORS[self.op](value, self.bound)

    def __str__(self):
        return f"{self.op} {format_number(self.bound)}"


@dataclasses.dataclass
class Row:
    scenario: str
    figure: str
    value: float | None
    unit: str
    target: Target | None = None
    note: str = ""
    check: bool = False  # a correctness check (nothing lost, ...), not a performance figure

    @property
    def passed(self):
        """True/False against the target; None for figures reported without one."""
        return None if self.target is None else self.target.met_by(self.value)

    @property
    def verdict(self):
        return {True: "pass", False: "FAIL", None: ""}[self.passed]

    def as_json(self):
        return {"scenario": self.scenario, "figure": self.figure, "value": self.value,
                "unit": self.unit, "target": str(self.target) if self.target else None,
                "passed": self.passed, "check": self.check, "note": self.note}


def format_number(value):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


HEADERS = ("scenario", "figure", "value", "unit", "target", "result")


def table(rows):
    """The rows as one plain-text table (also valid as an reStructuredText simple table)."""
    cells = [HEADERS] + [(r.scenario, r.figure, format_number(r.value), r.unit,
                          str(r.target) if r.target else "", r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    rule = "  ".join("=" * w for w in widths)
    right = {2}  # numbers line up on the right

    def line(row):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    out = [rule, line(cells[0]), rule]
    out += [line(row) for row in cells[1:]]
    out.append(rule)
    return "\n".join(out)


def notes(rows):
    """The rows' notes, as lines to print under the table."""
    return [f"  {r.scenario}, {r.figure.strip()}: {r.note}" for r in rows if r.note]


def machine():
    """What the numbers were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release()}


def revision():
    """The commit measured (``-dirty`` when the work tree had changes), or None outside git."""
    import subprocess
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.dirname(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class MachineShare:
    """How much of the machine's CPU other processes took while the suite ran: every figure here
    is measured on cores shared with them. Busy time from /proc/stat, less this process's and its
    (reaped) children's, the servers."""

    def __init__(self):
        self._busy = _busy_seconds()
        self._ours = _our_cpu_seconds()
        self._wall = time.monotonic()

    def others(self):
        """Fraction (0..1) of all cores used by other processes since the start, or None."""
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.monotonic() - self._wall
        others = (busy - self._busy) - (_our_cpu_seconds() - self._ours)
        return max(0.0, min(1.0, others / (wall * (os.cpu_count() or 1))))


def _busy_seconds():
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_cpu_seconds():
    import resource
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def load_average():
    """The 1-minute load average: other work on the machine moves every figure."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_json(path, rows, *, command, size, started, errors, details=None, load=None,
               others=None):
    document = {
        "command": command,
        "size": size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
        "revision": revision(),
        "load_average": {"start": load, "end": load_average()},
        "cpu_used_by_other_processes": None if others is None else round(others, 3),
        "errors": errors,
        "rows": [row.as_json() for row in rows],
        "details": details or {},
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


class Progress:
    """One status line on stderr, rewritten in place on a terminal, printed every few seconds
    otherwise (a log file should not fill up with carriage returns)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.scenario = None
        self._last = 0.0
        self._started = 0.0
        self._width = 0

    def begin(self, scenario, description):
        self.scenario = scenario
        self._started = time.monotonic()
        self._last = 0.0
        self._print(f"[{scenario}] {description}", final=True)

    def update(self, text, force=False):
        now = time.monotonic()
        every = 0.25 if self.tty else 5.0
        if not force and now - self._last < every:
            return
        self._last = now
        self._print(f"[{self.scenario}] {now - self._started:5.1f} s  {text}", final=not self.tty)

    def end(self, text):
        self._print(f"[{self.scenario}] done in {time.monotonic() - self._started:.1f} s: {text}",
                    final=True)

    def _print(self, text, final):
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class QuietProgress(Progress):
    def _print(self, text, final):
        pass


def rst(document):
    """The results part of BENCHMARKS.rst from a JSON results file (``python -m benchmarks.report
    FILE``): the machine, the command, the table and its notes."""
    m = document["machine"]
    rows = [Row(r["scenario"], r["figure"], r["value"], r["unit"],
                _parse_target(r["target"]), r["note"] or "", r.get("check", False))
            for r in document["rows"]]
    others = document.get("cpu_used_by_other_processes")
    lines = [
        f"Measured {document['started']} at revision {document.get('revision')} with "
        f"``{document['command']}`` ({document['size']} sizes, "
        f"{document['seconds']:.0f} s), on {m['nproc']} x {m['cpu']}, {m['implementation']} "
        f"{m['python']}, Linux {m['kernel']}"
        + (f"; other processes used {others:.0%} of the machine's CPU meanwhile." if others is not None
           else "."),
        "",
        table(rows),
    ]
    if notes(rows):
        lines += ["", "Notes:", ""] + [f"- {line.strip()}" for line in notes(rows)]
    return "\n".join(lines)


def _parse_target(text):
    if not text:
        return None
    op, bound = text.split(" ", 1)
    bound = float(bound.replace(",", ""))
    return Target(op, int(bound) if bound.is_integer() else bound)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        with open(argument) as f:
            print(rst(json.load(f)))
