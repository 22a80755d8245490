"""The targets of the tiny world's second edition, measured: does tiny-sd draw what a scenes caption asks?

    python -m minidiff.training evaluate scenes --model runs/v2/tiny-sd        # the table of the model card
    python -m minidiff.training evaluate vae --model runs/v2/vae/vae           # what the VAE's round trip keeps

Every number comes from the rule-based judge (`judge.py`, 100% right on the data's own images), over
several seeds per prompt, with the pipeline's defaults as a user calls it (PNDM, 25 steps, guidance 7.5):

| measure                                                   | what is counted                           |
|-----------------------------------------------------------|-------------------------------------------|
| "a {colour} {shape}": colour / shape right                | the largest object's colour / shape       |
| "a {c1} {s1} and a {c2} {s2}": both objects right        | judge.score(...)["objects"]               |
| held-out pairs ("a purple square", "a cyan triangle")     | colour and shape both right               |
| attention peak                                            | the shape word's cross-attention map (heads, layers and steps averaged, Hertz et al. 2022) peaks inside the judged object |
| attention chance                                          | the judged object's share of the image: a map's peak at a random place lands inside this often |
| seconds per image                                         | one 25-step image with guidance, one CPU thread |
| megabytes                                                 | the weights in the folder                 |
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..control.attention_maps import attention_layers, capture, token_maps
from .judge import judge, nearest_object, score
from .scenes import BASE_SHAPES, COLORS, HELD_OUT_PAIRS, ScenesDataset, render

TARGETS = {"color": 0.95, "shape": 0.90, "two_objects": 0.60, "held_out": 0.75, "attention_peak": 0.80,
           "attention_chance": None, "seconds_per_image": 2.0, "megabytes": 60.0}


def single_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x base shape pair seen in training."""
    return [(f"a {c} {s}", c, s) for c in COLORS for s in BASE_SHAPES if (c, s) not in HELD_OUT_PAIRS]


def two_object_prompts(num: int, seed: int = 0) -> list[str]:
    """`num` captions "a {c1} {s1} and a {c2} {s2}" of two different seen pairs, drawn with `seed`."""
    rng = random.Random(f"minidiff-evaluate-two/{seed}")
    pairs = [(c, s) for _, c, s in single_prompts()]
    prompts = []
    while len(prompts) < num:
        (c1, s1), (c2, s2) = rng.sample(pairs, 2)
        prompts.append(f"a {c1} {s1} and a {c2} {s2}")
    return prompts


def word_position(tokenizer, prompt: str, word: str) -> int:
    """Index of `word`'s token in the encoded prompt (position 0 is <start>); each caption word is one token."""
    tokens = tokenizer.tokenize(prompt)
    wanted = tokenizer.tokenize(word)
    if len(wanted) != 1 or wanted[0] not in tokens:
        raise ValueError(f"{word!r} is not one token of {prompt!r} for this tokenizer (found {tokens}).")
    return 1 + tokens.index(wanted[0])


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, words: list[str] | None = None):
    """Images for `prompts` (one generator each, seeded seed + i), and with `words` (one per prompt) that word's
    cross-attention map, averaged over heads, layers and steps: (B, h, w) for the text half of the batch."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    if words is None:
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images, None
    positions = torch.tensor([word_position(pipe.tokenizer, p, w) for p, w in zip(prompts, words)])
    layers = attention_layers(pipe.unet, "cross")
    h = w = pipe.unet.config.sample_size
    total = []

    def add_maps(module, inputs, output):
        maps = token_maps(layers, (h, w)).detach()                    # (2B or B, 77, h, w)
        maps = maps[-len(prompts):]                                   # the text half: [uncond, cond] under guidance
        total.append(maps[torch.arange(len(prompts)), positions])     # (B, h, w)

    hook = pipe.unet.register_forward_hook(add_maps)
    try:
        with capture(layers):
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    finally:
        hook.remove()
    return images, torch.stack(total).mean(0)                         # (steps, B, h, w) -> (B, h, w)


def peak_inside(attention: torch.Tensor, image) -> tuple[bool, float]:
    """Does the map (h, w) peak inside the largest object the judge finds in `image`? And the share of the
    image that object covers: the chance of a peak at a random place. (False, 0) if there is no object."""
    found = judge(image).objects
    if not found:
        return False, 0.0
    mask = found[0].mask                                              # bool (H, W)
    H, W = mask.shape
    up = F.interpolate(attention[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    y, x = divmod(int(up.argmax()), W)
    return bool(mask[y, x]), float(mask.mean())


def seconds_per_image(pipe, steps: int = 25, guidance: float = 7.5, repeats: int = 2) -> float:
    """Best of `repeats` runs of one image with guidance on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for r in range(repeats):
            start = time.perf_counter()
            pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(r))
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best


def megabytes(folder: str) -> float:
    """Size of the weight files (.safetensors) under `folder`, in MB (10^6 bytes)."""
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder)
               for f in files if f.endswith(".safetensors"))
    return size / 1e6


def evaluate(pipe, seeds: int = 4, steps: int = 25, guidance: float = 7.5, num_two: int = 24, seed: int = 0) -> dict:
    """The second edition's table for one tiny-sd pipeline (see the module docstring)."""
    pipe.set_progress_bar_config(disable=True)
    singles = single_prompts()
    color = shape = peaks = chance = n_single = 0
    for k in range(seeds):
        prompts = [p for p, _, _ in singles]
        images, maps = generate(pipe, prompts, seed + 1000 * k, steps, guidance, words=[s for _, _, s in singles])
        for (prompt, c, s), image, attention in zip(singles, images, maps):
            found = judge(image).objects
            color += bool(found) and found[0].color == c
            shape += bool(found) and found[0].shape == s
            inside, area = peak_inside(attention, image)
            peaks, chance = peaks + inside, chance + area
            n_single += 1
    two = two_object_prompts(num_two, seed)
    held = [f"a {c} {s}" for c, s in HELD_OUT_PAIRS]
    both = held_right = 0
    for k in range(seeds):
        images, _ = generate(pipe, two, seed + 1000 * k + 500, steps, guidance)
        both += sum(score(image, prompt)["objects"] for prompt, image in zip(two, images))
        images, _ = generate(pipe, held, seed + 1000 * k + 900, steps, guidance)
        held_right += sum(score(image, prompt)["objects"] for prompt, image in zip(held, images))
    return {"color": color / n_single, "shape": shape / n_single, "two_objects": both / (seeds * len(two)),
            "held_out": held_right / (seeds * len(held)), "attention_peak": peaks / n_single,
            "attention_chance": chance / n_single,
            "images": n_single + seeds * (len(two) + len(held)), "seconds_per_image": seconds_per_image(pipe, steps)}


@torch.no_grad()
def evaluate_vae(vae, num_scenes: int = 200, seed: int = 12345, batch_size: int = 50) -> dict:
    """What an image keeps through the VAE: decode(mean of encode(x)) for `num_scenes` scenes the training never
    drew (another seed), each judged against its scene description (every attribute, said in the caption or
    not: `judge.score(..., said_only=False)`). The UNet can only draw what the decoder can, so these shares
    bound tiny-sd's. Also the mean squared error in [-1, 1], and per drawn shape how many of its objects come back
    as that shape (`shape_kept`: shape -> (kept, seen); each drawn object matched by `judge.nearest_object`)."""
    vae.eval()
    ds = ScenesDataset(num_scenes, seed, size=64)
    scenes = [ds.scene(i) for i in range(num_scenes)]
    right: dict[str, int] = {}
    by_shape: dict[str, list[int]] = {}                         # shape -> [kept, seen], object by object
    squared_error = 0.0
    for start in range(0, num_scenes, batch_size):
        batch = scenes[start:start + batch_size]
        images = np.stack([render(scene, 64)["image"] for scene in batch])                  # (B, 64, 64, 3) uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0             # (B, 3, 64, 64)
        x_rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)              # the round trip
        squared_error += float(((x_rec - x) ** 2).mean(dim=(1, 2, 3)).sum())
        reconstructions = ((x_rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for scene, image in zip(batch, reconstructions):
            judgement = judge(image)
            for key, ok in score(judgement, scene, said_only=False).items():
                right[key] = right.get(key, 0) + ok
            for obj in scene.objects:
                near = nearest_object(judgement.objects, obj.box)
                kept, seen = by_shape.get(obj.shape, [0, 0])
                by_shape[obj.shape] = [kept + (near is not None and near.shape == obj.shape), seen + 1]
    return {"scenes": num_scenes, "mse": squared_error / num_scenes,
            **{key: right[key] / num_scenes for key in ("color", "shape", "size", "position", "count", "all")},
            "shape_kept": {shape: tuple(counts) for shape, counts in sorted(by_shape.items())}}


def table(result: dict, folder: str | None = None) -> str:
    """The result as a markdown table beside the targets."""
    if folder is not None:
        result = {**result, "megabytes": megabytes(folder)}
    rows = ["| measure | measured | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        if key not in result:
            continue
        lower_is_better = key in ("seconds_per_image", "megabytes")
        value = f"{result[key]:.2f}" if lower_is_better else f"{100 * result[key]:.1f}%"
        if target is None:   # the attention peak's chance level: the object's share of the image
            goal = "(chance level of attention_peak)"
        else:
            goal = f"<= {target:g}" if lower_is_better else f">= {100 * target:.0f}%"
        rows.append(f"| {key} | {value} | {goal} |")
    return "\n".join(rows)


def main_vae(args) -> None:
    """`python -m minidiff.training evaluate vae --model FOLDER [--images SCENES]`: FOLDER holds an AutoencoderKL
    (config.json + weights), e.g. runs/v2/vae/vae or a pipeline's vae/ folder."""
    from ..models.vae import AutoencoderKL

    if args.model is None:
        raise SystemExit("evaluate vae: give --model, a folder with an AutoencoderKL (e.g. runs/v2/vae/vae).")
    start = time.time()
    result = evaluate_vae(AutoencoderKL.from_pretrained(args.model), num_scenes=args.images or 200)
    print("| measure | reconstructions right |", "|---|---|", sep="\n")
    for key in ("color", "shape", "size", "position", "count", "all"):
        print(f"| {key} | {100 * result[key]:.1f}% |")
    print("shape kept, object by object:", ", ".join(f"{shape} {kept}/{seen}"
                                                      for shape, (kept, seen) in result["shape_kept"].items()))
    print(f"MSE {result['mse']:.5f} over {result['scenes']} held-out scenes ({time.time() - start:.0f} s)")


def main(args) -> None:
    """`python -m minidiff.training evaluate scenes --model FOLDER [--images SEEDS] [--steps N]`."""
    from ..pipelines.base import DiffusionPipeline

    if args.model is None:
        raise SystemExit("evaluate scenes: give --model, a tiny-sd folder trained with --data scenes.")
    start = time.time()
    pipe = DiffusionPipeline.from_pretrained(args.model).to(args.device)
    result = evaluate(pipe, seeds=args.images or 4, steps=args.steps or 25, seed=args.seed)
    folder = args.model if os.path.isdir(args.model) else None
    print(table(result, folder))
    print(f"({np.round(time.time() - start):.0f} s, {result['images']} images)")
