"""DPM-Solver++ multistep: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", https://arxiv.org/abs/2211.01095 (the "DPM++ 2M" sampler).

Sampling is solving the diffusion ODE from t = T down to t = 0. Written in λ (half the log-SNR) and in
terms of the model's data prediction x_θ, its exact solution from s to t is (DPM-Solver++, sec. 4)

    x_t = (σ_t / σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ(x_λ, λ) dλ.

The first term is exact; only the integral needs approximating. DPM-Solver++ replaces x_θ in it by a
polynomial in λ through the last model outputs: a constant (order 1) gives DDIM; a line through the last
two outputs (order 2) gives DPM-Solver++(2M), Algorithm 2 of the paper. The "multistep" history is plain
state you can inspect after each step: `model_outputs`, `timestep_list`, `lower_order_nums`.

| here          | paper                                   | diffusers / scheduler_config.json |
|---------------|-----------------------------------------|-----------------------------------|
| `alpha_t`     | α_t = sqrt(ᾱ_t)                         | `alpha_t`                         |
| `sigma_t`     | σ_t = sqrt(1 - ᾱ_t)                     | `sigma_t`                         |
| `lambda_t`    | λ_t = log(α_t / σ_t), half the log-SNR  | `lambda_t`                        |
| `sigmas`      | σ_t / α_t, the EDM noise level          | `sigmas`                          |
| `x0_pred`     | x_θ(x_t, t), the data prediction        | converted `model_output`          |
| `h`           | h_i = λ_{t_i} - λ_{t_{i-1}}             | `h`                               |
| `r`           | r_i = h_{i-1} / h_i                     | `r0`                              |

What DPM-Solver++ shares with UniPC (the schedule, the history, the order of each step) is in multistep.py;
the conversions between σ, t, α_t and λ_t are in sigmas.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import SchedulerOutput
from .config import SchedulerConfig, given_values
from .multistep import MultistepScheduler, multistep_timesteps
from .sigmas import alpha_sigma_lambda, karras_sigmas, sigma_to_t, train_sigmas


# --- DPM-Solver++ ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(SchedulerConfig):
    """The keys of a `DPMSolverMultistepScheduler` scheduler_config.json, with diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # used only with thresholding
    sample_max_value: float = 1.0              # used only with thresholding
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0                    # used only with flow sigmas
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"      # used only with dynamic shifting

    # What minidiff implements; any other value of these keys is refused with this list.
    _supported_values: ClassVar[dict] = {
        "solver_order": (1, 2),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        # A DDPM config's variance types mean "the model predicts ε only"; "learned*" models add variance channels.
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                          "learned", "learned_range"),
        "thresholding": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "rescale_betas_zero_snr": (False,),
        "use_dynamic_shifting": (False,),
    }


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++(1M / 2M). `timesteps`: LongTensor, descending; `sigmas`: (n + 1,) float32, the EDM noise
    level of each step and the final one. One model evaluation per step. The history (`model_outputs`,
    `timestep_list`, `lower_order_nums`) and `add_noise` are MultistepScheduler's (multistep.py)."""

    Config = DPMSolverMultistepSchedulerConfig

    @classmethod
    def from_config(cls, config, **overrides):
        """As SchedulerBase.from_config. A UniPC or DEIS config names its own solver; read it as diffusers
        does (the pipelines swap schedulers with `from_config(pipe.scheduler.config)`)."""
        values = given_values(config)
        if values.get("solver_type") in ("logrho", "bh1", "bh2"):
            values["solver_type"] = "midpoint"
        if values.get("algorithm_type") == "deis":
            values["algorithm_type"] = "dpmsolver++"
        return super().from_config(values, **overrides)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the n steps of the schedule and their noise levels; resets the history."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c, T = self.config, self.config.num_train_timesteps

        # 1. where to start: skip the noisiest training steps whose λ_t is below lambda_min_clipped
        #    (the cosine schedule's λ_t -> -inf near t = T); by default none are skipped
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped))
        last_timestep = T - clipped

        # 2. the noise levels σ = sqrt((1 - ᾱ_t) / ᾱ_t) of the training schedule
        sigma_train = train_sigmas(self.alphas_cumprod).numpy()   # (T,), ascending in t

        # 3. either n evenly spaced timesteps and their σ, or n Karras σ's and the timesteps nearest them
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(sigma_train[0].item(), sigma_train[-1].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(sigma_train))
            if c.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds these, but truncates for the cosine schedule
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            timesteps = multistep_timesteps(T, num_inference_steps, c.timestep_spacing, c.steps_offset, last_timestep)
            self.check_integer_timesteps(torch.from_numpy(timesteps))
            sigmas = sigma_train[timesteps]

        # 4. the noise level after the last step: 0 (a clean image) or the smallest training σ
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else sigma_train[0]
        self.install_schedule(timesteps, sigmas, sigma_last, device)

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The data prediction x_θ(x_t, t) that DPM-Solver++ integrates (sec. 4), from any parametrisation."""
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]   # extra channels hold the variance: unused here
        return super().convert_model_output(model_output, sample, i)

    def first_order_update(self, x0_pred: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """DPM-Solver++(1) = DDIM: x_θ constant over the step, so ∫ e^λ dλ is exact.
            x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) x_θ(x_s, s)"""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred

    def second_order_update(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """DPM-Solver++(2M), Algorithm 2: x_θ linear in λ through the outputs at s1 = t_{i-1} and s0 = t_i."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = alpha_sigma_lambda(self.sigmas[i - 1])

        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]   # x_θ at s0 (now) and s1 (the step before)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0 = m0
        D1 = (1.0 / r0) * (m0 - m1)   # h times the slope dx_θ/dλ, by a backward difference

        if self.config.solver_type == "midpoint":
            # Algorithm 2: D = (1 + 1/(2r)) x_θ(s0) - 1/(2r) x_θ(s1) = D0 + D1 / 2
            return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0 \
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
        # "heun": integrate the line exactly, σ_t ∫ e^λ (λ - λ_s0) dλ = α_t (h - 1 + e^{-h})
        return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0 \
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> SchedulerOutput:
        """x_{t_i} -> x_{t_{i+1}}. model_output, sample: (B, C, H, W); timestep: the next of `self.timesteps`.
        `generator` is accepted for a uniform loop; this ODE solver draws no noise."""
        # 1. which step this is
        i = self.next_step_index(timestep)
        n = len(self.timesteps)

        # 2. the data prediction x_θ(x_t, t), pushed onto the history (oldest entry drops out)
        x0_pred = self.convert_model_output(model_output, sample, i)
        self.remember(x0_pred, timestep)

        # 3. the order of this step: 1 on the first step (no history yet), and 1 on the last step when it
        #    lands on σ = 0 (λ = ∞ there), with euler_at_final, or when lower_order_final asks for it with
        #    few steps (< 15), which the paper finds more stable
        c = self.config
        order = self.step_order(i, lower_order_final=c.lower_order_final and n < 15,
                                first_order_at_last=c.euler_at_final or c.final_sigmas_type == "zero")

        # 4. the update, in float32 (the exponentials lose too much in half precision)
        sample = sample.to(torch.float32)
        if order == 1:
            prev_sample = self.first_order_update(x0_pred, sample, i)
        else:
            prev_sample = self.second_order_update(sample, i)

        self.finish_step(i)
        return SchedulerOutput(prev_sample=prev_sample.to(model_output.dtype), pred_original_sample=x0_pred)
