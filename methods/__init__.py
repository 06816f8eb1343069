"""Acceleration methods, one file per method, grouped by family; importing registers them."""

from methods import caching, consistency, distillation, learned_solvers, released, solvers  # noqa: F401
