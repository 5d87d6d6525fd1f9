"""The Prometheus alerting rules (monitoring/vmpower-alerts.yml), their runbooks and their tests.

promtool (Debian's ``prometheus`` package, installed by scripts/setup.sh) checks the rules and
runs their unit tests (tests/monitoring/vmpower-alerts-test.yml); without it these tests fail,
they do not skip. The rest is checked here: every alert has a runbook that exists and names it,
the annotations operators rely on, and only metric names vmpower writes in the expressions.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from . import metric_names

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "vmpower-alerts.yml"
RULE_TESTS = REPO / "tests" / "monitoring" / "vmpower-alerts-test.yml"
DOCS = REPO / "docs"
RUNBOOKS = DOCS / "runbooks"

# The metric names vmpower writes (the metrics contract), as Prometheus shows them.
VMPOWER_METRICS = metric_names.SERIES

RUNBOOK_SECTIONS = ("## What it means", "## Impact", "## How to confirm it", "## How to fix it",
                    "## When to escalate, what not to do")

# PromQL words that look like names but are not metrics.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')
_LABEL_LIST = re.compile(r"\b(?:on|ignoring|group_left|group_right|by|without)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression reads: identifiers that are not functions (followed
    by a parenthesis), keywords, label names, durations or strings; plus {__name__="..."}."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)       # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)      # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)            # on(...), by (...), group_left(...)
    for match in _IDENTIFIER.finditer(text):
        if text[match.end():].lstrip().startswith("(") or match.group(0) in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (it is in Debian's `prometheus` package: "
                    "`apt-get install --no-install-recommends prometheus`, which scripts/setup.sh "
                    "does); the alerting rules cannot be checked without it", pytrace=False)
    return path


def _run_promtool(*args: str) -> None:
    proc = subprocess.run([_promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, (f"promtool {' '.join(args)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


def _alerts() -> list:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


ALERT_NAMES = [rule["alert"] for rule in _alerts()]


def test_promtool_check_rules():
    _run_promtool("check", "rules", str(RULES.relative_to(REPO)))


def test_promtool_rule_unit_tests():
    _run_promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))


def test_rules_file_shape():
    rules = yaml.safe_load(RULES.read_text())
    assert [group["name"] for group in rules["groups"]] == ["vmpower"]
    assert len(ALERT_NAMES) == len(set(ALERT_NAMES)), "an alert name is used twice"
    assert ALERT_NAMES, "no alert in the rules file"


@pytest.mark.parametrize("alert", _alerts(), ids=ALERT_NAMES)
def test_alert_labels_and_annotations(alert):
    name = alert["alert"]
    assert re.fullmatch(r"VMPower(?:[A-Z][a-z0-9]+)+", name), f"{name}: not a CamelCase VMPower* name"
    assert "for" in alert, f"{name}: no `for:` duration"
    assert alert.get("labels", {}).get("severity") in {"warning", "critical"}, name
    annotations = alert.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert str(annotations.get(key, "")).strip(), f"{name}: no {key} annotation"
    assert annotations["runbook_url"] == f"runbooks/{name}.md"


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_every_alert_has_its_runbook(name):
    runbook = RUNBOOKS / f"{name}.md"
    assert runbook.is_file(), f"{name}: no runbook at {runbook.relative_to(REPO)}"
    text = runbook.read_text()
    assert text.splitlines()[0] == f"# {name}", f"{runbook.name}: the title does not name the alert"
    missing = [section for section in RUNBOOK_SECTIONS if section not in text.splitlines()]
    assert not missing, f"{runbook.name}: sections missing: {missing}"
    assert f"({name}.md)" in (RUNBOOKS / "README.md").read_text(), f"runbooks/README.md does not list {name}"
    assert f"(runbooks/{name}.md)" in (DOCS / "metrics.md").read_text(), f"docs/metrics.md does not list {name}"


@pytest.mark.parametrize("alert", _alerts(), ids=ALERT_NAMES)
def test_alert_uses_only_vmpower_metrics(alert):
    names = metric_names(alert["expr"])
    assert names, f"{alert['alert']}: no metric name found in {alert['expr']!r}"
    assert names <= VMPOWER_METRICS, (f"{alert['alert']}: metric names vmpower does not write: "
                                      f"{sorted(names - VMPOWER_METRICS)}")


def test_metric_names_parser():
    assert metric_names('time() - vmpower_last_sync_timestamp_seconds > on(instance, job) group_left() '
                        '2 * vmpower_sync_interval_seconds') == {"vmpower_last_sync_timestamp_seconds",
                                                                 "vmpower_sync_interval_seconds"}
    assert metric_names('increase(vmpower_vm_restarts_total{name="up"}[30m] offset 5m) >= 3') == {
        "vmpower_vm_restarts_total"}
    assert metric_names('sum by (instance) (rate(node_cpu_seconds_total[5m])) > 1e3 and up') == {
        "node_cpu_seconds_total", "up"}
    assert metric_names('{__name__="vmpower_vms_error"} > 0') == {"vmpower_vms_error"}


def test_every_alert_is_unit_tested_firing_and_silent():
    """The promtool tests hold, for each alert, a case where it fires and one where it does not
    (the pending phase included), on series named as vmpower names them."""
    spec = yaml.safe_load(RULE_TESTS.read_text())
    firing, silent = set(), set()
    for case in spec["tests"]:
        for series in case.get("input_series", []):
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", series["series"]).group(0)
            assert name in VMPOWER_METRICS, f"input series {name} is not a name vmpower writes"
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(ALERT_NAMES) - firing == set(), "alerts never seen firing"
    assert set(ALERT_NAMES) - silent == set(), "alerts never seen silent"
