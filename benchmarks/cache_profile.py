"""Where a transformer teacher's forward time goes: inside its blocks or outside (not collected by pytest).

    .venv/bin/python benchmarks/cache_profile.py [--model digits-dit] [--batch 128] [--guided] [--repeats 15]

A cache that skips whole blocks saves the blocks' time; everything outside them (embeddings,
rotary position embedding, output norm and projection, the denoiser's CFG combination) and
every elementwise op is still paid on each call. ``torch.utils.flop_counter`` counts only
matmuls, convolutions and attention, so its FLOPs share of the blocks is higher than their time
share, and the FLOPs-implied speedup of a cache overstates what a wall clock can show.

This script measures, in one process on the same batch: the wall time of a full network call,
the time spent inside the blocks (forward pre/post hooks on each block, summed), hence the
time share outside them, and the FLOPs share outside them. From those it predicts the measured
speedup of a cache that computes a fraction ``c`` of the block calls:
``1 / (outside_time + c * inside_time)`` (times as fractions of a full call), next to the
FLOPs-implied ``1 / (outside_flops + c * inside_flops)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.models import build_model  # noqa: E402
from bench.seeds import generators, noise  # noqa: E402
from methods.caching.base import block_lists, target_model  # noqa: E402


def profile(model: str = "digits-dit", batch: int = 128, guidance: float = 2.0, repeats: int = 15) -> dict:
    """Wall time of a full network call and the time and FLOPs shares inside the blocks."""
    bundle = build_model(model)
    den = bundle.denoiser
    blocks = [b for _, b in block_lists(target_model(den.net))]
    gens = generators(0, range(batch))
    x = noise(gens, bundle.sample_shape)
    cond = torch.arange(batch) % bundle.num_classes
    t = torch.full((batch,), 0.5)

    def call() -> torch.Tensor:
        return den(x, t, cond, guidance)

    inside = [0.0]
    starts: dict[int, float] = {}

    def pre(m, a):
        starts[id(m)] = time.perf_counter()

    def post(m, a, o):
        inside[0] += time.perf_counter() - starts.pop(id(m))

    with torch.no_grad():
        call()  # warm-up
        full, share = [], []
        hs = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
        try:
            for _ in range(repeats):
                inside[0] = 0.0
                t0 = time.perf_counter()
                call()
                wall = time.perf_counter() - t0
                full.append(wall)
                share.append(inside[0] / wall)
        finally:
            for h in hs:
                h.remove()
        with FlopCounterMode(display=False) as fc:
            call()
        total_flops = fc.get_total_flops()
        per_module = fc.get_flop_counts()
        block_flops = sum(sum(per_module[name].values()) for name in _block_names(den.net, blocks, per_module))
    return {"call_s": statistics.median(full), "time_in": statistics.median(share), "flops_in": block_flops / total_flops,
            "blocks": len(blocks)}  # fmt: skip


def speedups(time_in: float, flops_in: float, c: float) -> tuple[float, float]:
    """Speedups of a cache computing a fraction ``c`` of the block calls: implied by FLOPs, by time shares."""
    return 1 / ((1 - flops_in) + c * flops_in), 1 / ((1 - time_in) + c * time_in)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.75, 0.6, 0.5, 0.4, 0.3])
    args = ap.parse_args(argv)
    r = profile(args.model, args.batch, args.guidance, args.repeats)
    t_in, f_in = r["time_in"], r["flops_in"]
    print(f"{args.model}, batch {args.batch}, guidance {args.guidance}: full network call {1e3 * r['call_s']:.1f} ms")
    print(f"  blocks: {100 * t_in:.1f}% of the time, {100 * f_in:.1f}% of the FLOPs ({r['blocks']} blocks)")
    print(f"  outside the blocks: {100 * (1 - t_in):.1f}% of the time, {100 * (1 - f_in):.1f}% of the FLOPs")
    print("  block calls computed c -> speedup implied by FLOPs, by time shares, ratio (time / FLOPs):")
    for c in args.fractions:
        sf, st = speedups(t_in, f_in, c)
        print(f"    c = {c:.2f}: FLOPs {sf:.2f}x, time {st:.2f}x, ratio {st / sf:.2f}")
    return 0


def _block_names(net: torch.nn.Module, blocks: list[torch.nn.Module], per_module: dict) -> list[str]:
    """The flop counter's module names (``Global.<path>``) of the blocks."""
    ids = {id(b) for b in blocks}
    paths = [name for name, m in net.named_modules() if id(m) in ids]
    return [k for k in per_module if any(k.endswith("." + p) or k == p for p in paths)]


if __name__ == "__main__":
    sys.exit(main())
