"""Inpainting with a text-to-image model: repaint only where the mask is white, keep the rest of the image.

Blended Latent Diffusion (Avrahami et al. 2022, https://arxiv.org/abs/2206.02779, Algorithm 1), the latent form
of RePaint's replacement step (Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865, without its resampling).
It is what diffusers' StableDiffusionInpaintPipeline does when the UNet has 4 input channels (a dedicated
inpainting UNet has 9 and reads the mask and the masked image as extra channels instead).

1. encode the prompt with CLIP, as in text-to-image
2. the mask: white (1) = repaint, black (0) = keep; binarised at 0.5, then shrunk (nearest) to the
   latent size                                                                   -> m: (B, 1, h, w)
3. keep the last int(strength · N) of the N timesteps, as in image-to-image
4. encode the image: z_0 = scaling_factor · a sample of VAE.encode(image), and draw ε  -> (B, 4, h, w);
   start from ε (strength 1) or from add_noise(z_0, ε, t_start)
5. at each step, denoise the whole latent, then put back the kept region, noised to the next timestep
   with the same ε:    z <- (1 - m) · add_noise(z_0, ε, t_next) + m · z
   after the last step the kept region is z_0 itself
6. decode. The kept region comes back as the VAE's reconstruction of the image, not its exact pixels.

Where this differs from diffusers: the image keeps its own size (multiples of 8, as in image-to-image) and the
mask must have that size, where diffusers resizes both to `height` x `width` (512 x 512 by default for SD).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..pipelines.checks import check_count, check_finite, check_guidance_scale, check_steps
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
from ..pipelines.text import as_prompt_list, prompt_embeddings
from ..core.utils import randn_tensor


class StableDiffusionInpaintPipeline(StableDiffusionImg2ImgPipeline):
    """(prompt, image, mask_image) -> image, with a text-to-image (4-channel) UNet. Loads from the same
    folder as `StableDiffusionPipeline`; reuses image-to-image's `preprocess` for the image."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        mask_image,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """`image`: PIL image(s) or a (N, 3, H, W) / (3, H, W) tensor in [0, 1]. `mask_image`: PIL image(s)
        (white = repaint) or a (1 or N, 1, H, W) / (H, W) tensor in [0, 1], the size of the image.
        Other arguments as for image-to-image; strength 1 starts the repainted region from pure noise."""
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1] (the fraction of the steps to run); "
                             f"found {strength!r}.")
        check_steps(num_inference_steps, self.scheduler)
        check_guidance_scale(guidance_scale)
        check_count(num_images_per_prompt, "num_images_per_prompt", "images per prompt")
        if self.unet.config.in_channels != 4:
            raise ValueError(f"This pipeline blends latents for a text-to-image UNet with 4 input channels; this UNet "
                             f"has {self.unet.config.in_channels} (a dedicated inpainting UNet), which minidiff does "
                             "not run.")
        check_output_type(output_type)
        batch_size = len(prompts) * num_images_per_prompt
        check_generator(generator, batch_size)
        image = self.preprocess(image)                                   # (N, 3, H, W) in [-1, 1]
        mask = self.preprocess_mask(mask_image)                          # (M, 1, H, W) in {0, 1}
        N, M = image.shape[0], mask.shape[0]
        if mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"mask_image is {mask.shape[2]}x{mask.shape[3]} (H x W) but image is {image.shape[2]}x"
                             f"{image.shape[3]}; pass a mask of the image's size (white / 1 = repaint).")
        if M not in (1, N):
            raise ValueError(f"Got {M} masks for {N} images; pass one mask for all images, or one per image.")
        if batch_size % N != 0:
            raise ValueError(f"Got {N} images for {batch_size} outputs (prompts x num_images_per_prompt); pass one "
                             "image, or as many as prompts.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings, as in text-to-image: (2B, 77, D) with guidance.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. The latent mask: (M, 1, H, W) -> (B, 1, h, w), nearest neighbour keeps it binary.
        h, w = image.shape[2] // self.vae_scale_factor, image.shape[3] // self.vae_scale_factor
        mask = F.interpolate(mask, size=(h, w)).to(device=device, dtype=text.dtype)
        mask = mask.repeat(batch_size // M, 1, 1, 1)                                # tiled: m0, m1, m0, m1, ...

        # 3. Keep the last int(strength · num_inference_steps) timesteps, as in image-to-image.
        timesteps = self.get_timesteps(num_inference_steps, strength)

        # 4. z_0 = scaling_factor · a sample of q(z | image), one per distinct image, tiled: (B, 4, h, w).
        image = image.to(device=device, dtype=text.dtype)
        gens = generator[:N] if isinstance(generator, (list, tuple)) else generator   # as diffusers: image i, gen. i
        z0 = self.encode(image, N, gens).repeat(batch_size // N, 1, 1, 1)
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=text.dtype)   # ε, kept for step 5
        # diffusers draws one more latent sample here, for the masked image that 9-channel UNets read; drawing it
        # too keeps the generator's later draws (the noise of DDPM / Euler ancestral steps) the same as there.
        randn_tensor((N, *z0.shape[1:]), generator=gens, device=device, dtype=text.dtype)
        if strength == 1:
            latents = noise * self.scheduler.init_noise_sigma                       # z_T ~ N(0, σ_T² I)
        else:
            latents = self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(batch_size))

        # 5. The denoising loop, with the kept region put back after every step.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.guided_eps(latents, t, text, guidance_scale)              # ε̃: (B, 4, h, w)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            # z_known = add_noise(z_0, ε, t_next): the kept region at the next step's noise level (z_0 after the last)
            z_known = z0 if i == len(timesteps) - 1 else self.scheduler.add_noise(z0, noise, timesteps[i + 1][None])
            # z <- (1 - m) · z_known + m · z: keep outside the mask, the model's sample inside
            blended = (1 - mask) * z_known + mask * out.prev_sample
            out = dataclasses.replace(out, prev_sample=blended)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = blended

        # 6. Decode.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def preprocess_mask(self, mask_image) -> torch.Tensor:
        """PIL mask(s) (white = repaint) or a tensor in [0, 1] -> (M, 1, H, W) in {0, 1}, binarised at 0.5.

        PIL masks are read as grayscale, and shrunk to a multiple of 8 like the image (Lanczos), as diffusers does.
        """
        f = self.vae_scale_factor
        if isinstance(mask_image, PIL.Image.Image):
            mask_image = [mask_image]
        if (isinstance(mask_image, (list, tuple)) and len(mask_image) > 0
                and all(isinstance(m, PIL.Image.Image) for m in mask_image)):
            w, h = mask_image[0].size
            w, h = w - w % f, h - h % f
            masks = [m.resize((w, h), resample=PIL.Image.LANCZOS).convert("L") for m in mask_image]
            mask = torch.from_numpy(np.stack([np.array(m).astype(np.float32) / 255.0 for m in masks]))   # (M, H, W)
            mask = mask[:, None]                                                                        # (M, 1, H, W)
        elif isinstance(mask_image, torch.Tensor):
            mask = mask_image.float()
            if mask.ndim == 2:
                mask = mask[None, None]                           # (H, W) -> (1, 1, H, W)
            elif mask.ndim == 3:
                mask = mask[:, None]                              # (M, H, W) -> (M, 1, H, W)
            if mask.ndim != 4 or mask.shape[1] != 1:
                raise ValueError(f"A tensor mask must be (M, 1, H, W), (M, H, W) or (H, W) with one channel; found "
                                 f"shape {tuple(mask_image.shape)}. For an RGB mask, pass mask.mean(1, keepdim=True).")
            # NaN would pass the range check below and binarise to 0 (keep): the repaint silently not done.
            check_finite(mask, "The mask tensor", "Check how it was made.")
            if mask.min() < 0 or mask.max() > 1:
                raise ValueError(f"A tensor mask must hold values in [0, 1] (1 = repaint); found "
                                 f"[{mask.min().item():.3g}, {mask.max().item():.3g}]. For a 0-255 mask, "
                                 "pass mask / 255.")
        else:
            raise TypeError(f"mask_image must be a PIL image, a list of PIL images or a torch tensor; "
                            f"found {type(mask_image).__name__}.")
        return (mask >= 0.5).float()                              # binarise: the blend keeps or replaces
