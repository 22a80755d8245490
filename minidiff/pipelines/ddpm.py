"""Unconditional image generation in pixel space (DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239).

1. draw x_T ~ N(0, I): (B, 3, H, W), H = W = unet.config.sample_size
2. for each t: ε = UNet(x_t, t); x_{t-1} = scheduler.step(ε, t, x_t)     (Algorithm 2 with DDPMScheduler)
3. map x_0 from [-1, 1] to [0, 1]
"""

from __future__ import annotations

import torch

from ..core.utils import randn_tensor
from .base import DiffusionPipeline
from .checks import check_callback, check_count, check_steps
from .outputs import ImagePipelineOutput, Intermediates, check_generator, check_output_type, postprocess


class DDPMPipeline(DiffusionPipeline):
    """Noise -> image with a `UNet2DModel` (e.g. google/ddpm-cat-256). `pipe().images[0]`."""

    component_names = ("unet", "scheduler")
    component_classes = {"unet": "UNet2DModel"}

    def __init__(self, unet, scheduler):
        super().__init__()
        self.check_component_types(unet=unet)
        self.unet = unet
        self.scheduler = scheduler

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        callback=None,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput:
        """`generator`: one torch.Generator or one per image. `callback(i, t, x_t, x0)` runs after every step i."""
        if isinstance(batch_size, str):   # pipe("a cat"): the first argument of this pipeline is the image count
            raise TypeError(f"DDPMPipeline is unconditional: it takes no prompt, and its first argument is batch_size "
                            f"(the number of images); found the string {batch_size!r}. For text-to-image use "
                            "minidiff.StableDiffusionPipeline.")
        check_count(batch_size, "batch_size", "images")
        check_steps(num_inference_steps, self.scheduler)
        check_callback(callback)
        check_output_type(output_type, ("pil", "np", "pt"))
        check_generator(generator, batch_size)
        self.warn_if_slow()
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size

        # 1. x_T ~ N(0, I): (B, C, H, W). Euler-type schedulers start at x_T ~ N(0, sigma_max^2 I): their
        #    init_noise_sigma depends on the timesteps, so they are set first.
        self.scheduler.set_timesteps(num_inference_steps)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        # 2. The denoising loop, x_T -> x_0.
        intermediates = Intermediates(initial_latents=image.clone()) if return_intermediates else None
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            eps = self.unet(self.scheduler.scale_model_input(image, t), t).sample   # ε_θ(x_t, t): (B, C, H, W)
            out = self.scheduler.step(eps, t, image, generator=generator)
            self.record_step(i, t, image, eps, out, callback, intermediates)
            image = out.prev_sample
        self.check_steps_finite()

        # 3. [-1, 1] -> [0, 1] -> PIL / numpy / tensor.
        return ImagePipelineOutput(images=postprocess(image, output_type), intermediates=intermediates)
