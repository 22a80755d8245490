"""Capturing attention maps from the Stable Diffusion UNet, shared by the attention notebook, SAG,
Attend-and-Excite and Pix2Pix-Zero.

Every `Attention` layer has a visible switch, `store_attention_probs` (see minidiff/blocks/layers.py): when on,
the layer computes softmax(Q K^T / sqrt(d)) explicitly and keeps it on `layer.attention_probs`,
shape (B, heads, N, M): N = h_l * w_l image positions of that layer's feature map, M = 77 text tokens
for a cross-attention layer (`attn2`) or M = N positions for a self-attention layer (`attn1`).
The maps stay on the autograd graph, so a loss on them can be differentiated with respect to the
latents (Attend-and-Excite, Pix2Pix-Zero's cross-attention guidance).

    layers = attention_layers(unet, kind="cross")            # {"down_blocks.0.attentions.0...attn2": layer}
    with capture(layers):
        unet(latents, t, encoder_hidden_states=text)
        maps = token_maps(layers, latent_hw=(h, w))          # (B, 77, h, w): one map per token
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..blocks.layers import Attention

KINDS = {"cross": ".attn2", "self": ".attn1"}
BLOCKS = ("down", "mid", "up")


def attention_layers(unet, kind: str = "cross", blocks=BLOCKS) -> dict[str, Attention]:
    """The UNet's cross- (`attn2`) or self-attention (`attn1`) layers, by checkpoint name, in forward order.

    `blocks`: which parts of the UNet, any of "down", "mid", "up" (SAG uses the middle block's self-attention).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; found {kind!r}.")
    blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown:
        raise ValueError(f"blocks must be among {BLOCKS}; found {unknown}.")
    prefixes = tuple(f"{b}_block" for b in blocks)                    # "down_blocks.0...", "mid_block...", ...
    layers = {name: m for name, m in unet.named_modules()
              if name.endswith(KINDS[kind]) and name.startswith(prefixes) and isinstance(m, Attention)}
    if not layers:
        raise ValueError(f"This UNet has no {kind}-attention layers in {blocks}; is it a UNet2DConditionModel?")
    return layers


@contextmanager
def capture(layers: dict[str, Attention]):
    """Inside the block, `layers` keep their attention probabilities; after it, the fused kernel is back and
    the stored maps are dropped (they hold activations and, when a gradient is taken, a graph)."""
    for layer in layers.values():
        layer.store_attention_probs = True
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.store_attention_probs = False
            layer.attention_probs = None


def layer_size(num_positions: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h_l, w_l) of a layer whose map has N = h_l * w_l positions, in a UNet run on a (h, w) latent."""
    h, w = latent_hw
    factor = math.sqrt(h * w / num_positions)                          # 2^k: this level's downsampling
    hl, wl = round(h / factor), round(w / factor)
    if hl * wl != num_positions:
        raise ValueError(f"An attention map with {num_positions} positions does not fit a latent of {h} x {w}; "
                         "pass latent_hw = (height // f, width // f) of the latents the UNet was run on (f: the "
                         "pipeline's vae_scale_factor, 8 for SD).")
    return hl, wl


def token_maps(layers: dict[str, Attention], latent_hw: tuple[int, int], size: tuple[int, int] | None = None,
               ) -> torch.Tensor:
    """The maps the `layers` hold after a UNet call inside `capture(layers)` -> one map per token: (B, M, *size)."""
    for name, layer in layers.items():
        if layer.attention_probs is None:
            raise ValueError(f"Layer {name} holds no attention map: run the UNet inside `capture(layers)` first.")
    return average_maps([layer.attention_probs for layer in layers.values()], latent_hw, size)


def average_maps(probs: list[torch.Tensor], latent_hw: tuple[int, int], size: tuple[int, int] | None = None,
                 ) -> torch.Tensor:
    """Attention probabilities (B, heads, N, M) of several layers -> one map per key: (B, M, *size).

    Heads are averaged, each layer's (h_l, w_l) map is resized (bilinear) to `size` (default: the latent
    size) and the layers are averaged, as in Hertz et al. 2022 (prompt-to-prompt, https://arxiv.org/abs/2208.01626).
    Not detached: a loss on the result reaches the latents. For pictures, `.detach().cpu()` it.
    """
    size = tuple(size or latent_hw)
    maps = []
    for p in probs:
        B, heads, N, M = p.shape
        hl, wl = layer_size(N, latent_hw)
        m = p.float().mean(dim=1)                                      # (B, heads, N, M) -> (B, N, M)
        m = m.transpose(1, 2).reshape(B, M, hl, wl)                    # (B, N, M) -> (B, M, hl, wl)
        if (hl, wl) != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)   # (B, M, *size)
        maps.append(m)
    if not maps:
        raise ValueError("No attention maps were given: switch store_attention_probs on (see "
                         "minidiff.blocks.layers.Attention, or minidiff.control.capture) and run the model first.")
    return torch.stack(maps).mean(dim=0)                               # (L, B, M, *size) -> (B, M, *size)
