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

The schedule helpers at the top (timesteps, Karras sigmas, σ <-> t) are shared with UniPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import SchedulerBase, SchedulerOutput, given_values, vp_coefficients


# --- the inference schedule, shared with unipc_multistep.py -------------------------------------------
def multistep_timesteps(num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str,
                        steps_offset: int = 0, last_timestep: int | None = None) -> np.ndarray:
    """The n timesteps t_0 > ... > t_{n-1} a multistep solver evaluates the model at, int64, in the spacings
    of Lin et al. 2024, Table 2 (https://arxiv.org/abs/2305.08891).

    Unlike DDIM's, "linspace" and "leading" place n + 1 points and drop the last one (t = 0): the final
    step goes from t_{n-1} to the final noise level (σ = 0 by default), not to a timestep. Computed with
    numpy exactly as diffusers does, so the .5 roundings agree. `last_timestep` (default T) is where the
    schedule starts counting down from (DPM-Solver's `lambda_min_clipped` lowers it)."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":   # n + 1 points evenly from 0 to T - 1, rounded; highest first
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if timestep_spacing == "leading":    # multiples of T // (n + 1), shifted by steps_offset
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if timestep_spacing == "trailing":   # T - 1 down in strides of T / n: always starts at the noisiest step
        step_ratio = T / n
        return np.arange(last, 0, -step_ratio).round().astype(np.int64) - 1
    raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; expected 'linspace', 'leading' or 'trailing'.")


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM, https://arxiv.org/abs/2206.00364), eq. 5: n noise levels from σ_max to σ_min,
    evenly spaced in σ^(1/ρ), so that more steps are spent at low noise. ρ = 7 as in the paper."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each noise level σ: linear interpolation of log σ over the
    training table `log_sigmas` (ascending in t). The model is then told this t."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]                              # (T, n)
    # the last training step whose log σ is <= this one, and the step after it
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def alpha_sigma_from(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients from the EDM noise level σ = σ_t / α_t: α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def next_step_index(scheduler, timestep) -> int:
    """Which step of `scheduler.timesteps` this call of step() is. The first call looks `timestep` up (a
    loop may start mid-schedule, as image-to-image does); later calls count on, so the history stays
    aligned even where Karras rounding repeats a timestep, and a timestep out of order is an error."""
    if scheduler.step_index is None:
        return scheduler.step_index_of(timestep)  # errors if set_timesteps was not called or t is not in it
    i, n = scheduler.step_index, len(scheduler.timesteps)
    if i >= n:
        raise RuntimeError(f"All {n} steps of the schedule were taken. Call set_timesteps(...) again to start a "
                           "new sampling loop.")
    if scheduler.timesteps.device.type != "cpu" or (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
        return i  # checked on the CPU only: reading a GPU value (.item()) would wait for the GPU at every step
    t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    expected = scheduler.timesteps[i].item()
    if t != expected:
        raise ValueError(f"step() expected timestep {expected} (step {i} of {n}), found {t}. A multistep solver "
                         "visits scheduler.timesteps in order; call set_timesteps(...) to start over.")
    return i


def check_distinct_noise_levels(sigmas: torch.Tensor, timesteps: torch.Tensor, spacing: str) -> None:
    """Two equal noise levels in a row make a step of length h = 0, which the multistep formulas divide by."""
    n = len(timesteps)
    same = (sigmas[1:n] == sigmas[: n - 1]).nonzero()
    if len(same):
        i = int(same[0])
        raise ValueError(f"{n} steps with timestep_spacing={spacing!r} repeat timestep {int(timesteps[i])} (steps {i} "
                         f"and {i + 1}), a step of zero length. Use fewer steps or timestep_spacing='trailing'.")


# --- DPM-Solver++ ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig:
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


class DPMSolverMultistepScheduler(SchedulerBase):
    """DPM-Solver++(1M / 2M). `timesteps`: LongTensor, descending; `sigmas`: (n + 1,) float32, the EDM noise
    level of each step and the final one. One model evaluation per step."""

    Config = DPMSolverMultistepSchedulerConfig
    order = 1

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

    def setup(self) -> None:
        super().setup()
        # α_t, σ_t and λ_t of every training timestep (variance preserving: α_t² + σ_t² = 1)
        self.alpha_t, self.sigma_t, self.lambda_t = vp_coefficients(self.alphas_cumprod)
        self.sigmas = None
        self.reset_history()

    def reset_history(self) -> None:
        """Forget the previous sampling loop: the multistep solver's memory of past model outputs."""
        self.model_outputs = [None] * self.config.solver_order  # x_θ at the last steps, oldest first
        self.timestep_list = [None] * self.config.solver_order  # the timesteps they were made at
        self.lower_order_nums = 0   # steps taken so far, up to solver_order: the first step has no history
        self.step_index = None      # the index in `timesteps` of the next step

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
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()   # (T,), ascending in t

        # 3. either n evenly spaced timesteps and their σ, or n Karras σ's and the timesteps nearest them
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds these, but truncates for the cosine schedule
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            timesteps = multistep_timesteps(T, num_inference_steps, c.timestep_spacing, c.steps_offset, last_timestep)
            self.check_integer_timesteps(torch.from_numpy(timesteps))
            sigmas = train_sigmas[timesteps]

        # 4. the noise level after the last step: 0 (a clean image) or the smallest training σ
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else train_sigmas[0]
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))   # (n + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)            # (n,)
        check_distinct_noise_levels(self.sigmas, self.timesteps, c.timestep_spacing)
        self.reset_history()

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The data prediction x_θ(x_t, t) that DPM-Solver++ integrates (sec. 4), from any parametrisation."""
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]   # extra channels hold the variance: unused here
        alpha_t, sigma_t = alpha_sigma_from(self.sigmas[i])
        if self.config.prediction_type == "epsilon":    # x_t = α_t x_0 + σ_t ε
            return (sample - sigma_t * model_output) / alpha_t
        if self.config.prediction_type == "sample":
            return model_output
        return alpha_t * sample - sigma_t * model_output  # "v_prediction": v = α_t ε - σ_t x_0 (Salimans & Ho 2022)

    def first_order_update(self, x0_pred: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """DPM-Solver++(1) = DDIM: x_θ constant over the step, so ∫ e^λ dλ is exact.
            x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) x_θ(x_s, s)"""
        alpha_t, sigma_t = alpha_sigma_from(self.sigmas[i + 1])
        alpha_s, sigma_s = alpha_sigma_from(self.sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred

    def second_order_update(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """DPM-Solver++(2M), Algorithm 2: x_θ linear in λ through the outputs at s1 = t_{i-1} and s0 = t_i."""
        alpha_t, sigma_t = alpha_sigma_from(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = alpha_sigma_from(self.sigmas[i])
        alpha_s1, sigma_s1 = alpha_sigma_from(self.sigmas[i - 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)

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
        i = next_step_index(self, timestep)
        n = len(self.timesteps)

        # 2. the data prediction x_θ(x_t, t), pushed onto the history (oldest entry drops out)
        x0_pred = self.convert_model_output(model_output, sample, i)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        # 3. the order of this step: 1 on the first step (no history yet), and 1 on the last step when it
        #    lands on σ = 0 (λ = ∞ there) or when lower_order_final asks for it with few steps (< 15),
        #    which the paper finds more stable
        last_step = i == n - 1
        final_first_order = last_step and (self.config.euler_at_final or self.config.final_sigmas_type == "zero"
                                           or (self.config.lower_order_final and n < 15))
        use_first_order = self.config.solver_order == 1 or self.lower_order_nums < 1 or final_first_order

        # 4. the update, in float32 (the exponentials lose too much in half precision)
        sample = sample.to(torch.float32)
        if use_first_order:
            prev_sample = self.first_order_update(x0_pred, sample, i)
        else:
            prev_sample = self.second_order_update(sample, i)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self.step_index = i + 1
        return SchedulerOutput(prev_sample=prev_sample.to(model_output.dtype), pred_original_sample=x0_pred)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x_0 + σ_t ε. After set_timesteps, a t of the schedule gets exactly the noise level σ_i that
        step() assumes there (with Karras sigmas that is not ᾱ of the rounded t); else ᾱ_t of training."""
        return add_noise_at_schedule(self, original_samples, noise, timesteps)


def add_noise_at_schedule(scheduler, original_samples, noise, timesteps) -> torch.Tensor:
    """add_noise of the multistep solvers (shared with UniPC). x_0, ε: (B, ...); timesteps: (B,)."""
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    if scheduler.sigmas is None or not all((scheduler.timesteps.cpu() == t).any() for t in timesteps.cpu()):
        return SchedulerBase.add_noise(scheduler, original_samples, noise, timesteps)
    step_indices = [scheduler.step_index_of(t) for t in timesteps]
    sigma = scheduler.sigmas[step_indices].to(device=original_samples.device, dtype=original_samples.dtype)
    sigma = sigma.view((-1,) + (1,) * (original_samples.ndim - 1))    # (B, 1, 1, 1)
    alpha_t, sigma_t = alpha_sigma_from(sigma)
    return alpha_t * original_samples + sigma_t * noise
