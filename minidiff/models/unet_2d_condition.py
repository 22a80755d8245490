"""The Stable Diffusion UNet: predicts the noise in a latent, given the timestep and the text.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models")
runs the DDPM UNet (Ho et al. 2020; Ronneberger et al. 2015) on the 4-channel latents of a VAE and
conditions it on text: after each ResNet block of the `CrossAttn*` levels sits a spatial transformer
(`blocks/transformer_2d.py`) whose cross-attention reads the CLIP text embeddings.

    sample (B, 4, h, w), timestep t, text (B, 77, 768)
      -> conv_in                                    (B, 320, h, w)
      -> 4 down blocks, each [resnet -> transformer] x 2, then a stride-2 conv (not the last)
                                                    every intermediate map is pushed on `skips`
      -> mid block: resnet -> transformer -> resnet (B, 1280, h/8, w/8)
      -> 4 up blocks, each [concat(skips.pop()) -> resnet -> transformer] x 3, then upsample (not the last)
      -> GroupNorm -> SiLU -> conv_out              (B, 4, h, w): the predicted noise eps

The config field `attention_head_dim` is, for historical reasons, the NUMBER of heads (8 in SD v1): each
head has channels / 8 dimensions (diffusers keeps the misnomer for its 40,000+ configs, and so do we).
Module attribute names equal the checkpoint keys (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.layers import Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_embedding
from .modeling import PretrainedModel
from ..blocks.transformer_2d import SpatialTransformer

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """The keys of a diffusers `UNet2DConditionModel` config.json (0.42 and the older SD v1 files).

    Defaults are diffusers' defaults, which are Stable Diffusion v1's values.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8   # the number of heads (see the module docstring)
    num_attention_heads: int | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    # Accepted and without effect: diffusers' default attention (SDPA) ignores it as well, and SDPA
    # accumulates in float32; the explicit attention-map path of `Attention` always computes in float32.
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64   # only read with addition_embed_type, which is refused

    # Options of the format that minidiff builds only at these values (SDXL, Kandinsky, UnCLIP, LCM, ...).
    _supported_values = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": (False,),
        "transformer_layers_per_block": (1,),
        "reverse_transformer_layers_per_block": (None,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "num_attention_heads": (None,),
        "dual_cross_attention": (False,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0,),
        "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "projection_class_embeddings_input_dim": (None,),
        "attention_type": ("default",),
        "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,),
        "act_fn": ("silu", "swish"),   # two names of the same function
    }

    def validate(self, source: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"{source}: expected one down block and one up block per entry of block_out_channels ({n}), "
                f"found {len(self.down_block_types)} down_block_types and {len(self.up_block_types)} "
                "up_block_types. Make the three lists the same length."
            )
        for kind, types, known in (("down", self.down_block_types, DOWN_BLOCK_TYPES),
                                   ("up", self.up_block_types, UP_BLOCK_TYPES)):
            unknown = [t for t in types if t not in known]
            if unknown:
                raise ValueError(
                    f"{source}: minidiff's UNet2DConditionModel builds the {kind} blocks {list(known)}, "
                    f"found {unknown} in {kind}_block_types. This checkpoint is not a Stable Diffusion 1/2 UNet."
                )
        for name in ("attention_head_dim", "layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != n:
                raise ValueError(
                    f"{source}: expected {name} to be one int or a list of {n} (one per block), found {value!r}."
                )
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"{source}: expected cross_attention_dim to be one int (the width of the text embeddings), "
                f"found {self.cross_attention_dim!r}; per-block widths are not implemented in minidiff."
            )


def per_block(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    """A config value given as one int or one per block -> one per block."""
    return (value,) * n if isinstance(value, int) else tuple(value)


@dataclass
class UNet2DConditionOutput:
    sample: torch.Tensor   # (B, out_channels, h, w): the model output, the predicted noise for SD


class DownBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H/2, W/2): `layers` resnets (each followed by a spatial transformer in a
    `CrossAttnDownBlock2D`), then a stride-2 conv unless this is the last block. Pushes every output on `skips`."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, layers: int, cross_attention: bool,
                 heads: int, config: UNet2DConditionConfig, add_downsample: bool):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([
            ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb_dim, groups, eps, config.dropout)
            for i in range(layers)
        ])
        self.attentions = nn.ModuleList([
            SpatialTransformer(c_out, heads, c_out // heads, config.cross_attention_dim, groups,
                               config.use_linear_projection)
            for _ in range(layers)
        ]) if cross_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, config.downsample_padding)]) if add_downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor], adapter_residual: torch.Tensor | None = None) -> torch.Tensor:
        """`adapter_residual`: a T2I-Adapter feature, added where diffusers adds it (see below)."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)                                             # (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[i](h, context)                          # (B, C_out, H, W)
                # T2I-Adapter, CrossAttnDownBlock2D: after the last (resnet, transformer) pair, before the
                # downsampler, so the skip and the downsampled map both carry it.
                if adapter_residual is not None and i == len(self.resnets) - 1:
                    h = h + adapter_residual                                # (B, C_out, H, W)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)                                     # (B, C_out, H/2, W/2), rounded up
            skips.append(h)
        if adapter_residual is not None and self.attentions is None:
            # T2I-Adapter, plain DownBlock2D: diffusers adds the feature in place to the block's output, which is
            # the same tensor as the block's last skip, so that skip receives it too.
            h = h + adapter_residual
            skips[-1] = h
        return h


class MidBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): resnet -> spatial transformer -> resnet (`UNetMidBlock2DCrossAttn`)."""

    def __init__(self, channels: int, temb_dim: int, heads: int, config: UNet2DConditionConfig):
        super().__init__()
        groups, eps, scale = config.norm_num_groups, config.norm_eps, config.mid_block_scale_factor
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_dim, groups, eps, config.dropout, output_scale_factor=scale)
            for _ in range(2)
        ])
        self.attentions = nn.ModuleList([
            SpatialTransformer(channels, heads, channels // heads, config.cross_attention_dim, groups,
                               config.use_linear_projection)
        ])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """(B, C_prev, H, W) -> (B, C_out, 2H, 2W): `layers` times [concat a skip -> resnet (-> transformer)],
    then upsample to the size of the next skip unless this is the last block."""

    def __init__(self, c_prev: int, c_out: int, c_skip_last: int, temb_dim: int, layers: int,
                 cross_attention: bool, heads: int, config: UNet2DConditionConfig, add_upsample: bool):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        # Input of resnet i: the running map (C_prev for the first, then C_out) plus the skip it concatenates.
        # The last skip of each up block is the one the matching down block received as its input.
        self.resnets = nn.ModuleList([
            ResnetBlock2D((c_prev if i == 0 else c_out) + (c_skip_last if i == layers - 1 else c_out),
                          c_out, temb_dim, groups, eps, config.dropout)
            for i in range(layers)
        ])
        self.attentions = nn.ModuleList([
            SpatialTransformer(c_out, heads, c_out // heads, config.cross_attention_dim, groups,
                               config.use_linear_projection)
            for _ in range(layers)
        ]) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if add_upsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, H, W)
            h = resnet(h, temb)                                             # (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[i](h, context)                          # (B, C_out, H, W)
        if self.upsamplers is not None:
            # Upsample to the size of the skip concatenated next: 2H, or 2H-1 where a down block saw an odd size.
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])            # (B, C_out, ~2H, ~2W)
        return h


class UNet2DConditionModel(PretrainedModel):
    """eps_theta(z_t, t, text): (B, in_channels, h, w), t, (B, M, cross_attention_dim) -> (B, out_channels, h, w).

    Load a checkpoint with `UNet2DConditionModel.from_pretrained("CompVis/stable-diffusion-v1-4",
    subfolder="unet")`; the weights load strictly into the attributes below.
    """

    config_class = UNet2DConditionConfig

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        config.validate(type(config).__qualname__)
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        heads = per_block(config.attention_head_dim, n)        # the misnamed field: heads per block
        layers = per_block(config.layers_per_block, n)
        temb_dim = 4 * channels[0]                             # 1280 in SD

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            c_in = channels[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(
                c_in, channels[i], temb_dim, layers[i], block_type == "CrossAttnDownBlock2D", heads[i], config,
                add_downsample=i < n - 1,
            ))

        self.mid_block = MidBlock(channels[-1], temb_dim, heads[-1], config)

        # The up path mirrors the down path: up block i works at the resolution of down block n-1-i.
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            level = n - 1 - i
            c_prev = channels[min(level + 1, n - 1)]           # what the block below (or the mid block) hands up
            c_skip_last = channels[max(level - 1, 0)]          # the input of down block `level`
            self.up_blocks.append(UpBlock(
                c_prev, channels[level], c_skip_last, temb_dim, layers[level] + 1,
                block_type == "CrossAttnUpBlock2D", heads[level], config, add_upsample=i < n - 1,
            ))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def cross_attention_layers(self) -> dict[str, Attention]:
        """Every cross-attention layer (`attn2`), by its checkpoint name, in the order the forward pass runs them.

        To read the text-to-image attention maps: set `layer.store_attention_probs = True` on the ones you
        want, run the UNet, then read `layer.attention_probs`, shape (B, heads, h*w of that level, M tokens).
        """
        return {name: module for name, module in self.named_modules() if name.endswith(".attn2")}

    def _timesteps(self, timestep: torch.Tensor | float | int, B: int, device: torch.device) -> torch.Tensor:
        """An int / float / 0-d tensor / (1,) or (B,) tensor -> (B,) timesteps, as diffusers broadcasts them."""
        if not torch.is_tensor(timestep):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if device.type == "mps":  # no 64-bit types on Apple GPUs
                dtype = torch.float32 if isinstance(timestep, float) else torch.int32
            timestep = torch.tensor([timestep], dtype=dtype, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(device)
        if timestep.ndim != 1 or timestep.shape[0] not in (1, B):
            raise ValueError(
                f"Expected timestep to be a number, a 0-d tensor, or a tensor of shape (1,) or ({B},) for a "
                f"batch of {B}, found shape {tuple(timestep.shape)}. Pass one timestep per sample or one for all."
            )
        return timestep.to(device).expand(B)                                 # (B,)

    def _check_inputs(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        c_in, d_text = self.config.in_channels, self.config.cross_attention_dim
        if sample.ndim != 4 or sample.shape[1] != c_in:
            raise ValueError(
                f"Expected sample of shape (B, {c_in}, h, w), found {tuple(sample.shape)}. For Stable Diffusion "
                f"pass VAE latents (4 channels, 1/8 of the image size), not the image."
            )
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != d_text
                or encoder_hidden_states.shape[0] != sample.shape[0]):
            raise ValueError(
                f"Expected encoder_hidden_states of shape ({sample.shape[0]}, M, {d_text}) (one sequence of text "
                f"embeddings per sample, width cross_attention_dim), found {tuple(encoder_hidden_states.shape)}. "
                f"Use the text encoder this UNet was trained with (CLIP ViT-L/14 gives 768 for SD v1, "
                f"OpenCLIP ViT-H 1024 for SD 2) and repeat it to the batch size of sample."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: list[torch.Tensor] | None = None,
    ) -> UNet2DConditionOutput:
        """sample (B, C_in, h, w), timestep, encoder_hidden_states (B, M, D) -> .sample (B, C_out, h, w).

        The two optional residuals are ControlNet's (Zhang et al. 2023): added to the skips and to the mid
        block's output. `down_intrablock_additional_residuals` are a T2I-Adapter's features (Mou et al. 2023),
        one per down block, added inside the blocks (see DownBlock.forward).
        """
        self._check_inputs(sample, encoder_hidden_states)
        B = sample.shape[0]
        context = encoder_hidden_states                                      # (B, M, D)

        # 0. center the input (configs trained on [0, 1] inputs)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. timestep embedding: sinusoidal features (always float32), then the MLP in the model's dtype
        t = self._timesteps(timestep, B, sample.device)                      # (B,)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)                                    # (B, 4*C0)

        # 2. down: every intermediate map is kept for the up path
        h = self.conv_in(sample)                                             # (B, C0, h, w)
        skips = [h]
        # T2I-Adapter (Mou et al. 2023): one feature per down block, added inside the block (DownBlock.forward)
        adapter_features = down_intrablock_additional_residuals or [None] * len(self.down_blocks)
        if len(adapter_features) != len(self.down_blocks):
            raise ValueError(
                f"Expected {len(self.down_blocks)} down_intrablock_additional_residuals (one T2I-Adapter feature per "
                f"down block), found {len(adapter_features)}. Use an adapter built for this UNet's block_out_channels."
            )
        for block, feature in zip(self.down_blocks, adapter_features):
            h = block(h, temb, context, skips, feature)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"Expected {len(skips)} down_block_additional_residuals (one per skip connection), found "
                    f"{len(down_block_additional_residuals)}. Use a ControlNet built for this UNet's config."
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        # 3. middle, at the lowest resolution
        h = self.mid_block(h, temb, context)                                 # (B, C_last, h/2^k, w/2^k)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        # 4. up: each block concatenates the skips of its level, last in first out
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        assert not skips, "every skip connection is used exactly once"

        # 5. out
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))              # (B, C_out, h, w)
        return UNet2DConditionOutput(sample=h)
