"""When a loss leaves its plateau (pipeline.report.dynamics) and the report section built on it."""

from pathlib import Path

import pytest

from pipeline.report.dynamics import loss_trace, plateau_exit
from pipeline.report.report import RunRecord, plateau_section


def rows(values, start=1, term="loss_cls"):
    return [{"iter": start + i, term: v} for i, v in enumerate(values)]


def test_plateau_exit_by_hand():
    # window 2 means: 10, 10, 7, 4, 4; start 10, threshold 5 -> first below at the 4th mean,
    # which ends at record 5 (iteration 5)
    assert plateau_exit(rows([10, 10, 10, 4, 4, 4]), window=2) == 5
    # window 1: the first raw value below 0.5 * 10
    assert plateau_exit(rows([10, 9, 6, 4.9, 1]), window=1) == 4
    # frac 0.7: threshold 7 -> 6 (iteration 3) qualifies
    assert plateau_exit(rows([10, 9, 6, 4.9, 1]), window=1, frac=0.7) == 3
    # iterations come from the records, not their positions
    assert plateau_exit(rows([10, 10, 1], start=100), window=1) == 102


def test_plateau_exit_never_or_too_short_is_none():
    assert plateau_exit(rows([10, 9, 8, 7, 6, 5.5]), window=2) is None
    assert plateau_exit(rows([10, 1]), window=3) is None
    assert plateau_exit([], window=1) is None
    assert plateau_exit(rows([10, 1], term="loss_mask"), window=1) is None


def test_loss_trace_sorts_dedupes_and_skips_bad_records():
    records = [
        {"iter": 3, "loss_cls": 3.0},
        {"iter": 1, "loss_cls": 1.0},
        {"iter": 2, "loss_cls": 9.0},
        {"iter": 2, "loss_cls": 2.0},  # a resumed run logs iteration 2 again: the last one counts
        {"iter": 4, "loss_cls": float("nan")},
        {"iter": True, "loss_cls": 5.0},
        {"loss_cls": 6.0},
        {"iter": 5, "loss_cls": "7"},
    ]
    iters, values = loss_trace(records)
    assert iters.tolist() == [1, 2, 3]
    assert values.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("kwargs", [{"frac": 0.0}, {"frac": 1.0}, {"window": 0}])
def test_plateau_exit_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="plateau_exit"):
        plateau_exit(rows([10, 1]), **kwargs)


def run(name, values, things):
    return RunRecord(
        name=name,
        path=Path("/nowhere") / name,
        metrics=rows(values),
        eval={"Things": {"pq": things, "n": 3}},
    )


def test_plateau_section_table_and_rank_correlation():
    runs = [
        run("baseline-s0", [10, 10, 4, 4], 55.0),  # exit 3 (window 1)
        run("baseline-s1", [10, 10, 10, 4], 50.0),  # exit 4
        run("all-s0", [10, 10, 10, 10, 4], 20.0),  # exit 5
        run("all-s1", [10, 10, 10, 10, 10], 0.0),  # never: ranks after every exit
        run("no-seed-name", [10, 1], 99.0),  # not a seed run: left out
    ]
    text = plateau_section(runs, window=1)
    assert "| baseline | 3 (55.0) | 4 (50.0) | 4 | 0 |" in text
    assert "| all | 5 (20.0) | > 5 (0.0) | 5 | 1 |" in text
    assert "no-seed" not in text
    # exits 3, 4, 5, 6 (never) against PQ Th 55, 50, 20, 0: perfectly reversed ranks
    assert "over 4 runs: -1.00" in text


def test_plateau_section_without_seed_runs_or_losses_is_none():
    assert plateau_section([run("main", [10, 1], 50.0)]) is None
    assert plateau_section([RunRecord(name="a-s0", path=Path("/x"))]) is None
