"""Euler (Karras et al. 2022, Algorithm 1 without churn) on the VP eps-ODE or on flow velocity."""

from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from bench.adapter import register_method
from methods.solvers.scheduler_loop import SchedulerSolver


@register_method
class Euler(SchedulerSolver):
    name = "euler"
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, arXiv 2206.00364"
    applies_to = ("eps", "v", "x0", "flow")
    description = "first-order Euler step in sigma (VE form) for VP models, in t for flow models"
    vp_scheduler_cls = EulerDiscreteScheduler
    flow_scheduler_cls = FlowMatchEulerDiscreteScheduler
