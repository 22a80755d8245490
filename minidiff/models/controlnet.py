"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models",
https://arxiv.org/abs/2302.05543): a trainable copy of the Stable Diffusion UNet's encoder that reads a
condition image (edges, a depth map, a pose) and adds what it sees to the frozen UNet's skip connections.

    condition image c (B, 3, H, W) in [0, 1], H = 8h
      -> controlnet_cond_embedding: 4 small convs, 3 of them stride 2, then a zero conv   (B, C0, h, w)
    latent z_t (B, 4, h, w) -> conv_in (B, C0, h, w) + the embedded condition
      -> the UNet's down blocks and mid block (the same classes, `unet_2d_condition.py`), every skip kept
      -> one zero convolution (1x1 conv, initialised to 0) per skip: `controlnet_down_blocks.{i}`
         and one on the mid block's output: `controlnet_mid_block`
      -> down_block_res_samples (12 tensors for SD), mid_block_res_sample, each times conditioning_scale

The UNet adds them to its own skips and to its mid block's output (`down_block_additional_residuals`,
`mid_block_additional_residual`). The zero convolutions are the paper's trick (sec. 3.1): training starts
from a copy of the UNet's weights and the zero convs make every residual exactly 0, so the first steps
leave Stable Diffusion unchanged and the copy learns from there (`ControlNetModel.from_unet`).

Module attribute names equal the keys of lllyasviel/sd-controlnet-* and control_v11p_sd15_* checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.layers import TimestepEmbedding, broadcast_timesteps, timestep_embedding
from ..blocks.unet_blocks import DownBlock2D
from ..core.config import ModelConfig, check_group_norm
from .modeling import PretrainedModel
from .unet_2d_condition import (DOWN_BLOCK_TYPES, CrossAttnDownBlock2D, UNet2DConditionModel, UNetMidBlock2DCrossAttn,
                                per_block)


@dataclass(frozen=True)
class ControlNetConfig(ModelConfig):
    """The keys of a diffusers `ControlNetModel` config.json; defaults are diffusers' (SD v1 widths)."""

    in_channels: int = 4
    conditioning_channels: int = 3                   # 3 for every SD v1.5 ControlNet (edges are drawn in RGB)
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8    # the number of heads, as in the UNet's config
    num_attention_heads: int | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False                   # accepted, without effect (see UNet2DConditionConfig)
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    # The ControlNet "shuffle" of v1.1: residuals averaged over H and W, and always run as in guess mode.
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64          # only read with addition_embed_type, which is refused

    # Options of the format that minidiff builds only at these values (SDXL and the like).
    _supported_values = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": (False,),
        "transformer_layers_per_block": (1,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "num_attention_heads": (None,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default",),
        "projection_class_embeddings_input_dim": (None,),
        "controlnet_conditioning_channel_order": ("rgb", "bgr"),
        "act_fn": ("silu", "swish"),
    }

    def check(self) -> None:
        """What `_supported_values` cannot say: block types, channel counts, per-block lists."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ValueError(f"ControlNetConfig: expected one down block per entry of block_out_channels ({n}), found "
                             f"{len(self.down_block_types)} down_block_types. Make the two lists the same length.")
        unknown = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        if unknown:
            raise ValueError(f"ControlNetConfig does not implement the block type(s) {unknown} in down_block_types; "
                             f"minidiff supports {list(DOWN_BLOCK_TYPES)} (Stable Diffusion 1/2 ControlNets).")
        check_group_norm(self)
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"ControlNetConfig: expected layers_per_block to be one int (as diffusers' ControlNetModel "
                             f"reads it), found {self.layers_per_block!r}.")
        if not isinstance(self.attention_head_dim, int) and len(self.attention_head_dim) != n:
            raise ValueError(f"ControlNetConfig: expected attention_head_dim to be one int or a list of {n}, found "
                             f"{self.attention_head_dim!r}.")
        if len(self.conditioning_embedding_out_channels) < 1:
            raise ValueError(f"ControlNetConfig: conditioning_embedding_out_channels must list at least one width, "
                             f"found {self.conditioning_embedding_out_channels!r}.")


@dataclass
class ControlNetOutput:
    """One residual per skip of the UNet (12 for SD: (B, 320, h, w) x 3, ..., (B, 1280, h/8, w/8) x 3),
    and one for its mid block's output (B, 1280, h/8, w/8); each already times conditioning_scale."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 conv whose weight and bias start at 0 (paper sec. 3.1): its output is 0 until training moves it."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """The condition image -> a feature map at the latent's size: (B, 3, 8h, 8w) -> (B, C0, h, w).

    The paper's "tiny network E" (sec. 3.2): conv_in, then per width a 3x3 conv and a stride-2 3x3 conv, SiLU
    after each (3 -> 16 -> 32 -> 96 -> 256 for SD, three halvings: 512 px -> 64), then a zero-initialised
    conv_out to the UNet's first width, so the condition adds nothing at the start of training.
    """

    def __init__(self, conditioning_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))   # halves H and W
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(condition))                                 # (B, 16, H, W)
        for conv in self.blocks:
            h = F.silu(conv(h))                                             # ... -> (B, 256, H/8, W/8)
        return self.conv_out(h)                                             # (B, C0, H/8, W/8)


class ControlNetModel(PretrainedModel):
    """(z_t, t, text, condition image) -> residuals for the UNet's skips and mid block.

    `ControlNetModel.from_pretrained("lllyasviel/sd-controlnet-canny")` loads the hub checkpoint strictly;
    `ControlNetModel.from_unet(unet)` starts training from a UNet (every residual 0).
    """

    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config                                   # checked when it was made (ModelConfig)
        channels = config.block_out_channels
        n = len(channels)
        heads = per_block(config.attention_head_dim, n)        # the misnamed field: heads per block
        temb_dim = 4 * channels[0]
        groups, eps = config.norm_num_groups, config.norm_eps
        text = dict(cross_attention_dim=config.cross_attention_dim, use_linear_projection=config.use_linear_projection)

        # The copy of the UNet's encoder: the UNet's classes and names, so `from_unet` copies weights key by key.
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, channels[0])
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            level = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=temb_dim,
                         num_layers=config.layers_per_block, groups=groups, eps=eps, dropout=0.0,
                         add_downsample=i < n - 1, downsample_padding=config.downsample_padding)
            if block_type == "CrossAttnDownBlock2D":
                self.down_blocks.append(CrossAttnDownBlock2D(**level, heads=heads[i], **text))
            else:
                self.down_blocks.append(DownBlock2D(**level))
        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_dim, groups, eps, 0.0, config.mid_block_scale_factor,
                                                 heads=heads[-1], **text)

        # The zero convolutions, one per skip in the order the UNet pushes them: conv_in's output, then per
        # block its `layers_per_block` resnet outputs and (all but the last block) its downsampled output.
        skip_channels = [channels[0]]
        for i in range(n):
            skip_channels += [channels[i]] * (config.layers_per_block + (1 if i < n - 1 else 0))
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(c) for c in skip_channels])
        self.controlnet_mid_block = zero_conv(channels[-1])

    @property
    def condition_scale_factor(self) -> int:
        """Pixels of the condition image per latent position: 2 ** (number of stride-2 convs), 8 for SD."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3) -> "ControlNetModel":
        """A ControlNet for `unet`, as training starts it: the encoder's weights copied from the UNet, the
        conditioning embedding random but for its zero conv_out, every zero convolution 0 -> all residuals 0."""
        u = unet.config
        if u.dropout != 0.0:
            raise ValueError(f"The UNet has dropout={u.dropout}; diffusers' ControlNetModel has no dropout, so its "
                             "encoder copy would differ. Build the ControlNet from a UNet with dropout 0.")
        if not isinstance(u.layers_per_block, int) and len(set(u.layers_per_block)) == 1:
            layers = u.layers_per_block[0]
        else:
            layers = u.layers_per_block
        config = ControlNetConfig(
            in_channels=u.in_channels, conditioning_channels=conditioning_channels,
            flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=u.freq_shift, down_block_types=u.down_block_types,
            block_out_channels=u.block_out_channels, layers_per_block=layers,
            downsample_padding=u.downsample_padding, mid_block_scale_factor=u.mid_block_scale_factor,
            act_fn=u.act_fn, norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
            cross_attention_dim=u.cross_attention_dim, attention_head_dim=u.attention_head_dim,
            use_linear_projection=u.use_linear_projection, upcast_attention=u.upcast_attention,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )
        controlnet = cls(config).to(device=unet.device, dtype=unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return controlnet

    def _check_inputs(self, sample, encoder_hidden_states, controlnet_cond) -> None:
        c, f = self.config.conditioning_channels, self.condition_scale_factor
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected sample of shape (B, {self.config.in_channels}, h, w) (VAE latents), "
                             f"found {tuple(sample.shape)}.")
        B, _, h, w = sample.shape
        d = self.config.cross_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B or encoder_hidden_states.shape[2] != d:
            raise ValueError(f"Expected encoder_hidden_states of shape ({B}, M, {d}), found "
                             f"{tuple(encoder_hidden_states.shape)}. Use the text encoder of the UNet this "
                             "ControlNet was trained for, repeated to the batch size of sample.")
        expected = (B, c, f * h, f * w)
        if tuple(controlnet_cond.shape) != expected:
            raise ValueError(
                f"Expected controlnet_cond of shape {expected}: {c} channels, {f}x the latent's {h}x{w} "
                f"(the image size), one per sample. Found {tuple(controlnet_cond.shape)}. Resize the condition "
                f"image to {f * h}x{f * w} pixels and give it {c} channels (a grayscale edge map repeated to RGB)."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """sample (B, 4, h, w), t, text (B, M, D), controlnet_cond (B, 3, 8h, 8w) in [0, 1] -> residuals.

        `guess_mode`: the residuals scaled from 0.1 (conv_in's skip) up to 1.0 (the mid block), in log steps,
        as the original code's "guess mode" does when the ControlNet must recognise the condition without a
        prompt. `return_dict=False` returns the (down, mid) pair, as diffusers does, for code written for it.
        """
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond)
        B = sample.shape[0]
        context = encoder_hidden_states                                      # (B, M, D)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)                       # the checkpoint was trained on BGR

        # 1. timestep embedding, as in the UNet
        t = broadcast_timesteps(timestep, B, sample.device)                  # (B,)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)      # (B, C0)
        temb = self.time_embedding(t_emb)                                    # (B, 4*C0)

        # 2. the latent plus the embedded condition image, both (B, C0, h, w)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)

        # 3. the UNet's encoder: down blocks, every intermediate map kept, then the mid block
        skips = [h]
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlock2D):                      # only these read the text
                h = block(h, temb, skips, context)
            else:
                h = block(h, temb, skips)
        h = self.mid_block(h, temb, context)                                 # (B, C_last, h/2^k, w/2^k)

        # 4. one zero convolution per skip and one on the mid block's output
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)

        # 5. scale: one factor for all, or guess mode's 0.1 ... 1.0 (13 steps for SD's 12 skips + mid)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]          # (B, C, 1, 1): the same everywhere
            mid = mid.mean(dim=(2, 3), keepdim=True)

        # The one return_dict switch in minidiff (STYLE rule 7 says none): diffusers' ControlNet code unpacks
        # `down, mid = controlnet(..., return_dict=False)`, and that line should run unchanged.
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


class MultiControlNetModel(nn.Module):
    """Several ControlNets steering one UNet: each reads its own condition image, at its own scale, and their
    residuals are summed (diffusers' MultiControlNetModel). `nets` keeps them, in the order of the images."""

    def __init__(self, controlnets: list[ControlNetModel]):
        super().__init__()
        if len(controlnets) < 1 or not all(isinstance(c, ControlNetModel) for c in controlnets):
            raise ValueError(f"MultiControlNetModel takes a non-empty list of ControlNetModel; found "
                             f"{[type(c).__name__ for c in controlnets]}.")
        self.nets = nn.ModuleList(controlnets)

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond: list[torch.Tensor],
                conditioning_scale: list[float], guess_mode: bool = False, return_dict: bool = True):
        """As ControlNetModel.forward, with one condition image and one scale per net: the residuals' sum."""
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"Expected one condition image and one scale per ControlNet ({len(self.nets)}), found "
                             f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales.")
        down, mid = None, None
        for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            out = net(sample, timestep, encoder_hidden_states, image, scale, guess_mode)
            if down is None:
                down, mid = out.down_block_res_samples, out.mid_block_res_sample
            else:
                down = [a + b for a, b in zip(down, out.down_block_res_samples)]
                mid = mid + out.mid_block_res_sample
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


def check_controlnet_fits_unet(controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str = "controlnet") -> None:
    """A clear error when `controlnet` was built for another UNet: its residuals would not fit the UNet's skips."""
    mine, theirs = controlnet.config, unet.config
    differ = [f"{f}: ControlNet {getattr(mine, f)!r}, UNet {getattr(theirs, f)!r}"
              for f in ("in_channels", "block_out_channels", "down_block_types", "cross_attention_dim")
              if getattr(mine, f) != getattr(theirs, f)]
    n = len(theirs.block_out_channels)
    if (mine.layers_per_block,) * n != per_block(theirs.layers_per_block, n):
        differ.append(f"layers_per_block: ControlNet {mine.layers_per_block!r}, UNet {theirs.layers_per_block!r}")
    if differ:
        raise ValueError(f"{name} was built for another UNet: {'; '.join(differ)}. Use a ControlNet trained for "
                         "this Stable Diffusion version (SD v1.5 ControlNets for SD v1.x), or "
                         "ControlNetModel.from_unet(unet) to start a new one.")
