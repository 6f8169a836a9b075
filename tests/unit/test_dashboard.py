"""The chart's Grafana dashboard (helm/ltrec/files/dashboard.json) against Grafana's own types.

No Grafana server runs here: `make grafana-schema` generates a JSON Schema of `Dashboard` from the
TypeScript types of the pinned `@grafana/schema` npm package (tools/grafana-schema/) into build/,
and the dashboard is validated against it. The panels the monitoring issue asks for are found by
their queries (metric and grouping), not by their titles alone.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "ltrec" / "files" / "dashboard.json"
SCHEMA = ROOT / "build" / "grafana-schema" / "dashboard.schema.json"


@pytest.fixture(scope="session")
def validator() -> jsonschema.protocols.Validator:
    """The generated schema; `make install` builds it, and so does this fixture when it is
    missing (a plain `pytest` on a fresh checkout)."""
    if not SCHEMA.is_file():
        built = subprocess.run(
            ["make", "-s", "grafana-schema"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert built.returncode == 0 and SCHEMA.is_file(), built.stdout + built.stderr
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def errors(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_schema_is_grafanas_dashboard_type(validator: jsonschema.protocols.Validator) -> None:
    schema = validator.schema
    assert schema["$ref"] == "#/definitions/Dashboard"
    dashboard = schema["definitions"]["Dashboard"]
    assert {"panels", "templating", "schemaVersion", "uid"} <= set(dashboard["properties"])
    assert {"Panel", "RowPanel", "GridPos", "DataSourceRef"} <= set(schema["definitions"])


def test_dashboard_is_valid(
    validator: jsonschema.protocols.Validator, dashboard: dict[str, Any]
) -> None:
    assert errors(validator, dashboard) == []


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("panels", 0, "gridPos", "w"), "twelve", "panels/0"),  # a number in Grafana's GridPos
        (("panels", 1, "id"), "2", "panels/1"),
        (("panels", 2, "targets"), {"refId": "A"}, "panels/2"),
        (("schemaVersion",), "39", "schemaVersion"),
        (("templating", "list", 0, "current"), {}, "templating/list/0/current"),
        (("templating", "list", 1, "refresh"), 7, "templating/list/1/refresh"),
    ],
)
def test_a_broken_dashboard_is_rejected(
    validator: jsonschema.protocols.Validator,
    dashboard: dict[str, Any],
    path: tuple[str | int, ...],
    value: object,
    where: str,
) -> None:
    broken = copy.deepcopy(dashboard)
    parent: Any = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    found = errors(validator, broken)
    assert found and all(e.startswith(where) for e in found), found


def test_a_panel_without_its_type_is_rejected(
    validator: jsonschema.protocols.Validator, dashboard: dict[str, Any]
) -> None:
    del dashboard["panels"][3]["type"]
    assert errors(validator, dashboard)


def _grouping(expr: str) -> list[set[str]]:
    return [{label.strip() for label in m.split(",")} for m in re.findall(r"by \(([^)]*)\)", expr)]


def _panel_with(dashboard: dict[str, Any], metric: str) -> dict[str, Any]:
    found = [
        p for p in dashboard["panels"] if any(metric in t["expr"] for t in p.get("targets", []))
    ]
    assert len(found) >= 1, f"no panel queries {metric}"
    return found[0]


def test_latency_panel_has_p50_p95_p99_by_method_and_model_version(
    dashboard: dict[str, Any],
) -> None:
    panel = _panel_with(dashboard, "ltrec_gateway_request_duration_seconds_bucket")
    quantiles = sorted(
        float(re.match(r"histogram_quantile\(([0-9.]+),", t["expr"]).group(1))  # type: ignore[union-attr]
        for t in panel["targets"]
    )
    assert quantiles == [0.5, 0.95, 0.99]
    for target in panel["targets"]:
        assert {"le", "method", "model_version"} in _grouping(target["expr"]), target["expr"]
        assert "group_left (model_version) ltrec_gateway_model_info" in target["expr"]
        assert "{{model_version}}" in target["legendFormat"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


@pytest.mark.parametrize(
    ("metric", "by"),
    [
        ("ltrec_gateway_stage_duration_seconds_bucket", "stage"),
        ("nv_inference_queue_duration_us", "model"),
        ("nv_inference_compute_infer_duration_us", "model"),
        ("ltrec_gateway_requests_total", "method"),
    ],
)
def test_breakdown_panels(dashboard: dict[str, Any], metric: str, by: str) -> None:
    panel = _panel_with(dashboard, metric)
    for target in panel["targets"]:
        if metric in target["expr"]:
            assert any(by in group for group in _grouping(target["expr"])), target["expr"]


def test_error_ratio_and_in_flight_panels(dashboard: dict[str, Any]) -> None:
    rates = [
        t["expr"]
        for p in dashboard["panels"]
        for t in p["targets"]
        if t["expr"].count("ltrec_gateway_requests_total") == 2 and " / " in t["expr"]
    ]
    assert len(rates) == 1, "one error-ratio query: server-side codes / all requests"
    numerator, denominator = rates[0].split(" / ")
    assert 'code=~"INTERNAL|UNAVAILABLE' in numerator and "code" not in denominator
    in_flight = _panel_with(dashboard, "ltrec_gateway_in_flight_requests")
    assert "In-flight" in in_flight["title"]
