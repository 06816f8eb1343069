"""Consistency models and flow maps: students that jump along the teacher's ODE in one or a few steps (one file per method)."""

from methods.consistency import cd, ct, ctm, ect, ict, instaflow, lcm, meanflow, reflow, shortcut  # noqa: F401
