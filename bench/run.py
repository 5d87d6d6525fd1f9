"""Run every benchmark in bench/ and publish the results.

    .venv/bin/python bench/run.py            # every size: a few minutes on 2 cores
    .venv/bin/python bench/run.py --smoke    # the smallest size of each, in seconds (CI)

Writes ``latest.json`` (every figure), ``latest.md`` (tables with ratios and targets, and the
machine they came from) and ``latest.png`` (the plots) into ``bench/results/``, or ``--out``.
What makes a module of bench/ a benchmark is described in ``bench/__init__.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
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
BENCHMARK_API = ("PART", "TITLE", "run", "markdown", "plot")


def discover(only: Sequence[str] = ()) -> list[ModuleType]:
    """The benchmark modules of bench/ (all, or those named in ``only``), in the order of
    their ``PART`` numbers."""
    found = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name in ("run", "harness") or (only and info.name not in only):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if all(hasattr(module, name) for name in BENCHMARK_API):
            found.append(module)
    missing = set(only) - {short_name(module) for module in found}
    if missing:
        raise SystemExit(f"no benchmark named {', '.join(sorted(missing))} in bench/")
    return sorted(found, key=lambda module: module.PART)


def short_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def write_json(path: Path, machine: dict, smoke: bool, results: dict[str, dict]) -> None:
    path.write_text(json.dumps({"machine": machine, "smoke": smoke, "benchmarks": results},
                               indent=2) + "\n")


def write_markdown(path: Path, machine: dict, command: str, smoke: bool,
                   modules: list[ModuleType], results: dict[str, dict]) -> None:
    parts = ["# vmpower benchmarks",
             f"Machine: {harness.describe_machine(machine)}",
             f"Command: `{command}`"
             + (" (smoke run: smallest size only, not a measurement to quote)" if smoke else "")]
    parts += [module.markdown(results[short_name(module)]) for module in modules]
    path.write_text("\n\n".join(parts) + "\n")


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
                        help=f"where to write latest.json/.md/.png (default {RESULTS})")
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
    write_json(args.out / "latest.json", machine, args.smoke, results)
    command = " ".join([".venv/bin/python bench/run.py", *argv])
    write_markdown(args.out / "latest.md", machine, command, args.smoke, modules, results)
    write_plot(args.out / "latest.png", machine, modules, results)
    print((args.out / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
