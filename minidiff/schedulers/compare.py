"""Samplers side by side, for the notebooks: which timesteps each one visits, and how noisy x is there.

    from minidiff.schedulers import DDIMScheduler, DPMSolverMultistepScheduler
    table = schedule_table(pipe.scheduler.config, [DDIMScheduler, DPMSolverMultistepScheduler], 25)
    fig = minidiff.viz.plot_sampling_schedules(pipe.scheduler.config, [DDIMScheduler, DPMSolverMultistepScheduler], 25)

Every scheduler is built from the same config with `from_config`, as the tutorials swap samplers. At each
step i the table gives the timestep t_i the model is told and the noise level of x there, three ways:

| here        | meaning                                              | relation            |
|-------------|------------------------------------------------------|---------------------|
| `alpha_bar` | ᾱ: x = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε                   | ᾱ = 1 / (1 + σ²)    |
| `sigma`     | σ, the EDM noise level: x / sqrt(ᾱ) = x_0 + σ ε      | σ² = (1 - ᾱ) / ᾱ    |
| `log_snr`   | log(ᾱ / (1 - ᾱ)), the log signal-to-noise ratio (2λ) | log_snr = -2 log σ  |

Schedulers that keep their own noise levels (`sigmas`, one per step plus the final one: Euler, DPM-Solver,
UniPC) are read from those, since with Karras sigmas they are not ᾱ at the rounded timestep; the others
from ᾱ_t = `alphas_cumprod[t]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Schedule:
    """One sampler's schedule: lists with one entry per inference step."""

    name: str
    timesteps: list          # t_i as the scheduler gives them (ints, or floats for Euler-type schedulers)
    sigma: list[float]       # σ_i
    alpha_bar: list[float]   # ᾱ_i

    @property
    def log_snr(self) -> list[float]:
        return [-2.0 * math.log(s) if s > 0 else math.inf for s in self.sigma]

    def rows(self) -> list[dict]:
        """[{"step": i, "timestep": t_i, "sigma": σ_i, "alpha_bar": ᾱ_i, "log_snr": ...}, ...] for printing."""
        return [{"step": i, "timestep": t, "sigma": s, "alpha_bar": a, "log_snr": l}
                for i, (t, s, a, l) in enumerate(zip(self.timesteps, self.sigma, self.alpha_bar, self.log_snr))]


def _schedule_of(scheduler, name: str) -> Schedule:
    timesteps = scheduler.timesteps
    n = len(timesteps)
    own_sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(own_sigmas, torch.Tensor) and len(own_sigmas) == n + 1:
        sigma = own_sigmas[:n].double()                                       # (n,)
    else:
        alpha_bar_t = scheduler.alphas_cumprod.double()[timesteps.long().cpu()]  # (n,)
        sigma = ((1 - alpha_bar_t) / alpha_bar_t).sqrt()
    alpha_bar = 1 / (1 + sigma**2)
    return Schedule(name=name, timesteps=timesteps.tolist(), sigma=sigma.tolist(), alpha_bar=alpha_bar.tolist())


def schedule_table(config, schedulers, num_inference_steps: int) -> list[Schedule]:
    """One `Schedule` per scheduler class in `schedulers`, each built with `cls.from_config(config)` and
    `set_timesteps(num_inference_steps)`. `config`: a scheduler_config.json dict or a scheduler's `.config`."""
    if isinstance(schedulers, type) or not schedulers:
        raise TypeError("schedule_table expects a non-empty list of scheduler classes, e.g. "
                        f"[DDIMScheduler, DPMSolverMultistepScheduler]; found {schedulers!r}.")
    table = []
    for cls in schedulers:
        if not (isinstance(cls, type) and hasattr(cls, "from_config")):
            raise TypeError(f"schedule_table expects scheduler classes (with from_config), found {cls!r}. "
                            "Pass the class itself, e.g. DDIMScheduler, not an instance.")
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(num_inference_steps)
        table.append(_schedule_of(scheduler, cls.__name__.removesuffix("Scheduler")))
    return table
