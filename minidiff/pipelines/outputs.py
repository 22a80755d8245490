"""What a pipeline call returns, and what it records at every step so a notebook can show the latents."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from ..schedulers.base import predict_x0

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Intermediates:
    """Everything the sampler saw, step by step, so a notebook can show the latents at each timestep.

    Step i runs at timestep `timesteps[i]`; `latents[i]` is the sample after that step and `x0[i]` the
    model's estimate of the clean sample x_0 at that step. Each tensor is (B, C, h, w), a detached copy
    kept on the pipeline's device (moving it to the CPU here would stall the GPU at every step).
    """

    initial_latents: torch.Tensor | None = None
    timesteps: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ImagePipelineOutput:
    """`images`: a list of PIL images, a (B, H, W, 3) float array in [0, 1] (`"np"`), a (B, 3, H, W) tensor in
    [0, 1] (`"pt"`) or the final latents (`"latent"`). `intermediates`: filled by `return_intermediates=True`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    intermediates: Intermediates | None = None


def check_output_type(output_type: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {list(allowed)}; found {output_type!r}.")


def check_generator(generator, batch_size: int) -> None:
    """One torch.Generator, None, or a list with exactly one generator per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images (prompts x "
                "num_images_per_prompt). Pass one generator per image, or a single generator."
            )
        gens = list(generator)
    else:
        gens = [] if generator is None else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them; found {type(g).__name__}.")


def postprocess(image: torch.Tensor, output_type: str):
    """(B, C, H, W) in [-1, 1] -> the requested output type, exactly as diffusers' image processor does."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()          # (B, C, H, W) -> (B, H, W, C)
    if output_type == "np":
        return image
    pixels = (image * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def record_step(scheduler, i, t, sample, model_output, step_output, callback, intermediates) -> None:
    """Hand step i to `callback(i, t, latents, x0)` and store it in `intermediates` (either may be None)."""
    if callback is None and intermediates is None:
        return
    x0 = step_output.pred_original_sample
    if x0 is None:
        x0 = predict_x0(scheduler, sample, model_output, t)
    latents = step_output.prev_sample
    if callback is not None:
        callback(i, t, latents, x0)
    if intermediates is not None:
        intermediates.timesteps.append(t)
        intermediates.latents.append(latents.detach().clone())
        intermediates.x0.append(x0.detach().clone())
