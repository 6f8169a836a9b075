"""The tail-lever frontier (`experiments.tail_levers`): each lever moves what it should, the
cost of a tail gain is read off the grid by hand arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments import tail_levers
from ltrec.evaluation import EvalCases, long_tail_mask

# Ten items (index 0 is padding); items 1 and 2 are the head (the most popular 20%).
POPULARITY = np.array([0, 100, 90, 9, 8, 7, 6, 5, 4, 3, 2])
# Four users, no history; two want a head item, two a tail item. Head items score 1.0 and 0.9,
# tail items 0.8 down to 0.1, except each user's own target, placed as the cases need.
TARGETS = np.array([1, 2, 7, 9])


def scores() -> np.ndarray:
    base = np.array([0.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    return np.tile(base, (len(TARGETS), 1))


def cases() -> EvalCases:
    n = len(TARGETS)
    return EvalCases(
        histories=[np.zeros(0, dtype=np.int64) for _ in range(n)],
        event_types=[np.zeros(0, dtype=np.int64) for _ in range(n)],
        targets=TARGETS.copy(),
        context=np.zeros((n, 4), dtype=np.int64),
    )


def score_fn(_: EvalCases, rows: np.ndarray) -> np.ndarray:
    return scores()[rows]


def ndcg(rank: int) -> float:
    return 1.0 / np.log2(rank + 2) if rank < 10 else 0.0


def test_the_fixture_has_the_head_it_says() -> None:
    assert list(np.flatnonzero(~long_tail_mask(POPULARITY))) == [0, 1, 2]


def test_plain_figures_by_hand() -> None:
    got = tail_levers.figures(score_fn, cases(), POPULARITY)
    # Ranks: item 1 -> 0, item 2 -> 1, item 7 -> 6, item 9 -> 8.
    assert got["head"] == pytest.approx((ndcg(0) + ndcg(1)) / 2)
    assert got["tail"] == pytest.approx((ndcg(6) + ndcg(8)) / 2)
    assert got["ndcg"] == pytest.approx((ndcg(0) + ndcg(1) + ndcg(6) + ndcg(8)) / 4)


def test_the_step_lifts_tail_targets_past_head_items_only() -> None:
    # +0.25: tail items 3 (1.05), 4 (0.95), 5 (0.85), ...; head items 1 (1.0) and 2 (0.9).
    got = tail_levers.figures(
        tail_levers.tail_step(score_fn, long_tail_mask(POPULARITY), 0.25), cases(), POPULARITY
    )
    # Item 1 (1.0) now has item 3 above it; item 2 (0.9) has items 3, 1 and 4.
    assert got["head"] == pytest.approx((ndcg(1) + ndcg(3)) / 2)
    # Item 7 (0.65) has tail items 3-6 and both head items above it: rank 6 still; item 9
    # (0.45): 3-8 and both head items: rank 8. The step never reorders the tail.
    assert got["tail"] == pytest.approx((ndcg(6) + ndcg(8)) / 2)
    big = tail_levers.figures(
        tail_levers.tail_step(score_fn, long_tail_mask(POPULARITY), 5.0), cases(), POPULARITY
    )
    # Every tail item above every head item: item 7 rank 4, item 9 rank 6; item 1 rank 8.
    assert big["tail"] == pytest.approx((ndcg(4) + ndcg(6)) / 2)
    assert big["head"] == pytest.approx((ndcg(8) + ndcg(9)) / 2)


def test_the_frontier_holds_every_lever_and_grid_point() -> None:
    grids = {"exposure": (0.1, 0.5), "popularity": (0.2,), "step": (0.25, 5.0)}
    result = tail_levers.frontier(score_fn, cases(), POPULARITY, POPULARITY, grids)
    assert result["plain"] == tail_levers.figures(score_fn, cases(), POPULARITY)
    assert {k: tuple(r["weight"] for r in v) for k, v in result["levers"].items()} == grids
    # The exposure term on these counts is the popularity term: the same weight, the same row.
    pop = tail_levers.frontier(score_fn, cases(), POPULARITY, POPULARITY, {"popularity": (0.1,)})
    assert result["levers"]["exposure"][0] == pop["levers"]["popularity"][0]
    assert result["levers"]["step"][1]["tail"] > result["plain"]["tail"]


def test_cost_of_a_tail_gain_is_interpolated_between_grid_points() -> None:
    plain = {"ndcg": 0.2, "tail": 0.1}
    rows = [
        {"weight": 0.1, "ndcg": 0.198, "tail": 0.11},
        {"weight": 0.2, "ndcg": 0.19, "tail": 0.13},
    ]
    # +20% = tail 0.12: halfway from 0.11 to 0.13, NDCG 0.194, -3%.
    assert tail_levers.cost_of_tail_gain(plain, rows, 0.2) == pytest.approx(-0.03)
    # +5%: between the plain model and the first point, NDCG 0.199.
    assert tail_levers.cost_of_tail_gain(plain, rows, 0.05) == pytest.approx(-0.005)
    assert tail_levers.cost_of_tail_gain(plain, rows, 0.5) is None
    # A model with no tail NDCG@10 has no gain to price (not "free").
    assert tail_levers.cost_of_tail_gain({"ndcg": 0.2, "tail": 0.0}, rows, 0.2) is None


def test_the_report_measures_a_rows_levers_on_validation_and_test() -> None:
    """`--tail-levers`: a row's frontier on both splits, each with what +20% tail costs per
    lever, and the report's Markdown table of them."""
    from experiments.report.sections import tail_levers_section
    from experiments.report.views import row_tail_levers

    valid = cases()
    test = cases()
    test.targets[:] = [1, 2, 3, 4]  # test: the tail targets rank 2 and 3, not 6 and 8
    got = row_tail_levers(score_fn, valid, test, POPULARITY, POPULARITY)
    assert got["tail_gain"] == tail_levers.TAIL_GAIN
    assert got["valid"]["plain"] == tail_levers.figures(score_fn, valid, POPULARITY)
    assert got["test"]["plain"]["tail"] == pytest.approx((ndcg(2) + ndcg(3)) / 2)
    assert got["test"]["plain"]["tail"] > got["valid"]["plain"]["tail"]
    for split in ("valid", "test"):
        result = got[split]
        assert set(result["tail_gain_cost"]) == {"exposure", "popularity", "step"}
        for lever, rows in result["levers"].items():
            want = tail_levers.cost_of_tail_gain(result["plain"], rows, tail_levers.TAIL_GAIN)
            assert result["tail_gain_cost"][lever] == want
    # Without counts the exposure term counts the row's own top lists: not popularity here.
    own = row_tail_levers(score_fn, valid, test, POPULARITY, None)
    assert own["valid"]["levers"]["exposure"] != got["valid"]["levers"]["exposure"]
    report = {"models": {"sasrec": {"label": "SASRec", "tail_levers": got}, "ease": {}}}
    lines = tail_levers_section(report)
    assert lines[1] == "## Score-time long-tail levers"
    body = [line for line in lines if line.startswith("| SASRec |") or line.startswith("|  |")]
    assert len(body) == 2 and "| validation |" in body[0] and "| test |" in body[1]
    assert tail_levers_section({"models": {"ease": {}}}) == []


def test_rendered_lines_name_each_lever_and_its_cost() -> None:
    result = tail_levers.frontier(score_fn, cases(), POPULARITY, POPULARITY, {"step": (0.25, 5.0)})
    # The step's tail NDCG@10 goes from 0.317 to 0.360 (+13.6%) at +5: +10% is reached on the
    # grid, at a cost to overall NDCG@10; +20% is not.
    lines = tail_levers.render(result, 0.1)
    assert lines[2].startswith("| none | 0 |")
    assert any(line.startswith("| step | 5 |") for line in lines)
    assert lines[-1].startswith("step: tail NDCG@10 +10% costs NDCG@10 -")
    last = tail_levers.render(result, 0.2)[-1]
    assert last == "step: tail NDCG@10 +20% is not reached on the grid"


def test_the_command_reads_a_trained_checkpoint_and_refuses_another_split(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ltrec.prepared import prepare
    from ltrec.train import TrainConfig, train
    from tests.support.checkpoints import write_checkpoint

    cache, out = tmp_path / "cache", tmp_path / "model"
    cfg = TrainConfig(
        epochs=1,
        batch_size=16,
        model={"embedding_dim": 16, "n_layers": 1, "n_heads": 1, "max_history": 20},
    )
    train(prepare(tiny_data, cache), cfg, out, progress=False)
    args = ["--data", str(tiny_data), "--cache", str(cache)]
    assert tail_levers.main([*args, "--checkpoint", str(out / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "valid" in printed[0]
    assert any(line.startswith("| step | 0.7 |") for line in printed)
    assert printed[-3].startswith("exposure: tail NDCG@10 +20% ")
    # A checkpoint of another catalogue: refused with the reason, nothing printed as figures.
    other = tmp_path / "other.pt"
    write_checkpoint(other)
    assert tail_levers.main([*args, "--checkpoint", str(other)]) == 2
    captured = capsys.readouterr()
    assert "was not trained on this split" in captured.err and captured.out == ""
    assert tail_levers.main([*args, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        tail_levers.main([*args, "--checkpoint", str(other), "--tail-gain", "0"])
    assert refused.value.code == 2
    assert "--tail-gain must be above 0, got 0.0" in capsys.readouterr().err


def test_the_tail_a_lever_reaches_above_an_overall_floor() -> None:
    plain = {"ndcg": 0.2, "tail": 0.1}
    rows = [
        {"weight": 0.1, "ndcg": 0.198, "tail": 0.11},
        {"weight": 0.2, "ndcg": 0.19, "tail": 0.13},
    ]
    # floor 0.194: halfway between the two points, tail 0.12
    assert tail_levers.tail_at_overall(plain, rows, 0.194) == pytest.approx(0.12)
    assert tail_levers.tail_at_overall(plain, rows, 0.19) == pytest.approx(0.13)
    assert tail_levers.tail_at_overall(plain, rows, 0.2) == pytest.approx(0.1)
    assert tail_levers.tail_at_overall(plain, rows, 0.21) is None  # nothing reaches it
    # a lever that first gains overall: its best point above the floor counts
    up = [{"weight": 0.1, "ndcg": 0.205, "tail": 0.105}, {"weight": 0.2, "ndcg": 0.18, "tail": 0.2}]
    assert tail_levers.tail_at_overall(plain, up, 0.204) == pytest.approx(0.105 + 0.095 * 0.04)


def _levers(ndcg: float, tail: float, rows: list[dict]) -> dict:
    result = {"plain": {"ndcg": ndcg, "tail": tail}, "levers": {"step": rows}}
    return {"valid": result, "test": result, "tail_gain": 0.2}


def test_rows_compare_at_each_others_overall(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compare: row A (0.2 / 0.1, its step reaching 0.13 at 0.19) at row B's overall 0.19
    reaches tail 0.13, 1.3x B's 0.1; B (0.19 / 0.1, no lever point above A's 0.2) does not."""
    import json

    a = _levers(0.2, 0.1, [{"weight": 0.2, "ndcg": 0.19, "tail": 0.13}])
    b = _levers(0.19, 0.1, [{"weight": 0.2, "ndcg": 0.18, "tail": 0.12}])
    lines = tail_levers.compare({"A": a, "B": b}, "test")
    assert lines[0] == "A: NDCG@10 0.2000, tail NDCG@10 0.1000"
    assert "A at B's NDCG@10 (0.1900), step: tail NDCG@10 0.1300 (1.30x B's)" in lines
    assert "B at A's NDCG@10 (0.2000), step: tail NDCG@10 not reached" in lines
    for name, levers in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(
            json.dumps({"models": {"sasrec": {"tail_levers": levers}, "ease": {}}})
        )
    given = [f"{tmp_path / 'a' / 'report.json'}:sasrec", f"{tmp_path / 'b' / 'report.json'}:sasrec"]
    assert tail_levers.main(["--compare", *given, "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "sasrec (a) at sasrec (b)'s NDCG@10 (0.1900), step: tail NDCG@10 0.1300" in out
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    for bad, said in (
        ([given[0], f"{tmp_path / 'a' / 'report.json'}:ease"], "no tail levers"),
        ([given[0], f"{tmp_path / 'a' / 'report.json'}:ours"], "has no row 'ours'"),
        ([given[0], "report.json"], "give REPORT_JSON:ROW"),
        ([given[0], given[0]], "given twice"),
        ([given[0], f"{tmp_path / 'missing.json'}:sasrec"], "missing.json"),
        ([given[0], f"{tmp_path / 'list.json'}:sasrec"], "is not a report.json"),
        ([given[0], f"{tmp_path / 'broken.json'}:sasrec"], "broken.json"),
    ):
        assert tail_levers.main(["--compare", *bad]) == 2
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tail_levers.main(["--compare", given[0]])
    with pytest.raises(SystemExit):
        tail_levers.main(["--split", "test"])  # neither a checkpoint nor --compare
    with pytest.raises(SystemExit):  # --compare scores nothing: a checkpoint is a mistake
        tail_levers.main(["--compare", *given, "--checkpoint", "model.pt"])
    assert "takes no --checkpoint" in capsys.readouterr().err
