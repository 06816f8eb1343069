"""Training-free ODE/SDE solvers (one file per method; ``core.py`` and ``base.py`` are shared)."""

from methods.solvers import (  # noqa: F401
    ddim,
    ddpm,
    deis,
    dpm_solver,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_3m,
    euler,
    euler_ancestral,
    heun,
    ipndm,
    lms,
    pndm,
    unipc,
)
