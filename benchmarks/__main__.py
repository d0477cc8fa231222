"""Run the activitynet benchmarks and print one table of results.

Usage:
  python -m benchmarks [--short | --smoke] [--json PATH] [--only NAME]... [--strict]
                       [--profile DIR] [--plots DIR]
  python -m benchmarks --list

Options:
  --short        smaller streams, the same targets, no scaling curves: under two minutes
  --smoke        the smallest version of every scenario, seconds each (what CI runs; its
                 figures mean nothing, only the correctness checks do)
  --json PATH    also write the table as JSON [default: bench-results.json]
  --only NAME    run only this scenario (repeat for several, or separate names with commas)
  --strict       exit 1 when a figure misses its target too (not only when a check fails)
  --profile DIR  sample every server with py-spy while it runs (needs: pip install py-spy)
  --plots DIR    draw the scaling curves as PNG files there (needs matplotlib: pip install
                 '.[bench]'); the full run draws them into benchmarks/plots/ by default
  --list         list the scenarios and exit
  -h --help      show this text

Exit status: 0 when every scenario ran and delivered every activity once and in order, 1 when
one did not (or, with --strict, missed a target), 2 for a bad command line.
"""

import argparse
import shlex
import signal
import sys
import time

from .report import (MachineShare, Progress, Row, format_number, load_average, notes, table,
                     write_json)
from . import durable  # noqa: F401  (registers the durable-store scenarios)
from . import plots
from .scenarios import SCENARIOS, Context


class _Parser(argparse.ArgumentParser):
    def format_help(self):
        return __doc__

    def error(self, message):
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def parse(argv):
    parser = _Parser(prog="python -m benchmarks", add_help=True)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--short", dest="size", action="store_const", const="short")
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke")
    parser.add_argument("--json", default="bench-results.json")
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--profile")
    parser.add_argument("--plots")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    args.size = args.size or "full"
    names = [n.strip() for part in args.only for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise _UsageError(f"unknown scenario {', '.join(unknown)} (try --list)")
    full_only = [n for n in names if args.size not in SCENARIOS[n].sizes]
    if full_only:
        raise _UsageError(f"{', '.join(full_only)} only run with the full sizes (drop --{args.size})")
    args.names = names or [n for n, s in SCENARIOS.items() if args.size in s.sizes]
    if args.plots is None and args.size == "full":
        args.plots = str(plots.DEFAULT_DIR)
    return args


def _size(value):
    return "/".join(f"{v:,}" for v in value) if isinstance(value, list) else f"{value:,}"


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every scenario's cleanup, like Ctrl-C


def run(argv, stdout=sys.stdout, stderr=sys.stderr):
    """The benchmark command; returns the exit status."""
    try:
        args = parse(argv)
    except _UsageError as exc:
        print(f"python -m benchmarks: {exc}\nTry 'python -m benchmarks --help'.", file=stderr)
        return 2
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:22} {scenario.description}", file=stdout)
        return 0
    profiler = None
    if args.profile:
        from .profiling import Profiler
        profiler = Profiler(args.profile)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = "python -m benchmarks " + shlex.join(argv) if argv else "python -m benchmarks"
    started = time.time()
    load = load_average()
    share = MachineShare()
    progress = Progress(stderr)
    rows, errors = [], {}
    details = {}
    try:
        for name in args.names:
            scenario = SCENARIOS[name]
            sizes = scenario.sizes[args.size]
            ctx = Context(name, progress, profiler)
            progress.begin(name, f"{scenario.description} ({', '.join(f'{k}={_size(v)}' for k, v in sizes.items())})")
            try:
                scenario.run(ctx, **sizes)
            except Exception as exc:  # noqa: BLE001
                # One broken scenario must not hide the others' results; it fails the run.
                errors[name] = f"{type(exc).__name__}: {exc}"
                ctx.rows.append(Row(name, f"did not complete: {type(exc).__name__}", None, "", None,
                                    str(exc)[:200]))
                progress.end(f"FAILED: {exc}")
            else:
                progress.end("; ".join(f"{r.figure}: {format_number(r.value)} {r.unit} {r.verdict}"
                                       for r in ctx.rows if r.target is not None))
            rows += ctx.finish(failed=name in errors)
            details[name] = ctx.details
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=stderr)
        errors["interrupted"] = "KeyboardInterrupt"
    print(table(rows), file=stdout)
    if notes(rows):
        print("notes:\n" + "\n".join(notes(rows)), file=stdout)
    failed_checks = [r for r in rows if r.check and r.passed is False]
    missed = [r for r in rows if r.passed is False and r not in failed_checks]
    others = share.others()
    print(f"{sum(r.passed is True for r in rows)} targets met, {len(missed)} missed, "
          f"{len(failed_checks)} checks failed, {len(errors)} scenarios did not complete "
          f"({args.size} sizes, {time.time() - started:.0f} s"
          + (f"; other processes used {others:.0%} of the CPU meanwhile)" if others is not None else ")"),
          file=stdout)
    if args.plots and any("curve" in d for d in details.values()):
        if plots.available():
            written = plots.draw(details, args.plots, subtitle=f"{args.size} sizes, {time.strftime('%Y-%m-%d')}")
            print(f"plots: {', '.join(str(p) for p in written)}", file=stdout)
        else:
            print("plots: not drawn, matplotlib is not installed (pip install '.[bench]', as make bench "
                  "does)", file=stdout)
    if args.json:
        write_json(args.json, rows, command=command, size=args.size, started=started,
                   errors=errors, details=details, load=load, others=others)
        print(f"written to {args.json}", file=stdout)
    if errors or failed_checks or (args.strict and missed):
        return 1
    return 0


def main():
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
