"""PNDM sampling: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
https://arxiv.org/abs/2202.09778. Stable Diffusion v1's default scheduler.

A classical ODE method (Runge-Kutta, linear multistep) combines several ε estimates into one, ε', and the
"transfer part" φ (eq. 9, a DDIM step) moves x_t to x_{t-δ} with it:

    φ(x_t, ε', t, t-δ) = sqrt(ᾱ_{t-δ} / ᾱ_t) x_t
                         - (ᾱ_{t-δ} - ᾱ_t) / (ᾱ_t sqrt(1 - ᾱ_{t-δ}) + sqrt(ᾱ_t (1 - ᾱ_t) ᾱ_{t-δ})) ε'

- PLMS, the pseudo linear multi-step method (eq. 12-13): ε' = (55 e_t - 59 e_{t-δ} + 37 e_{t-2δ} - 9 e_{t-3δ}) / 24,
  the 4th-order Adams-Bashforth formula over the last four model outputs e (kept in `self.ets`).
- PLMS needs three earlier outputs. The paper starts with three pseudo Runge-Kutta (PRK) steps of four
  model evaluations each (`skip_prk_steps=False`); Stable Diffusion instead ramps up through lower orders
  (`skip_prk_steps=True`: a 2nd-order Heun-like first step, then Adams-Bashforth of order 2, 3, 4).

The schedule follows diffusers exactly: with `skip_prk_steps` the second timestep appears twice (the first
step is predictor + corrector: two model calls at t and t-δ); with PRK, the 12 warm-up timesteps are
(t, t-δ/2, t-δ/2, t-δ) for each of the three Runge-Kutta steps.

State, inspectable between steps: `counter` (model outputs consumed so far), `ets` (the history e_t,
newest last), `cur_sample` (x_t at the start of the current multi-evaluation step), `prk_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SchedulerBase, SchedulerOutput, spaced_timesteps
from .config import SchedulerConfig


@dataclass(frozen=True)
class PNDMSchedulerConfig(SchedulerConfig):
    """The keys of a PNDM `scheduler_config.json` (e.g. CompVis/stable-diffusion-v1-4), diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    _supported_values = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
    }


class PNDMScheduler(SchedulerBase):
    """PLMS (with optional PRK warm-up). `timesteps`: LongTensor, descending, with repeats (see module doc)."""

    Config = PNDMSchedulerConfig
    order = 1
    pndm_order = 4  # PLMS uses the last four model outputs

    def setup(self) -> None:
        super().setup()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.reset_state()

    def reset_state(self) -> None:
        self.counter = 0          # model outputs consumed since set_timesteps
        self.ets = []             # history of model outputs e, newest last (at most 4 kept)
        self.cur_sample = None    # x_t where the current multi-evaluation step started
        self.prk_outputs = []     # the Runge-Kutta evaluations k1..k4 of the current PRK step

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The n inference timesteps, plus the repeats PNDM needs; resets the multistep history."""
        self.check_num_inference_steps(num_inference_steps)
        c = self.config
        if not c.skip_prk_steps and num_inference_steps < 4:
            raise ValueError(f"PNDM's Runge-Kutta warm-up needs num_inference_steps >= 4, found "
                             f"{num_inference_steps}. Use more steps or skip_prk_steps=True.")
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(c.num_train_timesteps, num_inference_steps, c.timestep_spacing, c.steps_offset)
        ts = torch.from_numpy(ts.round()).to(torch.int64)  # t_0 > t_1 > ... (descending)

        if c.skip_prk_steps:
            # t_0, t_1, t_1, t_2, ..., t_{n-1}: the first step is evaluated at t_0 and (corrector) at t_1
            self.prk_timesteps = ts[:0]
            self.plms_timesteps = torch.cat([ts[:2], ts[1:]])
        else:
            # three Runge-Kutta steps t_k -> t_{k+1}, evaluated at t_k, t_{k+1} + δ/2 (twice), t_{k+1};
            # diffusers writes the midpoint as t_{k+1} + δ/2 with δ = T // n
            half = c.num_train_timesteps // num_inference_steps // 2
            self.prk_timesteps = torch.stack([
                torch.stack([ts[k], ts[k + 1] + half, ts[k + 1] + half, ts[k + 1]]) for k in range(3)
            ]).flatten()
            self.plms_timesteps = ts[3:]
        timesteps = torch.cat([self.prk_timesteps, self.plms_timesteps])
        self.check_integer_timesteps(timesteps)
        self.timesteps = timesteps.to(device)
        self.reset_state()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> SchedulerOutput:
        """One model output in, one sample out. model_output, sample: (B, C, H, W). PNDM draws no noise;
        `generator` is accepted so that every scheduler has the same `step` signature."""
        self.step_index_of(timestep)  # a clear error before set_timesteps or for a foreign timestep
        self.check_step_shapes(model_output, sample)
        if self.counter < len(self.prk_timesteps):
            return self.step_prk(model_output, int(timestep), sample)
        return self.step_plms(model_output, int(timestep), sample)

    def step_prk(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> SchedulerOutput:
        """Pseudo Runge-Kutta (eq. 12-13): four evaluations k1..k4 per step t -> t-δ, combined as
        ε' = k1/6 + k2/3 + k3/3 + k4/6; between them, φ makes half (k1, k2) and full (k3) trial steps."""
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        stage = self.counter % 4
        # 1. every stage starts from x_t, the sample at the beginning of this Runge-Kutta step
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        t_next = timestep - (0 if stage % 2 else half)  # where this stage's trial step lands
        if stage == 0:
            self.cur_sample = sample
            self.ets.append(model_output)  # k1 = e_t also feeds the PLMS history
            self.prk_outputs = []
        self.prk_outputs.append(model_output)

        # 2. the trial step with this stage's ε, or at the last stage the full step with the RK4 combination
        if stage < 3:
            eps = model_output
        else:
            k1, k2, k3, k4 = self.prk_outputs
            eps = 1 / 6 * k1 + 1 / 3 * k2 + 1 / 3 * k3 + 1 / 6 * k4
        prev_sample = self.transfer(self.cur_sample, t, t_next, eps)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> SchedulerOutput:
        """Pseudo linear multi-step (eq. 12-13), ramping up through lower orders while `ets` is short."""
        delta = self.config.num_train_timesteps // self.num_inference_steps
        # 1. the step t -> t-δ; the second call (counter 1) is the corrector of the first step, at t-δ
        t, t_prev = timestep, timestep - delta
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:
            t, t_prev = timestep + delta, timestep

        # 2. ε' from the history (Adams-Bashforth of order len(ets); the first step is Heun's method)
        e = self.ets
        if len(e) == 1 and self.counter == 0:    # predictor: an Euler (DDIM) step with e_t
            eps = model_output
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:  # corrector: redo the step from x_t with the mean of both
            eps = (model_output + e[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])

        # 3. x_{t-δ} = φ(x_t, ε', t, t-δ)
        prev_sample = self.transfer(sample, t, t_prev, eps)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample)

    def transfer(self, sample: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor) -> torch.Tensor:
        """φ(x_t, ε, t, t_prev), eq. 9: the DDIM step from t to t_prev. sample, eps: (B, C, H, W)."""
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_bar_t = 1 - alpha_bar_t
        beta_bar_prev = 1 - alpha_bar_prev
        if self.config.prediction_type == "v_prediction":  # ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) x_t
            eps = alpha_bar_t ** 0.5 * eps + beta_bar_t ** 0.5 * sample
        sample_coeff = (alpha_bar_prev / alpha_bar_t) ** 0.5
        eps_denom = alpha_bar_t * beta_bar_prev ** 0.5 + (alpha_bar_t * beta_bar_t * alpha_bar_prev) ** 0.5
        return sample_coeff * sample - (alpha_bar_prev - alpha_bar_t) * eps / eps_denom
