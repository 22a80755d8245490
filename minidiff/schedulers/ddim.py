"""DDIM sampling: Song et al. 2021, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502.

The same trained model as DDPM, sampled by a non-Markovian process (eq. 12):

    x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0  +  sqrt(1 - ᾱ_{t-1} - σ_t²) ε  +  σ_t z,

with σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}) (eq. 16). η = 0 is deterministic (DDIM),
η = 1 is DDPM's posterior.

| here             | paper     | diffusers               |
|------------------|-----------|-------------------------|
| `alpha_bar_t`    | α_t (the paper writes ᾱ as α) | `alpha_prod_t` |
| `alpha_bar_prev` | α_{t-1}   | `alpha_prod_t_prev`     |
| `x0_pred`        | "predicted x_0" | `pred_original_sample` |
| `eps`            | ε_θ(x_t)  | `pred_epsilon`          |
| `sigma_t`        | σ_t(η)    | `std_dev_t`             |
| `dir_xt`         | "direction pointing to x_t" | `pred_sample_direction` |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.utils import randn_tensor
from .base import SchedulerBase, SchedulerOutput, spaced_timesteps, x0_and_eps
from .config import SchedulerConfig


@dataclass(frozen=True)
class DDIMSchedulerConfig(SchedulerConfig):
    """The keys of a DDIM `scheduler_config.json`, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    _supported_values = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
    }


def predict_x0_and_eps(config, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar_t):
    """Steps 3-4 of DDIM's step (and of DDIMInverseScheduler's): x_t and the model output -> (x̂_0, ε), each
    (B, C, H, W), from x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε whatever the model predicts; x̂_0 clipped if
    `config.clip_sample`."""
    # 3. "predicted x_0" of eq. 12, and the ε that goes with it
    x0_pred, eps = x0_and_eps(config.prediction_type, model_output, sample, alpha_bar_t)

    # 4. clip x̂_0 to the image range
    if config.clip_sample:
        r = config.clip_sample_range
        x0_pred = x0_pred.clamp(-r, r)
    return x0_pred, eps


class DDIMScheduler(SchedulerBase):
    """DDIM sampling. `timesteps`: LongTensor, descending. `step(..., eta=0.0)` is deterministic."""

    Config = DDIMSchedulerConfig
    order = 1

    def setup(self) -> None:
        super().setup()
        # ᾱ "before" the last step: 1 (step to the clean image) or ᾱ_0 (SD: set_alpha_to_one=False).
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the sub-sequence τ of the T training timesteps (sec. 4.2; spacing: Lin et al. 2024, Table 2)."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c = self.config
        timesteps = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        timesteps = torch.from_numpy(timesteps.round()).to(torch.int64)
        self.check_integer_timesteps(timesteps)
        self.timesteps = timesteps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | list[torch.Generator] | None = None) -> SchedulerOutput:
        """x_t -> x_{t-1}. model_output, sample: (B, C, H, W); timestep: a value of `self.timesteps`."""
        if not (isinstance(eta, (int, float)) and 0 <= eta):   # σ_t(η) of eq. 16 is a standard deviation
            raise ValueError(f"eta must be a number >= 0 (0: DDIM, 1: DDPM's posterior noise), found {eta!r}.")
        self.check_step_shapes(model_output, sample)
        # 1. previous timestep: t - T // n. This is diffusers' rule (exact for "leading" spacing, and for
        #    "trailing" when n divides T); kept so that minidiff and diffusers give the same images.
        self.step_index_of(timestep)  # a clear error for a timestep outside the schedule
        t = int(timestep)
        t_prev = t - self.config.num_train_timesteps // self.num_inference_steps

        # 2. ᾱ_t and ᾱ_{t-1}
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_bar_t = 1 - alpha_bar_t

        # 3.-4. "predicted x_0" of eq. 12, clipped to the image range, and the ε that goes with it
        x0_pred, eps = predict_x0_and_eps(self.config, model_output, sample, alpha_bar_t)

        # 5. σ_t(η), eq. 16
        variance = ((1 - alpha_bar_prev) / beta_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = eta * variance ** 0.5

        # 6. "direction pointing to x_t", eq. 12
        dir_xt = (1 - alpha_bar_prev - sigma_t ** 2) ** 0.5 * eps

        # 7. x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + direction + σ_t z, eq. 12
        prev_sample = alpha_bar_prev ** 0.5 * x0_pred + dir_xt
        if eta > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
            prev_sample = prev_sample + sigma_t * z
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
