"""Quality of the committed CausVid student against its teacher at the same NFE and at 50 steps (not
collected by pytest).

    .venv/bin/python benchmarks/causvid_quality.py [--n 100] [--batch 50] [--threads 1]

The same seeds and labels for every row (the harness's: ``generators(seed, range(n))``, labels
k % 10), the teacher at the student's distilled guidance. Metrics are the registered suite metrics
(:mod:`bench.metrics.video`: ``fvd_digits`` against 1000 held-out clips, ``video_class_acc``,
``motion_w1``, ``jerk_ratio``), each with its bootstrap interval. NFE is counted from outside by a
hook on the network each sampler calls: ``nfe`` = network rows per sample (for the student: chunk
forwards), ``clip_nfe`` = frames computed per sample over the clip's frames (full-clip-equivalent
evaluations; a guided teacher call counts once, as the harness counts NFE), ``flops`` per sample by
torch's counter. A row of held-out real clips (another seed) shows each metric's floor at this n.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
METRIC_NAMES = ("fvd_digits", "video_class_acc", "motion_w1", "jerk_ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[4, 5, 50])
    ap.add_argument("--gammas", type=float, nargs="*", default=[1.0, 0.0], help="student sampling gamma values")
    ap.add_argument("--asset", default=str(REPO / "bench" / "assets" / "causvid-moving-digits-dit"),
                    help="the student's weights and record, without .safetensors/.json")  # fmt: skip
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(a.threads)
    from bench.accounting import flops_of
    from bench.metrics.base import MetricContext
    from bench.models import build_model
    from bench.registry import METHODS, METRICS
    from bench.seeds import generators, noise
    from bench.video_data import moving_digits
    from methods.distillation.causvid import committed_student

    bundle = build_model("moving-digits-dit")
    asset = Path(a.asset)
    record = json.loads(asset.with_suffix(".json").read_text())
    w = float(record["guidance"])
    runs = {}
    for gamma in a.gammas:
        rec = {**record, "gamma": gamma}
        runs[f"causvid {record['steps']}/chunk g{gamma:g}"] = committed_student(bundle, rec, asset.with_suffix(".safetensors"))
    for n in a.teacher_steps:
        runs[f"teacher euler-{n}"] = METHODS.get("euler")().prepare(bundle, n, {}, w)
    labels = torch.arange(a.n) % 10
    frames = bundle.sample_shape[0]
    rows = []

    def score(name: str, clips: torch.Tensor, extra: dict, labels: torch.Tensor = labels) -> None:
        ctx = MetricContext(clips, labels, bundle, bootstrap=50, seed=0)
        out = {"method": name, **extra}
        for m in METRIC_NAMES:
            v = METRICS.get(m)(ctx)
            out[m] = (v.value, v.ci_low, v.ci_high)
        rows.append(out)
        print(json.dumps(out), flush=True)

    for name, prep in runs.items():
        net = prep.denoiser.net
        seen = {"rows": 0, "frames": 0}

        def hook(module, args, kwargs, seen=seen) -> None:
            seen["rows"] += int(args[0].shape[0])
            seen["frames"] += int(args[0].shape[0]) * int(args[0].shape[1])

        def call(lo: int, hi: int, prep=prep) -> torch.Tensor:
            gens = generators(a.seed, range(lo, hi))
            return prep(noise(gens, bundle.sample_shape), labels[lo:hi], w, gens)

        h = net.register_forward_pre_hook(hook, with_kwargs=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            clips = torch.cat([call(lo, min(lo + a.batch, a.n)) for lo in range(0, a.n, a.batch)])
        wall = time.perf_counter() - t0
        h.remove()
        with torch.no_grad():
            flops = flops_of(lambda call=call: call(0, 1))
        rows_per = seen["rows"] / a.n
        # a guided teacher call is one NFE of two rows (cond + uncond), as the harness counts it
        cfg = prep.denoiser.rows_per_sample(w, True)
        extra = {"nfe": rows_per / cfg, "clip_nfe": seen["frames"] / frames / a.n / cfg, "gflops": flops / 1e9,
                 "sample_s": wall}  # fmt: skip
        score(name, clips, extra)
    real = moving_digits("heldout", a.n, seed=2)
    score("real held-out clips", real.clips, {"nfe": 0, "clip_nfe": 0, "gflops": 0, "sample_s": 0}, real.labels)
    print(f"\n{a.n} clips, seed {a.seed}, guidance {w:g}, 95% bootstrap intervals\n")
    print("| method | NFE | full-clip NFE | GFLOPs/clip | FVD-digits | class acc | motion W1 (px/frame) | jerk ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[m][0]:.3g} [{r[m][1]:.3g}, {r[m][2]:.3g}]" for m in METRIC_NAMES]
        print(f"| {r['method']} | {r['nfe']:g} | {r['clip_nfe']:.3g} | {r['gflops']:.3g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
