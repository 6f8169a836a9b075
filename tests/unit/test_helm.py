"""The Helm chart (helm/ltrec): lint, render, validate every object against Kubernetes 1.30.

Rendering uses the embedded Helm SDK (helm-python-sdk), manifests are checked with
kubernetes-validate's strict schemas and the Prometheus-operator kinds with cloudcoil's models.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

from server import metrics, tracing
from server.config import GatewayConfig
from server.triton_client import channel_args

CHART = Path(__file__).resolve().parents[2] / "helm" / "ltrec"
KUBE_VERSION = "1.30.0"
RELEASE = "ltrec"
NAMESPACE = "recsys"
OPERATOR_KINDS = {"ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule}


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text())


VALUES = {
    "default": {},
    "gpu": values_file("gpu-values.yaml"),
    "object-store": values_file("object-store-values.yaml"),
    "access": values_file("access-values.yaml"),
    "canary": values_file("canary-values.yaml"),
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Config(namespace=NAMESPACE, storage_driver="memory") as cfg:
        manifest = cfg.install(str(CHART), RELEASE, values, dry_run="client")["manifest"]
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def lint_errors(values: dict[str, Any]) -> list[str]:
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
    return [m["error"] for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def unit_name(component: str, docs: list[dict[str, Any]] | None = None) -> str:
    """The primary unit's Deployment of a component (named by model.version: default "1")."""
    if docs is None:
        return f"{RELEASE}-{component}-v1"
    (name,) = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        and d["metadata"]["labels"]["ltrec.io/track"] == "primary"
    ]
    return str(name)


def pod_spec(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return one(docs, "Deployment", unit_name(component, docs))["spec"]["template"]["spec"]


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUES[request.param])


@pytest.mark.parametrize("name", sorted(VALUES))
def test_lint_is_clean(name: str) -> None:
    assert lint_errors(VALUES[name]) == []


def test_every_object_is_valid_for_kubernetes_1_30(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for doc in docs:
        model = OPERATOR_KINDS.get(doc["kind"])
        if model is not None:
            model.model_validate(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_rendered_kinds() -> None:
    kinds = {name: sorted(d["kind"] for d in render(v)) for name, v in VALUES.items()}
    common = [
        "Deployment",
        "Deployment",
        "NetworkPolicy",
        "NetworkPolicy",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    assert kinds["default"] == sorted(
        [*common, "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodDisruptionBudget"]
    )
    assert kinds["gpu"] == sorted(
        [
            *common,
            *["HorizontalPodAutoscaler"] * 2,
            *["PodDisruptionBudget"] * 2,
            *["ServiceMonitor"] * 2,
            "PrometheusRule",
            "ConfigMap",
        ]
    )
    assert kinds["object-store"] == sorted([*common, "PodDisruptionBudget", "PrometheusRule"])
    # A second unit: its Triton and gateway Deployments and its headless Service.
    assert kinds["canary"] == sorted(
        [
            *common,
            *["Deployment", "Deployment", "Service"],
            *["PodDisruptionBudget"] * 2,
            "PrometheusRule",
            "ConfigMap",
        ]
    )


@pytest.mark.parametrize(
    ("values", "field", "why"),
    [
        ({"gateway": {"replicaCount": -1}}, "/gateway/replicaCount", "minimum"),
        ({"triton": {"replicaCount": "two"}}, "/triton/replicaCount", "want integer"),
        ({"gateway": {"replicas": 3}}, "/gateway", "additional properties 'replicas'"),
        ({"tirton": {}}, "", "additional properties 'tirton'"),
        ({"triton": {"image": {"tag": ""}}}, "/triton/image/tag", "minLength"),
        (
            {"triton": {"grpc": {"maxConnectionAgeSeconds": -1}}},
            "/triton/grpc/maxConnectionAgeSeconds",
            "minimum",
        ),
        ({"gateway": {"image": {"tag": None}}}, "/gateway/image", "missing property 'tag'"),
        ({"model": {"source": "s3"}}, "/model/source", "value must be one of"),
        ({"model": {"pvc": {"claimName": ""}}}, "/model/pvc/claimName", "minLength"),
        ({"gateway": {"env": {"max_kk": "5"}}}, "/gateway/env", "additional properties 'max_kk'"),
        (
            {"monitoring": {"prometheusRule": {"errorRatioThreshold": 2}}},
            "/monitoring/prometheusRule/errorRatioThreshold",
            "maximum",
        ),
        (
            {"networkPolicy": {"gatewayFrom": [{"podSelecter": {}}]}},
            "/networkPolicy/gatewayFrom/0",
            "additional properties 'podSelecter'",
        ),
        (
            {"networkPolicy": {"metricsFrom": [{"ipBlock": {"except": ["10.0.0.0/8"]}}]}},
            "/networkPolicy/metricsFrom/0/ipBlock",
            "missing property 'cidr'",
        ),
        ({"gateway": {"images": {"mountPath": "images"}}}, "/gateway/images/mountPath", "pattern"),
        (
            {"gateway": {"history": {"redis": {"address": "redis://:pw@redis:6379"}}}},
            "/gateway/history/redis/address",
            "pattern",
        ),
        (
            {"gateway": {"history": {"retentionSeconds": 30}}},
            "/gateway/history/retentionSeconds",
            "minimum",
        ),
        ({"gateway": {"history": {"store": "sqlite"}}}, "/gateway/history", "'store'"),
        # The store and its address come only from gateway.history.
        (
            {"gateway": {"env": {"history_redis_address": "redis:6379"}}},
            "/gateway/env",
            "additional properties 'history_redis_address'",
        ),
        (
            {"gateway": {"images": {"readOnly": False}}},
            "/gateway/images",
            "additional properties 'readOnly'",
        ),
        # The image root comes only from gateway.images, which also mounts it.
        (
            {"gateway": {"env": {"image_root": "/images"}}},
            "/gateway/env",
            "additional properties 'image_root'",
        ),
        (
            {"gateway": {"tracing": {"exporter": "jaeger"}}},
            "/gateway/tracing/exporter",
            "value must be one of",
        ),
        (
            {"gateway": {"tracing": {"env": {"LTREC_MAX_K": "5"}}}},
            "/gateway/tracing/env",
            "additional properties 'LTREC_MAX_K'",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_field(
    values: dict[str, Any], field: str, why: str
) -> None:
    errors = "\n".join(lint_errors(values))
    assert f"at '{field}" in errors and why in errors, errors
    with pytest.raises(helm_python.HelmError, match=field.split("/")[-1] or "tirton"):
        render(values)


def test_network_policy_lets_only_gateway_pods_reach_triton_serving_ports() -> None:
    docs = render({})
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-triton")["spec"]
    triton_labels = one(docs, "Deployment", unit_name("triton"))["spec"]["template"]["metadata"][
        "labels"
    ]
    gateway_labels = one(docs, "Deployment", unit_name("gateway"))["spec"]["template"]["metadata"][
        "labels"
    ]
    selects = policy["podSelector"]["matchLabels"]
    assert selects.items() <= triton_labels.items()
    assert not selects.items() <= gateway_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    serving = [r for r in policy["ingress"] if {p["port"] for p in r["ports"]} & {8000, 8001}]
    assert len(serving) == 1
    rule = serving[0]
    assert sorted(p["port"] for p in rule["ports"]) == [8000, 8001]
    assert len(rule["from"]) == 1 and set(rule["from"][0]) == {"podSelector"}
    peer = rule["from"][0]["podSelector"]["matchLabels"]
    assert peer.items() <= gateway_labels.items()
    assert not peer.items() <= triton_labels.items()
    others = [r for r in policy["ingress"] if r is not rule]
    assert [sorted(p["port"] for p in r["ports"]) for r in others] == [[8002]]


def pod_labels(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    template = one(docs, "Deployment", unit_name(component, docs))["spec"]["template"]
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def rule_for_port(policy: dict[str, Any], port: int) -> dict[str, Any]:
    (rule,) = [r for r in policy["ingress"] if port in {p["port"] for p in r["ports"]}]
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    return rule


def test_gateway_network_policy_admits_callers_to_grpc_and_scrapers_to_metrics() -> None:
    """By default any pod of the release's namespace may call the gateway (`podSelector: {}`),
    any namespace may scrape its metrics port, and nothing else reaches gateway pods."""
    docs = render({})
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    spec = policy["spec"]
    selects = spec["podSelector"]["matchLabels"]
    assert selects.items() <= pod_labels(docs, "gateway").items()
    assert not selects.items() <= pod_labels(docs, "triton").items()
    assert selects == one(docs, "Service", f"{RELEASE}-gateway")["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress"]
    assert len(spec["ingress"]) == 2
    assert rule_for_port(spec, 50051)["from"] == [{"podSelector": {}}]
    assert rule_for_port(spec, 9100)["from"] == [{"namespaceSelector": {}}]


def test_gateway_network_policy_peers_and_ports_come_from_values() -> None:
    callers = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "storefront"}},
        },
        {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.5.0/24"]}},
    ]
    scrapers = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    docs = render(
        {
            "networkPolicy": {"gatewayFrom": callers, "metricsFrom": scrapers},
            "gateway": {"ports": {"grpc": 6000, "metrics": 6001}},
        }
    )
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    assert rule_for_port(policy["spec"], 6000)["from"] == callers
    assert rule_for_port(policy["spec"], 6001)["from"] == scrapers
    # The metrics peers apply to Triton's metrics port too; its serving ports stay gateway-only.
    triton = one(docs, "NetworkPolicy", f"{RELEASE}-triton")["spec"]
    assert rule_for_port(triton, 8002)["from"] == scrapers
    (container,) = pod_spec(docs, "gateway")["containers"]
    assert sorted(p["containerPort"] for p in container["ports"]) == [6000, 6001]


def test_network_policies_can_be_turned_off() -> None:
    docs = render({"networkPolicy": {"enabled": False}})
    assert [d for d in docs if d["kind"] == "NetworkPolicy"] == []


def test_triton_container_serves_the_repository_with_health_probes() -> None:
    docs = render({})
    (triton,) = pod_spec(docs, "triton")["containers"]
    assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert triton["command"] == ["tritonserver"]
    assert "--model-repository=/models" in triton["args"]
    assert "--model-control-mode=none" in triton["args"]
    assert sorted(p["containerPort"] for p in triton["ports"]) == [8000, 8001, 8002]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "nvidia.com/gpu" not in triton["resources"].get("limits", {})


def test_gateways_spread_over_every_ready_triton_pod() -> None:
    """The headless Service resolves to each ready Triton pod; the gateway's channel, built from
    the rendered environment, round-robins over them and retries UNAVAILABLE on the next one."""
    docs = render({"gateway": {"env": {"triton_retries": "3"}}})
    headless = one(docs, "Service", f"{RELEASE}-triton-v1")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is False
    assert (
        headless["selector"]
        == one(docs, "Deployment", unit_name("triton"))["spec"]["selector"]["matchLabels"]
    )
    # gRPC only: the ServiceMonitor's "metrics" port stays on the ClusterIP Service, scraped once.
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", 8001)]
    clusterip = one(docs, "Service", f"{RELEASE}-triton")["spec"]
    assert "clusterIP" not in clusterip and {p["name"] for p in clusterip["ports"]} == {
        "http",
        "grpc",
        "metrics",
    }

    (gateway,) = pod_spec(docs, "gateway")["containers"]
    config = GatewayConfig.from_env(gateway_env(gateway))
    assert config.triton_url.startswith(f"dns:///{RELEASE}-triton-v1.")
    args = dict(channel_args(retries=config.triton_retries, backoff_seconds=0.05))
    service_config = json.loads(args["grpc.service_config"])
    assert service_config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = service_config["methodConfig"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert args["grpc.enable_retries"] == 1

    # Triton ends connections after a minute, so gateways re-resolve and find new pods.
    (triton,) = pod_spec(docs, "triton")["containers"]
    assert "--grpc-max-connection-age=60000" in triton["args"]
    assert "--grpc-max-connection-age-grace=30000" in triton["args"]
    (triton,) = pod_spec(render({"triton": {"grpc": {"maxConnectionAgeSeconds": 0}}}), "triton")[
        "containers"
    ]
    assert not [a for a in triton["args"] if a.startswith("--grpc-max-connection-age")]


def test_gpu_mode_requests_a_gpu() -> None:
    (triton,) = pod_spec(render(VALUES["gpu"]), "triton")["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["resources"]["limits"]["memory"] == "16Gi"


def test_gateway_probes_and_environment() -> None:
    docs = render({})
    (gateway,) = pod_spec(docs, "gateway")["containers"]
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051}
    assert gateway["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    env = {e["name"]: e.get("value", "") for e in gateway["env"]}
    assert env["LTREC_TRITON_URL"] == f"dns:///{RELEASE}-triton-v1.{NAMESPACE}.svc:8001"
    assert env["LTREC_MODEL_REPOSITORY"] == "/models"
    config = GatewayConfig.from_env(env)
    assert config.grpc_port == 50051 and config.metrics_port == 9100


def gateway_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the gateway would read them; a Secret's value is a stand-in."""
    return {
        e["name"]: e.get("value")
        or (f"<{e['name']} from a Secret>" if "secretKeyRef" in e.get("valueFrom", {}) else "")
        for e in container["env"]
    }


@pytest.mark.parametrize("name", sorted(VALUES))
def test_gateway_env_names_are_config_fields(name: str) -> None:
    """A typo in an LTREC_* name would be ignored silently by the gateway (the others are the
    standard OTEL_* variables of traces)."""
    (gateway,) = pod_spec(render(VALUES[name]), "gateway")["containers"]
    env = gateway_env(gateway)
    known = {f"LTREC_{f.upper()}" for f in GatewayConfig.__dataclass_fields__}
    ltrec = {name for name in env if not name.startswith("OTEL_")}
    assert ltrec <= known, ltrec - known
    GatewayConfig.from_env(env)


def test_gateway_traces_are_off_by_default() -> None:
    (gateway,) = pod_spec(render({}), "gateway")["containers"]
    otel = {k: v for k, v in gateway_env(gateway).items() if k.startswith("OTEL_")}
    assert otel == {"OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "ltrec-gateway"}
    assert tracing.exporter_names(otel) == []


def test_gateway_traces_to_a_collector_with_more_otel_variables() -> None:
    values = {
        "gateway": {
            "tracing": {
                "exporter": "otlp",
                "serviceName": "recs-eu",
                "endpoint": "http://otel-collector.observability:4318",
                "env": {
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": 0.1,
                },
            }
        }
    }
    assert lint_errors(values) == []
    (gateway,) = pod_spec(render(values), "gateway")["containers"]
    otel = {k: v for k, v in gateway_env(gateway).items() if k.startswith("OTEL_")}
    assert otel == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "recs-eu",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    assert tracing.exporter_names(otel) == ["otlp"]


def test_model_repository_from_a_pvc_by_default() -> None:
    docs = render({})
    for component in ("triton", "gateway"):
        spec = pod_spec(docs, component)
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-repository"]
        assert volume["persistentVolumeClaim"] == {
            "claimName": "ltrec-model-repository",
            "readOnly": True,
        }
        assert "initContainers" not in spec


def test_model_bundle_from_object_store_reaches_triton_and_gateway() -> None:
    docs = render(VALUES["object-store"])
    version = VALUES["object-store"]["model"]["version"]
    for component in ("triton", "gateway"):
        deployment = one(docs, "Deployment", unit_name(component, docs))
        spec = deployment["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env["MODEL_VERSION"] == version
        assert (
            env["MODEL_BUNDLE_URL"]
            == f"s3://ltrec-models/bundles/{version}/model_repository.tar.gz"
        )
        assert env["MODEL_DIR"] == "/models"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-repository"]
        assert "emptyDir" in volume
        (main,) = spec["containers"]
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert mounts["model-repository"]["mountPath"] == "/models"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["ltrec.io/model-version"] == version


def test_gateway_tls_secret_is_mounted_and_used() -> None:
    spec = pod_spec(render(VALUES["object-store"]), "gateway")
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "ltrec-gateway-tls"
    (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert env["LTREC_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["LTREC_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    # Kubernetes' gRPC probes cannot speak TLS: readiness falls back to a TCP check.
    assert "grpc" not in container["readinessProbe"]
    assert container["readinessProbe"]["tcpSocket"]["port"] == "grpc"
    # Client certificates, as the chart's README says: the CA file through gateway.env.
    values = copy.deepcopy(VALUES["object-store"])
    values["gateway"].setdefault("env", {})["tls_client_ca_file"] = f"{mount['mountPath']}/ca.crt"
    spec = pod_spec(render(values), "gateway")
    (container,) = [c for c in spec["containers"] if c["name"] == "gateway"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert env["LTREC_TLS_CLIENT_CA_FILE"] == f"{mount['mountPath']}/ca.crt"


def test_admin_rpcs_require_credentials_by_default() -> None:
    """The chart's default: no caller may change the catalogue or erase users until tokens or
    certificate identities are given; no per-caller limit."""
    spec = pod_spec(render({}), "gateway")
    env = gateway_env(spec["containers"][0])
    assert env["LTREC_ADMIN_AUTH"] == "require"
    assert env["LTREC_MAX_CONCURRENT_PER_CALLER"] == "0"
    assert "LTREC_ADMIN_TOKENS_DIR" not in env and "LTREC_ADMIN_ALLOWED_IDENTITIES" not in env
    assert "admin-tokens" not in {v["name"] for v in spec["volumes"]}
    config = GatewayConfig.from_env(env)
    assert config.admin_auth == "require" and not config.allowed_identities


def test_admin_tokens_secret_allow_list_and_per_caller_limit_reach_the_gateway() -> None:
    values = VALUES["access"]
    spec = pod_spec(render(values), "gateway")
    (container,) = spec["containers"]
    env = gateway_env(container)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "admin-tokens"]
    assert volume["secret"] == {"secretName": "ltrec-admin-tokens", "defaultMode": 0o440}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "admin-tokens"]
    assert mount["readOnly"] is True
    assert env["LTREC_ADMIN_TOKENS_DIR"] == mount["mountPath"] == "/etc/ltrec/admin-tokens"
    config = GatewayConfig.from_env(env)
    assert config.allowed_identities == set(values["gateway"]["adminAuth"]["allowedIdentities"])
    assert config.max_concurrent_per_caller == 8
    assert config.tls_client_ca_file == "/etc/ltrec/tls/ca.crt"
    # The local-stack setting is an explicit value, never a default.
    everyone = pod_spec(render({"gateway": {"adminAuth": {"mode": "allow-all"}}}), "gateway")
    assert gateway_env(everyone["containers"][0])["LTREC_ADMIN_AUTH"] == "allow-all"


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"gateway": {"adminAuth": {"allowedIdentities": ["CN=sync"]}}},
            "allowedIdentities needs mutual TLS",
        ),
        (
            {
                "gateway": {
                    "tls": {"enabled": True, "secretName": "tls"},
                    "adminAuth": {"allowedIdentities": ["CN=sync"]},
                }
            },
            "allowedIdentities needs mutual TLS",
        ),
        # Only through adminAuth and maxConcurrentPerCaller: the schema knows no such env keys.
        (
            {"gateway": {"env": {"admin_auth": "allow-all"}}},
            "additional properties 'admin_auth' not allowed",
        ),
        ({"gateway": {"adminAuth": {"mode": "open"}}}, "mode"),
        ({"gateway": {"adminAuth": {"allowedIdentities": ["CN=a;CN=b"]}}}, "allowedIdentities"),
        ({"gateway": {"maxConcurrentPerCaller": -1}}, "maxConcurrentPerCaller"),
    ],
    ids=["no-tls", "no-client-ca", "env", "mode", "separator", "negative"],
)
def test_access_values_the_gateway_could_not_use_fail_the_install(
    values: dict[str, Any], error: str
) -> None:
    with pytest.raises(Exception, match=error):
        render(values)


def test_hpa_scales_gateway_on_cpu_and_triton_on_queue_time() -> None:
    docs = render(VALUES["gpu"])
    gateway = one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-gateway")["spec"]
    assert gateway["metrics"][0]["resource"]["name"] == "cpu"
    triton = one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-triton")["spec"]
    assert triton["metrics"][0]["type"] == "Pods"
    assert triton["metrics"][0]["pods"]["metric"]["name"] == "nv_inference_queue_duration_us"
    # Deployments scaled by an HPA leave replicas to it.
    assert "replicas" not in one(docs, "Deployment", unit_name("gateway"))["spec"]


def test_pods_run_as_non_root_without_capabilities(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True


def known_metric_names() -> set[str]:
    names: set[str] = set()
    for collector in vars(metrics).values():
        if hasattr(collector, "describe") and hasattr(collector, "_name"):
            for family in collector.describe():
                base = family.name
                names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_info"}
    return names


def test_grafana_dashboard_config_map_and_panels() -> None:
    docs = render(VALUES["gpu"])
    config_map = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["ltrec.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in (
        "p50 / p95 / p99",
        "stage",
        "queue",
        "compute",
        "rate",
        "Error ratio",
        "In-flight",
    ):
        assert any(wanted in t for t in titles), f"no panel about {wanted!r}: {titles}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    known = known_metric_names()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":  # a heading: the panels under it follow it in the list
            assert panel["panels"] == [] and not panel["collapsed"], panel["title"]
            continue
        assert panel["datasource"]["type"] == "prometheus"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
            for token in target["expr"].replace("(", " ").replace("{", " ").split():
                if token.startswith("ltrec_gateway_"):
                    assert token in known, f"{panel['title']}: unknown metric {token}"
    latency = dashboard["panels"][0]["targets"]
    assert [t["expr"].split(",")[0] for t in latency] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    ]
    assert all("ltrec_gateway_request_duration_seconds_bucket" in t["expr"] for t in latency)


def test_gateway_plaintext_only_when_allowed_and_feedback_store_per_pod() -> None:
    (gateway,) = pod_spec(render({}), "gateway")["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["LTREC_ALLOW_PLAINTEXT"]["value"] == "true"
    assert env["LTREC_FEEDBACK_REPLICA"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    claim = {"gateway": {"feedback": {"existingClaim": "ltrec-feedback"}}}
    spec = pod_spec(render(claim), "gateway")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "feedback"]
    assert volume["persistentVolumeClaim"] == {"claimName": "ltrec-feedback"}
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "feedback"]
    assert mount["mountPath"] == env["LTREC_FEEDBACK_DIR"]["value"]
    # The item store: one claim shared by every replica (they poll each other's segments).
    shared = pod_spec(render({"gateway": {"items": {"existingClaim": "ltrec-items"}}}), "gateway")
    (volume,) = [v for v in shared["volumes"] if v["name"] == "items"]
    assert volume["persistentVolumeClaim"] == {"claimName": "ltrec-items"}
    (mount,) = [m for m in shared["containers"][0]["volumeMounts"] if m["name"] == "items"]
    assert mount["mountPath"] == env["LTREC_ITEMS_DIR"]["value"]
    tls_spec = pod_spec(render(VALUES["object-store"]), "gateway")
    assert "LTREC_ALLOW_PLAINTEXT" not in {e["name"] for e in tls_spec["containers"][0]["env"]}
    with pytest.raises(Exception, match="allow plaintext explicitly"):
        render({"gateway": {"tls": {"allowPlaintext": False}}})


def test_gateway_images_volume_only_with_a_claim_and_read_only() -> None:
    """Without a claim there is no image root: image_path is refused per item, bytes still work.
    With one, the photos are mounted read-only where LTREC_IMAGE_ROOT points."""
    for values in ({}, {"gateway": {"images": {"mountPath": "/srv/photos"}}}):
        spec = pod_spec(render(values), "gateway")
        (gateway,) = spec["containers"]
        assert "LTREC_IMAGE_ROOT" not in {e["name"] for e in gateway["env"]}
        assert "images" not in {v["name"] for v in spec["volumes"]}
        assert "images" not in {m["name"] for m in gateway["volumeMounts"]}
    for images, root in (
        ({"existingClaim": "ltrec-photos"}, "/images"),
        ({"existingClaim": "ltrec-photos", "mountPath": "/srv/photos"}, "/srv/photos"),
    ):
        docs = render({"gateway": {"images": images}})
        deployment = one(docs, "Deployment", unit_name("gateway"))
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
        spec = deployment["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "images"]
        assert volume["persistentVolumeClaim"] == {"claimName": "ltrec-photos", "readOnly": True}
        (gateway,) = spec["containers"]
        (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "images"]
        assert mount == {"name": "images", "mountPath": root, "readOnly": True}
        assert [e["name"] for e in gateway["env"]].count("LTREC_IMAGE_ROOT") == 1
        env = {e["name"]: e.get("value", "") for e in gateway["env"]}
        assert GatewayConfig.from_env(env).image_root == Path(root)
    # The TLS example serves photos from a claim too, so every rendered values file covers both.
    spec = pod_spec(render(VALUES["object-store"]), "gateway")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "images"]
    assert volume["persistentVolumeClaim"]["claimName"] == "ltrec-product-photos"


def test_gateway_history_store_is_off_unless_redis_is_given() -> None:
    """Pods must share the history: the chart never uses a per-pod SQLite file."""
    (gateway,) = pod_spec(render({}), "gateway")["containers"]
    env = gateway_env(gateway)
    assert env["LTREC_HISTORY_STORE"] == "off"
    assert "LTREC_USER_HASH_KEY" not in env and "LTREC_HISTORY_REDIS_ADDRESS" not in env
    config = GatewayConfig.from_env(env)
    assert (config.history_store, config.history_retention_seconds) == ("off", 2592000)


def test_gateway_history_in_redis_with_its_password_and_hash_key_from_secrets() -> None:
    (gateway,) = pod_spec(render(VALUES["object-store"]), "gateway")["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["LTREC_HISTORY_STORE"]["value"] == "redis"
    assert env["LTREC_HISTORY_REDIS_ADDRESS"]["value"] == "ltrec-redis-master.recsys.svc:6379"
    assert env["LTREC_HISTORY_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "ltrec-redis", "key": "redis-password"}
    }
    assert env["LTREC_USER_HASH_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "ltrec-gateway-user-hash", "key": "user-hash-key"}
    }
    assert "value" not in env["LTREC_HISTORY_REDIS_PASSWORD"]  # never in the manifest in clear
    config = GatewayConfig.from_env(gateway_env(gateway))
    assert config.history_store == "redis" and config.history_retention_seconds == 1209600
    # Without a password Secret the variable is absent (a Redis without AUTH).
    values = {"gateway": {"history": {"redis": {"address": "redis:6379"}}}}
    values["gateway"]["userHashKeySecret"] = {"name": "hash"}  # type: ignore[index]
    (gateway,) = pod_spec(render(values), "gateway")["containers"]
    assert "LTREC_HISTORY_REDIS_PASSWORD" not in gateway_env(gateway)


def test_gateway_history_in_redis_needs_the_user_hash_key_once() -> None:
    redis = {"history": {"redis": {"address": "redis:6379"}}}
    with pytest.raises(helm_python.HelmError, match="needs gateway.userHashKeySecret.name"):
        render({"gateway": redis})
    with pytest.raises(helm_python.HelmError, match="set the user hash key once"):
        render(
            {
                "gateway": {
                    **redis,
                    "userHashKeySecret": {"name": "hash"},
                    "env": {"user_hash_key": "in-clear"},
                }
            }
        )


# --- Model units: no gateway reaches a Triton of another version ----------------------------------


def units(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model version -> its gateway and Triton pod specs, labels, replicas and Triton target."""
    found: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        template = doc["spec"]["template"]
        version = template["metadata"]["labels"]["ltrec.io/model-version"]
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        found.setdefault(version, {})[component] = doc
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_each_gateway_reaches_only_the_triton_pods_of_its_own_version() -> None:
    docs = render(VALUES["canary"])
    found = units(docs)
    assert sorted(found) == ["2026-11-29.1", "2026-12-06.1"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for version, unit in found.items():
        (gateway,) = unit["gateway"]["spec"]["template"]["spec"]["containers"]
        target = GatewayConfig.from_env(gateway_env(gateway)).triton_url
        host = target.removeprefix("dns:///").split(".")[0]
        selector = services[host]["spec"]["selector"]
        assert services[host]["spec"]["clusterIP"] == "None"
        for other, other_unit in found.items():
            labels = other_unit["triton"]["spec"]["template"]["metadata"]["labels"]
            assert selects(selector, labels) == (other == version), (version, other)
        # Each unit mounts its own version's directory of the claim: upgrade and rollback
        # change the files served.
        for component in ("gateway", "triton"):
            (container,) = unit[component]["spec"]["template"]["spec"]["containers"]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-repository"]
            assert mount["subPath"] == f"bundles/{version}"
    # The gateway Service spreads callers over both units' gateway pods.
    gateway_service = services[f"{RELEASE}-gateway"]["spec"]["selector"]
    for unit in found.values():
        assert selects(gateway_service, unit["gateway"]["spec"]["template"]["metadata"]["labels"])
    canary = found["2026-12-06.1"]
    assert canary["gateway"]["spec"]["replicas"] == 1
    assert canary["gateway"]["metadata"]["labels"]["ltrec.io/track"] == "canary"
    assert found["2026-11-29.1"]["gateway"]["spec"]["replicas"] == 2


def test_promotion_swaps_versions_without_replacing_a_pod() -> None:
    """Promotion exchanges model.version and canary.version: both units keep their names and pod
    templates (no pod restarts); only replica counts and the track label move."""
    before = VALUES["canary"]
    after = copy.deepcopy(before)
    after["model"]["version"], after["canary"]["version"] = (
        before["canary"]["version"],
        before["model"]["version"],
    )
    old, new = units(render(before)), units(render(after))
    assert sorted(old) == sorted(new)
    for version in old:
        for component in ("gateway", "triton"):
            a, b = old[version][component], new[version][component]
            assert a["metadata"]["name"] == b["metadata"]["name"]
            assert a["spec"]["template"] == b["spec"]["template"], (version, component)
    assert new["2026-12-06.1"]["gateway"]["metadata"]["labels"]["ltrec.io/track"] == "primary"
    assert new["2026-12-06.1"]["gateway"]["spec"]["replicas"] == 2
    assert new["2026-11-29.1"]["gateway"]["spec"]["replicas"] == 1


def test_triton_pods_outlive_their_draining_gateways() -> None:
    docs = render({})
    triton = pod_spec(docs, "triton")
    (container,) = triton["containers"]
    delay = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    env = gateway_env(pod_spec(docs, "gateway")["containers"][0])
    drain = float(env["LTREC_SHUTDOWN_DRAIN_SECONDS"]) + float(env["LTREC_SHUTDOWN_GRACE_SECONDS"])
    assert delay > drain
    assert triton["terminationGracePeriodSeconds"] > delay


def test_object_store_units_download_their_own_version() -> None:
    values = {**VALUES["object-store"], "canary": {**VALUES["canary"]["canary"]}}
    for version, unit in units(render(values)).items():
        for component in ("gateway", "triton"):
            (init,) = unit[component]["spec"]["template"]["spec"]["initContainers"]
            env = {e["name"]: e.get("value") for e in init["env"]}
            assert env["MODEL_VERSION"] == version
            assert env["MODEL_BUNDLE_URL"] == (
                f"s3://ltrec-models/bundles/{version}/model_repository.tar.gz"
            )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"canary": {"enabled": True, "version": ""}}, "/canary/version"),
        ({"canary": {"enabled": True, "version": "1"}}, "must differ from model.version"),
        ({"canary": {"enabled": True, "version": "B", "gateway": {"replicaCount": 0}}}, "minimum"),
        ({"model": {"version": "2026/12"}}, "/model/version"),
        ({"model": {"pvc": {"root": "/abs"}}}, "/model/pvc/root"),
        ({"model": {"pvc": {"subPath": "x"}}}, "additional properties 'subPath'"),
    ],
)
def test_bad_unit_values_fail_the_install(values: dict[str, Any], error: str) -> None:
    with pytest.raises(helm_python.HelmError, match=error):
        render(values)
