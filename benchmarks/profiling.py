"""``--profile DIR``: sample every server of a scenario with py-spy while it runs.

py-spy (``pip install py-spy``; not a dependency of the project) samples a running process from
outside, which cProfile cannot do for a server whose work happens in one thread per connection.
It is run with ``--gil``: only the thread holding the GIL is sampled, which is the Python work
that limits a server (time spent waiting in ``recv`` or for the GIL is not counted; a profile with
few samples for a busy server means its CPU went to the kernel, e.g. lock or GIL contention, where
``perf`` sees more). Each server gets ``DIR/<scenario>-<server>.txt`` in py-spy's "raw" format (one
line per distinct stack, with its sample count); ``python -m benchmarks.profiling DIR/x.txt``
prints the functions that held the GIL most (self time) and the ones most often on the stack.
"""

import collections
import shutil
import subprocess
import sys
from pathlib import Path

RATE = 250  # samples a second: enough to rank hot spots, cheap enough not to move them


class Profiler:
    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(self.executable).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        self._recorders = []

    def attach(self, scenario, cluster):
        cluster.on_start.append(lambda server: self._record(scenario, server))
        cluster.on_close.append(self._finish)

    def _record(self, scenario, server):
        output = self.directory / f"{scenario}-{server.name}.txt"
        recorder = subprocess.Popen(
            [self.executable, "record", "--pid", str(server.pid), "--rate", str(RATE),
             "--format", "raw", "--output", str(output), "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._recorders.append(recorder)

    def _finish(self):
        for recorder in self._recorders:  # py-spy writes its file once the server has exited
            try:
                recorder.wait(timeout=20)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        self._recorders.clear()


def summarize(path, top=25, out=sys.stdout):
    """Self time and inclusive time per function from a py-spy raw file."""
    own = collections.Counter()
    inclusive = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        own[_short(frames[-1])] += count
        for frame in set(_short(f) for f in frames):
            inclusive[frame] += count
    print(f"{path}: {total} samples", file=out)
    print("self time:", file=out)
    for frame, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}", file=out)
    print("on the stack:", file=out)
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}", file=out)


def _short(frame):
    """'send (activitynet/connection.py:171)' -> 'send (connection.py)'; line numbers dropped so
    a function's samples add up."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        summarize(argument)
