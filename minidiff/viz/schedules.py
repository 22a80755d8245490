"""Noise schedules as plots: ᾱ, SNR and σ over the training timesteps or over the sampling steps, and
where each sampler puts its timesteps. The numbers come from the schedulers (`schedulers/compare.py`)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..schedulers.compare import schedule_table
from .figures import FONT, TITLE_FONT, _brief, integer_ticks, new_figure

PANEL = 2.4                        # inches per plot
FIGSIZE = (3 * PANEL, PANEL)       # one small row of three plots; keeps committed notebook outputs small


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    integer_ticks(ax)                                                                 # steps and t are whole


def plot_training_schedules(schedulers: dict, panel: float = PANEL):
    """ᾱ_t, the signal-to-noise ratio SNR = ᾱ/(1-ᾱ) and σ = sqrt((1-ᾱ)/ᾱ) over the training timesteps.

    `schedulers`: {"name": scheduler}; each needs `.alphas_cumprod` (every minidiff scheduler has it).
    """
    description = f"Line plots of alpha_bar_t, SNR_t (log) and sigma_t (log) over the timesteps t for {_brief(schedulers)}"
    fig, axes = new_figure(1, 3, (3 * panel, panel), description)
    axes = axes[0]
    for name, scheduler in schedulers.items():
        alpha_bar = scheduler.alphas_cumprod.double()                                # (T,)
        t = np.arange(len(alpha_bar))
        snr = alpha_bar / (1 - alpha_bar)
        axes[0].plot(t, alpha_bar.numpy(), label=name)
        axes[1].semilogy(t, snr.numpy(), label=name)
        axes[2].semilogy(t, (1 / snr).sqrt().numpy(), label=name)
    for ax, label in zip(axes, ("alpha_bar_t", "SNR_t", "sigma_t")):
        _style(ax, label, "t")
    axes[0].legend(fontsize=FONT)
    return fig


def plot_timesteps(schedulers: dict, num_inference_steps: int, panel: float = PANEL):
    """Where each scheduler samples: one row of dots per scheduler, its `timesteps` after set_timesteps.

    The schedulers are copied, so the ones passed in are left as they were.
    """
    names = list(schedulers)
    description = f"Dot plot: the {num_inference_steps} timesteps at which {_brief(names)} sample, one row each"
    fig, axes = new_figure(1, 1, (3 * panel, 0.4 * len(names) + 0.9), description)
    ax = axes[0, 0]
    for row, name in enumerate(names):
        scheduler = copy.deepcopy(schedulers[name])
        scheduler.set_timesteps(num_inference_steps)
        t = torch.as_tensor(scheduler.timesteps).double().numpy()
        ax.plot(t, np.full_like(t, row), "o", markersize=4)
    ax.set_yticks(range(len(names)), names, fontsize=FONT)
    _style(ax, "", "timestep t")
    ax.invert_yaxis()
    return fig


def plot_sampling_schedules(config, schedulers, num_inference_steps: int):
    """ᾱ, log-SNR and σ against the step index for each scheduler class, in one small figure. Returns the
    matplotlib Figure (assign it, `fig = plot_sampling_schedules(...)`, so Jupyter shows it once).
    (`plot_training_schedules` draws the training schedule over all T timesteps instead.)"""
    table = schedule_table(config, schedulers, num_inference_steps)
    description = (f"Line plots of alpha_bar, log SNR and sigma (log) against the step, {num_inference_steps} "
                   f"steps, for {_brief(s.name for s in table)}")
    fig, axes = new_figure(1, 3, FIGSIZE, description)
    axes = axes[0]
    panels = [("alpha_bar", "ᾱ (signal kept)", "linear"), ("log_snr", "log SNR = log ᾱ/(1-ᾱ)", "linear"),
              ("sigma", "σ (EDM noise level)", "log")]
    for ax, (field, title, yscale) in zip(axes, panels):
        for schedule in table:
            ax.plot(getattr(schedule, field), marker="o", markersize=3, linewidth=1, label=schedule.name)
        _style(ax, title, "step")
        ax.set_yscale(yscale)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=FONT)  # 7 names: beside
    return fig
