"""The base of the models' options schemas (a registry entry's ``options``), and the deployment
options every generative network model shares (:class:`DeployOptions`): how the denoiser network
is run when its latency is measured.

- ``dtype``: the network's weights and input in float32, float16 or bfloat16; the sampler's own
  arithmetic (the solver, the noise, the schedule) stays in the bundle's dtype, and the network's
  output is cast back to it, as a mixed-precision deployment runs.
- ``channels_last``: the network's 4-d weights and its image input in the channels-last memory
  format (faster convolutions on most GPUs); the same numbers, a different layout.
- ``compile``: ``torch.compile`` of the denoiser network's forward (``compile_backend``:
  inductor by default; aot_eager / eager trace without generating code). Compilation happens on
  the first call, which the harness's warm-up calls cover (a suite with ``compile: true`` needs
  ``timing.warmup >= 1``).

:func:`deploy_network` applies them to a built network *outside the methods*: ``build_model``
calls it, and no method changes. Two things run eagerly on purpose: a call made while a torch
function or dispatch mode is active (the harness's FLOP and unit counting passes, which must see
the eager ops) and a call with gradients enabled (artifact training through a teacher). A
feature cache's hooks (diffusers ``ModelHook`` s on the network's submodules) are never traced:
a compiled network called with such hooks installed raises :class:`CompileHooksError`, which names
the fix, because dynamo would otherwise bake the cache's per-step Python state into guards,
recompile at every step and fall back to eager past its recompile limit (a latency that is
neither eager nor compiled). The suite planner skips cache x compiled-model pairs with that
reason (``bench.suite.expand``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn


class ModelOptions(BaseModel):
    """A model's options schema: suites are validated against it (strict types, unknown options
    rejected, values in range) before any model is built, as method knobs are by their ``Knob`` s."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Option -> its description (what `bench list models` shows)."""
        return {k: f.description or "" for k, f in cls.model_fields.items()}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


class DeployOptions(ModelOptions):
    """The deployment options of a generative network model (see the module docstring)."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="float32 | float16 | bfloat16: the network's weights and input (default float32)"
    )
    compile: bool = Field(False, description="bool, torch.compile the denoiser network (default false; needs warmup >= 1)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="inductor | aot_eager | eager: torch.compile's backend (default inductor)"
    )
    channels_last: bool = Field(False, description="bool, channels-last memory format for the network (default false)")


DEPLOY_KEYS = tuple(DeployOptions.model_fields)
RUNTIME_KEYS = ("compile", "compile_backend", "channels_last")  # same numbers: not part of a model's artifact identity


class DeployError(ValueError):
    """A bad deployment option value, with the fix in the message."""


class CompileHooksError(RuntimeError):
    """A compiled network was called with a feature cache's hooks installed on its submodules."""


@dataclass(frozen=True)
class Deploy:
    """How a network is deployed: the validated deployment options."""

    dtype: str = "float32"
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[Deploy, dict[str, Any]]:
        """The deployment options of ``options`` (validated) and the rest, for the model's builder."""
        given = {k: options[k] for k in DEPLOY_KEYS if k in options}
        try:
            DeployOptions.model_validate(given)
        except ValidationError as e:
            lines = [
                f"{'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg']}; fix: "
                f"{DeployOptions.model_fields[str(err['loc'][0])].description}"
                for err in e.errors()
            ]
            raise DeployError("bad model option: " + "; ".join(lines)) from None
        rest = {k: v for k, v in options.items() if k not in DEPLOY_KEYS}
        return cls(**given), rest

    @property
    def default(self) -> bool:
        return self == Deploy()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def row(self) -> dict[str, Any]:
        """The row's columns: ``dtype``, ``compiled``, ``compile_backend`` ('' when eager) and ``channels_last``."""
        return {
            "dtype": self.dtype,
            "compiled": self.compile,
            "compile_backend": self.compile_backend if self.compile else "",
            "channels_last": self.channels_last,
        }

    def label(self) -> str:
        """A short description: ``bfloat16, compiled (inductor), channels_last`` / ``float32, eager``."""
        parts = [self.dtype, f"compiled ({self.compile_backend})" if self.compile else "eager"]
        return ", ".join(parts + (["channels_last"] if self.channels_last else []))


def _counting() -> bool:
    """A torch function or dispatch mode is active (FLOP / unit counting): run eagerly."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return bool(torch._C._is_torch_function_mode_enabled()) or _get_current_dispatch_mode() is not None


def installed_hooks(net: nn.Module) -> list[str]:
    """Submodules of ``net`` (not ``net`` itself) carrying hooks that torch.compile would trace:
    a diffusers hook registry with hooks (a feature cache) or torch forward (pre-)hooks."""
    out = []
    for name, m in net.named_modules():
        if not name:
            continue  # the root's own hooks run outside its forward, in nn.Module.__call__
        reg = m.__dict__.get("_diffusers_hook")
        if (reg is not None and getattr(reg, "hooks", None)) or m._forward_hooks or m._forward_pre_hooks:
            out.append(name)
    return out


class DeployedForward:
    """The forward installed on a deployed network (``net.forward``): casts the input to the
    deployment dtype (and layout), calls the network's own forward, compiled or not, and casts
    the output back to the input's dtype."""

    def __init__(self, net: nn.Module, deploy: Deploy, cast_input: bool) -> None:
        self.deploy = deploy
        # the class's forward, called with the network: a deep copy of the network (a student
        # initialised from its teacher) then calls its own weights, never the original's
        self.eager: Callable[..., Any] = type(net).forward
        self.cast = cast_input and deploy.dtype != "float32"
        self.net_name = type(net).__name__
        self._net = [net]  # not a submodule attribute: kept out of the module tree
        self.compiled: Callable[..., Any] | None = None
        if deploy.compile:
            self.compiled = torch.compile(self.eager, backend=deploy.compile_backend, dynamic=False)
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtype = x.dtype
        if self.cast and x.is_floating_point():
            x = x.to(self.deploy.torch_dtype)
        if self.deploy.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = self.eager
        if self.compiled is not None and not _counting() and not torch.is_grad_enabled():
            hooked = installed_hooks(self._net[0])
            if hooked:
                raise CompileHooksError(
                    f"{self.net_name} is compiled (model option compile: true) but hooks are installed on "
                    f"{len(hooked)} of its submodules ({', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''}), "
                    "a feature cache's: torch.compile would trace the cache's per-step Python state into guards and "
                    "recompile at every step. Run caches on the model with compile: false (a second model entry in "
                    "the suite), or drop the cache from this model's methods"
                )
            fn = self.compiled
        self.calls["compiled" if fn is self.compiled else "eager"] += 1
        out = fn(self._net[0], x, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)
        return out


def deploy_network(net: nn.Module, deploy: Deploy, *, cast_weights: bool = True, cast_input: bool = True) -> nn.Module:
    """Apply ``deploy`` to ``net`` in place (weights' dtype and layout, a :class:`DeployedForward`
    as its forward) and return it. ``cast_weights`` / ``cast_input`` False: the builder already
    loaded the weights in the dtype and the network casts its own input (a diffusers pipeline).
    Applying the same deployment twice is a no-op; a different one is an error."""
    done = getattr(net, "_bench_deploy", None)
    if done is not None:
        if done != deploy:
            raise DeployError(
                f"{type(net).__name__} is already deployed as {done.label()}; build the model again for {deploy.label()}"
            )
        return net
    if deploy.default:
        return net
    if cast_weights and deploy.dtype != "float32":
        net.to(deploy.torch_dtype)
    if deploy.channels_last:
        net.to(memory_format=torch.channels_last)
    net.forward = DeployedForward(net, deploy, cast_input)  # type: ignore[method-assign]
    net._bench_deploy = deploy  # type: ignore[assignment]
    return net


def deployment_of(net: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The row columns of how ``net`` ran: its deployment if :func:`deploy_network` set one, else
    eager in its parameters' dtype (a trained method's own student network, say), or ``dtype``
    (the bundle's) for a network without parameters (the analytic gmm, float64)."""
    done = getattr(net, "_bench_deploy", None)
    if done is not None:
        return done.row()
    p = next((p for p in net.parameters() if p.is_floating_point()), None)
    dt = p.dtype if p is not None else dtype
    return {**Deploy().row(), "dtype": str(dt).removeprefix("torch.")}


__all__ = [
    "COMPILE_BACKENDS",
    "DEPLOY_KEYS",
    "DTYPES",
    "RUNTIME_KEYS",
    "CompileHooksError",
    "Deploy",
    "DeployError",
    "DeployOptions",
    "DeployedForward",
    "ModelOptions",
    "deploy_network",
    "deployment_of",
]
