"""Train tiny-sd's VAE: an `AutoencoderKL` with Stable Diffusion v1's structure, made small.

    python -m minidiff.training vae --out runs/vae --bf16

A variational autoencoder (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114; SD's version:
Rombach et al. 2022, https://arxiv.org/abs/2112.10752, sec. 3.1) learns

    encode: x (B, 3, 64, 64) -> q(z | x) = N(mean, std^2), z (B, 4, 8, 8)     (factor 8, as SD's)
                                                                  or (B, 4, 16, 16)   (--latent-size 16: factor 4)
    decode: z -> x_rec (B, 3, 64, 64)

by minimising   loss = ||x - decode(z)||^2  +  kl_weight * KL(q(z | x) || N(0, I)),   z ~ q(z | x).

SD adds a perceptual (LPIPS) and an adversarial loss for sharp photos; we add neither. But the squared error
blurs: a blur costs little of it (the error is small and spread over a few edge pixels), so corners get rounded.
Measured on the second edition's VAE after 1,250 MSE steps (`evaluate vae`): 74 of 80 squares came back as
circles. `--rec-loss l1` takes LDM's reconstruction term, |x - decode(z)| (Rombach et al. 2022, appendix G; its
code's `LPIPSWithDiscriminator` starts from the absolute error): the mean of |.| is minimised by the median,
which keeps an edge sharp where the squared error's mean smears it.
After training, `scaling_factor` is measured as SD's 0.18215 was: 1 / std of the latents, so that the
diffusion model sees latents of unit variance; it is written into vae/config.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import torch
import torch.nn.functional as F

from ..models.vae import AutoencoderKL
from .common import (StepKeeper, add_common_args, autocast, ema_update, load_images, load_state, optimizer_step,
                     pick_device, prepare_run_folder, run_command, warmup_lr)
from .shapes import to_model_range

# SD v1's VAE config (block types, 4 latent channels, 3 downsamplings = factor 8) with narrow blocks.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],   # SD v1: [128, 256, 512, 512]
    "layers_per_block": 1,                    # SD v1: 2
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 1.0,                    # replaced by the measured value after training
}
# The second edition (--latent-size 16): 2 downsamplings = factor 4, as LDM-f4 (Rombach et al. 2022, table 1
# found f4-f8 the best trade-off). SD's 512 px / 8 = 64x64 latents; our 64 px / 4 = 16x16: small enough
# for a CPU, large enough that a cross-attention map can tell two objects apart.
VAE_CONFIG_16 = {**VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * 3,
                 "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [32, 64, 64]}
VAE_CONFIGS = {8: VAE_CONFIG, 16: VAE_CONFIG_16}   # latent size of a 64x64 image -> config


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)) = 1/2 (mean^2 + var - 1 - log var), per latent element, averaged."""
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator,
                           batch_size: int = 512) -> float:
    """1 / std of latents z ~ q(z | x) over `images` (uint8): the factor that gives the diffusion model
    unit-variance inputs (how SD's 0.18215 was found)."""
    latents = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start:start + batch_size])
        latents.append(vae.encode(x).latent_dist.sample(generator).float())
    return 1.0 / torch.cat(latents).std().item()


def train(args, vae_config: dict | None = None) -> AutoencoderKL:
    vae_config = vae_config or VAE_CONFIGS[getattr(args, "latent_size", 8)]
    device = pick_device(args.device)
    # Before any work: an earlier run in --out is refused unless --resume or --overwrite.
    prepare_run_folder(args, inputs={})
    torch.manual_seed(args.seed)
    images, _ = load_images(args, resolution=64, device=device)

    vae = AutoencoderKL.from_config(vae_config).to(device).train()
    ema = copy.deepcopy(vae).requires_grad_(False)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(args.seed)  # batches and noise: resumable
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = load_state(args.out, {"vae": vae, "ema": ema}, optimizer, generator)
    keeper = StepKeeper(args, "vae", {"vae": vae, "ema": ema}, optimizer, generator, step, seconds,
                        columns=("loss", "rec", "kl"))
    for step in keeper.bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_lr(step, args.warmup)
        # 1. a batch of images in [-1, 1]
        idx = torch.randint(len(images), (args.batch_size,), generator=generator, device=device)
        x = to_model_range(images[idx])                                   # (B, 3, 64, 64)

        with autocast(device, args.bf16):
            # 2. encode to q(z | x) and draw z with the reparameterisation trick
            posterior = vae.encode(x).latent_dist                         # mean, logvar: (B, 4, h, w), h = w = 64 / factor
            z = posterior.sample(generator)
            # 3. decode
            x_rec = vae.decode(z).sample                                  # (B, 3, 64, 64)
        # 4. reconstruction + KL (in float32)
        rec = F.l1_loss(x_rec.float(), x) if args.rec_loss == "l1" else F.mse_loss(x_rec.float(), x)
        kl = kl_divergence(posterior.mean.float(), posterior.logvar.float())
        loss = rec + args.kl_weight * kl

        optimizer_step(optimizer, loss, vae.parameters())
        ema_update(ema, vae, args.ema_decay)

        if keeper.end_of_step(step, loss=loss.item(), rec=rec.item(), kl=kl.item()):
            break

    # 5. measure the latent scale on (up to) 10,000 images and save the EMA weights with it
    ema.eval()
    scaling_factor = measure_scaling_factor(ema, images[:10_000], generator)
    ema.config = dataclasses.replace(ema.config, scaling_factor=round(scaling_factor, 5))
    ema.save_pretrained(os.path.join(args.out, "vae"))
    print(f"vae: {keeper.done} steps in {keeper.seconds():.0f} s, scaling_factor = {scaling_factor:.5f}, "
          f"saved to {os.path.join(args.out, 'vae')}")
    return ema


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=6000, batch_size=64, lr=2e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term")
    parser.add_argument("--rec-loss", choices=["mse", "l1"], default="mse",
                        help="the reconstruction term: squared error (the first edition) or LDM's absolute error, "
                        "which keeps corners sharper (see above); the log's 'rec' column is in its units")
    parser.add_argument("--latent-size", type=int, choices=sorted(VAE_CONFIGS), default=8,
                        help="latents of a 64x64 image: 8 (factor 8, as SD; the first edition) or 16 (factor 4)")
    run_command(parser, train, argv)
