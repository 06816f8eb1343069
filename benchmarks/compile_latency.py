"""Compiled against eager latency of the same sampler call (not collected by pytest).

    .venv/bin/python benchmarks/compile_latency.py [--model digits-unet] [--backend inductor] [--dtype float32]
        [--channels-last] [--steps 8] [--batch 16] [--repeats 15] [--device cpu] [--option key=value ...]

Two bundles of one model are built: eager (its options as given) and deployed (the same options
plus ``compile: true`` with ``--backend``, and ``--dtype`` / ``--channels-last``: bench's model
options, bench.models.options). Both are warmed up first, so compilation is not timed (the suites'
warm-up does the same), and checked to give the same samples (max abs difference reported). Then
the same sampler call (same seeds, same batch) is timed on each, interleaved repeat by repeat,
alternating which goes first: the two calls of a pair run back to back, so drifts in machine load
cancel. The headline is the median of the per-repeat ratios deployed / eager (below 1: the
deployment is faster) with a bootstrap 95% interval; the compile time (the first call) and both
medians are reported beside it. ``--option pipeline=DIR --option prompts=a,b`` runs a diffusers
pipeline (``--model diffusers``) on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.accounting import sync  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.registry import METHODS  # noqa: E402
from bench.seeds import generators, noise  # noqa: E402


def _call(bundle: Any, sampler: Any, batch: int, guidance: float, device: str) -> tuple[torch.Tensor, float]:
    labels = (torch.arange(batch) % bundle.num_classes).to(device) if bundle.num_classes else None
    gens = generators(0, range(batch), device)
    z = noise(gens, bundle.sample_shape, bundle.dtype, device)
    sync(device)
    t0 = time.perf_counter()
    x = sampler(z, labels, guidance, gens)
    sync(device)
    return x, time.perf_counter() - t0


def compare(
    model: str = "digits-unet",
    backend: str = "inductor",
    steps: int = 8,
    batch: int = 16,
    repeats: int = 15,
    guidance: float = 2.0,
    method: str = "ddim",
    dtype: str | None = None,
    channels_last: bool = False,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Eager vs deployed latency of one sampler call, interleaved (see the module docstring)."""
    base = dict(options or {})
    deployed_opts = {**base, "compile": True, "compile_backend": backend, "channels_last": channels_last}
    if dtype is not None:
        deployed_opts["dtype"] = dtype
    bundles = {"eager": build_model(model, **base), "deployed": build_model(model, **deployed_opts)}
    samplers = {}
    first: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, b in bundles.items():
            b.denoiser.net.to(device)
            samplers[k] = METHODS.get(method)().prepare(b, steps)
            outs[k], first[k] = _call(b, samplers[k], batch, guidance, device)  # compiles the deployed one
            _call(b, samplers[k], batch, guidance, device)  # a second warm call: allocator and caches settled
        times: dict[str, list[float]] = {"eager": [], "deployed": []}
        for r in range(repeats):
            for k in ("eager", "deployed") if r % 2 == 0 else ("deployed", "eager"):
                times[k].append(_call(bundles[k], samplers[k], batch, guidance, device)[1])
    ratios = np.array(times["deployed"]) / np.array(times["eager"])
    rng = np.random.default_rng(0)
    boot = [float(np.median(rng.choice(ratios, len(ratios)))) for _ in range(2000)]
    fwd = bundles["deployed"].denoiser.net.forward
    return {
        "model": model,
        "method": f"{method} {steps} steps, batch {batch}, guidance {guidance}",
        "deployment": bundles["deployed"].extra["deploy"].label(),
        "device": device,
        "threads": torch.get_num_threads(),
        "median_of_paired_ratios": float(np.median(ratios)),
        "median_of_paired_ratios_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "eager_median_s": float(np.median(times["eager"])),
        "deployed_median_s": float(np.median(times["deployed"])),
        "first_call_s": first,  # the deployed one's includes compilation
        "max_abs_diff": float((outs["deployed"].float() - outs["eager"].float()).abs().max()),
        "compiled_calls": dict(getattr(fwd, "calls", {})),
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-unet")
    ap.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--method", default="ddim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--option", action="append", default=[], help="a model option key=value (prompts: comma-separated)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    opts: dict[str, Any] = {}
    for kv in a.option:
        k, _, v = kv.partition("=")
        opts[k] = v.split(",") if k == "prompts" else v
    res = compare(a.model, a.backend, a.steps, a.batch, a.repeats, a.guidance, a.method, a.dtype, a.channels_last, a.device, opts)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
