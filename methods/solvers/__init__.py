"""Training-free ODE/SDE solvers."""

from methods.solvers import ddim, dpmpp_2m, euler  # noqa: F401
