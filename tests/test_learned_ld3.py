"""LD3 (Tong et al. 2024): the soft surrogate loss on a hand case (a solver that is the identity,
a teacher target outside the slack ball: the surrogate is the squared distance from the ball to the
target), the ball projection, the step parametrisation, the radius rule, and the trainer (loss
falling, the hard loss when the slack is 0, better than its base solver on held-out seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import methods.learned_solvers.ld3 as ld3
import methods.solvers  # noqa: F401  (registers the base and teacher solvers)
from bench.models import build_model
from bench.registry import METHODS
from bench.seeds import generators, noise
from methods.learned_solvers.gs import base_grid

TINY = {"pairs": 64, "teacher_steps": 10, "train_steps": 30, "train_samples": 40, "valid_samples": 20}


def test_project_ball():
    c = torch.zeros(3, 2, dtype=torch.float64)
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]], dtype=torch.float64)
    p = ld3.project_ball(x, c, 1.0)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, -1.0]], dtype=torch.float64))


def test_soft_surrogate_loss_on_a_hand_case():
    """Psi(x) = x, teacher target y = x_T + d u (|u| = 1), ball radius r < d. The hard loss is
    d^2 / D; the soft loss min_{|x' - x_T| <= r} |x' - y|^2 / D = (d - r)^2 / D, at x' = x_T + r u.
    LD3's alternating slack updates reach it, never leave the ball, and never raise a sample's loss."""
    D = 2
    x_T = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.6, 0.8], [0.0, -1.0]], dtype=torch.float64)
    d, r = torch.tensor([1.0, 3.0], dtype=torch.float64), 0.4
    y = x_T + d[:, None] * u

    def losses(x: torch.Tensor) -> torch.Tensor:
        return ld3.per_sample_error(x, y)

    x = x_T.clone()
    loss = losses(x)
    torch.testing.assert_close(loss, d**2 / D)  # the hard loss at x' = x_T
    history = [loss]
    for _ in range(50):
        xg = x.clone().requires_grad_(True)
        losses(xg).mean().backward()
        x, loss = ld3.slack_update(x, xg.grad, x_T, r, 0.5, loss, losses)
        assert torch.all((x - x_T).norm(dim=1) <= r + 1e-12)
        assert torch.all(loss <= history[-1])
        history.append(loss)
    torch.testing.assert_close(loss, (d - r) ** 2 / D, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x, x_T + r * u, rtol=1e-6, atol=1e-9)
    # a move that would raise a loss is refused: from the optimum, a step back towards x_T stays put
    back, kept = ld3.slack_update(x, u, x_T, r, 0.2, loss, losses)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(kept, loss)


def test_radius_rule_is_ld3s_prior_bound():
    assert ld3.slack_radius(1e-3, 3 * 32 * 32, 4) == pytest.approx(0.001 * 3072 / 16)
    assert ld3.slack_radius(0.0, 64, 5) == 0.0


def test_step_logits_start_at_the_base_grid_and_keep_it_ordered():
    b = build_model("gmm", dim=2, prediction="eps")
    for schedule in ("uniform", "karras", "ays"):
        t = base_grid(b, 5, schedule, 7.0)
        s = ld3.LD3Solver(t)
        got = s.times().detach().numpy()
        assert got[0] == t[0] and got[-1] == t[-1]
        np.testing.assert_allclose(got, t, rtol=0, atol=1e-9)
        assert s.learned() == 5
    with torch.no_grad():
        s.xi.copy_(torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3)
    assert np.all(np.diff(s.times().detach().numpy()) < 0)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_trainer_loss_falls_and_beats_the_base_solver_on_held_out_seeds(home, prediction):
    b = build_model("gmm", dim=2, prediction=prediction)
    prepared = METHODS.get("ld3")(**TINY).prepare(b, 4)
    cost = prepared.artifacts[-1].record["cost"]
    assert cost["valid_loss_final"] < 0.8 * cost["valid_loss_init"], cost
    assert cost["final_loss"] < cost["first_loss"]
    assert 0 < cost["slack_moved_mean"] <= cost["slack_radius"] + 1e-12
    assert prepared.info["learned_params"] == 4
    gens = generators(0, range(256))
    x = noise(gens, (2,), torch.float64)
    exact = b.extra["mixture"].ode_endpoint(x, b.denoiser.schedule, 999.0)
    learned = float((prepared(x.clone(), None, 1.0, gens) - exact).square().mean())
    base = float((METHODS.get("dpmpp_2m")().prepare(b, 4)(x.clone(), None, 1.0, gens) - exact).square().mean())
    assert learned < 0.8 * base, (learned, base)


def test_zero_slack_is_the_hard_loss(home):
    """slack = 0: the ball is a point, the slack points never move (the plain regression loss)."""
    b = build_model("gmm", dim=2, prediction="eps")
    prepared = METHODS.get("ld3")(**{**TINY, "train_steps": 8, "slack": 0.0}).prepare(b, 3)
    cost = prepared.artifacts[-1].record["cost"]
    assert cost["slack_radius"] == 0.0 and cost["slack_moved_mean"] == 0.0


def test_one_step_is_refused(home):
    b = build_model("gmm", dim=2, prediction="eps")
    with pytest.raises(Exception, match="at least 2 steps"):
        METHODS.get("ld3")(**TINY).prepare(b, 1)
