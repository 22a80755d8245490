"""Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`), in the σ variables of Karras et al. 2022
(https://arxiv.org/abs/2206.00364); see euler.py for x = x_0 + σ ε and the denoiser D.

The step σ_i -> σ_{i+1} of DDPM's ancestral sampler (Ho et al. 2020) keeps noise level σ_{i+1} but splits it
in two: a deterministic Euler step down to σ_down, then fresh noise of std σ_up, with

    σ_up   = sqrt(σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²),      σ_down = sqrt(σ_{i+1}² - σ_up²),

so that σ_down² + σ_up² = σ_{i+1}². Unlike Euler, every step is random: the same generator gives the
same image.

| here         | k-diffusion / diffusers  |
|--------------|--------------------------|
| `sigma`      | `sigma_from`             |
| `sigma_next` | `sigma_to`               |
| `x0_pred`    | `denoised`, `pred_original_sample` |
| `d`          | `derivative`             |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.utils import randn_tensor
from .base import SchedulerOutput, spaced_timesteps
from .config import SchedulerConfig
from .euler import EulerDiscreteScheduler
from .sigmas import sigmas_at


@dataclass(frozen=True)
class EulerAncestralDiscreteSchedulerConfig(SchedulerConfig):
    """The keys of an Euler-ancestral `scheduler_config.json`, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    _supported_values = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "rescale_betas_zero_snr": (False,),
    }


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral. The σ bookkeeping (step index, `scale_model_input`, `add_noise`, `init_noise_sigma`)
    is Euler's; the config (no Karras σ's), the schedule and the step are its own."""

    Config = EulerAncestralDiscreteSchedulerConfig
    order = 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n timesteps (spacing: Lin et al. 2024, Table 2), their σ's, then σ = 0."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c = self.config
        timesteps = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing,
                                     c.steps_offset).astype(np.float32)
        sigmas = np.concatenate([sigmas_at(timesteps, self.alphas_cumprod), [0.0]]).astype(np.float32)
        self.set_schedule(torch.from_numpy(timesteps).to(device), torch.from_numpy(sigmas))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> SchedulerOutput:
        """x at σ_i -> x at σ_{i+1}, with fresh noise. model_output, sample: (B, C, H, W)."""
        self.init_step_index(timestep)
        self.check_step_shapes(model_output, sample)
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)

        # 1. the denoised estimate D(x; σ)
        if self.config.prediction_type == "epsilon":
            x0_pred = sample - sigma * model_output
        else:  # "v_prediction" (Salimans & Ho 2022), in the x = x_t sqrt(σ² + 1) variables
            x0_pred = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))

        # 2. split σ_{i+1}² = σ_down² + σ_up²
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5

        # 3. Euler step to σ_down: d = (x - D) / σ, x' = x + (σ_down - σ) d
        d = (sample - x0_pred) / sigma
        prev_sample = sample + d * (sigma_down - sigma)

        # 4. add noise of std σ_up (drawn at every step, the last included, exactly as diffusers draws it)
        z = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = (prev_sample + z * sigma_up).to(model_output.dtype)

        self.step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
