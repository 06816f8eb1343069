"""Acceleration methods, one file per method, grouped by family; importing registers them."""

from methods import caching, consistency, distillation, solvers  # noqa: F401
