"""The Grafana dashboard shipped as JSON (monitoring/vmpower-dashboard.json).

It must import into Grafana 9/10 with the user's own Prometheus (a ``DS_PROMETHEUS`` input that
every panel uses), filter every vmpower query by the ``instance`` variable, and use only the
metric names of the metrics contract (docs/metrics.md).

Whether each expression parses is not checked here: a later test runs every expression
(``dashboard_queries``, importable from this module) against a real Prometheus, which parses it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from . import metric_names

DASHBOARD_PATH = Path(__file__).resolve().parents[2] / "monitoring" / "vmpower-dashboard.json"

DATASOURCE = "${DS_PROMETHEUS}"
INSTANCE_MATCHER = 'instance=~"$instance"'

# The template variables an expression may use, and what dashboard_queries puts in their place
# (what a test against a real Prometheus can run: every host, a one-minute rate window).
SUBSTITUTIONS = {"$__rate_interval": "1m", "$instance": ".*"}

# The metric names of the contract (docs/metrics.md): nothing else may be queried.
HISTOGRAMS = metric_names.HISTOGRAMS
CONTRACT_METRICS = metric_names.METRICS
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# A vmpower metric name and the label matchers right after it, if any.
SELECTOR = re.compile(r"(vmpower_[a-z_]+)\s*(\{[^}]*\})?")
VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\[\[[^\]]*\]\]")


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard: dict) -> list:
    """Every panel, rows included, with the panels of a collapsed row (kept inside the row)."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list:
    """The panels that show data: every panel but the rows."""
    return [panel for panel in all_panels(dashboard) if panel.get("type") != "row"]


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``[(panel_title, expr)]`` for every target of every panel (rows' nested panels included),
    with ``$instance`` -> ``.*`` and ``$__rate_interval`` -> ``1m``: ready for a real Prometheus."""
    return [(panel.get("title", ""), substitute(target["expr"]))
            for panel in query_panels(dashboard)
            for target in panel.get("targets", []) if target.get("expr")]


def metric_name(name: str) -> str:
    """A histogram's series name without its _bucket/_sum/_count suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def raw_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel.get("title", ""), target["expr"])
            for panel in query_panels(dashboard)
            for target in panel.get("targets", []) if target.get("expr")]


def datasource_uid(datasource) -> str | None:
    if isinstance(datasource, dict):
        return datasource.get("uid")
    return datasource


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def test_valid_json_and_identity(dashboard):
    assert dashboard["uid"] == "vmpower-fleet"
    assert dashboard["title"] == "vmpower: fleet power state"
    assert dashboard["tags"] == ["vmpower", "libvirt", "salt"]
    assert 36 <= dashboard["schemaVersion"] <= 39
    # An exported dashboard: Grafana assigns its own id on import.
    assert dashboard.get("id") is None


def test_datasource_input(dashboard):
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"


def test_instance_variable(dashboard):
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert set(variables) == {"instance"}
    instance = variables["instance"]
    assert datasource_uid(instance["datasource"]) == DATASOURCE
    query = instance["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(vmpower_metrics_written_timestamp_seconds, instance)"
    assert instance["multi"] is True
    assert instance["includeAll"] is True


def test_every_panel_complete(dashboard):
    panels = query_panels(dashboard)
    assert len(panels) >= 20
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert datasource_uid(panel.get("datasource")) == DATASOURCE, title
        assert panel.get("description", "").strip(), title
        targets = panel.get("targets", [])
        assert any(target.get("expr", "").strip() for target in targets), title
        for target in targets:
            assert datasource_uid(target.get("datasource", panel["datasource"])) == DATASOURCE, title
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), title


def test_panel_ids_unique(dashboard):
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_metric_names_in_contract(dashboard):
    used = set()
    for title, expr in raw_exprs(dashboard):
        names = {metric_name(name) for name in re.findall(r"vmpower_[a-z_]+", expr)}
        assert names <= CONTRACT_METRICS, (title, expr, names - CONTRACT_METRICS)
        used |= names
    # The dashboard does look at the fleet's main signals.
    assert {"vmpower_vms", "vmpower_vms_disagreeing", "vmpower_vm_drift_since_timestamp_seconds",
            "vmpower_event_loop_connected", "vmpower_last_sync_timestamp_seconds"} <= used


def test_every_vmpower_selector_filters_by_instance(dashboard):
    for title, expr in raw_exprs(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            assert INSTANCE_MATCHER in matchers, (title, name, expr)


def test_only_known_variables(dashboard):
    """The later test against a real Prometheus replaces only these two."""
    for title, expr in raw_exprs(dashboard):
        assert set(VARIABLE.findall(expr)) <= set(SUBSTITUTIONS), (title, expr)


def test_dashboard_queries(dashboard):
    queries = dashboard_queries(dashboard)
    assert len(queries) == len(raw_exprs(dashboard))
    for title, expr in queries:
        assert "$" not in expr, (title, expr)
    assert any('instance=~".*"' in expr for _, expr in queries)
    assert any("[1m]" in expr for _, expr in queries)
