"""Acceleration methods, one file per method, grouped by family; importing registers them."""

from methods import solvers  # noqa: F401
