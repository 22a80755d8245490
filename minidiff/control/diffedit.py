"""DiffEdit: edit the part of an image that a change of prompt is about, keep the rest (Couairon et al. 2022,
https://arxiv.org/abs/2210.11427).

Three calls, as in diffusers' `StableDiffusionDiffEditPipeline`:

1. `generate_mask(image, source_prompt, target_prompt)` (paper sec. 3.2, step 1): noise the image latents to
   `mask_encode_strength`, predict the noise once with each prompt, and keep where the two predictions differ:
       M = 1[ normalise( mean over n noise draws and channels of |ε(z_t, target) - ε(z_t, source)| ) > 0.5 ]
2. `invert(prompt, image)` (step 2): DDIM inversion of the image (see inversion.py) up to `inpaint_strength`,
   keeping the latents z_{t_i} of every step.
3. `__call__(prompt, mask_image, image_latents)` (step 3): DDIM sampling with the target prompt from the
   inverted z_{t_N}; after every step, outside the mask put back the inverted latents:
       z ← M · z + (1 - M) · z_inv
   so the background follows its own inversion path back to the input image.

minidiff matches diffusers 0.42.1 in one detail the paper leaves open: step i (t_i -> t_{i+1}) puts back the
inverted latent of the step's own timestep t_i, one DDIM step noisier than the new z.
Left out: diffusers' optional regularisation of the inversion (`lambda_auto_corr`, `lambda_kl`, borrowed from
pix2pix-zero); it is off by default there (`num_reg_steps=0`), so the default results are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..pipelines.checks import check_count, check_finite, check_guidance_scale
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, classifier_free_guidance, prompt_embeddings
from ..schedulers.ddim import DDIMScheduler
from ..schedulers.ddim_inverse import DDIMInverseScheduler
from ..core.utils import randn_tensor
from .inversion import check_strength, ddim_invert, encode_image, preprocess_image


@dataclass
class DiffEditInversionPipelineOutput:
    """`latents`: (B, N, 4, h, w), the inverted latents of the N steps, the noisiest first (the order `__call__`
    uses them in). `images`: those latents decoded (`decode_latents=True`), else None."""

    latents: torch.Tensor
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


class StableDiffusionDiffEditPipeline(StableDiffusionPipeline):
    """Mask-guided editing; loads from a Stable Diffusion folder. Set `pipe.scheduler` to DDIM (the paper's
    sampler); `pipe.inverse_scheduler` defaults to DDIMInverseScheduler.from_config(scheduler.config)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, inverse_scheduler=None, safety_checker=None,
                 feature_extractor=None, requires_safety_checker: bool = False):
        # The last three as in diffusers' constructor; see StableDiffusionPipeline.__init__.
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         requires_safety_checker)
        if inverse_scheduler is None:
            inverse_scheduler = DDIMInverseScheduler.from_config(scheduler.config)
        self.inverse_scheduler = inverse_scheduler

    @torch.no_grad()
    def generate_mask(self, image, target_prompt: str | list[str], source_prompt: str | list[str],
                      target_negative_prompt=None, source_negative_prompt=None, num_maps_per_mask: int = 10,
                      mask_encode_strength: float = 0.5, mask_thresholding_ratio: float = 3.0,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5, generator=None,
                      output_type: str = "np"):
        """The edit mask M: (B, h, w) of 0 and 1 at latent resolution (h = H/8), a numpy array or ("pt") a tensor."""
        # 0. Check the inputs before any work is done.
        targets = as_prompt_list(target_prompt, "target_prompt")
        sources = as_prompt_list(source_prompt, "source_prompt")
        if len(targets) != len(sources):
            raise ValueError(f"Got {len(targets)} target prompts and {len(sources)} source prompts; pass one of each "
                             "per image.")
        steps_run = check_strength("mask_encode_strength", mask_encode_strength, num_inference_steps)
        if not isinstance(num_maps_per_mask, int) or num_maps_per_mask < 1:
            raise ValueError(f"num_maps_per_mask must be a positive int; found {num_maps_per_mask!r}.")
        if not isinstance(mask_thresholding_ratio, (int, float)) or mask_thresholding_ratio <= 0:
            raise ValueError(f"mask_thresholding_ratio must be a positive number; found {mask_thresholding_ratio!r}.")
        check_output_type(output_type, ("np", "pt"))
        B, n = len(targets), num_maps_per_mask
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text: (2Bn, 77, D) per prompt with guidance ([unconditional; prompt]), each prompt repeated n times.
        source_text = prompt_embeddings(self.tokenizer, self.text_encoder, sources, source_negative_prompt, n,
                                        guidance, device)
        target_text = prompt_embeddings(self.tokenizer, self.text_encoder, targets, target_negative_prompt, n,
                                        guidance, device)

        # 2. z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε at the first timestep of the last `mask_encode_strength` share.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        t = self.scheduler.timesteps[(num_inference_steps - steps_run) * self.scheduler.order]
        pixels = preprocess_image(self, image).repeat_interleave(n, dim=0)           # (N, 3, H, W) -> (Nn, 3, H, W)
        z0 = encode_image(self, pixels, B * n, generator)                              # (Bn, 4, h, w)
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        z_t = self.scheduler.add_noise(z0, noise, t)

        # 3. One UNet call for both prompts: (4Bn, ...) [uncond_src; src; uncond_tgt; tgt], or (2Bn, ...) [src; tgt].
        model_input = self.scheduler.scale_model_input(torch.cat([z_t] * (4 if guidance else 2)), t)
        eps = self.unet(model_input, t, encoder_hidden_states=torch.cat([source_text, target_text])).sample
        eps_source, eps_target = eps.chunk(2)                                          # 2 x (2Bn or Bn, 4, h, w)
        if guidance:
            eps_source = classifier_free_guidance(eps_source, guidance_scale)          # (2Bn, ...) -> (Bn, ...)
            eps_target = classifier_free_guidance(eps_target, guidance_scale)

        # 4. Where the prompts disagree: mean of |ε_target - ε_source| over the n draws and the channels.
        difference = (eps_target - eps_source).abs().reshape(B, n, *eps.shape[-3:])   # (Bn, 4, h, w) -> (B, n, 4, h, w)
        mask_map = difference.mean(dim=(1, 2))                                         # (B, h, w)

        # 5. Normalise: clamp at `ratio` times the mean difference (over the batch) and divide; binarise at 0.5.
        # (Identical prompts give no difference anywhere, and so an empty mask; diffusers' 0/0 gives a full one.)
        clamp_magnitude = (mask_map.mean() * mask_thresholding_ratio).clamp_min(torch.finfo(mask_map.dtype).tiny)
        mask = (mask_map.clamp(0, clamp_magnitude) / clamp_magnitude > 0.5).float()    # (B, h, w), 0 or 1
        return mask if output_type == "pt" else mask.cpu().numpy()

    @torch.no_grad()
    def invert(self, prompt: str | list[str], image, num_inference_steps: int = 50, inpaint_strength: float = 0.8,
               guidance_scale: float = 7.5, negative_prompt=None, generator=None, decode_latents: bool = False,
               output_type: str = "pil", callback=None) -> DiffEditInversionPipelineOutput:
        """DDIM inversion of `image` with `prompt` for the first int(inpaint_strength · N) inverse steps."""
        check_strength("inpaint_strength", inpaint_strength, num_inference_steps)
        if decode_latents:
            check_output_type(output_type, ("pil", "np", "pt"))
        inversion = ddim_invert(self, prompt, image=image, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                strength=inpaint_strength, generator=generator,
                                inverse_scheduler=self.inverse_scheduler, callback=callback)
        # N x (B, 4, h, w), least noisy first -> (B, N, 4, h, w), noisiest first
        latents = torch.stack(inversion.intermediates.latents[::-1], dim=1)
        images = None
        if decode_latents:
            images = postprocess(self.decode(latents.flatten(0, 1)), output_type)      # B·N images
        return DiffEditInversionPipelineOutput(latents=latents, images=images)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], mask_image, image_latents: torch.Tensor,
                 inpaint_strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt=None, num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 output_type: str = "pil", callback=None, return_intermediates: bool = False) -> ImagePipelineOutput:
        """Regenerate inside `mask_image` ((B, h, w) or (h, w) at latent resolution, from `generate_mask`) with
        `prompt`, starting from `image_latents` ((B, N, 4, h, w), from `invert` with the same
        num_inference_steps and inpaint_strength). `callback(i, t, latents, x0)` runs after every step."""
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        B = len(prompts)
        steps_run = check_strength("inpaint_strength", inpaint_strength, num_inference_steps)
        check_guidance_scale(guidance_scale)
        check_count(num_images_per_prompt, "num_images_per_prompt", "images per prompt")
        check_output_type(output_type)
        check_generator(generator, B * num_images_per_prompt)
        if eta and not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(f"eta={eta} is a DDIMScheduler option; pipe.scheduler is {type(self.scheduler).__name__}.")
        image_latents = torch.as_tensor(image_latents)
        check_finite(image_latents, "image_latents", "Invert the image again (see invert()).")
        if image_latents.ndim == 4 and image_latents.shape[0] % B == 0:   # (B·N, 4, h, w) -> (B, N, 4, h, w)
            image_latents = image_latents.reshape(B, -1, *image_latents.shape[1:])
        C = self.unet.config.in_channels
        if image_latents.ndim != 5 or image_latents.shape[:3] != (B, steps_run, C):
            raise ValueError(f"image_latents must be (B={B}, N={steps_run}, {C}, h, w): the latents of invert() with "
                             f"num_inference_steps={num_inference_steps} and inpaint_strength={inpaint_strength}; "
                             f"found {tuple(image_latents.shape)}. Invert with the same two settings.")
        mask = self.preprocess_mask(mask_image, B, image_latents.shape[-2:])          # (B, 1, h, w)
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B', 77, D) with guidance, B' = B · num_images_per_prompt.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. The last int(inpaint_strength · N) timesteps, matching the inverted latents.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps[(num_inference_steps - steps_run) * self.scheduler.order:]

        # 3. z_inv[i] for step i: (B, N, 4, h, w) -> (N, B', 4, h, w); the mask (B, 1, h, w) -> (B', 1, h, w).
        image_latents = image_latents.transpose(0, 1).repeat_interleave(num_images_per_prompt, dim=1)
        image_latents = image_latents.to(device=device, dtype=text.dtype)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0).to(device=device, dtype=text.dtype)

        # 4. Masked DDIM sampling from the most inverted latents z_{t_N}.
        latents = image_latents[0].clone()
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        step_options = {"eta": eta, "generator": generator} if eta else {}
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.guided_eps(latents, t, text, guidance_scale)                   # ε̃: (B', 4, h, w)
            out = self.scheduler.step(eps, t, latents, **step_options)
            # z ← M · z + (1 - M) · z_inv: outside the mask, the inverted latents of this step
            out.prev_sample = mask * out.prev_sample + (1 - mask) * image_latents[i]
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        # 5. Decode.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    @staticmethod
    def preprocess_mask(mask_image, batch_size: int, latent_hw) -> torch.Tensor:
        """A mask of 0..1 values ((h, w), (B, h, w), (B, 1, h, w) array or tensor, or a PIL image) -> (B, 1, h, w)
        of 0 and 1 (threshold 0.5), checked against the latent size (h, w)."""
        if isinstance(mask_image, PIL.Image.Image):
            mask_image = np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0
        mask = torch.as_tensor(np.asarray(mask_image, dtype=np.float32)) if not isinstance(mask_image, torch.Tensor) \
            else mask_image.float()
        if mask.ndim == 2:
            mask = mask[None, None]                                                    # (h, w) -> (1, 1, h, w)
        elif mask.ndim == 3:
            mask = mask[:, None]                                                       # (B, h, w) -> (B, 1, h, w)
        h, w = (int(s) for s in latent_hw)
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask_image must be {h}x{w}, the latent size of the image (H/8 x W/8), as (h, w), "
                             f"(B, h, w) or (B, 1, h, w); found shape {tuple(mask.shape)}. Use the mask from "
                             f"generate_mask(), or resize yours to {h}x{w}.")
        if mask.shape[0] not in (1, batch_size):
            raise ValueError(f"Got {mask.shape[0]} masks for {batch_size} prompts; pass one mask, or one per prompt.")
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"mask_image must hold values in [0, 1] (1 = edit); found "
                             f"[{mask.min().item():.3g}, {mask.max().item():.3g}].")
        mask = mask.expand(batch_size, -1, -1, -1)                                     # (B, 1, h, w)
        return (mask >= 0.5).float()
