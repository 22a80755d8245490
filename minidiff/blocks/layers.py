"""The building blocks shared by every minidiff model: read this file once, then the models read easily.

- `broadcast_timesteps`: a UNet's timestep argument (one number, or one per image) -> (B,).
- `timestep_embedding` / `TimestepEmbedding`: the sinusoidal embedding of the timestep t, then an MLP
  (Vaswani et al. 2017, sec. 3.5; used for diffusion by Ho et al. 2020, appendix B).
- `ResnetBlock2D`: GroupNorm -> SiLU -> conv, plus the timestep embedding, twice, with a skip
  (He et al. 2016; the DDPM variant of Ho et al. 2020).
- `Attention`: multi-head attention over the H*W positions of a feature map (self-attention) or over
  text tokens (cross-attention, Rombach et al. 2022), through `F.scaled_dot_product_attention`.
- `Downsample2D` / `Upsample2D`: halve or double H and W.

Attribute names equal the keys of diffusers checkpoints (`conv1`, `time_emb_proj`, `to_q`, `to_out.0`),
so a checkpoint's weights load into these modules with no renaming.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


def broadcast_timesteps(timestep: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """One timestep for the whole batch, or one per image -> (B,) on `device`; both UNets take t this way.

    `timestep`: a Python number, a 0-d tensor, or a tensor of shape (1,) or (B,); a tensor keeps its dtype.
    A Python int becomes int64 and a float float64 (int32 / float32 on Apple's MPS, which has no 64-bit
    types), as in diffusers' UNet2DConditionModel: a fractional t such as 10.5 stays 10.5 (diffusers'
    UNet2DModel would truncate it to 10). `timestep_embedding` computes in float32 whatever the dtype.
    """
    if not torch.is_tensor(timestep):
        if not isinstance(timestep, numbers.Real):
            raise TypeError(f"Expected timestep to be a number or a tensor, found a {type(timestep).__name__}. "
                            f"For one timestep per image pass a tensor of shape ({batch_size},).")
        is_int = isinstance(timestep, numbers.Integral)
        if device.type == "mps":
            dtype = torch.int32 if is_int else torch.float32
        else:
            dtype = torch.int64 if is_int else torch.float64
        timestep = torch.tensor(timestep, dtype=dtype, device=device)         # ()
    t = timestep.to(device)
    if t.ndim == 0:
        t = t[None]                                                          # () -> (1,)
    if t.ndim != 1 or t.shape[0] not in (1, batch_size):
        raise ValueError(
            f"Expected timestep to be a number, a 0-d tensor, or a tensor of shape (1,) or ({batch_size},) for a "
            f"batch of {batch_size}, found shape {tuple(t.shape)}. Pass one timestep for all images or one per image."
        )
    return t.expand(batch_size)                                              # (1,) or (B,) -> (B,)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps: (B,) -> (B, dim).

    freq_i = max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2-1
    emb    = [sin(t * freq), cos(t * freq)]   (or [cos, sin] when flip_sin_to_cos)
    `freq_shift` is 1 in the original DDPM code and 0 in Stable Diffusion.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))                    # (dim/2,)
    args = timesteps[:, None].float() * freqs[None, :]                   # (B, dim/2)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)          # (B, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)          # [cos, sin]
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))                                         # (B, dim) for odd dim
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP after the sinusoidal embedding: (B, in_dim) -> (B, time_embed_dim)."""

    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """(B, C_in, H, W) [+ temb (B, T)] -> (B, C_out, H, W).

    h = conv1(silu(norm1(x))) + proj(silu(temb));  h = conv2(silu(norm2(h)));  out = (skip(x) + h) / scale
    The VAE's blocks have no timestep: `temb_channels=None`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 conv on the skip path only where the channel count changes.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]      # (B, C_out) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention, (B, N, query_dim) [+ context (B, M, context_dim)] -> (B, N, query_dim).

    softmax(Q K^T / sqrt(d)) V, per head (Vaswani et al. 2017, eq. 1). With `norm_groups` set this is the
    attention block of the DDPM UNet and the VAE: it takes a feature map (B, C, H, W), GroupNorms it,
    attends over the H*W positions and adds the input back (a residual inside the block).

    Attention maps: set `store_attention_probs = True` on a layer (e.g. every cross-attention layer of
    the Stable Diffusion UNet, see `UNet2DConditionModel.cross_attention_layers()`) and each call then
    computes softmax(Q K^T / sqrt(d)) explicitly, uses it for the output, and keeps it on
    `self.attention_probs`, shape (B, heads, N, M), still attached to the autograd graph so a loss on the
    maps can be differentiated. When False (the default) the fused `F.scaled_dot_product_attention` runs.
    """

    store_attention_probs: bool = False   # the visible switch described above; set per layer
    attention_probs: torch.Tensor | None = None
    fused: bool = False                   # fast path: see fuse_projections()

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        bias: bool = False,
        norm_groups: int | None = None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.group_norm = nn.GroupNorm(norm_groups, query_dim, eps=eps) if norm_groups is not None else None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])  # key `to_out.0`
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 4:  # the feature-map form: GroupNorm, attend over positions, add the input back
            B, C, H, W = x.shape
            h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)       # (B, C, H, W) -> (B, H*W, C)
            h = self.attend(h, context)                                     # (B, H*W, C)
            h = h.transpose(1, 2).reshape(B, C, H, W)                       # (B, H*W, C) -> (B, C, H, W)
            return (h + x) / self.rescale_output_factor
        return self.attend(x, context)

    def fuse_projections(self) -> None:
        """Fast path: q, k, v from one matmul (self-attention) and k, v from one (cross-attention) instead of
        three or two. The fused weights are concatenated copies of to_q / to_k / to_v, kept as buffers outside
        the state dict (the checkpoint keys stay the same); they are not updated if those weights change, so
        fuse for inference only and call `unfuse_projections()` before training or loading weights."""
        q, k, v = self.to_q, self.to_k, self.to_v
        wrapped = [name for name, m in (("to_q", q), ("to_k", k), ("to_v", v)) if type(m) is not nn.Linear]
        if wrapped:   # e.g. a LoRA wrapper: fusing would copy the base weights and silently drop the adapter
            raise RuntimeError(f"fuse_projections() needs plain nn.Linear projections; {wrapped} are "
                               f"{type(getattr(self, wrapped[0])).__name__}. Call "
                               "fuse_projections() after pipe.unload_lora_weights(), or leave the projections unfused.")
        with torch.no_grad():
            if q.in_features == k.in_features:  # all three can read x: fuse q, k, v; k, v is the lower part
                weight = torch.cat([q.weight, k.weight, v.weight])                  # (3*heads*d, query_dim)
                bias = torch.cat([q.bias, k.bias, v.bias]) if q.bias is not None else None
                self.register_buffer("fused_qkv_weight", weight, persistent=False)
                self.register_buffer("fused_qkv_bias", bias, persistent=False)
                n = q.out_features
                kv_weight, kv_bias = weight[n:], (bias[n:] if bias is not None else None)  # views: no copy
            else:
                kv_weight = torch.cat([k.weight, v.weight])                         # (2*heads*d, context_dim)
                kv_bias = torch.cat([k.bias, v.bias]) if k.bias is not None else None
            self.register_buffer("fused_kv_weight", kv_weight, persistent=False)
            self.register_buffer("fused_kv_bias", kv_bias, persistent=False)
        self.fused = True

    def unfuse_projections(self) -> None:
        for name in ("fused_qkv_weight", "fused_qkv_bias", "fused_kv_weight", "fused_kv_bias"):
            if name in self._buffers:
                delattr(self, name)
        self.fused = False

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, query_dim), context (B, M, context_dim) or None for self-attention -> (B, N, query_dim)."""
        B, N, _ = x.shape
        if self.fused and context is None and "fused_qkv_weight" in self._buffers:
            qkv = F.linear(x, self.fused_qkv_weight, self.fused_qkv_bias)     # (B, N, 3*heads*d)
            q, k, v = qkv.chunk(3, dim=-1)                                  # 3 x (B, N, heads*d)
        elif self.fused:
            context = x if context is None else context
            q = self.to_q(x)                                                # (B, N, heads*d)
            k, v = F.linear(context, self.fused_kv_weight, self.fused_kv_bias).chunk(2, dim=-1)  # 2 x (B, M, heads*d)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|M, heads*d)
        d = q.shape[-1] // self.heads
        # (B, N, heads*d) -> (B, heads, N, d)
        q, k, v = (t.view(B, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        if self.store_attention_probs:
            # The slow, explicit path (Vaswani et al. 2017, eq. 1), in float32 so fp16 scores cannot overflow.
            scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)  # (B, heads, N, M)
            self.attention_probs = scores.softmax(dim=-1)                   # (B, heads, N, M), rows sum to 1
            out = self.attention_probs.to(v.dtype) @ v                      # (B, heads, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, N, self.heads * d)             # (B, heads, N, d) -> (B, N, heads*d)
        return self.to_out[1](self.to_out[0](out))


class Downsample2D(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) with a stride-2 3x3 conv.

    `padding=0` (the original DDPM and VAE code) pads only the right and bottom edge by one pixel.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))                                      # (left, right, top, bottom)
        return self.conv(x)


class Upsample2D(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour upsampling, then a 3x3 conv.

    `size` forces the output size, so the upsampled map matches its skip connection when H or W was odd.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # In the input's dtype, bfloat16 too (torch >= 2.1 has the kernel): a float32 round trip would hold a
        # float32 copy of the VAE decoder's largest activation (+250 MB at 512x512).
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
