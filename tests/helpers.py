"""Plain helpers shared by the tests: random weights, error measures, seeds, loading pipelines quietly, images."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv
from torch import nn

import minidiff
from minidiff.checkpoints import TINY_SD


def tiny_sd_sizes(folder: str = TINY_SD) -> tuple[int, int]:
    """(f, h) of a tiny-sd folder, read from its configs: pixels per latent (the VAE's factor: 8 for the first
    tiny-sd, 4 for the second) and the UNet's latent side (64 // f)."""
    with open(os.path.join(folder, "vae", "config.json")) as vae, open(os.path.join(folder, "unet", "config.json")) as unet:
        return 2 ** (len(json.load(vae)["block_out_channels"]) - 1), json.load(unet)["sample_size"]


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


def max_pixel_diff(a, b) -> float:
    """Largest difference of two image batches in [0, 1] (np arrays, CPU tensors or lists of PIL images)."""
    if isinstance(a, list):
        a = np.stack([np.asarray(x, dtype=np.float32) / 255 for x in a])
        b = np.stack([np.asarray(x, dtype=np.float32) / 255 for x in b])
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --- seeds ------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gens(*seeds: int) -> list[torch.Generator]:
    """One generator a seed: `gens(0, 1)` for a batch of two images."""
    return [gen(s) for s in seeds]


# --- pipelines --------------------------------------------------------------------------------------
def quiet(pipe):
    """The pipeline with its progress bar off (minidiff or diffusers)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_minidiff(cls, folder="tiny-sd", **kwargs):
    """cls.from_pretrained(folder, **kwargs) of a minidiff pipeline class, warnings silenced, progress bar off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quiet(cls.from_pretrained(folder, **kwargs))


def load_diffusers(name: str, folder=TINY_SD, **kwargs):
    """diffusers.<name>.from_pretrained(folder, **kwargs) without safety checker, warnings silenced, progress bar
    off (a Stable Diffusion pipeline; tiny-sd's folder by default). Skips where diffusers is not installed."""
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quiet(getattr(diffusers, name).from_pretrained(
            folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs))


def plain_pipeline(pipe):
    """minidiff's StableDiffusionPipeline on `pipe`'s components (progress bar off): plain text-to-image, what a
    controlled pipeline must reduce to when its control does nothing."""
    return quiet(minidiff.StableDiffusionPipeline(**pipe.components))


# --- images -----------------------------------------------------------------------------------------
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, what evaluate.analyse and PIL.Image.fromarray read."""
    return (np.asarray(image[0].permute(1, 2, 0)) * 255).round().astype(np.uint8)


def as_tensor(image) -> torch.Tensor:
    """A PIL RGB image -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def colour_share(images: np.ndarray, hue_degrees: float) -> np.ndarray:
    """Share of the pixels that are saturated and within 30 degrees of a hue (red 0, blue 240): (B,)."""
    hsv = rgb_to_hsv(np.clip(images, 0, 1))                               # (B, H, W, 3)
    distance = np.abs(hsv[..., 0] * 360 - hue_degrees) % 360
    distance = np.minimum(distance, 360 - distance)
    return ((distance < 30) & (hsv[..., 1] > 0.4) & (hsv[..., 2] > 0.2)).mean(axis=(1, 2))
