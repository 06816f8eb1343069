"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep data-prediction exponential integrator."""

from diffusers import DPMSolverMultistepScheduler

from bench.adapter import Knob, register_method
from methods.solvers.scheduler_loop import SchedulerSolver


@register_method
class DPMSolverPP2M(SchedulerSolver):
    name = "dpmpp_2m"
    paper = "Lu et al. 2022, DPM-Solver++: Fast Solver for Guided Sampling, arXiv 2211.01095"
    applies_to = ("eps", "v", "x0", "flow")
    description = "DPM-Solver++ multistep, order 2, midpoint form; flow models use flow sigmas"
    knobs = (Knob("lower_order_final", bool, True, "first-order last steps (stabilises < 15 steps)"),)
    vp_scheduler_cls = DPMSolverMultistepScheduler
    flow_scheduler_cls = DPMSolverMultistepScheduler

    def scheduler_kwargs(self, bundle):
        kw = {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "lower_order_final": self.config["lower_order_final"],
            "final_sigmas_type": "zero",
        }
        if bundle.kind == "flow":
            kw |= {"use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction"}
        return kw
