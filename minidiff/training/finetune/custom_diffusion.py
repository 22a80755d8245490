"""Custom Diffusion (Kumari et al. 2023, "Multi-Concept Customization of Text-to-Image Diffusion",
https://arxiv.org/abs/2212.04488): only the cross-attention key/value projections and new words learn.

    python -m minidiff.training custom-diffusion --out runs/cd
    python -m minidiff.training custom-diffusion --out runs/cd2 --concept '<new1>:purple:heart' --concept '<new2>:cyan:triangle'

The text reaches the image only through cross-attention, as K = W_k c and V = W_v c (sec. 3.2): Custom
Diffusion fine-tunes W_k and W_v of every attn2 (they change most in full fine-tuning) and one modifier token
per concept ("<new1>"), learned as in Textual Inversion. Several concepts train at once, each prompt with its
own token, the batches drawn from all their images (sec. 3.3, joint training). The paper also regularises with
real images of the class; tiny-sd's shapes have no such retrieval set, and DreamBooth's prior preservation
(dreambooth.py) shows that effect.

Saved as diffusers' pytorch_custom_diffusion_weights.safetensors (`loaders.load_attn_procs(pipe.unet, out)`) and
one <new1>.safetensors per token (`pipe.load_textual_inversion(out, weight_name="<new1>.safetensors")`).
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm.auto import tqdm

from ...loaders.custom_diffusion import save_attn_procs
from ...loaders.textual_inversion import save_textual_inversion
from ..common import LossLog, load_state, optimizer_step, run_command, save_state, write_json
from .common import (Timer, add_concept_token, add_finetune_args, concept_rate, diffusion_loss, encode_images,
                     file_bytes, instance_images, load_base, noise_schedule_of, parse_concept, start_run, token_ids)


def cross_attention_kv(unet) -> dict[str, torch.nn.Parameter]:
    """Every attn2.to_k / to_v weight of the UNet, by name: what Custom Diffusion trains."""
    return {name: p for name, p in unet.named_parameters()
            if ".attn2.to_k." in name or ".attn2.to_v." in name}


def train(args):
    concepts = [parse_concept(text) for text in (args.concept or ["<new1>:purple:heart"])]
    start_run(args)

    # 1. the base model, one new word per concept, and what learns: attn2's W_k, W_v and the words' rows
    pipe = load_base(args.base, args.seed)
    new_ids = [i for k, c in enumerate(concepts) for i in add_concept_token(pipe, c, 1, args.seed + k)]
    table = pipe.text_encoder.get_input_embeddings().weight                       # (vocab + concepts, D)
    frozen_rows = torch.ones(table.shape[0], dtype=torch.bool)
    frozen_rows[new_ids] = False
    original = table.detach().clone()
    kv = cross_attention_kv(pipe.unet)
    for p in [table, *kv.values()]:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([table, *kv.values()], lr=args.lr, weight_decay=0.0)

    # 2. the data: every concept's images, each with its own prompt
    means, stds, ids = [], [], []
    for c in concepts:
        mean, std = encode_images(pipe, instance_images(c, args.num_instance_images, args.seed))
        means.append(mean)
        stds.append(std)
        ids.append(token_ids(pipe, [c.prompt]).expand(len(mean), -1))            # (N, 77)
    latent_mean, latent_std, ids = torch.cat(means), torch.cat(stds), torch.cat(ids)
    noise_schedule = noise_schedule_of(pipe)
    generator = torch.Generator().manual_seed(args.seed)

    modules = {"unet": pipe.unet, "embeddings": pipe.text_encoder.get_input_embeddings()}
    step, seconds = load_state(args.out, modules, optimizer, generator) if args.resume else (0, 0.0)
    log, timer = LossLog(args.out, args.resume), Timer(seconds)
    for step in tqdm(range(step, args.steps), initial=step, total=args.steps, desc="custom-diffusion"):
        idx = torch.randint(len(latent_mean), (args.batch_size,), generator=generator)
        loss = diffusion_loss(pipe, noise_schedule, latent_mean[idx], latent_std[idx], ids[idx], generator)
        optimizer_step(optimizer, loss, list(kv.values()))
        with torch.no_grad():                      # only the new words' rows learn in the table
            table[frozen_rows] = original[frozen_rows]
        if step % 10 == 0 or step + 1 == args.steps:
            log.write(step, timer(), loss=loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_state(args.out, step + 1, modules, optimizer, generator, timer())
    for p in [table, *kv.values()]:
        p.requires_grad_(False)

    # 3. diffusers' files: the attention weights, and one embedding file per word
    weights = save_attn_procs(pipe.unet, args.out)
    embeds = [save_textual_inversion(args.out, pipe.tokenizer, pipe.text_encoder, c.token,
                                     weight_name=f"{c.token}.safetensors") for c in concepts]
    result = {"technique": f"Custom Diffusion ({len(concepts)} concept{'s' * (len(concepts) > 1)})",
              "trained_parameters": sum(p.numel() for p in kv.values()) + len(new_ids) * table.shape[1],
              "seconds": round(timer(), 1), "steps": args.steps, "file_bytes": file_bytes([weights, *embeds]),
              "files": [os.path.basename(p) for p in [weights, *embeds]]}
    if args.eval_seeds:
        result["concept_rate"] = concept_rate(pipe, concepts, args.eval_seeds)
    write_json(os.path.join(args.out, "result.json"), result)
    print(f"custom-diffusion: {result}")
    return pipe, result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training custom-diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(parser, steps=400, lr=1e-3, concepts="append")
    return parser


def main(argv=None) -> None:
    run_command(make_parser(), train, argv)
