"""Attention maps as pictures: per-token maps laid over the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..control.attention_maps import average_maps
from .figures import PANEL, TITLE_FONT, _brief, _figure, _lines_height, _show, check_cmap, colorbar, to_images, wrap

def aggregate_cross_attention(probs: list, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Cross-attention probabilities of several layers -> one map per token, detached, on the CPU: (B, M, h, w).

    `probs`: tensors (B, heads, N, M) from `Attention.attention_probs`, N = h_l * w_l positions of that
    layer's feature map, M text tokens. Heads are averaged, each map is resized to the latent size
    `latent_hw` (bilinear) and the layers are averaged: `minidiff.control.attention_maps.average_maps`.
    """
    return average_maps([p.detach().cpu() for p in probs], latent_hw)


def attention_overlay(image, maps, labels, value_range=(-1, 1), alpha: float = 0.55, panel: float = PANEL,
                      cmap: str = "magma"):
    """The image, then one panel per map laid over a gray copy of it. maps: (K, h, w), labels: K strings.

    Each map is stretched from its own min to its max (`cmap`: dark low, bright high), which the colour
    bar beside the maps says.
    """
    check_cmap(cmap)
    base = to_images(image, value_range)[0]                                          # (H, W, 3) in [0, 1]
    H, W = base.shape[:2]
    gray = base.mean(axis=-1) if base.ndim == 3 else base                            # (H, W)
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.ndim != 3 or len(labels) != maps.shape[0]:
        raise ValueError(f"Expected maps (K, h, w) and K labels, found maps {tuple(maps.shape)} and "
                         f"{len(labels)} labels.")
    big = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # (K, H, W)
    description = (f"Figure: the image, then its attention maps for {_brief(repr(str(label)) for label in labels)} "
                   f"laid over it ({cmap}: bright = most attention, each map stretched to its own range)")
    titles = [wrap(label, panel) for label in labels]
    fig, axes = _figure(1, 1 + len(labels), panel, extra_height=_lines_height(titles + ["image"]),
                        extra_width=0.4 * panel, description=description)
    _show(axes[0, 0], base)
    axes[0, 0].set_title("image", fontsize=TITLE_FONT)
    for k, label in enumerate(labels):
        m = big[k]
        m = ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)).numpy()           # each map stretched to [0, 1]
        axes[0, k + 1].imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        shown = axes[0, k + 1].imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
        axes[0, k + 1].set_title(titles[k], fontsize=TITLE_FONT)
    if len(labels):
        colorbar(fig, shown, axes[0, 1:], ticks=[0, 1], ticklabels=["min", "max"], label="each map", shrink=0.8)
    return fig
