"""Distilling an EASE teacher into the model (`TrainConfig.distill_weight`): the teacher scores
each training event out of sample (an EASE fitted without the event's user), and the loss pulls
the model's distribution towards the teacher's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ltrec.train import (
    Teacher,
    TrainConfig,
    _loss,
    distill_loss,
    teacher_inverse,
    window_cosine_scores,
    window_exclusions,
    window_teacher_scores,
)
from tests.support.datasets import toy_loss_inputs


def _ease_without(x: np.ndarray, user: int, lam: float) -> np.ndarray:
    """EASE's weights refitted from scratch on every user but `user` (the items the full data
    has stay in the inverse), diagonal zero."""
    gram = x.T @ x
    active = np.flatnonzero(np.diag(gram) > 0)
    rest = np.delete(x, user, axis=0)
    g = (rest.T @ rest)[np.ix_(active, active)] + lam * np.eye(len(active))
    p = np.linalg.inv(g)
    weights = np.zeros_like(gram)
    weights[np.ix_(active, active)] = -p / np.diag(p)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def test_teacher_scores_equal_an_ease_refitted_without_the_user() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((25, 15)) < 0.3).astype(np.float64)
    x[:, 0] = 0.0  # padding
    x[:, 5] = 0.0
    x[3, 5] = 1.0  # an item only user 3 has: without them it is known by the ridge alone
    x[:, 9] = 0.0  # an item nobody has
    lam = 3.0
    inverse = teacher_inverse(x.T @ x, lam)
    users = [3, 7, 11]
    windows = [rng.permutation(np.flatnonzero(x[u])) for u in users]
    width = max(map(len, windows)) + 2  # right padding
    targets = torch.zeros(len(users), width, dtype=torch.long)
    for row, items in enumerate(windows):
        targets[row, : len(items)] = torch.from_numpy(items)
    got = window_teacher_scores(targets, inverse).numpy()
    want = []
    for user, items in zip(users, windows, strict=True):
        weights = _ease_without(x, user, lam)
        want += [weights[items].sum(0) - weights[t] for t in items]  # the window's other rows
    np.testing.assert_allclose(got, np.stack(want), atol=1e-4)
    # in sample it would differ: the user's own co-occurrences would vouch for their targets
    full = _ease_without(np.vstack([x, np.zeros((1, 15))]), 25, lam)
    in_sample = np.stack([full[windows[0]].sum(0) - full[t] for t in windows[0]])
    assert np.abs(in_sample - got[: len(windows[0])]).max() > 0.01


Pairs = tuple[torch.Tensor, torch.Tensor]


def _toy_windows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pairs, torch.Tensor]:
    """Two windows over 7 items (softmax columns 0..6 = items 1..7) and the EASE inverse of six
    users' histories: (targets, active, column, excluded, inverse)."""
    targets = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    active = torch.arange(1, 8)
    column = torch.full((8,), -1, dtype=torch.long)
    column[active] = torch.arange(7)
    excluded = window_exclusions(targets, column, "others")
    x = np.zeros((6, 8))
    x[0, [1, 2, 3, 6]] = x[1, [2, 3, 6]] = x[2, [4, 5, 7]] = x[3, [1, 6]] = x[4, [4, 7]] = 1.0
    return targets, active, column, excluded, teacher_inverse(x.T @ x, 1.0)


def test_distillation_pulls_the_model_towards_the_teacher() -> None:
    torch.manual_seed(0)
    targets, active, column, excluded, inverse = _toy_windows()
    table = torch.randn(8, 8)  # as many dimensions as columns: any logits can be reached
    users = torch.zeros(5, 8, requires_grad=True)
    optimiser = torch.optim.Adam([users], lr=0.1)
    for _ in range(300):  # the distillation term alone, on the user vectors alone
        optimiser.zero_grad()
        loss = distill_loss(users, table, targets, active, inverse, excluded, 1.0)
        assert torch.isfinite(loss)  # the excluded columns are out of both distributions
        loss.backward()
        optimiser.step()
    scores = window_teacher_scores(targets, inverse)[:, active]
    # event 0 (target 1, others 2 and 3): item 6 goes with 2 and 3 in the data, item 7 never
    assert scores[0, column[6]] > scores[0, column[7]]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[excluded] = True
    logits = (users.detach() @ table[active].T).masked_fill(mask, float("-inf"))
    # the model now ranks each event's candidates as the teacher does
    assert torch.equal(logits.argmax(1), scores.masked_fill(mask, float("-inf")).argmax(1))
    assert logits[0, column[6]] > logits[0, column[7]]


def _fitted_logits(prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Pairs]:
    """The user vectors fitted to the distillation term alone (with `prior`, if any), as logits
    over the toy windows' columns: (logits, column, excluded)."""
    torch.manual_seed(0)
    targets, active, column, excluded, inverse = _toy_windows()
    table = torch.randn(8, 8)
    users = torch.zeros(5, 8, requires_grad=True)
    optimiser = torch.optim.Adam([users], lr=0.1)
    for _ in range(400):
        optimiser.zero_grad()
        distill_loss(users, table, targets, active, inverse, excluded, 1.0, prior=prior).backward()
        optimiser.step()
    return users.detach() @ table[active].T, column, excluded


def test_the_debiased_teacher_loses_its_popularity_prior() -> None:
    """`distill_debias`: the teacher's logits minus debias x log q. Fitted to the term alone,
    the model's logit of a column the prior penalises drops against the others by about the
    penalty, the others keep their gaps."""
    plain, column, _ = _fitted_logits(None)
    prior = torch.zeros(7)
    prior[column[6]] = 1.0  # as if item 6 were e times as popular, at debias 1
    debiased, _, _ = _fitted_logits(prior)
    event, other = 0, column[7]  # event 0's candidates 6 and 7 (its others are 2 and 3)
    drop = (plain[event, column[6]] - plain[event, other]) - (
        debiased[event, column[6]] - debiased[event, other]
    )
    assert 0.7 < drop.item() < 1.3
    kept = (plain[event, column[4]] - plain[event, other]) - (
        debiased[event, column[4]] - debiased[event, other]
    )
    assert abs(kept.item()) < 0.2


def test_distillation_weight_changes_the_loss_only_when_asked() -> None:
    model, batch, seqs, q, log_q = toy_loss_inputs(set_pooling=True)
    x = np.zeros((3, 31))
    x[0, seqs.items[:6]] = x[1, seqs.items[6:15]] = x[2, seqs.items[15:]] = 1.0
    inverse = Teacher(teacher_inverse(x.T @ x, 10.0))
    plain_cfg = TrainConfig(set_context="others", softmax_exclude="others")
    taught_cfg = TrainConfig(set_context="others", softmax_exclude="others", distill_weight=0.5)
    plain = _loss(model, batch, plain_cfg, log_q, q)
    assert torch.equal(_loss(model, batch, plain_cfg, log_q, q, inverse), plain)  # weight 0
    taught = _loss(model, batch, taught_cfg, log_q, q, inverse)
    assert taught.item() > plain.item()  # a cross-entropy added: positive
    # the toy's q is uniform, a prior that moves nothing; a popular half makes it count
    skewed = log_q.clone()
    skewed[1:16] += 1.0
    debiased_cfg = dataclasses.replace(taught_cfg, distill_debias=1.0)
    assert torch.equal(_loss(model, batch, taught_cfg, skewed, q, inverse), taught)
    assert not torch.isclose(_loss(model, batch, debiased_cfg, skewed, q, inverse), taught)


def _cosine_without(x: np.ndarray, user: int) -> np.ndarray:
    """Item-item cosines (co-occurrences over the square root of both counts) refitted from
    scratch on every user but `user`, diagonal zero, zero where an item has no events."""
    rest = np.delete(x, user, axis=0)
    gram = rest.T @ rest
    counts = np.diag(gram)
    norm = np.sqrt(np.outer(counts, counts))
    cosine = np.divide(gram, norm, out=np.zeros_like(gram), where=norm > 0)
    np.fill_diagonal(cosine, 0.0)
    return cosine


def test_cosine_teacher_scores_equal_cosines_refitted_without_the_user() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random((30, 14)) < 0.35).astype(np.float64)
    x[:, 0] = 0.0  # padding
    x[:, 6] = 0.0
    x[4, 6] = 1.0  # an item only user 4 has: without them it co-occurs with nothing
    users = [4, 9, 17]
    windows = [rng.permutation(np.flatnonzero(x[u])) for u in users]
    width = max(map(len, windows)) + 1
    targets = torch.zeros(len(users), width, dtype=torch.long)
    for row, items in enumerate(windows):
        targets[row, : len(items)] = torch.from_numpy(items)
    gram = torch.from_numpy((x.T @ x).astype(np.float32))
    got = window_cosine_scores(targets, gram).numpy()
    want = []
    for user, items in zip(users, windows, strict=True):
        cosine = _cosine_without(x, user)
        want += [cosine[items].sum(0) - cosine[t] for t in items]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    assert np.isfinite(got).all()
    # in sample the user's own co-occurrences would raise their window's items
    full = _cosine_without(np.vstack([x, np.zeros((1, 14))]), 30)
    in_sample = np.stack([full[windows[0]].sum(0) - full[t] for t in windows[0]])
    assert np.abs(in_sample - got[: len(windows[0])]).max() > 0.01


def test_the_cosine_share_mixes_the_teachers() -> None:
    torch.manual_seed(0)
    targets, active, _, excluded, inverse = _toy_windows()
    x = np.zeros((6, 8))
    x[0, [1, 2, 3, 6]] = x[1, [2, 3, 6]] = x[2, [4, 5, 7]] = x[3, [1, 6]] = x[4, [4, 7]] = 1.0
    gram = torch.from_numpy((x.T @ x).astype(np.float32))
    table = torch.randn(8, 8)
    users = torch.randn(5, 8)

    def loss(share: float | None) -> float:
        cosine = None if share is None else (gram, share)
        return distill_loss(
            users, table, targets, active, inverse, excluded, 1.0, cosine=cosine
        ).item()

    ease_alone = loss(None)
    assert loss(0.0) == pytest.approx(ease_alone)  # share 0: EASE's distribution as before
    assert loss(0.5) != pytest.approx(ease_alone, abs=1e-4)
    assert loss(1.0) != pytest.approx(loss(0.5), abs=1e-4)


def test_the_cosine_teacher_is_in_the_training_loss_only_when_asked() -> None:
    model, batch, seqs, q, log_q = toy_loss_inputs(set_pooling=True)
    x = np.zeros((3, 31))
    x[0, seqs.items[:6]] = x[1, seqs.items[6:15]] = x[2, seqs.items[15:]] = 1.0
    gram = torch.from_numpy((x.T @ x).astype(np.float32))
    teacher = Teacher(teacher_inverse(x.T @ x, 10.0), gram)
    cfg = TrainConfig(set_context="others", softmax_exclude="others", distill_weight=0.5)
    ease_only = _loss(model, batch, cfg, log_q, q, Teacher(teacher.inverse))
    mixed_cfg = dataclasses.replace(cfg, distill_cosine=0.5)
    assert not torch.isclose(_loss(model, batch, mixed_cfg, log_q, q, teacher), ease_only)
    with pytest.raises(ValueError, match=r"distill_cosine must be in \[0, 1\]"):
        dataclasses.replace(cfg, distill_cosine=1.5)
    # without the EASE teacher it would be ignored: refused
    with pytest.raises(ValueError, match="distill_cosine mixes into the EASE teacher"):
        dataclasses.replace(cfg, distill_weight=0.0, distill_cosine=0.5)


def test_distillation_settings_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(ValueError, match="needs the full softmax and set_context 'others'"):
        TrainConfig(distill_weight=1.0)  # set_context "prefix"
    with pytest.raises(ValueError, match="needs the full softmax and set_context 'others'"):
        TrainConfig(distill_weight=1.0, set_context="others", loss="sampled")
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        TrainConfig(distill_weight=-1.0, set_context="others")
    with pytest.raises(ValueError, match="distill_lam, distill_sharpness > 0"):
        TrainConfig(distill_weight=1.0, set_context="others", distill_sharpness=0.0)
    with pytest.raises(ValueError, match=r"distill_head_share must be in \(0, 1\]"):
        TrainConfig(distill_weight=1.0, set_context="others", distill_head_share=0.0)
    with pytest.raises(ValueError, match=r"distill_debias must be in \[0, 2\], got 3"):
        TrainConfig(distill_weight=1.0, set_context="others", distill_debias=3.0)
    TrainConfig(distill_weight=1.0, set_context="others")  # a valid pair


def test_train_cli_names_the_bad_distillation_setting(capsys: pytest.CaptureFixture) -> None:
    from ltrec.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "missing", "--out", "unused", "--distill-weight", "1"])
    assert exit_info.value.code == 2
    assert "set_context 'others'" in capsys.readouterr().err


def test_the_teacher_refuses_a_catalogue_too_large_for_its_dense_inverse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import ltrec.train

    monkeypatch.setattr(ltrec.train, "DISTILL_MAX_ITEMS", 5)
    prepared = types.SimpleNamespace(item_ids=[f"i{n}" for n in range(6)])
    cfg = TrainConfig(distill_weight=1.0, set_context="others")
    with pytest.raises(ValueError, match="catalogues of at most 5 items"):
        ltrec.train.ease_teacher(prepared, cfg)  # type: ignore[arg-type]


def test_the_teacher_speaks_only_for_its_columns() -> None:
    """With `taught`, the distillation term reads the teacher on those columns alone: the
    model's scores of the other columns get no gradient from it, and the teacher's scores there
    do not change it."""
    torch.manual_seed(0)
    targets, active, column, excluded, inverse = _toy_windows()
    taught = torch.zeros(7, dtype=torch.bool)
    taught[column[[1, 5, 6]]] = True
    table = torch.randn(8, 4, requires_grad=True)
    users = torch.randn(5, 4)
    loss = distill_loss(users, table, targets, active, inverse, excluded, 1.0, taught)
    loss.backward()
    assert table.grad is not None
    rows_with_gradient = set(torch.nonzero(table.grad.abs().sum(1)).flatten().tolist())
    assert rows_with_gradient == {1, 5, 6}  # the taught items' rows only
    whole = distill_loss(users, table, targets, active, inverse, excluded, 1.0)
    assert not torch.isclose(whole, loss)


def test_train_cli_stops_before_training_on_a_catalogue_too_large_for_the_teacher(
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import ltrec.train

    monkeypatch.setattr(ltrec.train, "DISTILL_MAX_ITEMS", 5)
    taught = ["--set-context", "others", "--softmax-exclude", "others", "--distill-weight", "1"]
    out = tmp_path / "model"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert ltrec.train.main([*args, *taught, "--epochs", "1", "--no-progress"]) == 2
    assert "at most 5 can have one" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("flag", "key", "value"),
    [("--distill-debias", "distill_debias", 0.6), ("--distill-cosine", "distill_cosine", 0.5)],
)
def test_train_cli_trains_with_a_teacher_setting(
    tiny_data: Path, tmp_path: Path, flag: str, key: str, value: float
) -> None:
    """The command line end to end: a teacher without its popularity prior, or with the cosine
    co-teacher mixed in, trains, and the checkpoint records the setting (the report and a
    retraining read it from there)."""
    import ltrec.train
    from ltrec.checkpoint import read_checkpoint

    out = tmp_path / "model"
    args = ["--data", str(tiny_data), "--out", str(out), "--cache", str(tmp_path / "cache")]
    taught = ["--set-context", "others", "--softmax-exclude", "others", "--distill-weight", "1"]
    code = ltrec.train.main([*args, *taught, flag, str(value), "--epochs", "1", "--no-progress"])
    assert code == 0
    summary = read_checkpoint(out / "checkpoint.pt").summary
    assert summary["train_config"][key] == value
    assert summary["train_config"]["distill_weight"] == 1.0
    assert 0.0 <= summary["best"]["tail_ndcg@10"] <= 1.0  # validation's long-tail figure
