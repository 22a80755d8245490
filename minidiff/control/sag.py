"""Self-Attention Guidance, SAG (Hong et al. 2023, https://arxiv.org/abs/2210.00939).

Classifier-free guidance needs a condition to guide towards. SAG guides towards a better image with no
condition at all: it blurs the regions the model itself attends to most, asks the UNet to denoise that
degraded input, and steps *away* from that worse prediction, which sharpens exactly those regions.
Per step, on top of the usual loop:

1. the UNet call of text-to-image, keeping the middle block's self-attention map A_t   (B, heads, N, N)
2. mask M_t: the positions that receive more than the average attention, Σ_queries mean_heads A_t > 1
   (each of the N rows sums to 1, so the average column sum is 1), upsampled (nearest) to the latent
3. x̂_0 = (z_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t); blur it where M_t = 1: x̃_0 = M_t ⊙ G(x̂_0) + (1 - M_t) ⊙ x̂_0
4. noise it back to t with the same ε̂: z̃_t = sqrt(ᾱ_t) x̃_0 + sqrt(1 - ᾱ_t) ε̂   (scheduler.add_noise)
5. ε̃ = ε_guided + s (ε̂ - ε(z̃_t))                          (eq. 16; s = sag_scale)

With classifier-free guidance, ε̂ and A_t are the unconditional ones and z̃_t is denoised with the
unconditional prompt (the paper's eq. 25): SAG then adds to CFG, it does not replace it. Without it, ε̂
is the prompt's prediction. This follows diffusers' `StableDiffusionSAGPipeline`: the map is the one of
the first self-attention layer of the middle block (SD v1: 8x8 positions for 512x512 images), the
blur a 9x9 Gaussian with σ = 1 and reflected borders, and the degraded latents enter the UNet unscaled,
which is why the scheduler must be one with integer timesteps (DDIM, PNDM, DDPM, DPM-Solver, UniPC),
whose scale_model_input does nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, prompt_embeddings
from ..schedulers.base import x0_and_eps
from .attention_maps import attention_layers, capture, layer_size

BLUR_KERNEL_SIZE, BLUR_SIGMA = 9, 1.0


@dataclass
class StableDiffusionSAGPipelineOutput(ImagePipelineOutput):
    """With `return_intermediates=True` and sag_scale > 0: `sag_masks[i]`, the mask M_t of step i at the
    middle block's resolution, (B, 1, h_mid, w_mid) with values 0 or 1."""

    sag_masks: list[torch.Tensor] | None = None


def sag_mask(attention_probs: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
    """Self-attention probabilities (B, heads, N, N) of a layer with N = h * w positions -> M_t: (B, 1, h, w).

    A key position is masked (1) when, averaged over heads and summed over the N queries, the attention it
    receives exceeds 1, the average (every query's row sums to 1).
    """
    B, heads, N, _ = attention_probs.shape
    received = attention_probs.mean(dim=1).sum(dim=1)                # (B, heads, N, N) -> (B, N, N) -> (B, N)
    return (received > 1.0).to(attention_probs.dtype).reshape(B, 1, *map_hw)   # (B, N) -> (B, 1, h, w)


def gaussian_blur_2d(x: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Blur each channel of (B, C, H, W) with a kernel_size x kernel_size Gaussian; borders reflected."""
    half = (kernel_size - 1) / 2
    positions = torch.linspace(-half, half, steps=kernel_size)
    g = torch.exp(-0.5 * (positions / sigma) ** 2)
    g = (g / g.sum()).to(device=x.device, dtype=x.dtype)             # (k,), sums to 1
    kernel = (g[:, None] @ g[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)  # (C, 1, k, k): separable
    pad = kernel_size // 2
    x = F.pad(x, [pad, pad, pad, pad], mode="reflect")               # (B, C, H + 2p, W + 2p)
    return F.conv2d(x, kernel, groups=x.shape[1])                    # one kernel per channel: (B, C, H, W)


class StableDiffusionSAGPipeline(StableDiffusionPipeline):
    """Text -> image with self-attention guidance: `pipe(prompt, sag_scale=0.75).images[0]`."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> StableDiffusionSAGPipelineOutput:
        """Generate images for `prompt` with SAG (module docstring). `sag_scale` = 0 is plain text-to-image.

        `eta` reaches schedulers whose step() takes it (DDIM). Other arguments as for StableDiffusionPipeline.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        if not isinstance(sag_scale, (int, float)) or sag_scale < 0:
            raise ValueError(f"sag_scale must be a number >= 0 (0 turns SAG off; the paper uses 0.75); "
                             f"found {sag_scale!r}.")
        batch_size = len(prompts) * num_images_per_prompt
        height, width, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                                        num_inference_steps, guidance_scale)
        h, w = latent_shape[2:]
        if sag_scale > 0 and min(h, w) <= BLUR_KERNEL_SIZE // 2:
            raise ValueError(f"SAG blurs the latents with a {BLUR_KERNEL_SIZE}x{BLUR_KERNEL_SIZE} kernel and reflected "
                             f"borders, which needs latents of more than {BLUR_KERNEL_SIZE // 2} positions a side; "
                             f"found {h}x{w} for {height}x{width} pixels. Use images of at least "
                             f"{(BLUR_KERNEL_SIZE // 2 + 1) * self.vae_scale_factor} pixels a side.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B, 77, D) with guidance ([unconditional; prompt]), else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        # ε(z̃_t) is predicted with the unconditional prompt under CFG (eq. 25), else with the prompt.
        text_for_degraded = text.chunk(2)[0] if guidance else text       # (B, 77, D)

        # 2. Timesteps and z_T, as in text-to-image.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if self.scheduler.timesteps.is_floating_point():
            raise ValueError(f"SAG re-noises x̃_0 with add_noise and feeds it to the UNet unscaled, which holds for "
                             f"schedulers with integer timesteps (DDIM, PNDM, DDPM, DPMSolverMultistep, UniPC); "
                             f"{type(self.scheduler).__name__} has float timesteps. Pass scheduler=one of those.")
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}

        # The first self-attention layer of the middle block (SD v1 has one): its map A_t decides what to blur.
        mid_self_attention = dict(list(attention_layers(self.unet, "self", "mid").items())[:1])
        (attention,) = mid_self_attention.values()

        # 3. The denoising loop.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        masks = [] if return_intermediates and sag_scale > 0 else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if guidance else latents   # (B, ...) -> (2B, ...)
            model_input = self.scheduler.scale_model_input(model_input, t)
            with capture(mid_self_attention if sag_scale > 0 else {}):
                eps = self.unet(model_input, t, encoder_hidden_states=text).sample
                probs = attention.attention_probs                       # (2B or B, heads, N, N), or None
            if guidance:
                eps_uncond, eps_text = eps.chunk(2)                      # (2B, ...) -> 2 x (B, ...)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            if sag_scale > 0:
                # ε̂ and A_t: the unconditional ones under CFG (eq. 25), else the prompt's.
                eps_hat = eps_uncond if guidance else eps                # (B, 4, h, w)
                probs = probs.chunk(2)[0] if guidance else probs         # (B, heads, N, N)
                mask = sag_mask(probs, layer_size(probs.shape[-1], (h, w)))   # (B, 1, h_mid, w_mid)
                degraded = self.degrade(latents, eps_hat, mask, t)       # z̃_t: (B, 4, h, w)
                eps_degraded = self.unet(degraded, t, encoder_hidden_states=text_for_degraded).sample
                # eq. 16: step away from the prediction for the blurred input
                eps = eps + sag_scale * (eps_hat - eps_degraded)
                if masks is not None:
                    masks.append(mask.detach().clone())
            out = self.scheduler.step(eps, t, latents, generator=generator, **step_kwargs)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        # 4. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return StableDiffusionSAGPipelineOutput(images=images, intermediates=intermediates, sag_masks=masks)

    def degrade(self, latents, model_output, mask, t) -> torch.Tensor:
        """z_t, the model output for it and M_t (B, 1, h_mid, w_mid) -> z̃_t, blurred where M_t = 1: (B, 4, h, w)."""
        # x̂_0 and ε̂ from one model output, whatever the model predicts: (B, 4, h, w) each
        prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        alpha_bar_t = self.scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[t.long()]
        x0, eps = x0_and_eps(prediction_type, model_output, latents, alpha_bar_t)
        mask = F.interpolate(mask, size=latents.shape[-2:])              # nearest: (B, 1, h_mid, w_mid) -> (B, 1, h, w)
        # x̃_0 = M ⊙ G(x̂_0) + (1 - M) ⊙ x̂_0
        x0_degraded = gaussian_blur_2d(x0) * mask + x0 * (1 - mask)
        # z̃_t = sqrt(ᾱ_t) x̃_0 + sqrt(1 - ᾱ_t) ε̂: the same noise level as z_t
        return self.scheduler.add_noise(x0_degraded, eps, t.reshape(1))
