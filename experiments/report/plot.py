"""The report's figure: accuracy on tail vs head targets, and the long-tail weight's accuracy
against coverage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {k: m for k, m in report["models"].items() if "test" in m}  # main-view rows
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [m["label"] for m in models.values()]
    x = np.arange(len(labels))
    tail = [m["test"]["tail"]["ndcg@10"] for m in models.values()]
    head = [m["test"]["head"]["ndcg@10"] for m in models.values()]
    left.bar(x - 0.2, tail, 0.4, label="tail targets")
    left.bar(x + 0.2, head, 0.4, label="head targets")
    left.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("NDCG@10 (test)")
    left.set_title("Accuracy on tail vs head targets")
    left.legend()

    sweep = report["long_tail_sweep"]
    cov = [s["torch"]["coverage@10"] for s in sweep]
    ndcg = [s["torch"]["ndcg@10"] for s in sweep]
    right.plot(cov, ndcg, "o-", label="ours, text + ID")
    for s, cx, ny in zip(sweep, cov, ndcg, strict=True):
        right.annotate(
            f"w={s['weight']:g}\nAPLT {s['torch']['aplt@10']:.2f}",
            (cx, ny),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    for name in ("ease", "itemknn", "sasrec"):
        if name not in models:
            continue
        t = models[name]["test"]
        right.plot([t["coverage@10"]], [t["ndcg@10"]], "s", label=models[name]["label"])
    right.set_xlabel("Coverage@10")
    right.set_ylabel("NDCG@10 (test)")
    right.set_title("Long-tail weight: accuracy vs coverage")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
