"""The weights catalogue: every file a metric needs, where it comes from, its checksum and where
bench looks for it (``bench weights list|fetch|verify``).

Lookup order for an entry: the environment variable named in the entry (a path), then
``$BENCH_HOME/weights/<path>``, then the location the upstream library downloads to by default
(clean-fid: ``/tmp``; open_clip: ``~/.cache/clip``; torchvision: the torch hub cache).

Checksums: where the publisher states one (OpenAI's CLIP URLs carry the file's SHA-256; torchvision
file names carry its first 8 hex digits) it is checked on every first use in a process. Where the
publisher states none, ``bench weights fetch`` pins the SHA-256 of what it downloaded in
``$BENCH_HOME/weights/weights.lock.json`` and ``verify`` checks against that pin.
Offline, a metric whose weights are absent raises :class:`MissingWeightsError`, naming the weights
and the command that fetches them; bench never substitutes other weights or a made-up value.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from bench.io import WeightsError, write_json
from bench.paths import bench_home


class MissingWeightsError(WeightsError):
    """Weights a metric needs are not on this machine."""


@dataclass(frozen=True)
class WeightsSpec:
    """One catalogue entry. ``path`` is relative to ``$BENCH_HOME/weights``; a source of the form
    ``hf://org/repo`` is a Hugging Face snapshot (a directory holding ``files``)."""

    name: str
    description: str
    source: str
    path: str
    used_by: tuple[str, ...]
    sha256: str | None = None  # full digest or a published prefix; None: the publisher states none
    checksum_from: str = ""
    files: tuple[str, ...] = ()  # for a snapshot directory: the files that must all be there
    any_of: tuple[str, ...] = ()  # ... and at least one of these (weights stored either way)
    extra: tuple[str, ...] = ()  # fetched and checksummed when the source has them
    fallbacks: tuple[str, ...] = ()  # other libraries' default download locations
    kind: str = "weights"  # or "data"
    license: str = ""

    @property
    def env(self) -> str:
        return "BENCH_WEIGHTS_" + self.name.upper().replace("-", "_").replace(".", "_")

    @property
    def is_snapshot(self) -> bool:
        return self.source.startswith("hf://")

    def default_path(self) -> Path:
        return weights_dir() / self.path

    def candidates(self) -> list[Path]:
        out = []
        if os.environ.get(self.env):
            out.append(Path(os.environ[self.env]).expanduser())
        out.append(self.default_path())
        out += [Path(p).expanduser() for p in self.fallbacks]
        return out

    def fetch_command(self) -> str:
        return f"bench weights fetch {self.name}"


def _torch_hub(name: str) -> str:
    return str(Path(os.environ.get("TORCH_HOME", "~/.cache/torch")) / "hub" / "checkpoints" / name)


CATALOGUE: dict[str, WeightsSpec] = {
    s.name: s
    for s in [
        WeightsSpec(
            "inception-2015-12-05",
            "TF Inception-v3 (2015-12-05) as TorchScript, the FID/KID/IS network of clean-fid and StyleGAN2-ADA",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            "inception-2015-12-05.pt",
            ("fid_inception", "kid_inception", "precision_inception", "recall_inception", "is_inception"),
            checksum_from="no published checksum: pinned at fetch",
            fallbacks=("/tmp/inception-2015-12-05.pt",),  # clean-fid's own download location on Linux
        ),
        WeightsSpec(
            "clip-vit-b-32-openai",
            "OpenAI CLIP ViT-B/32 (open_clip 'ViT-B-32', pretrained 'openai', QuickGELU); MLPerf's CLIP-score model",
            "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
            "clip/ViT-B-32.pt",
            ("clip_score",),
            sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            checksum_from="the SHA-256 in OpenAI's download URL",
            fallbacks=("~/.cache/clip/ViT-B-32.pt",),
        ),
        WeightsSpec(
            "clip-vit-l-14-openai",
            "OpenAI CLIP ViT-L/14 (open_clip 'ViT-L-14', pretrained 'openai', QuickGELU)",
            "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
            "clip/ViT-L-14.pt",
            ("clip_score_l14",),
            sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            checksum_from="the SHA-256 in OpenAI's download URL",
            fallbacks=("~/.cache/clip/ViT-L-14.pt",),
        ),
        WeightsSpec(
            "clip-vit-l-14-336-openai",
            "OpenAI CLIP ViT-L/14 at 336 px (open_clip 'ViT-L-14-336', 'openai'); CMMD's embedding network",
            "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
            "clip/ViT-L-14-336px.pt",
            ("cmmd",),
            sha256="3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            checksum_from="the SHA-256 in OpenAI's download URL",
            fallbacks=("~/.cache/clip/ViT-L-14-336px.pt",),
        ),
        WeightsSpec(
            "clip-vit-g-14-laion2b",
            "LAION CLIP ViT-g/14 (open_clip 'ViT-g-14', pretrained 'laion2b_s12b_b42k')",
            "hf://laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
            "clip/CLIP-ViT-g-14-laion2B-s12B-b42K",
            ("clip_score_g14",),
            checksum_from="no published checksum: pinned at fetch",
            files=("open_clip_pytorch_model.bin",),
        ),
        WeightsSpec(
            "pickscore-v1",
            "PickScore_v1 (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences, transformers CLIPModel",
            "hf://yuvalkirstain/PickScore_v1",
            "pickscore/PickScore_v1",
            ("pickscore",),
            checksum_from="no published checksum: pinned at fetch",
            files=("config.json",),
            any_of=("model.safetensors", "pytorch_model.bin"),
        ),
        WeightsSpec(
            "clip-vit-h-14-processor",
            "the CLIP-ViT-H-14-laion2B processor (tokenizer + image preprocessing) PickScore is used with",
            "hf://laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K",
            ("pickscore",),
            checksum_from="no published checksum: pinned at fetch",
            files=("tokenizer_config.json",),
            any_of=("preprocessor_config.json", "processor_config.json"),
            extra=("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json"),
        ),
        WeightsSpec(
            "alexnet-lpips",
            "torchvision AlexNet (ImageNet), the LPIPS backbone (LPIPS's linear heads ship with torchmetrics)",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "alexnet-owt-7be5be79.pth",
            ("lpips",),
            sha256="7be5be79",
            checksum_from="the SHA-256 prefix in torchvision's file name",
            fallbacks=(_torch_hub("alexnet-owt-7be5be79.pth"),),
        ),
        WeightsSpec(
            "partiprompts",
            "PartiPrompts (Yu et al. 2022): 1,632 prompts, the text set for CLIP score / PickScore on real models",
            "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
            "data/PartiPrompts.tsv",
            ("clip_score", "clip_score_l14", "clip_score_g14", "pickscore"),
            sha256="fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",
            checksum_from="SHA-256 of the copy this project was developed with",
            kind="data",
            license="Apache-2.0",
        ),
    ]
}


def weights_dir() -> Path:
    return bench_home() / "weights"


def lock_path() -> Path:
    return weights_dir() / "weights.lock.json"


def spec(name: str) -> WeightsSpec:
    if name not in CATALOGUE:
        from bench.registry import UnknownNameError

        raise UnknownNameError("weights", name, list(CATALOGUE))
    return CATALOGUE[name]


def _present(s: WeightsSpec, p: Path) -> bool:
    if s.is_snapshot:
        return (
            p.is_dir() and all((p / f).is_file() for f in s.files) and (not s.any_of or any((p / f).is_file() for f in s.any_of))
        )
    return p.is_file()


def find(name: str) -> Path | None:
    """The first location where the weights are present, or None."""
    s = spec(name)
    return next((p for p in s.candidates() if _present(s, p)), None)


def missing_message(name: str, metric: str | None = None) -> str:
    s = spec(name)
    who = f"metric {metric!r} needs" if metric else "bench needs"
    where = ", ".join(str(p) for p in s.candidates())
    return (
        f"{who} the {s.kind} {s.name!r} ({s.description}), not found at {where}. "
        f"Fetch them with `{s.fetch_command()}` (source: {s.source}), or set ${s.env} to a local copy."
    )


def require(name: str, metric: str | None = None) -> Path:
    """The local path of catalogue entry ``name``, checked against its checksum; raises
    :class:`MissingWeightsError` (naming the weights and the fetch command) when absent."""
    p = find(name)
    if p is None:
        raise MissingWeightsError(missing_message(name, metric))
    ok, why = _verify_cached(name, str(p), _stamp(p))
    if not ok:
        raise WeightsError(f"{name} at {p} failed its checksum ({why}). Fix: re-fetch with `bench weights fetch {name} --force`")
    return p


def _stamp(p: Path) -> tuple:
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)


@lru_cache(maxsize=64)
def _verify_cached(name: str, path: str, stamp: tuple) -> tuple[bool, str]:
    return verify_path(spec(name), Path(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digests(s: WeightsSpec, p: Path) -> dict[str, str]:
    if s.is_snapshot:
        return {f: sha256_file(p / f) for f in s.files + s.any_of + s.extra if (p / f).is_file()}
    return {p.name: sha256_file(p)}


def _read_lock() -> dict:
    try:
        return json.loads(lock_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def verify_path(s: WeightsSpec, p: Path) -> tuple[bool, str]:
    """(ok, explanation) for the copy at ``p``: the published checksum if there is one, else the
    pin recorded when it was fetched, else present-but-unpinned (ok, said so)."""
    if not _present(s, p):
        return False, "absent or incomplete"
    digests = _digests(s, p)
    if s.sha256:
        (digest,) = digests.values()
        if digest.startswith(s.sha256):
            return True, f"sha256 {digest[:16]}... matches ({s.checksum_from})"
        return False, f"sha256 {digest[:16]}... does not match the expected {s.sha256[:16]}... ({s.checksum_from})"
    pin = _read_lock().get(s.name)
    if pin:
        bad = sorted(f for f in set(digests) | set(pin) if pin.get(f) != digests.get(f))
        if bad:
            return False, f"{', '.join(bad)} differ from the sha256 pinned at fetch in {lock_path()}"
        return True, "matches the sha256 pinned at fetch"
    return (
        True,
        f"present; no published checksum and not fetched by bench, so unpinned (pin it: `bench weights fetch {s.name} --pin`)",
    )


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(name: str, force: bool = False, pin: bool = False) -> Path:
    """Download entry ``name`` into ``$BENCH_HOME/weights`` (atomically), check or pin its sha256.
    With ``pin``, an already present copy without a published checksum is pinned as it is."""
    s = spec(name)
    dest = s.default_path()
    if _present(s, dest) and not force:
        ok, why = verify_path(s, dest)
        if not ok:
            raise WeightsError(f"{name} at {dest}: {why}. Fix: `bench weights fetch {name} --force`")
        if pin and not s.sha256:
            _pin(s, dest)
        return dest
    try:
        if s.is_snapshot:
            from huggingface_hub import snapshot_download

            snapshot_download(s.source[len("hf://") :], local_dir=str(dest), allow_patterns=list(s.files + s.any_of + s.extra))
        else:
            _download(s.source, dest)
    except Exception as e:
        raise WeightsError(
            f"could not fetch {name} from {s.source} ({type(e).__name__}: {e}). "
            f"Fix: download it by hand to {dest} (or set ${s.env} to a copy), then run `bench weights verify {name}`"
        ) from e
    if s.sha256:
        ok, why = verify_path(s, dest)
        if not ok:
            bad = dest.with_name(dest.name + ".bad")
            os.replace(dest, bad)
            raise WeightsError(f"{name} downloaded from {s.source} but {why}; kept it as {bad} for inspection")
    else:
        _pin(s, dest)
    return dest


def _pin(s: WeightsSpec, p: Path) -> None:
    lock = _read_lock()
    lock[s.name] = _digests(s, p)
    write_json(lock_path(), lock)


@dataclass
class Status:
    name: str
    kind: str
    present: bool
    path: str
    ok: bool
    detail: str
    used_by: tuple[str, ...] = field(default_factory=tuple)


def status(name: str, check: bool = True) -> Status:
    s = spec(name)
    p = find(name)
    if p is None:
        return Status(name, s.kind, False, str(s.default_path()), False, f"absent; `{s.fetch_command()}`", s.used_by)
    if not check:
        return Status(name, s.kind, True, str(p), True, "present (not verified)", s.used_by)
    ok, why = verify_path(s, p)
    return Status(name, s.kind, True, str(p), ok, why, s.used_by)
