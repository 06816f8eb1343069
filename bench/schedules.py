"""Timestep schedules: where a solver evaluates the model, as descending native times.

A schedule for ``n`` steps is ``n + 1`` native times: ``n`` noise levels the model is evaluated
at, then the data end (sigma = 0: t = -1 on a VP model, t = 0 on a flow model). Every schedule
starts at the model's noisiest level, so all solvers on a model share one exact ODE target.

Noise levels are compared in the parametrisation-free form sigma_bar = sigma / alpha (EDM's
sigma, exp(-logSNR / 2)); on a VP model ``t`` is the DDPM index (sigma_bar interpolated linearly
between integers, as :class:`bench.denoiser.VPSchedule` does), on a flow model ``t = 1000 s``.

- ``uniform``: uniform in native time. On VP this is the 'trailing' spacing (integer timesteps
  T-1, T-1-T/n, ...; Lin et al. 2024), the same grid diffusers' schedulers use with
  ``timestep_spacing="trailing"``; on flow it is ``s = s_max (1 - i/n)``.
- ``karras``: EDM's rho-schedule between sigma_max and sigma_min (Karras et al. 2022, Eq. 5).
- ``logsnr``: uniform in lambda = log(alpha / sigma) (Lu et al. 2022, DPM-Solver's default).
- ``ays``: Align Your Steps (Sabour et al. 2024, arXiv 2404.14507), the published 10-step tables
  as diffusers ships them (``diffusers.schedulers.AysSchedules``), log-linearly interpolated to
  ``n`` levels as the paper prescribes. VP models use the Stable Diffusion 1.5 *timestep* table
  (a 1000-step discrete DDPM, like ours); flow models use the Stable Video Diffusion *sigma* table
  (EDM's continuous sigma, which is a flow model's sigma_bar = s / (1 - s)).
- ``gits``: GITS (Chen et al. 2024, arXiv 2405.11326): a dynamic program over the points of a
  fine calibration trajectory; :func:`gits_select` is the DP, the calibration lives with the
  solvers (``methods/solvers/base.py``) because it runs the model.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.denoiser import FlowSchedule, Schedule, VPSchedule

SCHEDULES: tuple[str, ...] = ("uniform", "karras", "logsnr", "ays", "gits")


class ScheduleError(ValueError):
    """A schedule that cannot be built as asked."""


# ---------------------------------------------------------------------------------------------
# noise levels of a model's native time


def _vp_table(schedule: VPSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(t, sigma_bar) at the integer knots t = -1 .. T-1 (t = -1 is clean data)."""
    ab = schedule.alphas_cumprod
    return np.arange(-1, len(ab), dtype=np.float64), np.concatenate([[0.0], np.sqrt((1 - ab) / ab)])


def alpha_sigma(schedule: Schedule, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) in float64, exactly as the denoiser computes them."""
    a, s = schedule.alpha_sigma(torch.as_tensor(np.asarray(t, dtype=np.float64)))
    return a.numpy(), s.numpy()


def sigma_bar(schedule: Schedule, t: np.ndarray | float) -> np.ndarray:
    """sigma / alpha at native time t (inf where alpha = 0: a flow model at s = 1)."""
    t = np.asarray(t, dtype=np.float64)
    if isinstance(schedule, VPSchedule):
        return np.interp(t, *_vp_table(schedule))
    s = t / schedule.num_train_timesteps
    with np.errstate(divide="ignore"):
        return np.where(s >= 1, np.inf, s / np.maximum(1 - s, 1e-300))


def time_of_sigma_bar(schedule: Schedule, sb: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`sigma_bar` (native time of a noise level)."""
    sb = np.asarray(sb, dtype=np.float64)
    if isinstance(schedule, VPSchedule):
        t, table = _vp_table(schedule)
        if np.any(sb > table[-1] * (1 + 1e-12)):
            raise ScheduleError(f"sigma_bar {float(sb.max()):.4g} is beyond this VP model's largest {table[-1]:.4g}")
        return np.interp(sb, table, t)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(sb), 1.0, sb / (1 + sb)) * schedule.num_train_timesteps


def time_of_lambda(schedule: Schedule, lam: np.ndarray | float) -> np.ndarray:
    """Native time where log(alpha / sigma) = lam."""
    return time_of_sigma_bar(schedule, np.exp(-np.asarray(lam, dtype=np.float64)))


def t_data(schedule: Schedule) -> float:
    """Native time of clean data (sigma = 0)."""
    return -1.0 if isinstance(schedule, VPSchedule) else 0.0


def t_max(schedule: Schedule, pure_noise: bool = True) -> float:
    """The noisiest native time: T-1 on VP; on flow s = 1 (pure noise, alpha = 0) when the solver
    can start there, else s = 1 - 1/T (where diffusers' flow sigmas start: lambda is finite)."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        return float(T - 1)
    return float(T) if pure_noise else float(T - 1)


def t_min(schedule: Schedule) -> float:
    """The least-noisy training time, whose sigma_bar is the default sigma_min (VP t = 0, flow s = 1/T)."""
    return 0.0 if isinstance(schedule, VPSchedule) else 1.0


def sigma_range(schedule: Schedule, pure_noise: bool = False) -> tuple[float, float]:
    """Default (sigma_min, sigma_max) in sigma_bar units."""
    return float(sigma_bar(schedule, t_min(schedule))), float(sigma_bar(schedule, t_max(schedule, pure_noise)))


def _finish(schedule: Schedule, levels_t: np.ndarray, n: int, name: str) -> np.ndarray:
    """Append the data end and check the result is a strictly descending n-step schedule."""
    t = np.concatenate([np.asarray(levels_t, dtype=np.float64), [t_data(schedule)]])
    if len(t) != n + 1 or not np.all(np.diff(t) < 0):
        raise ScheduleError(
            f"schedule {name!r} with {n} steps does not give {n} distinct descending noise levels on this model "
            f"(got {np.round(t, 3).tolist()[:12]}...); use fewer steps or another schedule"
        )
    return t


# ---------------------------------------------------------------------------------------------
# the schedules


def uniform(schedule: Schedule, n: int, pure_noise: bool = True) -> np.ndarray:
    """Uniform in native time: VP 'trailing' integer timesteps; flow s from s_max to 0."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, VPSchedule):
        if n > T:
            raise ScheduleError(f"uniform (trailing) spacing gives at most {T} integer steps on this VP model, asked {n}")
        levels = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        return _finish(schedule, levels, n, "uniform")
    return np.linspace(t_max(schedule, pure_noise), 0.0, n + 1)


def karras(
    schedule: Schedule, n: int, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None
) -> np.ndarray:
    """EDM's schedule sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0.

    With ``sigma_min = 0`` the ramp runs over n + 1 points and ends at 0 itself: a grid family that
    refines all the way to the data (used to measure convergence orders).
    """
    smin_d, smax_d = sigma_range(schedule)
    smin = smin_d if sigma_min is None else float(sigma_min)
    smax = smax_d if sigma_max is None else float(sigma_max)
    if smin == 0.0:
        ramp = np.linspace(0, 1, n + 1)[:-1]
    else:
        ramp = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    levels = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return _finish(schedule, time_of_sigma_bar(schedule, levels), n, "karras")


def logsnr(schedule: Schedule, n: int, sigma_min: float | None = None, sigma_max: float | None = None) -> np.ndarray:
    """Uniform in lambda = -log(sigma_bar) from sigma_max to sigma_min (n levels), then 0."""
    smin_d, smax_d = sigma_range(schedule)
    smin = smin_d if sigma_min is None else float(sigma_min)
    smax = smax_d if sigma_max is None else float(sigma_max)
    if not 0 < smin < smax:
        raise ScheduleError(f"logsnr needs 0 < sigma_min < sigma_max, got {smin}, {smax}")
    lam = np.linspace(-np.log(smax), -np.log(smin), n) if n > 1 else np.array([-np.log(smax)])
    return _finish(schedule, time_of_lambda(schedule, lam), n, "logsnr")


def loglinear_interp(levels: np.ndarray, n: int) -> np.ndarray:
    """Resample a descending table of noise levels to ``n`` levels, linearly in log level over
    the normalised index (the interpolation the AYS paper gives for other step counts)."""
    levels = np.asarray(levels, dtype=np.float64)
    if n == len(levels):
        return levels.copy()
    x = np.linspace(0, 1, len(levels))
    return np.exp(np.interp(np.linspace(0, 1, n), x, np.log(levels)))


def ays_table(schedule: Schedule) -> tuple[str, np.ndarray]:
    """The published AYS table for this parametrisation, as sigma_bar levels (the final 0 dropped)."""
    from diffusers.schedulers import AysSchedules

    if isinstance(schedule, VPSchedule):
        name = "StableDiffusionTimesteps"
        return name, sigma_bar(schedule, np.asarray(AysSchedules[name], dtype=np.float64))
    name = "StableDiffusionVideoSigmas"
    table = np.asarray(AysSchedules[name], dtype=np.float64)
    return name, table[table > 0]


def ays(schedule: Schedule, n: int) -> np.ndarray:
    """Align Your Steps: the published 10-level table, log-linearly interpolated to n levels, then 0."""
    _, levels = ays_table(schedule)
    return _finish(schedule, time_of_sigma_bar(schedule, loglinear_interp(levels, n)), n, "ays")


def gits_select(cost: np.ndarray, n: int, coeff: float = 1.15) -> list[int]:
    """GITS dynamic program: the n-step path 0 -> M through fine-grid points minimising the cost.

    ``cost[i, j]`` is the error of one coarse step from fine point i to fine point j (j > i) along
    the calibration trajectory; M = ``len(cost) - 1`` is the data end. The value of a path is
    ``cost[i0, i1] + coeff * (cost[i1, i2] + coeff * (...))``: ``coeff`` > 1 weighs the early steps'
    errors, which the remaining steps carry to the end, more (GITS's coefficient, 1.15 by default).
    """
    M = len(cost) - 1
    if not 1 <= n <= M:
        raise ScheduleError(f"gits needs 1 <= steps <= {M} (the calibration grid), got {n}")
    V = np.full((M + 1, n + 1), np.inf)  # V[i, k]: best value of reaching M from i in exactly k steps
    nxt = np.full((M + 1, n + 1), -1, dtype=np.int64)
    V[:M, 1] = cost[:M, M]
    nxt[:M, 1] = M
    for k in range(2, n + 1):
        for i in range(M - k + 1):
            cand = cost[i, i + 1 : M] + coeff * V[i + 1 : M, k - 1]
            j = int(np.argmin(cand))
            V[i, k], nxt[i, k] = cand[j], i + 1 + j
    path, i = [0], 0
    for k in range(n, 0, -1):
        i = int(nxt[i, k])
        path.append(i)
    return path


def timesteps(name: str, schedule: Schedule, n: int, *, pure_noise: bool = True, rho: float = 7.0) -> np.ndarray:
    """An n-step schedule by name (``gits`` needs a calibration run: see methods/solvers/base.py)."""
    if n < 1:
        raise ScheduleError(f"a schedule needs at least 1 step, got {n}")
    if name == "uniform":
        return uniform(schedule, n, pure_noise)
    if name == "karras":
        return karras(schedule, n, rho)
    if name == "logsnr":
        return logsnr(schedule, n)
    if name == "ays":
        return ays(schedule, n)
    if name == "gits":
        raise ScheduleError("the gits schedule is calibrated on the model; build it through a solver adapter")
    raise ScheduleError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")


__all__ = [
    "SCHEDULES",
    "ScheduleError",
    "FlowSchedule",
    "alpha_sigma",
    "ays",
    "ays_table",
    "gits_select",
    "karras",
    "loglinear_interp",
    "logsnr",
    "sigma_bar",
    "sigma_range",
    "t_data",
    "t_max",
    "t_min",
    "time_of_lambda",
    "time_of_sigma_bar",
    "timesteps",
    "uniform",
]
