"""DDIM inversion: find the noise z_T from which DDIM sampling gives back a given image.

Deterministic DDIM (η = 0) is a discretised ODE (Song et al. 2021, https://arxiv.org/abs/2010.02502,
sec. 4.3), so its steps can be run from the image towards the noise (Dhariwal & Nichol 2021;
Mokady et al. 2022, https://arxiv.org/abs/2211.09794, sec. 3). Editing methods (DiffEdit, Null-text
inversion, pix2pix-zero) start from these latents instead of fresh noise, so the parts they leave alone
come back unchanged.

1. encode the image: z_0 = scaling_factor · a sample of VAE.encode(image)          -> (B, 4, H/8, W/8)
2. encode the prompt (with guidance: also the unconditional prompt)                  -> (B or 2B, 77, D)
3. the DDIM timesteps in reverse, ascending: t_1 < ... < t_N
4. for each t_{i}: ε = guided UNet(z_{t_{i-1}}, t_i, text);  z_{t_i} = DDIMInverseScheduler.step(ε, t_i, z)
5. z_{t_N} ≈ z_T: sampling DDIM from it with the same prompt gives z_0 back (up to the error of step 4,
   which evaluates ε at the next timestep; guidance > 1 makes that error grow, Mokady et al. 2022, sec. 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch

from ..pipelines.outputs import Intermediates
from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
from ..pipelines.text import as_prompt_list, prompt_embeddings
from ..schedulers.ddim_inverse import DDIMInverseScheduler


@dataclass
class InversionOutput:
    """`latents`: the inverted noise z_{t_N}, (B, 4, h, w). `intermediates`: z_0 as `initial_latents`, then the
    latents after each inverse step (ascending noise) with their timesteps and x̂_0."""

    latents: torch.Tensor
    intermediates: Intermediates


def preprocess_image(pipe, image) -> torch.Tensor:
    """A PIL image (or list), or a (B, 3, H, W) tensor in [0, 1] -> (N, 3, H, W) in [-1, 1].

    As image-to-image, except that a PIL image whose sides are not multiples of 8 is refused rather than
    shrunk: the edit mask and the inverted latents live on the H/8 x W/8 latent grid of the image as given.
    """
    f = pipe.vae_scale_factor
    images = [image] if isinstance(image, PIL.Image.Image) else image
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        w, h = images[0].size
        if w % f or h % f:
            raise ValueError(f"The image is {w}x{h} pixels; inversion and DiffEdit need sides that are multiples of "
                             f"{f} (one latent per {f}x{f} pixels). Resize it first, e.g. to "
                             f"{max(f, w - w % f)}x{max(f, h - h % f)}.")
    return StableDiffusionImg2ImgPipeline.preprocess(pipe, image)


def encode_image(pipe, pixels: torch.Tensor, batch_size: int = 1, generator=None) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> z_0 = scaling_factor · a sample of q(z | x): (batch_size, 4, H/8, W/8).
    One image is repeated for every prompt, as diffusers does."""
    if batch_size % pixels.shape[0] != 0:
        raise ValueError(f"Got {pixels.shape[0]} images for {batch_size} prompts; pass one image, or one per prompt.")
    return pipe.encode(pixels.to(device=pipe.device, dtype=pipe.vae.dtype), batch_size, generator)


def check_strength(name: str, strength, num_inference_steps: int) -> int:
    """A strength in (0, 1] -> the number of steps it runs, int(strength · N), which must be at least 1."""
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of the {num_inference_steps} steps to "
                         f"run); found {strength!r}.")
    steps = min(int(num_inference_steps * strength), num_inference_steps)
    if steps == 0:
        raise ValueError(f"{name}={strength} of num_inference_steps={num_inference_steps} runs no step; raise "
                         f"{name} or num_inference_steps.")
    return steps


@torch.no_grad()
def ddim_invert(pipe, prompt: str | list[str], image=None, latents: torch.Tensor | None = None,
                num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt=None,
                strength: float = 1.0, generator=None, inverse_scheduler: DDIMInverseScheduler | None = None,
                callback=None) -> InversionOutput:
    """Image (or its latents z_0, (B, 4, h, w)) -> the DDIM noise latents; see the module docstring.

    Only the first int(strength · N) of the N inverse steps run (DiffEdit's `inpaint_strength`).
    `inverse_scheduler` defaults to `DDIMInverseScheduler.from_config(pipe.scheduler.config)`.
    `callback(i, t, latents, x0)` is called after every step.
    """
    # 0. Check the inputs before any work is done.
    prompts = as_prompt_list(prompt)
    if (image is None) == (latents is None):
        raise ValueError("Pass exactly one of image= (a PIL image or a (B, 3, H, W) tensor in [0, 1]) and "
                         "latents= (the VAE latents z_0 of the image, (B, 4, H/8, W/8)).")
    steps_run = check_strength("strength", strength, num_inference_steps)
    batch_size = len(prompts)
    device = pipe.device
    guidance = guidance_scale > 1.0

    # 1. z_0: (B, 4, h, w)
    if latents is None:
        latents = encode_image(pipe, preprocess_image(pipe, image), batch_size, generator)
    elif latents.ndim != 4 or latents.shape[0] != batch_size or latents.shape[1] != pipe.unet.config.in_channels:
        raise ValueError(f"latents must be (B, {pipe.unet.config.in_channels}, h, w) with B = {batch_size} prompts; "
                         f"found {tuple(latents.shape)}.")
    latents = latents.to(device=device, dtype=pipe.unet.dtype)

    # 2. Text embeddings: (2B, 77, D) [unconditional; prompt] with guidance, else (B, 77, D).
    text = prompt_embeddings(pipe.tokenizer, pipe.text_encoder, prompts, negative_prompt, 1, guidance, device)

    # 3. Ascending timesteps, the noisiest (1 - strength) of them left out.
    inverse = inverse_scheduler
    if inverse is None:
        inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=device)
    timesteps = inverse.timesteps[:steps_run]

    # 4. The noising loop: z_{t_{i-1}} -> z_{t_i}, the model called at the target timestep t_i.
    intermediates = Intermediates(initial_latents=latents.clone())
    for i, t in enumerate(pipe.progress_bar(timesteps)):
        eps = pipe.guided_eps(latents, t, text, guidance_scale, scheduler=inverse)  # ε̃: (B, 4, h, w)
        out = inverse.step(eps, t, latents)
        pipe.record_step(i, t, latents, eps, out, callback, intermediates)
        latents = out.prev_sample

    # 5. z_{t_N}, the starting noise for DDIM sampling.
    return InversionOutput(latents=latents, intermediates=intermediates)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ over the whole batch: how far a reconstruction `a` is from the original `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
