"""Depth-to-image: image-to-image that keeps the scene's depth, with stable-diffusion-2-depth (Stability AI 2022,
an SD 2 UNet fine-tuned with a 5th input channel: the depth map of the image; https://github.com/Stability-AI/stablediffusion).

The depth comes from MiDaS (Ranftl et al. 2020, https://arxiv.org/abs/1907.01341) in its DPT form (Ranftl et al.
2021, https://arxiv.org/abs/2103.13413; Intel/dpt-hybrid-midas, run through transformers'
DPTForDepthEstimation), or from the caller as `depth_map=`. One call:

1. encode the prompt with the text encoder, as in text-to-image                           -> (2B, 77, 1024)
2. the depth: DPT's relative inverse depth of each image (or the given depth_map)         -> (M, H', W')
   -> bicubic resize to the latent size (h, w) = (H/8, W/8)
   -> per map, scaled to [-1, 1]: d = 2 (d - min d) / (max d - min d) - 1                 -> (B, 1, h, w)
3. keep the last int(strength · N) of the N timesteps, as in image-to-image
4. z_0 = scaling_factor · a sample of VAE.encode(image), noised to t_start with add_noise  -> (B, 4, h, w)
5. each step: [scale_model_input(z_t) ; d] concatenated along the channels -> (B, 5, h, w), guided UNet,
   z_{t-1} = scheduler.step(ε̃, t, z_t)
6. decode

Where minidiff departs from diffusers: a constant depth map (max = min) is refused, where diffusers divides by zero
and returns a NaN image; a tensor image in [0, 1] reaches the DPT processor with do_rescale=False, where diffusers
lets the processor divide it by 255 a second time (PIL images, the usual input, are the same in both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pipelines.checks import check_callback, check_count, check_finite, check_guidance_scale, check_steps, check_strength
from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from ..pipelines.text import as_prompt_list, prompt_embeddings
from ..core.utils import randn_tensor
from .instruct_pix2pix import check_rgb, check_unet_channels


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """(prompt, image[, depth_map]) -> image with the same depth. Loads stable-diffusion-2-depth's layout."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "depth_estimator",
                       "feature_extractor")
    component_classes = {**StableDiffusionImg2ImgPipeline.component_classes,
                         "depth_estimator": "DPTForDepthEstimation"}

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator=None, feature_extractor=None):
        """`depth_estimator` (a transformers DPTForDepthEstimation) and `feature_extractor` (its DPTImageProcessor)
        may both be None: every call must then pass `depth_map=`."""
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler)
        self.check_component_types(depth_estimator=depth_estimator)
        if (depth_estimator is None) != (feature_extractor is None):
            raise ValueError("depth_estimator and feature_extractor go together (the DPT model and the processor that "
                             f"makes its input); found depth_estimator={type(depth_estimator).__name__}, "
                             f"feature_extractor={type(feature_extractor).__name__}. Pass both, or neither (and "
                             "then depth_map= at every call).")
        self.depth_estimator = depth_estimator
        self.feature_extractor = feature_extractor

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        depth_map: torch.Tensor | None = None,
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
        """`image`: PIL RGB image(s) or a (N, 3, H, W) / (3, H, W) tensor in [0, 1]. `depth_map`: None (DPT
        estimates it from the image) or a (M, H', W') tensor, M = 1 or N, any size and scale (larger = nearer, as
        MiDaS gives it): it is resized to the latents and scaled to [-1, 1]. Other arguments as image-to-image."""
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
        check_unet_channels(self.unet, 5, "depth-to-image reads 4 latent channels and 1 depth channel",
                            "sd2-community/stable-diffusion-2-depth")
        check_rgb(image)
        originals = image                                                # PIL image(s): DPT's processor resizes them
        image = self.preprocess(image)                                   # (N, 3, H, W) in [-1, 1]
        N = image.shape[0]
        if batch_size % N != 0:
            raise ValueError(f"Got {N} images for {batch_size} outputs (prompts x num_images_per_prompt); pass one "
                             "image, or one per prompt.")
        self.check_depth_map(depth_map, N)
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings, as in text-to-image: (2B, 77, D) with guidance.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. The depth channel: (B, 1, h, w) in [-1, 1], doubled to (2B, 1, h, w) with guidance.
        h, w = image.shape[2] // self.vae_scale_factor, image.shape[3] // self.vae_scale_factor
        if depth_map is None:
            depth_map = self.estimate_depth(image if isinstance(originals, torch.Tensor) else originals, text.dtype)
        depth = self.depth_channel(depth_map.to(device=device, dtype=text.dtype), (h, w))     # (M, 1, h, w)
        depth = depth.repeat(batch_size // depth.shape[0], 1, 1, 1)      # tiled: d0, d1, d0, d1, ...
        if guidance:
            depth = torch.cat([depth] * 2)                               # the same depth for [∅; prompt]

        # 3. Of the N timesteps, keep the last int(strength · N).
        timesteps = self.get_timesteps(num_inference_steps, strength)

        # 4. z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε at the first kept timestep, as in image-to-image.
        z0 = self.encode(image.to(device=device, dtype=text.dtype), batch_size, generator)
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=text.dtype)
        latents = self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(batch_size))

        # 5. The denoising loop, the depth as a 5th input channel.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.depth_eps(latents, t, text, depth, guidance_scale)   # ε̃: (B, 4, h, w)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample
        self.check_steps_finite()

        # 6. Decode.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def depth_eps(self, latents, t, text, depth, guidance_scale: float) -> torch.Tensor:
        """Text-to-image's guided ε̃ with the depth concatenated after scale_model_input: (B, 4, h, w) -> same.

        depth: (2B, 1, h, w) with guidance, else (B, 1, h, w); text: (2B, 77, D) [∅; prompt] or (B, 77, D).
        """
        guidance = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if guidance else latents
        # The depth is not a noisy sample: it goes in after the scheduler's input scaling, unscaled.
        model_input = self.scheduler.scale_model_input(model_input, t)
        model_input = torch.cat([model_input, depth], dim=1)                 # (2B, 5, h, w)
        eps = self.unet(model_input, t, encoder_hidden_states=text).sample   # (2B, 4, h, w)
        if not guidance:
            return eps
        eps_uncond, eps_text = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_text - eps_uncond)        # Ho & Salimans 2022, eq. 6

    def estimate_depth(self, images, dtype) -> torch.Tensor:
        """PIL image(s), or a (N, 3, H, W) tensor in [-1, 1] -> DPT's relative inverse depth: (N, H', W')."""
        if self.depth_estimator is None:
            raise ValueError("This pipeline has no depth_estimator (loaded with depth_estimator=None): pass "
                             "depth_map= (a (N, H, W) tensor, larger = nearer), or load a folder with a DPT model.")
        if isinstance(images, torch.Tensor):
            # already in [0, 1] after undoing [-1, 1]: the processor must not divide by 255 again
            images = list((images + 1) / 2)
            pixel_values = self.feature_extractor(images=images, do_rescale=False, return_tensors="pt").pixel_values
        else:
            pixel_values = self.feature_extractor(images=images, return_tensors="pt").pixel_values   # (N, 3, 384, 384)
        pixel_values = pixel_values.to(device=self.device, dtype=dtype)
        # DPT-Hybrid's batch norms are unreliable in float16: autocast keeps them in float32, as diffusers does.
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.depth_estimator(pixel_values).predicted_depth        # (N, H', W')

    @staticmethod
    def depth_channel(depth_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(M, H', W') depth -> (M, 1, h, w): bicubic resize to the latents, then each map scaled to [-1, 1]."""
        dtype = depth_map.dtype
        depth = F.interpolate(depth_map[:, None], size=size, mode="bicubic", align_corners=False)   # (M, 1, h, w)
        d_min = depth.amin(dim=(1, 2, 3), keepdim=True)
        d_max = depth.amax(dim=(1, 2, 3), keepdim=True)
        flat = (d_max <= d_min).flatten()
        if flat.any():
            raise ValueError(f"Depth map(s) {flat.nonzero().flatten().tolist()} are constant at the latent size "
                             f"{size[0]}x{size[1]}: scaling them to [-1, 1] would divide by zero (a NaN image). Pass "
                             "a depth map with some variation (larger = nearer).")
        return (2.0 * (depth - d_min) / (d_max - d_min) - 1.0).to(dtype)

    @staticmethod
    def check_depth_map(depth_map, num_images: int) -> None:
        """None, or a finite (M, H', W') tensor with M = 1 or the number of images."""
        if depth_map is None:
            return
        if not isinstance(depth_map, torch.Tensor):
            raise TypeError(f"depth_map must be a torch tensor (M, H, W), or None for DPT's estimate; found "
                            f"{type(depth_map).__name__}.")
        if depth_map.ndim != 3 or depth_map.shape[0] not in (1, num_images) or min(depth_map.shape[1:]) < 1:
            hint = " For one (H, W) map pass depth_map[None]." if depth_map.ndim == 2 else ""
            hint += " For a (M, 1, H, W) map pass depth_map[:, 0]." if depth_map.ndim == 4 else ""
            raise ValueError(f"depth_map must be (M, H, W) with M = 1 or {num_images} (one map per image); found "
                             f"shape {tuple(depth_map.shape)}.{hint}")
        if not depth_map.is_floating_point():
            raise TypeError(f"depth_map must be a float tensor; found {depth_map.dtype}. Pass depth_map.float().")
        check_finite(depth_map, "depth_map", "Check how it was made (a division by zero when normalising?).")
