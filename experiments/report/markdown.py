"""The report as Markdown: the main table, then each view's section (`sections`)."""

from __future__ import annotations

from experiments.report.sections import (
    _cold_start,
    _context_ablation,
    _convergence,
    _default_weight_sentence,
    _item_to_item_section,
    _loss_ablation,
    _row,
    _short_history,
    _targets,
    _tuned,
    tail_levers_section,
)
from experiments.report.settings import (
    MODELS,
    PRECISION,
    _printed,
)


def _parts_sentence(report: dict) -> str:
    """Which part each row trained in several parts was taken from (merged reports)."""
    parts, chosen = report.get("parts") or [], report.get("chosen_on_validation") or {}
    if not parts:
        return ""
    text = f" Merged from {len(parts)} parts run separately (`--merge`)."
    if chosen:
        text += (
            " Rows trained in several parts (different schedules or settings) are taken from "
            "the run with the best validation NDCG@10 (in a refit view, the seeds of one "
            "setting averaged and the long-tail rule applied: the most validation tail "
            "NDCG@10 within 2% of the best): "
            + ", ".join(
                f"{report['models'][key]['label']}{VIEW_NAMES.get(view, '')} from part "
                f"{index + 1} (created {parts[index].get('created')})"
                for key, view, index in (
                    (*name.partition(".")[::2], index) for name, index in chosen.items()
                )
                if key in report["models"]
            )
            + "."
        )
    return text


# A refit view's name in the sentence on merged parts (`merge._REFIT_VIEWS`).
VIEW_NAMES = {"short_history": " (short-history view)", "cold_start": " (cold-start view)"}


def markdown(report: dict) -> str:
    full = report  # the other views' sections read every row; the main view's, its own rows
    report = {**report, "models": {k: m for k, m in report["models"].items() if "test" in m}}
    d, models, f = report["data"], report["models"], _printed
    lines = [
        "# Evaluation report" + (" (quick)" if d["quick"] else ""),
        "",
        f"Data `{d['dir']}`: {d['items']:,} items, {d['users_evaluated']:,} test users"
        + (f" (a sample of {d['users_sampled']:,})" if d["users_sampled"] else "")
        + f", {d['train_events']:,} training events. Leave-one-out (last event = test, "
        "second-to-last = validation), full ranking over the whole catalogue, history excluded, "
        "ties against the "
        f"target; every model trained on train, tuned on validation, reported on test. "
        f"Protocol: `docs/evaluation.md`. Created {report['created']}, took "
        f"{report['seconds'] / 60:.1f} min"
        + (
            " (1-minute load average {start:.1f} at the start, {end:.1f} at the end; the "
            "training budgets are in minutes, so a busy machine trains fewer epochs).".format(
                **report["load_average"]
            )
            if "load_average" in report
            else "."
        )
        + (
            ""
            if set(models) == set(MODELS)
            else " Only these rows were run (`--models`): "
            + ", ".join(m["label"] for m in models.values())
            + "."
        )
        + _parts_sentence(report),
        "",
        "## Accuracy (test)",
        "",
        _row(["model", "Recall@10", "NDCG@10", "Recall@50", "NDCG@50", "tuned"]),
        _row(["---"] + ["---:"] * 4 + ["---"]),
    ]
    for m in models.values():
        t = m["test"]
        lines.append(
            _row(
                [
                    m["label"],
                    f(t["recall@10"]),
                    f(t["ndcg@10"]),
                    f(t["recall@50"]),
                    f(t["ndcg@50"]),
                    _tuned(m["fit"]),
                ]
            )
        )
    lines += _targets(full)
    lines += _convergence(report)
    lines += _context_ablation(report)
    lines += _loss_ablation(report)
    lines += [
        "",
        "## Long tail (test)",
        "",
        f"Head = the top {d['head_share']:.0%} of items by training interactions, tail = the other "
        f"{d['tail_items']:,} items. {d['tail_test_cases']:,} test cases have a tail target, "
        f"{d['head_test_cases']:,} a head target. Coverage@10 = share of the catalogue in any "
        "top-10; ARP@10 = mean training popularity of recommended items; APLT@10 = mean share of "
        "tail items per list; Gini@10 = inequality of exposure over the catalogue "
        "(1 = one item gets all).",
        "",
        _row(
            [
                "model",
                "tail Recall@10",
                "tail NDCG@10",
                "head Recall@10",
                "head NDCG@10",
                "Coverage@10",
                "ARP@10",
                "APLT@10",
                "Gini@10",
            ]
        ),
        _row(["---"] + ["---:"] * 8),
    ]
    for m in models.values():
        t = m["test"]
        lines.append(
            _row(
                [
                    m["label"],
                    f(t["tail"]["recall@10"]),
                    f(t["tail"]["ndcg@10"]),
                    f(t["head"]["recall@10"]),
                    f(t["head"]["ndcg@10"]),
                    f(t["coverage@10"]),
                    f"{t['arp@10']:.1f}",
                    f(t["aplt@10"]),
                    f(t["gini@10"]),
                ]
            )
        )
    lines += _cold_start(full)
    lines += _short_history(full)
    if not report["long_tail_sweep"]:  # a part run without the main view
        return "\n".join(lines + [""])
    lines += [
        "",
        "## Serving-time long-tail weight (ours, text + ID)",
        "",
        "Scores adjusted as served: `score - w * log(1 + count)`, where an item's count is "
        + _term_count_phrase(report)
        + ". Each figure computed twice: "
        "in torch (full ranking) and through the exported ONNX graphs run by onnxruntime "
        "(user_encoder -> context_weighting -> scorer, top-50 read from the scorer's output). "
        + _default_weight_sentence(report),
        "",
        _row(
            [
                "w",
                "Recall@10",
                "NDCG@10",
                "NDCG@10 (ONNX)",
                "Coverage@10",
                "Coverage@10 (ONNX)",
                "APLT@10",
                "APLT@10 (ONNX)",
                "ARP@10",
                "Gini@10",
            ]
        ),
        _row(["---:"] * 10),
    ]
    for s in report["long_tail_sweep"]:
        t, o = s["torch"], s["onnx"]
        lines.append(
            _row(
                [
                    f"{s['weight']:g}" + (" (default)" if s.get("default") else ""),
                    f(t["recall@10"]),
                    f(t["ndcg@10"]),
                    f(o["ndcg@10"]),
                    f(t["coverage@10"]),
                    f(o["coverage@10"]),
                    f(t["aplt@10"]),
                    f(o["aplt@10"]),
                    f"{t['arp@10']:.1f}",
                    f(t["gini@10"]),
                ]
            )
        )
    matches = all(s["parity"]["match_at_printed_precision"] for s in report["long_tail_sweep"])
    worst = max(s["parity"]["max_abs_diff"] for s in report["long_tail_sweep"])
    lines += [
        "",
        f"ONNX vs torch, every figure of every weight (Recall/NDCG@10/50, Coverage, ARP, APLT, "
        f"Gini): {'identical' if matches else 'NOT identical'} as printed ({PRECISION} decimals, "
        f"ARP 1); largest absolute difference {worst:.2g}"
        + (
            " (below the printed precision of the figure it is in)."
            if matches and worst >= 0.5 * 10**-PRECISION
            else "."
        ),
        "",
        "![long-tail plot](report.png)",
        "",
    ]
    lines += _popularity_term_ablation(report)
    lines += tail_levers_section(report)
    lines += _item_to_item_section(report)
    return "\n".join(lines)


def _term_count_phrase(report: dict) -> str:
    counts = (report.get("long_tail_default") or {}).get("counts", "popularity")
    if counts.startswith("exposure@"):
        depth = counts.split("@", 1)[1]
        return (
            f"its exposure: 1 + how many training users' top-{depth} lists hold it (weight 0, "
            "validation histories; 0 for an item nobody trained on)"
        )
    return "its training popularity"


def _popularity_term_ablation(report: dict) -> list[str]:
    """The served term (exposure) against the term on training popularity, each at the default
    the same validation rule chooses for it; nothing for a report from before exposure."""
    default = report.get("long_tail_default") or {}
    ablation = default.get("popularity_term")
    served = next((s for s in report["long_tail_sweep"] if s.get("default")), None)
    if not ablation or served is None:
        return []
    f = _printed
    zero = next(s for s in report["long_tail_sweep"] if s["weight"] == 0.0)["torch"]

    def row(label: str, weight: float, valid: dict, t: dict, tail_ndcg: float | None) -> str:
        cost = t["ndcg@10"] / zero["ndcg@10"] - 1 if zero["ndcg@10"] else 0.0
        return _row(
            [
                label,
                f"{weight:g}",
                f(valid["ndcg@10"]),
                f(valid["coverage@10"]),
                f(t["ndcg@10"]),
                f"{cost:+.2%}",
                "-" if tail_ndcg is None else f(tail_ndcg),
                f(t["coverage@10"]),
                f(t["aplt@10"]),
            ]
        )

    chosen = next(r for r in default["grid"] if r["weight"] == default["chosen"])
    tail_at_default = (default.get("test_tail") or {}).get("ndcg@10")
    return [
        "The term's count, ablated: each count at the default the same rule chooses for it on "
        "validation (the largest weight within "
        f"{default['tolerance']:.0%} of weight 0's validation NDCG@10). Cost = test NDCG@10 "
        "against weight 0's.",
        "",
        _row(
            [
                "count",
                "w",
                "validation NDCG@10",
                "validation Coverage@10",
                "test NDCG@10",
                "cost",
                "tail NDCG@10",
                "Coverage@10",
                "APLT@10",
            ]
        ),
        _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
        row(
            f"exposure ({default.get('counts', '')}, served)",
            default["chosen"],
            chosen,
            served["torch"],
            tail_at_default,
        ),
        row(
            "training popularity (served before)",
            ablation["chosen"],
            ablation["validation"],
            ablation["test"],
            (ablation.get("test_tail") or {}).get("ndcg@10"),
        ),
        "",
    ]
