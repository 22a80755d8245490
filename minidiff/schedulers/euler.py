"""Euler sampling in the noise-level (σ) parametrisation of Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models" (EDM), https://arxiv.org/abs/2206.00364: Algorithm 2 without its
second-order correction, as in k-diffusion's `sample_euler`.

A DDPM-trained model sees x_t = sqrt(ᾱ_t) (x_0 + σ_t ε) with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t). Working with
x = x_0 + σ ε instead, sampling solves the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ (eq. 3-4), where
D(x; σ) = x - σ ε_θ is the denoiser; Euler's method integrates it from σ_max down to 0.

| here            | paper             | diffusers              |
|-----------------|-------------------|------------------------|
| `sigma`         | σ_i = t_i in EDM  | `sigmas[step_index]`   |
| `sigma_hat`     | t̂_i (after churn) | `sigma_hat`            |
| `gamma`         | γ_i               | `gamma`                |
| `x0_pred`       | D(x̂_i; t̂_i)       | `pred_original_sample` |
| `d`             | d_i               | `derivative`           |

The model was trained on x_t, not on x: `scale_model_input` hands it x / sqrt(σ² + 1) = x_t, and
`timesteps` are the (fractional) training timesteps t whose σ_t equals each σ_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.utils import randn_tensor
from .base import SchedulerBase, SchedulerOutput, spaced_timesteps
from .config import SchedulerConfig
from .sigmas import karras_sigmas, sigma_to_t, sigmas_at, train_sigmas


@dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(SchedulerConfig):
    """The keys of an Euler `scheduler_config.json`, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    _supported_values = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear",),
        "use_karras_sigmas": (False, True, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": (False,),
        "final_sigmas_type": ("zero",),
    }


class EulerDiscreteScheduler(SchedulerBase):
    """Euler's method on the EDM ODE. `timesteps`: float32, descending; `sigmas`: (n+1,), ending at 0.

    Stateful: `step_index` advances by one per `step`, found from the first timestep it is given; calling
    `set_timesteps` again starts over."""

    Config = EulerDiscreteSchedulerConfig
    order = 1

    def setup(self) -> None:
        super().setup()
        # Before set_timesteps: all T training steps, as in diffusers (so add_noise works for training).
        T = self.config.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).float()
        sigmas = torch.cat([train_sigmas(self.alphas_cumprod).flip(0), torch.zeros(1)])
        self.set_schedule(timesteps, sigmas)

    def set_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        """Install a schedule and start over: timesteps (n,) float32, sigmas (n+1,) float32 on the CPU."""
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.step_index = None
        self.begin_index = None
        # std of the starting noise, diffusers' formula (kept so that equal seeds give equal images):
        # σ_max, but sqrt(σ_max² + 1) with "leading" spacing
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            self.init_noise_sigma = sigma_max
        else:
            self.init_noise_sigma = (sigma_max ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n timesteps (spacing: Lin et al. 2024, Table 2) and their σ, or Karras σ's (EDM eq. 5)."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c = self.config
        # 1. timesteps, then σ at each by interpolating the training σ_t (all in numpy, bit-equal to diffusers)
        timesteps = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing,
                                     c.steps_offset).astype(np.float32)
        sigmas = sigmas_at(timesteps, self.alphas_cumprod)
        # 2. optionally respace the σ's as Karras et al. do, and map each back to a fractional timestep
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else sigmas[-1].item()
            sigma_max = c.sigma_max if c.sigma_max is not None else sigmas[0].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            log_sigmas = np.log(train_sigmas(self.alphas_cumprod).numpy())
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        # 3. end at σ = 0: the clean image
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.set_schedule(torch.from_numpy(timesteps.astype(np.float32)).to(device), torch.from_numpy(sigmas))

    # --- the step index --------------------------------------------------------------------------------
    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of `timesteps` (image-to-image starts part-way); call before the first step."""
        self.begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """Where `timestep` is in the schedule. If it occurs twice, the second: starting part-way at a
        repeated timestep (img2img), the first occurrence would skip a σ (diffusers' rule)."""
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"Timestep {float(timestep)} is not in this scheduler's schedule "
                             f"{self.timesteps[:6].tolist()}...; pass the values of scheduler.timesteps.")
        return int(hits[1 if len(hits) > 1 else 0])

    def init_step_index(self, timestep) -> None:
        """Check `timestep`; on the first call after set_timesteps, find where sampling starts."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before "
                               "scale_model_input() and step().")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"{type(self).__name__} takes a value of scheduler.timesteps (a float tensor), found "
                             f"the integer {timestep!r}. Loop with `for t in scheduler.timesteps`, not over indices.")
        index = self.index_for_timestep(timestep)
        if self.step_index is None:
            self.step_index = index if self.begin_index is None else self.begin_index
        # later calls count on from there: the timestep must be the one at the current index
        n = len(self.timesteps)
        if self.step_index >= n:
            raise RuntimeError(f"All {n} steps of the schedule were taken. Call set_timesteps(...) again to start a "
                               "new sampling loop.")
        expected = float(self.timesteps[self.step_index])
        if float(timestep) != expected:
            raise ValueError(f"{type(self).__name__} expected timestep {expected} (step {self.step_index} of {n}), "
                             f"found {float(timestep)}. Visit scheduler.timesteps in order; call set_timesteps(...) "
                             "to start over.")

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x_t = x / sqrt(σ² + 1): the model was trained on the variance-preserving x_t. sample: (B, C, H, W)."""
        self.init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    # --- sampling ----------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | list[torch.Generator] | None = None) -> SchedulerOutput:
        """x at σ_i -> x at σ_{i+1}, EDM Algorithm 2 lines 4-8 (no Heun correction). (B, C, H, W) tensors."""
        self.init_step_index(timestep)
        self.check_step_shapes(model_output, sample)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]

        # 1. "churn": raise the noise level to σ̂ = σ (1 + γ) by adding fresh noise (lines 5-6; off by default)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            z = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype) * s_noise
            sample = sample + z * (sigma_hat ** 2 - sigma ** 2) ** 0.5

        # 2. the denoised estimate D(x̂; σ̂)
        if self.config.prediction_type in ("sample", "original_sample"):
            x0_pred = model_output
        elif self.config.prediction_type == "epsilon":
            x0_pred = sample - sigma_hat * model_output
        else:  # "v_prediction" (Salimans & Ho 2022), in the x = x_t sqrt(σ² + 1) variables
            x0_pred = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))

        # 3. d = (x̂ - D) / σ̂ (line 7), then x_{i+1} = x̂ + (σ_{i+1} - σ̂) d (line 8)
        d = (sample - x0_pred) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + d * dt).to(model_output.dtype)

        self.step_index += 1
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)

    # --- the forward process, in σ: x = x_0 + σ ε --------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + σ_t ε for timesteps of this schedule (not x_t: Euler samples in x). x_0, ε: (B, ...), t: (B,)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self.begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps]
        elif self.step_index is not None:
            indices = [self.step_index] * timesteps.shape[0]
        else:
            indices = [self.begin_index] * timesteps.shape[0]
        sigma = sigmas[indices].flatten()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)                         # (B, 1, 1, 1)
        return original_samples + noise * sigma.view(shape)
