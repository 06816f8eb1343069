import math

import pytest
import torch

from bench.denoiser import FlowSchedule, VPSchedule
from bench.models.gmm import GaussianMixture


@pytest.mark.parametrize("dim", [2, 64])
@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.9, 0.3), (0.3, 0.95), (0.0, 1.0), (0.5, 0.5)])
def test_score_is_gradient_of_log_density(dim, alpha, sigma):
    mix = GaussianMixture.preset(dim)
    x = torch.randn(16, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    x.requires_grad_(True)
    a, s = torch.full((16,), alpha), torch.full((16,), sigma)
    (grad,) = torch.autograd.grad(mix.log_prob(x, a, s).sum(), x)
    _, _, score = mix.posterior(x.detach(), a, s)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)


def test_posterior_means_reconstruct_x_and_tweedie():
    mix = GaussianMixture.preset(64)
    x = torch.randn(32, 64, dtype=torch.float64)
    a, s = torch.full((32,), 0.6), torch.full((32,), 0.8)
    x0, eps, score = mix.posterior(x, a, s)
    torch.testing.assert_close(0.6 * x0 + 0.8 * eps, x)  # x = alpha E[x0|x] + sigma E[eps|x]
    torch.testing.assert_close(eps, -0.8 * score)  # Tweedie: E[eps|x] = -sigma * score


def test_log_density_integrates_to_one_in_2d():
    mix = GaussianMixture.preset(2)
    g = torch.linspace(-5, 5, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    p = mix.log_prob(pts, torch.ones(len(pts)), torch.zeros(len(pts))).exp()
    assert abs(float(p.sum()) * (10 / 400) ** 2 - 1) < 1e-3


@pytest.mark.parametrize("schedule,t0", [(VPSchedule.linear(), 999.0), (FlowSchedule(), 1000.0)])
def test_exact_endpoint_is_converged_and_is_a_sample(schedule, t0):
    mix = GaussianMixture.preset(2)
    z = torch.randn(400, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = mix.ode_endpoint(z, schedule, t0, rtol=1e-8)
    b = mix.ode_endpoint(z, schedule, t0, rtol=1e-11)
    assert float((a - b).abs().max()) < 1e-5
    # the PF-ODE transports noise to data: endpoint moments match the mixture's
    ref = mix.sample(20000, torch.Generator().manual_seed(1))
    assert float((b.mean(0) - ref.mean(0)).abs().max()) < 0.25
    assert float((b.std(0) - ref.std(0)).abs().max()) < 0.25


def test_vp_and_flow_paths_share_one_ode():
    """The PF-ODE depends only on sigma/alpha: starting both at the same point gives one endpoint."""
    mix = GaussianMixture.preset(2)
    vp, fl = VPSchedule.linear(), FlowSchedule()
    t = 700.0
    a, s = (float(v) for v in vp.alpha_sigma(torch.tensor([t])))
    sf = (s / a) / (1 + s / a)  # flow time with the same sigma/alpha
    af = 1 - sf
    x_vp = torch.randn(8, 2, dtype=torch.float64)
    x_fl = x_vp / math.hypot(a, s) * math.hypot(af, sf)
    e1 = mix.ode_endpoint(x_vp, vp, t)
    e2 = mix.ode_endpoint(x_fl, fl, sf * 1000)
    torch.testing.assert_close(e1, e2, rtol=1e-7, atol=1e-7)
