"""Learned solvers: the teacher network frozen, O(1) solver parameters (timesteps, coefficients, a tiny
direction predictor) trained against its own trajectories (one file per method)."""

from methods.learned_solvers import amed, autodiffusion, boss, dpm_solver_v3, gs, ld3  # noqa: F401
