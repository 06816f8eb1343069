"""Runs in the isolated ``imagereward`` or ``hpsv2`` environment (``bench env setup NAME``), never in
bench's own: ``python -I preference_worker.py request.json result.json``. Standard library only at
the top level; each package is imported inside the function that uses it.

Request: ``{"op": "score" | "missing" | "fetch", "model": "imagereward" | "hpsv2",
"images": [{"path": PNG, "prompt": str}], "weights_dir": DIR, "device": str}``. ``score`` calls the
package's own scoring (``ImageReward.load(...).score(prompt, path)``;
``hpsv2.score(path, prompt, cp=..., hps_version="v2.1")``) on each (image, prompt) pair, after
checking that every file the package would download is present (the worker runs with the hub
offline): missing files are reported with the fetch command, never downloaded. ``fetch`` runs the
packages' own downloads.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")  # what ImageReward.load downloads from THUDM/ImageReward
IMAGEREWARD_TOKENIZER = ("bert-base-uncased", "vocab.txt")  # the tokenizer its BLIP loads from the hub
HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"  # hpsv2's hps_version_map["v2.1"], from xswu/HPSv2
HPS_BASE = ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin")  # the open_clip model it builds on


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(repo, filename)
    return isinstance(p, str) and Path(p).is_file()


def missing(model: str, weights_dir: Path) -> list[str]:
    out = []
    if model == "imagereward":
        out += [f"{f} (hf://THUDM/ImageReward) -> {weights_dir}" for f in IMAGEREWARD_FILES if not (weights_dir / f).is_file()]
        if not _cached(*IMAGEREWARD_TOKENIZER):
            out.append(f"the {IMAGEREWARD_TOKENIZER[0]} tokenizer (hf://{IMAGEREWARD_TOKENIZER[0]}) -> the Hugging Face cache")
    elif model == "hpsv2":
        if not (weights_dir / HPS_CHECKPOINT).is_file():
            out.append(f"{HPS_CHECKPOINT} (hf://xswu/HPSv2) -> {weights_dir}")
        if not _cached(*HPS_BASE):
            out.append(f"open_clip ViT-H-14 laion2B-s32B-b79K (hf://{HPS_BASE[0]}/{HPS_BASE[1]}) -> the Hugging Face cache")
    else:
        raise ValueError(f"unknown model {model!r}")
    return out


def score(req: dict) -> dict:
    model, wd = req["model"], Path(req["weights_dir"])
    device = req.get("device", "cpu")
    images = req["images"]
    if model == "imagereward":
        import ImageReward as RM

        rm = RM.load(str(wd / IMAGEREWARD_FILES[0]), device=device, med_config=str(wd / IMAGEREWARD_FILES[1]))
        values = [float(rm.score(im["prompt"], im["path"])) for im in images]
    else:
        import hpsv2

        values = [
            float(hpsv2.score(im["path"], im["prompt"], cp=str(wd / HPS_CHECKPOINT), hps_version="v2.1")[0]) for im in images
        ]
    return {"ok": True, "values": values}


def fetch(req: dict) -> dict:
    model, wd = req["model"], Path(req["weights_dir"])
    wd.mkdir(parents=True, exist_ok=True)
    try:
        _download(model, wd)
    except Exception as e:
        return {
            "ok": False,
            "error": "fetch_failed",
            "message": f"could not fetch the weights of {model} ({type(e).__name__}: {str(e)[:300]}). "
            "Fix: put them there by hand: " + "; ".join(missing(model, wd)),
        }
    return {"ok": True, "missing": missing(model, wd)}


def _download(model: str, wd: Path) -> None:
    if model == "imagereward":
        import ImageReward as RM
        from transformers import BertTokenizer

        RM.load("ImageReward-v1.0", device="cpu", download_root=str(wd))
        BertTokenizer.from_pretrained(IMAGEREWARD_TOKENIZER[0])
    else:
        from huggingface_hub import hf_hub_download

        hf_hub_download("xswu/HPSv2", HPS_CHECKPOINT, local_dir=str(wd))
        hf_hub_download(*HPS_BASE)


def main(argv: list[str]) -> int:
    req_path, res_path = Path(argv[1]), Path(argv[2])
    req = json.loads(req_path.read_text())
    try:
        gone = missing(req["model"], Path(req["weights_dir"]))
        if req["op"] == "missing":
            res = {"ok": True, "missing": gone}
        elif req["op"] == "fetch":
            res = fetch(req)
        elif gone:
            res = {
                "ok": False,
                "error": "missing_weights",
                "missing": gone,
                "message": f"metric {req['metric']!r} needs weights that are not on this machine: "
                + "; ".join(gone)
                + f". Fetch them with `{req['fetch_command']}`",
            }
        else:
            res = score(req)
    except Exception as e:  # reported to bench with the traceback
        res = {"ok": False, "error": "error", "message": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    res_path.write_text(json.dumps(res))
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
