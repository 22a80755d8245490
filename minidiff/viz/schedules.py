"""Noise schedules as plots: ᾱ, SNR and σ over the training timesteps or over the sampling steps, and
where each sampler puts its timesteps. The numbers come from the schedulers (`schedulers/compare.py`)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..schedulers.compare import schedule_table
from .figures import DPI, plt

PANEL = 2.4                        # inches per plot
FIGSIZE = (3 * PANEL, PANEL)       # one small row of three plots; keeps committed notebook outputs small

def plot_training_schedules(schedulers: dict, panel: float = PANEL):
    """ᾱ_t, the signal-to-noise ratio SNR = ᾱ/(1-ᾱ) and σ = sqrt((1-ᾱ)/ᾱ) over the training timesteps.

    `schedulers`: {"name": scheduler}; each needs `.alphas_cumprod` (every minidiff scheduler has it).
    """
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel, panel), dpi=DPI)
    for name, scheduler in schedulers.items():
        alpha_bar = scheduler.alphas_cumprod.double()                                # (T,)
        t = np.arange(len(alpha_bar))
        snr = alpha_bar / (1 - alpha_bar)
        axes[0].plot(t, alpha_bar.numpy(), label=name)
        axes[1].semilogy(t, snr.numpy(), label=name)
        axes[2].semilogy(t, (1 / snr).sqrt().numpy(), label=name)
    for ax, label in zip(axes, ("alpha_bar_t", "SNR_t", "sigma_t")):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("t", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig


def plot_timesteps(schedulers: dict, num_inference_steps: int, panel: float = PANEL):
    """Where each scheduler samples: one row of dots per scheduler, its `timesteps` after set_timesteps.

    The schedulers are copied, so the ones passed in are left as they were.
    """
    names = list(schedulers)
    fig, ax = plt.subplots(figsize=(3 * panel, 0.35 * len(names) + 0.8), dpi=DPI)
    for row, name in enumerate(names):
        scheduler = copy.deepcopy(schedulers[name])
        scheduler.set_timesteps(num_inference_steps)
        t = torch.as_tensor(scheduler.timesteps).double().numpy()
        ax.plot(t, np.full_like(t, row), "o", markersize=3)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("timestep t", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    fig.tight_layout(pad=0.4)
    return fig


def plot_sampling_schedules(config, schedulers, num_inference_steps: int):
    """ᾱ, log-SNR and σ against the step index for each scheduler class, in one small figure. Returns the
    matplotlib Figure (assign it, `fig = plot_sampling_schedules(...)`, so Jupyter shows it once).
    (`plot_training_schedules` draws the training schedule over all T timesteps instead.)"""
    table = schedule_table(config, schedulers, num_inference_steps)
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    panels = [("alpha_bar", "ᾱ (signal kept)", "linear"), ("log_snr", "log SNR = log ᾱ/(1-ᾱ)", "linear"),
              ("sigma", "σ (EDM noise level)", "log")]
    for ax, (field, title, yscale) in zip(axes, panels):
        for schedule in table:
            ax.plot(getattr(schedule, field), marker="o", markersize=2.5, linewidth=1, label=schedule.name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale(yscale)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig
