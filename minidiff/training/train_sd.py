"""Train tiny-sd: a text-to-image latent diffusion model in Stable Diffusion v1's folder layout.

    python -m minidiff.training vae --out runs/vae --bf16                  # first the autoencoder
    python -m minidiff.training sd --vae runs/vae/vae --out runs/tiny-sd --bf16

Latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752, eq. 2) is DDPM's loss on the
VAE's latents, with the UNet conditioned on the caption through cross-attention:

    z_0 = scaling_factor * z,  z ~ q(z | x)                     the VAE encodes a training image
    c = text_encoder(tokenizer(caption))                        (B, 77, D): one vector per token
    t ~ U{0, ..., T-1},  eps ~ N(0, I),  z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    loss = || eps - eps_theta(z_t, t, c) ||^2

Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) needs the same network
to also predict without a caption: 10% of the captions are replaced by the empty prompt "", exactly what
the pipeline feeds as the negative prompt. At sampling time eps = eps(z, "") + w (eps(z, c) - eps(z, "")).

The text encoder is a small `transformers.CLIPTextModel`, trained together with the UNet from scratch
(SD keeps OpenAI's CLIP frozen; ours has only the captions to learn from), or, with
`--freeze-text-encoder`, kept at its random initial weights: a random encoder still gives every word its
own vector. The bundled tiny-sd was trained frozen, which scored better in a short training (its README).

The output folder is a complete `StableDiffusionPipeline` folder: model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/ (PNDM with SD's scaled-linear betas, as in SD v1).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil

import torch
import torch.nn.functional as F

from ..core.compat import save_clip_text_encoder
from ..schedulers.ddpm import DDPMScheduler
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from .common import (CommandError, StepKeeper, add_common_args, autocast, ema_update, load_images, load_state,
                     optimizer_step, pick_device, prepare_run_folder, run_command, warmup_lr, write_json)
from .shapes import to_model_range
from .tokenizer import MODEL_MAX_LENGTH, data_caption_words, write_tokenizer

TEXT_HIDDEN_SIZE = 64

# SD v1's UNet (cross-attention down/up blocks, a cross-attention mid block) with two levels for 8x8 latents.
UNET_CONFIG = {
    "sample_size": 8,                                          # 64x64 images / 8
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128],                           # SD v1: [320, 640, 1280, 1280]
    "layers_per_block": 1,                                     # SD v1: 2
    "attention_head_dim": 4,                                   # as in SD v1's config: the number of heads
    "cross_attention_dim": TEXT_HIDDEN_SIZE,                   # SD v1: 768, CLIP ViT-L/14's width
    "norm_num_groups": 32,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "use_linear_projection": False,
}
# The second edition, for 16x16 latents (the factor-4 VAE, `vae --latent-size 16`): three levels, 16x16 and 8x8
# with cross-attention (so a token's attention map has 16x16 cells), 4x4 without, as SD v1's last level.
UNET_CONFIG_16 = {
    **UNET_CONFIG,
    "sample_size": 16,                                         # 64x64 images / 4
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 128],                      # SD v1: [320, 640, 1280, 1280]
}
UNET_CONFIGS = {8: UNET_CONFIG, 16: UNET_CONFIG_16}            # latent size -> config

# A CLIPTextModel like SD v1's (causal transformer, quick_gelu, 77 positions), 2 layers of width 64.
TEXT_ENCODER_CONFIG = {
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 4 * TEXT_HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "quick_gelu",
}
# SD v1's scheduler_config.json: sampling with PNDM, on the scaled-linear betas training used.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def vae_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent position: each of the VAE's down blocks but the last halves H and W (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def make_text_encoder(tokenizer, config: dict = TEXT_ENCODER_CONFIG):
    """A randomly initialised CLIPTextModel whose vocabulary and special tokens match `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **config))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 1024):
    """The posterior q(z | x) of every image: mean and std, each (N, 4, h, w), float32."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_model_range(images[start:start + batch_size])).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def train(args, unet_config: dict | None = None, text_encoder_config: dict = TEXT_ENCODER_CONFIG):
    from transformers import CLIPTokenizer

    device = pick_device(args.device)
    # Before any work: an earlier run in --out is refused unless --resume or --overwrite.
    prepare_run_folder(args, inputs={"--vae": args.vae, "--init": args.init})
    torch.manual_seed(args.seed)

    # 1. the data set as latents of the frozen VAE + token ids of the tokenizer
    images, captions = load_images(args, resolution=64, device=device)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device)
    scaling_factor = vae.config.scaling_factor
    latent_size = 64 // vae_factor(vae)                                                # 8 (factor 8) or 16 (factor 4)
    if unet_config is None and latent_size not in UNET_CONFIGS:
        raise CommandError(f"--vae {args.vae} makes {latent_size}x{latent_size} latents of a 64x64 image; this command "
                           f"has UNet configs for {sorted(UNET_CONFIGS)}. Train the VAE with --latent-size 8 or 16.")
    unet_config = unet_config or UNET_CONFIGS[latent_size]
    # every word of the data's captions is one token (scenes' words include the edit instructions')
    write_tokenizer(os.path.join(args.out, "tokenizer"), data_caption_words(getattr(args, "data", "shapes")))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(args.out, "tokenizer"))
    latent_mean, latent_std = encode_latents(vae, images)                          # (N, 4, h, w) each
    del images
    tokens = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                       return_tensors="pt").input_ids.to(device)                   # (N, 77)
    empty = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH,
                      return_tensors="pt").input_ids.to(device)                    # (1, 77): <start> <end> <end>...

    # 2. the models that train, and their EMAs
    if args.init:
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder")
    else:
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = make_text_encoder(tokenizer, text_encoder_config)
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device).train()
    text_encoder.requires_grad_(not args.freeze_text_encoder)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + ([] if args.freeze_text_encoder else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)  # add_noise with SD's betas
    noise_schedule.alphas_cumprod = noise_schedule.alphas_cumprod.to(device)  # no copy (and sync) per step
    T = noise_schedule.config.num_train_timesteps

    generator = torch.Generator(device).manual_seed(args.seed)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = load_state(args.out, modules, optimizer, generator)
    keeper = StepKeeper(args, "sd", modules, optimizer, generator, step, seconds)
    B = args.batch_size
    for step in keeper.bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_lr(step, args.warmup)
        # 3. z_0 ~ q(z | x), scaled to unit variance
        idx = torch.randint(len(tokens), (B,), generator=generator, device=device)
        mean, std = latent_mean[idx], latent_std[idx]                               # (B, 4, h, w) each
        z0 = scaling_factor * (mean + std * torch.randn(mean.shape, generator=generator, device=device))
        # 4. the captions, 10% of them replaced by "" (for classifier-free guidance)
        drop = torch.rand(B, generator=generator, device=device) < args.caption_dropout
        ids = torch.where(drop[:, None], empty, tokens[idx])                        # (B, 77)
        # 5. t, eps and z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) eps
        t = torch.randint(T, (B,), generator=generator, device=device)
        eps = torch.randn(z0.shape, generator=generator, device=device)
        z_t = noise_schedule.add_noise(z0, eps, t)
        # 6. || eps - eps_theta(z_t, t, c) ||^2
        with autocast(device, args.bf16):
            context = text_encoder(ids)[0]                                          # (B, 77, D)
            eps_pred = unet(z_t, t, context).sample
        loss = F.mse_loss(eps_pred.float(), eps)

        optimizer_step(optimizer, loss, params)
        ema_update(ema_unet, unet, args.ema_decay)
        if not args.freeze_text_encoder:
            ema_update(ema_text, text_encoder, args.ema_decay)

        if keeper.end_of_step(step, loss=loss.item()):
            break

    # 7. the pipeline folder
    ema_unet.eval().save_pretrained(os.path.join(args.out, "unet"))
    save_clip_text_encoder(ema_text.eval(), os.path.join(args.out, "text_encoder"))     # SD v1-4's key layout
    if os.path.abspath(args.vae) != os.path.abspath(os.path.join(args.out, "vae")):
        shutil.copytree(args.vae, os.path.join(args.out, "vae"), dirs_exist_ok=True)
    os.makedirs(os.path.join(args.out, "scheduler"), exist_ok=True)
    write_json(os.path.join(args.out, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    write_json(os.path.join(args.out, "model_index.json"), MODEL_INDEX)
    print(f"sd: {keeper.done} steps in {keeper.seconds():.0f} s, saved to {args.out}")
    return ema_unet, ema_text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidiff.training sd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=20_000, batch_size=256, lr=3e-4)
    parser.add_argument("--vae", required=True, help="the trained VAE folder (vae/ in the output of the vae command)")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of captions replaced by ''")
    parser.add_argument("--freeze-text-encoder", action="store_true", help="keep the text encoder random")
    run_command(parser, train, argv)
