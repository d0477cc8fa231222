"""The benchmark suite, at its smallest: every scenario runs and its delivery checks hold.

No figure is compared with its target here: CI machines are too different and too busy for that
(``make bench`` is where targets are judged). What is checked is that each scenario starts its
servers, drives them and stops them, and that every client received every activity once and in
order; and that the instrument itself (``Tally``) notices loss, duplicates and reordering.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives at the root and is not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import plots  # noqa: E402
from benchmarks.__main__ import parse  # noqa: E402
from benchmarks.report import Row, Target, table  # noqa: E402
from benchmarks.scenarios import SCENARIOS  # noqa: E402
from benchmarks.streams import Tally, activity  # noqa: E402

from activitynet import protocol  # noqa: E402

SMOKE_TIMEOUT = 240


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``python -m benchmarks --smoke`` run, as ``make bench-short`` would start it."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out)]
    if plots.available():  # the curves are drawn only where matplotlib is installed
        command += ["--plots", str(out.parent / "plots")]
    proc = subprocess.Popen(command,
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=SMOKE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and every server it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"the smoke benchmark did not finish in {SMOKE_TIMEOUT} s:\n{stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{stdout}\n{stderr[-3000:]}"
    return proc.returncode, stdout, stderr, json.loads(out.read_text()), out.parent / "plots"


def test_smoke_run_completes(smoke):
    code, stdout, stderr, results, _plots = smoke
    assert results["errors"] == {}, results["errors"]
    assert code == 0, f"{stdout}\n{stderr[-3000:]}"
    assert "scenario" in stdout and "lost, duplicated or reordered" in stdout
    assert results["size"] == "smoke"
    assert results["machine"]["nproc"] >= 1


@pytest.mark.parametrize("name", [name for name, s in SCENARIOS.items() if "smoke" in s.sizes])
def test_scenario_checks_hold(smoke, name):
    """Every scenario with smoke sizes (tls-chain has none: test_tls_live.py covers it)."""
    _code, _stdout, _stderr, results, _plots = smoke
    rows = [row for row in results["rows"] if row["scenario"] == name]
    assert rows, f"{name} reported nothing"
    assert not any(row["figure"].startswith("did not complete") for row in rows), rows
    checks = [row for row in rows if row["check"]]
    assert checks, f"{name} checked nothing"
    for row in checks:
        assert row["passed"] is True, (row, results["details"].get(name))
    # every scenario reports its figures and the memory of its servers
    assert any(row["target"] for row in rows if row not in checks), rows
    assert any(row["figure"].startswith("peak RSS") and row["value"] > 0 for row in rows), rows


def test_every_curve_is_measured_and_drawn_where_matplotlib_is(smoke):
    """Each scaling curve leaves its points; with matplotlib installed each becomes a PNG."""
    _code, _stdout, _stderr, results, directory = smoke
    curves = {name: d["curve"] for name, d in results["details"].items() if "curve" in d}
    assert set(curves) == {name for name in SCENARIOS if name.startswith("curve-")}
    for spec in curves.values():
        assert spec["x"] and all(len(ys) == len(spec["x"]) for ys in spec["series"].values()), spec
    if not plots.available():
        pytest.skip("matplotlib is not installed (make bench installs it): nothing drawn")
    for spec in curves.values():
        png = directory / spec["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_curves_are_left_out_of_the_short_run():
    assert not any(name.startswith("curve-") for name in parse(["--short"]).names)
    assert "curve-senders" in parse([]).names
    with pytest.raises(Exception, match="only run with the full sizes"):
        parse(["--short", "--only", "curve-senders"])


def test_only_and_list_are_checked():
    assert parse(["--only", "fan-out,recovery"]).names == ["fan-out", "recovery"]
    assert parse(["--short"]).size == "short"
    with pytest.raises(Exception, match="unknown scenario"):
        parse(["--only", "no-such-scenario"])


def _lines(numbers, sender="anonymous"):
    return b"".join(protocol.encode(protocol.activity_broadcast(
        {**activity(n), "authenticated_user": sender}, f"0123456789abcdef:{n + 1}")) for n in numbers)


def test_tally_accepts_a_whole_ordered_stream_in_any_chunking():
    data = _lines(range(1000))
    tally = Tally("t", 1000, latencies=True)
    for start in range(0, len(data), 777):  # chunks that split lines anywhere
        tally.feed(data[start:start + 777], 1.0)
    assert (tally.received, tally.errors, tally.done) == (1000, 0, True)
    assert len(tally.latencies) == 1000


@pytest.mark.parametrize("numbers, lost, extra, duplicates, out_of_order", [
    ([0, 1, 3, 4], 1, 0, 0, 0),
    ([0, 1, 1, 2, 3, 4], 0, 0, 1, 0),
    ([0, 2, 1, 3, 4], 0, 0, 0, 1),
    ([0, 1, 2, 3, 4, 2], 0, 0, 1, 0),
    ([4, 3, 2, 1, 0], 0, 0, 0, 4),
    ([0, 1, 2, 3, 4, 5], 0, 1, 0, 0),
])
def test_tally_counts_what_went_wrong(numbers, lost, extra, duplicates, out_of_order):
    tally = Tally("t", 5)
    tally.feed(_lines(numbers), 1.0)
    assert (tally.lost, tally.extra, tally.duplicates, tally.out_of_order) == \
        (lost, extra, duplicates, out_of_order)
    assert tally.errors == lost + extra + duplicates + out_of_order


def test_tally_parses_anything_else_and_counts_it():
    tally = Tally("t", 2)
    tally.feed(_lines([0]) + b'{"command":"REDIRECT","hostname":"h","port":1}\n' + _lines([1]), 1.0)
    assert (tally.received, tally.unexpected, tally.lost) == (2, 1, 0)
    assert "REDIRECT" in tally.unexpected_lines[0]


def test_table_shows_verdicts():
    rows = [Row("s", "throughput", 25_000, "activities/s", Target(">=", 21_000)),
            Row("s", "p99 latency", 7.5, "ms", Target("<", 5)),
            Row("s", "peak RSS", 30.2, "MB")]
    text = table(rows)
    assert "25,000" in text and ">= 21,000" in text and "pass" in text and "FAIL" in text
