"""Released distilled students as methods: a downloaded checkpoint run against its teacher.

A released student (LCM, SDXL-Turbo, SDXL-Lightning, Hyper-SD, DMD2, FLUX.1-schnell, ...) comes as
one of three things, by hub id (from the local Hugging Face cache; nothing is downloaded unless the
``download`` knob says so) or local path:

- ``pipeline``: a whole diffusers pipeline (SDXL-Turbo, FLUX.1-schnell), built as a bench model with
  the teacher's options (prompts, size, dtype, device), so its latents have the teacher's shape;
- ``unet``: the denoiser network alone, as a diffusers model directory (LCM) or as a state-dict file
  of the teacher's architecture (SDXL-Lightning, DMD2), swapped in for the teacher's;
- ``lora``: a LoRA (LCM-LoRA, Hyper-SD, DMD2's LoRA) loaded with diffusers/peft into a copy of the
  teacher's network and fused, as the authors' snippets do (``pipe.fuse_lora()``).

The student runs with the sampler its authors specify: a diffusers scheduler (their class, their
spacing or explicit timesteps, their prediction type) stepped over the student's denoiser, and the
guidance they specify (most run without classifier-free guidance; an LCM UNet takes the scale as an
input), whatever the suite's guidance. :class:`Prepared` carries the student's denoiser, so the
harness counts NFE, FLOPs and latency on the student's network.

Nothing is trained here: the training cost is the paper's, *quoted* (GPU-hours and the citation),
never measured, and NaN with "not published" where the source states none. The row says so
(``train_cost_source: quoted``) and the speedup chart draws it with its own marker.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.adapter import Knob, MethodAdapter, Prepared
from bench.bundle import Applies, ModelBundle
from bench.denoiser import Denoiser
from methods.solvers.scheduler_loop import vp_scheduler_config

NOT_PUBLISHED = "not published"
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


class ReleasedWeightsError(ValueError):
    """A released student's weights that are not on this machine (or cannot be used), with the fix."""


@dataclass(frozen=True)
class QuotedCost:
    """A training cost as a paper states it: GPU-hours (NaN: the source states none) and where."""

    gpu_hours: float
    citation: str

    @property
    def published(self) -> bool:
        return math.isfinite(self.gpu_hours)


def quoted_cost(quotes: Mapping[str, QuotedCost], student: str) -> QuotedCost:
    """The quote for this student checkpoint; a checkpoint no source costs is NaN, "not published"."""
    return quotes.get(student, QuotedCost(math.nan, f"{NOT_PUBLISHED} (no source states the training cost of {student})"))


# --- finding the weights ------------------------------------------------------------------------


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve_file(source: str, filename: str, download: bool) -> Path:
    """A weights file: ``source`` itself (a file), ``source/filename`` (a directory), or ``filename``
    of the hub repo ``source`` from the local Hugging Face cache (fetched only when ``download``)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename and (path / filename).is_file():
            return path / filename
        raise ReleasedWeightsError(f"{path} has no weights file {filename!r}; give the file name in the `weight_name` knob")
    if not _is_hub_id(source):
        raise ReleasedWeightsError(f"student {source!r}: no such file or directory, and not a hub id of the form OWNER/NAME")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, filename, local_files_only=not download))
    except Exception as e:
        raise ReleasedWeightsError(
            f"student weights {source}/{filename} are not in the local Hugging Face cache: fetch them with "
            f"`hf download {source} {filename}`, give a local path in the `student` knob, or set the knob "
            f"`download: true` ({type(e).__name__})"
        ) from e


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle with ``weights_only=True`` (DMD2's .bin)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ReleasedWeightsError(f"{path} is not a state dict")
    return sd


# --- the student's network ------------------------------------------------------------------------


def network_of(net: nn.Module) -> tuple[str, nn.Module]:
    """The attribute name (``unet`` or ``transformer``) and the module of a pipeline model's network."""
    for name in ("unet", "transformer"):
        m = getattr(net, name, None)
        if isinstance(m, nn.Module):
            return name, m
    raise ReleasedWeightsError(
        f"the teacher's network {type(net).__name__} has no .unet or .transformer: a released student's weights "
        "are swapped into a diffusers pipeline model (the `diffusers` model)"
    )


def with_network(net: nn.Module, attr: str, model: nn.Module) -> nn.Module:
    """A shallow copy of the teacher's conditioned wrapper ``net`` (its prompt embeddings and other
    buffers shared, not copied) whose network ``attr`` is ``model``; hooks are not shared, so the
    harness's counters on the student never touch the teacher."""
    clone = copy.copy(net)
    clone._modules = dict(net._modules)
    clone._parameters = dict(net._parameters)
    clone._buffers = dict(net._buffers)
    for k, v in list(vars(clone).items()):
        if "hooks" in k and isinstance(v, dict):
            setattr(clone, k, type(v)())
    setattr(clone, attr, model)
    return clone


def fused_lora(model: nn.Module, path: Path, scale: float) -> nn.Module:
    """A copy of ``model`` with the LoRA in ``path`` loaded by diffusers (peft) and fused at ``scale``
    (the authors' ``pipe.load_lora_weights(...); pipe.fuse_lora(lora_scale=scale)``)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ReleasedWeightsError("loading a LoRA needs peft: `pip install peft` (in bench's environment)") from e
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path.parent), weight_name=path.name, unet_config=getattr(model, "config", None), return_lora_metadata=True
    )
    other = sorted({k.split(".")[0] for k in state if not k.startswith(("unet.", "transformer."))})
    if other:
        raise ReleasedWeightsError(
            f"the LoRA {path.name} also changes {', '.join(other)}; bench applies a student's LoRA to the denoiser network only"
        )
    prefix = "unet" if any(k.startswith("unet.") for k in state) else "transformer"
    student = copy.deepcopy(model)
    # the adapter's alpha (and rank) come from the file's metadata where it has some, as in load_lora_weights
    kw = {"metadata": metadata} if metadata else {"network_alphas": alphas}
    student.load_lora_adapter(state, prefix=prefix, adapter_name="released", **kw)
    student.fuse_lora(lora_scale=scale)
    student.unload_lora()  # the fused weights stay; the LoRA layers (and their extra FLOPs) go
    return student


class EmbeddedGuidanceNet(nn.Module):
    """``net(x, t, cond, w)`` over a UNet distilled with the guidance scale as an input (an LCM UNet,
    ``time_cond_proj_dim`` set): the scale's embedding goes in as ``timestep_cond``, computed as the
    diffusers pipelines compute it (of w - 1, the pipelines' convention for LCM)."""

    def __init__(self, inner: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.dim = int(unet.config.time_cond_proj_dim)
        self._w_emb: torch.Tensor | None = None
        # the inner wrapper calls the UNet itself: the embedding reaches it as a keyword argument, by
        # one hook per UNet (a cached student reused by the next job gets this wrapper's, not a second)
        old = getattr(unet, "_bench_w_hook", None)
        if old is not None:
            old.remove()
        unet._bench_w_hook = unet.register_forward_pre_hook(self._add_timestep_cond, with_kwargs=True)

    @property
    def unet(self) -> nn.Module:
        return self.inner.unet

    def _add_timestep_cond(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "timestep_cond": self._w_emb}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float = 1.0) -> torch.Tensor:
        from diffusers import StableDiffusionPipeline

        w = torch.full((len(x),), float(guidance) - 1.0)
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=self.dim)  # uses no pipeline state
        self._w_emb = emb.to(device=x.device, dtype=self.unet.dtype)
        try:
            return self.inner(x, t, cond)
        finally:
            self._w_emb = None


class StudentDenoiser(Denoiser):
    """The student's denoiser at the guidance its authors specify (``scale``), whatever guidance the
    job asks for: classifier-free guidance only when ``scale`` != 1 and the student has an
    unconditional branch, or the scale as the network's input when it is embedded."""

    def __init__(self, net: nn.Module, prediction: str, schedule: Any, null_class: int | None, embedded: bool, scale: float):
        super().__init__(net, prediction, schedule, null_class if scale != 1.0 and not embedded else None, embedded)  # type: ignore[arg-type]
        self.scale = float(scale)

    def __call__(self, x, t, cond=None, guidance=1.0, s=None):  # type: ignore[override]
        return super().__call__(x, t, cond, self.scale, s)

    def rows_per_sample(self, guidance: float, conditional: bool) -> int:
        return super().rows_per_sample(self.scale, conditional)


# --- the authors' sampler -------------------------------------------------------------------------


@torch.no_grad()
def sample_scheduler(
    sched: Any,
    den: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    generators: list[torch.Generator] | None,
    step_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The diffusers pipelines' denoising loop with a scheduler whose timesteps are set: scale the
    input, one evaluation of the student per timestep, the scheduler's step (stochastic schedulers
    draw from the per-sample generators)."""
    import inspect

    params = inspect.signature(sched.step).parameters
    kw = {k: v for k, v in (step_kwargs or {}).items() if k in params}
    if "generator" in params:
        kw["generator"] = generators
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start at the noise itself
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    for t in sched.timesteps:
        out = den(scale(x, t), t, cond)
        x = sched.step(out, t, x, **kw, return_dict=False)[0]
    return x


# --- the adapter ----------------------------------------------------------------------------------
@dataclass
class Student:
    """A loaded student: its network wrapper (``net(x, t, cond[, w])``), the scheduler config its
    sampler starts from, and how its output and guidance are read."""

    net: nn.Module
    scheduler_config: dict[str, Any]
    prediction: str
    schedule: Any
    null_class: int | None
    embedded: bool


_LOADED: dict[tuple[Any, ...], Any] = {}  # the last student network or bundle loaded (a steps sweep loads it once)


class ReleasedStudent(MethodAdapter):
    """Base of the released-student methods: a subclass names the checkpoint (the ``student`` knob's
    default, ``student_kind``, the weights file for a step count), its sampler (:meth:`scheduler`,
    :meth:`set_steps`), its guidance and the quoted training costs of its checkpoints."""

    training = "finetune"
    student_kind: ClassVar[str]  # "pipeline" | "unet" | "lora"
    quotes: ClassVar[Mapping[str, QuotedCost]] = {}
    applies_to = Applies(arch=("unet",), conditioning=("text",), schedule=("vp",))

    # what a subclass specifies ---------------------------------------------------------------------

    def weight_file(self, steps: int) -> str:
        """The authors' weights file for ``steps`` steps ('' for a diffusers model or pipeline directory)."""
        return ""

    def scheduler(self, base_config: dict[str, Any]) -> Any:
        """The authors' scheduler, built ``from_config`` of ``base_config`` (the teacher pipeline's
        scheduler config, or the student pipeline's own)."""
        raise NotImplementedError

    def timesteps(self, steps: int) -> list[int] | None:
        """Explicit timesteps the authors give (None: the scheduler's own spacing for ``steps``)."""
        return None

    def set_steps(self, sched: Any, steps: int, device: Any) -> None:
        """Set the scheduler's timesteps as the authors' pipeline call does."""
        timesteps = self.timesteps(steps)
        if timesteps is not None:
            if len(timesteps) != steps:
                raise ValueError(f"the authors' timesteps {timesteps} are for {len(timesteps)} steps, not {steps}")
            sched.set_timesteps(device=device, timesteps=timesteps)
        else:
            sched.set_timesteps(steps, device=device)

    def guidance_scale(self) -> float:
        """The guidance the authors run the student at (1.0: none)."""
        return float(self.config.get("guidance_scale", 1.0))

    def step_kwargs(self) -> dict[str, Any]:
        return {}

    def lora_scale(self) -> float:
        return float(self.config.get("lora_scale", 1.0))

    # loading -----------------------------------------------------------------------------------------

    @property
    def student(self) -> str:
        return str(self.config["student"])

    def _weight_name(self, steps: int) -> str:
        return self.config.get("weight_name") or self.weight_file(steps)

    def load_student(self, bundle: ModelBundle, steps: int) -> Student:
        den = bundle.denoiser
        download = bool(self.config.get("download", False))
        key = (self.student_kind, self.student, self._weight_name(steps), self.lora_scale(), bundle.weights_hash, id(den.net))
        hit = _LOADED.get(key)
        if self.student_kind == "pipeline":
            sb = hit if hit is not None else self._student_bundle(bundle, download)
            _LOADED.clear()
            _LOADED[key] = sb
            if sb.sample_shape != bundle.sample_shape:
                raise ReleasedWeightsError(
                    f"student {self.student} makes latents of shape {sb.sample_shape}, the teacher {bundle.sample_shape}; "
                    "give the model the same height and width for both"
                )
            d = sb.denoiser
            return Student(d.net, dict(sb.extra["scheduler_config"]), d.prediction, d.schedule, d.null_class, d.guidance_embedded)
        attr, teacher = network_of(den.net)
        student = hit
        if student is None:
            student = self._student_network(teacher, steps, download)
            _LOADED.clear()
            _LOADED[key] = student
        net = with_network(den.net, attr, student)
        embedded = bool(getattr(getattr(student, "config", None), "time_cond_proj_dim", None))
        if embedded:
            net = EmbeddedGuidanceNet(net, student)
        return Student(net, teacher_scheduler_config(bundle), den.prediction, den.schedule, den.null_class, embedded)

    def _student_network(self, teacher: nn.Module, steps: int, download: bool) -> nn.Module:
        name = self._weight_name(steps)
        if self.student_kind == "lora":
            return fused_lora(teacher, resolve_file(self.student, name, download), self.lora_scale()).eval()
        if name:  # a state dict of the teacher's architecture
            sd = load_state_dict_file(resolve_file(self.student, name, download))
            student = copy.deepcopy(teacher)
            try:
                student.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ReleasedWeightsError(
                    f"{name} is not a state dict of the teacher's {type(teacher).__name__}: pair the student with its "
                    f"own teacher ({str(e).splitlines()[0]})"
                ) from e
            return student.eval()
        return self._unet_model(teacher, download).eval()

    def _unet_model(self, teacher: nn.Module, download: bool) -> nn.Module:
        cls = type(teacher)
        path = Path(self.student).expanduser()
        sub = self.config.get("subfolder", "") or None
        if not path.exists() and not _is_hub_id(self.student):
            raise ReleasedWeightsError(f"student {self.student!r}: no such directory, and not a hub id of the form OWNER/NAME")
        p = next(teacher.parameters())
        try:
            m = cls.from_pretrained(
                str(path) if path.exists() else self.student, subfolder=sub, local_files_only=not download, dtype=p.dtype
            )
        except (OSError, ValueError) as e:
            if path.exists():
                raise ReleasedWeightsError(f"{path} could not be loaded as a {cls.__name__}: {e}") from e
            raise ReleasedWeightsError(
                f"student {self.student!r} is not in the local Hugging Face cache: fetch it with "
                f"`hf download {self.student}`, give a local path in the `student` knob, or set the knob `download: true`"
            ) from e
        return m.to(device=p.device)

    def _student_bundle(self, bundle: ModelBundle, download: bool) -> ModelBundle:
        from bench.models import build_model

        opts = {k: v for k, v in bundle.options.items() if k not in ("pipeline", "weights")}
        opts["download"] = download
        sb = build_model("diffusers", pipeline=self.student, **opts)
        # the authors' scheduler starts from the student pipeline's own config (its spacing, shift)
        cfg = scheduler_config_of(self.student)
        if cfg is None:
            raise ReleasedWeightsError(f"student pipeline {self.student!r} has no scheduler/scheduler_config.json")
        sb.extra["scheduler_config"] = cfg
        return sb

    # the job -----------------------------------------------------------------------------------------

    def make(self, bundle: ModelBundle, steps: int, artifacts: Mapping[str, Any]) -> Prepared:
        st = self.load_student(bundle, steps)
        scale = self.guidance_scale()
        probe = self.scheduler(dict(st.scheduler_config))
        kind = "flow" if type(probe).__name__.startswith("FlowMatch") else st.prediction
        kind = PREDICTION.get(str(probe.config.get("prediction_type", "")), kind) if kind != "flow" else kind
        den = StudentDenoiser(st.net, kind, st.schedule, st.null_class, st.embedded, scale)

        def sampler(noise: torch.Tensor, cond: torch.Tensor | None, guidance: float, generators: list[torch.Generator]):
            sched = self.scheduler(dict(st.scheduler_config))  # fresh per call: schedulers keep a step index
            self.set_steps(sched, steps, noise.device)
            return sample_scheduler(sched, den, noise, cond, generators, self.step_kwargs())

        self.set_steps(probe, steps, "cpu")
        quote = quoted_cost(self.quotes, self.student)
        info = {
            "train_cost_source": "quoted",
            "train_cost_quoted_gpu_h": quote.gpu_hours,
            "train_cost_citation": quote.citation,
            "student": self.student,
            "student_guidance": scale,
            "student_timesteps": [float(t) for t in probe.timesteps],
        }
        return Prepared(sampler, den, info=info)


def common_knobs(student: str, what: str) -> tuple[Knob, ...]:
    """The knobs every released student has: where it is, and whether it may be fetched."""
    return (
        Knob("student", str, student, f"{what}: hub id (local Hugging Face cache) or local path"),
        Knob("weight_name", str, "", "weights file in the student's repo or directory ('' = the authors' file for the steps)"),
        Knob("download", bool, False, "allow fetching the student from the Hugging Face hub (default: local cache only)"),
    )


def scheduler_config_of(source: str) -> dict[str, Any] | None:
    """A pipeline's scheduler config, read from its directory or the local Hugging Face cache (the
    file alone: no component is loaded); None when it is in neither."""
    import json

    path: Path | None = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    if source and not path.is_file() and _is_hub_id(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
            path = Path(hit) if isinstance(hit, str) else None
        except Exception:
            path = None
    if source and path is not None and path.is_file():
        return json.loads(path.read_text())
    return None


def teacher_scheduler_config(bundle: ModelBundle) -> dict[str, Any]:
    """The teacher pipeline's own scheduler config (the authors build theirs ``from_config`` of it);
    else the settings of bench's schedule (its betas)."""
    return scheduler_config_of(str(bundle.options.get("pipeline", ""))) or vp_scheduler_config(bundle.denoiser)


def pipeline_scheduler(config: dict[str, Any]) -> Any:
    """The scheduler a student pipeline ships with (the class its config names, from diffusers)."""
    import diffusers

    name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ReleasedWeightsError(f"the student pipeline's scheduler {name!r} is not a diffusers scheduler")
    return cls.from_config(config)
