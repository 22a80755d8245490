"""Train tiny-ddpm: an unconditional pixel-space `UNet2DModel` on 32x32 shapes, with DDPM's loss.

    python -m minidiff.training ddpm --out runs/tiny-ddpm --bf16

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239, Algorithm 1:

    repeat
        x_0 ~ q(x_0)                                       a training image
        t ~ Uniform({1, ..., T}),  eps ~ N(0, I)
        x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps        (eq. 4, `scheduler.add_noise`)
        take a gradient step on  || eps - eps_theta(x_t, t) ||^2       (eq. 14, the "simple" loss)

The output folder is a `DDPMPipeline` in the hub layout: model_index.json, unet/, scheduler/.

`--prediction-type v_prediction` regresses v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 instead of eps
(Salimans & Ho 2022, https://arxiv.org/abs/2202.00512, sec. 4). Why: at t near T, alpha_bar_t ~ 4e-5, so
x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) magnifies any error in eps about 150 times. An eps
model then cannot say what the noisiest steps should decide, the image's mean colour: tiny-ddpm's first edition
(eps, 7,568 steps) predicted a background of 0.10 at t = 999 where the data's mean is 0.63, and its samples came
out with gray or tinted backgrounds (20% clean shapes). With v the model predicts about -x_0 there, the mean colour
directly: the bundled tiny-ddpm is that model continued for 1,842 steps on v (`--init`), 83% clean (its card).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F

from ..schedulers.ddpm import DDPMScheduler
from ..models.unet_2d import UNet2DModel
from .common import (StepKeeper, add_common_args, autocast, ema_update, load_images, load_state, optimizer_step,
                     pick_device, prepare_run_folder, run_command, warmup_lr, write_json)
from .shapes import to_model_range

RESOLUTION = 32

# google/ddpm-cat-256's structure (ResNet levels, self-attention at the lowest resolution), made small.
UNET_CONFIG = {
    "sample_size": RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],       # 32x32 -> 16x16 -> 8x8
    "layers_per_block": 1,
    "attention_head_dim": 8,                  # here the size of one head (8 heads of 8 at 64 channels)
    "norm_num_groups": 32,
}
# DDPM's linear schedule (Ho et al. sec. 4: T = 1000, beta from 1e-4 to 0.02), as in google/ddpm-cat-256.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}


def train(args, unet_config: dict = UNET_CONFIG) -> UNet2DModel:
    prediction_type = getattr(args, "prediction_type", "epsilon")
    device = pick_device(args.device)
    # Before any work: an earlier run in --out is refused unless --resume or --overwrite.
    prepare_run_folder(args, inputs={"--init": args.init})
    torch.manual_seed(args.seed)
    images, _ = load_images(args, resolution=RESOLUTION, device=device)   # the captions are not used

    if args.init:
        unet = UNet2DModel.from_pretrained(args.init, subfolder="unet")
    else:
        unet = UNet2DModel.from_config(unet_config)
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler.from_config({**SCHEDULER_CONFIG, "prediction_type": prediction_type})
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)  # ᾱ on the GPU: no copy (and sync) per step
    T = scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(args.seed)
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = load_state(args.out, {"unet": unet, "ema": ema}, optimizer, generator)
    keeper = StepKeeper(args, "ddpm", {"unet": unet, "ema": ema}, optimizer, generator, step, seconds)
    for step in keeper.bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_lr(step, args.warmup)
        # 1. x_0: a batch of training images in [-1, 1]
        idx = torch.randint(len(images), (args.batch_size,), generator=generator, device=device)
        x0 = to_model_range(images[idx])                                          # (B, 3, 32, 32)
        # 2. t ~ U{0, ..., T-1} (diffusers counts from 0), eps ~ N(0, I)
        t = torch.randint(T, (args.batch_size,), generator=generator, device=device)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        # 3. x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps
        x_t = scheduler.add_noise(x0, eps, t)
        # 4. || eps - eps_theta(x_t, t) ||^2, or with --prediction-type v_prediction || v - v_theta(x_t, t) ||^2
        if prediction_type == "epsilon":
            target = eps
        else:
            alpha_bar_t = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)               # (B, 1, 1, 1)
            target = alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0         # v, Salimans & Ho 2022 sec. 4
        with autocast(device, args.bf16):
            prediction = unet(x_t, t).sample
        loss = F.mse_loss(prediction.float(), target)

        optimizer_step(optimizer, loss, unet.parameters())
        ema_update(ema, unet, args.ema_decay)

        if keeper.end_of_step(step, loss=loss.item()):
            break

    # 5. the pipeline folder: the EMA weights, the scheduler, model_index.json
    ema.eval().save_pretrained(os.path.join(args.out, "unet"))
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    write_json(os.path.join(args.out, "model_index.json"), {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    })
    print(f"ddpm: {keeper.done} steps in {keeper.seconds():.0f} s, saved to {args.out}")
    return ema


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training ddpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=20_000, batch_size=128, lr=3e-4)
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                        help="what the UNet predicts (see above); the scheduler config records it")
    run_command(parser, train, argv)
