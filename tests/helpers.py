"""Helpers for parity tests against diffusers."""

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite EVERY parameter with random values (diffusers zero-initialises some layers, e.g. conv_out
    and proj_out, and a comparison of zeros proves nothing). Scaled by fan-in so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            # norm weights around 1, biases and norm shifts around 0
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the parity tests bound."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
