"""Latents as pictures: each channel per timestep, and a cheap linear preview (4 channels -> RGB, no decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator

from ..core.photos import SAMPLE_PHOTOS, sample_photo
from .figures import FONT, TITLE_FONT, _figure, _lines_height, _one_image, _show, _timestep_label, colorbar, pick_steps, wrap

# The approximate linear map from Stable Diffusion v1 latents (already multiplied by the VAE's
# scaling_factor 0.18215, i.e. what the UNet sees) to RGB in [-1, 1], fitted by the community
# (ComfyUI's `latent_formats.SD15`, after keturn's 2022 estimate). Rows: latent channels; columns: R, G, B.
SD_V1_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_channels_grid(latents, timesteps, num_rows: int = 5, rgb_factors=None, rgb_bias=None,
                         panel: float = 1.0):
    """Latents over time: one row per chosen timestep, one column per latent channel (+ an RGB preview).

    `latents`: (S, C, h, w) or a list of S tensors (C, h, w) / (1, C, h, w). Each channel is drawn with a
    diverging colour map centred on zero (blue negative, white 0, red positive), one symmetric scale per row,
    shown by the row's colour bar. With `rgb_factors` (see `latents_to_rgb`) a last column shows the cheap
    RGB preview.
    """
    latents = torch.stack([torch.as_tensor(x).detach().float().cpu().reshape(x.shape[-3:]) for x in latents])
    S, C, h, w = latents.shape
    timesteps = torch.as_tensor(timesteps).tolist()
    if len(timesteps) != S:
        raise ValueError(f"Got {S} latents but {len(timesteps)} timesteps; pass one latent per timestep.")
    rows = pick_steps(S, num_rows)
    ncols = C + (1 if rgb_factors is not None else 0)
    shown_t = [_timestep_label(timesteps[i]) for i in rows]
    description = (f"Figure: the {C} latent channels{' and their RGB preview' if rgb_factors is not None else ''} "
                   f"(columns) at t = {', '.join(shown_t)} (rows); blue negative, red positive, a colour bar per row")
    fig, axes = _figure(len(rows), ncols, panel, extra_height=_lines_height([wrap("RGB preview", panel)]),
                        extra_width=0.6 * panel, description=description)
    for r, i in enumerate(rows):
        scale = float(latents[i].abs().max().clamp_min(1e-8))
        for c in range(C):
            shown = axes[r, c].imshow(latents[i, c].numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale,
                                      interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(f"channel {c}", fontsize=TITLE_FONT)
        colorbar(fig, shown, axes[r, :C], shrink=0.8).ax.yaxis.set_major_locator(MaxNLocator(3, symmetric=True))
        if rgb_factors is not None:
            preview = latents_to_rgb(latents[i : i + 1], rgb_factors, rgb_bias)[0]  # (3, h, w) in [0, 1]
            _show(axes[r, C], _one_image(preview, (0, 1)))
            if r == 0:
                axes[r, C].set_title(wrap("RGB preview", panel), fontsize=TITLE_FONT)
        axes[r, 0].text(-0.08, 0.5, f"t={shown_t[r]}", transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=FONT, rotation=90)
    return fig


def latents_to_rgb(latents: torch.Tensor, factors=SD_V1_LATENT_RGB, bias=None) -> torch.Tensor:
    """(B, C, h, w) latents (as the UNet sees them) -> (B, 3, h, w) in [0, 1], with no VAE decoder.

    rgb = latents^T @ factors + bias, per pixel; the result is in [-1, 1] and mapped to [0, 1].
    Costs one tiny matrix product instead of the decoder: good enough to watch the picture form.
    """
    factors = torch.as_tensor(factors, dtype=torch.float32)                          # (C, 3)
    latents = latents.detach().float().cpu()
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"Expected latents (B, {factors.shape[0]}, h, w) to match the {tuple(factors.shape)} "
                         f"factors, found {tuple(latents.shape)}. Fit factors for this VAE with fit_latent_rgb.")
    rgb = torch.einsum("bchw,cd->bdhw", latents, factors)                            # (B, C, h, w) -> (B, 3, h, w)
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
    return ((rgb + 1) / 2).clamp(0, 1)


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of the linear preview for any VAE: latents (N, C, h, w), images (N, 3, H, W) in [-1, 1].

    Each image is shrunk to h x w (area average); then [latent, 1] @ [factors; bias] ~ rgb is solved over all
    pixels. Returns factors (C, 3) and bias (3,) for `latents_to_rgb`.
    """
    latents = latents.detach().float().cpu()
    N, C, h, w = latents.shape
    small = F.adaptive_avg_pool2d(images.detach().float().cpu(), (h, w))             # (N, 3, H, W) -> (N, 3, h, w)
    X = latents.permute(0, 2, 3, 1).reshape(-1, C)                                   # (N*h*w, C)
    X = torch.cat([X, torch.ones(X.shape[0], 1)], dim=1)                             # (N*h*w, C+1): a bias column
    Y = small.permute(0, 2, 3, 1).reshape(-1, 3)                                     # (N*h*w, 3)
    solution = torch.linalg.lstsq(X.double(), Y.double()).solution.float()           # (C+1, 3)
    return solution[:C], solution[C]


@torch.no_grad()
def fit_latent_rgb_to_vae(vae, images: torch.Tensor | None = None, size: int | None = None,
                          photos=SAMPLE_PHOTOS) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear preview for any VAE: encode `images` (N, 3, H, W) in [-1, 1], scale, and `fit_latent_rgb`.

    Without `images`, scikit-image's sample photos at `size` pixels (default: the VAE's `sample_size`).
    Fit on images like the ones the VAE was trained on. Returns factors (C, 3), bias (3,).
    """
    if images is None:
        size = size or vae.config.sample_size
        images = torch.cat([sample_photo(name, size) for name in photos])            # (N, 3, size, size)
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()        # (N, C, H/f, W/f): f the VAE's factor
    return fit_latent_rgb(latents * vae.config.scaling_factor, images)
