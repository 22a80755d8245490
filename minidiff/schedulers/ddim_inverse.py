"""DDIM inversion: the deterministic DDIM update run backwards, x_{t-1} -> x_t, image -> noise.

DDIM with η = 0 (Song et al. 2021, https://arxiv.org/abs/2010.02502, eq. 12) is an ODE solver, so it can
be run the other way (sec. 4.3, eq. 13; Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233;
Mokady et al. 2022, https://arxiv.org/abs/2211.09794, sec. 3): from x̂_0 and ε predicted at
one noise level, write the sample at the *next*, noisier level:

    x_{t+1} = sqrt(ᾱ_{t+1}) x̂_0  +  sqrt(1 - ᾱ_{t+1}) ε,      x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)

Eq. 12 with the roles of t and t-1 swapped. The model cannot see x_{t+1} before it is computed, so ε is
ε_θ(x_t, t+1): the network is called at the *target* timestep (diffusers' convention). The small error
this makes is why inversion with classifier-free guidance drifts (Mokady et al. 2022, sec. 3).

| here               | paper      | diffusers               |
|--------------------|------------|-------------------------|
| `t`                | t          | `timestep` (in step)    |
| `t_next`           | t + 1      | `prev_timestep` (the argument of step) |
| `alpha_bar_t`      | α_t (ᾱ)    | `alpha_prod_t`          |
| `alpha_bar_next`   | α_{t+1}    | `alpha_prod_t_prev`     |
| `x0_pred`, `eps`   | x̂_0, ε_θ   | `pred_original_sample`, `pred_epsilon` |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SchedulerBase, SchedulerOutput, spaced_timesteps
from .config import SchedulerConfig
from .ddim import predict_x0_and_eps


@dataclass(frozen=True)
class DDIMInverseSchedulerConfig(SchedulerConfig):
    """The keys of a DDIM inverse `scheduler_config.json`, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    _supported_values = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "trailing"),
        "rescale_betas_zero_snr": (False,),
    }


class DDIMInverseScheduler(SchedulerBase):
    """DDIM run backwards. `timesteps`: LongTensor, *ascending*. `step(eps, t_next, x)` -> x at t_next.

    Build it from the sampler's config, as diffusers' tutorials do:
    `DDIMInverseScheduler.from_config(pipe.scheduler.config)`.
    """

    Config = DDIMInverseSchedulerConfig
    order = 1

    def setup(self) -> None:
        super().setup()
        # ᾱ "before" the first inverse step, the start x_0: 1 (the clean image) or ᾱ_0 (SD: set_alpha_to_one=False).
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(0, self.config.num_train_timesteps, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The DDIM sampler's timesteps in reverse, ascending: e.g. 1, 51, ..., 951 for 20 SD steps."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c = self.config
        timesteps = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        timesteps = torch.from_numpy(timesteps[::-1].round().copy()).to(torch.int64)   # descending -> ascending
        self.check_integer_timesteps(timesteps)
        self.timesteps = timesteps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> SchedulerOutput:
        """x_t -> x_{t_next} with t = t_next - T // n. model_output = ε_θ(x_t, t_next), sample = x_t: (B, C, H, W).

        `timestep` is the value of `self.timesteps` to step *to*; `prev_sample` is the noisier sample there
        (named as in DDIMScheduler, so that loops read the same).
        """
        self.check_step_shapes(model_output, sample)
        # 1. the two noise levels: from t (one DDIM step below) up to t_next
        self.step_index_of(timestep)  # a clear error for a timestep outside the schedule
        t_next = int(timestep)
        t = min(t_next - self.config.num_train_timesteps // self.num_inference_steps,
                self.config.num_train_timesteps - 1)

        # 2. ᾱ_t (the initial ᾱ before the first step) and ᾱ_{t+1}
        alpha_bar_t = self.alphas_cumprod[t] if t >= 0 else self.initial_alpha_cumprod
        alpha_bar_next = self.alphas_cumprod[t_next]

        # 3.-4. x̂_0 (clipped) and ε at the current level, as in DDIM's steps 3-4
        x0_pred, eps = predict_x0_and_eps(self.config, model_output, sample, alpha_bar_t)

        # 5. x_{t+1} = sqrt(ᾱ_{t+1}) x̂_0 + sqrt(1 - ᾱ_{t+1}) ε   (eq. 12 with t-1 -> t+1, σ = 0)
        next_sample = alpha_bar_next ** 0.5 * x0_pred + (1 - alpha_bar_next) ** 0.5 * eps
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x0_pred)
