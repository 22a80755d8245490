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

The blocks without attention (`DownBlock2D`, `UpBlock2D`) are the DDPM UNet's (`blocks/unet_blocks.py`); the
`CrossAttn*` blocks below extend them with a spatial transformer after every ResNet block. The class names
are the block types of the config (`down_block_types`), as in diffusers.

The config field `attention_head_dim` is, for historical reasons, the NUMBER of heads (8 in SD v1): each
head has channels / 8 dimensions (diffusers keeps the misnomer for its 40,000+ configs, and so do we).
Module attribute names equal the checkpoint keys (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.layers import Attention, TimestepEmbedding, broadcast_timesteps, timestep_embedding
from ..blocks.transformer_2d import SpatialTransformer
from ..blocks.unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from ..core.config import ModelConfig, check_block_types, check_group_norm
from ..loaders.custom_diffusion import load_attn_procs, save_attn_procs
from .modeling import PretrainedModel
from .single_file import unet_from_single_file

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNet2DConditionConfig(ModelConfig):
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

    def check(self) -> None:
        """What `_supported_values` cannot say: block types, channel counts, per-block lists."""
        check_block_types(self, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)
        check_group_norm(self)
        n = len(self.block_out_channels)
        for name in ("attention_head_dim", "layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != n:
                raise ValueError(f"UNet2DConditionConfig: expected {name} to be one int or a list of {n} (one per "
                                 f"block), found {value!r}.")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"UNet2DConditionConfig: expected cross_attention_dim to be one int (the width of the text "
                f"embeddings), found {self.cross_attention_dim!r}; per-block widths are not implemented in minidiff."
            )


def per_block(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    """A config value given as one int or one per block -> one per block."""
    return (value,) * n if isinstance(value, int) else tuple(value)


@dataclass
class UNet2DConditionOutput:
    sample: torch.Tensor   # (B, out_channels, h, w): the model output, the predicted noise for SD


class CrossAttnDownBlock2D(DownBlock2D):
    """A `DownBlock2D` with a spatial transformer after every ResNet block, which reads the text.

    (B, C_in, H, W) -> (B, C_out, H/2, W/2). Keys: `resnets.i`, `attentions.i`, `downsamplers.0`.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, groups: int,
                 eps: float, dropout: float, add_downsample: bool, downsample_padding: int, heads: int,
                 cross_attention_dim: int, use_linear_projection: bool):
        super().__init__(in_channels, out_channels, temb_channels, num_layers, groups, eps, dropout,
                         add_downsample, downsample_padding)
        self.attentions = nn.ModuleList([
            SpatialTransformer(out_channels, heads, out_channels // heads, cross_attention_dim, groups,
                               use_linear_projection)
            for _ in range(num_layers)
        ])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor], context: torch.Tensor,
                adapter_residual: torch.Tensor | None = None) -> torch.Tensor:
        """`adapter_residual`: a T2I-Adapter feature, added where diffusers adds it (see below)."""
        for i, (resnet, attention) in enumerate(zip(self.resnets, self.attentions)):
            h = resnet(h, temb)                                             # (B, C_out, H, W)
            h = attention(h, context)                                       # (B, C_out, H, W)
            # T2I-Adapter, CrossAttnDownBlock2D: after the last (resnet, transformer) pair, before the
            # downsampler, so the skip and the downsampled map both carry it.
            if adapter_residual is not None and i == len(self.resnets) - 1:
                h = h + adapter_residual                                    # (B, C_out, H, W)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)                                     # (B, C_out, H/2, W/2), rounded up
            skips.append(h)
        return h


class UNetMidBlock2DCrossAttn(UNetMidBlock2D):
    """(B, C, H, W) -> (B, C, H, W): resnet -> spatial transformer (reads the text) -> resnet."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, dropout: float, scale: float,
                 heads: int, cross_attention_dim: int, use_linear_projection: bool):
        transformer = SpatialTransformer(channels, heads, channels // heads, cross_attention_dim, groups,
                                         use_linear_projection)
        super().__init__(channels, temb_channels, groups, eps, attention=transformer, dropout=dropout, scale=scale)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)                                        # (B, C, H, W)
        h = self.attentions[0](h, context)                                  # (B, C, H, W)
        return self.resnets[1](h, temb)


class CrossAttnUpBlock2D(UpBlock2D):
    """An `UpBlock2D` with a spatial transformer after every ResNet block, which reads the text.

    (B, C_prev, H, W) + skips -> (B, C_out, 2H, 2W). Keys: `resnets.i`, `attentions.i`, `upsamplers.0`.
    """

    def __init__(self, prev_channels: int, out_channels: int, skip_channels: list[int], temb_channels: int,
                 groups: int, eps: float, dropout: float, add_upsample: bool, heads: int, cross_attention_dim: int,
                 use_linear_projection: bool):
        super().__init__(prev_channels, out_channels, skip_channels, temb_channels, groups, eps, dropout, add_upsample)
        self.attentions = nn.ModuleList([
            SpatialTransformer(out_channels, heads, out_channels // heads, cross_attention_dim, groups,
                               use_linear_projection)
            for _ in range(len(skip_channels))
        ])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor],
                context: torch.Tensor) -> torch.Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, H, W)
            h = resnet(h, temb)                                             # (B, C_out, H, W)
            h = attention(h, context)                                       # (B, C_out, H, W)
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
        self.config = config                                   # checked when it was made (ModelConfig)
        channels = config.block_out_channels
        n = len(channels)
        heads = per_block(config.attention_head_dim, n)        # the misnamed field: heads per block
        layers = per_block(config.layers_per_block, n)
        temb_dim = 4 * channels[0]                             # 1280 in SD
        groups, eps = config.norm_num_groups, config.norm_eps
        text = dict(cross_attention_dim=config.cross_attention_dim, use_linear_projection=config.use_linear_projection)

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)

        # Down path. `skip_channels` mirrors at build time the stack of skips that forward() fills.
        skip_channels = [channels[0]]                          # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            is_last = i == n - 1
            level = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=temb_dim,
                         num_layers=layers[i], groups=groups, eps=eps, dropout=config.dropout,
                         add_downsample=not is_last, downsample_padding=config.downsample_padding)
            if block_type == "CrossAttnDownBlock2D":
                self.down_blocks.append(CrossAttnDownBlock2D(**level, heads=heads[i], **text))
            else:
                self.down_blocks.append(DownBlock2D(**level))
            skip_channels += [channels[i]] * (layers[i] + (0 if is_last else 1))

        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_dim, groups, eps, config.dropout,
                                                 config.mid_block_scale_factor, heads=heads[-1], **text)

        # Up path: up block i works at the resolution of down block n-1-i and pops its skips.
        self.up_blocks = nn.ModuleList()
        prev = channels[-1]
        for i, block_type in enumerate(config.up_block_types):
            down = n - 1 - i
            level_skips = [skip_channels.pop() for _ in range(layers[down] + 1)]  # in popping order
            level = dict(prev_channels=prev, out_channels=channels[down], skip_channels=level_skips,
                         temb_channels=temb_dim, groups=groups, eps=eps, dropout=config.dropout,
                         add_upsample=i < n - 1)
            if block_type == "CrossAttnUpBlock2D":
                self.up_blocks.append(CrossAttnUpBlock2D(**level, heads=heads[down], **text))
            else:
                self.up_blocks.append(UpBlock2D(**level))
            prev = channels[down]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def cross_attention_layers(self) -> dict[str, Attention]:
        """Every cross-attention layer (`attn2`), by its checkpoint name, in the order the forward pass runs them.

        To read the text-to-image attention maps: set `layer.store_attention_probs = True` on the ones you
        want, run the UNet, then read `layer.attention_probs`, shape (B, heads, h*w of that level, M tokens).
        """
        return {name: module for name, module in self.named_modules() if name.endswith(".attn2")}

    @classmethod
    def from_single_file(cls, path: str, config=None, prediction_type: str | None = None, extract_ema: bool = False,
                         torch_dtype: torch.dtype | None = None) -> "UNet2DConditionModel":
        """The UNet of an original CompVis / LDM single file (or a UNet-only file), offline, no pickle run: SD v1 or
        v2 from its cross-attention width (v2: pass prediction_type), or `config=`: see models/single_file.py."""
        return unet_from_single_file(cls, path, config, prediction_type, extract_ema, torch_dtype)

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                        subfolder: str | None = None) -> list[str]:
        """Custom Diffusion's learned cross-attention projections, as diffusers' `unet.load_attn_procs`
        (the file `pytorch_custom_diffusion_weights.bin` / `.safetensors`): see loaders/custom_diffusion.py."""
        return load_attn_procs(self, pretrained_model_name_or_path_or_dict, weight_name, subfolder)

    def save_attn_procs(self, save_directory, weight_name: str | None = None, safe_serialization: bool = True,
                        train_q_out: bool = False) -> str:
        """Write the cross-attention projections in Custom Diffusion's file format (loaders/custom_diffusion.py)."""
        return save_attn_procs(self, save_directory, weight_name, safe_serialization, train_q_out)

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
        one per down block, added inside the blocks (see CrossAttnDownBlock2D.forward and step 2).
        """
        self._check_inputs(sample, encoder_hidden_states)
        B = sample.shape[0]
        context = encoder_hidden_states                                      # (B, M, D)

        # 0. center the input (configs trained on [0, 1] inputs)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. timestep embedding: sinusoidal features (always float32), then the MLP in the model's dtype
        t = broadcast_timesteps(timestep, B, sample.device)                  # (B,)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)  # (B, C0)
        temb = self.time_embedding(t_emb)                                    # (B, 4*C0)

        # 2. down: every intermediate map is kept for the up path
        h = self.conv_in(sample)                                             # (B, C0, h, w)
        skips = [h]
        # T2I-Adapter (Mou et al. 2023): one feature per down block, added inside the block (CrossAttnDownBlock2D)
        adapter_features = down_intrablock_additional_residuals or [None] * len(self.down_blocks)
        if len(adapter_features) != len(self.down_blocks):
            raise ValueError(
                f"Expected {len(self.down_blocks)} down_intrablock_additional_residuals (one T2I-Adapter feature per "
                f"down block), found {len(adapter_features)}. Use an adapter built for this UNet's block_out_channels."
            )
        for block, feature in zip(self.down_blocks, adapter_features):
            if isinstance(block, CrossAttnDownBlock2D):                      # only these read the text
                h = block(h, temb, skips, context, feature)
            else:
                h = block(h, temb, skips)
                if feature is not None:
                    # T2I-Adapter, plain DownBlock2D: diffusers adds the feature in place to the block's output,
                    # which is the same tensor as the block's last skip, so that skip receives it too.
                    h = h + feature
                    skips[-1] = h

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
            if isinstance(block, CrossAttnUpBlock2D):                        # only these read the text
                h = block(h, temb, skips, context)
            else:
                h = block(h, temb, skips)
        assert not skips, "every skip connection is used exactly once"

        # 5. out
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))              # (B, C_out, h, w)
        return UNet2DConditionOutput(sample=h)
