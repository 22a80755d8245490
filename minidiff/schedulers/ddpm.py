"""DDPM ancestral sampling: Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
https://arxiv.org/abs/2006.11239.

Each step samples x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x_0) with x_0 replaced by the
model's estimate (eq. 6-7 and 15). With fewer inference steps than training steps, t-1 means "the previous
timestep of the schedule" and β_t, α_t are those of the strided step: α_t = ᾱ_t / ᾱ_{t_prev}.

| here             | paper                      | diffusers               |
|------------------|----------------------------|-------------------------|
| `alpha_bar_t`    | ᾱ_t                        | `alpha_prod_t`          |
| `alpha_bar_prev` | ᾱ_{t-1}                    | `alpha_prod_t_prev`     |
| `alpha_t`        | α_t = ᾱ_t / ᾱ_{t-1}        | `current_alpha_t`       |
| `beta_t`         | β_t = 1 - α_t              | `current_beta_t`        |
| `x0_pred`        | x̂_0                        | `pred_original_sample`  |
| `variance`       | σ_t², of the added noise   | `variance`              |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.utils import randn_tensor
from .base import SchedulerBase, SchedulerOutput, spaced_timesteps, x0_and_eps
from .config import SchedulerConfig


@dataclass(frozen=True)
class DDPMSchedulerConfig(SchedulerConfig):
    """The keys of a DDPM `scheduler_config.json` (e.g. google/ddpm-cat-256), with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    _supported_values = {
        "variance_type": ("fixed_small", "fixed_large"),  # the two fixed choices of Ho et al. sec. 3.2
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    }


class DDPMScheduler(SchedulerBase):
    """Stochastic DDPM sampling. `timesteps`: LongTensor, descending. `step` draws fresh noise each call."""

    Config = DDPMSchedulerConfig
    order = 1

    def setup(self) -> None:
        super().setup()
        # Before set_timesteps the schedule is all T training steps, as in diffusers.
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose n of the T training timesteps to sample with (spacing: Lin et al. 2024, Table 2)."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c = self.config
        timesteps = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        timesteps = torch.from_numpy(timesteps.round()).to(torch.int64)
        self.check_integer_timesteps(timesteps)
        self.timesteps = timesteps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> SchedulerOutput:
        """x_t -> x_{t-1}. model_output, sample: (B, C, H, W); timestep: a value of `self.timesteps`."""
        self.check_step_shapes(model_output, sample)
        # 1. this timestep and the previous one of the schedule (-1 after the last: x_0 itself)
        i = self.step_index_of(timestep)
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

        # 2. ᾱ_t, ᾱ_{t-1}, and α_t, β_t of this (possibly strided) step
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        beta_bar_t = 1 - alpha_bar_t               # 1 - ᾱ_t
        beta_bar_prev = 1 - alpha_bar_prev         # 1 - ᾱ_{t-1}
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t

        # 3. x̂_0 from the model output; eq. 15: x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
        x0_pred, _ = x0_and_eps(self.config.prediction_type, model_output, sample, alpha_bar_t)

        # 4. images live in [-1, 1]: clip the estimate there (as the DDPM code does)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0_pred = x0_pred.clamp(-r, r)

        # 5. posterior mean, eq. 7: μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) x̂_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t
        x0_coeff = (alpha_bar_prev ** 0.5 * beta_t) / beta_bar_t
        xt_coeff = alpha_t ** 0.5 * beta_bar_prev / beta_bar_t
        mean = x0_coeff * x0_pred + xt_coeff * sample

        # 6. add σ_t z (eq. 6; sec. 3.2): σ_t² = β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t ("fixed_small") or β_t
        #    ("fixed_large"). No noise at t = 0. The noise is drawn exactly as diffusers draws it.
        prev_sample = mean
        if t > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            if self.config.variance_type == "fixed_small":
                variance = (beta_bar_prev / beta_bar_t * beta_t).clamp(min=1e-20)
            else:
                variance = beta_t
            prev_sample = mean + variance ** 0.5 * z
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
