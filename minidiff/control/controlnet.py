"""ControlNet guidance (Zhang, Rao & Agrawala 2023, https://arxiv.org/abs/2302.05543): text-to-image whose layout
follows a condition image (edges, depth, a mask), through the residuals of a ControlNet
(`minidiff/models/controlnet.py`). One step of the loop of `pipelines/stable_diffusion.py`, changed:

1. the ControlNet reads z_t, t, the text and the condition image c     -> 12 skip residuals + 1 mid residual
   each times s_k = controlnet_conditioning_scale * keep_k, where keep_k = 0 outside
   [control_guidance_start, control_guidance_end] (as fractions of the steps), else 1
2. the UNet runs with them: ε(z_t, t, text | c)                          (down_block_additional_residuals, ...)
3. classifier-free guidance and the scheduler step, as in text-to-image

The condition image goes in as RGB in [0, 1], at the size of the images to generate (the ControlNet's
conditioning embedding shrinks it 8x to the latent's size); one of another size is refused, where diffusers
would resize it (a resized edge map loses its one-pixel lines). Several ControlNets (a list, each with its image
and scale) add their residuals. `guess_mode`: the ControlNet runs on the prompt's half of the batch only
and the unconditional half gets no residual, so classifier-free guidance amplifies the control itself;
its residuals are also scaled from 0.1 (finest skip) to 1 (mid block). Arguments and results are those of
diffusers' StableDiffusionControlNetPipeline.
"""

from __future__ import annotations

import inspect

import torch

from ..models.controlnet import ControlNetModel, MultiControlNetModel, check_controlnet_fits_unet
from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, classifier_free_guidance, prompt_embeddings
from .conditions import condition_tensor, repeat_to_batch


def per_net(value, name: str, num_nets: int) -> list:
    """One value for every ControlNet, or a list with one per ControlNet -> a list of `num_nets` values."""
    if not isinstance(value, (list, tuple)):
        return [value] * num_nets
    if len(value) != num_nets:
        raise ValueError(f"{name} has {len(value)} values for {num_nets} ControlNet(s); pass one value for all, "
                         "or exactly one per ControlNet.")
    return list(value)


def control_keep(num_steps: int, starts: list[float], ends: list[float]) -> list[list[float]]:
    """keep[i][k] = 1 if ControlNet k acts at step i, else 0: steps whose span [i/N, (i+1)/N] lies in [start, end]."""
    return [[1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends)]
            for i in range(num_steps)]


class StableDiffusionControlNetPipeline(StableDiffusionPipeline):
    """Text + condition image -> image. `pipe(prompt, image=edges).images[0]`; `controlnet` may be a list."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "controlnet", "scheduler")

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler)
        if isinstance(controlnet, (list, tuple)):
            controlnet = controlnet[0] if len(controlnet) == 1 else MultiControlNetModel(list(controlnet))
        nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
        for k, net in enumerate(nets):
            name = f"controlnet[{k}]" if len(nets) > 1 else "controlnet"
            if not isinstance(net, ControlNetModel):
                raise TypeError(f"{name} must be a minidiff ControlNetModel; found {type(net).__name__}. Load it with "
                                "minidiff.ControlNetModel.from_pretrained(...).")
            check_controlnet_fits_unet(net, unet, name)
            if net.condition_scale_factor != self.vae_scale_factor:
                raise ValueError(f"{name} shrinks its condition image {net.condition_scale_factor}x, the VAE "
                                 f"{self.vae_scale_factor}x: the two would not meet at the latent's size. Use a "
                                 "ControlNet built for this VAE (conditioning_embedding_out_channels).")
        self.controlnet = controlnet

    @property
    def nets(self) -> list[ControlNetModel]:
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> ImagePipelineOutput:
        """Generate images for `prompt` that follow `image`, the condition (see the module docstring).

        `image`: one condition (PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1], or a list with one per
        prompt); with several ControlNets, a list with one such condition per ControlNet. height and width
        default to the condition's size. The per-ControlNet arguments take one value for all or a list with one
        per ControlNet. Other arguments as for StableDiffusionPipeline.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        batch_size = len(prompts) * num_images_per_prompt
        nets = self.nets
        conditions = self.check_conditions(image, nets, height, width, len(prompts), num_images_per_prompt)
        height, width = conditions[0].shape[-2:]
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        scales = per_net(controlnet_conditioning_scale, "controlnet_conditioning_scale", len(nets))
        starts = per_net(control_guidance_start, "control_guidance_start", len(nets))
        ends = per_net(control_guidance_end, "control_guidance_end", len(nets))
        for k, (s, e, scale) in enumerate(zip(starts, ends, scales)):
            if not (isinstance(s, (int, float)) and isinstance(e, (int, float)) and 0 <= s < e <= 1):
                raise ValueError(f"ControlNet {k}: control_guidance_start must be < control_guidance_end, both in [0, 1] "
                                 f"(fractions of the steps); found {s!r} and {e!r}.")
            if not isinstance(scale, (int, float)):
                raise TypeError(f"controlnet_conditioning_scale must be a number or a list of numbers; found {scale!r}.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0
        # The "shuffle" ControlNet (global_pool_conditions) always runs as in guess mode.
        guess_mode = guess_mode or nets[0].config.global_pool_conditions

        # 1. Text embeddings: (2B, 77, D) with guidance ([unconditional; prompt]), else (B, 77, D).
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        # The conditions: (B, 3, H, W) each, doubled like the latents unless guess mode runs the prompt's half only.
        conditions = [c.to(device=device, dtype=net.dtype) for c, net in zip(conditions, nets)]
        if guidance and not guess_mode:
            conditions = [torch.cat([c] * 2) for c in conditions]                 # (B, ...) -> (2B, ...)

        # 2. Timesteps, z_T, and which ControlNets act at which step.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)
        keep = control_keep(len(timesteps), starts, ends)
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}

        # 3. The denoising loop, the UNet steered by the ControlNets' residuals.
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if guidance else latents        # (2B or B, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            if guess_mode and guidance:
                # the ControlNet sees the prompt's half only: (B, 4, h, w) and the prompt's embeddings
                control_input = self.scheduler.scale_model_input(latents, t)
                control_text = text.chunk(2)[1]
            else:
                control_input, control_text = model_input, text
            down, mid = self.control_residuals(control_input, t, control_text, conditions,
                                               [s * k for s, k in zip(scales, keep[i])], guess_mode)
            if guess_mode and guidance:
                # nothing added to the unconditional half: (B, ...) -> (2B, ...) [zeros; residuals]
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            eps = self.unet(model_input, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
            if guidance:
                eps = classifier_free_guidance(eps, guidance_scale)                # (2B, ...) -> (B, ...)
            out = self.scheduler.step(eps, t, latents, generator=generator, **step_kwargs)
            self.record_step(i, t, latents, eps, out, callback, intermediates)
            latents = out.prev_sample

        # 4. Decode the latents into images.
        images = latents if output_type == "latent" else postprocess(self.decode(latents), output_type)
        return ImagePipelineOutput(images=images, intermediates=intermediates)

    def control_residuals(self, sample, t, text, conditions, scales, guess_mode):
        """The ControlNet(s) at step t -> (the down residuals, the mid residual) for the UNet; several are summed."""
        if isinstance(self.controlnet, MultiControlNetModel):
            out = self.controlnet(sample, t, text, conditions, scales, guess_mode)
        else:
            out = self.controlnet(sample, t, text, conditions[0], scales[0], guess_mode)
        return out.down_block_res_samples, out.mid_block_res_sample

    @staticmethod
    def check_conditions(image, nets, height, width, num_prompts, num_images_per_prompt) -> list[torch.Tensor]:
        """Step 0 for the condition images -> one (B, C, H, W) tensor in [0, 1] per ControlNet, or a clear error."""
        if image is None:
            raise ValueError("StableDiffusionControlNetPipeline needs image=, the condition (an edge map, a depth "
                             "map, ...) at the size of the images to generate.")
        if len(nets) > 1:
            if not isinstance(image, (list, tuple)) or len(image) != len(nets):
                found = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else type(image).__name__
                raise ValueError(f"With {len(nets)} ControlNets, image must be a list of {len(nets)} conditions (one per "
                                 f"ControlNet, in order); found {found}.")
            images = list(image)
        else:
            images = [image]
        conditions = []
        for k, (net, one) in enumerate(zip(nets, images)):
            name = f"image[{k}]" if len(nets) > 1 else "image"
            c = condition_tensor(one, net.config.conditioning_channels, height, width, name, convert_rgb=True)
            height, width = c.shape[-2:]        # the first condition sets the size when none was given
            conditions.append(repeat_to_batch(c, num_prompts, num_images_per_prompt, name))
        return conditions
