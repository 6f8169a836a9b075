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
from prometheus_client.metrics import MetricWrapperBase

from server import metrics as gateway_metrics

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
        for t in p.get("targets", [])
        if t["expr"].count("ltrec_gateway_requests_total") == 2 and " / " in t["expr"]
    ]
    # By method, and by model version (a canary beside the primary version).
    assert len(rates) == 2, "error-ratio queries: server-side codes / all requests"
    assert sum("group_left (model_version)" in rate for rate in rates) == 1
    for rate in rates:
        numerator, denominator = rate.split(" / ")
        assert 'code=~"INTERNAL|UNAVAILABLE' in numerator and "code" not in denominator
    in_flight = _panel_with(dashboard, "ltrec_gateway_in_flight_requests")
    assert "In-flight" in in_flight["title"]


# --- every gateway metric on the dashboard ------------------------------------------------------

GATEWAY_METRICS: list[MetricWrapperBase] = [
    value for value in vars(gateway_metrics).values() if isinstance(value, MetricWrapperBase)
]
# Labels a panel may group or match by: the gateway metrics' own (small fixed sets), Triton's
# `model`, the histogram buckets and the scrape's target labels. Never a user or an item.
TARGET_LABELS = {"le", "job", "instance", "pod", "model"}
ALLOWED_LABELS = (
    TARGET_LABELS
    | {label for metric in GATEWAY_METRICS for label in metric._labelnames}
    | {"model_version"}
)


def _series(metric: MetricWrapperBase) -> tuple[str, str]:
    """(the name a panel queries, the metric's type): counters as `_total`, histograms by their
    `_bucket` (a quantile), the info metric as `_info`."""
    (family,) = metric.describe()
    suffix = {"counter": "_total", "histogram": "_bucket", "info": "_info"}.get(family.type, "")
    return family.name + suffix, family.type


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    panels = [*dashboard["panels"]]
    panels += [child for p in dashboard["panels"] for child in p.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _mentions(expr: str, name: str) -> bool:
    return re.search(rf"(?<![\w:]){name}(?![\w:])", expr) is not None


@pytest.mark.parametrize(
    ("series", "kind"), sorted(_series(m) for m in GATEWAY_METRICS), ids=lambda v: str(v)
)
def test_every_gateway_metric_is_on_a_panel_queried_as_its_type(
    dashboard: dict[str, Any], series: str, kind: str
) -> None:
    """A metric added to server/metrics.py needs a panel: counters as rates, histograms as
    quantiles of their bucket rates, gauges and the info metric as they are."""
    using = [e for e in _exprs(dashboard) if _mentions(e, series)]
    assert using, f"no dashboard panel queries {series}"
    for expr in using:
        if kind in ("counter", "histogram"):
            assert re.search(rf"(?:rate|increase)\({series}\{{", expr), expr
        else:
            assert not re.search(rf"(?:rate|increase)\({series}\{{", expr), expr
    if kind == "histogram":
        assert any(e.startswith("histogram_quantile(") for e in using), using


def test_the_metric_list_is_complete() -> None:
    """What the test above walks: every metric of the module, the newest ones among them."""
    names = {_series(m)[0] for m in GATEWAY_METRICS}
    assert len(names) == len(GATEWAY_METRICS) >= 30
    assert {
        "ltrec_gateway_recommend_history_source_total",
        "ltrec_gateway_history_store_errors_total",
        "ltrec_gateway_filtered_requests_total",
        "ltrec_gateway_batch_requests_in_flight",
        "ltrec_gateway_forgotten_records_total",
    } <= names


def test_panels_group_only_by_small_fixed_label_sets(dashboard: dict[str, Any]) -> None:
    """`by`, `on`, `group_left` and label matchers name only the metrics' own labels (no user or
    item id could become a series)."""
    for expr in _exprs(dashboard):
        grouped = re.findall(r"\b(?:by|on|without|group_left|group_right) \(([^)]*)\)", expr)
        labels = {label.strip() for group in grouped for label in group.split(",") if label.strip()}
        labels |= set(re.findall(r"[{,]\s*(\w+)\s*[!=]~?", expr))
        assert labels <= ALLOWED_LABELS, (expr, labels - ALLOWED_LABELS)


def test_panel_ids_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = [*dashboard["panels"]]
    panels += [child for p in dashboard["panels"] for child in p.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]
