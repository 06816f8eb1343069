"""Distillation: students trained to do in one or a few steps what the teacher does in many (one file per method)."""

from methods.distillation import kd  # noqa: F401
