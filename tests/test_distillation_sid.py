"""Score identity Distillation: its generator loss against a hand computation on Gaussians (where the
real and fake denoisers are closed form), its gradient, the fixed point it drives a Gaussian
generator to, and a real build on the analytic mixture and on a digits teacher (NFE, guidance)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_suite
from torch import nn

import methods.distillation.sid  # noqa: F401  (registers sid)
from bench.denoiser import Denoiser, VPSchedule
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from bench.suite import Job, ModelSpec
from bench.worker import run_job
from methods.distillation.sid import init_time, real_fake_x0, sid_generator_loss, sid_times

GMM = ModelSpec("gmm", {"dim": 2, "prediction": "eps"})
TINY = {"train_steps": 3, "batch_size": 16, "lr": 1e-3, "fake_lr": 1e-3}


def gauss_x0(x_t, a, s, mu, sd):
    """E[x0 | x_t] for x0 ~ N(mu, sd^2), x_t = a x0 + s eps (per dimension)."""
    return mu + a * sd**2 * (x_t - a * mu) / (a**2 * sd**2 + s**2)


class GaussEps(nn.Module):
    """The exact eps-prediction network of x0 ~ N(mu, diag(sd^2)) on a VP schedule."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor, schedule: VPSchedule) -> None:
        super().__init__()
        self.mu, self.sd, self.schedule = mu, sd, schedule

    def forward(self, x, t, cond=None):
        a, s = (v.reshape(-1, 1) for v in self.schedule.alpha_sigma(t))
        x0 = gauss_x0(x, a, s, self.mu, self.sd)
        return (x - a * x0) / s


def test_sid_loss_equals_a_hand_computation_on_a_gaussian():
    """One 1-D sample: data N(1, 0.5^2), generator N(0, 1), alpha_t = 0.8, sigma_t = 0.6, x_g = 0.5,
    eps = -1: x_t = 0.4 - 0.6 = -0.2;
    f_real = 1 + 0.8 * 0.25 * (-0.2 - 0.8) / (0.64 * 0.25 + 0.36) = 1 - 0.2 / 0.52 = 0.6153846;
    f_fake = 0 + 0.8 * 1 * (-0.2 - 0) / (0.64 + 0.36) = -0.16;
    weight = 1 / |x_g - f_real| = 1 / 0.1153846 = 8.6666667;
    loss = (f_real - f_fake) * ((f_real - x_g) - 1.2 (f_real - f_fake)) * weight
         = 0.7753846 * (0.1153846 - 0.9304615) * 8.6666667 = -0.6319981 * 8.6666667 = -5.477317."""
    x_g, x_t = torch.tensor([[0.5]]), torch.tensor([[-0.2]])
    real = gauss_x0(x_t, 0.8, 0.6, 1.0, 0.5)
    fake = gauss_x0(x_t, 0.8, 0.6, 0.0, 1.0)
    assert float(real) == pytest.approx(0.6153846, abs=1e-6) and float(fake) == pytest.approx(-0.16)
    assert float(sid_generator_loss(x_g, real, fake, 1.2)) == pytest.approx(-5.477317, abs=1e-5)
    # alpha = 1: only the cross term (f_real - f_fake) . (f_fake - x_g) = 0.7753846 * (-0.66) * 8.6666667
    assert float(sid_generator_loss(x_g, real, fake, 1.0)) == pytest.approx(0.7753846 * -0.66 * 8.6666667, abs=1e-5)


def test_sid_loss_sums_over_dimensions_normalises_per_sample_and_averages_the_batch():
    """Two 2-D samples, real and fake denoisers closed form on a VP schedule (eps networks read as x0
    by the Denoiser): the loss equals (1 - alpha)||r - f||^2 + (r - f).(f - x_g) per sample over
    mean_d |x_g - r|, averaged; real_fake_x0 noises nothing itself and reads both networks at x_t."""
    sch = VPSchedule.linear()
    mu_r, sd_r = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    mu_g, sd_g = torch.tensor([0.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    teacher = Denoiser(GaussEps(mu_r, sd_r, sch), "eps", sch)
    fake = Denoiser(GaussEps(mu_g, sd_g, sch), "eps", sch)
    x_g = torch.tensor([[0.3, -1.0], [2.0, 0.7]], dtype=torch.float64)
    eps = torch.tensor([[0.5, -0.2], [-1.5, 1.0]], dtype=torch.float64)
    t = torch.tensor([100.0, 400.0], dtype=torch.float64)
    a, s = (v.reshape(-1, 1) for v in sch.alpha_sigma(t))
    x_t = a * x_g + s * eps
    r, f = real_fake_x0(teacher, fake, x_t, t, None, 1.0)
    want_r, want_f = gauss_x0(x_t, a, s, mu_r, sd_r), gauss_x0(x_t, a, s, mu_g, sd_g)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(f, want_f)
    alpha = 1.2
    per = ((1 - alpha) * (want_r - want_f).pow(2).sum(1) + ((want_r - want_f) * (want_f - x_g)).sum(1)) / (
        x_g - want_r
    ).abs().mean(1)
    assert float(sid_generator_loss(x_g, r, f, alpha)) == pytest.approx(float(per.mean()), rel=1e-12)


def test_sid_gradient_in_x_g_is_the_analytic_one():
    """d/dx_g of (r - f)((r - x_g) - alpha (r - f)) * w with x_t = a x_g + s eps, r = m_r + k_r x_t,
    f = m_f + k_f x_t, w held fixed: (a k_r - a k_f)((r - x_g) - alpha (r - f)) + (r - f)((a k_r - 1) - alpha (a k_r - a k_f))."""
    a, s, alpha, eps = 0.8, 0.6, 1.2, -1.0
    x_g = torch.tensor([[0.5]], requires_grad=True)
    x_t = a * x_g + s * eps
    r, f = gauss_x0(x_t, a, s, 1.0, 0.5), gauss_x0(x_t, a, s, 0.0, 1.0)
    sid_generator_loss(x_g, r, f, alpha).backward()
    k_r, k_f = a * 0.25 / (a**2 * 0.25 + s**2), a * 1.0 / (a**2 + s**2)
    rv, fv, xv = float(r.detach()), float(f.detach()), 0.5
    w = 1 / abs(xv - rv)
    want = w * ((a * k_r - a * k_f) * ((rv - xv) - alpha * (rv - fv)) + (rv - fv) * ((a * k_r - 1) - alpha * (a * k_r - a * k_f)))
    assert float(x_g.grad) == pytest.approx(want, rel=1e-5)


def flipped(x_g, real, fake, alpha):
    """A wrong loss for the negative control: (1 - alpha)||r - f||^2 - (r - f).(f - x_g), same weighting."""
    w = (x_g - real).abs().mean(1, keepdim=True).detach()
    d = real - fake
    return (((1 - alpha) * d * d - d * (fake - x_g)) / w).sum(1).mean()


@pytest.mark.parametrize("alpha, loss_fn, converges", [(1.0, sid_generator_loss, True), (1.2, sid_generator_loss, True),
                                                       (1.2, flipped, False)])  # fmt: skip
def test_sid_drives_a_gaussian_generator_to_the_data_gaussian(alpha, loss_fn, converges):
    """Generator x_g = mu + exp(log_sd) z in 64 dimensions, fake score exact for the generator's current
    Gaussian (what a perfectly trained fake network would be), real score exact for N(1.5, 0.4^2) per
    dimension: Adam on the SiD loss moves (mu, sd) from (-1, 1.5) to the data's within 250 steps. The
    same loop with the cross term's sign flipped does not (the test can fail)."""
    sch = VPSchedule.linear()
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    log_sd = torch.tensor(math.log(1.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sd], lr=0.02)
    n, d = 64, 64
    for _ in range(250):
        x_g = mu + log_sd.exp() * torch.randn(n, d, generator=g, dtype=torch.float64)
        t = sid_times(sch, n, g, 800.0)
        a, s = (v.reshape(-1, 1) for v in sch.alpha_sigma(t))
        x_t = a * x_g + s * torch.randn(n, d, generator=g, dtype=torch.float64)
        real = gauss_x0(x_t, a, s, 1.5, 0.4)
        fake = gauss_x0(x_t, a, s, mu.detach(), log_sd.detach().exp())
        opt.zero_grad()
        loss_fn(x_g, real, fake, alpha).backward()
        opt.step()
    got = (float(mu.detach()), float(log_sd.detach().exp()))
    ok = got[0] == pytest.approx(1.5, abs=0.02) and got[1] == pytest.approx(0.4, abs=0.02)
    assert ok == converges, got


def test_sid_noise_levels_follow_edm_rho_spacing_up_to_tmax():
    """sigma_bar of the drawn times: within [0.002 (clamped to the teacher's least), sigma(tmax)], and
    uniform in sigma^(1/7) (EDM's rho = 7), whose largest at tmax = 800 is 24.4."""
    from bench import schedules as S

    sch = VPSchedule.linear()
    t = sid_times(sch, 20000, torch.Generator().manual_seed(0), 800.0)
    sb = torch.as_tensor(S.sigma_bar(sch, t.numpy()))
    top = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(sb.max()) <= top * (1 + 1e-9) and float(sb.max()) > 0.98 * top and top == pytest.approx(24.4, abs=0.1)
    assert float(sb.min()) >= float(S.sigma_bar(sch, 0.0)) - 1e-12
    r = sb.pow(1 / 7)  # uniform in [0.002^(1/7), 24.4^(1/7)]; the clamp moves only the lowest levels
    assert float(r.median()) == pytest.approx((0.002 ** (1 / 7) + top ** (1 / 7)) / 2, abs=0.01)


def test_sid_generator_starts_at_sigma_init_and_is_the_teacher_there(home):
    """A generator trained 0 effective steps (lr tiny) is the teacher's one-step denoiser of pure noise at
    sigma_bar 2.5 (SiD's G(sigma_init z)): same samples as the teacher's x0 prediction there."""
    b = build_model("digits-dit")
    knobs = {"train_steps": 1, "batch_size": 2, "lr": 1e-8, "fake_lr": 1e-8, "ema": 0.0}
    prepared = METHODS.get("sid")(**knobs).prepare(b, 1, guidance=1.0)
    gens = generators(0, range(4))
    z = noise(gens, b.sample_shape)
    cond = torch.tensor([0, 1, 2, 3])
    x = prepared(z, cond, 1.0, gens)
    t0 = init_time(b, 2.5)
    assert t0 == pytest.approx(1000 * 2.5 / 3.5)
    xt = b.denoiser.alpha_sigma(t0, z)[1] * z
    want = b.denoiser.x0_eps(xt, t0, b.denoiser(xt, t0, cond))[0]
    torch.testing.assert_close(x, want, atol=1e-4, rtol=0)


def test_sid_trains_on_the_mixture_its_fake_score_learns_and_the_job_counts_one_nfe(home):
    """A short real build on gmm: both losses recorded; the fake score's denoising loss on the
    generator's samples falls; the job's NFE is 1 (the generator's one forward)."""
    b = build_model("gmm", dim=2, prediction="eps")
    knobs = {"train_steps": 60, "batch_size": 64, "lr": 3e-4, "fake_lr": 1e-3}
    k = tuple(sorted(METHODS.get("sid").resolve_knobs(knobs).items()))
    row, _ = run_job(Job(GMM, "sid", k, 1, 1.0, 0, 64, 64), b, tiny_suite(["swd"]))
    assert row["status"] == "ok" and row["nfe"] == 1.0 and row["train_steps"] == 60
    rec = json.loads((home / "artifacts" / row["artifact_id"] / "artifact.json").read_text())
    cost = rec["cost"]
    assert cost["fake_final_loss"] < 0.7 * cost["fake_first_loss"], cost
    assert abs(cost["final_loss"]) < abs(cost["first_loss"]) / 3  # the real and fake scores come together
    assert cost["teacher_rows"] == 60 * 64  # one real-score row per generator sample (no guidance)


def test_sid_on_a_guided_digits_teacher_runs_one_row_per_sample(home):
    """At guidance 2 the real score costs cond + uncond rows in training; the student runs once per
    sample with the guidance embedded (NFE 1, half the FLOPs of one guided teacher evaluation)."""
    from bench.accounting import flops_of

    b = build_model("digits-unet")
    k = tuple(sorted(METHODS.get("sid").resolve_knobs({**TINY, "train_steps": 1, "batch_size": 2}).items()))
    row, _ = run_job(Job(ModelSpec("digits-unet"), "sid", k, 1, 2.0, 0, 4, 4), b, tiny_suite())
    assert row["nfe"] == 1.0 and row["network_calls"] == 1
    assert row["train_teacher_nfe"] == 1 * 2 * 2  # one step, batch 2, two rows each
    x, c = torch.zeros(1, 1, 16, 16), torch.tensor([3])
    assert 2 * row["flops"] == flops_of(lambda: b.denoiser(x, torch.full((1,), 700.0), c, 2.0))
