"""``bench compare BASELINE CANDIDATE``: match jobs of two runs and flag regressions.

Jobs are matched by (model, method, knobs, steps, guidance). A matched pair regresses when
- a quality metric is worse than the baseline by more than the baseline's CI (on the worse
  side) plus ``quality_tol`` times the baseline value (direction from the registry);
- NFE or FLOPs per image increased;
- latency normalised by the model's reference configuration measured in the same run
  (candidate latency / candidate reference latency, over the same ratio in the baseline)
  is worse than ``1 + speed_tol`` (absolute latency is never compared: machines differ);
- the job finished in the baseline and failed in the candidate.
When both runs are run directories whose matched jobs kept their samples and share seeds, each
pairable quality metric is also compared *paired*: the bootstrap of candidate - baseline draws the
same seed indices from both jobs, so the seed-to-seed spread they share cancels, and a loss beyond
``quality_tol`` of the baseline value whose paired 95% interval excludes 0 is a regression even
when it hides inside the two separate CIs.
Jobs present in only one run are listed, not flagged.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.metrics.paired import PairedDifference, pairable, paired_jobs, run_bundle
from bench.report import fmt
from bench.report.data import Run, RunError, config_key, config_label, higher_is_better
from bench.report.matched import ReferenceSpec, choose_references, default_rule_text, specs_from, worse_by
from bench.store import SamplesError, load_samples, samples_digest

DEFAULT_QUALITY_TOL = 0.05
DEFAULT_SPEED_TOL = 0.5
PAIRED_BOOTSTRAP = 50  # draws of the paired bootstrap when the run's suite sets none (its `bootstrap` otherwise)
COST_EPS = 1e-9  # relative: NFE and FLOPs are counted, not measured, so any increase counts


@dataclass
class Comparison:
    baseline: Run
    candidate: Run
    quality_tol: float
    speed_tol: float | None
    metrics: list[str]
    header: list[str]
    rows: list[list[str]]
    flagged: list[bool]
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)
    paired_draws: int = 0  # the paired bootstrap's draws; 0 when no job was compared paired

    @property
    def ok(self) -> bool:
        return not self.regressions

    def markdown(self) -> str:
        b, c = self.baseline, self.candidate
        speed = "not gated" if self.speed_tol is None else f"worse than {1 + self.speed_tol:.3g}x"
        out = [
            f"# bench compare: {c.suite_name}/{c.run_id} against {b.suite_name}/{b.run_id}\n",
            f"- baseline: `{b.path}`",
            f"- candidate: `{c.path}`",
            f"- quality: regression when worse than the baseline by more than its 95% CI plus {self.quality_tol:.1%} "
            "of its value (metric directions from the registry)",
        ]
        if self.paired_draws:
            out.append(
                f"- paired (same seeds in both runs): also a regression when worse by more than {self.quality_tol:.1%} "
                "of the baseline value and the paired 95% CI of candidate - baseline excludes 0 "
                f"({self.paired_draws} bootstrap draws of the same seed indices for both jobs)"
            )
        out += [
            "- NFE and FLOPs per image: regression on any increase",
            f"- latency, normalised by each model's reference configuration in the same run: regression when {speed}",
        ]
        out.append(f"- reference configurations (default: {default_rule_text()}):")
        out += [f"  - {m}: {r}" for m, r in self.references.items()]
        out.append(
            f"\n**{'PASS' if self.ok else 'FAIL'}**: {len(self.rows)} matched jobs, {len(self.regressions)} regression(s)\n"
        )
        out += [f"- REGRESSION {r}" for r in self.regressions]
        out += [f"- note: {n}" for n in self.notes]
        out.append("")
        out.append(fmt.markdown_table(self.header, self.rows))
        return "\n".join(out)


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def quality_regression(base: float, base_low: float, base_high: float, cand: float, higher: bool, tol: float) -> bool:
    """Candidate worse than the baseline by more than the baseline's CI half-width on the worse
    side plus ``tol * |base|``."""
    if math.isnan(base) or math.isnan(cand):
        return False
    half = (base - base_low) if higher else (base_high - base)
    half = 0.0 if math.isnan(half) else max(half, 0.0)
    return worse_by(cand, base, higher) > half + tol * abs(base)


def paired_regression(d: PairedDifference, higher: bool, tol: float) -> bool:
    """Paired candidate - baseline difference: worse by more than ``tol * |baseline|`` with its
    95% interval wholly on the worse side of 0."""
    worse_side = d.diff.ci_high < 0 if higher else d.diff.ci_low > 0
    return worse_side and worse_by(d.a, d.b, higher) > tol * abs(d.b)


def cost_increase(base: float, cand: float) -> bool:
    if math.isnan(base) or math.isnan(cand):
        return False
    return cand > base * (1 + COST_EPS) + 1e-12


def _index(run: Run, which: str, notes: list[str]) -> dict[tuple, pd.Series]:
    out: dict[tuple, pd.Series] = {}
    for _, r in run.df.iterrows():
        k = config_key(r)
        if k in out:
            notes.append(f"{which} has {config_label(r)} twice; the first row is used")
            continue
        out[k] = r
    return out


def samples_change(base_dir: Path | None, b: pd.Series, cand_dir: Path | None, c: pd.Series) -> str:
    """``identical`` when a matched job's samples are bitwise equal in both runs, else the largest
    absolute difference of a sample value (informational: a refactor that should not change
    outputs shows here first). Run directories compare their ``samples.npy``; results tables
    (a committed baseline ``.parquet``) compare the rows' ``samples_sha256`` digests, which say
    ``identical`` or ``changed`` only; ``-`` when neither is there."""
    paths = [d / "jobs" / str(r["job_id"]) / "samples.npy" if d is not None else None for d, r in ((base_dir, b), (cand_dir, c))]
    here = [p is not None and p.is_file() for p in paths]
    loaded = {}
    for p, ok in zip(paths, here, strict=True):
        if ok:
            try:
                loaded[p] = load_samples(p)
            except SamplesError as e:
                raise RunError(str(e)) from None
    if all(here):
        x, y = (loaded[p] for p in paths)
        if x.shape != y.shape:
            return f"shape {x.shape} -> {y.shape}"
        if np.array_equal(x, y):
            return "identical"
        return f"max |diff| {float(np.abs(x.astype(np.float64) - y).max()):.3g}"
    # a results table on one side or both: digests, of the samples file where there is one
    digests = [samples_digest(loaded[p]) if ok else r.get("samples_sha256") for p, ok, r in zip(paths, here, (b, c), strict=True)]
    if all(isinstance(d, str) and d for d in digests):
        return "identical" if digests[0] == digests[1] else "changed"
    return "-"


class _Pairer:
    """Paired differences of matched jobs of two run directories, the model loaded once per label."""

    def __init__(self, baseline: Run, candidate: Run, metrics: list[str], total: int, progress: bool) -> None:
        from tqdm import tqdm

        self.base, self.cand = baseline, candidate
        self.metrics = [m for m in metrics if pairable(m)]
        self.bundles: dict[str, Any] = {}
        self.draws = int((candidate.record.get("suite") or {}).get("bootstrap") or PAIRED_BOOTSTRAP)
        self.used = False
        self.bar = tqdm(
            total=total, desc="paired", unit="job", disable=not (progress and total and self.metrics), file=sys.stderr
        )

    def __call__(self, b: pd.Series, c: pd.Series, notes: list[str]) -> dict[str, PairedDifference]:
        if not self.metrics:
            return {}
        dirs = [run.run_dir / "jobs" / str(r["job_id"]) for run, r in ((self.cand, c), (self.base, b))]
        if not all((d / "samples.npy").is_file() and (d / "row.json").is_file() for d in dirs):
            return {}
        model = str(c["model"])
        try:
            if model not in self.bundles:
                self.bundles[model] = run_bundle(self.cand.record, model)
            diffs = paired_jobs(*dirs, self.metrics, self.bundles[model], self.draws)
        except (ValueError, FileNotFoundError, KeyError) as e:
            notes.append(f"{model} {config_label(c)}: not compared paired ({e})")
            return {}
        finally:
            self.bar.update(1)
        self.used = True
        return {d.metric: d for d in diffs}


def compare_runs(
    baseline: Run,
    candidate: Run,
    quality_tol: float = DEFAULT_QUALITY_TOL,
    speed_tol: float | None = DEFAULT_SPEED_TOL,
    reference: Iterable[ReferenceSpec] = (),
    paired: bool = True,
    progress: bool = False,
) -> Comparison:
    """Match the jobs of two runs and flag regressions (see the module docstring)."""
    if quality_tol < 0 or (speed_tol is not None and speed_tol < 0):
        raise RunError("tolerances must be >= 0")
    if speed_tol is not None and math.isinf(speed_tol):
        speed_tol = None
    notes: list[str] = []
    bi, ci = _index(baseline, "the baseline", notes), _index(candidate, "the candidate", notes)
    keys = [k for k in bi if k in ci]
    if not keys:
        raise RunError(
            f"no job of {candidate.path} matches one of {baseline.path} by (model, method, knobs, steps, guidance); "
            "compare runs of the same suite"
        )
    only_b = [config_label(bi[k]) for k in bi if k not in ci]
    only_c = [config_label(ci[k]) for k in ci if k not in bi]
    if only_b:
        notes.append(
            f"{len(only_b)} baseline job(s) not in the candidate (not compared): {'; '.join(only_b[:6])}{' ...' * (len(only_b) > 6)}"
        )
    if only_c:
        notes.append(
            f"{len(only_c)} candidate job(s) not in the baseline (not compared): {'; '.join(only_c[:6])}{' ...' * (len(only_c) > 6)}"
        )
    metrics = [m for m in baseline.metrics if m in candidate.metrics]

    # the latency yardstick: each model's reference configuration, measured in each run
    specs = list(reference) or specs_from((baseline.record.get("suite") or {}).get("reference"))
    ref_lat: dict[str, tuple[float, float]] = {}
    references: dict[str, str] = {}
    if metrics and len(baseline.ok):
        for model, ref in choose_references(baseline.ok, metrics[0], specs).items():
            k = config_key(baseline.ok.loc[ref.index])
            references[model] = ref.label + ("" if ref.rule.startswith("rule:") else f" ({ref.rule})")
            c = ci.get(k)
            if c is None or c["status"] != "ok":
                notes.append(f"{model}: the reference {ref.label} did not finish in the candidate; its latency is not compared")
                continue
            ref_lat[model] = (_f(bi[k]["latency_per_image_s"]), _f(c["latency_per_image_s"]))

    header = ["model", "configuration"]
    header += [f"{m} {'↑' if higher_is_better(m) else '↓'}: baseline [CI] -> candidate [CI] (delta)" for m in metrics]
    header += ["NFE", "FLOPs/img", "norm. latency ratio"]
    with_samples = baseline.run_dir is not None and candidate.run_dir is not None
    digests = all("samples_sha256" in run.df.columns for run in (baseline, candidate))
    changes: dict[tuple, str] = {}
    if with_samples or digests:  # did the samples themselves change?
        for k in keys:
            if bi[k]["status"] == "ok" and ci[k]["status"] == "ok":
                changes[k] = samples_change(baseline.run_dir, bi[k], candidate.run_dir, ci[k])
    changed = sum(v not in ("identical", "-") for v in changes.values())
    pairer = _Pairer(baseline, candidate, metrics, changed, progress) if with_samples and paired else None
    if changes:
        header.append("samples (same seeds)")
    header.append("flags")
    rows, flagged, regressions = [], [], []
    for k in keys:
        b, c = bi[k], ci[k]
        label = config_label(b)
        if b["status"] != "ok":
            if c["status"] == "ok":
                notes.append(f"{label}: failed in the baseline, finishes in the candidate")
            continue
        if c["status"] != "ok":
            msg = f"{b['model']} {label}: failed in the candidate ({c.get('error', '')})"
            regressions.append(msg)
            rows.append([b["model"], label] + ["-"] * (len(header) - 3) + ["FAILED"])
            flagged.append(True)
            continue
        for col in ("n_samples", "seed"):
            if col in b and col in c and _f(b[col]) != _f(c[col]):
                notes.append(f"{label}: {col} differs ({b[col]} vs {c[col]}); its quality numbers are not comparable")
        flags = []
        cells = [b["model"], label]
        same = changes.get(k, "-")
        pairs = pairer(b, c, notes) if pairer is not None and same not in ("identical", "-") else {}
        for m in metrics:
            bv, cv = _f(b[m]), _f(c[m])
            blo, bhi = _f(b.get(f"{m}_ci_low")), _f(b.get(f"{m}_ci_high"))
            cell = (
                f"{fmt.ci(bv, blo, bhi)} -> {fmt.ci(cv, c.get(f'{m}_ci_low'), c.get(f'{m}_ci_high'))} "
                f"({'+' if cv - bv >= 0 else ''}{fmt.num(cv - bv, 3)})"
            )
            if m in pairs:
                d = pairs[m].diff
                cell += f"; paired {'+' if d.value >= 0 else ''}{fmt.num(d.value, 3)} [{fmt.num(d.ci_low, 3)}, {fmt.num(d.ci_high, 3)}]"
            cells.append(cell)
            if quality_regression(bv, blo, bhi, cv, higher_is_better(m), quality_tol):
                flags.append(f"{m} worse")
            elif m in pairs and paired_regression(pairs[m], higher_is_better(m), quality_tol):
                flags.append(f"{m} worse (paired)")
        for col, name, show in (("nfe", "NFE", fmt.num), ("flops", "FLOPs", fmt.flops)):
            bv, cv = _f(b.get(col)), _f(c.get(col))
            cells.append(f"{show(bv)} -> {show(cv)}" if bv != cv else show(bv))
            if cost_increase(bv, cv):
                flags.append(f"{name} up")
        ratio = math.nan
        if b["model"] in ref_lat:
            rb, rc = ref_lat[b["model"]]
            lb, lc = _f(b["latency_per_image_s"]), _f(c["latency_per_image_s"])
            if all(v > 0 for v in (rb, rc, lb, lc)):
                ratio = (lc / rc) / (lb / rb)
        cells.append(fmt.ratio(ratio))
        if changes:
            cells.append(same)
        if speed_tol is not None and not math.isnan(ratio) and ratio > 1 + speed_tol:
            flags.append("slower")
        cells.append(", ".join(flags) or "ok")
        rows.append(cells)
        flagged.append(bool(flags))
        regressions += [f"{b['model']} {label}: {f}" for f in flags]
    if pairer is not None:
        pairer.bar.close()
    return Comparison(
        baseline, candidate, quality_tol, speed_tol, metrics, header, rows, flagged, regressions, notes, references,
        paired_draws=pairer.draws if pairer is not None and pairer.used else 0,
    )  # fmt: skip


def default_output(baseline: Run, candidate: Run) -> Path:
    """Beside the candidate run (``compare_<baseline-id>.md``), or under reports/ for a bare parquet."""
    from bench.paths import REPO

    name = f"compare_{baseline.suite_name}-{baseline.run_id}.md"
    if candidate.run_dir is not None:
        return candidate.run_dir / name
    return REPO / "reports" / f"compare_{candidate.run_id}_vs_{baseline.run_id}.md"
