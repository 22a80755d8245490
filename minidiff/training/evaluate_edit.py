"""Does the tiny InstructPix2Pix do what it is told, and nothing else? Does the tiny Depth2Image follow the depth?
The numbers of their model cards.

    python -m minidiff.training evaluate-edit --model tiny-instruct-pix2pix
    python -m minidiff.training evaluate-edit --model tiny-depth2img

Held-out scenes (data seed 20,000; training drew seed 0), one object on a plain background, judged by the
rule-based judge (`judge.py`), over several seeds of the starting noise:

- InstructPix2Pix, per kind of edit (colour, shape, position): "applied" = the edited attribute of the output is
  the one asked for; "kept" = the other two attributes are those of the input (`edit_scores`). Against doing
  nothing (the input image itself: everything kept, nothing applied) and against tiny-sd image-to-image from the
  target caption ("a blue circle at the top left", the scene after the edit), which knows nothing of the input
  but its noised latents.
- Depth2Image: the IoU of the generated object's mask with the object of the depth map (its nearer card), from
  pure noise (strength 1, a blank white input image, the prompt naming colour and shape only, so only the depth
  can say where); against the same model with the depth channel zeroed, and tiny-sd alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..control.depth2img import StableDiffusionDepth2ImgPipeline
from ..control.instruct_pix2pix import StableDiffusionInstructPix2PixPipeline
from ..core.hub import bundled_path
from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
from ..pipelines.stable_diffusion import StableDiffusionPipeline
from .judge import judge, mask_iou, score
from .scenes import EDIT_KINDS, Scene, render
from .train_edit import edit_examples, one_object_scene

EVAL_SEED = 20_000
ATTRIBUTES = ("color", "shape", "position")   # the kinds of edit, and the attributes "kept" is about


# --- scoring --------------------------------------------------------------------------------------
def edit_scores(image, after: Scene, kind: str) -> dict[str, bool]:
    """{"applied": the `kind` attribute is the edited scene's, "kept": the other attributes are too} for one
    output image (PIL, uint8 (H, W, 3) or a (3, H, W) tensor in [-1, 1])."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {EDIT_KINDS}, found {kind!r}.")
    right = score(image, after, said_only=False)          # every attribute of the scene after the edit
    return {"applied": right[kind], "kept": all(right[a] for a in ATTRIBUTES if a != kind)}


def depth_iou(image, scene: Scene) -> float:
    """IoU of the largest generated object's mask with the scene's object mask (0 when no object is found)."""
    objects = judge(image, max_objects=1).objects
    return mask_iou(objects[0].mask, render(scene)["masks"][0]) if objects else 0.0


def full_caption(scene: Scene) -> str:
    """'a COLOUR SHAPE POSITION' of a one-object scene: all three attributes said."""
    obj = scene.objects[0]
    return f"a {obj.color} {obj.shape} {obj.position}"


def images_as_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Scenes -> float (N, 3, 64, 64) in [0, 1], the pipelines' tensor input."""
    return torch.stack([torch.from_numpy(render(s)["image"]).permute(2, 0, 1) for s in scenes]).float() / 255


# --- InstructPix2Pix ------------------------------------------------------------------------------
def load(model: str, cls=None):
    """A pipeline folder or bundled name. Depth2Image folders name no depth estimator (pass depth_map=)."""
    folder = bundled_path(model) or model
    if cls is StableDiffusionDepth2ImgPipeline:
        pipe = cls.from_pretrained(folder, depth_estimator=None, feature_extractor=None)
    else:
        pipe = (cls or StableDiffusionInstructPix2PixPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit_table(pipe, num: int = 30, seeds=(0, 1), steps: int = 20, guidance_scale: float = 7.5,
               image_guidance_scale: float = 1.5, sd=None, strength: float = 0.6) -> dict[str, dict[str, float]]:
    """method -> {"color applied", "color kept", ...}: shares over `num` held-out edits (as many of each kind)
    x `seeds`. Methods: "input" (do nothing), "instruct-pix2pix", and "img2img" when `sd` (a tiny-sd pipeline)."""
    examples = edit_examples(num, EVAL_SEED)
    inputs = images_as_tensor([before for before, _, _, _ in examples])           # (num, 3, 64, 64) in [0, 1]
    instructions = [instruction for _, _, instruction, _ in examples]
    outputs = {"input": [[render(before)["image"] for before, _, _, _ in examples]]}
    outputs["instruct-pix2pix"] = [
        pipe(instructions, image=inputs, num_inference_steps=steps, guidance_scale=guidance_scale,
             image_guidance_scale=image_guidance_scale, generator=torch.Generator().manual_seed(seed)).images
        for seed in seeds]
    if sd is not None:
        img2img = StableDiffusionImg2ImgPipeline(**sd.components)
        img2img.set_progress_bar_config(disable=True)
        captions = [full_caption(after) for _, after, _, _ in examples]
        outputs["img2img"] = [img2img(captions, image=inputs, strength=strength, num_inference_steps=steps,
                                      generator=torch.Generator().manual_seed(seed)).images for seed in seeds]
    table = {}
    for method, runs in outputs.items():
        rows = {f"{k} {w}": [] for k in ATTRIBUTES for w in ("applied", "kept")}
        for images in runs:
            for image, (_, after, _, kind) in zip(images, examples):
                for what, ok in edit_scores(np.asarray(image), after, kind).items():
                    rows[f"{kind} {what}"].append(ok)
        table[method] = {key: float(np.mean(v)) for key, v in rows.items()}
    return table


def guidance_grid(pipe, text_scales=(1.0, 3.0, 7.5), image_scales=(1.0, 1.5, 3.0), num: int = 15, seeds=(0,),
                  steps: int = 20) -> dict[tuple[float, float], dict[str, float]]:
    """(guidance_scale, image_guidance_scale) -> {"applied", "kept"}: shares over all kinds."""
    grid = {}
    for s_t in text_scales:
        for s_i in image_scales:
            row = edit_table(pipe, num, seeds, steps, s_t, s_i)["instruct-pix2pix"]
            grid[(s_t, s_i)] = {w: float(np.mean([row[f"{k} {w}"] for k in ATTRIBUTES])) for w in ("applied", "kept")}
    return grid


# --- Depth2Image ----------------------------------------------------------------------------------
def depth_table(pipe, num: int = 32, seeds=(0, 1), steps: int = 20, guidance_scale: float = 7.5,
                sd=None) -> dict[str, dict]:
    """method -> {"iou": mean IoU, "above_half": share with IoU > 0.5, "color": colour right, "ious"}: held-out
    one-object scenes x `seeds`, from pure noise. Methods: "depth", "depth zeroed", and "tiny-sd" when `sd`."""
    scenes = [one_object_scene(EVAL_SEED, i)[0] for i in range(num)]
    prompts = [f"a {s.objects[0].color} {s.objects[0].shape}" for s in scenes]
    depth = torch.from_numpy(np.stack([render(s)["depth"] for s in scenes]))       # (num, 64, 64)
    blank = torch.ones(num, 3, 64, 64)                                              # the input image: white
    methods = {"depth": None, "depth zeroed": zero_depth}
    table = {}
    for method, channel in [*methods.items(), *([("tiny-sd", None)] if sd is not None else [])]:
        ious, colors = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            if method == "tiny-sd":
                images = sd(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                            generator=generator).images
            else:
                pipe.depth_channel = channel or StableDiffusionDepth2ImgPipeline.depth_channel
                images = pipe(prompts, image=blank, depth_map=depth, strength=1.0, num_inference_steps=steps,
                              guidance_scale=guidance_scale, generator=generator).images
            for image, scene in zip(images, scenes):
                ious.append(depth_iou(image, scene))
                objects = judge(image, max_objects=1).objects
                colors.append(bool(objects) and objects[0].color == scene.objects[0].color)
        table[method] = {"iou": float(np.mean(ious)), "above_half": float(np.mean(np.array(ious) > 0.5)),
                         "color": float(np.mean(colors)), "ious": ious}
    del pipe.depth_channel                                                          # back to the class's
    return table


def zero_depth(depth_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The depth channel with nothing in it: (M, H', W') -> zeros (M, 1, h, w)."""
    return depth_map.new_zeros(depth_map.shape[0], 1, *size)


# --- the command ----------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training evaluate-edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an InstructPix2Pix or Depth2Image folder, or a bundled name")
    parser.add_argument("--sd", default="tiny-sd", help="the text-to-image model compared with")
    parser.add_argument("--num", type=int, default=48, help="held-out scenes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the starting noise per scene")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--grid", action="store_true", help="InstructPix2Pix: also the guidance-scale grid")
    args = parser.parse_args(argv)
    if args.num < 1 or args.seeds < 1 or args.steps < 1:
        parser.exit(2, f"--num, --seeds and --steps must be >= 1; found {args.num}, {args.seeds}, {args.steps}.\n")
    start = time.time()
    folder = bundled_path(args.model) or args.model
    with open(f"{folder}/model_index.json") as f:
        is_depth = "Depth2Img" in f.read()
    sd = StableDiffusionPipeline.from_pretrained(args.sd)
    sd.set_progress_bar_config(disable=True)
    seeds = tuple(range(args.seeds))
    if is_depth:
        pipe = load(folder, StableDiffusionDepth2ImgPipeline)
        print(f"Depth2Image, {args.num} held-out scenes x {args.seeds} seeds, {args.steps} PNDM steps from pure noise "
              "(strength 1), guidance 7.5, prompt 'a COLOUR SHAPE'")
        print("| model | mean IoU with the depth map's object | IoU > 0.5 | colour right |\n|---|---|---|---|")
        for method, row in depth_table(pipe, args.num, seeds, args.steps, sd=sd).items():
            print(f"| {method} | {row['iou']:.3f} | {row['above_half']:.0%} | {row['color']:.0%} |")
    else:
        pipe = load(folder)
        print(f"InstructPix2Pix, {args.num} held-out edits ({args.num // 3} of each kind) x {args.seeds} seeds, "
              f"{args.steps} steps, guidance_scale 7.5, image_guidance_scale 1.5; img2img: tiny-sd, strength 0.6, "
              "the target caption")
        print("| method | " + " | ".join(f"{k} applied | {k} kept" for k in ATTRIBUTES) + " |")
        print("|---" * 7 + "|")
        for method, row in edit_table(pipe, args.num, seeds, args.steps, sd=sd).items():
            print(f"| {method} | " + " | ".join(f"{row[f'{k} applied']:.0%} | {row[f'{k} kept']:.0%}"
                                                for k in ATTRIBUTES) + " |")
        if args.grid:
            print("guidance grid (all kinds; applied / kept):")
            for (s_t, s_i), row in guidance_grid(pipe, steps=args.steps).items():
                print(f"  guidance_scale {s_t:g}, image_guidance_scale {s_i:g}: {row['applied']:.0%} / {row['kept']:.0%}")
    print(f"evaluated in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
