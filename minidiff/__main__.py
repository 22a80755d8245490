"""The command line: generate an image and watch its latents form, step by step.

    python -m minidiff --prompt "a red circle"                      # the bundled tiny-sd, on the CPU
    python -m minidiff --model CompVis/stable-diffusion-v1-4 --prompt "a cat" --steps 25 --scheduler unipc
    python -m minidiff --model google/ddpm-cat-256 --steps 50       # unconditional: no prompt
    python -m minidiff --prompt "a blue square" --image start.png --strength 0.6    # image-to-image

Every run writes into a folder of its own: `image.png` (`image_0.png`, `image_1.png`, ... for several),
`latents.png` (a grid of the latents at chosen steps) and `latents.gif` (every step, animated), and prints
where. Nothing already on disk is written over:
  - without --out, each run makes a new numbered folder, minidiff-out/run-001, run-002, ... (never reused);
  - --out DIR must be new or empty; with --overwrite, DIR may hold files: the earlier run's image*.png,
    latents.png and latents.gif are removed (after the new images are made) and every other file is kept.
Every argument, the model's kind (read from its model_index.json) and the out folder are checked before
any model is loaded; a bad one ends the command with one line `minidiff: error: ...` and exit status 2.
Installed, `minidiff ...` is the same command.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass

import PIL.Image
import torch

from .core.config import read_json
from .core.utils import parse_device
from .models.vae import AutoencoderKLConfig
from .pipelines import DDPMPipeline, DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from .pipelines.loading import find_model_index
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


# Defaults of the options that only a Stable Diffusion model takes. They are None in the parser, so that an
# option the user typed can be told from one left out: an unconditional model refuses what it would ignore.
SD_DEFAULTS = {"prompt": "a red circle", "guidance": 7.5, "strength": 0.8}
OUT_PARENT = "minidiff-out"                       # without --out: minidiff-out/run-001, run-002, ...
RUN_FOLDER = re.compile(r"run-(\d+)")
RUN_FILE = re.compile(r"image(_\d+)?\.png|latents\.png|latents\.gif")   # what a run writes (--overwrite removes)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line `minidiff: error: ...` (exit status 2), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}. See {self.prog} --help.\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="minidiff", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd",
                   help="a pipeline folder, a bundled checkpoint ('tiny-sd', 'tiny-ddpm') or a hub repo id "
                        "(default: tiny-sd)")
    p.add_argument("--prompt", default=None,
                   help=f"the text (Stable Diffusion models only; default {SD_DEFAULTS['prompt']!r})")
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (Stable Diffusion only, with --guidance > 1)")
    p.add_argument("--steps", type=int, default=25, help="number of denoising steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = off "
                        f"(Stable Diffusion only; default {SD_DEFAULTS['guidance']})")
    p.add_argument("--seed", type=int, default=0, help="image i is made with seed + i")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="replace the model's own scheduler (built from its config)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of the VAE's factor (8 for SD; Stable Diffusion text-to-image only; "
                        "default: the model's size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="a starting image: image-to-image (Stable Diffusion only)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: the fraction of the steps to run, in (0, 1] "
                        f"(default {SD_DEFAULTS['strength']})")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="'auto': float16 on a GPU, float32 on the CPU")
    p.add_argument("--out", default=None,
                   help=f"folder for the image(s), latents.png and latents.gif: new or empty, unless --overwrite "
                        f"(default: a new {OUT_PARENT}/run-NNN for every run)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out hold files: its earlier image*.png, latents.png, latents.gif are replaced, "
                        "other files kept")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = None
    try:
        run = check(args)  # every argument, the model's kind and --out: before any model is loaded
        paths = generate(args, run)
    except (FileNotFoundError, OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"minidiff: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        # A folder this run made and never wrote into goes again (a numbered one would otherwise stay empty).
        if run is not None and run.made_out and os.path.isdir(run.out) and not os.listdir(run.out):
            os.rmdir(run.out)
    for path in paths:
        print(path)
    print(f"minidiff: wrote {len(paths)} files to {run.out}", file=sys.stderr)
    return 0


@dataclass
class Run:
    """What `check` found and `generate` uses."""
    unconditional: bool                   # a DDPMPipeline: noise -> image, no prompt, no VAE
    device: torch.device
    dtype: torch.dtype
    start_image: PIL.Image.Image | None   # --image, read into memory as RGB
    out: str                              # the folder this run writes into
    made_out: bool                        # made by this run: removed again if the run fails before writing


def check(args) -> Run:
    """Check every argument, then read the model's kind and prepare --out; fill in the Stable Diffusion
    defaults. Raises an error saying what was expected, what was found and what to do; loads no model."""
    # 1. The numbers.
    if args.num_images < 1:
        raise ValueError(f"--num-images must be 1 or more; found {args.num_images}.")
    if args.steps < 1:
        raise ValueError(f"--steps must be 1 or more (the number of denoising steps); found {args.steps}.")
    if not 0 <= args.seed <= 2**64 - args.num_images:  # a torch seed is 64 bits; image i uses seed + i
        raise ValueError(f"--seed must be a whole number from 0 to 2**64 - --num-images; found {args.seed}.")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number (1 = no guidance, 7.5 is usual); found {args.guidance}.")

    # 2. The model's kind, from its model_index.json alone; what it would ignore is refused.
    cls, index_path = pipeline_class(args.model)
    unconditional = issubclass(cls, DDPMPipeline)
    T = num_train_timesteps(index_path)
    if T is not None and args.steps > T:
        raise ValueError(f"--steps {args.steps}: {args.model}'s scheduler was trained on {T} timesteps, so at most "
                         f"{T} steps can be taken. Pass --steps {T} or fewer.")
    given = [f"--{name.replace('_', '-')}" for name in ("prompt", "negative_prompt", "guidance", "image", "strength",
                                                        "height", "width") if getattr(args, name) is not None]
    if unconditional and given:
        raise ValueError(f"{', '.join(given)} given, but {args.model} is an unconditional DDPMPipeline (noise -> "
                         "image at the model's own size; no text encoder, no VAE), which takes no "
                         f"{' or '.join(given)}. Drop {'it' if len(given) == 1 else 'them'}, or pass a Stable "
                         "Diffusion --model such as tiny-sd.")
    f = None
    if not unconditional:
        f = vae_factor(index_path)                                  # pixels per latent: 8 for SD; None: not known yet
        for name in ("height", "width"):
            value = getattr(args, name)
            if value is not None and f is not None and (value < f or value % f):
                raise ValueError(f"--{name} must be a positive multiple of {f} ({args.model}'s VAE turns {f}x{f} "
                                 f"pixels into one latent); found {value}. Try {max(f, round(value / f) * f)}.")
        if args.strength is not None and args.image is None:
            raise ValueError(f"--strength {args.strength} given without --image: it is the fraction of the steps "
                             "run from the start image. Add --image START.png, or drop --strength.")
        if args.image is not None and (args.height is not None or args.width is not None):
            raise ValueError("--height/--width given with --image: image-to-image keeps the image's own size "
                             f"(rounded down to a multiple of {f or 'the VAE factor'}). Resize the image instead, or "
                             "drop --height/--width.")
        args.prompt = SD_DEFAULTS["prompt"] if args.prompt is None else args.prompt
        args.guidance = SD_DEFAULTS["guidance"] if args.guidance is None else args.guidance
        if args.negative_prompt is not None and args.guidance <= 1:
            raise ValueError(f"--negative-prompt is used by classifier-free guidance only, which --guidance "
                             f"{args.guidance} (<= 1) turns off. Raise --guidance (e.g. 7.5), or drop "
                             "--negative-prompt.")
        if args.image is not None:
            args.strength = SD_DEFAULTS["strength"] if args.strength is None else args.strength
            if not 0 < args.strength <= 1:
                raise ValueError(f"--strength must be in (0, 1] (the fraction of the steps to run); "
                                 f"found {args.strength}.")
            if int(args.steps * args.strength) < 1:
                raise ValueError(f"--strength {args.strength} of --steps {args.steps} runs int({args.strength} * "
                                 f"{args.steps}) = 0 steps. Raise --strength or --steps.")

    # 3. The start image, the device, the out folder.
    start_image = read_image(args.image, f) if args.image is not None else None
    device, dtype = pick_device(args.device, args.dtype)
    out, made_out = prepare_out(args)
    return Run(unconditional, device, dtype, start_image, out, made_out)


def pipeline_class(model: str) -> tuple[type, str]:
    """The pipeline class that `model`'s model_index.json names, read before any weights are loaded; and the
    path of that model_index.json."""
    try:
        index_path = find_model_index(model)
    except OSError as e:   # not a pipeline folder, or offline without it in the cache: say which, naming --model
        raise type(e)(f"--model {model}: {e}") from e
    cls = DiffusionPipeline._pipeline_class(read_json(index_path), index_path)
    if not issubclass(cls, (DDPMPipeline, StableDiffusionPipeline)):
        raise ValueError(f"--model {model} is a {cls.__name__}; the command line runs DDPMPipeline and "
                         f"StableDiffusionPipeline folders. Load it in Python with "
                         f"minidiff.DiffusionPipeline.from_pretrained({model!r}).")
    return cls, index_path


def vae_factor(index_path: str) -> int | None:
    """Pixels per latent of the VAE beside model_index.json (vae/config.json): each of its down blocks but the last
    halves H and W (8 for SD). None when vae/ is not on disk yet (a hub repo: the pipeline checks sizes on loading)."""
    path = os.path.join(os.path.dirname(index_path), "vae", "config.json")
    if not os.path.isfile(path):
        return None
    blocks = read_json(path).get("block_out_channels", AutoencoderKLConfig.block_out_channels)  # as the VAE reads it
    return 2 ** (len(blocks) - 1)


def num_train_timesteps(index_path: str) -> int | None:
    """T of the scheduler_config.json beside model_index.json (in scheduler/, or at the root of a flat folder
    like google/ddpm-cat-256); None when it is not on disk yet (a hub repo: the scheduler checks it on loading)."""
    folder = os.path.dirname(index_path)
    for path in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(folder, "scheduler_config.json")):
        if os.path.isfile(path):
            return read_json(path).get("num_train_timesteps", 1000)  # 1000: the schedulers' default
    return None


def read_image(path: str, f: int | None) -> PIL.Image.Image:
    """--image, read whole into memory as RGB; at least f x f pixels (one latent of a factor-f VAE; f None: the
    factor is not known before loading, and the pipeline checks the size)."""
    if not os.path.isfile(path):
        found = "a folder" if os.path.isdir(path) else "nothing"
        raise FileNotFoundError(f"--image {path}: expected an image file, found {found} there. "
                                "Pass the path of a PNG or JPEG to start from.")
    try:
        with PIL.Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"--image {path}: expected an image that PIL can open, found {type(e).__name__}: {e}. "
                         "Pass a PNG or JPEG.") from e
    if f is not None and min(image.size) < f:
        raise ValueError(f"--image {path} is {image.width}x{image.height} pixels; image-to-image needs at least "
                         f"{f}x{f} (the VAE turns {f}x{f} pixels into one latent). Pass a larger image.")
    return image


def pick_device(name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype -> (device, dtype); 'auto' is CUDA (float16) when there is a GPU, else CPU (float32)."""
    device = parse_device(name)
    dtype = DTYPES[dtype_name] if dtype_name != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def prepare_out(args) -> tuple[str, bool]:
    """The folder this run writes into -> (folder, made by this run). A new folder is made now, so that no
    other run can take it; an existing one must be empty, or --overwrite given."""
    if args.out is None:
        if args.overwrite:
            raise ValueError(f"--overwrite applies to --out DIR; without --out every run gets a new {OUT_PARENT}/"
                             "run-NNN folder and nothing is overwritten. Add --out DIR, or drop --overwrite.")
        check_writable(OUT_PARENT, "the default out folder")
        os.makedirs(OUT_PARENT, exist_ok=True)
        numbers = [int(m.group(1)) for m in map(RUN_FOLDER.fullmatch, os.listdir(OUT_PARENT)) if m]
        out = os.path.join(OUT_PARENT, f"run-{max(numbers, default=0) + 1:03d}")
        os.mkdir(out)  # raises rather than share a folder, should another run have taken this number meanwhile
        return out, True
    out = args.out
    check_writable(out, "--out")
    if not os.path.isdir(out):
        os.makedirs(out)
        return out, True
    present = sorted(os.listdir(out))
    if present and not args.overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ValueError(f"--out {out} already holds {len(present)} file(s) ({shown}); minidiff writes only into a "
                         f"new or empty folder. Leave --out out (each run then gets a new {OUT_PARENT}/run-NNN), "
                         "pass a new folder, or add --overwrite to replace its earlier images and latents pictures "
                         "(other files are kept).")
    if args.image is not None:
        for name in earlier_run_files(out):
            if os.path.samefile(args.image, os.path.join(out, name)):
                raise ValueError(f"--image {args.image} is {name} in --out {out}, which --overwrite would remove. "
                                 "Copy it elsewhere first, or pass another --out.")
    return out, False


def check_writable(path: str, what: str) -> None:
    """`path` is a folder, or one can be made there: it is no file, and its nearest existing parent is a
    writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is a file; expected a folder. Pass a folder path.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path}: {existing} is a file, so no folder can be made under it. Pass another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: {existing} is not writable by this user. "
                              "Pass a folder you can write to.")


def earlier_run_files(folder: str) -> list[str]:
    """The files an earlier run wrote into `folder`: image*.png, latents.png, latents.gif."""
    return sorted(f for f in os.listdir(folder) if RUN_FILE.fullmatch(f) and os.path.isfile(os.path.join(folder, f)))


def generate(args, run: Run) -> list[str]:
    """Run the pipeline for the checked arguments; write the image(s) and the latents pictures; return the paths."""
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=run.dtype).to(run.device)
    if args.scheduler is not None:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    if not run.unconditional:  # text-to-image or image-to-image on the loaded components
        pipe = (StableDiffusionImg2ImgPipeline if run.start_image is not None else StableDiffusionPipeline)(
            **pipe.components)
    pipe.set_progress_bar_config(disable=args.no_progress)
    print(f"minidiff: {type(pipe).__name__} from {args.model} on {run.device} "
          f"({str(run.dtype).replace('torch.', '')}), {type(pipe.scheduler).__name__}, {args.steps} steps, "
          f"seed {args.seed}, writing to {run.out}", file=sys.stderr)

    # A CPU generator per image: the same seed gives the same image on any device, and image i equals
    # the image made alone with seed + i.
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    if run.unconditional:
        out = pipe(batch_size=args.num_images, generator=generator, num_inference_steps=args.steps,
                   return_intermediates=True)
    else:
        common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.num_images, generator=generator,
                      return_intermediates=True)
        if run.start_image is not None:
            out = pipe(args.prompt, image=run.start_image, strength=args.strength, **common)
        else:
            out = pipe(args.prompt, height=args.height, width=args.width, **common)

    if args.overwrite:  # only now that the new images exist: a failed run leaves the earlier one whole
        earlier = earlier_run_files(run.out)
        for name in earlier:
            os.remove(os.path.join(run.out, name))
        if earlier:
            print(f"minidiff: --overwrite: removed the earlier run's {', '.join(earlier)} from {run.out}",
                  file=sys.stderr)
    paths = []
    for i, image in enumerate(out.images):
        paths.append(os.path.join(run.out, "image.png" if len(out.images) == 1 else f"image_{i}.png"))
        image.save(paths[-1])
    paths += save_latent_pictures(out.intermediates, run.out, pixel_space=run.unconditional)
    return paths


GIF_SIDE = 128  # pixels: a 16x16 latent would be invisible at its own size


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
