"""When a loss leaves its plateau (pipeline.evaluation.dynamics), the report section and the trainer's warning built on it."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.report.report import RunRecord, plateau_section
from pipeline.evaluation.dynamics import late_plateau_exit, loss_trace, plateau_exit
from pipeline.training.trainer import Trainer


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


def test_late_plateau_exit_by_hand():
    assert late_plateau_exit(None, 200)
    assert late_plateau_exit(101, 200)
    assert not late_plateau_exit(100, 200)
    assert not late_plateau_exit(130, 200, late=0.7)


def fake_trainer(tmp_path, values, init_from=None, torn=False):
    lines = [json.dumps(r) for r in rows(values)]
    if torn:
        lines.insert(3, '{"iter": 4, "loss_c')  # a line cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    cfg = SimpleNamespace(training=SimpleNamespace(init_from=init_from))
    return SimpleNamespace(work_dir=tmp_path, cfg=cfg)


def test_trainer_records_and_warns_on_a_late_exit(tmp_path, caplog):
    values = [10.0] * 30 + [1.0] * 10  # the 10-record mean first < 5 at record 36
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        assert Trainer._plateau_exit(fake_trainer(tmp_path, values, torn=True), 40) == 36
    assert "only at iteration 36 of 40" in caplog.text
    caplog.clear()
    # the same run judged at iteration 80 (its later records): exit at 36 <= 40, no warning
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        assert Trainer._plateau_exit(fake_trainer(tmp_path, values + [1.0] * 40), 80) == 36
    assert caplog.text == ""


def test_trainer_plateau_exit_quiet_cases(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        # a progressive stage (init_from) may start below its plateau: recorded, no warning
        t = fake_trainer(tmp_path, [10.0] * 30 + [1.0] * 10, init_from="runs/base/final.pth")
        assert Trainer._plateau_exit(t, 40) == 36
        # too short to judge: fewer than 10 records
        assert Trainer._plateau_exit(fake_trainer(tmp_path, [10.0] * 9), 9) is None
    assert caplog.records == []


def test_trainer_plateau_never_left_warns_and_ignores_later_records(tmp_path, caplog):
    # judged at iteration 10, the drop logged after it does not count
    with caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        assert Trainer._plateau_exit(fake_trainer(tmp_path, [10.0] * 10 + [1.0] * 10), 10) is None
    assert "plateau never" in caplog.text
