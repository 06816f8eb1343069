"""Build the CausVid student of moving-digits-dit and commit it (not collected by pytest).

    .venv/bin/python benchmarks/causvid_train.py [--steps 4] [--guidance 2.0] [--threads 1] [KNOB=VALUE ...]

Builds the method's three artifacts (teacher trajectories, ODE initialisation, DMD generator) in the
default artifact store ($BENCH_HOME/artifacts), exactly as a suite's ``bench build`` would: a killed
run resumes from the store's checkpoints when started again with the same arguments. Then copies the
generator's weights to ``bench/assets/causvid-moving-digits-dit.safetensors`` and writes its record
(command, seed, knobs, steps, wall time and losses of each stage, the artifact keys) beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "bench" / "assets" / "causvid-moving-digits-dit"


def knob_value(text: str) -> tuple[str, object]:
    name, _, raw = text.partition("=")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per chunk")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-commit", action="store_true", help="build only; do not write bench/assets")
    ap.add_argument("knobs", nargs="*", type=knob_value, help="causvid knobs, NAME=VALUE")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(a.threads)
    from bench.artifacts import ensure_all
    from bench.models import build_model
    from bench.registry import METHODS

    knobs = dict(a.knobs)
    method = METHODS.get("causvid")(**knobs)
    bundle = build_model("moving-digits-dit")
    t0 = time.perf_counter()
    arts = ensure_all(method, bundle, a.steps, a.guidance, progress=True)
    wall = time.perf_counter() - t0
    by_name = {art.record["name"]: art for art in arts.values()}
    gen = by_name["generator"]
    stages = {
        name: {k: v for k, v in art.record["cost"].items() if k != "sessions"} | {"key": art.key} for name, art in by_name.items()
    }
    print(json.dumps(stages, indent=1))
    if a.no_commit:
        return
    shutil.copyfile(gen.path / "student.safetensors", ASSET.with_suffix(".safetensors"))
    cmd = " ".join(["python benchmarks/causvid_train.py", f"--steps {a.steps}", f"--guidance {a.guidance:g}",
                    f"--threads {a.threads}", *(f"{k}={json.dumps(v)}" for k, v in knobs.items())])  # fmt: skip
    record = {
        "command": cmd,
        "method": "causvid",
        "teacher": "moving-digits-dit",
        "teacher_weights_hash": bundle.weights_hash,
        "seed": method.config["seed"],
        "knobs": method.config,
        "steps": a.steps,
        "chunk_frames": method.config["chunk_frames"],
        "guidance": a.guidance,
        "gamma": method.config["gamma"],
        "wall_s_total": round(sum(float(s["wall_s"]) for s in stages.values()), 1),
        "wall_s_this_call": round(wall, 1),
        "threads": a.threads,
        "torch": torch.__version__,
        "stages": stages,
    }
    ASSET.with_suffix(".json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {ASSET}.safetensors and .json")


if __name__ == "__main__":
    main()
