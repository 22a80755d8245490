"""What the two multistep solvers share: DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095) and
UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867). Their `step`s differ and stay in their own files;
the bookkeeping around a step is the same and lives here, once:

- the inference schedule: `multistep_timesteps` (n timesteps, the final step going to σ = 0, not to t = 0),
  then `install_schedule` (timesteps, σ's, a check that no step has zero length, a fresh history);
- the history: `model_outputs` (x_θ at the last `solver_order` steps, oldest first), `timestep_list`,
  `lower_order_nums` (steps taken so far, capped at `solver_order`), all plain attributes to inspect;
- `step_order`: the order each step can use (lower while the history fills, and at the end);
- `next_step_index`, `convert_model_output` (x_θ from ε, x_0 or v) and `add_noise` at the schedule's σ's.

A multistep method of order p needs the p previous model outputs, so step i uses min(p, i + 1) of them:
the first step has only its own and is DDIM (order 1), as DPM-Solver++(2M) starts (Algorithm 2).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SchedulerBase
from .sigmas import alpha_sigma_from, vp_coefficients


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


def check_distinct_noise_levels(sigmas: torch.Tensor, timesteps: torch.Tensor, spacing: str) -> None:
    """Two equal noise levels in a row make a step of length h = 0, which the multistep formulas divide by."""
    n = len(timesteps)
    same = (sigmas[1:n] == sigmas[: n - 1]).nonzero()
    if len(same):
        i = int(same[0])
        raise ValueError(f"{n} steps with timestep_spacing={spacing!r} repeat timestep {int(timesteps[i])} (steps {i} "
                         f"and {i + 1}), a step of zero length. Use fewer steps or timestep_spacing='trailing'.")


class MultistepScheduler(SchedulerBase):
    """Base of DPMSolverMultistepScheduler and UniPCMultistepScheduler; their Config has `solver_order`,
    `prediction_type` and `timestep_spacing`. `timesteps`: LongTensor (n,); `sigmas`: float32 (n + 1,)."""

    order = 1  # one model evaluation per step

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
        self.lower_order_nums = 0   # steps taken so far, up to solver_order: the first steps lack history
        self.step_index = None      # the index in `timesteps` of the next step

    def install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, sigma_last: float, device=None) -> None:
        """Set `timesteps` (n,) and `sigmas` (n + 1,): the n noise levels and, last, the one the final step
        reaches (0: a clean image). Refuses a step of zero length; starts a fresh history."""
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))   # (n + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)            # (n,)
        check_distinct_noise_levels(self.sigmas, self.timesteps, self.config.timestep_spacing)
        self.reset_history()

    def next_step_index(self, timestep) -> int:
        """Which step of `self.timesteps` this call of step() is. The first call looks `timestep` up (a
        loop may start mid-schedule, as image-to-image does); later calls count on, so the history stays
        aligned even where Karras rounding repeats a timestep, and a timestep out of order is an error."""
        if self.step_index is None:
            return self.step_index_of(timestep)  # errors if set_timesteps was not called or t is not in it
        i, n = self.step_index, len(self.timesteps)
        if i >= n:
            raise RuntimeError(f"All {n} steps of the schedule were taken. Call set_timesteps(...) again to start a "
                               "new sampling loop.")
        if self.timesteps.device.type != "cpu" or (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
            return i  # checked on the CPU only: reading a GPU value (.item()) would wait for the GPU at every step
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        expected = self.timesteps[i].item()
        if t != expected:
            raise ValueError(f"step() expected timestep {expected} (step {i} of {n}), found {t}. A multistep solver "
                             "visits scheduler.timesteps in order; call set_timesteps(...) to start over.")
        return i

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The data prediction x_θ(x_t, t) that both solvers integrate, from any parametrisation. (B, C, H, W)."""
        self.check_step_shapes(model_output, sample)
        alpha_t, sigma_t = alpha_sigma_from(self.sigmas[i])
        if self.config.prediction_type == "epsilon":    # x_t = α_t x_0 + σ_t ε
            return (sample - sigma_t * model_output) / alpha_t
        if self.config.prediction_type == "sample":
            return model_output
        return alpha_t * sample - sigma_t * model_output  # "v_prediction": v = α_t ε - σ_t x_0 (Salimans & Ho 2022)

    def remember(self, x0_pred: torch.Tensor, timestep) -> None:
        """Push x_θ at this step onto the history; the oldest entry drops out."""
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        self.timestep_list = self.timestep_list[1:] + [timestep]

    def step_order(self, i: int, lower_order_final: bool, first_order_at_last: bool) -> int:
        """The order of step i of n: at most `solver_order`, and at most the outputs seen so far (i + 1 after a
        fresh start: the warm-up). With `lower_order_final` the last steps drop to the steps left (n - i), which
        the DPM-Solver authors find more stable for few steps; `first_order_at_last`: the last step is order 1
        (it lands on σ = 0, where λ = ∞ and only the first-order update is defined)."""
        n = len(self.timesteps)
        order = min(self.config.solver_order, self.lower_order_nums + 1)
        if lower_order_final:
            order = min(order, n - i)
        if i == n - 1 and first_order_at_last:
            order = 1
        return order

    def finish_step(self, i: int) -> None:
        """After step i: one more output in the history (up to solver_order), and the next step is i + 1."""
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self.step_index = i + 1

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x_0 + σ_t ε. After set_timesteps, a t of the schedule gets exactly the noise level σ_i that
        step() assumes there (with Karras sigmas that is not ᾱ of the rounded t); else ᾱ_t of training.
        x_0, ε: (B, ...); timesteps: (B,)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self.sigmas is None or not all((self.timesteps.cpu() == t).any() for t in timesteps.cpu()):
            return super().add_noise(original_samples, noise, timesteps)
        step_indices = [self.step_index_of(t) for t in timesteps]
        sigma = self.sigmas[step_indices].to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigma.view((-1,) + (1,) * (original_samples.ndim - 1))    # (B, 1, 1, 1)
        alpha_t, sigma_t = alpha_sigma_from(sigma)
        return alpha_t * original_samples + sigma_t * noise
