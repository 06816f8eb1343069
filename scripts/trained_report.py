"""The tables of reports/distillation.md from finished runs of the distillation and consistency suites.

Every number is read from the runs' own files or computed from their samples: each trained
configuration's FID with its CI, precision and recall (held-out digits), its paired FID difference
over the same seeds against the teacher at the same NFE (first-order DDIM/Euler and DPM-Solver++(2M))
and against the 50-step reference, its training class and measured cost, and the speedup at matched
quality decided by the paired rule (``bench report --match paired``).

    .venv/bin/python scripts/trained_report.py results/distillation/RUN results/consistency/RUN \
        --tol 0.25 --out reports/distillation_tables.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench.metrics.paired import paired_jobs, run_bundle
from bench.report import build_report, fmt
from bench.report.data import Run, load_run, merge_runs

FIRST_ORDER = {"digits-unet": "ddim", "digits-dit": "euler"}
TRAINED = ("finetune", "full")


def _training(method: str) -> str:
    from bench.registry import METHODS

    return METHODS.get(method).training if method in METHODS else "?"


def _row(ok: pd.DataFrame, model: str, method: str, steps: int) -> pd.Series | None:
    hit = ok[(ok["model"] == model) & (ok["method"] == method) & (ok["steps"] == steps)]
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
            "precision",
            "recall",
            "training cost",
        ]
        rows = []
        teach = sub[sub["method"].isin([first, "dpmpp_2m"])].sort_values(["method", "steps"])
        for _, r in teach.iterrows():
            rows.append(
                [r["method"], "teacher", "free", int(r["steps"]), fmt.num(r["nfe"], 3), fmt.ci(r["fid"], r["fid_ci_low"], r["fid_ci_high"], 3),
                 "", "", _diff(run, bundle, r, ref, bootstrap) if int(r["steps"]) != 50 else "(reference)",
                 fmt.num(r["precision"], 3), fmt.num(r["recall"], 3), ""]
            )  # fmt: skip
        trained = sub[[_training(m) in TRAINED for m in sub["method"]]].sort_values(["family", "method", "steps"])
        for _, r in trained.iterrows():
            nfe = int(round(float(r["nfe"])))
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
    args = ap.parse_args()
    run = merge_runs([load_run(r) for r in args.runs])
    text = [f"Runs: {', '.join(str(d) for d in run.dirs or (run.path,))}. Paired differences: FID of the row minus the "
            f"other configuration's over the same 500 seeds, {args.bootstrap} bootstrap draws; bold: the 95% CI lies "
            "below 0 (the row is better).\n", tables(run, args.bootstrap)]  # fmt: skip
    if args.report is not None:
        rep = build_report(run, out=args.report, match="paired", quality_tol=args.tol)
        t = rep.speedups.table
        rows = [
            [s["model"], s["method"], s["family"], s["training"], "yes" if s["matched"] else "no",
             fmt.ratio(s["speedup"]) if s["matched"] else "", fmt.duration(s["train_cost_s"])]
            for _, s in t.sort_values(["model", "family", "method"]).iterrows()
        ]  # fmt: skip
        text.append(f"### Speedup at matched quality ({rep.speedups.rule()})\n")
        text.append(fmt.markdown_table(["model", "method", "family", "class", "matched", "speedup", "training cost"], rows))
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
