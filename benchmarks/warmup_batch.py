"""Does a small warm-up batch warm a CPU run as well as a full one? (not collected by pytest)

    .venv/bin/python benchmarks/warmup_batch.py [--pairs 3] [--small 16] [--batch 150] [--threads 2]

The quick suite (``make demo``) warms each job up with one untimed call of ``timing.warmup_batch``
samples instead of a full batch. Here the same job runs through ``run_job`` with a full-batch
warm-up and with the small one, each in a fresh process (warm state never carries over), the two
of a pair back to back in alternating order so that drifts in machine load cancel. The headline is
the median over pairs of latency(small warm-up) / latency(full warm-up), per configuration of the
quick suite that costs most; 1 means the small warm-up leaves nothing cold for the timed batches.
The wall time of each process is reported beside it (what the demo saves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("digits-unet", "ddim", 20), ("digits-dit", "dpmpp_2m", 20)]


def one(model: str, method: str, steps: int, batch: int, warmup_batch: int | None, threads: int) -> dict:
    """One job in this process: run_job's row latency with the given warm-up batch."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.models import build_model
    from bench.suite import Job, ModelSpec, Suite
    from bench.worker import run_job

    torch.set_num_threads(threads)
    bundle = build_model(model)
    job = Job(ModelSpec(model), method, (), steps, 2.0, 0, 2 * batch, batch)
    suite = Suite("warmup", "benchmark", [], [], [], [], [], warmup=1, warmup_batch=warmup_batch, bootstrap=0)
    with torch.no_grad():
        row = run_job(job, bundle, suite)[0]
    return {"latency_s": row["latency_s"], "latency_iqr_s": row["latency_iqr_s"]}


def _spawn(model: str, method: str, steps: int, batch: int, warmup_batch: int | None, threads: int) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import warmup_batch as w; "
        f"print(json.dumps(w.one({model!r}, {method!r}, {steps}, {batch}, {warmup_batch!r}, {threads})))"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def compare(pairs: int = 3, small: int = 16, batch: int = 150, threads: int = 2) -> dict:
    import statistics

    out: dict = {"small": small, "batch": batch, "pairs": pairs, "configs": {}}
    for model, method, steps in CONFIGS:
        ratios, full_s, small_s = [], [], []
        for r in range(pairs):
            order = (None, small) if r % 2 == 0 else (small, None)
            res = {wb: _spawn(model, method, steps, batch, wb, threads) for wb in order}
            ratios.append(res[small]["latency_s"] / res[None]["latency_s"])
            full_s.append(res[None]["process_s"])
            small_s.append(res[small]["process_s"])
        out["configs"][f"{model}/{method}/{steps}"] = {
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "process_s_full_warmup": statistics.median(full_s),
            "process_s_small_warmup": statistics.median(small_s),
        }
    out["median_ratio"] = statistics.median(c["median_ratio"] for c in out["configs"].values())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--small", type=int, default=16)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(compare(a.pairs, a.small, a.batch, a.threads), indent=1))
