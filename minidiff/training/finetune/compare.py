"""Every fine-tuning technique on the same data and the same budget, judged the same way: one table.

    python -m minidiff.training finetune-compare --out runs/compare [--steps 400]

Each run trains on the same instance images (seed 0), with the same steps, batch size and noise seeds, then
its saved files are loaded into a fresh base model THROUGH THE LOADERS (what a user downloading them would do)
and judged by judge.py: how often the concept appears (colour AND shape right, `--eval-seeds` images of
"a <sks> heart"), and the old prompts' scores before and after (common.OLD_PROMPTS, 2 seeds each). Training
time is the loop's own (1 CPU thread when OMP_NUM_THREADS=1), without the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ...loaders.custom_diffusion import load_attn_procs
from ...models.unet_2d_condition import UNet2DConditionModel
from ..common import CommandError, run_command, write_json
from . import custom_diffusion, dreambooth, textual_inversion
from .common import DEFAULT_CONCEPT, concept_rate, load_base, old_prompt_scores, parse_concept

# (name, module, options): the learning rates were picked on tiny-sd with short runs (the module docstrings).
RUNS = [
    ("ti-1", textual_inversion, ["--lr", "5e-2"]),
    ("ti-2", textual_inversion, ["--lr", "5e-2", "--num-vectors", "2"]),
    ("db-full", dreambooth, ["--lr", "1e-4"]),
    ("db-full-prior", dreambooth, ["--lr", "1e-4", "--prior-preservation"]),
    ("db-lora", dreambooth, ["--lr", "1e-3", "--lora-rank", "4"]),
    ("db-lora-prior", dreambooth, ["--lr", "1e-3", "--lora-rank", "4", "--prior-preservation"]),
    ("cd", custom_diffusion, ["--lr", "3e-3", "--concept", "<sks>:purple:heart"]),
    ("cd-2", custom_diffusion, ["--lr", "3e-3", "--concept", "<sks>:purple:heart", "--concept", "<new2>:cyan:triangle"]),
]


def load_finetuned(base: str, folder: str, seed: int = 0):
    """A fresh base pipeline with a run's saved files loaded through minidiff's loaders (diffusers' file names)."""
    pipe = load_base(base, seed)
    files = os.listdir(folder)
    if "unet" in files:                                    # DreamBooth, full: the whole fine-tuned UNet
        pipe.unet.load_state_dict(UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).state_dict())
    if "pytorch_lora_weights.safetensors" in files:        # DreamBooth, LoRA
        pipe.load_lora_weights(folder)
    if "pytorch_custom_diffusion_weights.safetensors" in files:
        load_attn_procs(pipe.unet, folder)
    if "learned_embeds.safetensors" in files:              # the new word (Textual Inversion, DreamBooth)
        pipe.load_textual_inversion(folder)
    for name in sorted(files):                             # Custom Diffusion's <new1>.safetensors, one per word
        if name.startswith("<") and name.endswith(">.safetensors"):
            pipe.load_textual_inversion(folder, weight_name=name)
    return pipe


def markdown_table(rows: list[dict], before: dict) -> str:
    lines = ["| technique | parameters trained | file size | training time | concept appears (colour / shape) | "
             "old prompts, both right (before " + f"{before['both']:.0%})" + " |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rates = "; ".join(f"{token} {v['both']:.0%} ({v['color']:.0%} / {v['shape']:.0%})"
                          for token, v in r["concept_rate"].items())
        size = r["file_bytes"]
        shown = f"{size / 1e6:.1f} MB" if size > 1e6 else f"{size / 1e3:.1f} kB" if size > 1e3 else f"{size} B"
        lines.append(f"| {r['technique']} | {r['trained_parameters']:,} | {shown} | {r['seconds']:.0f} s | {rates} | "
                     f"{r['old_prompts']['both']:.0%} |")
    return "\n".join(lines)


def compare(args):
    if args.steps < 1 or args.eval_seeds < 1:
        raise CommandError(f"--steps and --eval-seeds must be >= 1; found {args.steps} and {args.eval_seeds}.")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CommandError(f"--out {args.out} already holds files; pass --overwrite to replace the runs there, or a "
                           "new --out.")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    base_pipe = load_base(args.base, 0)
    before = old_prompt_scores(base_pipe, seeds_per_prompt=2)
    rows = []
    for name, module, options in RUNS:
        folder = os.path.join(args.out, name)
        argv = ["--base", args.base, "--out", folder, "--overwrite", "--steps", str(args.steps), "--eval-seeds", "0",
                *options]
        module.main(argv)
        with open(os.path.join(folder, "result.json")) as f:
            row = json.load(f)
        pipe = load_finetuned(args.base, folder)
        concepts = [parse_concept(o) for o, prev in zip(options, [""] + options) if prev == "--concept"] \
            or [parse_concept(DEFAULT_CONCEPT)]
        row.update(name=name, command="python -m minidiff.training " + module.__name__.rsplit(".", 1)[1].replace(
            "_", "-") + " " + " ".join(f"'{a}'" if "<" in a else a for a in argv),
            concept_rate=concept_rate(pipe, concepts, args.eval_seeds), old_prompts=old_prompt_scores(pipe, 2))
        rows.append(row)
        print(f"{name}: {row}")
    table = markdown_table(rows, before)
    write_json(os.path.join(args.out, "comparison.json"), {"steps": args.steps, "batch_size": 4,
                                                           "eval_seeds": args.eval_seeds, "threads": args.threads,
                                                           "old_prompts_before": before, "runs": rows})
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training finetune-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny-sd")
    parser.add_argument("--out", required=True, help="one subfolder per run, and comparison.json / .md")
    parser.add_argument("--steps", type=int, default=400, help="the same for every technique")
    parser.add_argument("--eval-seeds", type=int, default=32, help="images of each concept prompt judged")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the times depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs in --out")
    run_command(parser, compare, argv)
