"""Small builders shared by tests: random-weight digits bundles and tiny suites."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.denoiser import Denoiser, FlowSchedule, VPSchedule
from bench.models import ModelBundle
from bench.models.digits_nets import NULL_CLASS, DigitsDiT, DigitsUNet
from bench.suite import Job, ModelSpec, Suite


def random_bundle(kind: str = "eps", seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    if kind == "eps":
        net, sch = DigitsUNet().eval(), VPSchedule.linear()
    else:
        net, sch = DigitsDiT().eval(), FlowSchedule()
    return ModelBundle(f"random-{kind}", Denoiser(net, kind, sch, NULL_CLASS), (1, 16, 16), "image", 10, weights_hash="random")


def tiny_flux_model():
    """A random-weight diffusers FluxTransformer2DModel of 2 double and 2 single blocks (8 channels, 16 tokens)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_args(model, seed: int, t: float = 0.5) -> dict:
    """Keyword arguments of one call of ``tiny_flux_model()``: a batch of 2, 4x4 image tokens, 3 text tokens."""
    torch.manual_seed(seed)
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) // 4
    ids[:, 2] = torch.arange(16) % 4
    return dict(
        hidden_states=torch.randn(2, 16, model.config.in_channels),
        encoder_hidden_states=torch.randn(2, 3, model.config.joint_attention_dim),
        pooled_projections=torch.randn(2, model.config.pooled_projection_dim),
        timestep=torch.tensor([t, t]),
        img_ids=ids,
        txt_ids=torch.zeros(3, 3),
        return_dict=False,
    )


def inputs(bundle: ModelBundle, seeds: range, classes: list[int]):
    """Noise of ``seeds``, their class labels and generators, for calling a sampler directly."""
    from bench.seeds import generators, noise

    g = generators(0, seeds)
    return noise(g, bundle.sample_shape, bundle.dtype), torch.tensor(classes), g


def dict_state(model: torch.nn.Module) -> list[tuple[str, set[str]]]:
    """Each submodule's instance attributes (what a hook left behind would change)."""
    return [(n, set(m.__dict__) - {"training"}) for n, m in model.named_modules()]


def assert_model_clean(model: torch.nn.Module, before_dict, before_params) -> None:
    """The model is as it was before a cache was applied and removed: attributes, no hooks, weights."""
    assert dict_state(model) == before_dict
    assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k])


def tiny_suite(metrics=(), warmup: int = 0, **kw) -> Suite:
    return Suite(
        name="t",
        source="test",
        models=[],
        methods=[],
        steps=[],
        guidance=[],
        metrics=list(metrics),
        warmup=warmup,
        bootstrap=5,
        **kw,
    )


def job(method: str, steps: int, guidance: float, n: int, bs: int, model: str = "x", knobs=()) -> Job:
    return Job(ModelSpec(model), method, tuple(knobs), steps, guidance, 0, n, bs)


def clip_tokenizer_files(d: Path) -> None:
    """CLIP's BPE vocabulary (shipped with open_clip) in the files transformers' CLIPTokenizer reads."""
    import json

    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    enc = dict(tok.encoder)
    enc["<|startoftext|>"] = enc.pop("<start_of_text>")
    enc["<|endoftext|>"] = enc.pop("<end_of_text>")
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(enc))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))


def random_video_teacher(directory: Path) -> ModelBundle:
    """``moving-digits-dit`` with random weights (seed 0), saved to and loaded from ``directory``."""
    from bench.io import save_weights
    from bench.models.video import MovingDigitsDiT

    torch.manual_seed(0)
    path = Path(directory) / "moving-digits-dit.safetensors"
    save_weights(path, MovingDigitsDiT().state_dict())
    from bench.models import build_model

    return build_model("moving-digits-dit", weights=str(path))


def hooked_calls(model: torch.nn.Module, ad, args_list: list, steps: int | None = None, unpack: bool = False):
    """Call ``model`` once per entry of ``args_list`` with cache adapter ``ad`` installed for a
    ``steps``-step run (default: one step per entry) and its units counted; returns the outputs and
    the ``UnitCounter``. An entry is a kwargs dict, or with ``unpack`` an (args, kwargs) pair."""
    from bench.accounting import UnitCounter

    outs = []
    steps = len(args_list) if steps is None else steps
    with ad.installed(model, steps), UnitCounter(ad.units(model)) as uc, torch.no_grad():
        for a in args_list:
            outs.append(model(*a[0], **a[1]) if unpack else model(**a))
    return outs, uc
