"""The spatial transformer: how Stable Diffusion's UNet reads the text.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
sec. 3.3) conditions the UNet on a prompt by placing a small transformer after each ResNet block. It
treats the H*W positions of the feature map as a sequence of tokens and runs, per position:

    x = x + SelfAttention(LayerNorm(x))                        attn1: the image attends to itself
    x = x + CrossAttention(LayerNorm(x), text)                 attn2: Q from the image, K and V from the text
    x = x + FeedForward(LayerNorm(x))                          ff: GEGLU (Shazeer 2020), 4x wider

(the pre-norm transformer block of Vaswani et al. 2017, "Attention Is All You Need"). The latent
diffusion code calls the whole module `SpatialTransformer`; diffusers calls it `Transformer2DModel` and
the block `BasicTransformerBlock`. Attribute names equal the checkpoint keys (`proj_in`,
`transformer_blocks.0.attn2.to_k`, `ff.net.0.proj`, `ff.net.2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention


class GEGLU(nn.Module):
    """(B, N, dim) -> (B, N, inner): GELU-gated linear unit, a * gelu(b) with [a, b] = proj(x) (Shazeer 2020)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)                              # 2 x (B, N, inner)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """(B, N, dim) -> (B, N, dim): GEGLU to 4*dim, then back. `net` is a list so the keys read `ff.net.0.proj`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """(B, N, dim) + context (B, M, context_dim) -> (B, N, dim): self-attention, cross-attention, feed-forward.

    Each sub-layer is pre-norm with a residual (Vaswani et al. 2017, sec. 3.1, in the pre-norm form).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, bias=False)                           # self-attention
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, bias=False)  # cross-attention
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))                    # (B, N, dim): each position attends to all N
        x = x + self.attn2(self.norm2(x), context)           # (B, N, dim): each position attends to M tokens
        x = x + self.ff(self.norm3(x))                       # (B, N, dim)
        return x


class SpatialTransformer(nn.Module):
    """(B, C, H, W) + context (B, M, context_dim) -> (B, C, H, W) (diffusers' `Transformer2DModel`).

    GroupNorm, project to heads*dim_head channels, flatten the H*W positions into a sequence, run one
    `BasicTransformerBlock`, unflatten, project back and add the input (a residual around the whole module).
    `use_linear_projection` (Stable Diffusion 2) projects with a Linear after flattening instead of a 1x1
    conv before it; the two are the same map, stored with different weight shapes.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        norm_groups: int,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner_dim, heads, dim_head, context_dim)])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        residual = x
        h = self.norm(x)
        if self.use_linear_projection:
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)                  # (B, C, H, W) -> (B, H*W, C)
            h = self.proj_in(h)                                             # (B, H*W, inner)
        else:
            h = self.proj_in(h)                                             # (B, inner, H, W)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])         # (B, inner, H, W) -> (B, H*W, inner)

        for block in self.transformer_blocks:
            h = block(h, context)                                           # (B, H*W, inner)

        if self.use_linear_projection:
            h = self.proj_out(h)                                            # (B, H*W, C)
            # (B, H*W, C) -> (B, C, H, W); contiguous, or the permuted (channels-last) layout would spread
            # through the rest of the UNet and pick other conv kernels
            h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        else:
            h = h.reshape(B, H, W, h.shape[-1]).permute(0, 3, 1, 2)         # (B, H*W, inner) -> (B, inner, H, W)
            h = self.proj_out(h.contiguous())                               # (B, C, H, W)
        return h + residual
