"""The blocks that more than one model is built from, named as diffusers names them (`unet_2d_blocks.py`).

- `DownBlock2D`: one level of a UNet's down path without attention, used by both UNets.
- `UpBlock2D`: one level of a UNet's up path without attention, used by both UNets.
- `UNetMidBlock2D`: ResNet, self-attention, ResNet at the lowest resolution, used by the DDPM UNet and the VAE.

The UNets' skip connections (Ronneberger et al. 2015, "U-Net") are one stack, a Python list: every level of
the down path pushes each map it makes (`skips.append(h)`), and every ResNet of the up path pops one
(`skips.pop()`) and concatenates it to its input, so the last map pushed is the first one used. The blocks
with attention (`AttnDownBlock2D`, `CrossAttnDownBlock2D`, ...) extend these two in the model files.

Attribute names equal the checkpoint keys (`resnets.1.conv1`, `downsamplers.0.conv`, `upsamplers.0.conv`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D


class DownBlock2D(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H/2, W/2): `num_layers` ResNet blocks, then a stride-2 conv (not at the
    last level, whose output keeps its size). Pushes every map it makes on `skips`."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, dropout: float, add_downsample: bool, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups=groups, eps=eps, dropout=dropout)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([
            Downsample2D(out_channels, padding=downsample_padding)
        ]) if add_downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h, temb)                                     # (B, C_out, H, W)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)                             # (B, C_out, H/2, W/2), rounded up
            skips.append(h)
        return h


class UpBlock2D(nn.Module):
    """(B, C_prev, H, W) -> (B, C_out, 2H, 2W): per ResNet block, concatenate one skip popped from the stack,
    then the ResNet; then nearest-neighbour upsampling + conv (not at the last level).

    `skip_channels`: the channels of the skips this block pops, in the order it pops them (one per ResNet).
    """

    def __init__(self, prev_channels: int, out_channels: int, skip_channels: list[int], temb_channels: int,
                 groups: int, eps: float, dropout: float, add_upsample: bool):
        super().__init__()
        # Input of ResNet i: the running map (C_prev for the first, then C_out) plus the skip it concatenates.
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_channels if i == 0 else out_channels) + skip_channels[i], out_channels,
                          temb_channels, groups=groups, eps=eps, dropout=dropout)
            for i in range(len(skip_channels))
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            h = torch.cat([h, skips.pop()], dim=1)                  # (B, C_h + C_skip, H, W)
            h = resnet(h, temb)                                     # (B, C_out, H, W)
        if self.upsamplers is not None:
            # To the size of the skip the next level pops first: 2H, or 2H-1 where the down path halved an odd size.
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])    # (B, C_out, ~2H, ~2W)
        return h


class UNetMidBlock2D(nn.Module):
    """The bottleneck at the lowest resolution: ResNet, self-attention, ResNet; (B, C, h, w) -> same.

    The mid block of the DDPM UNet and of the VAE's encoder and decoder (`temb_channels=None`: no timestep).
    `attention` is built by the model (heads and norm differ between them). Both ResNets divide their output
    by `scale` (`mid_block_scale_factor`).
    """

    def __init__(self, channels: int, temb_channels: int | None, groups: int, eps: float, attention: Attention,
                 dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps, dropout=dropout,
                          output_scale_factor=scale)
            for _ in range(2)
        ])
        self.attentions = nn.ModuleList([attention])

    def forward(self, h: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.resnets[0](h, temb)                                # (B, C, h, w)
        h = self.attentions[0](h)                                   # (B, C, h, w)
        return self.resnets[1](h, temb)
