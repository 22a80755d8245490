"""Stable Diffusion text-to-image (Rombach et al. 2022, https://arxiv.org/abs/2112.10752).

Diffusion runs in the latent space of a VAE: a 512x512 image is a (4, 64, 64) latent z, scaled by
`vae.config.scaling_factor` (0.18215) to unit variance. One call:

1. encode the prompt (and the unconditional prompt) with CLIP        -> (2B, 77, 768)   text.py
2. set the scheduler's timesteps t_1 > ... > t_N
3. draw z_T ~ N(0, I) (times the scheduler's init_noise_sigma)       -> (B, 4, H/8, W/8)
4. for each t: ε̃ = guided UNet(z_t, t, text); z_{t-1} = scheduler.step(ε̃, t, z_t)
5. decode: image = VAE.decode(z_0 / scaling_factor)                  -> (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import torch

from ..utils import randn_tensor
from .base import (DiffusionPipeline, ImagePipelineOutput, Intermediates, check_generator, check_output_type,
                   postprocess)
from .text import as_prompt_list, classifier_free_guidance, prompt_embeddings


class StableDiffusionPipeline(DiffusionPipeline):
    """Text -> image. `pipe(prompt).images[0]`; `return_intermediates=True` keeps every step's latents."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent position: each of the VAE's down blocks but the last halves H and W (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """Generate images for `prompt`; see the module docstring for the steps.

        `generator`: one torch.Generator, or a list with one per image (image i then equals the image made
        alone with generator i). `callback(i, t, latents, x0)` is called after every step i.
        `guidance_scale` <= 1 turns classifier-free guidance off (one UNet pass per step).
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        size = self.unet.config.sample_size  # in latents: 64 for SD v1, so 64 * 8 = 512 pixels
        size_h, size_w = (size, size) if isinstance(size, int) else size
        height = height or size_h * self.vae_scale_factor
        width = width or size_w * self.vae_scale_factor
        self.check_size(height, width)
        check_output_type(output_type)
        batch_size = len(prompts) * num_images_per_prompt
        check_generator(generator, batch_size)
        latent_shape = (batch_size, self.unet.config.in_channels,
                        height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape} for {batch_size} images of {height}x{width}; "
                             f"found {tuple(latents.shape)}.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B, 77, D) with guidance ([unconditional; prompt]), else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. Timesteps t_1 > ... > t_N.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. z_T ~ N(0, σ_T² I): (B, 4, H/8, W/8). Euler-type schedulers start at σ_max, not 1.
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=text.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma

        # 4. The denoising loop.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        latents = self.denoise(latents, self.scheduler.timesteps, text, guidance_scale, generator, callback,
                               intermediates)

        # 5. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def check_size(self, height, width) -> None:
        f = self.vae_scale_factor
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
                and height % f == 0 and width % f == 0):
            raise ValueError(
                f"height and width must be positive multiples of {f} (the VAE turns {f} pixels into one latent); "
                f"found height={height!r}, width={width!r}. Round them to a multiple of {f}, e.g. "
                f"{max(f, round(height / f) * f) if isinstance(height, int) else 512}."
            )

    def denoise(self, latents, timesteps, text, guidance_scale, generator, callback=None, intermediates=None):
        """Step 4, shared with image-to-image: z_{t_1} -> z_0 along `timesteps`. latents: (B, 4, h, w)."""
        guidance = guidance_scale > 1.0
        for i, t in enumerate(self.progress_bar(timesteps)):
            # With guidance, one UNet call on the doubled batch: (B, ...) -> (2B, ...) [unconditional; prompt].
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=text).sample
            if guidance:
                eps = classifier_free_guidance(eps, guidance_scale)       # (2B, ...) -> (B, ...)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, 8h, 8w) images in [-1, 1]; undoes the 0.18215 scaling first."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample
