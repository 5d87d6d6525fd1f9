"""Part 5: a sync through a real libvirtd's socket, against the Nova-style baseline.

Part 1 (``bench/sync_scale.py``) runs libvirt's test driver inside the measuring process, where
a lookup costs a function call. Here the same scenario, the same implementations and the same
checks of the work done run against ``test+unix:///default``: the test driver hosted by a real
libvirtd (started through ``vmpower_lab``), so every libvirt
call is a round trip over libvirtd's UNIX socket, as on a real host. vmpower makes one bulk
listing whatever N is; the Nova-style baseline makes a lookup and an ``info()`` per VM (and a
commit per row), so the gap widens with the round trips.

Needs root (it starts libvirtd). Where another libvirtd of the tests runs, run it in a lane of
its own (``bash scripts/lane.sh ROOT ...``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import harness, sync_scale

PART = 5
TITLE = "Sync through a real libvirtd socket"

URI = "test+unix:///default"
SIZES = (1_000, 10_000)
SMOKE_SIZES = (200,)  # not 100: part 1's smoke table is found by its "| 100 |" rows
TARGET_N = 10_000
IMPLEMENTATIONS = (sync_scale.VMPOWER, sync_scale.NOVA, sync_scale.FLOOR)


def measure(implementation: str, n: int, scratch: str) -> dict:
    """``sync_scale.measure`` with every libvirt call going to libvirtd's socket; run in a
    fresh process by ``harness.in_subprocess``. No first sync: this part does not report it."""
    from vmpower.core.settings import parse_settings

    sync_scale.URI = URI
    sync_scale.SETTINGS = parse_settings({"uri": URI})
    return sync_scale.measure(implementation, n, scratch, first_sync=False)


def _answers(uri: str) -> bool:
    return subprocess.run(["virsh", "-c", uri, "version"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=60, check=False).returncode == 0


def run(smoke: bool, scratch: Path) -> dict:
    from vmpower_lab import lab

    sizes = SMOKE_SIZES if smoke else SIZES
    series: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
    daemon = lab.LibvirtDaemon().start()
    try:
        if not _answers(URI):
            raise RuntimeError(f"libvirtd does not serve {URI} (its test driver)")
        for n in sizes:
            print(f"real_socket: {sync_scale.NOVA}, N={n:,}", file=sys.stderr, flush=True)
            measured = harness.in_subprocess(measure, implementation=sync_scale.NOVA, n=n,
                                             scratch=str(scratch))
            series[sync_scale.NOVA].append({"n": n, **measured[sync_scale.NOVA]})
            # vmpower and the floor head to head, as in part 1: measured minutes apart (with
            # the Nova-style run between them), the two would meet different loads.
            rounds: dict[str, list[dict]] = {sync_scale.VMPOWER: [], sync_scale.FLOOR: []}
            for turn in range(1 if smoke else sync_scale.ROUNDS):
                for implementation, measured_rounds in rounds.items():
                    print(f"real_socket: {implementation}, N={n:,}, round {turn + 1}",
                          file=sys.stderr, flush=True)
                    measured_rounds.append(harness.in_subprocess(
                        measure, implementation=implementation, n=n, scratch=str(scratch)))
            for implementation, measured_rounds in rounds.items():
                best = sync_scale.best_round(implementation, measured_rounds)
                series[implementation].append({"n": n, **best[implementation]})
    finally:
        daemon.stop()

    def seconds(name: str, n: int) -> float:
        return next(p["seconds"] for p in series[name] if p["n"] == n)

    ratios = [{"n": n, "nova_over_vmpower": seconds(sync_scale.NOVA, n) / seconds(sync_scale.VMPOWER, n),
               "vmpower_over_floor": seconds(sync_scale.VMPOWER, n) / seconds(sync_scale.FLOOR, n),
               "vmpower_over_floor_rounds": sync_scale.round_ratios(series, n)}
              for n in sizes]
    at = next((r for r in ratios if r["n"] == TARGET_N), None)
    measured = at["vmpower_over_floor"] if at else None
    # Part 1's target, through the socket; the Nova-style ratio is context, not a target.
    targets = [{"target": f"vmpower within {sync_scale.TARGET_OVER_FLOOR:g}× of the floor through "
                          f"libvirtd's socket", "n": TARGET_N, "measured": measured,
                "met": None if measured is None else measured <= sync_scale.TARGET_OVER_FLOOR}]
    return {"uri": URI, "sizes": list(sizes), "series": series, "ratios": ratios, "targets": targets}


def markdown(result: dict) -> str:
    verdict = {True: "**met**", False: "**not met**", None: f"not measured (no N = {TARGET_N:,} in this run)"}
    rows = []
    for ratio in result["ratios"]:
        n = ratio["n"]
        rows.append([f"{n:,}"] + [harness.seconds(next(p["seconds"] for p in result["series"][name]
                                                         if p["n"] == n)) for name in IMPLEMENTATIONS]
                    + [harness.ratio(ratio["nova_over_vmpower"]), harness.ratio(ratio["vmpower_over_floor"])])
    return "\n\n".join([
        f"## Part {PART}: {TITLE.lower()}",
        (f"Part 1's scenario (N domains, half running, 2% drifted behind vmpower's back, SQLite WAL "
        f"+ full fsync) with libvirt's test driver hosted by a real libvirtd, `{result['uri']}`: "
        f"every libvirt call is a round trip over its UNIX socket. Each implementation in a "
        f"fresh process, best of up to {sync_scale.REPEATS} runs; vmpower and the floor head to "
        f"head, in {sync_scale.ROUNDS} rounds of a process each, one after the other, so that "
        f"both meet the same load (one round in a smoke run). See `bench/real_socket.py`."),
        harness.table(["N", *IMPLEMENTATIONS, "nova-style ÷ vmpower", "vmpower ÷ floor"], rows),
        "vmpower ÷ floor in each head-to-head round (each implementation's best run of the "
        "round): " + "; ".join(
            f"N = {r['n']:,}: " + ", ".join(harness.ratio(x) for x in r["vmpower_over_floor_rounds"])
            for r in result["ratios"]) + ".",
        f"**Targets** (at N = {TARGET_N:,})",
        harness.table(["target", "measured", "verdict"],
                      [[t["target"], "" if t["measured"] is None else harness.ratio(t["measured"]),
                        verdict[t["met"]]] for t in result["targets"]]),
    ])


def against_floor(result: dict) -> list[harness.FloorRow]:
    """Part 5 against its floor (part 1's), at N = 10,000 (a smaller run's largest N is shown,
    not judged)."""
    n = max(result["sizes"])
    judged = n == TARGET_N
    note = "" if judged else f"N = {n:,}; the target is at {TARGET_N:,}"

    def seconds(name: str) -> float | None:
        return next((p["seconds"] for p in result["series"].get(name, ()) if p["n"] == n), None)

    floor = seconds(sync_scale.FLOOR)
    return [
        harness.FloorRow(PART, f"sync of {n:,} domains through libvirtd's socket",
                         seconds(sync_scale.VMPOWER), floor, sync_scale.FLOOR_IS,
                         sync_scale.TARGET_OVER_FLOOR, "s", judged, note),
        harness.FloorRow(PART, f"Nova-style sync of {n:,} through the socket (context)",
                         seconds(sync_scale.NOVA), floor, sync_scale.FLOOR_IS, None, "s"),
    ]


def plot(result: dict, figure) -> None:
    ax = figure.subplots(1, 1)
    for name, style in zip(IMPLEMENTATIONS, ("o-", "s-", "^-")):
        points = result["series"][name]
        ax.plot([p["n"] for p in points], [p["seconds"] for p in points], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(result["sizes"], [f"{n:,}" for n in result["sizes"]])
    ax.set_xlabel("domains on the host (N)")
    ax.set_ylabel("seconds per sync (best run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    figure.suptitle(f"Part {PART}: {TITLE.lower()} ({result['uri']})")
