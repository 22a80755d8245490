"""MultiDiffusion panoramas (Bar-Tal et al. 2023, https://arxiv.org/abs/2302.08113).

A UNet trained on 64 x 64 latents can denoise a wider latent J one window at a time. MultiDiffusion runs
the ordinary sampler on every window F_i(J) (eq. 7: a crop of the UNet's own size, moved by a stride)
and, after each step, asks for the one wide latent that agrees best with all the window updates:

    J_{t-1} = argmin_J  Σ_i || F_i(J) - Φ(F_i(J_t)) ||²                       (eq. 5, L2, uniform weights)
            = Σ_i F_i^{-1}(Φ(F_i(J_t))) / Σ_i F_i^{-1}(1)                    (its closed-form solution)

i.e. every latent position becomes the average of the updates of the windows that cover it. One call:

1. encode the prompt, set the timesteps, draw the wide z_T       -> (B, 4, H/f, W/f), H/f and W/f >= window (f = 8 for SD)
2. cut the latent into overlapping windows (`get_views`)          -> V windows of (B, 4, window, window)
3. for each t and each batch of windows: guided UNet, one scheduler step with that batch's own scheduler
   state (multistep samplers such as PNDM remember earlier ε of *their* window)
4. z_{t-1} = per-position average of the stepped windows (`value / count`: the closed form above)
5. decode the wide latent (with `circular_padding`, the ends wrap around: a 360° panorama)
"""

from __future__ import annotations

import copy

import torch

from ..pipelines.outputs import ImagePipelineOutput, Intermediates, postprocess
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from ..pipelines.text import as_prompt_list, classifier_free_guidance, prompt_embeddings
from ..schedulers.base import SchedulerOutput, predict_x0


class StableDiffusionPanoramaPipeline(StableDiffusionPipeline):
    """Text -> a wide image. `pipe(prompt, height=512, width=2048)`; loads from any Stable Diffusion folder."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        view_batch_size: int = 1,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        circular_padding: bool = False,
        stride: int | None = None,
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """Height and width in pixels: by default one window high and four wide (512 x 2048 for SD v1).

        The window is the UNet's `sample_size` (64 latents for SD v1, 16 for tiny-sd); `stride` (in latents,
        default window // 8) is how far the next window moves. `view_batch_size` windows share one UNet call.
        """
        # 0. Check the inputs before any work is done.
        prompts = as_prompt_list(prompt)
        f = self.vae_scale_factor
        window = self.window_size
        height = window * f if height is None else height                 # one window high, four wide
        width = 4 * window * f if width is None else width                # (0 is refused by check_inputs)
        batch_size = len(prompts) * num_images_per_prompt
        _, _, latent_shape = self.check_inputs(batch_size, height, width, output_type, generator, latents,
                                               num_inference_steps, guidance_scale)
        stride = window // 8 if stride is None else stride
        views = self.get_views(height // f, width // f, window, stride, circular_padding, pixels_per_latent=f)
        if not isinstance(view_batch_size, int) or view_batch_size < 1:
            raise ValueError(f"view_batch_size must be a positive integer (windows per UNet call); "
                             f"found {view_batch_size!r}.")
        self.warn_if_slow()
        device = self.device
        guidance = guidance_scale > 1.0

        # 1. Text embeddings (2B, 77, D) = [unconditional; prompt] with guidance, else (B, 77, D); timesteps; z_T.
        text = prompt_embeddings(self.tokenizer, self.text_encoder, prompts, negative_prompt, num_images_per_prompt,
                                 guidance, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(latent_shape, text.dtype, generator, latents)   # (B, 4, h, w), h, w >= window

        # 2. The windows F_i, in batches of view_batch_size; each batch steps its own copy of the scheduler.
        views = [(rows.to(device), cols.to(device)) for rows, cols in views]
        batches = [views[k:k + view_batch_size] for k in range(0, len(views), view_batch_size)]
        schedulers = [copy.deepcopy(self.scheduler) for _ in batches]
        intermediates = Intermediates(initial_latents=latents.clone()) if return_intermediates else None

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            value = torch.zeros_like(latents)      # Σ_i F_i^{-1}(Φ(F_i(J_t))): the stepped windows, summed
            count = torch.zeros_like(latents)      # Σ_i F_i^{-1}(1): how many windows cover each position
            x0_sum = torch.zeros_like(latents)     # the same sum for the windows' x_0 estimates (for the notebooks)
            for batch, scheduler in zip(batches, schedulers):
                # 3. Crop: V windows of (B, 4, window, window) -> (V*B, 4, window, window), window-major.
                z_views = torch.cat([latents[:, :, rows[:, None], cols] for rows, cols in batch])
                V = len(batch)
                if guidance:
                    # (V*B, ...) -> (2*V*B, ...): [all windows, unconditional; all windows, with the prompt]
                    model_input = torch.cat([z_views] * 2)
                    uncond, cond = text.chunk(2)                                      # 2 x (B, 77, D)
                    context = torch.cat([uncond] * V + [cond] * V)                    # (2*V*B, 77, D)
                else:
                    model_input, context = z_views, torch.cat([text] * V)             # (V*B, ...)
                model_input = scheduler.scale_model_input(model_input, t)
                eps = self.unet(model_input, t, encoder_hidden_states=context).sample
                if guidance:
                    eps = classifier_free_guidance(eps, guidance_scale)              # (2*V*B, ...) -> (V*B, ...)
                out = scheduler.step(eps, t, z_views, generator=generator)           # Φ(F_i(J_t)) for each window
                x0 = out.pred_original_sample
                if x0 is None:
                    x0 = predict_x0(scheduler, z_views, eps, t)

                # 4a. Paste every stepped window back where it came from and count the covers.
                for (rows, cols), z_view, x0_view in zip(batch, out.prev_sample.chunk(V), x0.chunk(V)):
                    value[:, :, rows[:, None], cols] += z_view                        # (B, 4, window, window)
                    x0_sum[:, :, rows[:, None], cols] += x0_view
                    count[:, :, rows[:, None], cols] += 1

            # 4b. The closed form of eq. 5: every position is the mean of the windows that cover it.
            step = SchedulerOutput(prev_sample=value / count, pred_original_sample=x0_sum / count)
            self.record_step(i, t, latents, None, step, callback, intermediates)
            latents = step.prev_sample

        # 5. Decode the wide latent.
        if output_type == "latent":
            return ImagePipelineOutput(images=latents, intermediates=intermediates)
        image = self.decode_with_padding(latents) if circular_padding else self.decode(latents)
        return ImagePipelineOutput(images=postprocess(image, output_type), intermediates=intermediates)

    @property
    def window_size(self) -> int:
        """The UNet's own latent size: 64 for SD v1 (512 pixels), 16 for tiny-sd (64 pixels)."""
        size = self.unet.config.sample_size
        if not isinstance(size, int):
            if size[0] != size[1]:
                raise ValueError(f"MultiDiffusion here uses square windows; this UNet's sample_size is {size}.")
            size = size[0]
        return size

    @staticmethod
    def get_views(h: int, w: int, window: int, stride: int, circular_padding: bool = False,
                  pixels_per_latent: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The crops F_i of an (h, w) latent (eq. 7): (row indices, column indices) of each window, row-major.

        With `circular_padding` the windows run on past the right edge and wrap around (columns modulo w).
        `pixels_per_latent` (the VAE's factor: 8 for SD) only turns latents into pixels in the error messages.
        """
        if not isinstance(stride, int) or not 0 < stride <= window:
            raise ValueError(f"stride must be an integer in [1, {window}] (the window size in latents: larger "
                             f"strides leave gaps between windows); found {stride!r}.")
        if h < window or w < window:
            raise ValueError(f"A panorama must be at least one window ({window} latents = {window * pixels_per_latent} pixels for "
                             f"this UNet) high and wide; found {h} x {w} latents. Raise height and width.")
        last_col = w if circular_padding and w > window else w - window   # circular: a window starts every stride
        for name, size, span in (("height", h, h - window), ("width", w, last_col)):
            if span % stride:
                lower, upper = size - span % stride, size - span % stride + stride
                raise ValueError(
                    f"The windows do not tile the {name}: {size} latents with window {window} and stride {stride} "
                    f"leave {span % stride} latents uncovered. Use {lower} or {upper} latents "
                    f"({lower * pixels_per_latent} or {upper * pixels_per_latent} pixels), or another stride.")
        num_rows = (h - window) // stride + 1
        # As diffusers: a panorama exactly one window wide gets one window, even with circular padding.
        num_cols = w // stride if circular_padding and w > window else (w - window) // stride + 1
        views = []
        for r in range(num_rows):
            for c in range(num_cols):
                rows = torch.arange(r * stride, r * stride + window)
                cols = torch.arange(c * stride, c * stride + window) % w               # wraps only when circular
                views.append((rows, cols))
        return views

    def decode_with_padding(self, latents: torch.Tensor, padding: int = 8) -> torch.Tensor:
        """Decode a 360° panorama: pad each end with `padding` latents of the other end so the VAE sees the
        wrap-around, decode, and cut the padding off again. (B, 4, h, w) -> (B, 3, fh, fw), f the VAE's factor
        (8 for SD)."""
        padded = torch.cat([latents[..., -padding:], latents, latents[..., :padding]], dim=-1)  # (B, 4, h, w + 2p)
        image = self.decode(padded)                                                    # (B, 3, fh, f(w + 2p))
        cut = self.vae_scale_factor * padding
        return image[..., cut:-cut]                                                    # (B, 3, fh, fw)
