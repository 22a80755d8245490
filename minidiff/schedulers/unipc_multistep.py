"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", https://arxiv.org/abs/2302.04867.

UniPC solves the same ODE as DPM-Solver++ (see dpmsolver_multistep.py), in λ and with the data prediction
x_θ, and adds a corrector that costs no extra model call:

- UniP-p, the predictor (sec. 3.2): from x at s0 = t_{i-1}, step to t_i using x_θ at the last p steps
  (a multistep exponential integrator, like DPM-Solver++(pM)).
- UniC-p, the corrector (sec. 3.1): the model is evaluated at the predicted x_{t_i} anyway, to start the
  next step; before using it, refit the same step with that new output included, which raises the order
  of accuracy to p + 1. The corrected x_{t_i} replaces the predicted one.

Both share one formula. With D_k = (x_θ(s_k) - x_θ(s0)) / r_k and r_k = (λ_{s_k} - λ_{s0}) / h,

    x_t = (σ_t / σ_s0) x_s0 - α_t (e^{-h} - 1) x_θ(s0) - α_t B(h) Σ_k ρ_k D_k,

where the weights ρ solve the order conditions R ρ = b: R_{jk} = r_k^(j-1), b_j = j! · hh · φ_{j+1}(hh) / B(h),
hh = -h (data prediction), and φ_j are the φ-functions of exponential integrators. B(h) is a free choice of
order O(h): "bh1" B(h) = hh, "bh2" B(h) = e^{hh} - 1 (recommended for guided sampling; the default).

| here              | paper                                  | diffusers                  |
|-------------------|----------------------------------------|----------------------------|
| `alpha_t`, `sigma_t`, `lambda_t`, `sigmas`, `h` | as in dpmsolver_multistep.py | same       |
| `x0_pred`         | x_θ(x_t, t)                            | `model_output_convert`     |
| `rks`             | r_k                                    | `rks`                      |
| `D1s`             | D_k                                    | `D1s`                      |
| `rhos_p`, `rhos_c`| a_k of UniP and UniC                   | `rhos_p`, `rhos_c`         |
| `B_h`             | B(h)                                   | `B_h`                      |
| `last_sample`     | x_{t_{i-1}}, the start of the last predictor step | `last_sample`   |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import SchedulerOutput
from .config import SchedulerConfig, given_values
from .multistep import MultistepScheduler, multistep_timesteps
from .sigmas import alpha_sigma_lambda, karras_sigmas, sigma_to_t, train_sigmas


@dataclass(frozen=True)
class UniPCMultistepSchedulerConfig(SchedulerConfig):
    """The keys of a `UniPCMultistepScheduler` scheduler_config.json, with diffusers' defaults."""

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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple = ()              # step indices whose result is not corrected
    solver_p: None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0                    # used only with flow sigmas
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"      # used only with dynamic shifting
    sigma_min: float | None = None             # Karras σ_min; None: the smallest training σ
    sigma_max: float | None = None             # Karras σ_max; None: the largest training σ
    shift_terminal: float | None = None

    # What minidiff implements; any other value of these keys is refused with this list.
    _supported_values: ClassVar[dict] = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "predict_x0": (True,),
        "solver_type": ("bh1", "bh2"),
        "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "thresholding": (False,),
        "solver_p": (None,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "rescale_betas_zero_snr": (False,),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
    }

    def validate(self, source: str) -> None:
        if not isinstance(self.solver_order, int) or self.solver_order < 1:
            raise ValueError(f"{source}: solver_order must be a positive int (2 for guided sampling, 3 for "
                             f"unconditional), found {self.solver_order!r}.")
        if not all(isinstance(k, int) for k in self.disable_corrector):
            raise ValueError(f"{source}: disable_corrector must list step indices (ints), found "
                             f"{list(self.disable_corrector)!r}.")


class UniPCMultistepScheduler(MultistepScheduler):
    """UniPC-p with B(h) (bh1 / bh2). `timesteps`: LongTensor, descending; `sigmas`: (n + 1,) float32.
    One model evaluation per step: the corrector reuses the evaluation that starts the next step. The history
    (`model_outputs`, `timestep_list`, `lower_order_nums`) and `add_noise` are MultistepScheduler's (multistep.py)."""

    Config = UniPCMultistepSchedulerConfig

    @classmethod
    def from_config(cls, config, **overrides):
        """As SchedulerBase.from_config. A DPM-Solver or DEIS config names its own solver type; read it as
        diffusers does (the tutorials build UniPC from `pipe.scheduler.config`)."""
        values = given_values(config)
        if values.get("solver_type") in ("midpoint", "heun", "logrho"):
            values["solver_type"] = "bh2"
        return super().from_config(values, **overrides)

    def reset_history(self) -> None:
        """Forget the previous sampling loop: past model outputs and the sample the corrector refits from."""
        super().reset_history()
        self.last_sample = None     # x at the start of the last predictor step, for the corrector
        self.this_order = None      # the order of the last predictor step; the corrector uses the same p

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the n steps of the schedule and their noise levels; resets the history."""
        self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        c, T = self.config, self.config.num_train_timesteps
        sigma_train = train_sigmas(self.alphas_cumprod).numpy()   # (T,), ascending in t

        if c.use_karras_sigmas:
            # n Karras noise levels (EDM eq. 5) and the training timesteps nearest them
            sigma_min = c.sigma_min if c.sigma_min is not None else sigma_train[0].item()
            sigma_max = c.sigma_max if c.sigma_max is not None else sigma_train[-1].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(sigma_train)).round().astype(np.int64)
            sigma_last = 0.0 if c.final_sigmas_type == "zero" else sigmas[-1]
        else:
            # n evenly spaced timesteps and their noise levels
            timesteps = multistep_timesteps(T, num_inference_steps, c.timestep_spacing, c.steps_offset)
            self.check_integer_timesteps(torch.from_numpy(timesteps))
            sigmas = sigma_train[timesteps]
            sigma_last = 0.0 if c.final_sigmas_type == "zero" else sigma_train[0]

        self.install_schedule(timesteps, sigmas, sigma_last, device)
        # On the timesteps' device, so that step()'s scalar arithmetic runs there: a copy from the CPU to the
        # GPU at every step would wait for the GPU to finish its queue (a sync) each time.
        self.sigmas = self.sigmas.to(device)

    def order_conditions(self, h: torch.Tensor, rks: torch.Tensor, order: int):
        """The linear system R ρ = b of UniPC's order conditions, and e^{hh} - 1 and B(h); hh = -h.
        rks: (order,) with r_order = 1. R: (order, order), R[j, k] = r_k^j; b: (order,)."""
        hh = -h
        h_phi_1 = torch.expm1(hh)           # hh φ_1(hh) = e^{hh} - 1
        h_phi_k = h_phi_1 / hh - 1          # hh φ_2(hh), by φ_{k+1}(z) = (φ_k(z) - 1/k!) / z
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)

        R, b = [], []
        factorial_j = 1
        for j in range(1, order + 1):
            R.append(torch.pow(rks, j - 1))
            b.append(h_phi_k * factorial_j / B_h)   # b_j = j! hh φ_{j+1}(hh) / B(h)
            factorial_j *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_j
        return torch.stack(R), torch.stack(b), h_phi_1, B_h

    def differences(self, i_s0: int, h: torch.Tensor, lambda_s0: torch.Tensor, order: int, device):
        """r_k and D_k = (x_θ(s_k) - x_θ(s0)) / r_k for the order - 1 steps before s0 = step i_s0.
        Returns rks: (order,) with a final 1 appended, and D1s: (B, order - 1, C, H, W) or None."""
        rks, D1s = [], []
        m0 = self.model_outputs[-1]
        for k in range(1, order):
            _, _, lambda_sk = alpha_sigma_lambda(self.sigmas[i_s0 - k].to(device))
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))
        return torch.stack(rks), (torch.stack(D1s, dim=1) if D1s else None)

    def predictor(self, sample: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP-p (sec. 3.2): x at s0 = t_i -> x at t = t_{i+1}, from x_θ at the last `order` steps."""
        device = sample.device
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1].to(device))
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i].to(device))
        h = lambda_t - lambda_s0

        rks, D1s = self.differences(i, h, lambda_s0, order, device)
        R, b, h_phi_1, B_h = self.order_conditions(h, rks, order)
        m0 = self.model_outputs[-1]

        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0     # the first-order (DDIM) part
        if D1s is not None:
            if order == 2:
                rhos_p = torch.ones(1, dtype=sample.dtype, device=device) * 0.5   # UniP-2: ρ = 1/2, as the authors use
            else:
                rhos_p = torch.linalg.solve_ex(R[:-1, :-1], b[:-1]).result.to(device).to(sample.dtype)
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)              # Σ_k ρ_k D_k: (B, C, H, W)
            x_t = x_t - alpha_t * B_h * pred_res
        return x_t.to(sample.dtype)

    def corrector(self, x0_pred_t: torch.Tensor, last_sample: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniC-p (sec. 3.1): redo the last step s0 = t_{i-1} -> t = t_i from `last_sample`, now also using
        x_θ at t itself (`x0_pred_t`, with r = 1), which the next step needs anyway."""
        device = last_sample.device
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i].to(device))
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[i - 1].to(device))
        h = lambda_t - lambda_s0

        rks, D1s = self.differences(i - 1, h, lambda_s0, order, device)   # history still ends at s0
        R, b, h_phi_1, B_h = self.order_conditions(h, rks, order)
        m0 = self.model_outputs[-1]

        if order == 1:
            rhos_c = torch.ones(1, dtype=last_sample.dtype, device=device) * 0.5   # UniC-1: ρ = 1/2
        else:
            # solve_ex: R cannot be singular (the noise levels are distinct, see set_timesteps), and skipping
            # solve's check skips reading its result back from the GPU (a sync) at every step
            rhos_c = torch.linalg.solve_ex(R, b).result.to(device).to(last_sample.dtype)

        x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], D1s) if D1s is not None else 0   # (B, C, H, W)
        D1_t = x0_pred_t - m0                                                   # the new difference, r = 1
        x_t = x_t - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        return x_t.to(last_sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> SchedulerOutput:
        """x_{t_i} -> x_{t_{i+1}}. model_output, sample: (B, C, H, W); timestep: the next of `self.timesteps`.
        `generator` is accepted for a uniform loop; this ODE solver draws no noise."""
        # 1. which step this is, and the data prediction at the current x
        i = self.next_step_index(timestep)
        x0_pred = self.convert_model_output(model_output, sample, i)

        # 2. UniC: correct the current x, the result of the last predictor step, with this new x_θ
        use_corrector = i > 0 and (i - 1) not in self.config.disable_corrector and self.last_sample is not None
        if use_corrector:
            sample = self.corrector(x0_pred, self.last_sample, i, self.this_order)

        # 3. push x_θ onto the history (oldest entry drops out)
        self.remember(x0_pred, timestep)

        # 4. the predictor's order: limited by the history so far (warm-up), by the steps left when
        #    lower_order_final is set, and 1 on a last step to σ = 0 (λ = ∞ there: only order 1 is defined)
        self.this_order = self.step_order(i, lower_order_final=self.config.lower_order_final,
                                          first_order_at_last=self.config.final_sigmas_type == "zero")

        # 5. UniP: predict x at the next timestep
        self.last_sample = sample
        prev_sample = self.predictor(sample, i, self.this_order)

        self.finish_step(i)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
