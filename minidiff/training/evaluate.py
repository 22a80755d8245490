"""Does a model draw what it was asked for? A rule-based shape and colour classifier, and the evaluations
whose numbers are in the tiny checkpoints' model cards.

    python -m minidiff.training evaluate classifier       # accuracy of the classifier on the data set
    python -m minidiff.training evaluate sd --model tiny-sd
    python -m minidiff.training evaluate ddpm --model tiny-ddpm
    python -m minidiff.training evaluate scenes --model runs/v2/tiny-sd    # the second edition: evaluate_scenes.py

The classifier needs no training, because the data set is simple (`shapes.py`): backgrounds are white,
gray or black (no colour at all) and shapes are saturated, so a pixel's chroma (max - min of R, G, B)
tells shape from background. Then

- colour: the hue of the shape's pixels, matched to the nearest hue of `shapes.COLORS`;
- shape: the fill ratio of its bounding box, area / (width x height): square 1, circle pi/4 = 0.785,
  triangle and diamond 1/2; those two are told apart by the skewness of their mass along y: a triangle
  pointing up has most of it low (its width grows linearly with y: skewness -2 sqrt(2) / 5 = -0.57), a
  diamond is symmetric (0).
  Areas and widths count each edge pixel by how much of it the shape covers (its chroma relative to
  a fully covered pixel), which keeps the ratios right for small shapes and 32x32 images.

A "clean" shape (the test for tiny-ddpm's unconditional samples) is one solid blob whose fill ratio,
aspect ratio and colour are all close to those of a shape the data set draws, on a background without
colour.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import schedulers
from .judge import judge
from .shapes import COLORS, HELD_OUT, SHAPES, ShapesDataset

PALETTE_HUES = {name: 360 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLORS.items()}
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "diamond": 0.5}
SKEW = {"square": 0.0, "circle": 0.0, "triangle": -2 * math.sqrt(2) / 5, "diamond": 0.0}  # density ~ y: -0.566
COLOURED = 0.15       # chroma (in [0, 1]) above which a pixel is at least partly shape; the palette has 0.6-0.75
MIN_SIDE = 0.15       # a shape spans at least this fraction of the image (the data set's smallest: 0.25)


@dataclass
class Analysis:
    """What the classifier sees in one image. `shape` / `color` are None when no shape is found."""

    color: str | None
    shape: str | None
    clean: bool = False
    fill: float = 0.0          # area / bounding-box area
    aspect: float = 0.0        # width / height of the bounding box
    skew: float = 0.0          # skewness of the mass along y (triangle -0.57, the others 0)
    hue_agreement: float = 0.0  # share of shape pixels within 30 degrees of the dominant colour's hue
    blob_share: float = 0.0    # share of all coloured pixels that belong to the largest blob
    background_chroma: float = 0.0  # median chroma outside the shape (white, gray, black: 0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask, by flood fill."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def hue_distance(a, b):
    """Angular distance between hues in degrees (0..180)."""
    d = np.abs(np.asarray(a) - b) % 360
    return np.minimum(d, 360 - d)


def analyse(image) -> Analysis:
    """Classify one RGB image (PIL image or uint8 array (H, W, 3)) as colour + shape."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3] / 255.0                   # (H, W, 3)
    H, W, _ = rgb.shape
    chroma = rgb.max(-1) - rgb.min(-1)                                            # (H, W)
    coloured = chroma > COLOURED
    if coloured.sum() < (MIN_SIDE * H) * (MIN_SIDE * W) / 2:
        return Analysis(None, None)

    # 1. the shape: the largest blob of coloured pixels, and how much of each pixel it covers (edge pixels
    #    are blends of shape and background, and their chroma falls in proportion)
    blob = largest_component(coloured)
    full = np.percentile(chroma[blob], 75)                                        # the chroma of a fully covered pixel
    near = blob.copy()                                                            # the blob, one pixel wider
    near[1:] |= blob[:-1]; near[:-1] |= blob[1:]; near[:, 1:] |= blob[:, :-1]; near[:, :-1] |= blob[:, 1:]
    coverage = np.where(near, np.clip(chroma / max(full, 1e-6), 0.0, 1.0), 0.0)  # (H, W) in [0, 1]
    area = coverage.sum()
    w = coverage.max(0).sum()                                                     # soft width: sum over columns
    h = coverage.max(1).sum()                                                     # soft height: sum over rows
    fill = float(area / (w * h))
    aspect = float(w / h)
    # skewness of the rows' mass: a triangle pointing up has its mass low (density ~ y: -0.57), others 0
    y = np.arange(H, dtype=np.float64)
    rows = coverage.sum(1) / area                                                 # (H,) a distribution over rows
    mean_y = (rows * y).sum()
    var_y = (rows * (y - mean_y) ** 2).sum()
    skew = float((rows * (y - mean_y) ** 3).sum() / max(var_y, 1e-6) ** 1.5)

    # 2. the colour: the mean hue of the fully covered pixels, snapped to the palette
    core = coverage > 0.8
    hues = np.array([360 * colorsys.rgb_to_hsv(*p)[0] for p in rgb[core]])
    angles = np.deg2rad(hues)
    mean_hue = np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360  # a circular mean
    color = min(PALETTE_HUES, key=lambda c: hue_distance(mean_hue, PALETTE_HUES[c]))
    hue_agreement = float((hue_distance(hues, PALETTE_HUES[color]) < 30).mean())

    # 3. the shape, from the fill ratio, then the skewness for the two half-filled shapes
    if fill > 0.9:
        shape = "square"
    elif fill > 0.64:
        shape = "circle"
    else:
        shape = "triangle" if skew < SKEW["triangle"] / 2 else "diamond"

    blob_share = float(blob.sum() / coloured.sum())
    background_chroma = float(np.median(chroma[~near])) if (~near).any() else 1.0
    clean = bool(abs(fill - FILL[shape]) < 0.12 and abs(skew - SKEW[shape]) < 0.25 and 0.8 < aspect < 1.25
                 and hue_agreement > 0.9 and blob_share > 0.95 and min(h / H, w / W) >= MIN_SIDE
                 and background_chroma < COLOURED / 2)
    return Analysis(color, shape, clean, fill, aspect, skew, hue_agreement, blob_share, background_chroma)


# --- the evaluations ---------------------------------------------------------------------------------
def validate_classifier(num_images: int = 500, seed: int = 12345, resolution: int = 64) -> dict:
    """Accuracy of `analyse` on data set images (a seed training did not use), and the share it calls clean."""
    ds = ShapesDataset(num_images, seed=seed, resolution=resolution, held_out=())
    right_color = right_shape = clean = 0
    for i in range(num_images):
        image, _ = ds[i]
        truth = ds.example(i)
        a = analyse(image.permute(1, 2, 0).numpy())
        right_color += a.color == truth.color
        right_shape += a.shape == truth.shape
        clean += a.clean
    return {"images": num_images, "resolution": resolution, "color_accuracy": right_color / num_images,
            "shape_accuracy": right_shape / num_images, "clean_share": clean / num_images}


def sd_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape pair, the held-out pairs included."""
    return [(f"a {c} {s}", c, s) for c in COLORS for s in SHAPES]


def evaluate_sd(pipe, guidance_scale: float, images_per_prompt: int = 4, steps: int = 25, seed: int = 0):
    """Share of images whose colour / shape / both match the prompt, over all colour x shape prompts.
    Returns the numbers and the images of the first round (one per prompt)."""
    prompts = sd_prompts()
    results, first_round = [], None
    for k in range(images_per_prompt):
        generators = [torch.Generator().manual_seed(seed + 1000 * k + i) for i in range(len(prompts))]
        images = pipe([p for p, _, _ in prompts], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators).images
        first_round = first_round or images
        for (prompt, color, shape), image in zip(prompts, images):
            a = analyse(image)
            results.append((color, shape, a.color == color, a.shape == shape))
    return summarise(results), first_round


def summarise(results) -> dict:
    def share(rows, i):
        return sum(r[i] for r in rows) / max(1, len(rows))

    held = [r for r in results if (r[0], r[1]) in HELD_OUT]
    seen = [r for r in results if (r[0], r[1]) not in HELD_OUT]
    both = [(c, s, cm and sm) for c, s, cm, sm in results]
    return {"images": len(results), "color": share(results, 2), "shape": share(results, 3),
            "both": share(both, 2), "held_out_color": share(held, 2), "held_out_shape": share(held, 3),
            "seen_color": share(seen, 2), "seen_shape": share(seen, 3)}


def evaluate_ddpm(pipe, num_images: int = 64, steps: int = 1000, seed: int = 0, batch_size: int = 64):
    """Share of unconditional samples that the classifier accepts as one clean shape, and the share in which the
    course's judge (`judge.py`) finds exactly one object on any background; and the samples."""
    analyses, samples = [], []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
        images = pipe(batch_size=n, num_inference_steps=steps, generator=generators).images
        analyses += [analyse(image) for image in images]
        samples += images
    shapes = {s: sum(a.shape == s and a.clean for a in analyses) for s in SHAPES}
    colors = {c: sum(a.color == c and a.clean for a in analyses) for c in COLORS}
    one = sum(judge(image).count == 1 for image in samples)          # one object, whatever its background
    return {"images": num_images, "steps": steps, "clean": sum(a.clean for a in analyses) / num_images,
            "one_object": one / num_images, "clean_by_shape": shapes, "clean_by_color": colors}, samples


# The samplers of notebook 03, by short name: `--sampler` picks one, 'all' runs each.
SAMPLERS = {"DDPM": schedulers.DDPMScheduler, "DDIM": schedulers.DDIMScheduler, "PNDM": schedulers.PNDMScheduler,
            "Euler": schedulers.EulerDiscreteScheduler, "EulerAncestral": schedulers.EulerAncestralDiscreteScheduler,
            "DPMSolverMultistep": schedulers.DPMSolverMultistepScheduler,
            "UniPCMultistep": schedulers.UniPCMultistepScheduler}


def save_grid(images, path: str, columns: int) -> None:
    """Paste equally sized PIL images into one grid image."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    grid.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["classifier", "sd", "ddpm", "scenes", "vae"])
    parser.add_argument("--model", default=None, help="a pipeline folder or bundled name (tiny-sd, tiny-ddpm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (sd: 25, ddpm: 1000)")
    parser.add_argument("--images", type=int, default=None, help="sd: images per prompt (4); ddpm: samples (64); "
                        "scenes: seeds per prompt (4); vae: held-out scenes (200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="save the samples as one PNG grid here")
    parser.add_argument("--sampler", default="DDPM", choices=[*SAMPLERS, "all"],
                        help="ddpm: the scheduler to sample with, built from_config of the model's own (default: "
                        "DDPM); 'all' measures each of them in turn")
    args = parser.parse_args(argv)

    start = time.time()
    if args.what in ("scenes", "vae"):
        from .evaluate_scenes import main as scenes_main, main_vae as vae_main

        return scenes_main(args) if args.what == "scenes" else vae_main(args)
    if args.what == "classifier":
        for resolution in (64, 32):
            print(validate_classifier(resolution=resolution))
        return
    from ..pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model or f"tiny-{args.what}").to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.what == "sd":
        for guidance in (7.5, 1.0):
            result, images = evaluate_sd(pipe, guidance, args.images or 4, args.steps or 25, args.seed)
            print(f"guidance {guidance}: {result}")
            if args.grid:  # one row per colour, one column per shape
                save_grid(images, args.grid.replace(".png", f"-guidance{guidance}.png"), columns=len(SHAPES))
    else:
        own = pipe.scheduler
        for name in SAMPLERS if args.sampler == "all" else [args.sampler]:
            pipe.scheduler = SAMPLERS[name].from_config(own.config)   # the same training schedule, another rule
            result, images = evaluate_ddpm(pipe, args.images or 64, args.steps or 1000, args.seed)
            print(f"{name}: {result}")
            if args.grid:
                save_grid(images, args.grid if args.sampler != "all" else args.grid.replace(".png", f"-{name}.png"),
                          columns=8)
    print(f"({time.time() - start:.0f} s)")
