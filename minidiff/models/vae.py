"""The KL autoencoder of latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752, sec. 3
and appendix G), as in Stable Diffusion's `vae/` folder.

    encode: image x (B, 3, H, W) -> q(z | x) = N(mean, std^2), each (B, 4, H/8, W/8)
    decode: latent z (B, 4, H/8, W/8) -> image (B, 3, H, W)

Stable Diffusion's UNet works on `z * scaling_factor` (0.18215 for SD v1), which gives the latents
roughly unit variance (Rombach et al. 2022, sec. 4.3.2 and appendix D.1); the pipelines multiply after
`encode` and divide before `decode`.

The encoder is conv_in, then per level `layers_per_block` ResNet blocks and a stride-2 conv (not after
the last level), a mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU and a conv to
2 * latent_channels: the mean and log-variance of the Gaussian. `quant_conv` / `post_quant_conv` are 1x1
convs kept from the VQ-GAN code the model descends from. The decoder mirrors the encoder with
`layers_per_block + 1` ResNet blocks per level and nearest-neighbour upsampling; it has no skip
connections and no timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from ..blocks.unet_blocks import UNetMidBlock2D
from ..core.config import ModelConfig, check_block_types, check_group_norm
from ..core.utils import randn_tensor
from .modeling import PretrainedModel
from .single_file import vae_from_single_file

EPS = 1e-6  # the GroupNorm epsilon of every norm in the VAE (fixed in the original code, not in config.json)


@dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """The keys of an `AutoencoderKL` config.json; defaults are diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215     # SD v1's value; files written before diffusers 0.13 lack the key
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True           # read by pipelines: run this VAE in fp32 even in an fp16 pipeline
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # Options of the checkpoint format that minidiff does not implement, accepted only at these values
    # (SD 3 / Flux VAEs set shift_factor and drop quant_conv; SDXL-era ones may set latents_mean/std).
    _supported_values = {
        "act_fn": ("silu", "swish"),    # the same function under two names
        "shift_factor": (None,),
        "latents_mean": (None,),
        "latents_std": (None,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
    }

    def check(self) -> None:
        """What `_supported_values` cannot say: block types and channel counts."""
        check_block_types(self, ("DownEncoderBlock2D",), ("UpDecoderBlock2D",))
        check_group_norm(self)


@dataclass
class AutoencoderKLOutput:
    """`latent_dist`: the posterior q(z | x)."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput:
    """`sample`: the decoded images, (B, out_channels, H, W), roughly in [-1, 1]."""

    sample: torch.Tensor


class DiagonalGaussianDistribution:
    """q(z | x) = N(mean, diag(var)), from the encoder's (B, 2 * latent_channels, h, w) output.

    The first half of the channels is the mean, the second the log-variance, clamped to [-30, 20] so
    that exp() stays finite.
    """

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # (B, 2L, h, w) -> 2 x (B, L, h, w)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, sec. 2.4)."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                           dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per image, (B,); `other=None` is the prior N(0, I) (the VAE's KL loss term)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])


def _mid_block(channels: int, groups: int) -> UNetMidBlock2D:
    """ResNet, self-attention with one head over all channels, ResNet; no timestep."""
    attention = Attention(channels, heads=1, dim_head=channels, bias=True, norm_groups=groups, eps=EPS)
    return UNetMidBlock2D(channels, None, groups, EPS, attention=attention)


class DownEncoderBlock2D(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H/2, W/2) (no halving at the last level). Keys: `resnets.i`, `downsamplers.0`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups, eps=EPS)
            for i in range(num_layers)
        ])
        # padding=0: pad only the right and bottom edge, as the original LDM code does
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h


class UpDecoderBlock2D(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, 2H, 2W) (no doubling at the last level). Keys: `resnets.i`, `upsamplers.0`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups, eps=EPS)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class Encoder(nn.Module):
    """Image (B, C_img, H, W) -> Gaussian parameters (B, 2 * latent_channels, H / 2^(n-1), W / 2^(n-1))."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                               add_downsample=i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.mid_block = _mid_block(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                          # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)                                             # halves H, W (except the last)
        h = self.mid_block(h)                                        # (B, C_last, h, w)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))   # (B, 2L, h, w)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, C_img, h * 2^(n-1), w * 2^(n-1))."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        reversed_channels = list(reversed(channels))
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = _mid_block(channels[-1], groups)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1,
                             groups, add_upsample=i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)                                          # (B, C_last, h, w)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)                                             # doubles H, W (except the last)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))   # (B, C_img, H, W)


def _blend_into(a: torch.Tensor, b: torch.Tensor, n: int, dim: int) -> None:
    """Cross-fade the first n rows (dim=2) or columns (dim=3) of tile b from a's last n: weight y/n on b."""
    n = min(a.shape[dim], b.shape[dim], n)
    w = torch.arange(n, device=b.device, dtype=torch.float64) / n            # 0, 1/n, ..., (n-1)/n
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)                         # along H or along W
    head, tail = b.narrow(dim, 0, n), a.narrow(dim, a.shape[dim] - n, n)
    head.copy_(tail * (1 - w).to(b.dtype) + head * w.to(b.dtype))


class AutoencoderKL(PretrainedModel):
    """The Stable Diffusion VAE: `encode(x).latent_dist` and `decode(z).sample`.

    `AutoencoderKL.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="vae")`.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config                                         # checked when it was made (ModelConfig)
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1)
        self.post_quant_conv = nn.Conv2d(L, L, 1)
        self.use_slicing = False
        # Tiling (enable_tiling): tiles of the config's sample_size (512 pixels = 64 latents for SD), a quarter
        # overlapping its neighbours, as diffusers does.
        self.use_tiling = False
        sample_size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        self.tile_sample_size = sample_size
        self.tile_latent_size = sample_size // 2 ** (len(config.block_out_channels) - 1)
        self.tile_overlap = 0.25

    @classmethod
    def from_single_file(cls, path: str, config=None, torch_dtype: torch.dtype | None = None) -> "AutoencoderKL":
        """The VAE of an original CompVis / LDM single file, or a VAE-only file (vae-ft-mse-840000-...), offline,
        no pickle run; SD's VAE config unless `config=` (a dict or a vae/ folder): see models/single_file.py."""
        return vae_from_single_file(cls, path, config, torch_dtype)

    def enable_slicing(self) -> None:
        """Encode and decode one image of a batch at a time: less peak memory for large batches, same result."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Encode and decode images larger than one tile (512x512 for SD) in overlapping tiles, blended at the
        seams: the memory of one tile for any image size. Not identical to the plain result (each tile sees
        only its own neighbourhood); equal to diffusers' tiling."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2L, H/8, W/8) moments; in tiles when tiling is on and x is larger than a tile."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            return self._tiled(x, lambda tile: self.quant_conv(self.encoder(tile)),
                               self.tile_sample_size, self.tile_latent_size)
        return self.quant_conv(self.encoder(x))

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) -> (B, C, 8h, 8w) images; in tiles when tiling is on and z is larger than a tile."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_size:
            return self._tiled(z, lambda tile: self.decoder(self.post_quant_conv(tile)),
                               self.tile_latent_size, self.tile_sample_size)
        return self.decoder(self.post_quant_conv(z))

    def _tiled(self, x: torch.Tensor, run, tile_in: int, tile_out: int) -> torch.Tensor:
        """`run` on tiles of x, tile_in wide and 3/4 of a tile apart; each output tile (tile_out wide) is
        blended into its upper and left neighbours over a quarter tile, then cut to 3/4 and the pieces joined."""
        stride = int(tile_in * (1 - self.tile_overlap))              # SD decode: 48 latents
        blend = int(tile_out * self.tile_overlap)                    # SD decode: 128 pixels
        keep = tile_out - blend                                      # SD decode: 384 pixels
        H, W = x.shape[-2:]
        rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, W, stride)]
                for i in range(0, H, stride)]
        joined_rows = []
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                # In place, as diffusers does: a tile blended here is read blended by the tiles after it.
                if i > 0:
                    _blend_into(rows[i - 1][j], tile, blend, dim=2)   # top edge <- the tile above
                if j > 0:
                    _blend_into(row[j - 1], tile, blend, dim=3)       # left edge <- the tile on the left
            joined_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
        return torch.cat(joined_rows, dim=2)                         # (B, C, ~H*tile_out/tile_in, ...)

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"Expected {what} of shape (B, {channels}, H, W), found {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        """Images (B, C, H, W), roughly in [-1, 1] -> AutoencoderKLOutput(latent_dist=q(z | x))."""
        self._check_input(x, self.config.in_channels, "images")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_one(x_i) for x_i in x.split(1)])
        else:
            moments = self._encode_one(x)                            # (B, 2L, h, w)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """Latents (B, L, h, w), unscaled (divide by scaling_factor first) -> DecoderOutput(sample=images)."""
        self._check_input(z, self.config.latent_channels, "latents")
        if self.use_slicing and z.shape[0] > 1:
            images = torch.cat([self._decode_one(z_i) for z_i in z.split(1)])
        else:
            images = self._decode_one(z)                              # (B, C, H, W)
        return DecoderOutput(sample=images)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> DecoderOutput:
        """Reconstruct: decode(z) with z the posterior's mean, or a sample from it when `sample_posterior`."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z)
