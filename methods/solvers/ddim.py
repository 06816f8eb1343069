"""DDIM (Song et al. 2021): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

eta = 0 is the deterministic sampler (Euler on the eps-ODE in x/alpha, sigma/alpha);
eta = 1 gives the DDPM posterior variance. Written here rather than wrapping diffusers'
DDIMScheduler because that one steps to ``t - T // n``, which is not the next timestep when n
does not divide T (15, 6, 8 ... steps), so it would not solve the ODE it claims to.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.adapter import Knob, MethodAdapter, Sampler, register_method
from bench.denoiser import Denoiser
from bench.models import ModelBundle


def trailing_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """Integer timesteps T-1, ..., spaced T/steps apart (the 'trailing' spacing of Lin et al. 2024)."""
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: np.ndarray,
    cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """DDIM over the given descending native timesteps, ending at sigma = 0."""
    for i, t in enumerate(timesteps):
        a_t, s_t = denoiser.alpha_sigma(float(t), x)
        x0, eps = denoiser.x0_eps(x, float(t), denoiser(x, float(t), cond, guidance))
        if i + 1 == len(timesteps):
            return x0
        a_s, s_s = denoiser.alpha_sigma(float(timesteps[i + 1]), x)
        c = eta * ((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2)).clamp(min=0).sqrt()
        x = a_s * x0 + (s_s**2 - c**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            assert generators is not None, "stochastic DDIM needs per-sample generators"
            z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generators])
            x = x + c * z
    return x


@register_method
class DDIM(MethodAdapter):
    name = "ddim"
    family = "solver"
    training = "free"
    paper = "Song et al. 2021, Denoising Diffusion Implicit Models, arXiv 2010.02502"
    applies_to = ("eps", "v", "x0")
    description = "DDIM; eta = 0 deterministic (Euler on the eps-ODE), eta = 1 DDPM-like ancestral"
    knobs = (Knob("eta", float, 0.0, "stochasticity: 0 deterministic, 1 DDPM posterior variance", low=0.0, high=1.0),)

    def prepare(self, bundle: ModelBundle, steps: int) -> Sampler:
        self.check(bundle)
        ts = trailing_timesteps(bundle.denoiser.schedule.num_train_timesteps, steps)

        def sampler(noise, cond, guidance, generators):
            return sample_ddim(bundle.denoiser, noise, ts, cond, guidance, self.config["eta"], generators)

        return sampler
