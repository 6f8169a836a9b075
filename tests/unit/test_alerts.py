"""Alerting rules and dashboard queries of the Helm chart, checked by the real `promtool`.

files/alerts.yaml is rendered through the chart (thresholds and job names come from values), so
the rules promtool checks are the ones the PrometheusRule deploys.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm import CHART, rendered_rules

UNIT_TESTS = CHART / "tests" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `make install` (apt-get install -y prometheus)")
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def alert_names(spec: dict[str, Any]) -> set[str]:
    return {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rendered_rules()))
    result = run(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_alert_unit_tests_pass(promtool: str, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = run(promtool, "test", "rules", str(tmp_path / UNIT_TESTS.name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert firing == alert_names(rendered_rules())


def test_thresholds_come_from_values(promtool: str, tmp_path: Path) -> None:
    spec = rendered_rules({"monitoring": {"prometheusRule": {"gatewayP99BudgetSeconds": 0.25}}})
    (p99,) = [
        r for g in spec["groups"] for r in g["rules"] if r.get("alert", "").endswith("P99High")
    ]
    assert p99["expr"].rstrip().endswith("> 0.25")
    # With a 0.25 s budget the unit test's 248.5 ms p99 no longer fires.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = run(promtool, "test", "rules", str(tmp_path / UNIT_TESTS.name))
    failures = result.stdout + result.stderr
    assert result.returncode != 0 and "alertname: LtrecGatewayLatencyP99High" in failures
    assert "alertname: LtrecGatewayErrorRatioHigh" not in failures


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables substituted, is valid PromQL."""
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    substitutions = {"$__rate_interval": "5m", "$gateway_job": ".*", "$triton_job": ".*"}
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            rules.append({"record": f"ltrec:dashboard_query_{len(rules)}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
