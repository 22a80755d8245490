"""InstructPix2Pix: edit an image by a written instruction ("make the cube blue"), Brooks et al. 2023,
https://arxiv.org/abs/2211.09800 (timbrooks/instruct-pix2pix).

The model is Stable Diffusion v1.5 fine-tuned with 8 input channels instead of 4: the noisy latents z_t and,
always unnoised, the latents of the image to edit, E(image). The paper zero-initialises the 4 new input
channels of conv_in, so training starts from the text-to-image model. One call:

1. encode the instruction with CLIP; with guidance the text batch is [instruction, ∅, ∅]       -> (3B, 77, D)
2. set the scheduler's N timesteps (100 by default, Euler ancestral in the published folder)
3. the image latents c_I = mode of VAE.encode(image), NOT multiplied by scaling_factor (as in training);
   with guidance [c_I, c_I, 0]                                                                -> (3B, 4, h, w)
4. z_T ~ N(0, σ_T² I): a new image is drawn from noise, conditioned on the old one            -> (B, 4, h, w)
5. each step: concatenate [scale_model_input(z_t) ; c_I] along the channels (B, 8, h, w), one UNet call on the
   tripled batch, and the three-way classifier-free guidance of the paper, eq. 3:

       ε̃ = ε(z_t, ∅, ∅) + s_I (ε(z_t, c_I, ∅) - ε(z_t, ∅, ∅)) + s_T (ε(z_t, c_I, c_T) - ε(z_t, c_I, ∅))

   s_T = guidance_scale (how much to follow the instruction), s_I = image_guidance_scale (how close to stay to
   the image); then z_{t-1} = scheduler.step(ε̃, t, z_t)
6. decode

Guidance is on iff guidance_scale > 1 and image_guidance_scale >= 1, as in diffusers. Where minidiff departs from
diffusers: guidance_scale > 1 with image_guidance_scale < 1 is refused with an error, where diffusers silently
turns ALL guidance off (the instruction's too) and runs one plain conditional pass per step; PIL images that are
not RGB are refused, where diffusers 0.42.1 (measured) fails inside the VAE for a grayscale "L" image and, for a
64x64 "RGBA" one, returned a 512x512 image.
"""

from __future__ import annotations

import math
import numbers

import PIL.Image
import torch

from ..pipelines.checks import (check_callback, check_count, check_guidance_scale, check_latents, check_steps)
from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from ..pipelines.text import as_prompt_list, prompt_embeddings


class StableDiffusionInstructPix2PixPipeline(StableDiffusionImg2ImgPipeline):
    """(instruction, image) -> edited image, with an 8-channel UNet. Loads timbrooks/instruct-pix2pix's layout;
    reuses image-to-image's `preprocess` for the image and text-to-image's latents, decoding and checks."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        num_inference_steps: int = 100,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """`prompt`: the edit instruction. `image`: a PIL RGB image, a list of them (one, or one per prompt), or a
        (N, 3, H, W) / (3, H, W) tensor in [0, 1]; the output has its size (rounded down to a multiple of 8).
        Defaults as diffusers: 100 steps, guidance_scale 7.5, image_guidance_scale 1.5."""
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        check_steps(num_inference_steps, self.scheduler)
        check_guidance_scale(guidance_scale)
        check_image_guidance_scale(image_guidance_scale, guidance_scale)
        check_count(num_images_per_prompt, "num_images_per_prompt", "images per prompt")
        check_callback(callback)
        check_output_type(output_type)
        batch_size = len(prompts) * num_images_per_prompt
        check_generator(generator, batch_size)
        check_unet_channels(self.unet, 8, "InstructPix2Pix reads 4 latent channels and 4 image-latent channels",
                            "timbrooks/instruct-pix2pix")
        check_rgb(image)
        image = self.preprocess(image)                                   # (N, 3, H, W) in [-1, 1]
        N = image.shape[0]
        if batch_size % N != 0:
            raise ValueError(f"Got {N} images for {batch_size} outputs (prompts x num_images_per_prompt); pass one "
                             "image, or one per prompt.")
        h, w = image.shape[2] // self.vae_scale_factor, image.shape[3] // self.vae_scale_factor
        latent_shape = (batch_size, self.vae.config.latent_channels, h, w)
        if latents is not None:
            check_latents(latents, latent_shape, f"{batch_size} images of {image.shape[2]}x{image.shape[3]}")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0     # with image_guidance_scale >= 1, checked above

        # 1. Text embeddings: prompt_embeddings gives [∅; c_T] (2B, 77, D); the three-way guidance wants
        #    [c_T, ∅, ∅] (3B, 77, D), the order of diffusers' batch.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        if guidance:
            uncond, cond = text.chunk(2)                                 # 2 x (B, 77, D)
            text = torch.cat([cond, uncond, uncond])                     # (3B, 77, D)

        # 2. Timesteps t_1 > ... > t_N.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. c_I: the mode of q(z | image), unscaled, tiled to the batch (image 0, 1, 0, 1, ...): (B, 4, h, w).
        image_latents = self.vae.encode(image.to(device=device, dtype=text.dtype)).latent_dist.mode()
        image_latents = image_latents.repeat(batch_size // N, 1, 1, 1)
        if guidance:
            # [c_I, c_I, 0]: the last third is "no image", as the 5% of training examples that dropped it
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])   # (3B, ...)

        # 4. z_T ~ N(0, σ_T² I): (B, 4, h, w).
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)

        # 5. The denoising loop.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            eps = self.edit_eps(latents, t, text, image_latents, guidance_scale, image_guidance_scale)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample
        self.check_steps_finite()

        # 6. Decode.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def edit_eps(self, latents, t, text, image_latents, guidance_scale: float, image_guidance_scale: float):
        """The guided ε̃ of one UNet call (paper eq. 3): (B, 4, h, w) -> (B, 4, h, w).

        text: (3B, 77, D) [c_T, ∅, ∅] and image_latents (3B, 4, h, w) [c_I, c_I, 0] with guidance, else (B, ...).
        """
        guidance = guidance_scale > 1.0
        model_input = torch.cat([latents] * 3) if guidance else latents   # (B, 4, h, w) -> (3B, 4, h, w)
        # The image latents go in after scale_model_input: the model saw them unscaled in training.
        model_input = self.scheduler.scale_model_input(model_input, t)
        model_input = torch.cat([model_input, image_latents], dim=1)       # (3B, 8, h, w)
        eps = self.unet(model_input, t, encoder_hidden_states=text).sample   # (3B, 4, h, w)
        if not guidance:
            return eps
        eps_text, eps_image, eps_uncond = eps.chunk(3)   # ε(z, c_I, c_T), ε(z, c_I, ∅), ε(z, ∅, ∅): 3 x (B, 4, h, w)
        # Brooks et al. 2023, eq. 3
        return (eps_uncond + image_guidance_scale * (eps_image - eps_uncond)
                + guidance_scale * (eps_text - eps_image))


def check_image_guidance_scale(image_guidance_scale, guidance_scale) -> None:
    """A finite number; below 1 only with guidance off (diffusers would silently drop the instruction's guidance)."""
    if isinstance(image_guidance_scale, torch.Tensor) and image_guidance_scale.numel() == 1:
        image_guidance_scale = image_guidance_scale.item()
    if (not isinstance(image_guidance_scale, numbers.Real) or isinstance(image_guidance_scale, bool)
            or not math.isfinite(image_guidance_scale)):
        raise ValueError(f"image_guidance_scale must be a finite number (1.5 is usual: how close to stay to the "
                         f"image); found {image_guidance_scale!r}.")
    if guidance_scale > 1.0 and image_guidance_scale < 1.0:
        raise ValueError(
            f"image_guidance_scale={image_guidance_scale} is below 1 while guidance_scale={guidance_scale} asks for "
            "guidance. InstructPix2Pix guides only with image_guidance_scale >= 1 (diffusers then silently turns ALL "
            "guidance off, the instruction's too). Pass image_guidance_scale >= 1 (1.5 is usual; 1 = no pull "
            "towards the image), or guidance_scale=1 to run without guidance.")


def check_unet_channels(unet, expected: int, why: str, checkpoint: str) -> None:
    """Refuse a UNet whose conv_in does not take `expected` channels, before the prompt is encoded."""
    found = unet.config.in_channels
    if found != expected:
        raise ValueError(f"This pipeline needs a UNet with in_channels={expected} ({why}); this UNet has "
                         f"in_channels={found}. Load a checkpoint made for it, e.g. {checkpoint}.")


def check_rgb(image) -> None:
    """PIL images must be RGB: an RGBA or grayscale photo would be silently converted, or fail in the VAE."""
    images = image if isinstance(image, (list, tuple)) else [image]
    for i, im in enumerate(images):
        if isinstance(im, PIL.Image.Image) and im.mode != "RGB":
            raise ValueError(f"image {i} is a PIL image in mode {im.mode!r}; expected 'RGB' (3 channels). Convert "
                             "it first: image.convert('RGB') (for RGBA this drops the alpha channel: paste it on a "
                             "background first if the transparent part matters).")
