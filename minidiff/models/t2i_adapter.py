"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models", https://arxiv.org/abs/2302.08453): a small convolutional network that turns
a condition image into one feature map per level of the UNet's encoder, computed ONCE per image (not at
every step, unlike ControlNet: it sees neither z_t nor t nor the text).

full_adapter (the SD v1.5 adapters, TencentARC/t2iadapter_*_sd15v2, ~77 M parameters):

    condition (B, C_in, H, W) in [0, 1], C_in = 1 (canny, sketch) or 3 (depth, color, pose, seg)
      -> PixelUnshuffle(8): each 8x8 patch of pixels becomes 64 channels       (B, 64 C_in, H/8, W/8)
      -> conv_in 3x3                                                            (B, 320, H/8, W/8)
      -> body.0: 2 resnets                                  feature 0           (B, 320, H/8, W/8)
      -> body.1: avg-pool /2, 1x1 in_conv, 2 resnets        feature 1           (B, 640, H/16, W/16)
      -> body.2, body.3: the same at 1280                   features 2, 3       (B, 1280, H/32 and H/64)
      resnet: x + conv1x1(relu(conv3x3(x)))

The UNet adds feature i to the output of its down block i before that block's downsampler
(`down_intrablock_additional_residuals`, see `unet_2d_condition.py`).

light_adapter (the smaller "light" checkpoints): no conv_in; each of the 4 blocks is a 1x1 in_conv to a
quarter of the width, 4 narrow resnets (both convs 3x3), a 1x1 out_conv back; the first keeps the size.
Module attribute names equal the keys of the diffusers checkpoints (`adapter.body.1.resnets.0.block1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import ModelConfig
from .modeling import PretrainedModel

ADAPTER_TYPES = ("full_adapter", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig(ModelConfig):
    """The keys of a diffusers `T2IAdapter` config.json; defaults are diffusers' (the SD v1.5 full adapter)."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def check(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"T2IAdapterConfig: minidiff's T2IAdapter builds adapter_type {list(ADAPTER_TYPES)}, found "
                             f"{self.adapter_type!r} (full_adapter_xl is the SDXL adapter, which minidiff does not run).")
        if len(self.channels) < 1 or self.num_res_blocks < 1 or self.downscale_factor < 1:
            raise ValueError(f"T2IAdapterConfig: expected at least one width in channels, num_res_blocks >= 1 and "
                             f"downscale_factor >= 1; found {self.channels!r}, {self.num_res_blocks}, "
                             f"{self.downscale_factor}.")


class AdapterResnetBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): x + block2(relu(block1(x))); block2 is 1x1 (full) or 3x3 (light)."""

    def __init__(self, channels: int, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, kernel_size=second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    """One level of the full adapter: (B, C_in, H, W) -> (B, C_out, H/2, W/2) (or H, W when not `down`).

    Average-pool (rounding up, like the UNet's stride-2 conv on odd sizes), a 1x1 in_conv where the width
    changes, then `num_res_blocks` resnets.
    """

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(c_out, second_kernel=1) for _ in range(num_res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)                                          # (B, C_in, ceil(H/2), ceil(W/2))
        if self.in_conv is not None:
            x = self.in_conv(x)                                             # (B, C_out, ., .)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """One level of the light adapter: 1x1 to C_out/4, `num_res_blocks` narrow resnets, 1x1 back to C_out."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool):
        super().__init__()
        mid = c_out // 4
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, mid, kernel_size=1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(mid, second_kernel=3) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(mid, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))                # (B, C_out, ., .)


class FullAdapter(nn.Module):
    """PixelUnshuffle -> conv_in -> one AdapterBlock per width, every block's output kept."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        ch, f = config.channels, config.downscale_factor
        self.unshuffle = nn.PixelUnshuffle(f)
        self.conv_in = nn.Conv2d(config.in_channels * f * f, ch[0], kernel_size=3, padding=1)
        self.body = nn.ModuleList([
            AdapterBlock(ch[max(i - 1, 0)], ch[i], config.num_res_blocks, down=i > 0) for i in range(len(ch))
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv_in(self.unshuffle(x))                                 # (B, C_in f², H/f, W/f) -> (B, ch0, ..)
        features = []
        for block in self.body:
            h = block(h)
            features.append(h)
        return features


class LightAdapter(nn.Module):
    """PixelUnshuffle -> one LightAdapterBlock per width and one more at the last width, all kept.

    With channels (320, 640, 1280): 4 features, (320, H/8), (640, H/16), (1280, H/32), (1280, H/64).
    """

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        ch, f = config.channels, config.downscale_factor
        self.unshuffle = nn.PixelUnshuffle(f)
        c_in = [config.in_channels * f * f, *ch]
        c_out = [*ch, ch[-1]]
        self.body = nn.ModuleList([
            LightAdapterBlock(c_in[i], c_out[i], config.num_res_blocks, down=i > 0) for i in range(len(c_out))
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.unshuffle(x)                                               # (B, C_in f², H/f, W/f)
        features = []
        for block in self.body:
            h = block(h)
            features.append(h)
        return features


class T2IAdapter(PretrainedModel):
    """Condition image (B, in_channels, H, W) in [0, 1] -> one feature map per UNet down block.

    `T2IAdapter.from_pretrained("TencentARC/t2iadapter_canny_sd15v2")` reads the hub's pickled
    diffusion_pytorch_model.bin with `torch.load(weights_only=True)`, which runs no code from the file.
    """

    config_class = T2IAdapterConfig

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config                                   # checked when it was made (ModelConfig)
        # One submodule named `adapter`, because the checkpoint keys start with `adapter.`.
        self.adapter = FullAdapter(config) if config.adapter_type == "full_adapter" else LightAdapter(config)

    @property
    def total_downscale_factor(self) -> int:
        """Pixels per position of the last feature map: 64 for SD (8 from the unshuffle, 2 per halving)."""
        return self.config.downscale_factor * 2 ** (len(self.adapter.body) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c, f = self.config.in_channels, self.config.downscale_factor
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"Expected a condition image of shape (B, {c}, H, W) with H and W multiples of {f}, found "
                f"{tuple(x.shape)}. This adapter reads {c}-channel images ({'grayscale' if c == 1 else 'RGB'}) "
                f"in [0, 1]; resize the image to a multiple of {f} pixels."
            )
        return self.adapter(x)


class MultiAdapter(nn.Module):
    """Several T2I-Adapters: the weighted sum of their features, sum_i w_i F_i (diffusers' MultiAdapter;
    the weights default to 1/N each)."""

    def __init__(self, adapters: list[T2IAdapter]):
        super().__init__()
        if len(adapters) < 1 or not all(isinstance(a, T2IAdapter) for a in adapters):
            raise ValueError(f"MultiAdapter takes a non-empty list of T2IAdapter; found "
                             f"{[type(a).__name__ for a in adapters]}.")
        factors = {(a.config.downscale_factor, a.total_downscale_factor) for a in adapters}
        if len(factors) > 1:
            raise ValueError(f"The adapters of a MultiAdapter must shrink the image the same way, found (downscale_factor, "
                             f"total_downscale_factor) {sorted(factors)}. Combine adapters of the same type.")
        self.adapters = nn.ModuleList(adapters)

    @property
    def dtype(self) -> torch.dtype:
        return self.adapters[0].dtype

    def forward(self, xs: list[torch.Tensor], adapter_weights: list[float] | None = None) -> list[torch.Tensor]:
        n = len(self.adapters)
        weights = [1 / n] * n if adapter_weights is None else list(adapter_weights)
        if len(xs) != n or len(weights) != n:
            raise ValueError(f"Expected one condition image and one weight per adapter ({n}), found {len(xs)} "
                             f"images and {len(weights)} weights.")
        total = None
        for x, w, adapter in zip(xs, weights, self.adapters):
            features = [w * f for f in adapter(x)]
            total = features if total is None else [a + b for a, b in zip(total, features)]
        return total
