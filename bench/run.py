"""Run every benchmark in bench/ and publish the results.

    .venv/bin/python bench/run.py            # every size: a few minutes on 2 cores
    .venv/bin/python bench/run.py --smoke    # the smallest size of each, in seconds (CI)

Writes ``latest.json`` (every figure), ``latest.md`` (tables with ratios and targets, and the
machine they came from), ``latest.png`` (the plots) and ``against_floor.png`` (every part's
ratio to its floor, with its target) into ``bench/results/``, or ``--out``. ``latest.md``
and ``latest.json`` begin with one table of every part against its floor.
What makes a module of bench/ a benchmark is described in ``bench/__init__.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")  # files only, no display: also on a headless CI runner
import matplotlib.pyplot as plt

import bench
from bench import harness

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARK_API = ("PART", "TITLE", "run", "markdown", "plot", "against_floor")


def discover(only: Sequence[str] = ()) -> list[ModuleType]:
    """The benchmark modules of bench/ (all, or those named in ``only``), in the order of
    their ``PART`` numbers."""
    found = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name in ("run", "harness") or (only and info.name not in only):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if not hasattr(module, "PART"):
            continue  # not a benchmark (simulate.py)
        lacking = [name for name in BENCHMARK_API if not hasattr(module, name)]
        if lacking:  # a part left out of the table silently would look like a part that passed
            raise SystemExit(f"bench/{info.name}.py has a PART but no {', '.join(lacking)}")
        found.append(module)
    missing = set(only) - {short_name(module) for module in found}
    if missing:
        raise SystemExit(f"no benchmark named {', '.join(sorted(missing))} in bench/")
    return sorted(found, key=lambda module: module.PART)


def short_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def floor_rows(modules: list[ModuleType], results: dict[str, dict]) -> list[harness.FloorRow]:
    """Every part's rows against its floor, in the order of the parts."""
    return [row for module in modules for row in module.against_floor(results[short_name(module)])]


def write_json(path: Path, machine: dict, smoke: bool, results: dict[str, dict],
               rows: Sequence[harness.FloorRow] = ()) -> None:
    path.write_text(json.dumps({"machine": machine, "smoke": smoke,
                                "against_floor": [row.as_dict() for row in rows],
                                "benchmarks": results}, indent=2) + "\n")


VERDICT = {True: "met", False: "**not met**"}


def floor_table(machine: dict, rows: Sequence[harness.FloorRow]) -> str:
    """The section "Against the floor": one row per figure, its floor beside it, the ratio,
    the target and whether it is met."""
    cells = []
    for row in rows:
        verdict = (VERDICT[row.met] if row.met is not None else
                   row.note or ("context, no target" if row.target is None else "not judged"))
        cells.append([row.part, row.measured, harness.quantity(row.vmpower, row.unit),
                      f"{harness.quantity(row.floor, row.unit)} ({row.floor_is})",
                      "" if row.ratio is None else harness.ratio(row.ratio),
                      "" if row.target is None else f"≤ {row.target:g}×", verdict])
    met = [row.met for row in rows if row.met is not None]
    return "\n\n".join([
        "## Against the floor",
        (f"Measured {str(machine['date'])[:10]} on {harness.describe_machine(machine)}. The floor is "
         f"what no implementation can do with less (measured in the same run), or a stated "
         f"budget or bound; ratio = vmpower ÷ floor. Rows without a target are context. "
         f"Targets met: {sum(met)} of {len(met)} judged."),
        harness.table(["part", "measured", "vmpower", "floor", "ratio", "target", "verdict"], cells),
    ])


def write_markdown(path: Path, machine: dict, command: str, smoke: bool,
                   modules: list[ModuleType], results: dict[str, dict],
                   rows: Sequence[harness.FloorRow] = ()) -> None:
    parts = ["# vmpower benchmarks",
             f"Machine: {harness.describe_machine(machine)}",
             f"Command: `{command}`"
             + (" (smoke run: smallest size only, not a measurement to quote)" if smoke else ""),
             floor_table(machine, rows)]
    parts += [module.markdown(results[short_name(module)]) for module in modules]
    path.write_text("\n\n".join(parts) + "\n")


def write_floor_plot(path: Path, machine: dict, rows: Sequence[harness.FloorRow]) -> None:
    """Horizontal bars of each ratio to its floor, the target marked on each bar's line."""
    shown = [row for row in rows if row.ratio is not None]
    figure, axes = plt.subplots(figsize=(11, 1.2 + 0.45 * max(1, len(shown))), layout="constrained")
    colours = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    positions = range(len(shown))
    # From 1 (vmpower = its floor) to the ratio: a bar left of 1 is a figure below its floor.
    bars = axes.barh(positions, [row.ratio - 1 for row in shown], left=1,
                     color=[colours[row.met] for row in shown])
    axes.bar_label(bars, labels=[harness.ratio(row.ratio) for row in shown], fontsize=7, padding=3)
    targets = [(position, row.target) for position, row in zip(positions, shown) if row.target]
    if targets:
        axes.scatter([target for _, target in targets], [position for position, _ in targets],
                     marker="|", s=400, linewidths=3, color="k", zorder=3, label="target")
        axes.legend(loc="lower right")
    axes.axvline(1.0, color="k", linewidth=0.8)
    axes.set_yticks(list(positions), [f"{row.part}. {row.measured}" for row in shown], fontsize=8)
    axes.invert_yaxis()  # the table's order, top to bottom
    axes.set_xscale("log")
    if shown:  # room for the labels beside the shortest and the longest bar
        ratios = [row.ratio for row in shown] + [row.target for row in shown if row.target]
        axes.set_xlim(min(0.5, min(ratios) / 2), max(2.0, max(ratios) * 2))
    axes.set_xlabel("vmpower ÷ floor (green: target met, red: not met, grey: context or not judged)")
    axes.grid(True, axis="x", which="both", alpha=0.3)
    axes.set_title(f"Against the floor, {str(machine['date'])[:10]}")
    figure.supxlabel(textwrap.fill(harness.describe_machine(machine), 160), fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plot(path: Path, machine: dict, modules: list[ModuleType], results: dict[str, dict]) -> None:
    figure = plt.figure(figsize=(12, 5 * len(modules)), layout="constrained")
    for module, subfigure in zip(modules, figure.subfigures(len(modules), 1, squeeze=False)[:, 0]):
        module.plot(results[short_name(module)], subfigure)
    figure.supxlabel(harness.describe_machine(machine), fontsize=7)  # laid out below, no overlap
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="run the smallest size of each benchmark only, quickly")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"where to write latest.json/.md/.png and against_floor.png "
                             f"(default {RESULTS})")
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME",
                        help="run only these benchmarks (module names, e.g. sync_scale)")
    args = parser.parse_args(argv)

    modules = discover(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    # Scratch files (SQLite stores) go on the results' filesystem, not a /tmp that may be tmpfs,
    # where fsync is free; the name matches .gitignore's bench/results/*.tmp.
    with tempfile.TemporaryDirectory(dir=args.out, suffix=".tmp") as scratch:
        machine = harness.machine(Path(scratch))
        results = {short_name(module): module.run(smoke=args.smoke, scratch=Path(scratch))
                   for module in modules}
    rows = floor_rows(modules, results)
    write_json(args.out / "latest.json", machine, args.smoke, results, rows)
    command = " ".join([".venv/bin/python bench/run.py", *argv])
    write_markdown(args.out / "latest.md", machine, command, args.smoke, modules, results, rows)
    write_plot(args.out / "latest.png", machine, modules, results)
    write_floor_plot(args.out / "against_floor.png", machine, rows)
    print((args.out / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
