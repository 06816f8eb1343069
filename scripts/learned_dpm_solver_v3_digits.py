"""Paired FID differences of DPM-Solver-v3 on the digits teachers, from a finished run of
``suites/learned-dpm-solver-v3-digits.yaml`` (500 samples, held-out digits):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/bench run suites/learned-dpm-solver-v3-digits.yaml --run-id v3digits-heldout --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python scripts/learned_dpm_solver_v3_digits.py results/learned-dpm-solver-v3-digits/v3digits-heldout

For each (model, NFE) it prints the FID of every configuration, and the paired bootstrap difference
(same seeds, same resampled index sets) of DPM-Solver-v3 against DPM-Solver++(2M) on the same
schedule and against the best free configuration (lowest FID of dpmpp_2m / unipc on any schedule)
at that NFE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench.metrics.paired import paired_from_run, run_bundle

    df = pd.read_parquet(args.run / "results.parquet")
    df = df[df.status == "ok"].copy()
    record = json.loads((args.run / "run.json").read_text())
    df["schedule"] = df.knobs.apply(lambda k: json.loads(k).get("schedule", "uniform"))
    print(f"reference set: {sorted(df.reference_set.dropna().unique())}\n")
    print("| model | NFE | config | FID [95% CI] | class_acc | v3 - this (paired FID diff, 95% CI) |")
    print("|---|---|---|---|---|---|")
    for model, g in df.groupby("model"):
        bundle = run_bundle(record, model)
        for nfe, h in g[g.method != "ddim"].groupby("steps"):
            if nfe >= 50:
                continue
            free = h[h.method.isin(["dpmpp_2m", "unipc"])]
            best = free.loc[free.fid.idxmin()]
            for _, r in h.sort_values(["method", "schedule"]).iterrows():
                diffs = []
                if r.method == "dpm_solver_v3":
                    for other in (h[(h.method == "dpmpp_2m") & (h.schedule == r.schedule)].iloc[0], best):
                        (d,) = paired_from_run(args.run, r.job_id, other.job_id, ["fid"], bundle, args.bootstrap)
                        tag = "*" if d.significant else ""
                        diffs.append(f"vs {other.method}/{other.schedule}: {d.diff.value:+.3f} [{d.diff.ci_low:+.3f}, {d.diff.ci_high:+.3f}]{tag}")  # fmt: skip
                mark = " (best free)" if r.job_id == best.job_id else ""
                print(f"| {model} | {nfe} | {r.method}/{r.schedule}{mark} | {r.fid:.3f} [{r.fid_ci_low:.3f}, {r.fid_ci_high:.3f}] | "
                      f"{r.class_acc:.3f} | {'; '.join(diffs)} |", flush=True)  # fmt: skip
        ref = g[g.steps >= 50]
        for _, r in ref.iterrows():
            print(f"| {model} | {r.steps} | {r.method}/{r.schedule} (reference) | {r.fid:.3f} [{r.fid_ci_low:.3f}, {r.fid_ci_high:.3f}] | {r.class_acc:.3f} | |")  # fmt: skip
    v3 = df[df.method == "dpm_solver_v3"]
    for model, g in v3.groupby("model"):
        print(f"\n{model}: statistics build {g.train_cost_s.iloc[0]:.0f} s wall (CPU, shared machine), "
              f"teacher NFE {g.train_teacher_nfe.iloc[0]:.0f}, learned params {g.learned_params.iloc[0]:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
