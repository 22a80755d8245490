"""The pixel-space DDPM UNet (Ho et al. 2020, https://arxiv.org/abs/2006.11239, appendix B), as in
`google/ddpm-cat-256`.

    x_t (B, C, H, W), t  ->  eps_theta(x_t, t) (B, C, H, W)

The network, top to bottom (pieces from `minidiff.blocks.layers` and `minidiff.blocks.unet_blocks`):

1. t -> sinusoidal embedding -> MLP: `temb` (B, 4 * C0), added inside every ResNet block.
2. `conv_in`, then the down path: per level `layers_per_block` ResNet blocks (each followed by a
   self-attention block at the levels whose type is `AttnDownBlock2D`), then a stride-2 conv
   (not after the last level). Every intermediate feature map is pushed on a stack of skips.
3. The mid block at the lowest resolution: ResNet, self-attention, ResNet.
4. The up path mirrors it with `layers_per_block + 1` ResNet blocks per level, each first concatenating
   one skip popped from the stack along channels; then nearest-neighbour upsampling + conv.
5. GroupNorm, SiLU, `conv_out`.

Module attribute names equal the keys of diffusers checkpoints (`down_blocks.0.resnets.1.conv1`), so
`from_pretrained` loads them strictly; checkpoints from before 2023 name the attention weights
`query/key/value/proj_attn`, which `minidiff.models.modeling` renames on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.layers import Attention, TimestepEmbedding, broadcast_timesteps, timestep_embedding
from ..blocks.unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from ..core.config import ModelConfig, check_block_types, check_group_norm
from .modeling import PretrainedModel

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNet2DConfig(ModelConfig):
    """The keys of a `UNet2DModel` config.json; defaults are diffusers' defaults, used where an old file
    is silent (ddpm-cat-256 was written by diffusers 0.0.4 and lacks half of these keys)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False           # x -> 2x - 1 first (for inputs in [0, 1])
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None       # None: 4 * block_out_channels[0]
    freq_shift: float = 0                       # 1 in the original DDPM code, see layers.timestep_embedding
    flip_sin_to_cos: bool = True                # [cos, sin] instead of [sin, cos]
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1           # the mid block's outputs are divided by this
    downsample_padding: int = 1                 # 0: pad right/bottom only (the original DDPM code)
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8          # None: one head spanning all channels
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None     # the mid attention's GroupNorm; None: norm_num_groups
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None      # used only by time_embedding_type="learned"

    # Options of the checkpoint format that minidiff does not implement, accepted only at these values.
    _supported_values = {
        "time_embedding_type": ("positional",),     # not "fourier" (score SDE) nor "learned"
        "mid_block_type": ("UNetMidBlock2D",),
        "downsample_type": ("conv",),               # not "resnet"
        "upsample_type": ("conv",),                 # not "resnet"
        "act_fn": ("silu", "swish"),                # the same function under two names
        "resnet_time_scale_shift": ("default",),    # not "scale_shift" (FiLM) nor "spatial"
        "add_attention": (True,),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
    }

    def check(self) -> None:
        """What `_supported_values` cannot say: block types, channel counts, attention widths."""
        check_block_types(self, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)
        check_group_norm(self)
        if self.attention_head_dim is not None:
            levels = zip(self.block_out_channels, self.down_block_types, reversed(self.up_block_types))
            with_attention = [c for c, down, up in levels if "Attn" in down + up] + [self.block_out_channels[-1]]
            too_narrow = sorted({c for c in with_attention if c < self.attention_head_dim})
            if too_narrow:
                raise ValueError(f"UNet2DConfig: attention_head_dim={self.attention_head_dim} is wider than the "
                                 f"{too_narrow} channels of an attention block, which would then have no head. "
                                 "Lower attention_head_dim or widen block_out_channels.")


@dataclass
class UNet2DOutput:
    """`sample`: the network's prediction (eps, x_0 or v, as it was trained), (B, out_channels, H, W)."""

    sample: torch.Tensor


def self_attention(channels: int, head_dim: int | None, groups: int, eps: float, scale: float = 1.0) -> Attention:
    """The DDPM attention block: GroupNorm, self-attention over the H*W positions, residual.
    `head_dim=None`: one head spanning all channels."""
    head_dim = head_dim if head_dim is not None else channels
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_groups=groups, eps=eps, rescale_output_factor=scale)


class AttnDownBlock2D(DownBlock2D):
    """A `DownBlock2D` with a self-attention block after every ResNet block (the 16x16 level of Ho et al. 2020).

    (B, C_in, H, W) -> (B, C_out, H/2, W/2). Keys: `resnets.i`, `attentions.i`, `downsamplers.0`.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, dropout: float, add_downsample: bool, downsample_padding: int,
                 attention_head_dim: int | None):
        super().__init__(in_channels, out_channels, temb_channels, num_layers, groups, eps, dropout,
                         add_downsample, downsample_padding)
        self.attentions = nn.ModuleList([
            self_attention(out_channels, attention_head_dim, groups, eps) for _ in range(num_layers)
        ])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            h = attention(resnet(h, temb))                          # (B, C_out, H, W)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)                             # (B, C_out, H/2, W/2)
            skips.append(h)
        return h


class AttnUpBlock2D(UpBlock2D):
    """An `UpBlock2D` with a self-attention block after every ResNet block.

    (B, C_prev, H, W) + skips -> (B, C_out, 2H, 2W). Keys: `resnets.i`, `attentions.i`, `upsamplers.0`.
    """

    def __init__(self, prev_channels: int, out_channels: int, skip_channels: list[int], temb_channels: int,
                 groups: int, eps: float, dropout: float, add_upsample: bool, attention_head_dim: int | None):
        super().__init__(prev_channels, out_channels, skip_channels, temb_channels, groups, eps, dropout, add_upsample)
        self.attentions = nn.ModuleList([
            self_attention(out_channels, attention_head_dim, groups, eps) for _ in range(len(skip_channels))
        ])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            h = torch.cat([h, skips.pop()], dim=1)                  # (B, C_h + C_skip, H, W)
            h = attention(resnet(h, temb))                          # (B, C_out, H, W)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])    # (B, C_out, 2H, 2W)
        return h


class UNet2DModel(PretrainedModel):
    """The DDPM UNet: (B, C, H, W) noisy images + timesteps -> (B, C_out, H, W).

    `UNet2DModel.from_pretrained("google/ddpm-cat-256")`, or `from_config(dict)` for random weights.
    """

    config_class = UNet2DConfig

    def __init__(self, config: UNet2DConfig):
        super().__init__()
        self.config = config                                         # checked when it was made (ModelConfig)
        channels = config.block_out_channels
        n_levels = len(channels)
        temb_dim = config.time_embedding_dim or 4 * channels[0]
        groups, eps = config.norm_num_groups, config.norm_eps

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        # Down path. `skip_channels` mirrors at build time the stack of skips that forward() fills.
        skip_channels = [channels[0]]                                # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            is_last = i == n_levels - 1
            level = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=temb_dim,
                         num_layers=config.layers_per_block, groups=groups, eps=eps, dropout=config.dropout,
                         add_downsample=not is_last, downsample_padding=config.downsample_padding)
            if block_type == "AttnDownBlock2D":
                self.down_blocks.append(AttnDownBlock2D(**level, attention_head_dim=config.attention_head_dim))
            else:
                self.down_blocks.append(DownBlock2D(**level))
            skip_channels += [channels[i]] * (config.layers_per_block + (0 if is_last else 1))

        mid_groups = config.attn_norm_num_groups or groups
        self.mid_block = UNetMidBlock2D(
            channels[-1], temb_dim, groups, eps, dropout=config.dropout, scale=config.mid_block_scale_factor,
            attention=self_attention(channels[-1], config.attention_head_dim, mid_groups, eps,
                                     scale=config.mid_block_scale_factor),
        )

        # Up path: level i works at the resolution of down level n-1-i and pops its skips.
        self.up_blocks = nn.ModuleList()
        prev = channels[-1]
        for i, block_type in enumerate(config.up_block_types):
            out_ch = channels[n_levels - 1 - i]
            level_skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]  # in popping order
            level = dict(prev_channels=prev, out_channels=out_ch, skip_channels=level_skips, temb_channels=temb_dim,
                         groups=groups, eps=eps, dropout=config.dropout, add_upsample=i < n_levels - 1)
            if block_type == "AttnUpBlock2D":
                self.up_blocks.append(AttnUpBlock2D(**level, attention_head_dim=config.attention_head_dim))
            else:
                self.up_blocks.append(UpBlock2D(**level))
            prev = out_ch

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> UNet2DOutput:
        """sample (B, C, H, W), timestep: a number, a 0-d tensor, or one per image (B,) -> UNet2DOutput.

        H and W must be multiples of 2^(levels - 1). A fractional float timestep is kept as it is (diffusers'
        UNet2DModel truncates a Python float to an int; its UNet2DConditionModel does not).
        """
        B, C, H, W = self._check_input(sample)

        # 0. Inputs in [0, 1] -> [-1, 1] for checkpoints trained that way.
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. Timestep embedding: t (B,) -> sinusoids (B, C0) -> MLP (B, 4*C0).
        t = broadcast_timesteps(timestep, B, sample.device)          # (B,)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift)
        temb = self.time_embedding(t_emb.to(self.dtype))             # sinusoids are fp32; the MLP may be fp16

        # 2. Down path, pushing skips.
        h = self.conv_in(sample)                                     # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, skips)

        # 3. Mid block at the lowest resolution, (B, C_last, H / 2^(n-1), W / 2^(n-1)).
        h = self.mid_block(h, temb)

        # 4. Up path, popping skips (last in, first out).
        for block in self.up_blocks:
            h = block(h, temb, skips)

        # 5. Output head.
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))      # (B, C_out, H, W)
        return UNet2DOutput(sample=h)

    def _check_input(self, sample: torch.Tensor) -> tuple[int, int, int, int]:
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected a sample of shape (B, {self.config.in_channels}, H, W), found "
                             f"{tuple(sample.shape)}.")
        B, C, H, W = sample.shape
        if H % factor or W % factor:
            raise ValueError(f"Expected H and W to be multiples of {factor} (the UNet halves them "
                             f"{factor.bit_length() - 1} times), found {H}x{W}. Resize or pad the input.")
        return B, C, H, W
