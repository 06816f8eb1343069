"""Distillation: students trained to do in one or a few steps what the teacher does in many (one file per method)."""

from methods.distillation import causvid, dmd, dmd2, guidance, kd, ladd, progressive, sid  # noqa: F401
