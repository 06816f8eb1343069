"""Time to first frame and total latency: the CausVid student against its bidirectional teacher,
side by side in one run (not collected by pytest).

    .venv/bin/python benchmarks/causvid_latency.py [--batch 16] [--repeats 5] [--threads 1]

Both are timed from outside the method, by :class:`FirstFramesTimer`: a forward hook on the network
the harness counts (the prepared denoiser's ``net``) notes when each call ends and which frames it
computed at which time; the first frames are final when the last call that denoises frame 0 (a
call at t > 0 whose frames include frame 0) returns. A bidirectional teacher denoises every frame in
every call, so its time to first frame is its total latency; the causal student finishes its first
chunk after that chunk's own steps. The student's final first chunk is checked against the x0 that
call's output implies, so the moment timed is the moment those frames were final. Runs alternate
teacher / student, the median over repeats is reported, with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class FirstFramesTimer:
    """A forward hook on ``net`` (x, t, cond, ..., start=) noting each call's end time, first frame,
    frame count and time; :meth:`run` times one sampler call with it."""

    net: torch.nn.Module
    calls: list[dict[str, Any]] = field(default_factory=list)
    _handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x = args[0]
        t = torch.as_tensor(args[1]).reshape(-1)
        s = float(t.max()) / 1000.0
        start = int(kwargs.get("start", 0))
        # x0 of the frames this call denoised (flow: x0 = x - s v), to check it against the final frames
        x0 = (x - s * out).detach() if s > 0 else None
        self.calls.append({"end": time.perf_counter(), "start": start, "frames": int(x.shape[1]), "t": float(t.max()), "x0": x0})

    def __enter__(self) -> FirstFramesTimer:
        self._handle = self.net.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def run(self, fn: Any) -> tuple[torch.Tensor, float, float]:
        """(samples, seconds to the first frames, total seconds) of one call of ``fn``."""
        self.calls.clear()
        t0 = time.perf_counter()
        out = fn()
        total = time.perf_counter() - t0
        first = [c for c in self.calls if c["start"] == 0 and c["t"] > 0]
        if not first:
            raise RuntimeError("no network call denoised frame 0: is the timer on the network the sampler calls?")
        last = first[-1]
        return out, last["end"] - t0, total

    def first_chunk_x0(self) -> torch.Tensor:
        """The frames the last call denoising frame 0 made final (x0 of its output)."""
        return [c for c in self.calls if c["start"] == 0 and c["t"] > 0][-1]["x0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="student steps per chunk")
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[4, 5, 50])
    ap.add_argument("--asset", default=str(REPO / "bench" / "assets" / "causvid-moving-digits-dit"),
                    help="the student's weights and record, without .safetensors/.json")  # fmt: skip
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(a.threads)
    from bench.models import build_model
    from bench.registry import METHODS
    from bench.seeds import generators, noise
    from methods.distillation.causvid import committed_student

    bundle = build_model("moving-digits-dit")
    asset = Path(a.asset)
    record = json.loads(asset.with_suffix(".json").read_text())
    w = float(record["guidance"])
    runs = {"causvid": (committed_student(bundle, record, asset.with_suffix(".safetensors")), w)}
    for n in a.teacher_steps:
        runs[f"euler-{n}"] = (METHODS.get("euler")().prepare(bundle, n, {}, w), w)
    # the teacher unguided: one network row per sample and step, as the guidance-distilled student
    runs[f"euler-{a.teacher_steps[0]} w1"] = (METHODS.get("euler")().prepare(bundle, a.teacher_steps[0], {}, 1.0), 1.0)
    gens = generators(0, range(a.batch))
    z = noise(gens, bundle.sample_shape)
    cond = torch.arange(a.batch) % 10
    res: dict[str, dict[str, list[float]]] = {k: {"ttff": [], "total": []} for k in runs}
    with torch.no_grad():
        for prep, g in runs.values():  # warm-up
            prep(z, cond, g, generators(0, range(a.batch)))
        for _ in range(a.repeats):
            for name, (prep, g) in runs.items():
                with FirstFramesTimer(prep.denoiser.net) as timer:
                    out, ttff, total = timer.run(lambda prep=prep, g=g: prep(z, cond, g, generators(0, range(a.batch))))
                    if name == "causvid":
                        k = int(record["chunk_frames"])
                        assert torch.equal(timer.first_chunk_x0(), out[:, :k]), "the timed first chunk is not the final one"
                res[name]["ttff"].append(ttff)
                res[name]["total"].append(total)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    print(f"batch {a.batch}, {a.repeats} repeats (median), threads {a.threads}, guidance {w:g} (w1: the teacher unguided)")
    print(f"{'method':>10} {'TTFF s':>9} {'total s':>9}")
    for k, d in med.items():
        print(f"{k:>10} {d['ttff']:9.4f} {d['total']:9.4f}")
    s = med["causvid"]
    for n in [*a.teacher_steps, f"{a.teacher_steps[0]} w1"]:
        t = med[f"euler-{n}"]
        print(f"teacher euler-{n} / causvid ({a.steps}/chunk): TTFF ratio {t['ttff'] / s['ttff']:.2f}x, "
              f"total latency ratio {t['total'] / s['total']:.2f}x")  # fmt: skip
    print(json.dumps({"median": med}))


if __name__ == "__main__":
    main()
