"""vmpower's metrics for one host, as a Prometheus text file for node_exporter's textfile
collector (``--collector.textfile.directory``), written atomically by prometheus_client's
``write_to_textfile`` (a temporary file beside it, then a rename; the collector reads only
``*.prom``, so it never sees half a file).

What is exported, per host (the scrape adds the ``instance`` label; there is no per-VM label,
and every label value comes from a closed set: vm_state, power_state, audit action):

- ``vmpower_event_loop_connected`` (1/0; absent when this minion runs no vmpower beacon),
  ``vmpower_event_loop_reconnects_total``, ``vmpower_event_loop_events_total``,
  ``vmpower_event_loop_dropped_events_total``, ``vmpower_event_loop_queue_depth``;
- ``vmpower_last_sync_timestamp_seconds`` and ``vmpower_last_sync_duration_seconds``: a text
  file cannot age, so the age is ``time() - vmpower_last_sync_timestamp_seconds`` in PromQL;
- ``vmpower_vms{vm_state, power_state}``; ``vmpower_vms_error``, ``vmpower_vms_stuck``,
  ``vmpower_vms_disagreeing``;
- ``vmpower_actions_total{action}`` (every audit entry of this host's VMs, by action: counted
  from the append-only audit log, so it only ever grows) and ``vmpower_restarts_total`` (the
  automatic restarts: starts caused by an event or a sync).

Written after each sync that goes through the ``vmpower`` returner (the periodic sync does),
and by ``vmpower.metrics``. Needs ``prometheus_client`` (``pip install 'vmpower[metrics]'``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from vmpower.core import fleet as core
from vmpower.store import Store, StoreError

try:
    from prometheus_client import CollectorRegistry, write_to_textfile
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # reported when metrics are asked for
    CollectorRegistry = None

log = logging.getLogger(__name__)

SQL_ACTIONS = "SELECT action, cause, count(*) FROM audit WHERE host = ? GROUP BY action, cause"
# Counting a host's audit entries should not read every host's: an index of our own.
SQL_AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS audit_by_host_action ON audit (host, action, cause)"
AUTOMATIC = ("event", "sync")


class MetricsError(RuntimeError):
    """The metrics cannot be written; the message says why."""


def gather(
    store: Store,
    host: str,
    loop_status: Any,
    last_sync: Mapping | None,
    now: float | None = None,
    stuck_after: float = core.DEFAULT_STUCK_AFTER,
) -> dict[str, Any]:
    """The numbers behind the metrics, from the store, the event loop's status file and the
    last sync (``{"at", "took"}`` or None)."""
    now = time.time() if now is None else now
    by_state: dict[tuple, int] = {}
    errors = stuck = disagreeing = 0
    for record in store.for_host(host).values():
        key = (record.vm_state.value, record.power_state.value)
        by_state[key] = by_state.get(key, 0) + 1
        errors += record.vm_state.value == "error"
        stuck += bool(core.stuck(record.task_state, record.updated_at, now, stuck_after))
        disagreeing += bool(core.disagreement(*key))
    try:
        store._run(SQL_AUDIT_INDEX)
    except store._errors as exc:  # only an index: counting works without it, slower
        log.debug("vmpower: no audit index for the metrics in %s: %s", store.path, exc)
    actions: dict[str, int] = {}
    restarts = 0
    for action, cause, count in store._query(SQL_ACTIONS, (host,)):
        actions[action] = actions.get(action, 0) + int(count)
        if action == "start" and cause in AUTOMATIC:
            restarts += int(count)
    return {
        "loop": core.loop_summary(loop_status),
        "last_sync": dict(last_sync or {}),
        "vms": by_state,
        "error": errors,
        "stuck": stuck,
        "disagreeing": disagreeing,
        "actions": actions,
        "restarts": restarts,
    }


def families(numbers: Mapping[str, Any]) -> Iterable:
    """The metric families of ``gather``'s numbers."""
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
    actions = CounterMetricFamily(
        "vmpower_actions", "Audit entries of this host's VMs, by action.", labels=["action"]
    )
    for action, count in sorted(numbers["actions"].items()):
        actions.add_metric([action], count)
    yield actions
    restarts = CounterMetricFamily("vmpower_restarts", "Automatic restarts of VMs (by an event or a sync).")
    restarts.add_metric([], numbers["restarts"])
    yield restarts


def _gauge(name: str, text: str, value: float):
    gauge = GaugeMetricFamily(name, text)
    gauge.add_metric([], float(value))
    return gauge


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
    path: str, store: Store, host: str, loop_status: Any, last_sync: Mapping | None
) -> dict[str, Any]:
    """Gather this host's numbers and write them to ``path``; what was written."""
    try:
        numbers = gather(store, host, loop_status, last_sync)
    except StoreError as exc:
        raise MetricsError(f"cannot gather the vmpower metrics: {exc}") from exc
    write(path, numbers)
    return {
        "path": path,
        "vms": sum(numbers["vms"].values()),
        "actions": numbers["actions"],
        "restarts": numbers["restarts"],
        "event_loop": numbers["loop"],
        "last_sync": numbers["last_sync"],
    }
