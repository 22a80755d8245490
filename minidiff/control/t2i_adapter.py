"""T2I-Adapter guidance (Mou et al. 2023, https://arxiv.org/abs/2302.08453): text-to-image whose layout follows a
condition image, through the features of a T2I-Adapter (`minidiff/models/t2i_adapter.py`). The loop of
`pipelines/stable_diffusion.py`, changed in two places:

1. before the loop, ONCE: F = adapter_conditioning_scale * adapter(c)    -> one feature map per down block
   (several adapters: F = sum_k w_k adapter_k(c_k), the weights w_k being adapter_conditioning_scale)
2. at every step: ε(z_t, t, text | F), the UNet adding F_i inside down block i
   (`down_intrablock_additional_residuals`), then classifier-free guidance and the scheduler step

The adapter sees neither z_t nor t: it costs one small forward pass per image, not one per step as a
ControlNet does. The condition image goes in in [0, 1] at the size of the images to generate, with the
adapter's channel count (1 for the canny and sketch adapters: a grayscale "L" image; 3 for depth, color,
pose, seg). Arguments and results are those of diffusers' StableDiffusionAdapterPipeline.
"""

from __future__ import annotations

import inspect

import torch

from ..models.t2i_adapter import MultiAdapter, T2IAdapter
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, classifier_free_guidance, prompt_embeddings
from .conditions import condition_tensor, repeat_to_batch


def feature_channels(adapter: T2IAdapter) -> tuple[int, ...]:
    """The widths of an adapter's features, one per UNet down block: the full adapter's `channels`; the light
    adapter has one more block, at the last width."""
    channels = tuple(adapter.config.channels)
    return channels if adapter.config.adapter_type == "full_adapter" else (*channels, channels[-1])


class StableDiffusionAdapterPipeline(StableDiffusionPipeline):
    """Text + condition image -> image. `pipe(prompt, image=edges).images[0]`; `adapter` may be a list."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "adapter", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, adapter, scheduler):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler)
        if isinstance(adapter, (list, tuple)):
            adapter = adapter[0] if len(adapter) == 1 else MultiAdapter(list(adapter))
        adapters = adapter.adapters if isinstance(adapter, MultiAdapter) else [adapter]
        for k, one in enumerate(adapters):
            name = f"adapter[{k}]" if len(adapters) > 1 else "adapter"
            if not isinstance(one, T2IAdapter):
                raise TypeError(f"{name} must be a minidiff T2IAdapter; found {type(one).__name__}. Load it with "
                                "minidiff.T2IAdapter.from_pretrained(...).")
            # Feature i is added to the output of down block i: same widths, and the first at the latent's size.
            if feature_channels(one) != tuple(unet.config.block_out_channels) \
                    or one.config.downscale_factor != self.vae_scale_factor:
                raise ValueError(
                    f"{name} was built for another UNet: its features have widths {feature_channels(one)} at 1/"
                    f"{one.config.downscale_factor} of the image size, the UNet's down blocks "
                    f"{tuple(unet.config.block_out_channels)} at 1/{self.vae_scale_factor}. Use an adapter trained "
                    "for this Stable Diffusion version (the _sd15v2 adapters for SD v1.x)."
                )
        self.adapter = adapter

    @property
    def adapters(self) -> list[T2IAdapter]:
        return list(self.adapter.adapters) if isinstance(self.adapter, MultiAdapter) else [self.adapter]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
        adapter_conditioning_scale: float | list[float] = 1.0,
    ) -> ImagePipelineOutput:
        """Generate images for `prompt` that follow `image`, the condition (see the module docstring).

        `image`: one condition (PIL image, (H, W, C) array or (C, H, W) tensor in [0, 1], or a list with one per
        prompt); with several adapters, a list with one condition per adapter, and `adapter_conditioning_scale`
        a list with one weight per adapter. height and width default to the condition's size.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        batch_size = len(prompts) * num_images_per_prompt
        conditions = self.check_conditions(image, height, width, len(prompts), num_images_per_prompt)
        height, width = conditions[0].shape[-2:]
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        n = len(self.adapters)
        if isinstance(self.adapter, MultiAdapter):
            scales = list(adapter_conditioning_scale) if isinstance(adapter_conditioning_scale, (list, tuple)) \
                else [adapter_conditioning_scale] * n
        else:
            scales = [adapter_conditioning_scale]
        if len(scales) != n or not all(isinstance(s, (int, float)) for s in scales):
            raise ValueError(f"adapter_conditioning_scale must be one number, or with several adapters a list of one "
                             f"number per adapter ({n}); found {adapter_conditioning_scale!r}.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings: (2B, 77, D) with guidance ([unconditional; prompt]), else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)

        # 2. The adapter's features, once: F_i (B, C_i, h_i, w_i), times the scale(s); doubled for guidance.
        conditions = [c.to(device=device, dtype=a.dtype) for c, a in zip(conditions, self.adapters)]
        if isinstance(self.adapter, MultiAdapter):
            features = self.adapter(conditions, scales)                           # Σ_k w_k adapter_k(c_k)
        else:
            features = [scales[0] * f for f in self.adapter(conditions[0])]
        if guidance:
            features = [torch.cat([f] * 2) for f in features]                     # (B, ...) -> (2B, ...)

        # 3. Timesteps and z_T, as in text-to-image.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}

        # 4. The denoising loop, the same features added at every step.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if guidance else latents        # (2B or B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=text,
                            down_intrablock_additional_residuals=features).sample
            if guidance:
                eps = classifier_free_guidance(eps, guidance_scale)                # (2B, ...) -> (B, ...)
            out = self.scheduler.step(eps, t, latents, generator=generator, **step_kwargs)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        # 5. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def check_conditions(self, image, height, width, num_prompts, num_images_per_prompt) -> list[torch.Tensor]:
        """Step 0 for the condition images -> one (B, C, H, W) tensor in [0, 1] per adapter, or a clear error.

        One image for all prompts is repeated to the batch; one per prompt is repeated per image (diffusers tiles
        the features instead, which pairs them with the wrong prompts when both counts exceed 1).
        """
        if image is None:
            raise ValueError("StableDiffusionAdapterPipeline needs image=, the condition (an edge map, a depth map, "
                             "...) at the size of the images to generate.")
        adapters = self.adapters
        if len(adapters) > 1:
            if not isinstance(image, (list, tuple)) or len(image) != len(adapters):
                found = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else type(image).__name__
                raise ValueError(f"With {len(adapters)} adapters, image must be a list of {len(adapters)} conditions "
                                 f"(one per adapter, in order); found {found}.")
            images = list(image)
        else:
            images = [image]
        conditions = []
        for k, (adapter, one) in enumerate(zip(adapters, images)):
            name = f"image[{k}]" if len(adapters) > 1 else "image"
            c = condition_tensor(one, adapter.config.in_channels, height, width, name, convert_rgb=False)
            height, width = c.shape[-2:]        # the first condition sets the size when none was given
            conditions.append(repeat_to_batch(c, num_prompts, num_images_per_prompt, name))
        return conditions
