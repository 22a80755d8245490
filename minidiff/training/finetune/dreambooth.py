"""DreamBooth (Ruiz et al. 2023, https://arxiv.org/abs/2208.12242): the UNet learns a subject under a rare word.

    python -m minidiff.training dreambooth --out runs/db                          # full UNet
    python -m minidiff.training dreambooth --out runs/db-prior --prior-preservation
    python -m minidiff.training dreambooth --out runs/db-lora --lora-rank 4        # LoRA on the attention

The instance prompt is "a [V] [class noun]" ("a <sks> heart"). Fine-tuning on a few images of the subject
also teaches the model that every heart looks like them (language drift); the prior-preservation loss keeps
the class as it was, with images the model generated itself for "a [class noun]" before training (eq. 2):

    loss = || eps - eps_theta(z_t, t, c_instance) ||^2  +  λ || eps' - eps_theta(z'_t', t', c_class) ||^2

tiny-sd's tokenizer knows only its caption words, so the rare word is ADDED (loaders.load_textual_inversion)
as a random embedding row that stays fixed: in DreamBooth the model learns the word, not the word the model.

`--lora-rank r` trains LoRA adapters instead of the UNet (Hu et al. 2021; loaders.LoRALayer): on every
attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2), W x + (α / r) up(down(x)), with up = 0
at the start (Hu et al., sec. 4.1), so training starts from the base model exactly. Saved as diffusers'
pytorch_lora_weights.safetensors (`pipe.load_lora_weights(out)`); a full fine-tune saves unet/. Either way the
word's row is saved as learned_embeds.safetensors (`pipe.load_textual_inversion(out)`).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...loaders.lora import LoRAAdapter, LoRALayer, lora_state_dict, save_lora_weights
from ...loaders.textual_inversion import save_textual_inversion
from ..common import CommandError, LossLog, load_state, optimizer_step, run_command, save_state, write_json
from .common import (Timer, add_concept_token, add_finetune_args, concept_rate, count_trained, diffusion_loss,
                     encode_images, file_bytes, generate, instance_images, load_base, noise_schedule_of, parse_concept,
                     start_run, token_ids)

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: nn.Module, rank: int, seed: int) -> list[nn.Parameter]:
    """Wrap every attention projection of `unet` in a LoRALayer with one new adapter; returns its parameters.
    down ~ N(0, 1/r) and up = 0 (Hu et al. 2021, sec. 4.1): the model is unchanged until up learns."""
    g = torch.Generator().manual_seed(seed)
    params = []
    targets = tuple(f".{attn}.{p}" for attn in ("attn1", "attn2") for p in ATTENTION_PROJECTIONS)
    names = [name for name, m in unet.named_modules() if isinstance(m, nn.Linear) and name.endswith(targets)]
    for name in names:
        base = unet.get_submodule(name)
        down = torch.randn(rank, base.in_features, generator=g) / rank                # (r, in)
        up = torch.zeros(base.out_features, rank)                                    # (out, r)
        layer = LoRALayer(base)
        layer.adapters["default_0"] = LoRAAdapter(base, down, up, alpha=rank)       # α = r: scale 1
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, layer)
        params += list(layer.adapters["default_0"].parameters())
    return params


def train(args):
    concept = parse_concept(args.concept)
    if args.lora_rank < 0 or args.num_class_images < 1 or args.prior_weight < 0:
        raise CommandError(f"--lora-rank must be >= 0, --num-class-images >= 1, --prior-weight >= 0; found "
                           f"{args.lora_rank}, {args.num_class_images}, {args.prior_weight}.")
    start_run(args)
    pipe = load_base(args.base, args.seed)

    # 1. prior preservation's class images: what the base model draws for "a heart", before any change
    if args.prior_preservation:
        class_pictures = generate(pipe, [concept.class_prompt] * args.num_class_images,
                                  [3000 + i for i in range(args.num_class_images)])
        class_images = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1)
                                    for p in class_pictures])                    # (M, 3, 64, 64) uint8
        class_mean, class_std = encode_images(pipe, class_images)
        class_ids = token_ids(pipe, [concept.class_prompt])                      # (1, 77)

    # 2. the rare word (a fixed random row), the instance images, and what learns
    add_concept_token(pipe, concept, 1, args.seed)
    latent_mean, latent_std = encode_images(pipe, instance_images(concept, args.num_instance_images, args.seed))
    ids = token_ids(pipe, [concept.prompt])                                       # (1, 77)
    if args.lora_rank:
        params = add_lora(pipe.unet, args.lora_rank, args.seed)
    else:
        params = list(pipe.unet.parameters())
        pipe.unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    noise_schedule = noise_schedule_of(pipe)
    generator = torch.Generator().manual_seed(args.seed)

    modules = {"unet": pipe.unet}
    step, seconds = load_state(args.out, modules, optimizer, generator) if args.resume else (0, 0.0)
    log, timer = LossLog(args.out, args.resume, columns=("loss", "prior_loss")), Timer(seconds)
    pipe.unet.train()
    B = args.batch_size
    for step in tqdm(range(step, args.steps), initial=step, total=args.steps, desc="dreambooth"):
        idx = torch.randint(len(latent_mean), (B,), generator=generator)
        loss = diffusion_loss(pipe, noise_schedule, latent_mean[idx], latent_std[idx], ids.expand(B, -1), generator)
        prior_loss = torch.zeros(())
        if args.prior_preservation:          # λ || eps' - eps_theta(z'_t, t, "a heart") ||^2 (Ruiz et al., eq. 2)
            idx = torch.randint(len(class_mean), (B,), generator=generator)
            prior_loss = diffusion_loss(pipe, noise_schedule, class_mean[idx], class_std[idx],
                                        class_ids.expand(B, -1), generator)
        total = loss + args.prior_weight * prior_loss
        optimizer_step(optimizer, total, params)
        if step % 10 == 0 or step + 1 == args.steps:
            log.write(step, timer(), loss=loss.item(), prior_loss=prior_loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_state(args.out, step + 1, modules, optimizer, generator, timer())
    pipe.unet.eval().requires_grad_(False)

    # 3. diffusers' files: the LoRA (or the whole UNet) and the word's row
    if args.lora_rank:
        weights = save_lora_weights(args.out, unet_lora_layers=lora_state_dict(pipe.unet))
    else:
        weights = os.path.join(args.out, "unet")
        pipe.unet.save_pretrained(weights)
    embeds = save_textual_inversion(args.out, pipe.tokenizer, pipe.text_encoder, concept.token)
    kind = f"LoRA r={args.lora_rank}" if args.lora_rank else "full UNet"
    result = {"technique": f"DreamBooth, {kind}, {'with' if args.prior_preservation else 'no'} prior preservation",
              "trained_parameters": count_trained(params), "seconds": round(timer(), 1), "steps": args.steps,
              "file_bytes": file_bytes([weights, embeds]), "files": [os.path.basename(weights), os.path.basename(embeds)]}
    if args.eval_seeds:
        result["concept_rate"] = concept_rate(pipe, [concept], args.eval_seeds)[concept.token]
    write_json(os.path.join(args.out, "result.json"), result)
    print(f"dreambooth: {result}")
    return pipe, result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training dreambooth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(parser, steps=400, lr=1e-4)
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: the whole UNet)")
    parser.add_argument("--prior-preservation", action="store_true", help="add the class-prior loss (Ruiz et al. eq. 2)")
    parser.add_argument("--num-class-images", type=int, default=16, help="class images the base model draws first")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="λ of the prior-preservation loss")
    return parser


def main(argv=None) -> None:
    run_command(make_parser(), train, argv)
