"""Harness timing overhead and feature-extraction throughput (not collected by pytest).

    .venv/bin/python benchmarks/overhead.py [--repeats 31] [--steps 5] [--batch 16] [--threads 1] [--real]

Overhead: the same sampler call (same seeds, same batch) timed bare with ``time.perf_counter``
and through bench's ``run_job`` (forward-counting hook, device sync, its own timer), interleaved
repeat by repeat in one process, alternating which goes first. The headline is the median of the
per-repeat ratios harness/bare (with a bootstrap 95% interval): the two calls of a pair run
back to back, so drifts in machine load cancel; the ratio of the two medians is reported beside
it. Target: at most 1.02. The harness call runs with the suites' default warm-up of one untimed
batch, as the bare loop is warm too (without it, the first call of a freshly prepared sampler
adds about 2% here). One thread by default: on a shared
machine, OpenMP threads contending with other processes add far more noise than the harness adds
time. The cost of the forward-counting hook alone is also measured (per network call, on an empty
module) and expressed as a fraction of a bare sampler call: the deterministic part of the overhead.

Throughput: images per second of the digits feature network, of clean-fid's clean resize, and
with ``--real`` of the real metric architectures with random weights (Inception-v3 at 299 px,
CLIP ViT-B/32 at 224 px): cost only, no metric values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.accounting import median_iqr  # noqa: E402
from bench.registry import METHODS  # noqa: E402
from bench.seeds import generators, noise  # noqa: E402
from bench.suite import Job, ModelSpec, Suite  # noqa: E402
from bench.worker import run_job  # noqa: E402


def digits_bundle():
    from bench.models import build_model
    from bench.paths import ASSETS

    if (ASSETS / "digits-unet.safetensors").is_file():
        return build_model("digits-unet"), "digits-unet (trained)"
    from bench.denoiser import Denoiser, VPSchedule
    from bench.models import ModelBundle
    from bench.models.digits_nets import NULL_CLASS, DigitsUNet

    torch.manual_seed(0)
    net = DigitsUNet().eval().requires_grad_(False)
    return ModelBundle("digits-unet", Denoiser(net, "eps", VPSchedule.linear(), NULL_CLASS), (1, 16, 16), "image", 10), (
        "digits-unet (random weights: the trained file is absent)"
    )


def overhead(repeats: int, steps: int, batch: int, guidance: float, method: str) -> dict:
    bundle, label = digits_bundle()
    sampler = METHODS.get(method)().prepare(bundle, steps)
    labels = torch.arange(batch) % 10

    def bare_call() -> float:
        t0 = time.perf_counter()
        gens = generators(0, range(batch))
        sampler(noise(gens, bundle.sample_shape), labels, guidance, gens)
        return time.perf_counter() - t0

    job = Job(ModelSpec("digits-unet"), method, (), steps, guidance, 0, batch, batch)
    # warm-up 1, as suites default to: the timed call then meets a sampler already called once, as the bare loop does
    suite = Suite("overhead", "benchmark", [], [], [], [], [], warmup=1, bootstrap=0)
    with torch.no_grad():
        bare_call()  # warm-up for both
        bare, harness = [], []
        for r in range(repeats):
            order = ("bare", "harness") if r % 2 == 0 else ("harness", "bare")
            for which in order:
                if which == "bare":
                    bare.append(bare_call())
                else:
                    harness.append(run_job(job, bundle, suite)[0]["latency_s"])
    mb, ib = median_iqr(bare)
    mh, ih = median_iqr(harness)
    from bench.accounting import ForwardCounter

    with torch.no_grad(), ForwardCounter(bundle.denoiser.net) as counter:
        bare_call()
    calls_per_batch = counter.calls
    hook_s = hook_cost()
    pairs = np.array([h / b for h, b in zip(harness, bare, strict=True)])
    rng = np.random.default_rng(0)
    boots = [np.median(pairs[rng.integers(0, len(pairs), len(pairs))]) for _ in range(2000)]
    return {
        "model": label,
        "method": method,
        "steps": steps,
        "batch": batch,
        "guidance": guidance,
        "repeats": repeats,
        "bare_median_s": mb,
        "bare_iqr_s": ib,
        "harness_median_s": mh,
        "harness_iqr_s": ih,
        "ratio_of_medians": mh / mb,
        "median_of_paired_ratios": float(np.median(pairs)),
        "median_of_paired_ratios_ci95": [float(q) for q in np.quantile(boots, [0.025, 0.975])],
        "network_calls_per_batch": calls_per_batch,
        "hook_cost_per_call_s": hook_s,
        "hook_fraction_of_bare": hook_s * calls_per_batch / mb,
        "threads": torch.get_num_threads(),
    }


def hook_cost(calls: int = 20_000) -> float:
    """Seconds the ForwardCounter pre-hook adds to one module call (an empty module, so only the hook differs)."""
    from bench.accounting import ForwardCounter

    m = torch.nn.Identity()
    x = torch.zeros(4, 1, 16, 16)

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            m(x)
        return time.perf_counter() - t0

    plain = min(loop() for _ in range(3))
    with ForwardCounter(m):
        hooked = min(loop() for _ in range(3))
    return max(hooked - plain, 0.0) / calls


def throughput(fn, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def feature_throughput(real: bool) -> dict:
    from bench.data import digits
    from bench.metrics.digits import features_and_probs
    from bench.metrics.inception import clean_resize, to_hwc_uint8

    x = digits("all")[0][:1024]
    out = {"digits_features_img_per_s": throughput(lambda: features_and_probs(x), len(x))}
    ims = to_hwc_uint8(x[:64])
    out["clean_resize_299_img_per_s"] = throughput(lambda: clean_resize(ims), len(ims))
    if real:
        import open_clip
        from torchvision.models import inception_v3

        inc = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        xi = torch.randn(8, 3, 299, 299)
        out["inception_v3_random_img_per_s"] = throughput(lambda: inc(xi), len(xi), repeats=2)
        vit = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        xv = torch.randn(16, 3, 224, 224)
        out["clip_vit_b32_random_img_per_s"] = throughput(lambda: vit.encode_image(xv), len(xv), repeats=2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--method", default="ddim")
    p.add_argument("--real", action="store_true", help="also time the real metric architectures (random weights)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = {"overhead": overhead(args.repeats, args.steps, args.batch, args.guidance, args.method)}
    res["throughput"] = feature_throughput(args.real)
    o = res["overhead"]
    print(f"sampler: {o['model']}, {o['method']} {o['steps']} steps, batch {o['batch']}, guidance {o['guidance']}")
    print(f"  bare    median {1e3 * o['bare_median_s']:.1f} ms (IQR {1e3 * o['bare_iqr_s']:.1f})")
    print(f"  harness median {1e3 * o['harness_median_s']:.1f} ms (IQR {1e3 * o['harness_iqr_s']:.1f})")
    lo, hi = o["median_of_paired_ratios_ci95"]
    print(
        f"  overhead: median paired ratio {o['median_of_paired_ratios']:.4f} [95% CI {lo:.4f}, {hi:.4f}], "
        f"ratio of medians {o['ratio_of_medians']:.4f}"
    )
    print(
        f"  forward-counting hook: {1e6 * o['hook_cost_per_call_s']:.2f} us per network call = "
        f"{100 * o['hook_fraction_of_bare']:.4f}% of a bare batch"
    )
    for k, v in res["throughput"].items():
        print(f"{k:34s} {v:10.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if o["median_of_paired_ratios"] <= 1.02 else 1


if __name__ == "__main__":
    sys.exit(main())
