"""Noise levels σ: the variable of the σ-parametrised samplers (Euler, Euler ancestral, DPM-Solver++, UniPC).

A DDPM-trained model sees the variance-preserving x_t = α_t x_0 + σ_t ε with α_t = sqrt(ᾱ_t),
σ_t = sqrt(1 - ᾱ_t) (Ho et al. 2020, eq. 4). Dividing by α_t gives x_t / α_t = x_0 + σ ε, the "variance
exploding" form of Karras et al. 2022 (EDM, https://arxiv.org/abs/2206.00364, sec. 2), whose one noise level is

    σ = σ_t / α_t = sqrt((1 - ᾱ_t) / ᾱ_t),       and back:  α_t = 1 / sqrt(σ² + 1),  σ_t = σ α_t.

The samplers choose their steps as σ's, then tell the model the training timestep t that has that σ.
This file holds those conversions, each once:

| function           | what                                                   | source                  |
|--------------------|--------------------------------------------------------|-------------------------|
| `train_sigmas`     | σ_t of each training timestep t = 0..T-1               | EDM sec. 2              |
| `sigmas_at`        | σ at fractional timesteps (linear in t)                | diffusers' Euler        |
| `sigma_to_t`       | the fractional t whose σ_t is σ (linear in log σ)      | k-diffusion             |
| `karras_sigmas`    | n σ's from σ_max to σ_min, spaced in σ^(1/ρ)           | EDM eq. 5               |
| `vp_coefficients`  | α_t, σ_t and λ_t of each training timestep, from ᾱ_t    | Lu et al. 2022, sec. 2  |
| `alpha_sigma_from` | α_t, σ_t from σ                                        | EDM sec. 2              |
| `alpha_sigma_lambda` | α_t, σ_t and λ_t = log(α_t / σ_t) from σ             | Lu et al. 2022, sec. 2  |

The numpy ones compute exactly as diffusers does (numpy, not torch), so that timesteps agree to the bit.
"""

from __future__ import annotations

import numpy as np
import torch


def train_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for t = 0..T-1, ascending in t, float32, shape (T,)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigmas_at(timesteps: np.ndarray, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ at fractional timesteps, linearly interpolated in t between the training σ_t. (n,) -> (n,)."""
    sigmas = train_sigmas(alphas_cumprod).numpy()
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each noise level σ: linear interpolation of log σ over the
    training table `log_sigmas` (T,), ascending in t (k-diffusion's rule). The model is then told this t."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]                              # (T, n)
    # the last training step whose log σ is <= this one, and the step after it
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, i = 0..n-1.
    Evenly spaced in σ^(1/ρ), so that more steps are spent at low noise; ρ = 7 as in the paper. (n,)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def vp_coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t) and the log-SNR λ_t = log α_t - log σ_t (Lu et al. 2022, sec. 2),
    the variables of the multistep solvers (DPM-Solver++, UniPC). All (T,)."""
    alpha_t = torch.sqrt(alpha_bar)
    sigma_t = torch.sqrt(1 - alpha_bar)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def alpha_sigma_from(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP coefficients of the EDM noise level σ = σ_t / α_t: α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α_t, σ_t and λ_t = log α_t - log σ_t, half the log-SNR (Lu et al. 2022, https://arxiv.org/abs/2206.00927,
    sec. 2), at the EDM noise level σ: the variables of the multistep solvers' updates."""
    alpha_t, sigma_t = alpha_sigma_from(sigma)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)
