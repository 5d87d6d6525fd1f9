"""What the benchmarks share: fresh subprocesses, timing, memory, the machine, growth and formats.

Memory is measured with ``tracemalloc``: the peak of the Python heap during one measured call.
``ru_maxrss`` was the other candidate and is kept only as context (``max_rss_kib``), because
(a) it cannot be reset, so it includes everything the process did before the measured call
(defining thousands of domains, the set-up sync), and (b) libvirt's test driver runs inside the
measuring process, so its domain objects, which on a real host live in libvirtd and not in the
minion, would count as the minion's memory. ``tracemalloc`` sees exactly the objects the
measured code creates (libvirt-python's results included); it does not see C-level allocations
(SQLite's page cache, libvirt's own buffers), which are bounded and the same for every
implementation. It slows allocation down, so it gets a run of its own, never a timed one.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parent.parent

# Generous: the largest measurement takes seconds; a hung libvirt call should not hang the run.
SUBPROCESS_TIMEOUT = 900


def in_subprocess(function: Callable[..., dict], **kwargs) -> dict:
    """``function(**kwargs)`` run in a fresh Python process; its JSON result.

    A fresh process per measured implementation keeps one implementation's heap, caches and
    libvirt test-driver state (``test:///default`` lives in the process) out of another's
    figures. ``function`` must be a module-level function of an importable module, taking and
    returning JSON-serialisable values. The child adds ``max_rss_kib`` to its result.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code = "import sys; from bench.harness import child_main; child_main(sys.argv[1:])"
        target = f"{function.__module__}:{function.__qualname__}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs), str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{target}(**{kwargs}) failed with exit code {proc.returncode}:\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def child_main(argv: Sequence[str]) -> None:
    """The child side of ``in_subprocess``: ``module:function``, JSON kwargs, output path."""
    target, kwargs, out = argv
    module, name = target.split(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs))
    result["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps(result))


def best_of(repeats: int, budget: float, setup: Callable[[], AbstractContextManager],
            call: Callable[[object], dict]) -> dict:
    """Measure ``call(x)``, each run inside its own ``with setup() as x`` (which is not timed).

    Time is the best of up to ``repeats`` runs (the run least disturbed by the rest of the
    machine); no further run starts once the runs have taken ``budget`` seconds, so a slow
    baseline does not stretch the whole benchmark. Memory is the tracemalloc peak of one more
    run. ``work`` is what the best timed call returned, so a report can show that the
    implementations compared did the same job, and a call can return its own finer timings
    (they then belong to the run whose time is reported).
    """
    runs: list[float] = []
    work: dict = {}
    while len(runs) < repeats and sum(runs) < budget:
        with setup() as arg:
            started = time.perf_counter()
            result = call(arg)
            runs.append(time.perf_counter() - started)
        if runs[-1] == min(runs):
            work = result
    with setup() as arg:
        tracemalloc.start()
        try:
            call(arg)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return {"seconds": min(runs), "runs": runs, "peak_bytes": peak, "work": work}


def growth(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """The exponent k of a least-squares fit ``value ~ size**k``; None with fewer than 2 sizes.

    k = 1 is linear growth, k = 2 quadratic: a summary of how a cost scales with N.
    """
    if len(sizes) < 2:
        return None
    xs, ys = [math.log(x) for x in sizes], [math.log(y) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def machine(scratch: Path) -> dict[str, object]:
    """The machine and software the figures come from, for the report's header."""
    cpu = _first_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    mem_kib = int((_first_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    version = libvirt.getVersion()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "libvirt": f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}",
        "libvirt_python": importlib.metadata.version("libvirt-python"),
        "scratch_filesystem": _filesystem(scratch),
        "commit": _git_describe(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine(info: dict[str, object]) -> str:
    """One line for a report: what ran the benchmarks."""
    return (f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM · {info['os']} · "
            f"Python {info['python']} · libvirt {info['libvirt']} (libvirt-python "
            f"{info['libvirt_python']}) · scratch on {info['scratch_filesystem']} · "
            f"vmpower {info['commit']} · {info['date']}")


def _first_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file, if there is one."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _filesystem(path: Path) -> str:
    """The filesystem type holding ``path``: SQLite's fsync costs nothing on tmpfs, so say it."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, mountpoint, fstype = line.split()[:3]
                if Path(mountpoint) in (path, *path.parents) and len(mountpoint) > len(best):
                    best, kind = mountpoint, fstype
    except OSError:
        pass
    return kind


def _git_describe() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclasses.dataclass(frozen=True)
class FloorRow:
    """One row of the table of every part against its floor: what no implementation can beat.

    ``vmpower`` and ``floor`` are in ``unit`` ("s", "B", "jobs", "commits"...); the floor is
    measured in the same run, or is a stated budget or bound (``floor_is`` says which).
    ``target`` is the most ``ratio`` may be (None: a context row, reported beside the targets,
    such as a Nova-style baseline against the same floor). ``note`` says why a row is not
    judged: a figure not measured (``vmpower`` or ``floor`` None) or a run smaller than the
    target's size (``judged`` False).
    """

    part: int
    measured: str
    vmpower: float | None
    floor: float | None
    floor_is: str
    target: float | None
    unit: str
    judged: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """vmpower ÷ floor; None if either was not measured."""
        if self.vmpower is None or not self.floor:
            return None
        return self.vmpower / self.floor

    @property
    def met(self) -> bool | None:
        """ratio ≤ target; None when there is no target, no ratio, or the run was not at the
        target's size."""
        if self.target is None or self.ratio is None or not self.judged:
            return None
        return self.ratio <= self.target

    def as_dict(self) -> dict:
        """The row for latest.json, with its ratio and verdict."""
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def quantity(value: float | None, unit: str) -> str:
    """A figure of a ``FloorRow`` in its unit, for a report."""
    if value is None:
        return "not measured"
    if unit == "s":
        return f"{value * 1e6:.3g} µs" if value < 1e-4 else seconds(value)
    if unit == "B":
        return mebibytes(value)
    return f"{value:,.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


# Formatting for the markdown reports
def seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def mebibytes(value: float) -> str:
    return f"{value / 2**20:.3g} MiB"


def ratio(value: float) -> str:
    return f"{value:.3g}×"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
