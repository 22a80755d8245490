"""The command line: generate an image and watch its latents form, step by step.

    python -m minidiff --prompt "a red circle"                      # the bundled tiny-sd, on the CPU
    python -m minidiff --model CompVis/stable-diffusion-v1-4 --prompt "a cat" --steps 25 --scheduler unipc
    python -m minidiff --model google/ddpm-cat-256 --steps 50       # unconditional: no prompt
    python -m minidiff --prompt "a blue square" --image start.png --strength 0.6    # image-to-image

Writes into --out: `image.png` (`image_0.png`, `image_1.png`, ... for several), `latents.png` (a grid of
the latents at chosen steps) and `latents.gif` (every step, animated). Installed, `minidiff ...` is the
same command.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .pipelines import DDPMPipeline, DiffusionPipeline, StableDiffusionImg2ImgPipeline
from .schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                         EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minidiff", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd",
                   help="a pipeline folder, a bundled checkpoint ('tiny-sd', 'tiny-ddpm') or a hub repo id "
                        "(default: tiny-sd)")
    p.add_argument("--prompt", default="a red circle", help="the text (Stable Diffusion models only)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (Stable Diffusion only)")
    p.add_argument("--steps", type=int, default=25, help="number of denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="image i is made with seed + i")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="replace the model's own scheduler (built from its config)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="a starting image: image-to-image (Stable Diffusion only)")
    p.add_argument("--strength", type=float, default=0.8, help="with --image: the fraction of the steps to run")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="'auto': float16 on a GPU, float32 on the CPU")
    p.add_argument("--out", default="minidiff-out", help="folder for the image, latents.png and latents.gif")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = generate(args)
    except (FileNotFoundError, OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"minidiff: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def generate(args) -> list[str]:
    """Run the pipeline for the parsed arguments; write the image(s) and the latents pictures; return the paths."""
    from PIL import Image

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU. Use --device cpu.")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    if args.scheduler is not None:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.no_progress)
    print(f"minidiff: {type(pipe).__name__} from {args.model} on {device} ({str(dtype).replace('torch.', '')}), "
          f"{type(pipe.scheduler).__name__}, {args.steps} steps, seed {args.seed}", file=sys.stderr)

    # A CPU generator per image: the same seed gives the same image on any device, and image i equals
    # the image made alone with seed + i.
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    if isinstance(pipe, DDPMPipeline):
        if args.image is not None:
            raise ValueError(f"--image needs a Stable Diffusion model; {args.model} is a DDPMPipeline (no VAE "
                             "to encode the image). Drop --image or pass a Stable Diffusion --model.")
        out = pipe(batch_size=args.num_images, generator=generator, num_inference_steps=args.steps,
                   return_intermediates=True)
    else:
        common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                      return_intermediates=True)
        if args.image is not None:
            pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
            pipe.set_progress_bar_config(disable=args.no_progress)
            out = pipe(args.prompt, image=Image.open(args.image), strength=args.strength, **common)
        else:
            out = pipe(args.prompt, height=args.height, width=args.width, **common)

    os.makedirs(args.out, exist_ok=True)
    paths = []
    for i, image in enumerate(out.images):
        paths.append(os.path.join(args.out, "image.png" if len(out.images) == 1 else f"image_{i}.png"))
        image.save(paths[-1])
    paths += save_latent_pictures(out.intermediates, args.out, pixel_space=isinstance(pipe, DDPMPipeline))
    return paths


GIF_SIDE = 128  # pixels: an 8x8 latent would be invisible at its own size


def channel_panel(latent: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (1, 2h, 2w) for C = 4 (channels 0 1 / 2 3), else (1, h, C*w): one GIF frame."""
    if latent.shape[0] == 4:
        rows = [torch.cat([latent[0], latent[1]], dim=-1), torch.cat([latent[2], latent[3]], dim=-1)]
        return torch.cat(rows, dim=-2)[None]                                  # (1, 2h, 2w)
    return torch.cat(list(latent), dim=-1)[None]                              # (1, h, C*w)


def enlarge(frame: torch.Tensor, side: int) -> torch.Tensor:
    """(C, H, W) -> nearest-neighbour enlarged so the longer side is at least `side` (pixels stay crisp)."""
    factor = max(1, side // max(frame.shape[-2:]))
    return frame.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_latent_pictures(intermediates, folder: str, pixel_space: bool) -> list[str]:
    """`latents.png`: the latents of image 0 at up to 8 steps; `latents.gif`: at every step, GIF_SIDE pixels."""
    from . import viz

    latents = [x[0].float().cpu() for x in intermediates.latents]            # S x (C, h, w), image 0
    x0 = [x[0].float().cpu() for x in intermediates.x0]
    timesteps = torch.stack([torch.as_tensor(t).cpu() for t in intermediates.timesteps])
    if pixel_space:  # DDPM: the "latents" are images in [-1, 1]
        figure = viz.steps_grid({"x_t": latents, "predicted x0": x0}, timesteps, num_cols=8)
        frames, value_range = latents, (-1, 1)
    else:  # Stable Diffusion: the 4 latent channels as a 2x2 panel, stretched to its min..max
        figure = viz.latent_channels_grid(latents, timesteps, num_rows=8)
        frames, value_range = [channel_panel(x) for x in latents], None
    grid_path, gif_path = os.path.join(folder, "latents.png"), os.path.join(folder, "latents.gif")
    figure.savefig(grid_path)
    viz.plt.close(figure)
    frames = [enlarge(frame, GIF_SIDE) for frame in frames]
    with open(gif_path, "wb") as f:
        f.write(viz.make_gif(frames, value_range=value_range))
    return [grid_path, gif_path]


if __name__ == "__main__":
    sys.exit(main())
