"""The metric names vmpower writes into its node_exporter text file: the contract that the
shipped alerts and dashboard may query (docs/metrics.md)."""

HISTOGRAMS = frozenset({
    "vmpower_decision_latency_seconds",
    "vmpower_sync_duration_seconds",
    "vmpower_lock_wait_seconds",
})

METRICS = HISTOGRAMS | {
    # per host
    "vmpower_metrics_written_timestamp_seconds",
    "vmpower_event_loop_connected",
    "vmpower_event_loop_reconnects_total",
    "vmpower_event_loop_events_total",
    "vmpower_event_loop_dropped_events_total",
    "vmpower_event_loop_queue_depth",
    "vmpower_unknown_since_timestamp_seconds",
    "vmpower_last_sync_timestamp_seconds",
    "vmpower_last_sync_duration_seconds",
    "vmpower_sync_interval_seconds",
    "vmpower_vms",
    "vmpower_vms_error",
    "vmpower_vms_stuck",
    "vmpower_vms_disagreeing",
    "vmpower_actions_total",
    "vmpower_restarts_total",
    "vmpower_lifecycle_events_total",
    "vmpower_resyncs_total",
    "vmpower_decisions_total",
    "vmpower_refusals_total",
    "vmpower_vm_series_limit",
    "vmpower_vm_series_limited",
    # per VM
    "vmpower_vm_power_state",
    "vmpower_vm_state",
    "vmpower_vm_drifting",
    "vmpower_vm_drift_since_timestamp_seconds",
    "vmpower_vm_unknown_since_timestamp_seconds",
    "vmpower_vm_task_since_timestamp_seconds",
    "vmpower_vm_restarts_total",
}

#: What a Prometheus scrape shows: each histogram as its _bucket, _sum and _count series.
SERIES = (METRICS - HISTOGRAMS) | {name + suffix for name in HISTOGRAMS
                                   for suffix in ("_bucket", "_sum", "_count")}
