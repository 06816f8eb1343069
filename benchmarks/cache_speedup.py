"""Measured against FLOPs-implied speedup of feature caches, side by side in one run (not collected by pytest).

    .venv/bin/python benchmarks/cache_speedup.py [--model moving-digits-dit] [--batch 32] [--steps 20] [--pairs 5]
        [--cache teacache:threshold=0.3 ...] [--width 256] [--forecast-free]

For each cache configuration, on one batch of the model's seeds: the FLOPs of a whole sampler run
with the cache and without it (``bench.accounting.flops_of``, as the harness counts them), the
fraction of cache units computed, and the wall time of the two runs, timed in alternation
(uncached, cached, uncached, ...; ``--pairs`` pairs after untimed runs of each until neither faults
in fresh memory, :func:`warm_up`) so both see the same machine. It prints, per cache: FLOPs-implied
speedup = uncached FLOPs / cached FLOPs, measured speedup = median uncached time / median cached time, and their ratio (1 = the clock
delivers what the FLOPs promise), with the spread of the per-pair ratios. With ``--threads 1`` it
also gives the ratio by the sampling thread's CPU time (``time.thread_time``; torch runs its ops
in the calling thread then), which other processes on the machine do not inflate: the median of the
per-pair ratios with a 95% bootstrap interval, and the ratio of the fastest uncached to the fastest
cached run (the least disturbed of each). On this shared virtual machine even the thread's CPU time
of one network call varies by up to a third between calls, so a ratio needs ten pairs or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import methods  # noqa: E402,F401  (registers the methods)
from bench.accounting import UnitCounter, flops_of  # noqa: E402
from bench.allocator import keep_freed_memory  # noqa: E402
from bench.bundle import ModelBundle  # noqa: E402
from bench.denoiser import Denoiser  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.registry import METHODS  # noqa: E402
from bench.seeds import generators, noise  # noqa: E402
from methods.caching.base import target_model  # noqa: E402

VIDEO_CACHES = [  # past their quality on the video teacher: the whole-stack caches skip 2-4x
    "first_block_cache:threshold=0.3",
    "teacache:threshold=0.3",
    "magcache:threshold=0.2",
    "taylorseer",
    "pab",
    "fastercache",
]
KEPT_VIDEO_CACHES = [  # the whole-stack caches where they keep Euler 16's FVD (suites/video-caches.yaml)
    "first_block_cache:threshold=0.05",
    "teacache:threshold=0.05",
    "magcache:threshold=0.02",
]
IMAGE_CACHES = ["teacache:threshold=0.4", "taylorseer", "taylorseer:order=2"]


def parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    knobs = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        knobs[k] = float(v) if "." in v else int(v)
    return name, knobs


def measure(model: str, caches: list[str], batch: int, steps: int, guidance: float, pairs: int) -> list[dict]:
    return list(rows(model, caches, batch, steps, guidance, pairs))


def wider(bundle: ModelBundle, width: int) -> ModelBundle:
    """The video teacher's architecture at ``width`` channels (heads of 64), random weights: the same
    blocks, caches and counting, with the matmuls a larger share of each call, as in real video DiTs."""
    from bench.models.video import MovingDigitsDiT

    if bundle.name != "moving-digits-dit" or width % 64:
        raise SystemExit("--width takes a multiple of 64 and the model moving-digits-dit")
    net = MovingDigitsDiT(num_attention_heads=width // 64, attention_head_dim=64, cross_attention_dim=width).eval()
    d = bundle.denoiser
    return dataclasses.replace(
        bundle, denoiser=Denoiser(net, d.prediction, d.schedule, d.null_class), weights_hash=f"random-{width}"
    )


def rows(
    model: str, caches: list[str], batch: int, steps: int, guidance: float, pairs: int, width: int | None = None
) -> Iterator[dict]:
    """One row per cache configuration, as each is measured."""
    keep_freed_memory()  # as bench itself runs (bench.allocator)
    torch.manual_seed(0)
    bundle = build_model(model)
    if width:
        bundle = wider(bundle, width)
    net = target_model(bundle.denoiser.net)
    seeds = range(batch)
    x = noise(generators(0, seeds), bundle.sample_shape, bundle.dtype)
    cond = torch.arange(batch) % bundle.num_classes if bundle.num_classes else None
    for spec in caches:
        name, knobs = parse(spec)
        ad = METHODS.get(name)(**knobs)
        cached = ad.prepare(bundle, steps)
        plain = METHODS.get(ad.config["solver"])().prepare(bundle, steps)

        def run(sampler):
            with torch.no_grad():
                return sampler(x.clone(), cond, guidance, generators(0, seeds))

        f_plain, f_cached = flops_of(lambda s=plain: run(s)), flops_of(lambda s=cached: run(s))
        with UnitCounter(ad.units(net)) as uc:
            run(cached)
        warm = warm_up(lambda s=plain: run(s), lambda s=cached: run(s))
        times: dict[str, list[float]] = {"plain": [], "cached": []}
        cpu: dict[str, list[float]] = {"plain": [], "cached": []}
        for i in range(pairs):
            order = ("plain", "cached") if i % 2 == 0 else ("cached", "plain")
            for which in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                run(plain if which == "plain" else cached)
                times[which].append(time.perf_counter() - t0)
                cpu[which].append(time.thread_time() - c0)
        implied = f_plain / f_cached
        measured = statistics.median(times["plain"]) / statistics.median(times["cached"])
        per_pair = [p / c / implied for p, c in zip(times["plain"], times["cached"], strict=True)]
        cpu_pairs = [p / c / implied for p, c in zip(cpu["plain"], cpu["cached"], strict=True)]
        by_cpu = statistics.median(cpu["plain"]) / statistics.median(cpu["cached"])
        row = dict(cache=spec, units=uc.fraction, implied=implied, measured=measured, ratio=measured / implied)
        row.update(lo=min(per_pair), hi=max(per_pair), plain_s=statistics.median(times["plain"]), warm=warm)
        row.update(cpu=by_cpu, cpu_ratio=by_cpu / implied, cpu_pair=statistics.median(cpu_pairs))
        row.update(cpu_ci=bootstrap_median(cpu_pairs), cpu_min=min(cpu["plain"]) / min(cpu["cached"]) / implied)
        yield row


def faults() -> int:
    """Minor page faults of the calling thread so far (fresh memory touched for the first time)."""
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def warm_up(plain: Callable[[], object], cached: Callable[[], object], most: int = 10) -> int:
    """Untimed runs of both until neither touches fresh memory (``most`` at most); how many it took.
    A cache keeps features alive from call to call, so malloc's heap can grow on its first few runs
    before freed blocks fit again (FirstBlockCache and PAB on the video teacher: four to five runs;
    TaylorSeer, before its buffers, never settled); timed then, its runs would pay for page faults
    an ongoing process no longer pays."""
    for i in range(1, most + 1):
        before = faults()
        plain(), cached()
        if faults() - before < 100:
            return i
    return most


def forecast_free() -> None:
    """Replace TaylorSeer's forecast by the stored output itself: no pass over any feature. The
    samples are wrong; the timing is a floor on what any forecast could cost on a forecast call,
    since the blocks still gate and add each sub-layer's output and change layout."""
    from methods.caching.taylorseer import TaylorSeerHook

    def stored(self: TaylorSeerHook, step: int) -> object:
        outs = [fs[0] for fs in self.factors]
        return tuple(outs) if self.tuple_out else outs[0]

    TaylorSeerHook.forecast = stored  # type: ignore[method-assign]


def bootstrap_median(xs: list[float], n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median of the per-pair ratios."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(xs), (n, len(xs)), generator=g)
    meds = torch.tensor(xs)[idx].median(dim=1).values.sort().values
    return meds[int(0.025 * n)].item(), meds[int(0.975 * n) - 1].item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="moving-digits-dit")
    ap.add_argument("--cache", nargs="*", default=None, help="name[:knob=value,...]; default: the video caches")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--width", type=int, default=None, help="moving-digits-dit's blocks at this width, random weights")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (1 on a machine whose other cores are busy)")
    ap.add_argument(
        "--forecast-free",
        action="store_true",
        help="TaylorSeer's forecast costs nothing (returns the last stored output, wrong samples): "
        "what is left of a forecast call is the blocks' own work around the sub-layers",
    )
    a = ap.parse_args(argv)
    if a.forecast_free:
        forecast_free()
    if a.threads:
        torch.set_num_threads(a.threads)
    caches = a.cache or (VIDEO_CACHES + KEPT_VIDEO_CACHES if a.model == "moving-digits-dit" else IMAGE_CACHES)
    print(
        f"{a.model}{f' at width {a.width} (random weights)' if a.width else ''}{' (TaylorSeer forecast free)' if a.forecast_free else ''}, batch {a.batch}, {a.steps} steps, guidance {a.guidance}, {a.pairs} alternating pairs, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "cache | units computed | speedup FLOPs-implied | measured (wall) | wall/implied [per-pair min, max] | "
        "thread CPU/implied: median pair [95% CI] | by fastest runs | uncached wall s | warm-up runs"
    )
    for r in rows(a.model, caches, a.batch, a.steps, a.guidance, a.pairs, a.width):
        print(
            f"{r['cache']} | {r['units']:.3f} | {r['implied']:.2f} | {r['measured']:.2f} | "
            f"{r['ratio']:.3f} [{r['lo']:.2f}, {r['hi']:.2f}] | {r['cpu_pair']:.3f} [{r['cpu_ci'][0]:.3f}, "
            f"{r['cpu_ci'][1]:.3f}] | {r['cpu_min']:.3f} | {r['plain_s']:.2f} | {r['warm']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
