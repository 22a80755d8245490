"""Textual Inversion (Gal et al. 2022, "An Image is Worth One Word", https://arxiv.org/abs/2208.01618).

    python -m minidiff.training textual-inversion --out runs/ti --num-vectors 2      # 400 steps by default

A new word S* is added to the vocabulary, and only its embedding row(s) v* learn; the UNet, the VAE, the text
encoder and every other row of the table stay as they were (Gal et al., eq. 2):

    v* = argmin_v  E_{z_0, eps, t} || eps - eps_theta(z_t, t, c_theta("a S* heart")) ||^2

A concept of n vectors is n tokens "<sks> <sks>_1 ..." (diffusers' convention, loaders/textual_inversion.py).
The gradient reaches the whole table, so after each step the rows that must not learn are written back: AdamW
would otherwise move them by weight decay. The learned rows are saved as diffusers' learned_embeds.safetensors
({token: (n, D)}), which `pipe.load_textual_inversion(out)` (and diffusers') reads.
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm.auto import tqdm

from ...loaders.textual_inversion import save_textual_inversion
from ..common import CommandError, LossLog, load_state, run_command, save_state, write_json
from .common import (Timer, add_concept_token, add_finetune_args, concept_rate, count_trained, diffusion_loss,
                     encode_images, file_bytes, instance_images, load_base, noise_schedule_of, parse_concept,
                     start_run, token_ids)


def train(args):
    concept = parse_concept(args.concept)
    if args.num_vectors < 1:
        raise CommandError(f"--num-vectors must be >= 1; found {args.num_vectors}.")
    start_run(args)

    # 1. the base model, frozen, and the new word's rows: the only parameters that learn
    pipe = load_base(args.base, args.seed)
    new_ids = add_concept_token(pipe, concept, args.num_vectors, args.seed)
    table = pipe.text_encoder.get_input_embeddings().weight                       # (vocab + n, D)
    table.requires_grad_(True)
    frozen_rows = torch.ones(table.shape[0], dtype=torch.bool)
    frozen_rows[new_ids] = False
    original = table.detach().clone()                                              # the rows written back
    optimizer = torch.optim.AdamW([table], lr=args.lr, weight_decay=0.0)

    # 2. the data: a handful of drawings of the concept as latents, one prompt
    latent_mean, latent_std = encode_images(pipe, instance_images(concept, args.num_instance_images, args.seed))
    ids = token_ids(pipe, [concept.prompt])                                        # (1, 77)
    noise_schedule = noise_schedule_of(pipe)
    generator = torch.Generator().manual_seed(args.seed)

    modules = {"embeddings": pipe.text_encoder.get_input_embeddings()}
    step, seconds = load_state(args.out, modules, optimizer, generator) if args.resume else (0, 0.0)
    log, timer = LossLog(args.out, args.resume), Timer(seconds)
    pipe.text_encoder.train()
    for step in tqdm(range(step, args.steps), initial=step, total=args.steps, desc="textual-inversion"):
        idx = torch.randint(len(latent_mean), (args.batch_size,), generator=generator)
        loss = diffusion_loss(pipe, noise_schedule, latent_mean[idx], latent_std[idx],
                              ids.expand(args.batch_size, -1), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():                      # only v* learns: every other row back to its old value
            table[frozen_rows] = original[frozen_rows]
        if step % 10 == 0 or step + 1 == args.steps:
            log.write(step, timer(), loss=loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_state(args.out, step + 1, modules, optimizer, generator, timer())
    pipe.text_encoder.eval()
    table.requires_grad_(False)

    # 3. the learned rows in diffusers' file
    path = save_textual_inversion(args.out, pipe.tokenizer, pipe.text_encoder, concept.token)
    result = {"technique": f"Textual Inversion ({args.num_vectors} vector{'s' * (args.num_vectors > 1)})",
              "trained_parameters": count_trained([table], rows=len(new_ids)), "seconds": round(timer(), 1),
              "steps": args.steps, "file_bytes": file_bytes([path]), "files": [os.path.basename(path)]}
    if args.eval_seeds:
        result["concept_rate"] = concept_rate(pipe, [concept], args.eval_seeds)[concept.token]
    write_json(os.path.join(args.out, "result.json"), result)
    print(f"textual-inversion: {result}")
    return pipe, result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training textual-inversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(parser, steps=400, lr=5e-2)
    parser.add_argument("--num-vectors", type=int, default=1, help="embedding rows of the new word")
    return parser


def main(argv=None) -> None:
    run_command(make_parser(), train, argv)
