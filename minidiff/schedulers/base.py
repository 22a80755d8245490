"""What every minidiff scheduler shares: the beta schedule, loading a config, `add_noise`, the output.

Names follow the DDPM paper (Ho et al. 2020, https://arxiv.org/abs/2006.11239) in ASCII:

| here          | paper   | diffusers / scheduler_config.json |
|---------------|---------|-----------------------------------|
| `beta`        | β_t     | `betas`                           |
| `alpha`       | α_t = 1 - β_t | `alphas`                    |
| `alpha_bar`   | ᾱ_t = ∏_{s<=t} α_s | `alphas_cumprod`       |
| `sigma`       | σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) (the EDM / k-diffusion noise level) | `sigmas` |

A scheduler is built from a dict of config values (`scheduler_config.json`), exactly like diffusers:
`from_pretrained(folder, subfolder="scheduler")` or `from_config(other_scheduler.config)`. Keys a
scheduler does not use are ignored (the tutorials build a UniPC scheduler from SD's PNDM config) and its
own defaults apply where the config is silent. Passing an unknown keyword to the constructor directly
is an error, since there it is a typo.

Like diffusers, a scheduler's config remembers which values were *given* (by the file, the caller or
overrides), unknown keys included, and `from_config(other.config)` passes on only those: SD's PNDM config
leaves `timestep_spacing` at PNDM's default "leading", so `EulerDiscreteScheduler.from_config(pndm.config)`
uses Euler's own default "linspace", while SD's explicit `clip_sample: false` (a key PNDM ignores)
still reaches a DDIM scheduler built from it. See `given_values`. The config is a frozen dataclass that is
also a read-only dict, so that diffusers' schedulers can be built from it too (see config.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..core.config import config_from_dict, config_to_dict, read_json
from ..core.hub import resolve_file
from .config import given_values

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


@dataclass
class SchedulerOutput:
    """`prev_sample`: x_{t-1}, (B, C, H, W). `pred_original_sample`: the model's estimate of x_0, where the
    method defines one."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> torch.Tensor:
    """β_1..β_T, float32, shape (T,)."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas has {betas.numel()} values; expected num_train_timesteps={T}.")
        return betas
    if beta_schedule == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(β)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"Unknown beta_schedule {beta_schedule!r}; expected one of 'linear', 'scaled_linear', "
        "'squaredcos_cap_v2', or trained_betas."
    )


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """The n inference timesteps, descending, float64, in one of the three spacings of Lin et al. 2024,
    Table 2 (https://arxiv.org/abs/2305.08891). "linspace" is left unrounded: DDPM-type schedulers round it,
    Euler-type ones keep the fractions.

    Computed with numpy exactly as diffusers does: torch.linspace/arange differ in the last bit, which moves
    some .5 roundings and even the length of the "trailing" range (diffusers gives n+1 timesteps for some n,
    e.g. 61 of 1000, and so does this function).
    """
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":   # evenly from 0 to T-1, both ends included
        return np.linspace(0, T - 1, n)[::-1].copy()
    if timestep_spacing == "leading":    # 0, k, 2k, ... with k = T // n, shifted by steps_offset
        step_ratio = T // n
        return (np.arange(0, n) * step_ratio)[::-1].astype(np.float64) + steps_offset
    if timestep_spacing == "trailing":   # T-1, T-1-k, ... with k = T / n: always starts at the noisiest step
        step_ratio = T / n
        return np.round(np.arange(T, 0, -step_ratio)) - 1
    raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; expected 'linspace', 'leading' or 'trailing'.")


def x0_and_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar_t):
    """x_t and the model's output at t -> (x̂_0, ε), each (B, C, H, W), whatever the model predicts.

    All of minidiff's schedulers work on the variance-preserving x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε
    (Ho et al. 2020, eq. 4); the config's `prediction_type` says which of ε, x_0 ("sample") or
    v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, "v_prediction") the model outputs.
    """
    beta_bar_t = 1 - alpha_bar_t                                       # 1 - ᾱ_t
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - beta_bar_t ** 0.5 * eps) / alpha_bar_t ** 0.5
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_bar_t ** 0.5 * x0) / beta_bar_t ** 0.5
    else:  # "v_prediction"
        x0 = alpha_bar_t ** 0.5 * sample - beta_bar_t ** 0.5 * model_output
        eps = alpha_bar_t ** 0.5 * model_output + beta_bar_t ** 0.5 * sample
    return x0, eps


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """x_0 from the model output at timestep t, for schedulers whose step() returns no x_0 (PNDM,
    DPM-Solver, UniPC). They all work on the variance-preserving x_t of Ho et al. 2020, eq. 4:

        x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   =>   x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    """
    t = t.long() if isinstance(t, torch.Tensor) else int(t)
    # Indexing with the tensor t keeps the computation on the device: no GPU sync.
    alpha_bar_t = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[t]
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    return x0_and_eps(prediction_type, model_output, sample, alpha_bar_t)[0]


class SchedulerBase:
    """Base of minidiff's schedulers. A subclass defines a frozen dataclass `Config` and its methods."""

    Config: type = None
    order: int = 1  # model evaluations per step (PNDM's PRK warm-up and Heun use more)

    def __init__(self, **config):
        self.config = config_from_dict(self.Config, config, strict=True, source=type(self).__name__)
        self.remember_given(config)
        self.num_inference_steps = None
        self.timesteps = None
        self.setup()

    def setup(self) -> None:
        """Compute the training-time noise schedule from `self.config`; subclasses extend this."""
        c = self.config
        self.betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                c.trained_betas)
        self.alphas = 1.0 - self.betas                        # α_t = 1 - β_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)   # ᾱ_t = ∏_{s<=t} α_s
        self.init_noise_sigma = 1.0                           # std of x_T; Euler-type schedulers use σ_max

    # --- building ---------------------------------------------------------------------------------
    def remember_given(self, values: dict) -> None:
        """Keep the explicitly given values on the (frozen) config, for `from_config` of another scheduler."""
        self.config.set_given({k: v for k, v in values.items() if not k.startswith("_")})

    @classmethod
    def from_config(cls, config, **overrides):
        """From a dict (`scheduler_config.json`) or another scheduler's `.config`: the values it gives
        explicitly (see `given_values`) plus `overrides`; keys this scheduler does not use are ignored
        but kept, so that they reach the next scheduler built from this one's config. A model's config
        (`pipe.unet.config`) is refused: it would silently give the default betas."""
        values = given_values(config)
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls.Config)}
        scheduler = cls(**{k: v for k, v in values.items() if k in known})
        scheduler.remember_given(values)
        return scheduler

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, subfolder: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool | None = None, **overrides):
        """From `scheduler_config.json` in a folder, bundled checkpoint or hub repo (any scheduler's file)."""
        path = resolve_file(path_or_repo_id, SCHEDULER_CONFIG_NAME, subfolder=subfolder, cache_dir=cache_dir,
                            local_files_only=local_files_only)
        return cls.from_config(read_json(path), **overrides)

    def save_config(self, folder: str) -> None:
        """Write `folder/scheduler_config.json` (the folder is made if missing), as diffusers' save_config does:
        every value of the config, and the given keys this scheduler ignores (SD's clip_sample on PNDM), so
        that a scheduler built from the file later gets them too."""
        if os.path.isfile(folder):
            raise NotADirectoryError(f"save_config writes {SCHEDULER_CONFIG_NAME} into a folder; {folder} is a file. "
                                     "Pass the folder to write it in.")
        values = config_to_dict(self.config, type(self).__name__)
        values.update({k: v for k, v in given_values(self.config).items() if k not in values})
        # Serialised before the file is opened: a value JSON cannot hold leaves no half-written file.
        text = json.dumps(values, indent=2)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, SCHEDULER_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(text)

    def save_pretrained(self, folder: str) -> None:
        """A scheduler has no weights: saving it is saving its config, as in diffusers."""
        self.save_config(folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # --- checks shared by every scheduler -----------------------------------------------------------
    def check_num_inference_steps(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                or not 1 <= num_inference_steps <= T):
            raise ValueError(
                f"num_inference_steps must be an int between 1 and num_train_timesteps={T}; "
                f"found {num_inference_steps!r}."
            )

    def check_integer_timesteps(self, timesteps: torch.Tensor) -> None:
        """Schedulers that index ᾱ_t by t need every t in [0, T-1]; some spacings step outside it."""
        T = self.config.num_train_timesteps
        if len(timesteps) and (timesteps.min() < 0 or timesteps.max() > T - 1):
            raise ValueError(
                f"{self.num_inference_steps} steps with timestep_spacing={self.config.timestep_spacing!r} and "
                f"steps_offset={getattr(self.config, 'steps_offset', 0)} give timesteps from "
                f"{int(timesteps.min())} to {int(timesteps.max())}, outside the trained range [0, {T - 1}]. "
                "Use fewer steps or another timestep_spacing (e.g. 'trailing')."
            )

    def check_step_shapes(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        """step() combines model_output and sample elementwise: a shape that merely broadcasts (a guidance
        batch of 2B outputs for B samples) would silently give another batch."""
        if model_output.shape != sample.shape:
            raise ValueError(f"{type(self).__name__}.step() expects model_output of the shape of sample, "
                             f"{tuple(sample.shape)}; found {tuple(model_output.shape)}. With classifier-free "
                             "guidance, combine the two halves (uncond + scale * (cond - uncond)) before step().")

    def check_train_timesteps(self, timesteps) -> None:
        """add_noise indexes ᾱ_t by t: each t must be a whole number in [0, T-1] (a negative one would wrap
        around to the noisiest steps, a fraction would be truncated)."""
        T = self.config.num_train_timesteps
        t = torch.as_tensor(timesteps)
        whole = not t.is_floating_point() or bool((t == t.round()).all())
        if t.dtype == torch.bool or not whole or bool((t < 0).any()) or bool((t > T - 1).any()):
            shown = t.reshape(-1)[:6].tolist()
            raise ValueError(f"add_noise takes training timesteps, whole numbers in [0, {T - 1}]; found {shown}. "
                             "Draw them with torch.randint(0, num_train_timesteps, (B,)) or take them from "
                             "scheduler.timesteps.")

    def step_index_of(self, timestep) -> int:
        """The index of `timestep` in `self.timesteps`, or a clear error."""
        if self.timesteps is None or self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.step() was called before set_timesteps(num_inference_steps).")
        t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            shown = self.timesteps[:6].tolist()
            raise ValueError(f"Timestep {t} is not in this scheduler's schedule {shown}...; "
                             "step() takes the values of scheduler.timesteps.")
        # A timestep can repeat (PNDM's PRK warm-up, Heun): the scheduler tracks its own position then.
        return int(hits[0])

    # --- the forward process q(x_t | x_0), for training and image-to-image -------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (Ho et al. 2020, eq. 4). x_0, ε: (B, ...), t: (B,)."""
        self.check_train_timesteps(timesteps)
        alpha_bar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).long().reshape(-1)
        alpha_bar_t = alpha_bar[timesteps]                                         # (B,)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)                         # (B, 1, 1, 1)
        return alpha_bar_t.sqrt().view(shape) * original_samples + (1 - alpha_bar_t).sqrt().view(shape) * noise

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Most schedulers feed x_t to the model unchanged; Euler-type ones divide by sqrt(σ² + 1)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
