"""Figures at fixed small sizes: image grids, images per timestep, heat maps, line plots.

Every function returns a matplotlib Figure and keeps figures at fixed small sizes (`PANEL` inches per panel
at `DPI`), so committed notebooks stay small.

Value ranges: float tensors and float arrays are read in the model's range [-1, 1] unless `value_range`
says otherwise; `value_range=None` stretches each panel from its own min to max (for latent channels
and attention maps). PIL images and uint8 arrays are shown as they are.

Headless: outside Jupyter and without a display, matplotlib's Agg backend is selected, so the helpers
work under pytest and in CI.
"""

from __future__ import annotations

import math
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")  # no screen and no notebook: draw into memory

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 72        # dots per inch of every figure: small PNGs in the committed notebooks
PANEL = 1.3     # inches per image panel
MAX_PANELS = 64  # a grid larger than this is a mistake (and a multi-MB notebook)


# --- turning anything into displayable arrays ------------------------------------------------------------

def _one_image(x, value_range) -> np.ndarray:
    """One image (PIL, (H, W), (C, H, W) tensor, (H, W, C) array) -> float array (H, W, 3) or (H, W) in [0, 1]."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 3:
            if x.shape[0] not in (1, 3):
                raise ValueError(f"Expected an image tensor (C, H, W) with C = 1 or 3, found shape {tuple(x.shape)}. "
                                 "Show latent channels with latent_channels_grid, or map them with latents_to_rgb.")
            x = x.permute(1, 2, 0)                                          # (C, H, W) -> (H, W, C)
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]                                                       # (H, W, 1) -> (H, W)
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3):
        raise ValueError(f"Expected an image of shape (H, W), (H, W, 3) or (C, H, W), found {x.shape}.")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if value_range is None:                                                 # stretch min..max to 0..1
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = value_range
    return np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def to_images(images, value_range=(-1, 1)) -> list[np.ndarray]:
    """A batch (B, C, H, W) tensor, a (B, H, W, C) array, or a list of images -> list of float arrays in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)                                               # (B, C, H, W) -> B x (C, H, W)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)                                               # (B, H, W, C) -> B x (H, W, C)
    elif isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        images = [images]
    return [_one_image(x, value_range) for x in images]


def to_uint8(image: np.ndarray, side: int | None = None) -> np.ndarray:
    """A float image in [0, 1] -> uint8 RGB (H, W, 3), resized so its longer side is `side` pixels.

    Small images are enlarged with nearest neighbours (pixels stay crisp), large ones shrunk smoothly.
    """
    if image.ndim == 2:
        image = plt.get_cmap("viridis")(image)[..., :3]                     # (H, W) -> (H, W, 3) colour map
    image = (image * 255).round().astype(np.uint8)
    H, W = image.shape[:2]
    if side is not None and max(H, W) != side:
        scale = side / max(H, W)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))         # PIL sizes are (width, height)
        resample = Image.NEAREST if scale > 1 else Image.LANCZOS
        image = np.asarray(Image.fromarray(image).resize(size, resample))
    return image


# --- grids ----------------------------------------------------------------------------------------------

def _figure(nrows: int, ncols: int, panel: float = PANEL, extra_height: float = 0.0):
    if nrows * ncols > MAX_PANELS:
        raise ValueError(f"A grid of {nrows} x {ncols} panels is more than {MAX_PANELS}: pass fewer images "
                         "(e.g. every k-th timestep, see pick_steps).")
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows + extra_height), dpi=DPI,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _show(ax, image: np.ndarray, cmap: str = "gray") -> None:
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")


def image_grid(images, titles=None, ncols: int | None = None, value_range=(-1, 1), title: str | None = None,
               cmap: str = "gray", panel: float = PANEL):
    """Images side by side (wrapping after `ncols`), each with an optional title. Returns the Figure."""
    images = to_images(images, value_range)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"Got {len(titles)} titles for {len(images)} images; pass one title per image.")
    ncols = ncols or min(len(images), 8)
    nrows = math.ceil(len(images) / ncols)
    fig, axes = _figure(nrows, ncols, panel, extra_height=0.3 if title else 0.0)
    for i, image in enumerate(images):
        ax = axes.flat[i]
        _show(ax, image, cmap)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig


def pick_steps(num_steps: int, k: int) -> list[int]:
    """`k` indices spread evenly over 0 .. num_steps-1, always with the first and the last."""
    if num_steps <= k:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (k - 1)) for i in range(k)})


def steps_grid(rows: dict, timesteps, num_cols: int = 6, value_range=(-1, 1), cmap: str = "viridis",
               panel: float = PANEL):
    """One row per name in `rows` (e.g. {"x_t": [...], "predicted x0": [...]}), one column per chosen step.

    Each value of `rows` holds one image per timestep (a (S, C, H, W) tensor or a list); `num_cols` of the
    S steps are shown, first and last included, titled with their timestep.
    """
    timesteps = [int(t) if float(t).is_integer() else round(float(t), 1) for t in torch.as_tensor(timesteps).tolist()]
    per_row = {name: to_images(images, value_range) for name, images in rows.items()}
    for name, images in per_row.items():
        if len(images) != len(timesteps):
            raise ValueError(f"Row {name!r} has {len(images)} images but there are {len(timesteps)} timesteps; "
                             "pass one image per timestep.")
    cols = pick_steps(len(timesteps), num_cols)
    fig, axes = _figure(len(per_row), len(cols), panel)
    for r, (name, images) in enumerate(per_row.items()):
        for c, i in enumerate(cols):
            ax = axes[r, c]
            _show(ax, images[i], cmap)
            if r == 0:
                ax.set_title(f"t={timesteps[i]}", fontsize=8)
        axes[r, 0].text(-0.08, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=8, rotation=90)
    fig.tight_layout(pad=0.3)
    return fig


def heatmap(matrix, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "RdBu_r",
            size: tuple[float, float] = (4.0, 2.2)):
    """A 2-D tensor as a colour image with a colour bar (e.g. timestep embeddings: rows t, columns features)."""
    matrix = torch.as_tensor(matrix).detach().float().cpu()
    if matrix.ndim != 2:
        raise ValueError(f"heatmap expects a 2-D matrix, found shape {tuple(matrix.shape)}.")
    fig, ax = plt.subplots(figsize=size, dpi=DPI)
    shown = ax.imshow(matrix.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout(pad=0.4)
    return fig


def line_plot(series: dict, xs=None, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
              size: tuple[float, float] = (4.0, 2.2), marker: str | None = None, xticklabels=None):
    """One line per entry of `series` ({"loss": values}); `xticklabels` names the points (e.g. layer names)."""
    fig, ax = plt.subplots(figsize=size, dpi=DPI)
    for name, ys in series.items():
        ys = torch.as_tensor(ys).detach().double().cpu().numpy()
        x = np.arange(len(ys)) if xs is None else np.asarray(xs)
        ax.plot(x, ys, label=name, marker=marker, markersize=3)
    if logy:
        ax.set_yscale("log")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig
