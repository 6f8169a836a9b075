"""The Helm chart rendered in memory: the alerting rules the PrometheusRule deploys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "ltrec"


RELEASE = "ltrec"


def rendered_rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    enabled = {"monitoring": {"prometheusRule": {"enabled": True}}}
    merged = enabled if values is None else _merge(enabled, values)
    with helm_python.Config(namespace="recsys", storage_driver="memory") as cfg:
        manifest = cfg.install(str(CHART), RELEASE, merged, dry_run="client")["manifest"]
    (rule,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "PrometheusRule"]
    return rule["spec"]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out
