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

import warnings

import torch

from ..core.utils import randn_tensor
from ..loaders import lora, textual_inversion
from .base import DiffusionPipeline
from .checks import (NOT_TAKEN, check_callback, check_count, check_decoded, check_guidance_scale, check_latents,
                     check_steps)
from .single_file import load_single_file
from .outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess
from .text import as_prompt_list, classifier_free_guidance, prompt_embeddings


class StableDiffusionPipeline(DiffusionPipeline):
    """Text -> image. `pipe(prompt).images[0]`; `return_intermediates=True` keeps every step's latents."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    component_classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = False, image_encoder=None):
        """The last four are accepted so that diffusers' way of building a pipeline works unchanged
        (`..., safety_checker=None, feature_extractor=None, requires_safety_checker=False`). minidiff runs no
        safety checker: no NSFW filter is applied to the images."""
        super().__init__()
        self.check_component_types(vae=vae, unet=unet)
        if safety_checker is not None or image_encoder is not None:
            unused = "safety_checker" if safety_checker is not None else "image_encoder"
            warnings.warn(f"{type(self).__name__} got a {unused}: minidiff does not run it (no NSFW filter is "
                          "applied to the images; IP-Adapter image prompts are not implemented). Pass None to "
                          "silence this warning.", stacklevel=2)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler

    @classmethod
    def from_single_file(cls, path: str, **kwargs):
        """One original CompVis / LDM checkpoint file (`.safetensors`, or a `.ckpt` read with no pickle executed),
        offline; SD v1 and v2. Options (`prediction_type`, `extract_ema`, `tokenizer`, `config`, ...): single_file.py."""
        return load_single_file(cls, path, **kwargs)

    # Fine-tuned concepts, with diffusers' method names: the work is done in minidiff/loaders/.
    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, weight_name: str | None = None,
                               subfolder: str | None = None) -> list[str]:
        """Add a Textual Inversion concept (diffusers, sd-concepts-library or A1111 file; loaders/textual_inversion.py)
        to the tokenizer and text encoder; returns the tokens added (`<t>`, `<t>_1`, ... for several vectors)."""
        return textual_inversion.load_textual_inversion(
            tokenizer or self.tokenizer, text_encoder or self.text_encoder, pretrained_model_name_or_path, token,
            weight_name, subfolder)

    def save_textual_inversion(self, save_directory: str, token: str, weight_name: str | None = None,
                               safe_serialization: bool = True) -> str:
        """Write `token`'s embedding rows as diffusers' training script does (learned_embeds.safetensors)."""
        return textual_inversion.save_textual_inversion(save_directory, self.tokenizer, self.text_encoder, token,
                                                        weight_name, safe_serialization)

    def lora_components(self, components=("unet", "text_encoder")) -> dict:
        unknown = [c for c in components if c not in lora.COMPONENTS]
        if unknown:
            raise ValueError(f"LoRA components are {list(lora.COMPONENTS)}; found {unknown}.")
        return {c: getattr(self, c) for c in components}

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, subfolder: str | None = None) -> str:
        """Add a LoRA (PEFT/diffusers or kohya format; loaders/lora.py) to the UNet and text encoder, unfused;
        returns its adapter name (`default_0`, ... unless given)."""
        return lora.load_lora_weights(self.lora_components(), pretrained_model_name_or_path_or_dict, adapter_name,
                                      weight_name, subfolder)

    def fuse_lora(self, components=("unet", "text_encoder"), lora_scale: float = 1.0) -> None:
        """Merge the loaded LoRAs into the weights: W <- W + lora_scale · (α / r) · up @ down."""
        lora.fuse_lora(self.lora_components(components), lora_scale)

    def unfuse_lora(self, components=("unet", "text_encoder")) -> None:
        lora.unfuse_lora(self.lora_components(components))

    def unload_lora_weights(self) -> None:
        """Remove the LoRA layers (fused ones stay in the weights, as in diffusers: unfuse_lora() first)."""
        lora.unload_lora_weights(self.lora_components())

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Use only these LoRAs, each scaled by its weight (default 1.0); the others are switched off."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else \
            [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"Got {len(names)} adapter names and {len(weights)} weights; pass one weight each.")
        lora.set_adapters(self.lora_components(), names, list(weights))

    @classmethod
    def save_lora_weights(cls, save_directory: str, unet_lora_layers: dict | None = None,
                          text_encoder_lora_layers: dict | None = None, weight_name: str | None = None,
                          safe_serialization: bool = True) -> str:
        """Write LoRA layers (from `minidiff.loaders.lora_state_dict(pipe.unet)`) in diffusers' file format."""
        return lora.save_lora_weights(save_directory, unet_lora_layers, text_encoder_lora_layers, weight_name,
                                      safe_serialization)

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
        batch_size = len(prompts) * num_images_per_prompt
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        check_callback(callback)
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B, 77, D) with guidance ([unconditional; prompt]), else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. Timesteps t_1 > ... > t_N.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. z_T ~ N(0, σ_T² I): (B, 4, H/8, W/8).
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)

        # 4. The denoising loop.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        latents = self.denoise(latents, self.scheduler.timesteps, text, guidance_scale, generator, callback,
                               intermediates)

        # 5. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def check_inputs(self, batch_size: int, height, width, output_type: str, generator, latents,
                     num_inference_steps=NOT_TAKEN, guidance_scale=NOT_TAKEN):
        """Step 0 of text-to-image and of most controlled pipelines -> (height, width, latent_shape), or a clear error.

        batch_size = prompts x num_images_per_prompt. height and width default to the UNet's sample_size in pixels;
        latent_shape is (B, 4, H/8, W/8). num_inference_steps and guidance_scale are checked when given.
        """
        check_count(batch_size, "num_images_per_prompt (times the number of prompts)", "images to make")
        if num_inference_steps is not NOT_TAKEN:
            check_steps(num_inference_steps, self.scheduler)
        if guidance_scale is not NOT_TAKEN:
            check_guidance_scale(guidance_scale)
        size = self.unet.config.sample_size  # in latents: 64 for SD v1, so 64 * 8 = 512 pixels
        size_h, size_w = (size, size) if isinstance(size, int) else size
        height = size_h * self.vae_scale_factor if height is None else height   # 0 is an error, not the default
        width = size_w * self.vae_scale_factor if width is None else width
        self.check_size(height, width)
        check_output_type(output_type)
        check_generator(generator, batch_size)
        latent_shape = (batch_size, self.unet.config.in_channels,
                        height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            check_latents(latents, latent_shape, f"{batch_size} images of {height}x{width}")
        return height, width, latent_shape

    def check_size(self, height, width) -> None:
        f = self.vae_scale_factor
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
                and height % f == 0 and width % f == 0):
            raise ValueError(
                f"height and width must be positive multiples of {f} (the VAE turns {f} pixels into one latent); "
                f"found height={height!r}, width={width!r}. Round them to a multiple of {f}, e.g. "
                f"{max(f, round(height / f) * f) if isinstance(height, int) else 512}."
            )

    def prepare_latents(self, latent_shape, dtype, generator=None, latents=None) -> torch.Tensor:
        """Step 3: z_T ~ N(0, σ_T² I), or the given `latents` times σ_T: (B, 4, h, w).

        σ_T is the scheduler's init_noise_sigma: 1, or σ_max for Euler-type schedulers.
        """
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=self.device, dtype=dtype)
        # Given latents in another float dtype (float64 from numpy) or on another device are cast, as images are.
        return latents.to(device=self.device, dtype=dtype) * self.scheduler.init_noise_sigma

    def denoise(self, latents, timesteps, text, guidance_scale, generator, callback=None, intermediates=None):
        """Step 4, shared with image-to-image: z_{t_1} -> z_0 along `timesteps`. latents: (B, 4, h, w)."""
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.guided_eps(latents, t, text, guidance_scale)      # ε̃: (B, 4, h, w)
            out = self.scheduler.step(eps, t, latents, generator=generator)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample
        self.check_steps_finite()
        return latents

    def guided_eps(self, latents, t, text, guidance_scale: float, scheduler=None) -> torch.Tensor:
        """The guided noise estimate ε̃ = ε(z_t) + s (ε(z_t, c) - ε(z_t)) of one UNet call: (B, 4, h, w) -> (B, 4, h, w).

        text: (2B, 77, D) [unconditional; prompt], or (B, 77, D) when guidance_scale <= 1 (no guidance).
        `scheduler` (its scale_model_input) defaults to self.scheduler.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        guidance = guidance_scale > 1.0
        # With guidance, one UNet call on the doubled batch: (B, ...) -> (2B, ...) [unconditional; prompt].
        model_input = torch.cat([latents] * 2) if guidance else latents
        model_input = scheduler.scale_model_input(model_input, t)
        eps = self.unet(model_input, t, encoder_hidden_states=text).sample
        if guidance:
            eps = classifier_free_guidance(eps, guidance_scale)           # (2B, ...) -> (B, ...)
        return eps

    def encode(self, image: torch.Tensor, batch_size: int, generator=None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> z_0 = scaling_factor · a sample of q(z | image), tiled: (B, 4, H/8, W/8).

        B = batch_size, a multiple of N; output i comes from image i mod N (0, 1, 0, 1, ...).
        """
        repeats = batch_size // image.shape[0]
        if isinstance(generator, (list, tuple)):
            # One image at a time, so that output i depends on generator i alone.
            image = torch.cat([image] * repeats)                                 # (B, 3, H, W)
            z0 = torch.cat([self.vae.encode(image[i:i + 1]).latent_dist.sample(generator[i])
                            for i in range(batch_size)])
        else:
            # diffusers encodes each distinct image once and tiles the latents (image 0, 1, 0, 1, ...).
            z0 = torch.cat([self.vae.encode(image).latent_dist.sample(generator)] * repeats)
        return self.vae.config.scaling_factor * z0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, 8h, 8w) images in [-1, 1]; undoes the 0.18215 scaling first.

        Raises for the first non-finite sampling step or, if the steps were finite, a non-finite image."""
        self.check_steps_finite()
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        check_decoded(image, latents)
        return image
