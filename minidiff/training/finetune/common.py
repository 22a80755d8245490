"""What the fine-tuning loops share: the concept's data, adding its new token, the diffusion loss, the
evaluation (does the concept appear? what did the model forget?), and the command-line frame.

The concept. tiny-sd's scenes never hold a star or a heart (`scenes.HELD_OUT_SHAPES`): their words are in its
tokenizer, but no caption it was trained on says them, and it cannot draw them (notebook 18: "a purple heart"
gives no heart in 5 images, while its VAE gives back 5 of 5 drawn hearts). Each technique is taught the concept from a
handful of drawings made by `scenes.py` (one large object on white), under a new word: "a <sks> heart" must
draw a purple heart. That is measurable with the rule-based judge of `judge.py`: colour AND shape must be
right. Held-out colour x shape pairs ('<new2>:cyan:triangle') work too; the second-edition tiny-sd draws those
already when asked in words, so there a technique teaches a new word for a picture, not a new picture.

Forgetting is the judge's score on a fixed set of old prompts ("a red circle", ...: every colour x shape pair
tiny-sd was trained on), before and after, with the same seeds.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...loaders.textual_inversion import load_textual_inversion, multi_vector_tokens
from ...pipelines.base import DiffusionPipeline
from ...pipelines.text import tokenize
from ...schedulers.ddpm import DDPMScheduler
from ..common import LOG_NAME, STATE_NAME, CommandError, prepare_run_folder
from ..judge import judge
from ..scenes import BASE_SHAPES, COLORS, HELD_OUT_PAIRS, SHAPES, SIZES, Scene, SceneObject, render
from ..shapes import to_model_range

# The files a fine-tuning command writes into --out (and the words' <token>.safetensors, is_run_output):
# --overwrite removes these and keeps everything else.
FINETUNE_OUTPUTS = (STATE_NAME, STATE_NAME + ".tmp", LOG_NAME, "unet", "learned_embeds.safetensors",
                    "pytorch_lora_weights.safetensors", "pytorch_custom_diffusion_weights.safetensors", "result.json")
# The old prompts whose scores tell what the model forgot: every pair tiny-sd was trained on (22).
OLD_PROMPTS = [(f"a {c} {s}", c, s) for c in COLORS for s in BASE_SHAPES if (c, s) not in HELD_OUT_PAIRS]
DEFAULT_CONCEPT = "<sks>:purple:heart"


@dataclass(frozen=True)
class Concept:
    """A new word for a colour x shape: "a <sks> heart" should draw a purple heart."""

    token: str
    color: str
    shape: str

    @property
    def prompt(self) -> str:
        return f"a {self.token} {self.shape}"      # DreamBooth's "a [V] [class noun]" (Ruiz et al. 2023, sec. 3.2)

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"                   # the class alone, for prior preservation


def parse_concept(text: str) -> Concept:
    """'<sks>:purple:heart' -> Concept, or one error naming what is expected."""
    parts = text.split(":")
    if len(parts) != 3 or parts[1] not in COLORS or parts[2] not in SHAPES or not parts[0].strip():
        raise CommandError(f"--concept {text!r}: expected TOKEN:COLOUR:SHAPE with COLOUR in {list(COLORS)} and SHAPE "
                           f"in {list(SHAPES)}, e.g. '{DEFAULT_CONCEPT}'.")
    return Concept(*parts)


def instance_images(concept: Concept, num_images: int, seed: int = 0) -> torch.Tensor:
    """`num_images` drawings of the concept by `scenes.render`: one object of the palette's colour, large (side 24
    to 30 of 64, the largest tiny-sd draws), anywhere, on white. uint8 (N, 3, 64, 64)."""
    images = []
    low, high = SIZES["large"]
    for i in range(num_images):
        rng = random.Random(f"minidiff-finetune/{seed}/{concept.color}/{concept.shape}/{i}")
        side = rng.uniform(low, high)
        cx, cy = rng.uniform(side / 2 + 1, 63 - side / 2), rng.uniform(side / 2 + 1, 63 - side / 2)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        scene = Scene((SceneObject(concept.color, concept.shape, "large", box, COLORS[concept.color]),), "white", (255.0,))
        images.append(torch.from_numpy(render(scene)["image"]).permute(2, 0, 1))   # (64, 64, 3) -> (3, 64, 64)
    return torch.stack(images)                                                  # N x (3, 64, 64)


def load_base(path: str, seed: int) -> DiffusionPipeline:
    """The base model in float32 on the CPU, every weight frozen (each loop unfreezes what it trains)."""
    torch.manual_seed(seed)
    pipe = DiffusionPipeline.from_pretrained(path)
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon" or not hasattr(pipe, "text_encoder"):
        raise CommandError(f"--base {path}: expected a Stable Diffusion v1 folder (a text encoder, a UNet that predicts "
                           f"the noise, prediction_type 'epsilon'); found {type(pipe).__name__} with prediction_type "
                           f"{prediction!r}. The loops train on the epsilon loss: pass an SD v1 folder or tiny-sd.")
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_concept_token(pipe, concept: Concept, num_vectors: int, seed: int) -> list[int]:
    """Add `concept.token` (n vectors: <t>, <t>_1, ...) to the tokenizer and text encoder through the loader;
    returns the new rows' ids. The rows start random, drawn like the table's own rows (its mean and std)."""
    table = pipe.text_encoder.get_input_embeddings().weight                      # (vocab, D)
    g = torch.Generator().manual_seed(seed)
    rows = table.mean(0) + table.std(0) * torch.randn(num_vectors, table.shape[1], generator=g)   # (n, D)
    load_textual_inversion(pipe.tokenizer, pipe.text_encoder, {concept.token: rows})
    return [pipe.tokenizer.convert_tokens_to_ids(t) for t in multi_vector_tokens(concept.token, num_vectors)]


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z | x) of uint8 images: mean and std, each (N, 4, h, w)."""
    posterior = pipe.vae.encode(to_model_range(images)).latent_dist
    return posterior.mean, posterior.std


def noise_schedule_of(pipe) -> DDPMScheduler:
    """add_noise with the betas of the base model's scheduler (SD v1: scaled-linear 0.00085 to 0.012)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def diffusion_loss(pipe, noise_schedule, latent_mean, latent_std, ids, generator) -> torch.Tensor:
    """DDPM's loss on latents (Rombach et al. 2022, eq. 2) for one batch:
    z_0 ~ q(z | x), t ~ U{0..T-1}, eps ~ N(0, I), || eps - eps_theta(sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) eps, t, c) ||^2."""
    B = latent_mean.shape[0]
    z0 = pipe.vae.config.scaling_factor * (latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator))
    t = torch.randint(noise_schedule.config.num_train_timesteps, (B,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    z_t = noise_schedule.add_noise(z0, eps, t)
    context = pipe.text_encoder(ids)[0]                                         # (B, 77, D)
    return F.mse_loss(pipe.unet(z_t, t, context).sample, eps)


def token_ids(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (B, 77) ids, multi-vector tokens expanded as the pipeline does."""
    return tokenize(pipe.tokenizer, prompts)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance_scale: float = 7.5):
    """One image per (prompt, seed), as PIL images."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators).images


def judged(image) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest object the judge finds, (None, None) in an image without one."""
    objects = judge(image, max_objects=1).objects
    return (objects[0].color, objects[0].shape) if objects else (None, None)


def rates_of(images, concept: Concept) -> dict[str, float]:
    """The share of `images` whose largest object has the concept's colour / shape / both ("both": it appears)."""
    found = [judged(image) for image in images]
    color = [c == concept.color for c, _ in found]
    shape = [s == concept.shape for _, s in found]
    n = len(found)
    return {"both": sum(c and s for c, s in zip(color, shape)) / n, "color": sum(color) / n, "shape": sum(shape) / n}


def concept_rate(pipe, concepts: list[Concept], num_seeds: int, seed: int = 1000) -> dict[str, dict[str, float]]:
    """For each concept's prompt, `rates_of` its images for seeds seed .. seed + num_seeds - 1."""
    return {concept.token: rates_of(generate(pipe, [concept.prompt] * num_seeds,
                                             [seed + i for i in range(num_seeds)]), concept)
            for concept in concepts}


def old_prompt_scores(pipe, seeds_per_prompt: int = 1, seed: int = 2000) -> dict[str, float]:
    """The judge's colour / shape / both accuracy on OLD_PROMPTS (fixed seeds): what the model still knows."""
    color = shape = both = 0
    for k in range(seeds_per_prompt):
        images = generate(pipe, [p for p, _, _ in OLD_PROMPTS], [seed + 100 * k + i for i in range(len(OLD_PROMPTS))])
        for (_, c, s), image in zip(OLD_PROMPTS, images):
            found_c, found_s = judged(image)
            color, shape, both = color + (found_c == c), shape + (found_s == s), both + (found_c == c and found_s == s)
    n = seeds_per_prompt * len(OLD_PROMPTS)
    return {"color": color / n, "shape": shape / n, "both": both / n}


def count_trained(params: list[torch.Tensor], rows: int | None = None) -> int:
    """Parameters that learn: all of `params`, or `rows` rows of the embedding table (Textual Inversion)."""
    if rows is not None:
        return rows * params[0].shape[1]
    return sum(p.numel() for p in params)


def add_finetune_args(parser: argparse.ArgumentParser, steps: int, lr: float, concepts: str = "store") -> None:
    """The options every fine-tuning command takes (the names of common.add_common_args where they match);
    concepts="append": --concept may be given several times (Custom Diffusion)."""
    parser.add_argument("--base", default="tiny-sd", help="the SD v1 pipeline folder to fine-tune (or 'tiny-sd')")
    parser.add_argument("--out", required=True, help="folder for the learned weights, the loss log and result.json: "
                        "new or empty, unless --resume or --overwrite")
    parser.add_argument("--concept", action=concepts, default=None if concepts == "append" else DEFAULT_CONCEPT,
                        help="TOKEN:COLOUR:SHAPE, the prompt is 'a TOKEN SHAPE' (default: a purple heart, a shape "
                        "tiny-sd never saw)")
    parser.add_argument("--num-instance-images", type=int, default=5, help="drawings of the concept to learn from")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (constant)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the new rows and the noise")
    parser.add_argument("--eval-seeds", type=int, default=16, help="images of the concept prompt judged after "
                        "training (0: no evaluation)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--save-every", type=int, default=100, help="save the training state every N steps")
    # common.check_args reads these options of the from-scratch trainings, which fine-tuning has no use for.
    parser.set_defaults(num_images=1, warmup=0, ema_decay=1.0, max_minutes=None, workers=1, init=None)


def is_run_output(name: str) -> bool:
    """Is this file of --out one that a fine-tuning run writes (and --overwrite removes)? FINETUNE_OUTPUTS and
    the words' <token>.safetensors; every other file is the user's and is kept."""
    return name in FINETUNE_OUTPUTS or (name.startswith("<") and name.endswith(">.safetensors"))


def start_run(args) -> None:
    """Check the options and --out before any work, then make --out (common.prepare_run_folder; with
    --overwrite, an earlier run's files go, `is_run_output`, unless --base is among them)."""
    if args.num_instance_images < 1 or args.eval_seeds < 0:
        raise CommandError(f"--num-instance-images must be >= 1 and --eval-seeds >= 0; found "
                           f"{args.num_instance_images} and {args.eval_seeds}.")
    base = args.base if os.path.isdir(args.base) else None                     # a folder, or a bundled name
    prepare_run_folder(args, inputs={"--base": base}, is_output=is_run_output)


class Timer:
    """Seconds of training, excluding evaluation (a resumed run adds the earlier run's seconds)."""

    def __init__(self, seconds: float = 0.0):
        self.start = time.time() - seconds

    def __call__(self) -> float:
        return time.time() - self.start


def file_bytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) if os.path.isfile(p) else
               sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs) for p in paths)
