"""vmpower's metrics for one host, as a Prometheus text file for node_exporter's textfile
collector (``--collector.textfile.directory``), written atomically by prometheus_client's
``write_to_textfile`` (a temporary file beside it, then a rename; the collector reads only
``*.prom``, so it never sees half a file).

Who writes it: the beacon's process (``LiveWriter``, on the event loop's status thread)
within ``MIN_INTERVAL`` seconds of any change it sees (a record or audit entry written by a
reconcile, a sync or an operator; a job's measurement; the loop's own state), never more often,
however many events a storm brings, and at least every ``HEARTBEAT`` seconds while nothing
happens, so that ``vmpower_metrics_written_timestamp_seconds`` tells a dead minion from a quiet
one. Without a beacon, the periodic sync's returner and ``vmpower.metrics`` write it.

What is exported (the scrape adds ``instance``; docs/metrics.md has the table): per host, the
loop's health and counters, the last sync, VMs by state, actions and restarts (counted from the
append-only audit log, so they only ever grow), decisions, refusals and resyncs, and the
decision latency, sync duration and lock wait histograms; per VM, labelled ``uuid`` and
``name``, its power state and vm_state as one 0/1 gauge per value, whether it drifts (its
record and the hypervisor disagree) and since when, since when it is unknown (libvirt cannot
be asked), its task_state lock and since when, and its restarts. A host with more VMs than
``vmpower:metrics_vm_limit`` (1,000) keeps the per-host counts only, and says so
(``vmpower_vm_series_limited``). Label values are escaped by prometheus_client.

Needs ``prometheus_client`` (``pip install 'vmpower[metrics]'``).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vmpower import fleet, measurements, minion
from vmpower.core import fleet as core
from vmpower.core.model import PowerState, VmState, drifting
from vmpower.core.settings import store_scheme
from vmpower.store import Store, StoreError, open_store

try:
    from prometheus_client import CollectorRegistry, write_to_textfile
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # reported when metrics are asked for
    CollectorRegistry = None

log = logging.getLogger(__name__)

SQL_ACTIONS = "SELECT action, cause, count(*) FROM audit WHERE host = ? GROUP BY action, cause"
SQL_RESTARTS = ("SELECT uuid, count(*) FROM audit WHERE host = ? AND action = 'start' "
                "AND cause IN ('event', 'sync') GROUP BY uuid")
SQL_AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS audit_by_host_action ON audit (host, action, cause)"
# What changes whenever a record of the host or any audit entry is written: every write bumps
# a record's version, and audit ids only grow.
SQL_CHANGE_MARK = ("SELECT count(*), coalesce(sum(version), 0), "
                   "(SELECT coalesce(max(id), 0) FROM audit) FROM instances WHERE host = ?")
AUTOMATIC = ("event", "sync")
POWER_STATES = tuple(state.value for state in PowerState)
VM_STATES = tuple(state.value for state in VmState)
# Histogram buckets (seconds): a decision comes within a second, a sync of thousands within
# seconds, a lock is free at once unless a stop holds it for its timeout.
DECISION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOCK_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
MIN_INTERVAL = 2.0  # seconds between two writes of the live file, at the most
HEARTBEAT = 30.0  # seconds between two writes while nothing changes, at the least
SETTINGS_EVERY = 30.0  # seconds between two reads of the minion's settings by the writer


class MetricsError(RuntimeError):
    """The metrics cannot be written; the message says why."""


class Histogram:
    """Observations in fixed buckets, as Prometheus wants them (cumulative on output)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        total, out = 0, []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


class Tally:
    """The jobs' measurements (``vmpower.measurements``), folded into histograms and counters:
    read from the log where the last fold stopped."""

    def __init__(self, path: str):
        self.path = path
        self._offset, self._inode = 0, None
        self.decision_latency = Histogram(DECISION_BUCKETS)
        self.sync_duration = Histogram(SYNC_BUCKETS)
        self.lock_wait = Histogram(LOCK_BUCKETS)
        self.decisions: collections.Counter = collections.Counter()  # (cause, rule, action)
        self.refusals: collections.Counter = collections.Counter()  # (cause, rule)
        self.last_sync: dict | None = None  # {"at", "took"} of the last sync measured

    def fold(self) -> bool:
        """Take in what the jobs appended since the last fold; True when there was some."""
        entries, self._offset, self._inode = measurements.read_new(self.path, self._offset,
                                                                    self._inode)
        if measurements.rotate_if_large(self.path, self._offset):
            more, _, _ = measurements.read_new(self.path + ".1", self._offset, self._inode)
            entries += more  # what a job appended between the read and the rename
            self._offset, self._inode = 0, None
        for entry in entries:
            self._take(entry)
        return bool(entries)

    def _take(self, entry: Mapping) -> None:
        kind = entry.get("kind")
        if kind == "decision":
            cause, rule = str(entry.get("cause", "")), str(entry.get("rule", ""))
            self.decisions[(cause, rule, str(entry.get("action", "")))] += 1
            if entry.get("refused") is True:
                self.refusals[(cause, rule)] += 1
            for value, histogram in ((entry.get("latency"), self.decision_latency),
                                     (entry.get("lock_wait"), self.lock_wait)):
                if _seconds(value) is not None:
                    histogram.observe(_seconds(value))
        elif kind == "sync" and _seconds(entry.get("took")) is not None:
            self.sync_duration.observe(_seconds(entry["took"]))
            decided = entry.get("decided")
            for item in (decided if isinstance(decided, list) else ()):
                if isinstance(item, list) and len(item) == 3 and _whole(item[2]):
                    self.decisions[("sync", str(item[0]), str(item[1]))] += item[2]
            refused = entry.get("refused")
            for rule, count in (refused.items() if isinstance(refused, Mapping) else ()):
                if _whole(count):
                    self.refusals[("sync", str(rule))] += count
            if _seconds(entry.get("at")) is not None:
                self.last_sync = {"at": entry["at"], "took": entry["took"]}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value) -> float | None:
    """A measured time, or None for anything that is not a number of seconds, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return float(value)


def gather(
    store: Store,
    host: str,
    loop_status: Any,
    last_sync: Mapping | None,
    now: float | None = None,
    stuck_after: float = core.DEFAULT_STUCK_AFTER,
    vm_limit: int = core.DEFAULT_METRICS_VM_LIMIT,
    tally: Tally | None = None,
    sync_interval: float | None = None,
) -> dict[str, Any]:
    """The numbers behind the metrics, from the store, the event loop's status (as its file
    says it, or as the loop's process has it), the last sync (``{"at", "took"}`` or None) and
    the jobs' measurements (``tally``)."""
    now = time.time() if now is None else now
    records = store.for_host(host)
    by_state: dict[tuple, int] = {}
    errors = stuck = disagreeing = 0
    for record in records.values():
        key = (record.vm_state.value, record.power_state.value)
        by_state[key] = by_state.get(key, 0) + 1
        errors += record.vm_state.value == "error"
        stuck += bool(core.stuck(record.task_state, record.updated_at, now, stuck_after))
        disagreeing += drifting(*key)
    actions: dict[str, int] = {}
    restarts = 0
    for action, cause, count in store._query(SQL_ACTIONS, (host,)):
        actions[action] = actions.get(action, 0) + int(count)
        if action == "start" and cause in AUTOMATIC:
            restarts += int(count)
    loop = {**core.loop_summary(loop_status), **core.loop_counters(loop_status)}
    limited = len(records) > vm_limit
    per_vm = None
    if not limited:
        restarts_of = {uuid: int(count) for uuid, count in store._query(SQL_RESTARTS, (host,))}
        per_vm = [_vm_numbers(record, restarts_of.get(uuid, 0)) for uuid, record in sorted(records.items())]
    if tally is not None and tally.last_sync is not None and (
            not last_sync or not last_sync.get("at") or tally.last_sync["at"] > last_sync["at"]):
        last_sync = tally.last_sync
    return {
        "written_at": now,
        "loop": loop,
        "last_sync": dict(last_sync or {}),
        "sync_interval": sync_interval,
        "vms": by_state,
        "error": errors,
        "stuck": stuck,
        "disagreeing": disagreeing,
        "actions": actions,
        "restarts": restarts,
        "vm_limit": vm_limit,
        "per_vm": per_vm,
        "tally": tally,
    }


def index_audit(store: Store) -> None:
    """Counting a host's audit entries should not read every host's: an index of vmpower's
    own, made once per store opened (making it takes the database's write lock)."""
    try:
        store._run(SQL_AUDIT_INDEX)
    except store._errors as exc:  # only an index: counting works without it, slower
        log.debug("vmpower: no audit index for the metrics in %s: %s", store.path, exc)


def _vm_numbers(record, restarts: int) -> dict[str, Any]:
    drift = drifting(record.vm_state, record.power_state)
    return {
        "uuid": record.uuid,
        "name": record.name,
        "vm_state": record.vm_state.value,
        "power_state": record.power_state.value,
        # A drift read from a store older than drift_since began at the latest at the last write.
        "drift_since": (record.drift_since or record.updated_at) if drift else None,
        "task_state": record.task_state,
        "task_since": core.task_since(record.task_owner, record.updated_at) if record.task_state else None,
        "restarts": restarts,
    }


def families(numbers: Mapping[str, Any]) -> Iterable:
    """The metric families of ``gather``'s numbers."""
    yield _gauge("vmpower_metrics_written_timestamp_seconds",
                 "When vmpower last wrote this file (Unix time): rewritten within seconds of a "
                 "change and every 30 s while idle when the beacon runs.", numbers["written_at"])
    loop = numbers["loop"]
    if loop.get("connected") is not None:
        yield _gauge(
            "vmpower_event_loop_connected",
            "Whether the vmpower beacon's libvirt event loop is connected (1) or not (0).",
            int(loop["connected"]),
        )
        for name, key, text in (
            ("vmpower_event_loop_reconnects", "reconnects", "Reconnections of the event loop to libvirtd."),
            (
                "vmpower_event_loop_events",
                "events_seen",
                "Lifecycle events libvirt delivered to the event loop.",
            ),
            ("vmpower_event_loop_dropped_events", "dropped", "Events dropped because the queue was full."),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], float(loop.get(key) or 0))
            yield counter
        yield _gauge(
            "vmpower_event_loop_queue_depth",
            "Events waiting in the event loop's queue.",
            loop.get("queue_depth") or 0,
        )
        yield _labelled(CounterMetricFamily, "vmpower_lifecycle_events",
                        "Power changes the event loop saw, by transition.", "transition",
                        loop.get("transitions") or {})
        yield _labelled(CounterMetricFamily, "vmpower_resyncs",
                        "Resyncs the beacon fired, by reason.", "reason", loop.get("resyncs") or {})
    unknown_since = loop.get("unknown_since")
    if unknown_since is not None:
        yield _gauge("vmpower_unknown_since_timestamp_seconds",
                     "Since when libvirt cannot be asked on this host (the event loop is not "
                     "connected); absent while it can.", unknown_since)
    sync = numbers["last_sync"]
    if sync.get("at"):
        yield _gauge(
            "vmpower_last_sync_timestamp_seconds",
            "When the last vmpower.sync of this host finished (Unix time).",
            sync["at"],
        )
        if sync.get("took") is not None:
            yield _gauge(
                "vmpower_last_sync_duration_seconds", "How long the last vmpower.sync took.", sync["took"]
            )
    if numbers.get("sync_interval"):
        yield _gauge("vmpower_sync_interval_seconds",
                     "The periodic sync's interval (vmpower:sync_interval).", numbers["sync_interval"])
    vms = GaugeMetricFamily(
        "vmpower_vms",
        "VMs recorded on this host, by vm_state and power_state.",
        labels=["vm_state", "power_state"],
    )
    for (vm_state, power_state), count in sorted(numbers["vms"].items()):
        vms.add_metric([vm_state, power_state], count)
    yield vms
    yield _gauge("vmpower_vms_error", "VMs of this host in vm_state error.", numbers["error"])
    yield _gauge("vmpower_vms_stuck", "VMs whose task_state has not changed for too long.", numbers["stuck"])
    yield _gauge(
        "vmpower_vms_disagreeing",
        "VMs whose power_state is not what their vm_state means.",
        numbers["disagreeing"],
    )
    yield _labelled(CounterMetricFamily, "vmpower_actions",
                    "Audit entries of this host's VMs, by action.", "action", numbers["actions"])
    restarts = CounterMetricFamily("vmpower_restarts", "Automatic restarts of VMs (by an event or a sync).")
    restarts.add_metric([], numbers["restarts"])
    yield restarts
    tally = numbers.get("tally")
    if tally is not None:
        yield from _tally_families(tally)
    yield _gauge("vmpower_vm_series_limit",
                 "VMs a host may have before its file keeps per-host counts only "
                 "(vmpower:metrics_vm_limit).", numbers["vm_limit"])
    yield _gauge("vmpower_vm_series_limited",
                 "1 when this host has more VMs than vmpower_vm_series_limit: no per-VM series.",
                 int(numbers["per_vm"] is None))
    if numbers["per_vm"] is not None:
        yield from _vm_families(numbers["per_vm"], unknown_since)


def _tally_families(tally: Tally) -> Iterable:
    decisions = CounterMetricFamily("vmpower_decisions", "Decisions taken, by what asked, the "
                                    "rule that answered and the action (a sync counts those that "
                                    "act or refuse, not the VMs in sync).",
                                    labels=["cause", "rule", "action"])
    for (cause, rule, action), count in sorted(tally.decisions.items()):
        decisions.add_metric([cause, rule, action], count)
    yield decisions
    refusals = CounterMetricFamily("vmpower_refusals", "Decisions that left a VM alone (locked, "
                                   "another host's, a migration, bad pillar...), by what asked "
                                   "and the rule.", labels=["cause", "rule"])
    for (cause, rule), count in sorted(tally.refusals.items()):
        refusals.add_metric([cause, rule], count)
    yield refusals
    for name, text, histogram in (
            ("vmpower_decision_latency_seconds",
             "From libvirt's callback on this host to the reconcile's decision.", tally.decision_latency),
            ("vmpower_sync_duration_seconds", "How long a vmpower.sync took.", tally.sync_duration),
            ("vmpower_lock_wait_seconds", "How long a reconcile waited for its VM's lock.", tally.lock_wait)):
        family = HistogramMetricFamily(name, text)
        family.add_metric([], histogram.cumulative(), histogram.sum)
        yield family


def _vm_families(per_vm: list[dict], unknown_since: float | None) -> Iterable:
    labels = ["uuid", "name"]
    power = GaugeMetricFamily("vmpower_vm_power_state",
                              "A VM's power state as last seen: 1 for the one it is in.",
                              labels=[*labels, "power_state"])
    state = GaugeMetricFamily("vmpower_vm_state", "A VM's vm_state (what it is meant to do): 1 "
                              "for the one it has.", labels=[*labels, "vm_state"])
    drift = GaugeMetricFamily("vmpower_vm_drifting",
                              "1 while a VM's record and the hypervisor disagree.", labels=labels)
    drift_since = GaugeMetricFamily("vmpower_vm_drift_since_timestamp_seconds",
                                    "Since when a VM's record and the hypervisor disagree; "
                                    "absent while they agree.", labels=labels)
    unknown = GaugeMetricFamily("vmpower_vm_unknown_since_timestamp_seconds",
                                "Since when a VM's state is unknown (libvirt cannot be asked); "
                                "absent while it can.", labels=labels)
    task = GaugeMetricFamily("vmpower_vm_task_since_timestamp_seconds",
                             "Since when a VM's task_state lock is held; absent while none is.",
                             labels=[*labels, "task_state"])
    restarts = CounterMetricFamily("vmpower_vm_restarts", "Automatic restarts of a VM.", labels=labels)
    for vm in per_vm:
        ids = [vm["uuid"], vm["name"]]
        for value in POWER_STATES:
            power.add_metric([*ids, value], int(vm["power_state"] == value))
        for value in VM_STATES:
            state.add_metric([*ids, value], int(vm["vm_state"] == value))
        drift.add_metric(ids, int(vm["drift_since"] is not None))
        if vm["drift_since"] is not None:
            drift_since.add_metric(ids, vm["drift_since"])
        if unknown_since is not None:
            unknown.add_metric(ids, unknown_since)
        if vm["task_since"] is not None:
            task.add_metric([*ids, vm["task_state"]], vm["task_since"])
        restarts.add_metric(ids, vm["restarts"])
    yield from (power, state, drift, drift_since, unknown, task, restarts)


def _gauge(name: str, text: str, value: float):
    gauge = GaugeMetricFamily(name, text)
    gauge.add_metric([], float(value))
    return gauge


def _labelled(kind, name: str, text: str, label: str, counts: Mapping):
    family = kind(name, text, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([str(value)], count)
    return family


class _Collector:
    def __init__(self, numbers: Mapping[str, Any]):
        self._numbers = numbers

    def collect(self):
        return families(self._numbers)


def write(path: str, numbers: Mapping[str, Any]) -> str:
    """Write the text file at ``path`` atomically; returns the path."""
    if CollectorRegistry is None:
        raise MetricsError(
            "vmpower metrics need the Python package prometheus_client, which is "
            "not installed: pip install prometheus-client"
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(numbers))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_to_textfile(path, registry)
    except OSError as exc:
        raise MetricsError(f"cannot write the vmpower metrics to {path}: {exc}") from exc
    return path


def write_for_host(
    path: str, store: Store, host: str, loop_status: Any, last_sync: Mapping | None,
    vm_limit: int = core.DEFAULT_METRICS_VM_LIMIT, sync_interval: float | None = None,
    tally: Tally | None = None,
) -> dict[str, Any]:
    """Gather this host's numbers and write them to ``path``; what was written."""
    try:
        index_audit(store)
        numbers = gather(store, host, loop_status, last_sync, vm_limit=vm_limit,
                         sync_interval=sync_interval, tally=tally)
    except StoreError as exc:
        raise MetricsError(f"cannot gather the vmpower metrics: {exc}") from exc
    write(path, numbers)
    return {
        "path": path,
        "vms": sum(numbers["vms"].values()),
        "per_vm_series": numbers["per_vm"] is not None,
        "actions": numbers["actions"],
        "restarts": numbers["restarts"],
        "event_loop": numbers["loop"],
        "last_sync": numbers["last_sync"],
    }


class LiveWriter:
    """The live metrics file of the minion that runs the beacon, written from its process.

    ``tick()`` is called every second by the event loop's status thread (never a watcher's,
    which may hang in libvirt, nor the minion's loop). It writes when something changed since
    the last write, at most every ``MIN_INTERVAL`` seconds, and at least every ``HEARTBEAT``
    seconds. A failure (an unwritable path, an unreadable store) is kept in ``health()``, which
    ``vmpower.status`` shows, and tried again at the next tick; events and syncs go on.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic):
        self._monotonic = monotonic
        self._settings_at: float | None = None
        self._settings: dict | None = None
        self._store: Store | None = None
        self._store_at: str | None = None
        self._tally: Tally | None = None
        self._written_at: float | None = None  # monotonic
        self._written: tuple | None = None  # what the last write saw
        self.path: str | None = None
        self.writes = 0
        self.last_write: float | None = None  # wall clock
        self.error: str | None = None

    def tick(self, opts: Mapping, loop_status: Mapping) -> bool:
        """Write the file if it is due; True when it was written."""
        now = self._monotonic()
        try:
            settings = self._read_settings(opts, now)
            if not settings["metrics_file"]:
                self.path = None
                self.error = None
                return False
            self.path = settings["metrics_file"]
            store = self._open(settings["store"])
            if self._tally is None or self._tally.path != settings["measurements"]:
                self._tally = Tally(settings["measurements"])
            measured = self._tally.fold()
            seen = (tuple(store._query(SQL_CHANGE_MARK, (opts["id"],))[0]),
                    _loop_fingerprint(loop_status), settings["vm_limit"], settings["sync_interval"],
                    self.path)
            due = (self._written_at is None or now - self._written_at >= HEARTBEAT
                   or ((measured or seen != self._written) and now - self._written_at >= MIN_INTERVAL))
            if not due:
                return False
            numbers = gather(store, opts["id"], loop_status, None, vm_limit=settings["vm_limit"],
                             tally=self._tally, sync_interval=settings["sync_interval"])
            write(self.path, numbers)
        except (MetricsError, StoreError, core.ConfigError, OSError) as exc:
            if str(exc) != self.error:
                log.error("vmpower: the live metrics are not written: %s", exc)
            self.error = str(exc)
            if isinstance(exc, StoreError):
                self._close()
            return False
        self._written_at, self._written = now, seen
        self.writes += 1
        self.last_write = numbers["written_at"]
        if self.error is not None:
            log.info("vmpower: the live metrics are written again to %s", self.path)
        self.error = None
        return True

    def _read_settings(self, opts: Mapping, now: float) -> dict:
        if self._settings is None or now - self._settings_at >= SETTINGS_EVERY:
            extras = fleet.minion_extras(opts)
            raw = minion.merged_settings(opts)
            self._settings = {"metrics_file": extras["metrics_file"], "store": extras["store"],
                              "vm_limit": core.metrics_vm_limit(raw.get("metrics_vm_limit")),
                              "sync_interval": extras["settings"].sync_interval,
                              "measurements": measurements.measurements_path(opts["cachedir"])}
            self._settings_at = now
        return self._settings

    def _open(self, location: str) -> Store:
        if self._store is None or self._store_at != location:
            self._close()
            self._store, self._store_at = open_store(location), location
            index_audit(self._store)
        return self._store

    def _close(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception as exc:  # pylint: disable=broad-except
                log.debug("vmpower: closing the metrics writer's store: %s", exc)
        self._store = self._store_at = None

    @property
    def reads_sqlite(self) -> bool:
        """Whether the records it reads are in SQLite (or where is not known yet). A fork must
        not copy SQLite's lock state in the middle of a read; PostgreSQL leaves no lock in this
        process, and may be slow to answer."""
        return self._settings is None or store_scheme(self._settings["store"]) is None

    def health(self) -> dict:
        """What ``vmpower.status`` shows of the live metrics file."""
        return {"path": self.path, "writes": self.writes, "last_write": self.last_write,
                "error": self.error}


def _loop_fingerprint(status: Mapping) -> tuple:
    """What of the loop's status the file shows (its counters and its connection), without
    what changes on every write of the status (its time)."""
    summary = {**core.loop_summary(status), **core.loop_counters(status)}
    summary.pop("updated_at", None)
    return tuple(sorted((key, repr(value)) for key, value in summary.items()))
