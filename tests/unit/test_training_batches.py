"""Training batches (length-bucketed, right-padded, optionally re-ordered) and the fused paths of
the user tower that training and validation run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltrec.models import ModelConfig, Recommender, UserTower
from ltrec.train import (
    WIDTH_STEP,
    TrainConfig,
    _batches,
    _loss,
    epoch_batches,
    epoch_spans,
    leave_one_out_means,
)
from ltrec_core import contract
from tests.support.datasets import sequences, toy_loss_inputs

LENGTHS = [3, 40, 7, 120, 15, 2, 60, 33, 9, 80, 5, 250, 18]


def test_epoch_covers_every_user_once_with_little_padding() -> None:
    seqs = sequences(LENGTHS)
    rng = np.random.default_rng(0)
    spans = epoch_spans(seqs, window=101, rng=rng)
    lengths = spans[:, 1] - spans[:, 0]
    assert lengths.max() == 101 and np.all(spans[:, 1] <= seqs.offsets[1:])
    batches = epoch_batches(spans, batch_size=4, rng=rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(LENGTHS)))
    budget = 4 * lengths.mean()
    for batch in batches[:-1] if len(batches) > 1 else []:
        # A batch closes as soon as it reaches the budget: at most one user's worth beyond it.
        assert lengths[batch].sum() - lengths[batch].max() < budget
    # Many users with long-tailed history lengths, as in ML-1M: batches are mostly real events.
    many = sequences(np.random.default_rng(5).integers(2, 300, size=400).tolist())
    real = padded = 0
    for _hist, _, targets, _ in _batches(many, 201, 16, np.random.default_rng(0)):
        assert targets.shape[1] % WIDTH_STEP == 0 or targets.shape[1] == 201
        real += int((targets != 0).sum())
        padded += targets.numel()
    windows = np.minimum(np.diff(many.offsets), 201)
    assert real == windows.sum()
    # Users in random order, 16 to a batch, each padded to its longest: far more padding.
    shuffled = np.random.default_rng(0).permutation(windows)
    random_cells = sum(16 * shuffled[i : i + 16].max() for i in range(0, len(shuffled), 16))
    assert real / padded > 0.85
    assert real / padded > 1.3 * real / random_cells


def test_batches_are_right_padded_next_item_targets() -> None:
    seqs = sequences(LENGTHS)
    for hist, types, targets, context in _batches(seqs, 300, 4, np.random.default_rng(1)):
        for i in range(len(hist)):
            n = int((targets[i] != 0).sum())
            assert torch.all(targets[i, n:] == 0) and torch.all(targets[i, :n] != 0)
            # The history is the targets shifted by one: position t predicts item t from < t.
            assert torch.equal(hist[i, : n - 1], targets[i, : n - 1])
            assert torch.all(hist[i, n - 1 :] == 0)
            items = targets[i, :n].numpy()
            assert np.all(np.diff(items) == 1)  # order kept without augmentation
            assert np.array_equal(types[i, : n - 1].numpy(), seqs.event_types[items[:-1] - 1])
            assert np.array_equal(context[i, :n].numpy(), seqs.context[items - 1])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_order_augmentation_permutes_whole_windows(share: float) -> None:
    seqs = sequences(LENGTHS)
    reordered = 0
    for hist, types, targets, context in _batches(
        seqs, 300, 4, np.random.default_rng(2), order_augmentation=share
    ):
        for i in range(len(hist)):
            n = int((targets[i] != 0).sum())
            items = targets[i, :n].numpy()
            start = seqs.offsets[np.searchsorted(seqs.offsets, items.min(), side="right") - 1]
            # The same events as the user's window, each with its own type and context.
            assert sorted(items.tolist()) == list(range(start + 1, start + n + 1))
            assert torch.equal(hist[i, : n - 1], targets[i, : n - 1])
            assert np.array_equal(types[i, : n - 1].numpy(), seqs.event_types[items[:-1] - 1])
            assert np.array_equal(context[i, :n].numpy(), seqs.context[items - 1])
            reordered += bool(np.any(np.diff(items) != 1))
    if share == 0.0:
        assert reordered == 0
    else:
        assert reordered >= len(LENGTHS) - 2  # all but (maybe) windows of 2 events


@pytest.mark.parametrize("set_pooling", [False, True])
def test_fused_right_padded_path_equals_the_general_one(set_pooling: bool) -> None:
    cfg = ModelConfig(
        n_items=30, n_devices=2, n_regions=2, embedding_dim=16, n_heads=2, set_pooling=set_pooling
    )
    torch.manual_seed(0)
    tower = UserTower(cfg).eval()
    if tower.set_projection is not None:  # zero at init: give it something to say
        torch.nn.init.normal_(tower.set_projection.weight)
    table = torch.randn(31, 16)
    table[contract.PADDING_INDEX] = 0
    lengths = [1, 4, 9, 6]
    right = torch.zeros(4, 9, dtype=torch.long)
    left = torch.zeros(4, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        items = torch.randint(1, 31, (n,))
        right[i, :n] = items
        left[i, 9 - n :] = items
    with torch.no_grad():
        fused = tower(F.embedding(right, table), right, (right > 0).long(), right_padded=True)
        general = tower(F.embedding(left, table), left, (left > 0).long())
    torch.testing.assert_close(fused, general, atol=1e-5, rtol=0)
    assert tower.gpt.config._attn_implementation == "eager"  # restored for the export
    if set_pooling:  # the running mean really enters the state
        tower.set_projection = None
        with torch.no_grad():
            plain = tower(F.embedding(left, table), left, (left > 0).long())
        assert not torch.allclose(plain, general, atol=1e-3)


def test_leave_one_out_means_average_the_other_real_items() -> None:
    vectors = torch.tensor([[[1.0], [2.0], [4.0], [9.0]], [[5.0], [0.0], [0.0], [0.0]]])
    items = torch.tensor([[3, 5, 7, 0], [2, 0, 0, 0]])
    means = leave_one_out_means(vectors, items)
    # row 0: the padding's vector (9, not zero here) counts for nothing; row 1: no other item
    want = torch.tensor([[[3.0], [2.5], [1.5], [0.0]], [[0.0], [0.0], [0.0], [0.0]]])
    torch.testing.assert_close(means, want)


def test_set_context_others_reads_the_whole_window() -> None:
    """With set_context "others" the set term of the state predicting item j is the mean of every
    other item of the window (leave_one_out_means), not the running mean: another loss."""
    model, batch, _, q, log_q = toy_loss_inputs(set_pooling=True)
    cfg = model.cfg
    torch.nn.init.normal_(model.user_tower.set_projection.weight)
    prefix = _loss(model, batch, TrainConfig(set_context="prefix"), log_q, q)
    others = _loss(model, batch, TrainConfig(set_context="others"), log_q, q)
    assert not torch.isclose(prefix, others, atol=1e-4)
    # a model without set pooling cannot take the leave-one-out set context
    from ltrec.train import fit

    plain = Recommender(dataclasses.replace(cfg, set_pooling=False), torch.randn(31, 384))
    with pytest.raises(ValueError, match="needs a model with set pooling"):
        fit(None, TrainConfig(set_context="others"), plain)  # type: ignore[arg-type]


def test_window_exclusions_pair_each_event_with_its_windows_other_items() -> None:
    from ltrec.train import window_exclusions

    # two windows: items 3 1 2 (and padding), and 4 4 1 2 (a repeat of 4)
    targets = torch.tensor([[3, 1, 2, 0], [4, 4, 1, 2]])
    column = torch.arange(10) * 10  # item i is softmax column 10 i
    rows, columns = window_exclusions(targets, column, "prefix")
    pairs = set(zip(rows.tolist(), columns.tolist(), strict=True))
    # events (rows) 0..2 are window 0's, 3..6 window 1's; the repeat of 4 never excludes 4
    assert pairs == {(1, 30), (2, 30), (2, 10), (5, 40), (6, 40), (6, 10)}
    rows, columns = window_exclusions(targets, column, "others")
    pairs = set(zip(rows.tolist(), columns.tolist(), strict=True))
    assert pairs == {
        (0, 10), (0, 20), (1, 30), (1, 20), (2, 30), (2, 10),
        (3, 10), (3, 20), (4, 10), (4, 20), (5, 40), (5, 20), (6, 40), (6, 10),
    }  # fmt: skip
    assert bool((rows[1:] >= rows[:-1]).all())  # ascending, as the fused softmax needs
    # an item outside the softmax (column -1) has nothing to leave out
    column[2] = -1
    rows, columns = window_exclusions(targets, column, "others")
    assert bool((columns >= 0).all())


def test_softmax_exclusion_changes_the_loss_only_when_asked() -> None:
    model, batch, _, q, log_q = toy_loss_inputs()
    plain = _loss(model, batch, TrainConfig(), log_q, q)
    prefix = _loss(model, batch, TrainConfig(softmax_exclude="prefix"), log_q, q)
    others = _loss(model, batch, TrainConfig(softmax_exclude="others"), log_q, q)
    # leaving competitors out of a softmax can only lower each event's loss
    assert float(others) < float(prefix) < float(plain)


def test_training_settings_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(ValueError, match="set_context must be one of prefix, others"):
        TrainConfig(set_context="all")
    with pytest.raises(ValueError, match=r"logit_adjustment must be in \[0, 2\]"):
        TrainConfig(logit_adjustment=-0.5)
    with pytest.raises(ValueError, match="full softmax only"):
        TrainConfig(loss="sampled", logit_adjustment=0.5)
    with pytest.raises(ValueError, match="needs set pooling"):
        TrainConfig(set_context="others", model={"set_pooling": False})
    TrainConfig(set_context="others", logit_adjustment=0.5)  # a valid pair
    with pytest.raises(ValueError, match="softmax_exclude must be one of none, prefix, others"):
        TrainConfig(softmax_exclude="all")
    with pytest.raises(ValueError, match="full softmax only"):
        TrainConfig(loss="sampled", softmax_exclude="prefix")


@pytest.mark.parametrize(
    "flags",
    [
        ["--logit-adjustment", "3"],
        ["--loss", "sampled", "--logit-adjustment", "0.5"],
        ["--set-context", "others", "--no-set-pooling"],
        ["--loss", "sampled", "--softmax-exclude", "others"],
    ],
)
def test_train_cli_names_the_bad_setting(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    from ltrec.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "missing", "--out", "unused", *flags])
    assert exit_info.value.code == 2
    assert "invalid training settings" in capsys.readouterr().err


@pytest.mark.parametrize("decay", ["-0.1", "11"])
def test_train_cli_bounds_the_weight_decay(decay: str, capsys: pytest.CaptureFixture) -> None:
    from ltrec.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "missing", "--out", "unused", "--weight-decay", decay])
    assert exit_info.value.code == 2
    assert f"--weight-decay must be in [0, 10], got {float(decay):g}" in capsys.readouterr().err


def _fit_with_scripted_validation(
    monkeypatch: pytest.MonkeyPatch, scores: list[float], cfg: TrainConfig
) -> dict:
    """Train a tiny model on synthetic sequences with `evaluate` replaced by a script of
    validation NDCG@10 figures (one per validation); returns fit's summary."""
    import types

    import ltrec.train as train_module

    calls = iter(scores)

    def scripted(score_fn, cases, **kwargs):  # type: ignore[no-untyped-def]
        value = next(calls)
        return {"ndcg@10": value, "recall@10": value}, SCRIPTED_RANKS

    monkeypatch.setattr(train_module, "evaluate", scripted)
    seqs = sequences(LENGTHS)
    seqs.items[:] = np.random.default_rng(0).integers(1, 31, len(seqs.items))
    prepared = types.SimpleNamespace(
        popularity=np.bincount(seqs.items, minlength=31), split=None, train_sequences=seqs
    )
    model_cfg = ModelConfig(
        n_items=30, n_devices=3, n_regions=6, embedding_dim=16, n_heads=2, max_history=20
    )
    model = Recommender(model_cfg, torch.randn(31, 384))
    popular, rare = int(np.argmax(prepared.popularity)), int(np.argmin(prepared.popularity[1:])) + 1
    cases = types.SimpleNamespace(targets=np.array([popular, rare]))  # ranked 0 and 20
    _, summary = train_module.fit(prepared, cfg, model, progress=False, valid_cases=cases)  # type: ignore[arg-type]
    return summary


SCRIPTED_RANKS = np.array([0, 20])  # the scripted validation's two cases: a hit, then a miss


def test_validation_reports_the_long_tail_cases_on_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each validation adds NDCG@10 over the cases whose target is a long-tail item: here the
    rare target's case, ranked 20 (a miss), whatever the overall figure."""
    cfg = TrainConfig(epochs=2, batch_size=4, patience=50, max_minutes=1e6)
    summary = _fit_with_scripted_validation(monkeypatch, [0.3, 0.4], cfg)
    assert summary["best"]["ndcg@10"] == 0.4
    assert summary["best"]["tail_ndcg@10"] == 0.0  # the popular target's hit does not count


def test_validation_every_few_epochs_then_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate_every=2 skips the odd epochs in the schedule's first half only, and the last
    epoch is always validated."""
    cfg = TrainConfig(epochs=9, batch_size=4, validate_every=2, patience=50, max_minutes=1e6)
    summary = _fit_with_scripted_validation(monkeypatch, [0.1 * i for i in range(1, 10)], cfg)
    validated = [e["epoch"] for e in summary["epochs"] if "ndcg@10" in e]
    assert validated == [2, 4, 5, 6, 7, 8, 9]
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, 10))
    assert summary["best"]["epoch"] == 9 and summary["stop_reason"] == "epochs"


def test_patience_counts_epochs_when_validation_skips_some(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = TrainConfig(epochs=20, batch_size=4, validate_every=2, patience=3, max_minutes=1e6)
    summary = _fit_with_scripted_validation(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.1] * 4, cfg)
    # validated at 2 (best), 4 (2 epochs without a gain), 6: 4 epochs >= patience 3
    assert [e["epoch"] for e in summary["epochs"] if "ndcg@10" in e] == [2, 4, 6]
    assert summary["best"]["epoch"] == 2
    assert summary["stop_reason"] == "no validation gain for 3 epochs"
    with pytest.raises(ValueError, match="validate_every must be at least 1"):
        TrainConfig(validate_every=0)
