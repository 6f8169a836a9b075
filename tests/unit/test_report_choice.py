"""How the report chooses between settings: the long-tail rule (`long_tail_choice`) in a row's
screen and between parts, seeds of one setting averaged by the merge, and the default grid's
teacher points."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import ltrec.train
from experiments.report import fitting, views
from experiments.report.fitting import with_settings
from experiments.report.merge import _SAME_DATA, merge_reports
from experiments.report.sections import _compared, _seeds
from experiments.report.settings import (
    SHORT_VIEW_EPOCHS,
    TEACHER_DEBIAS,
    ReportConfig,
    grid_keys,
    long_tail_choice,
    quick_config,
)
from ltrec import neural_baselines
from ltrec.prepared import prepare

BASE = {"lr": 2e-3, "distill_weight": 1.0}


def test_the_long_tail_rule_takes_the_most_debiased_setting_within_two_percent() -> None:
    points = [
        {**BASE, "distill_debias": 0.6, "ndcg@10": 0.1077},  # the best
        {**BASE, "distill_debias": 1.0, "ndcg@10": 0.1075},
        {**BASE, "distill_debias": 1.5, "ndcg@10": 0.1068},
        {**BASE, "distill_debias": 2.0, "ndcg@10": 0.1040},  # 3.4% below: out
        {**BASE, "ndcg@10": 0.1070},  # no debias: counts as 0
    ]
    assert long_tail_choice(points, 0) == 2
    # a looser tolerance reaches further; none keeps the best
    assert long_tail_choice(points, 0, tolerance=0.05) == 3
    assert long_tail_choice(points, 0, tolerance=0.0) == 0
    # a setting that differs in anything else is never a candidate, however well it validates
    other = [{**points[0]}, {**BASE, "lr": 1e-3, "distill_debias": 2.0, "ndcg@10": 0.1076}]
    assert long_tail_choice(other, 0) == 0
    # figures (other than the chosen key) and timings are not settings
    timed = [
        {**points[0], "epoch": 50, "seconds": 9.0, "recall@10": 0.2},
        {**points[2], "epoch": 31, "seconds": 7.0, "recall@10": 0.1},
    ]
    assert long_tail_choice(timed, 0) == 1


def test_the_long_tail_rule_measures_the_most_tail_by_validation_when_it_can() -> None:
    """Two tail settings (the teacher's debias, its cosine share) have no common order: where
    every candidate has a validation tail figure, the highest within 2% is kept."""
    points = [
        {**BASE, "distill_debias": 1.0, "ndcg@10": 0.1079, "tail_ndcg@10": 0.038},  # the best
        {**BASE, "distill_debias": 2.0, "ndcg@10": 0.1065, "tail_ndcg@10": 0.044},
        {
            **BASE,
            "distill_debias": 1.0,
            "distill_cosine": 0.5,
            "ndcg@10": 0.1070,
            "tail_ndcg@10": 0.047,
        },  # fmt: skip
        {
            **BASE,
            "distill_debias": 0.0,
            "distill_cosine": 1.0,
            "ndcg@10": 0.1040,
            "tail_ndcg@10": 0.060,
        },  # fmt: skip  # 3.6% below: out
    ]
    assert long_tail_choice(points, 0) == 2
    # without the figure on every candidate, the settings' order decides (debias first)
    del points[2]["tail_ndcg@10"]
    assert long_tail_choice(points, 0) == 1
    # a higher tail figure never brings in a setting that differs in anything else
    other = [points[0], {**BASE, "lr": 1e-3, "ndcg@10": 0.1078, "tail_ndcg@10": 0.09}]
    assert long_tail_choice(other, 0) == 0


def test_the_merge_measures_the_tail_by_each_settings_mean_validation_figure() -> None:
    def part(valid: float, valid_tail: float, test: float, **fixed: float) -> dict:
        view = _short(valid, test, 0.0, **fixed)
        view["short_history"]["fit"]["best"]["tail_ndcg@10"] = valid_tail
        return _part(view)

    parts = [
        part(0.1080, 0.038, 0.113, distill_debias=1.0, seed=1.0),
        part(0.1078, 0.039, 0.113, distill_debias=1.0, seed=2.0),
        part(0.1066, 0.044, 0.109, distill_debias=2.0, seed=1.0),
        part(0.1064, 0.045, 0.109, distill_debias=2.0, seed=2.0),
        part(0.1072, 0.048, 0.118, distill_debias=1.0, distill_cosine=0.5, seed=1.0),
        part(0.1070, 0.046, 0.116, distill_debias=1.0, distill_cosine=0.5, seed=2.0),
    ]
    merged = merge_reports(parts)
    view = merged["models"]["ours"]["short_history"]
    assert view["ndcg@10"] == pytest.approx(0.117)  # the cosine setting's two seeds
    assert merged["chosen_on_validation"] == {"ours.short_history": 4}
    # the report's table of what was compared: best validation first, the kept one marked,
    # only the settings that differ, a long-tail key left out shown as 0
    table = view["compared"]
    assert [row["settings"] for row in table] == [
        {"distill_cosine": 0.0, "distill_debias": 1.0},
        {"distill_cosine": 0.5, "distill_debias": 1.0},
        {"distill_cosine": 0.0, "distill_debias": 2.0},
    ]
    assert [row["kept"] for row in table] == [False, True, False]
    assert [row["best_on_validation"] for row in table] == [True, False, False]
    assert table[0]["validation_ndcg@10"] == pytest.approx(0.1079)
    assert table[1]["validation_tail_ndcg@10"] == pytest.approx(0.047)
    assert table[2]["ndcg@10"] == pytest.approx(0.109) and table[1]["seeds"] == [1, 2]
    lines = _compared("ours", table)
    assert len(lines) == 5 + len(table)
    assert lines[6].startswith("| distill_cosine 0.5, distill_debias 1 | 1, 2 | 0.1071 | 0.0470 |")
    assert lines[6].endswith("| **kept** |") and lines[5].endswith("| best on validation |")
    assert _compared("ours", table[:1]) == []  # nothing to compare
    # a run whose settings its own screen chose is named by its part
    screened = _part(_short(0.1090, 0.120, 0.030))
    del screened["models"]["ours"]["short_history"]["fit"]["fixed_settings"]
    table = merge_reports([*parts, screened])["models"]["ours"]["short_history"]["compared"]
    assert table[0]["part"] == 6 and table[0]["settings"] == {} and table[0]["kept"]
    assert "its run's own screen (part 7)" in _compared("ours", table)[5]
    # a run without a validation figure is listed last, its figure left blank
    unvalidated = _part(_short(0.0, 0.130, 0.040, distill_debias=3.0))
    del unvalidated["models"]["ours"]["short_history"]["fit"]["best"]["ndcg@10"]
    table = merge_reports([*parts, unvalidated])["models"]["ours"]["short_history"]["compared"]
    assert table[-1]["validation_ndcg@10"] is None and not table[-1]["kept"]
    assert _compared("ours", table)[-1].startswith("| distill_cosine 0, distill_debias 3 | 0 |  |")
    # one seed without the figure: the settings' order decides, and debias 2 is kept
    del parts[5]["models"]["ours"]["short_history"]["fit"]["best"]["tail_ndcg@10"]
    assert merge_reports(parts)["models"]["ours"]["short_history"]["ndcg@10"] == pytest.approx(
        0.109
    )


def test_the_default_grid_screens_the_debiased_teacher() -> None:
    grid = ReportConfig().neural_grids["ours"]
    taught = [point for point in grid if point.get("distill_weight")]
    plain = [point for point in taught if not point.get("distill_cosine")]
    assert sorted(point["distill_debias"] for point in plain) == sorted(TEACHER_DEBIAS)
    assert len(TEACHER_DEBIAS) > 1  # several, for the long-tail rule to choose between
    # and the cosine co-teacher, which differs from them only in long-tail settings
    (cosine,) = [point for point in taught if point.get("distill_cosine")]
    assert cosine["distill_cosine"] == 0.5 and cosine["distill_debias"] == 1.0
    assert with_settings(ltrec.train.TrainConfig(), cosine).distill_cosine == 0.5
    for point in grid:  # every point is a valid training config
        train = with_settings(ltrec.train.TrainConfig(), point)
        assert train.distill_weight == point.get("distill_weight", 0.0)
    assert {"lr", "set_context", "distill_debias", "embedding_dim"} <= set(grid_keys(grid))
    # the teacher's points differ only in the debias: the rule can move between them
    best = {**taught[0], "ndcg@10": 0.1}
    assert long_tail_choice([best, {**taught[-1], "ndcg@10": 0.099}], 0) == 1


def test_seed_is_a_setting() -> None:
    assert with_settings(ltrec.train.TrainConfig(), {"seed": 2.0}).seed == 2
    for bad in (1.5, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="seed must be a whole number"):
            with_settings(ltrec.train.TrainConfig(), {"seed": bad})


def _part(views: dict[str, dict]) -> dict:
    return {
        "data": {key: 1 for key in _SAME_DATA},
        "models": {"ours": {"label": "o", **views}},
        "seconds": 1.0,
    }


def _short(valid: float, test: float, tail: float, **fixed: float) -> dict:
    return {
        "short_history": {
            "ndcg@10": test,
            "tail": {"ndcg@10": tail},
            "fit": {"best": {"ndcg@10": valid}, "fixed_settings": {**BASE, **fixed}},
        }
    }


def test_the_merge_applies_the_long_tail_rule_between_parts() -> None:
    parts = [
        _part(_short(0.1077, 0.115, 0.032, distill_debias=0.6)),
        _part(_short(0.1067, 0.111, 0.038, distill_debias=2.0)),
        _part(_short(0.1000, 0.108, 0.050, distill_debias=3.0)),  # 7% below: out
        _part(_short(0.1076, 0.116, 0.031, lr=1e-3, distill_debias=4.0)),  # another lr
    ]
    for order in (parts, parts[::-1]):
        merged = merge_reports(order)
        view = merged["models"]["ours"]["short_history"]
        assert view["tail"] == {"ndcg@10": 0.038}
        assert merged["chosen_on_validation"] == {"ours.short_history": order.index(parts[1])}


def test_the_merge_averages_the_seeds_of_one_setting() -> None:
    seed0 = _part(_short(0.104, 0.110, 0.030, distill_debias=0.6))
    seed1 = _part(_short(0.106, 0.114, 0.034, distill_debias=0.6, seed=1.0))
    lone = _part(_short(0.1055, 0.200, 0.100, distill_debias=0.6, lr=1e-3))
    merged = merge_reports([lone, seed1, seed0])
    view = merged["models"]["ours"]["short_history"]
    # the two seeds validate 0.105 on average, below the lone run's 0.1055: the lone run wins
    assert view["ndcg@10"] == 0.200 and "seeds" not in view
    lone["models"]["ours"]["short_history"]["fit"]["best"]["ndcg@10"] = 0.1045
    merged = merge_reports([lone, seed1, seed0])
    view = merged["models"]["ours"]["short_history"]
    assert view["ndcg@10"] == pytest.approx(0.112)
    assert view["tail"]["ndcg@10"] == pytest.approx(0.032)
    assert [s["seed"] for s in view["seeds"]] == [0, 1]
    assert [s["ndcg@10"] for s in view["seeds"]] == [0.110, 0.114]
    assert view["fit"]["fixed_settings"].get("seed", 0) == 0  # the first seed's fit
    assert merged["chosen_on_validation"] == {"ours.short_history": 2}
    assert _seeds(view).startswith("; figures the mean of 2 seeds")
    assert "seed 1: 0.1140 / 0.0340" in _seeds(view)
    assert _seeds(merged["models"]["ours"]["short_history"] | {"seeds": []}) == ""


def test_the_screen_applies_the_long_tail_rule(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Screen points that differ only in the debias: the one with the most debias within 2% of
    the best is trained on; a point further below is not."""
    prepared = prepare(tiny_data, tmp_path / "cache")
    recipe = {"order_augmentation": 1.0, "set_context": "others", "softmax_exclude": "others"}
    grid: list[dict[str, float | str]] = [
        {**recipe, "distill_weight": 1.0, "distill_debias": debias} for debias in (0.5, 1.0, 2.0)
    ]
    cfg = dataclasses.replace(quick_config(), screen_epochs=1, neural_grids={"ours": grid})
    # validation by debias: 1.0 is the best, 2.0 within 2% of it, 0.5 far below
    validation = {0.5: 0.10, 1.0: 0.20, 2.0: 0.197}
    trained: list[float] = []
    real_fit = neural_baselines.fit_recommender

    def fake_fit(train_on, train_cfg, factory, **kwargs):  # type: ignore[no-untyped-def]
        model, summary = real_fit(
            train_on, dataclasses.replace(train_cfg, epochs=1), factory, **kwargs
        )
        screening = "screen" in kwargs.get("name", "")
        summary["best"] = {
            **summary["best"],
            "ndcg@10": validation[train_cfg.distill_debias] if screening else 0.5,
            # the more debias, the more validation tail (the rule measures the tail by it)
            "tail_ndcg@10": train_cfg.distill_debias / 10,
        }
        if not screening:
            trained.append(train_cfg.distill_debias)
        return model, summary

    monkeypatch.setattr(neural_baselines, "fit_recommender", fake_fit)
    fitted = fitting.fit_all(prepared, cfg, "short", None, False, ["ours"])["ours"]
    assert trained == [2.0]
    assert [p["distill_debias"] for p in fitted.info["screening"]] == [0.5, 1.0, 2.0]
    assert [bool(p.get("chosen")) for p in fitted.info["screening"]] == [False, False, True]
    assert "the long-tail rule" in fitted.info["tuning"]
    validation[2.0] = 0.19  # 5% below the best: the best is kept
    trained.clear()
    fitted = fitting.fit_all(prepared, cfg, "short", None, False, ["ours"])["ours"]
    assert trained == [1.0]
    assert "the long-tail rule" not in fitted.info["tuning"]


def test_the_short_view_validates_after_every_epoch(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Patience counts epochs: the short view, where validation is cheap, checks every one of
    them, and its neural rows are fitted with that config (the main view keeps its own)."""
    cfg = quick_config()
    assert cfg.train.validate_every > 1  # else this test proves nothing
    short = views.short_view_config(cfg)
    assert short.train.validate_every == 1
    assert dataclasses.replace(short.train, validate_every=cfg.train.validate_every) == cfg.train
    assert dataclasses.replace(short, train=cfg.train) == cfg
    seen: list[ReportConfig] = []

    class Stop(Exception):
        pass

    def fake_fit_all(prepared, fit_cfg, view, *args):  # type: ignore[no-untyped-def]
        seen.append(fit_cfg)
        raise Stop

    monkeypatch.setattr(views, "fit_all", fake_fit_all)
    with pytest.raises(Stop):
        views.short_view(prepare(tiny_data, tmp_path / "cache"), cfg, ["ours"], {}, False)
    assert [c.train.validate_every for c in seen] == [1]


def test_the_short_view_anneals_ours_within_its_epochs_unless_told() -> None:
    """The report's default schedule (200 epochs) is cut to SHORT_VIEW_EPOCHS on the short view
    for ours (SHORT_VIEW_EPOCHS_ROWS) alone, so its learning rate anneals before patience stops
    it; the other rows keep the report's schedule; a schedule at most that long, or one given on
    the command line (--epochs), is kept; the main view's is never touched."""
    cfg = ReportConfig()
    assert cfg.train.epochs > SHORT_VIEW_EPOCHS  # else this test proves nothing
    short = views.short_view_config(cfg)
    assert short.row_epochs == {"ours": SHORT_VIEW_EPOCHS}
    assert short.train.epochs == cfg.train.epochs  # the other rows' schedule
    assert short.train.patience == cfg.train.patience
    assert cfg.row_epochs == {}  # the caller's config is unchanged
    given = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, epochs=128),
        train_overrides={"epochs": 128},
    )
    assert views.short_view_config(given).row_epochs == {}
    assert views.short_view_config(given).train.epochs == 128
    assert views.short_view_config(quick_config()).row_epochs == {}


def test_a_rows_own_epochs_reach_its_training_and_its_teacher_ablation(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`row_epochs` shortens the named row's schedule only: ours and the ablation that trains
    ours' settings without the teacher get it, SASRec and the text-only row keep `train`'s."""
    prepared = prepare(tiny_data, tmp_path / "cache")
    teacher = {
        "order_augmentation": 1.0,
        "set_context": "others",
        "softmax_exclude": "others",
        "distill_weight": 1.0,
    }
    base = quick_config()
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, epochs=7),
        row_epochs={"ours": 3},
        fixed_settings={"ours": teacher},
        neural_grids={},
    )
    epochs: dict[str, int] = {}
    real_fit = neural_baselines.fit_recommender

    def fake_fit(train_on, train_cfg, factory, **kwargs):  # type: ignore[no-untyped-def]
        epochs[kwargs["name"]] = train_cfg.epochs
        return real_fit(train_on, dataclasses.replace(train_cfg, epochs=1), factory, **kwargs)

    monkeypatch.setattr(neural_baselines, "fit_recommender", fake_fit)
    rows = ["ours", "ours_no_teacher", "sasrec", "ours_text"]
    fitting.fit_all(prepared, cfg, "short", None, False, rows)
    assert epochs == {
        "short: ours": 3,
        "short: ours_no_teacher": 3,
        "short: sasrec": 7,
        "short: ours_text": 7,
    }
