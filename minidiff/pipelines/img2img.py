"""Stable Diffusion image-to-image (SDEdit, Meng et al. 2022, https://arxiv.org/abs/2108.01073).

Instead of starting from pure noise, start from the input image pushed part of the way into noise:

1. encode the prompt with CLIP, as in text-to-image
2. keep the last `strength` fraction of the N timesteps: t_start, ..., t_N
3. encode the image: z_0 = scaling_factor · sample of VAE.encode(image)       -> (B, 4, H/8, W/8)
4. noise it to t_start: z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε   (scheduler.add_noise; Ho et al. 2020, eq. 4)
5. run the same denoising loop from t_start, then decode

strength = 1 ignores the image (all N steps from pure noise); strength near 0 returns it almost unchanged.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from ..core.utils import randn_tensor
from .checks import check_callback, check_count, check_finite, check_guidance_scale, check_steps, check_strength
from .outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from .stable_diffusion import StableDiffusionPipeline
from .text import as_prompt_list, prompt_embeddings


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """(prompt, image) -> image. Loads from the same folder as `StableDiffusionPipeline`."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """`image`: a PIL image, a list of them, or a (B, 3, H, W) / (3, H, W) tensor in [0, 1].

        Only the last int(strength · num_inference_steps) steps run. Other arguments as for text-to-image.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        check_strength(strength)
        check_steps(num_inference_steps, self.scheduler)
        check_guidance_scale(guidance_scale)
        check_count(num_images_per_prompt, "num_images_per_prompt", "images per prompt")
        check_callback(callback)
        check_output_type(output_type)
        batch_size = len(prompts) * num_images_per_prompt
        check_generator(generator, batch_size)
        image = self.preprocess(image)                                   # (N, 3, H, W) in [-1, 1]
        if batch_size % image.shape[0] != 0:
            raise ValueError(f"Got {image.shape[0]} images for {batch_size} outputs (prompts x num_images_per_prompt)"
                             "; pass one image, or as many as prompts.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings, as in text-to-image.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. Of the N timesteps, keep the last int(strength · N).
        timesteps = self.get_timesteps(num_inference_steps, strength)

        # 3. z_0 = scaling_factor · a sample of q(z | image): (B, 4, H/8, W/8).
        z0 = self.encode(image.to(device=device, dtype=text.dtype), batch_size, generator)

        # 4. z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε at the first kept timestep (Ho et al. 2020, eq. 4).
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=text.dtype)
        latents = self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(batch_size))

        # 5. The denoising loop from t_start, then decode.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        latents = self.denoise(latents, timesteps, text, guidance_scale, generator, callback, intermediates)
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Step 2: set the N timesteps and keep the last int(strength · N), t_start, ..., t_N."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        steps_run = min(int(num_inference_steps * strength), num_inference_steps)
        if steps_run == 0:
            raise ValueError(f"strength={strength} of num_inference_steps={num_inference_steps} runs no step "
                             "(int(strength * num_inference_steps) = 0); raise strength or num_inference_steps.")
        t_start = num_inference_steps - steps_run
        if hasattr(self.scheduler, "set_begin_index"):  # Euler-type schedulers track their position in σ
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return self.scheduler.timesteps[t_start * self.scheduler.order:]

    def preprocess(self, image) -> torch.Tensor:
        """PIL image(s) or a tensor in [0, 1] -> (N, 3, H, W) in [-1, 1], H and W multiples of 8.

        PIL images whose sides are not multiples of 8 are shrunk to the multiple below (Lanczos), as
        diffusers does.
        """
        f = self.vae_scale_factor
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and len(image) > 0 and all(isinstance(i, PIL.Image.Image) for i in image):
            w, h = image[0].size
            if w < f or h < f:
                raise ValueError(f"The image is {w}x{h} pixels; the VAE needs at least {f}x{f} (one latent per {f}x{f} "
                                 "pixels). Pass a larger image.")
            w, h = w - w % f, h - h % f
            image = [i.convert("RGB").resize((w, h), resample=PIL.Image.LANCZOS) for i in image]
            pixels = np.stack([np.array(i).astype(np.float32) / 255.0 for i in image])   # (N, H, W, 3)
            image = torch.from_numpy(pixels).permute(0, 3, 1, 2)                       # (N, 3, H, W)
        elif isinstance(image, torch.Tensor):
            if image.ndim == 3:
                image = image[None]                                                    # (3, H, W) -> (1, 3, H, W)
            if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] % f or image.shape[3] % f:
                raise ValueError(f"A tensor image must be (B, 3, H, W) or (3, H, W) with H and W multiples of {f}; "
                                 f"found shape {tuple(image.shape)}.")
            # Before the range check: NaN compares False with everything, so it would pass it.
            check_finite(image, "The image tensor", "Check how it was made (a division by zero when normalising?).")
            if image.min() < 0 or image.max() > 1:
                raise ValueError(f"A tensor image must hold values in [0, 1]; found [{image.min().item():.3g}, "
                                 f"{image.max().item():.3g}]. For a tensor in [-1, 1], pass (image + 1) / 2.")
        else:
            raise TypeError(f"image must be a PIL image, a list of PIL images or a torch tensor; "
                            f"found {type(image).__name__}.")
        return 2.0 * image - 1.0                                                       # [0, 1] -> [-1, 1]
