"""What vmpower's jobs measured, on the minion's disk, for the metrics file.

Reconciles and syncs run in job processes that Salt forks and throws away, so their timings
cannot live in a process's memory. Each job appends one line of JSON per measurement to
``<cachedir>/vmpower/measurements.log`` (``O_APPEND``, one ``write`` of less than a pipe
buffer, so lines from concurrent jobs never interleave). The metrics writer in the beacon's
process reads what was added since it last looked and folds it into its histograms and
counters (``vmpower.metrics.Tally``).

prometheus_client's own multiprocess mode keeps one file per process id and sums them all
at every scrape; with a fresh process per Salt job, those files would grow without bound.

The log is rotated by its reader once it passes ``ROTATE_AT`` bytes (renamed to ``.1``,
replacing the one before): a counter then restarts, as after a process restart, which
Prometheus's ``rate()`` and ``increase()`` take in their stride.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

ROTATE_AT = 4 * 1024 * 1024  # bytes


def measurements_path(cachedir: str) -> str:
    """Where a minion's jobs append what they measured."""
    return os.path.join(cachedir, "vmpower", "measurements.log")


class Measurements:
    """Appends a job's measurements to the log at ``path``. Never raises: a measurement that
    cannot be written is logged and lost, and the job goes on."""

    def __init__(self, path: str):
        self.path = path

    def decision(self, cause: str, rule: str, action: str, refused: bool,
                 latency: float | None, lock_wait: float | None) -> None:
        """One decision about one VM, by the rule that gave it: ``latency`` is libvirt's
        callback to the decision (an event this host's beacon observed), ``lock_wait`` the wait
        for the VM's lock."""
        self._append({"kind": "decision", "cause": cause, "rule": rule, "action": action,
                      "refused": refused, "latency": latency, "lock_wait": lock_wait})

    def sync(self, took: float, checked: int, decided: Mapping[tuple[str, str], int],
             refused: Mapping[str, int]) -> None:
        """One sync of the host: how long, how many VMs, what it did (``decided``: how many
        decisions of each rule and action, beside the VMs in sync) and what it refused to
        touch (how many, by rule)."""
        self._append({"kind": "sync", "at": time.time(), "took": took, "checked": checked,
                      "decided": [[rule, action, count] for (rule, action), count in decided.items()],
                      "refused": dict(refused)})

    def _append(self, entry: dict) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("vmpower: cannot note a measurement in %s: %s", self.path, exc)


def read_new(path: str, offset: int, inode: int | None) -> tuple[list[dict], int, int | None]:
    """The entries appended to the log at ``path`` since ``offset`` (in the file ``inode``;
    another file, or a shorter one, is read from its start), with the new offset and inode.
    A line that is not a JSON object is skipped and logged; a last line still being written
    (no newline yet) is left for the next read."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            if stat.st_ino != inode or stat.st_size < offset:
                offset = 0
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], 0, None
    end = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:end].splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        elif raw.strip():
            log.warning("vmpower: skipping a line of %s that is not a measurement: %.80r", path, raw)
    return entries, offset + end, stat.st_ino


def rotate_if_large(path: str, size: int) -> bool:
    """Rename the log at ``path`` to ``.1`` once it reached ``ROTATE_AT`` (``size`` read up
    to the end); True when it was."""
    if size < ROTATE_AT:
        return False
    try:
        os.replace(path, path + ".1")
    except OSError as exc:
        log.warning("vmpower: cannot rotate %s: %s", path, exc)
        return False
    return True
