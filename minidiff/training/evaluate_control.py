"""Does the tiny ControlNet / T2I-Adapter put the object where the mask says? The numbers of their model cards.

    python -m minidiff.training evaluate-control --model tiny-controlnet-mask
    python -m minidiff.training evaluate-control --model tiny-t2i-adapter-mask

The measure is the intersection over union of two masks (`judge.mask_iou`): the condition's, and the
generated object's, found by the judge (`judge.judge`: the largest blob of pixels with chroma, since tiny-sd's
backgrounds have none; no object found counts as IoU 0). Prompts say colour and shape only ("a red circle"),
so without the control tiny-sd puts the object anywhere, and the IoU says how much the mask moved it. The scale
curve's prompts and masks come from the data tiny-sd was trained on (--data; shapes.py for the first edition,
one-object scenes.py scenes for the second); the conflict's are drawn with shapes.py (words both editions know):

- `scale_curve`: mean IoU at conditioning scales 0 (tiny-sd alone: the residuals / features times 0), 0.25,
  0.5, 1, 1.5; same prompts, masks and starting noise for every scale; plus how often the colour still
  matches the prompt (the text keeps steering what is drawn while the mask steers where).
- `conflict`: the caption names one ninth of the canvas ("at the top left"), the mask sits in the opposite
  one: the share of objects that land in the mask's ninth, and in the caption's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import torch

from ..control.controlnet import StableDiffusionControlNetPipeline
from ..control.t2i_adapter import StableDiffusionAdapterPipeline
from ..core.hub import bundled_path
from ..models.controlnet import ControlNetModel
from ..models.t2i_adapter import T2IAdapter
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from .judge import judge, mask_iou
from .scenes import random_scene, render
from .shapes import BACKGROUNDS as PLAIN_BACKGROUNDS, POSITIONS, ShapesDataset, draw, sample_example
from .train_control import pick_data, shape_masks

EVAL_SEED = 20_000          # data seed of the evaluation shapes (training drew seed 0)
SCALES = (0.0, 0.25, 0.5, 1.0, 1.5)
# The caption's ninth -> the opposite ninth, where the conflicting mask is drawn.
OPPOSITE = {"at the top left": "at the bottom right", "at the bottom right": "at the top left",
            "at the top right": "at the bottom left", "at the bottom left": "at the top right",
            "on the left": "on the right", "on the right": "on the left",
            "at the top": "at the bottom", "at the bottom": "at the top"}


def eval_set(num: int = 32, seed: int = EVAL_SEED, data: str = "shapes") -> tuple[list[str], torch.Tensor]:
    """`num` held-out objects -> prompts "a COLOUR SHAPE" and their masks, float (num, 1, 64, 64) in {0, 1}: shapes.py
    images (the first tiny-sd's data), or one-object scenes.py scenes on a plain background (the second's; its
    objects are smaller: sides 14-30 of 64, against 34-46 for a large shapes.py shape)."""
    if data == "scenes":
        rng = random.Random(f"minidiff-control-eval/{seed}")
        scenes = [random_scene(rng, max_objects=1, backgrounds=tuple(PLAIN_BACKGROUNDS)) for _ in range(num)]
        prompts = [f"a {s.objects[0].color} {s.objects[0].shape}" for s in scenes]
        masks = np.stack([render(s)["masks"][0] for s in scenes])                # (num, 64, 64) bool
        return prompts, torch.from_numpy(masks)[:, None].float()
    ds = ShapesDataset(num, seed)
    images, _ = ds.tensors()                                                   # (num, 3, 64, 64) uint8
    prompts = [f"a {ds.example(i).color} {ds.example(i).shape}" for i in range(num)]
    return prompts, shape_masks(images)


def conflict_set(num: int = 16, seed: int = EVAL_SEED) -> tuple[list[str], torch.Tensor, list[str], list[str]]:
    """Prompts "a COLOUR SHAPE POSITION" with the mask of the same shape drawn in the OPPOSITE ninth.
    Returns prompts, masks (num, 1, 64, 64), the caption's positions and the mask's positions."""
    rng = random.Random(f"minidiff-control-conflict/{seed}")
    prompts, masks, said, drawn = [], [], [], []
    while len(prompts) < num:
        example = sample_example(rng)
        if example.position not in OPPOSITE:
            continue
        # the same shape, small, centred in the opposite ninth: (column, row) thirds of the 64x64 canvas
        where = OPPOSITE[example.position]
        col, row = POSITIONS[where]
        cx, cy, side = (col + 0.5) * 64 / 3, (row + 0.5) * 64 / 3, 18.0
        moved = replace(example, size="small", background="white",
                        box=(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        image = torch.from_numpy(np.array(draw(moved, rng))).permute(2, 0, 1)    # (3, 64, 64) uint8
        prompts.append(f"a {example.color} {example.shape} {example.position}")
        masks.append(shape_masks(image[None])[0])
        said.append(example.position)
        drawn.append(where)
    return prompts, torch.stack(masks), said, drawn


def load_pipeline(model: str, sd: str = "tiny-sd"):
    """tiny-sd with the ControlNet or T2I-Adapter in folder `model` (its config.json says which)."""
    folder = bundled_path(model) or model
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model}: expected a ControlNet or T2I-Adapter folder with a config.json, found "
                                f"no {config_path}. Pass the folder a training run wrote, or a bundled name.")
    with open(config_path) as f:
        class_name = json.load(f).get("_class_name")
    base = StableDiffusionPipeline.from_pretrained(sd)
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 scheduler=base.scheduler)
    if class_name == "ControlNetModel":
        return StableDiffusionControlNetPipeline(**parts, controlnet=ControlNetModel.from_pretrained(folder))
    if class_name == "T2IAdapter":
        return StableDiffusionAdapterPipeline(**parts, adapter=T2IAdapter.from_pretrained(folder))
    raise ValueError(f"{config_path} names _class_name {class_name!r}; expected 'ControlNetModel' or 'T2IAdapter'.")


def generate(pipe, prompts: list[str], masks: torch.Tensor, scale: float, seed: int = 0, steps: int = 20,
             guidance_scale: float = 7.5, **kwargs) -> list:
    """One image per prompt, steered by its mask at `scale`; the same seed gives the same starting noise."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(pipe, StableDiffusionControlNetPipeline):
        return pipe(prompts, image=masks.expand(-1, 3, -1, -1), num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, controlnet_conditioning_scale=scale,
                    **kwargs).images
    return pipe(prompts, image=masks, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=generator, adapter_conditioning_scale=scale, **kwargs).images


def object_iou(image, mask: torch.Tensor) -> float:
    """IoU of the largest generated object's mask with the condition's (N.B. 0 when no object is found)."""
    objects = judge(image, max_objects=1).objects
    return mask_iou(objects[0].mask, mask[0].numpy() > 0.5) if objects else 0.0


def color_matches(image, prompt: str) -> bool:
    objects = judge(image, max_objects=1).objects
    return bool(objects) and objects[0].color == prompt.split()[1]


def scale_curve(pipe, prompts, masks, scales=SCALES, seed: int = 0, steps: int = 20) -> dict[float, dict]:
    """scale -> {"iou": mean IoU, "color": share of colours matching the prompt, "ious": per image}."""
    rows = {}
    for scale in scales:
        images = generate(pipe, prompts, masks, scale, seed, steps)
        ious = [object_iou(im, m) for im, m in zip(images, masks)]
        colors = [color_matches(im, p) for im, p in zip(images, prompts)]
        rows[scale] = {"iou": float(np.mean(ious)), "color": float(np.mean(colors)), "ious": ious}
    return rows


def conflict(pipe, num: int = 16, scale: float = 1.0, seed: int = 0, steps: int = 20) -> dict:
    """Caption and mask name opposite ninths: which one does the object follow? Shares of `num` images."""
    prompts, masks, said, drawn = conflict_set(num)
    images = generate(pipe, prompts, masks, scale, seed, steps)
    found = [judge(im, max_objects=1).objects for im in images]
    where = [objs[0].position if objs else None for objs in found]
    return {"mask": float(np.mean([w == d for w, d in zip(where, drawn)])),
            "caption": float(np.mean([w == s for w, s in zip(where, said)])),
            "iou": float(np.mean([object_iou(im, m) for im, m in zip(images, masks)])), "images": images}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training evaluate-control", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a ControlNet or T2I-Adapter folder, or a bundled name")
    parser.add_argument("--sd", default="tiny-sd", help="the pipeline it steers")
    parser.add_argument("--data", choices=("shapes", "scenes"), default=None,
                        help="where the prompts and masks come from (default: the data --sd was trained on)")
    parser.add_argument("--num", type=int, default=32, help="prompts (and masks) of the scale curve")
    parser.add_argument("--steps", type=int, default=20, help="PNDM steps")
    args = parser.parse_args(argv)
    if args.num < 1 or args.steps < 1:
        parser.exit(2, f"--num and --steps must be >= 1; found {args.num} and {args.steps}.\n")
    start = time.time()
    pipe = load_pipeline(args.model, args.sd)
    pipe.set_progress_bar_config(disable=True)
    data = pick_data(args.data, args.sd, pipe.tokenizer)
    prompts, masks = eval_set(args.num, data=data)
    print(f"{type(pipe).__name__}, {args.num} {data} prompts x 1 seed, {args.steps} PNDM steps, guidance 7.5")
    print("| conditioning scale | mean mask IoU | colour matches prompt |")
    print("|---|---|---|")
    for scale, row in scale_curve(pipe, prompts, masks, steps=args.steps).items():
        print(f"| {scale:g} | {row['iou']:.3f} | {row['color']:.0%} |")
    print("conflict, 16 prompts whose caption names the ninth opposite the mask's:")
    for scale in (0.0, 1.0, 1.5):
        result = conflict(pipe, scale=scale, steps=args.steps)
        print(f"  scale {scale:g}: object in the mask's ninth {result['mask']:.0%}, in the caption's ninth "
              f"{result['caption']:.0%}, IoU with the mask {result['iou']:.3f}")
    print(f"evaluated in {time.time() - start:.0f} s")
