"""The tables of reports/distillation.md from finished runs of the distillation and consistency suites.

Every number is read from the runs' own files or computed from their samples: each trained
configuration's FID with its CI, precision and recall (held-out digits), its paired FID difference
over the same seeds against the teacher at the same NFE (first-order DDIM/Euler, DPM-Solver++(2M) and
the best training-free configuration of the run at that NFE) and against the 50-step reference, its
training class and measured cost, and the speedup at matched quality decided by the paired rule (``bench report --match paired``).

    .venv/bin/python scripts/trained_report.py results/distillation/RUN results/consistency/RUN \
        --tol 0.25 --out reports/distillation_tables.md
    .venv/bin/python scripts/trained_report.py results/learned_solvers/RUN --out reports/learned_solvers_tables.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bench.metrics.paired import paired_jobs, run_bundle
from bench.report import build_report, fmt
from bench.report.data import Run, load_run, merge_runs

FIRST_ORDER = {"digits-unet": "ddim", "digits-dit": "euler"}
TRAINED = ("params", "finetune", "full")


def _training(method: str) -> str:
    from bench.registry import METHODS

    return METHODS.get(method).training if method in METHODS else "?"


def _row(ok: pd.DataFrame, model: str, method: str, steps: int) -> pd.Series | None:
    """The configuration of ``method`` at ``steps`` on its default (uniform) schedule."""
    hit = ok[(ok["model"] == model) & (ok["method"] == method) & (ok["steps"] == steps)]
    hit = hit[[_label(r) == method for _, r in hit.iterrows()]]
    return hit.iloc[0] if len(hit) else None


def _diff(run: Run, bundle, a: pd.Series, b: pd.Series | None, bootstrap: int) -> str:
    if b is None:
        return "n/a"
    da, db = run.job_dir(str(a["job_id"])), run.job_dir(str(b["job_id"]))
    if da is None or db is None:
        return "no samples"
    (d,) = paired_jobs(da, db, ["fid"], bundle, bootstrap)
    mark = "**" if d.diff.ci_high < 0 else ""
    return f"{mark}{d.diff.value:+.3f} [{d.diff.ci_low:+.3f}, {d.diff.ci_high:+.3f}]{mark}"


def _best_free(ok: pd.DataFrame, model: str, nfe: int) -> pd.Series | None:
    """The training-free configuration of ``model`` with the lowest FID at ``nfe`` (None if none ran)."""
    is_free = pd.Series([_training(m) == "free" for m in ok["method"]], index=ok.index)
    free = ok[(ok["model"] == model) & is_free]
    free = free[free["nfe"].round().astype(int) == nfe]
    return free.sort_values("fid").iloc[0] if len(free) else None


def _label(row: pd.Series) -> str:
    """A configuration's method with its schedule when that is not the default uniform one."""
    schedule = json.loads(row.get("knobs") or "{}").get("schedule", "uniform")
    return row["method"] if schedule == "uniform" else f"{row['method']} [{schedule}]"


def tables(run: Run, bootstrap: int) -> str:
    ok = run.ok
    out = []
    for model in sorted(ok["model"].unique()):
        bundle = run_bundle(run.record, model)
        sub = ok[ok["model"] == model]
        first = FIRST_ORDER.get(model, "euler")
        ref = _row(ok, model, first, 50)
        out.append(f"### {model}\n")
        head = [
            "method",
            "family",
            "class",
            "steps",
            "NFE",
            "FID [95% CI]",
            f"- {first} same NFE [paired]",
            "- DPM++(2M) same NFE [paired]",
            f"- {first}-50 [paired]",
            "- best free same NFE [paired]",
            "precision",
            "recall",
            "training cost",
        ]
        rows = []
        teach = sub[[_training(m) == "free" for m in sub["method"]]].sort_values(["method", "steps"])
        for _, r in teach.iterrows():
            rows.append(
                [_label(r), "teacher", "free", int(r["steps"]), fmt.num(r["nfe"], 3), fmt.ci(r["fid"], r["fid_ci_low"], r["fid_ci_high"], 3),
                 "", "", _diff(run, bundle, r, ref, bootstrap) if int(r["steps"]) != 50 else "(reference)", "",
                 fmt.num(r["precision"], 3), fmt.num(r["recall"], 3), ""]
            )  # fmt: skip
        trained = sub[[_training(m) in TRAINED for m in sub["method"]]].sort_values(["family", "method", "steps"])
        for _, r in trained.iterrows():
            nfe = int(round(float(r["nfe"])))
            best = _best_free(ok, model, nfe)
            vs_best = "n/a" if best is None else f"{_label(best)}: {_diff(run, bundle, r, best, bootstrap)}"
            rows.append(
                [
                    f"**{r['method']}**",
                    r["family"],
                    _training(str(r["method"])),
                    int(r["steps"]),
                    fmt.num(r["nfe"], 3),
                    fmt.ci(r["fid"], r["fid_ci_low"], r["fid_ci_high"], 3),
                    _diff(run, bundle, r, _row(ok, model, first, nfe), bootstrap),
                    _diff(run, bundle, r, _row(ok, model, "dpmpp_2m", nfe), bootstrap),
                    _diff(run, bundle, r, ref, bootstrap),
                    vs_best,
                    fmt.num(r["precision"], 3),
                    fmt.num(r["recall"], 3),
                    fmt.duration(r.get("train_cost_s")),
                ]
            )
        out.append(fmt.markdown_table(head, rows))
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tol", type=float, default=0.25, help="matched-quality tolerance (paired rule)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", type=Path, help="also write the merged report (bench report --match paired) here")
    ap.add_argument(
        "--cost",
        default="latency_per_image_s",
        choices=("latency_per_image_s", "nfe", "flops"),
        help="the cost the matched configuration minimises and the chart's speedup divides (bench report --cost)",
    )
    args = ap.parse_args()
    run = merge_runs([load_run(r) for r in args.runs])
    text = [f"Runs: {', '.join(str(d) for d in run.dirs or (run.path,))}. Paired differences: FID of the row minus the "
            f"other configuration's over the same 500 seeds, {args.bootstrap} bootstrap draws; bold: the 95% CI lies "
            "below 0 (the row is better).\n", tables(run, args.bootstrap)]  # fmt: skip
    if args.report is not None:
        rep = build_report(run, out=args.report, match="paired", quality_tol=args.tol, cost=args.cost)
        t = rep.speedups.table
        ok = run.ok
        rows = [
            [s["model"], s["method"], s["family"], s["training"],
             f"yes, {int(ok.loc[s['row'], 'steps'])} steps" if s["matched"] else "no",
             fmt.ratio(s["speedup_nfe"]) if s["matched"] else "",
             fmt.ratio(s["speedup_latency"]) if s["matched"] else "", fmt.duration(s["train_cost_s"])]
            for _, s in t.sort_values(["model", "family", "method"]).iterrows()
        ]  # fmt: skip
        head = ["model", "method", "family", "class", "matched", "speedup (NFE)", "speedup (latency)", "training cost"]
        text.append(f"### Speedup at matched quality ({rep.speedups.rule()}; the cheapest such configuration by {args.cost})\n")
        text.append(fmt.markdown_table(head, rows))
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
