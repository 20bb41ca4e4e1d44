"""Multi-seed statistics of the ablation report (pipeline.report.seeds) and the seed expansion."""

import math

import numpy as np
import pytest

from pipeline.report.seeds import (
    SeedRun,
    bootstrap_pq_difference,
    pq_from_sums,
    seed_table,
    split_seed_name,
    t_interval,
)
from pipeline.runs import expand_spec


def test_t_interval_by_hand():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    # sd = 1, t(0.975, df=2) = 4.302653, half width = 4.302653 / sqrt(3)
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert mean - lo == pytest.approx(hi - mean)
    assert all(math.isnan(v) for v in t_interval([5.0])[1:])


def test_pq_from_sums_by_hand():
    # class A: 2 TP with IoU sum 1.6, 1 FP, 1 FN -> PQ = 1.6 / (2 + 0.5 + 0.5) = 53.33 %
    # class B: absent (no GT, no prediction) -> left out; class C: 1 FN -> PQ 0
    sums = np.array([[2, 1, 1, 1.6], [0, 0, 0, 0.0], [0, 0, 1, 0.0]])
    assert pq_from_sums(sums) == pytest.approx((100 * 1.6 / 3 + 0.0) / 2)


def test_bootstrap_of_identical_runs_is_zero_and_of_a_shift_is_positive():
    rng = np.random.default_rng(0)
    stats = rng.integers(0, 3, (40, 3, 4)).astype(float)
    stats[..., 3] = stats[..., 0] * 0.7
    d, lo, hi = bootstrap_pq_difference([stats, stats], [stats, stats], num_samples=200)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    better = stats.copy()
    better[..., 3] = better[..., 0] * 0.9  # every match has a higher IoU
    d, lo, hi = bootstrap_pq_difference([better], [stats], num_samples=500)
    assert d > 0 and lo > 0 and hi >= d >= lo
    assert d == pytest.approx(pq_from_sums(better.sum(0)) - pq_from_sums(stats.sum(0)))


def _metrics(pq, th, st):
    return {"All": {"pq": pq}, "Things": {"pq": th}, "Stuff": {"pq": st}}


def test_seed_table_pairs_by_seed_and_only_claims_effects_outside_both_intervals():
    stats = np.ones((10, 2, 4))
    runs = [
        SeedRun("baseline", s, _metrics(p, p - 10, p + 10), None)
        for s, p in [(0, 70.0), (1, 72.0), (2, 74.0)]
    ]
    runs += [
        SeedRun("big", s, _metrics(p, p, p), None) for s, p in [(0, 80.0), (1, 82.1), (2, 84.0)]
    ]
    runs += [
        SeedRun("noisy", s, _metrics(p, p, p), None) for s, p in [(0, 75.0), (1, 70.0), (2, 73.0)]
    ]
    table, rows = seed_table(runs)
    by = {r["variant"]: r for r in rows}
    assert by["baseline"]["pq_mean"] == pytest.approx(72.0)
    assert by["baseline"]["pq_std"] == pytest.approx(2.0)
    assert by["big"]["diff"] == pytest.approx((10 + 10.1 + 10) / 3)
    assert by["big"]["t_lo"] > 0
    # without per-image statistics there is no bootstrap interval: no effect is claimed
    assert by["big"]["verdict"] == "no measurable effect"
    assert by["noisy"]["t_lo"] < 0 < by["noisy"]["t_hi"]
    assert "| big | 3 | 82.03 ± 2.00 |" in table
    # with per-image statistics on both sides the bootstrap decides too
    good = stats.copy()
    good[..., 3] = 1.0
    base = stats.copy()
    base[..., 3] = 0.5
    runs2 = [SeedRun("baseline", s, r.metrics, base) for s, r in zip(range(3), runs[:3])]
    runs2 += [SeedRun("big", s, r.metrics, good) for s, r in zip(range(3), runs[3:6])]
    _, rows2 = seed_table(runs2, num_samples=200)
    assert {r["variant"]: r for r in rows2}["big"]["verdict"] == "gain"


def test_split_seed_name():
    assert split_seed_name("sam_distill-s12") == ("sam_distill", 12)
    assert split_seed_name("baseline") is None


def test_ablation_seeds_expand_every_variant(tmp_path):
    base = tmp_path / "b.yaml"
    base.write_text(
        "_base_: "
        + str((__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "base.yaml"))
        + "\n"
    )
    spec = tmp_path / "ablation.yaml"
    spec.write_text(
        "base: b.yaml\nseeds: [0, 4]\noverrides: {training.max_iters: 5}\n"
        "variants:\n  baseline: {}\n  fusion: {model.use_learnable_fusion: true}\n"
        "sweeps:\n  t:\n    variant: fusion\n    grid: {model.sam_distill.temperature: [2]}\n"
    )
    table = expand_spec(spec)
    assert table.groups["ablation"] == ["baseline-s0", "baseline-s4", "fusion-s0", "fusion-s4"]
    run = table.runs["fusion-s4"]
    assert run.overrides == ("training.max_iters=5", "model.use_learnable_fusion=true", "seed=4")
    assert run.load().seed == 4 and run.load().training.max_iters == 5
    # sweeps start from the variant's overrides (no seed suffix)
    assert table.runs["t-temperature2"].overrides[-1] == "model.sam_distill.temperature=2"
    spec.write_text("base: b.yaml\nseeds: [0, 0]\nvariants: {baseline: {}}\n")
    with pytest.raises(Exception, match="distinct"):
        expand_spec(spec)
