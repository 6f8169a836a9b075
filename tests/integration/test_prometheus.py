"""The chart's dashboard and alert queries against a real Prometheus scraping the real stack.

`tests/unit/test_alerts.py` proves the PromQL parses; this proves it finds data: a real
`prometheus` scrapes the gateway and Triton of the `stack` fixture under the job names the
rendered rules select, real Recommend, RecommendBatch and Feedback traffic flows, and every
dashboard panel query and every alert expression must return at least one series.

Alert expressions are comparisons (`... > threshold`, `... == 0`, `A > 0 unless B > 0`): empty
while the alert is not firing, which proves nothing. For those, each non-constant operand of the
top-level comparison and set operators (`prometheus_util.comparison_operands`) must return data,
and the full expression must still evaluate without error. An error ratio (numerator: server-side
codes only) is legitimately empty until the first server-side error; see
`test_error_ratio_is_zero_without_server_errors`.

The `stack` fixture is imported from tests/support/stack.py; pytest registers it for this module,
so the stack (training, export, Triton, gateway) is built a second time when both modules run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.gen.ltrec.v1 import recommender_pb2
from tests.integration.prometheus_util import (
    PrometheusServer,
    comparison_operands,
)
from tests.support.helm import CHART, rendered_rules
from tests.support.stack import (  # noqa: F401  (fixture `stack`)
    Stack,
    _request,
    click_feedback,
    serving_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = CHART / "files" / "dashboard.json"
RATE_INTERVAL = "1m"
RECOMMEND_REQUESTS = 20
DATA_TIMEOUT_S = 90.0
# The error-ratio numerator: only server-side codes count (alerts.yaml, dashboard.json).
SERVER_ERRORS_MATCHER = 'code=~"INTERNAL|'
# Alerts that must not fire while the stack is healthy and serving.
HEALTHY_SILENT_ALERTS = ("LtrecTritonNotReady", "LtrecTritonNoSuccessfulInferences")


@dataclass
class Monitored:
    prometheus: PrometheusServer
    rules: dict[str, Any]
    gateway_job: str
    triton_job: str


def _job_of(rules: dict[str, Any], metric_prefix: str) -> str:
    """The one `job` the rendered rules select for metrics starting with `metric_prefix`."""
    jobs = {
        match.group(1)
        for group in rules["groups"]
        for rule in group["rules"]
        for match in re.finditer(rf'{metric_prefix}\w*\{{job="([^"]+)"', rule["expr"])
    }
    assert len(jobs) == 1, f"{metric_prefix}*: expected one job in the rules, found {jobs}"
    return jobs.pop()


def _has_data(answer: dict[str, Any]) -> bool:
    """At least one series with a finite value (a 0/0 ratio or a quantile of no increase is NaN)."""
    return answer.get("status") == "success" and any(
        math.isfinite(float(series["value"][1])) for series in answer["data"]["result"]
    )


def _describe(expr: str, answer: dict[str, Any]) -> str:
    if answer.get("status") != "success":
        return f"{expr}\n    error: {answer.get('errorType')}: {answer.get('error')}"
    return f"{expr}\n    result: {json.dumps(answer['data']['result'])[:300]}"


def dashboard_queries(gateway_job: str, triton_job: str) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel target, with Grafana's variables substituted as a user
    of this deployment would pick them (the variables' own `label_values` queries are checked in
    `test_dashboard_variables_find_the_jobs`)."""
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {
        "$__rate_interval": RATE_INTERVAL,
        "$gateway_job": gateway_job,  # used in `=~`: the chart's names have no regex specials
        "$triton_job": triton_job,
    }
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def alert_queries(rules: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (rule.get("alert") or rule["record"], rule["expr"].strip())
        for group in rules["groups"]
        for rule in group["rules"]
    ]


@pytest.fixture(scope="module")
def monitored(
    stack: Stack,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Monitored]:
    """Prometheus scraping the stack every second, with the chart's rules loaded, after real
    traffic (including one INVALID_ARGUMENT, and a Feedback) has been scraped."""
    rules = rendered_rules()
    gateway_job = _job_of(rules, "ltrec_gateway_")
    triton_job = _job_of(rules, "nv_")
    targets = {
        gateway_job: f"127.0.0.1:{stack.gateway.metrics_port}",
        triton_job: f"127.0.0.1:{stack.triton.metrics_port}",
    }
    scrape_configs = [
        {"job_name": job, "static_configs": [{"targets": [address]}]}
        for job, address in targets.items()
    ]
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    prometheus = PrometheusServer(workdir, scrape_configs, rule_groups=rules)
    try:
        prometheus.start()

        def targets_up() -> bool:
            health = {t["labels"]["job"]: t["health"] for t in prometheus.targets()}
            return health == dict.fromkeys(targets, "up")

        prometheus.poll_until(targets_up, DATA_TIMEOUT_S, f"scraping {targets}")
        requests = f'ltrec_gateway_requests_total{{job="{gateway_job}"}}'

        def send(ok_requests: int, then_scraped: str) -> None:
            for _ in range(ok_requests):
                stack.stub.Recommend(_request(stack.history, k=10), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stack.stub.Recommend(_request(stack.history, k=0), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A RecommendBatch stream too (its requests have counters of their own).
            batch = [_request(stack.history, k=k) for k in (5, 0, 5)]
            stream = (recommender_pb2.RecommendBatchRequest(request=r) for r in batch)
            answers = list(stack.stub.RecommendBatch(stream, timeout=30))
            assert sorted(a.WhichOneof("result") for a in answers) == ["error", *["response"] * 2]
            # A click on a served list (the feedback store's commit latency has a panel).
            served = stack.stub.Recommend(_request(stack.history, k=5), timeout=10)
            clicked = served.items[0].item_id
            feedback = click_feedback(served.request_id, "prometheus-user", [clicked], 1_000)
            stack.stub.FeedbackBatch(feedback, timeout=10)
            # Audience and ForecastDemand over the store's users (their panel's quantiles).
            audience = recommender_pb2.AudienceRequest(item_id=clicked, k=3)
            stack.stub.Audience(audience, timeout=30)
            forecast = recommender_pb2.ForecastDemandRequest(item_ids=[clicked])
            stack.stub.ForecastDemand(forecast, timeout=30)
            similar = recommender_pb2.SimilarItemsRequest(basket_item_ids=[clicked], k=3)
            stack.stub.SimilarItems(similar, timeout=10)
            prometheus.poll_until(
                lambda: _has_data(prometheus.query(then_scraped)),
                DATA_TIMEOUT_S,
                f"seeing {then_scraped}",
            )

        # The gateway creates a `code` series at its first increment and rate() sees no increase
        # from "absent" to n: a first request per code, then the traffic the windows measure.
        send(1, f"count({requests} > 0) >= 2")
        send(RECOMMEND_REQUESTS, f"sum(rate({requests}[1m])) > 0")
        yield Monitored(prometheus, rules, gateway_job, triton_job)
    finally:
        prometheus.stop()


def _poll_all(monitored: Monitored, checks: list[tuple[str, str]]) -> list[str]:
    """Polls until every expr has data (rule windows fill a scrape or two after the traffic);
    returns the descriptions of those that never did."""
    missing: list[str] = []

    def all_have_data() -> bool:
        missing.clear()
        for name, expr in checks:
            answer = monitored.prometheus.query(expr)
            if not _has_data(answer):
                missing.append(f"{name}: {_describe(expr, answer)}")
        return not missing

    try:
        monitored.prometheus.poll_until(all_have_data, 30.0, "returning data")
    except RuntimeError:
        monitored.prometheus.check_alive()
    return missing


def test_targets_are_scraped_under_the_rules_job_names(monitored: Monitored) -> None:
    up = monitored.prometheus.query("up == 1")
    jobs = {series["metric"]["job"] for series in up["data"]["result"]}
    assert jobs == {monitored.gateway_job, monitored.triton_job}


def test_dashboard_variables_find_the_jobs(monitored: Monitored) -> None:
    """`label_values(metric, job)` of each template variable offers the scraped job."""
    dashboard = json.loads(DASHBOARD.read_text())
    expected = {"gateway_job": monitored.gateway_job, "triton_job": monitored.triton_job}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert match, f"${variable['name']}: unexpected query {variable['definition']}"
        metric, label = match.groups()
        answer = monitored.prometheus.query(metric)
        values = {series["metric"].get(label) for series in answer["data"]["result"]}
        assert values == {expected[variable["name"]]}, variable["definition"]


def test_every_dashboard_query_returns_data(monitored: Monitored) -> None:
    checks = []
    for title, expr in dashboard_queries(monitored.gateway_job, monitored.triton_job):
        checks.append((title, expr))
    missing = _poll_all(monitored, checks)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)


def test_every_alert_expression_evaluates_and_its_operands_return_data(
    monitored: Monitored,
) -> None:
    checks = []
    for name, expr in alert_queries(monitored.rules):
        answer = monitored.prometheus.query(expr)
        assert answer["status"] == "success", f"{name}: {_describe(expr, answer)}"
        for operand in comparison_operands(expr):
            checks.append((name, operand))
    assert {name for name, _ in checks} >= {name for name, _ in alert_queries(monitored.rules)}
    missing = _poll_all(monitored, checks)
    assert not missing, "alert operands without data:\n" + "\n".join(missing)


def test_health_alerts_are_silent_and_rules_load_cleanly(monitored: Monitored) -> None:
    """The real Prometheus loads the rendered rules and evaluates them without error; the alerts
    about Triton's health do not fire while it serves."""
    prometheus = monitored.prometheus
    expected = {name for name, _ in alert_queries(monitored.rules)}

    def all_evaluated() -> bool:
        rules = {r["name"]: r for r in prometheus.rules()}
        return set(rules) == expected and all(
            r["health"] != "unknown"
            and (r["state"] == "inactive" or r["name"] not in HEALTHY_SILENT_ALERTS)
            for r in rules.values()
        )

    try:  # a health alert may be pending for one evaluation before Triton's first scrape
        prometheus.poll_until(all_evaluated, 30.0, "evaluating the rules")
    except RuntimeError:
        prometheus.check_alive()
    rules = prometheus.rules()
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        if rule["name"] in HEALTHY_SILENT_ALERTS:
            assert rule["state"] == "inactive", f"{rule['name']} is {rule['state']}: {rule}"
    for name, expr in alert_queries(monitored.rules):
        if name in HEALTHY_SILENT_ALERTS:
            assert prometheus.query(expr)["data"]["result"] == [], name


def test_error_ratio_is_zero_without_server_errors(monitored: Monitored) -> None:
    """The gateway creates its request counters at zero for every documented code at start-up,
    so the error ratio reads 0 (not "no data") while there are no server-side errors."""
    (expr,) = [e for _, e in alert_queries(monitored.rules) if SERVER_ERRORS_MATCHER in e]
    ratio = comparison_operands(expr)[0]
    assert _has_data(monitored.prometheus.query(ratio)), ratio
