"""Expand an ablation/sweep/progressive spec into named student runs.

A run is an experiment config file plus ``key=value`` overrides. All runs are validated when the
spec is expanded, so a typo in one sweep fails before any job starts. The expansion is pure: the
Snakefile turns it into wildcards, tests check it directly.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class Run:
    """One student run: ``config`` + ``overrides``; ``init_from`` names a previous run (progressive)."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    init_from: str | None = None
    group: str = "main"

    def all_overrides(self, output_root: str) -> list[str]:
        ov = list(self.overrides) + [f"experiment={self.name}"]
        if self.init_from:
            ov.append(f"training.init_from={output_root}/{self.init_from}/final.pth")
        return ov

    def shell_args(self, output_root: str = "runs") -> str:
        """``--config <file> -o <override> ...`` for a shell command line, every value quoted
        with :func:`shlex.quote` (an override is data, never shell syntax)."""
        ov = " ".join(f"-o {shlex.quote(o)}" for o in self.all_overrides(output_root))
        return f"--config {shlex.quote(str(self.config))} {ov}"

    def load(self, output_root: str = "runs") -> Config:
        return load_config(self.config, self.all_overrides(output_root))


@dataclass
class RunTable:
    runs: dict[str, Run] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    def add(self, run: Run) -> None:
        if run.name in self.runs:
            raise ConfigError(f"run name {run.name!r} is declared twice")
        self.runs[run.name] = run
        self.groups.setdefault(run.group, []).append(run.name)


def _fmt(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _slug(value: Any) -> str:
    return str(value).replace(".", "p").replace("-", "m")


def expand_spec(spec_path: str | Path) -> RunTable:
    """Read an ablation spec (see ``configs/ablation.yaml``) and return every run it declares."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise ConfigError(f"ablation spec not found: {spec_path}")
    spec = yaml.safe_load(spec_path.read_text()) or {}
    allowed = {"base", "variants", "sweeps", "progressive", "overrides", "seeds"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(
            f"{spec_path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    if not spec.get("base"):
        raise ConfigError(f"{spec_path}: 'base' (an experiment config path) is required")
    base = str((spec_path.parent / spec["base"]).resolve())  # relative to the spec file
    if not Path(base).is_file():
        raise ConfigError(f"{spec_path}: base config not found: {base}")
    common = [f"{k}={_fmt(v)}" for k, v in (spec.get("overrides") or {}).items()]
    seeds = spec.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(
            f"{spec_path}: 'seeds' must be a non-empty list of distinct "
            f"non-negative integers, got {seeds!r}"
        )
    table = RunTable()
    variants = spec.get("variants") or {}
    variant_overrides: dict[str, tuple[str, ...]] = {}
    for name, ov in variants.items():
        variant_overrides[name] = tuple(common + [f"{k}={_fmt(v)}" for k, v in (ov or {}).items()])
        if seeds is None:
            table.add(Run(name, base, variant_overrides[name], group="ablation"))
            continue
        for seed in seeds:  # <variant>-s<seed>: the report pairs each variant with the baseline
            table.add(
                Run(
                    f"{name}-s{seed}",
                    base,
                    variant_overrides[name] + (f"seed={seed}",),
                    group="ablation",
                )
            )
    for sweep_name, sweep in (spec.get("sweeps") or {}).items():
        parent = sweep.get("variant")
        if parent not in variants:
            raise ConfigError(
                f"{spec_path}: sweeps.{sweep_name}.variant={parent!r} is not one of "
                f"the variants {sorted(variants)}"
            )
        grid = sweep.get("grid") or {}
        if not grid:
            raise ConfigError(f"{spec_path}: sweeps.{sweep_name}.grid is empty")
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            suffix = "-".join(f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in zip(keys, values))
            ov = variant_overrides[parent] + tuple(f"{k}={_fmt(v)}" for k, v in zip(keys, values))
            table.add(Run(f"{sweep_name}-{suffix}", base, ov, group=f"sweep_{sweep_name}"))
    prog = spec.get("progressive")
    if prog:
        prev = None
        for i, stage in enumerate(prog.get("stages") or []):
            name = f"progressive{i}-{stage['name']}"
            ov = tuple(
                common + [f"{k}={_fmt(v)}" for k, v in (stage.get("overrides") or {}).items()]
            )
            table.add(Run(name, base, ov, init_from=prev, group="progressive"))
            prev = name
    return table


def find_ablation_spec(main_config: str | Path) -> Path | None:
    """The ``ablation.yaml`` in the main config's folder, else in the folder above it, or None.

    ``configs/coco/regnet_distill.yaml`` -> ``configs/coco/ablation.yaml``;
    ``configs/reg_sam/regnet_distill.yaml`` -> ``configs/ablation.yaml`` (the synthetic one).
    """
    folder = Path(main_config).parent
    for candidate in (folder / "ablation.yaml", folder.parent / "ablation.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}"))
    return out


SHARED_SECTIONS = (
    "teacher",
    "teacher_adapt",
    "cache",
    "data.root",
    "data.train",
    "data.unlabeled",
    "data.labeled_fraction",
    "data.labeled_seed",
)


def shared_differences(main: Config, other: Config) -> list[str]:
    """``key: main value vs other value`` for every teacher/cache/train-data key that differs.

    All runs of one workflow read the one teacher cache of the main config, so these must agree.
    """
    out = []
    for section in SHARED_SECTIONS:
        a, b = main, other
        for part in section.split("."):
            a, b = getattr(a, part), getattr(b, part)
        fa = _flatten(
            a.model_dump(mode="json", by_alias=True) if hasattr(a, "model_dump") else a, section
        )
        fb = _flatten(
            b.model_dump(mode="json", by_alias=True) if hasattr(b, "model_dump") else b, section
        )
        out += [
            f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}"
            for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)
        ]
    return out


def validate_runs(table: RunTable, output_root: str = "runs") -> dict[str, Config]:
    """Load every run's config (raises ConfigError naming the run on the first bad one)."""
    out = {}
    for name, run in table.runs.items():
        try:
            out[name] = run.load(output_root)
        except ConfigError as exc:
            raise ConfigError(
                f"run {name!r} ({run.config} + {list(run.overrides)}):\n{exc}"
            ) from None
    return out


def summarize_results(output_root: str | Path, since: float = 0.0) -> str:
    """Where the results written since ``since`` (a ``time.time()``) are, with their PQ.

    One line per evaluated run (``<run>/eval/metrics.json``: PQ, SQ, RQ, things/stuff PQ) and per
    report (``report_<group>/report.md``); the main run also lists its weights and predictions.
    Empty when nothing was written since ``since``. The Snakefile prints it at the end.
    """
    import json

    root = Path(output_root)
    lines = []
    for metrics in sorted(root.glob("*/eval/metrics.json")):
        if metrics.stat().st_mtime < since:
            continue
        run = metrics.parent.parent
        try:
            m = json.loads(metrics.read_text())
            a, th, st = m["All"], m.get("Things", {}), m.get("Stuff", {})
            pq = (
                f"PQ {a['pq']:.1f}  SQ {a['sq']:.1f}  RQ {a['rq']:.1f}  "
                f"(PQ things {th.get('pq', 0.0):.1f}, stuff {st.get('pq', 0.0):.1f})"
            )
        except (ValueError, KeyError, TypeError) as exc:
            pq = f"(unreadable metrics: {exc})"
        lines.append(f"  {run.name}: {pq}  {metrics}")
        if run.name == "main":
            extra = [f"weights {run / 'final.pth'}"]
            if (run / "predict").is_dir():
                extra.append(f"predictions {run / 'predict'}/")
            if (run / "eval" / "visualizations").is_dir():
                extra.append(f"panels {run / 'eval' / 'visualizations'}/")
            lines.append("        " + ", ".join(extra))
    for report in sorted(root.glob("report_*/report.md")):
        if report.stat().st_mtime >= since:
            lines.append(f"  report {report.parent.name.removeprefix('report_')}: {report}")
    if not lines:
        return ""
    return f"RegSAM results under {root}/:\n" + "\n".join(lines)
