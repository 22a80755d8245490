"""Train a tiny ControlNet or a tiny T2I-Adapter for tiny-sd: the object's mask in, an object in that mask out.

    python -m minidiff.training controlnet --out runs/tiny-controlnet-mask --device cpu --max-minutes 15
    python -m minidiff.training adapter --out runs/tiny-t2i-adapter-mask --device cpu --max-minutes 15
    python -m minidiff.training controlnet --sd runs-v2/tiny-sd --out runs-v2/tiny-controlnet-mask   # second edition

Both keep tiny-sd (UNet, VAE, text encoder) frozen and train only the new network, on the loss tiny-sd was
trained with (Rombach et al. 2022, eq. 2), the UNet now steered by the condition c (the objects' mask):

    z_0 = scaling_factor * z,  z ~ q(z | x);   t ~ U{0, ..., T-1};   z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) eps
    ControlNet (Zhang et al. 2023, https://arxiv.org/abs/2302.05543, eq. 5):
        r = controlnet(z_t, t, text, c)                    one residual per UNet skip + one for the mid block
        loss = || eps - eps_theta(z_t, t, text | skips + r) ||^2
    T2I-Adapter (Mou et al. 2023, https://arxiv.org/abs/2302.08453, eq. 6):
        F = adapter(c)                                     one feature map per UNet down block
        loss = || eps - eps_theta(z_t, t, text | F added inside the down blocks) ||^2

- The ControlNet starts as `ControlNetModel.from_unet(unet)`: a copy of tiny-sd's encoder whose zero
  convolutions make every residual 0, so step 0 is exactly tiny-sd (paper sec. 3.1).
- Half of the captions are replaced by "" (ControlNet paper sec. 3.3): without words to lean on, the new
  network must learn to read the mask; it also gives guess mode and guidance an unconditional branch.
- The adapter draws t from the paper's cubic schedule, t = (1 - (u)^3) T with u ~ U[0, 1) (T2I-Adapter
  sec. 3.4): more large t, where the layout is decided and the condition matters most.

The data: the images tiny-sd was trained on (--data shapes for the first edition, --data scenes for the second;
without --data, the one whose words its tokenizer keeps whole; every caption word must be one token, which is
checked first) and the objects' mask. For shapes.py it is read
off the image: the backgrounds have no chroma (max - min of R, G, B), the shapes are saturated, so a pixel whose
chroma is at least half the shape's own is inside (`shape_masks`); scenes.py draws its masks exactly (the union
of the one or two objects'). Why the mask (not edges or depth): the first tiny-sd's UNet sees 8x8 latents, and a
mask is a filled region that survives the 8x shrinking of the conditioning network, where a one-pixel edge line
is a thin trace; in a one-object world a depth map says no more than the mask. The mask is also what the
evaluation compares (`evaluate_control.py`: IoU).

The networks follow the VAE: the condition image is shrunk by the VAE's factor (8 for SD and the first tiny-sd,
4 for the second), so that it meets the latents at their size: log2(factor) stride-2 convs in the ControlNet's
conditioning embedding (`conditioning_widths`), downscale_factor = factor in the adapter.

The output folder is in the hub layout (config.json + diffusion_pytorch_model.safetensors of the EMA
weights), with the loss log and the command; the training state beside them for --resume.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from ..control.controlnet import StableDiffusionControlNetPipeline
from ..control.t2i_adapter import StableDiffusionAdapterPipeline
from ..core.hub import bundled_path
from ..models.controlnet import ControlNetModel
from ..models.t2i_adapter import T2IAdapter
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers.ddpm import DDPMScheduler
from .common import (CommandError, StepKeeper, add_common_args, autocast, check_args, check_resume, ema_update,
                     load_images, load_state, optimizer_step, pick_device, prepare_run_folder, run_command)
from .scenes import ScenesDataset, caption as scenes_caption, render_scenes
from .shapes import ShapesDataset
from .tokenizer import MODEL_MAX_LENGTH
from .train_sd import SCHEDULER_CONFIG, encode_latents, vae_factor

COMMAND_NAME = "command.txt"
# The conditioning embedding's widths: 3 stride-2 convs (64 px -> 8, the VAE's factor), narrower than SD's
# (16, 32, 96, 256) to suit tiny-sd's 64-channel UNet. A factor-4 VAE takes the first three (2 stride-2 convs).
CONDITIONING_WIDTHS = (16, 32, 64, 64)


def conditioning_widths(factor: int) -> tuple[int, ...]:
    """The ControlNet conditioning embedding's widths for a VAE of this factor: log2(factor) stride-2 convs."""
    convs = factor.bit_length() - 1                                            # log2 of a power of two
    if factor < 2 or 2 ** convs != factor or convs >= len(CONDITIONING_WIDTHS):
        raise ValueError(f"conditioning_widths: expected a VAE factor of 2, 4 or 8, found {factor}.")
    return CONDITIONING_WIDTHS[:convs + 1]


def shape_masks(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) shapes.py images -> float (N, 1, H, W) masks in {0, 1}: chroma >= half the shape's."""
    rgb = images.float() / 255
    chroma = rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True)            # (N, 1, H, W); 0 on the background
    full = chroma.flatten(1).amax(1)[:, None, None, None]                      # (N, 1, 1, 1): a fully covered pixel
    return (chroma >= 0.5 * full).float()


def check_sd_folder(sd: str, path: str) -> None:
    """--sd must be a pipeline folder with the four parts `load_frozen_sd` reads."""
    lacking = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(path, p))]
    if lacking:
        raise CommandError(f"--sd {sd}: expected a pipeline folder with unet/, vae/, text_encoder/ and tokenizer/; "
                           f"{path} has no {', '.join(p + '/' for p in lacking)}. Pass the folder a tiny-sd training "
                           "run wrote, or 'tiny-sd'.")


def load_frozen_sd(path: str, device: torch.device):
    """tiny-sd's UNet, VAE, text encoder and tokenizer, in eval mode and with requires_grad False."""
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    for model in (unet, vae, text_encoder):
        model.to(device).eval().requires_grad_(False)
    return unet, vae, text_encoder, tokenizer


def make_adapter(unet: UNet2DConditionModel, factor: int) -> T2IAdapter:
    """A full_adapter whose feature i has the width of the UNet's down block i; reads a 1-channel mask, shrunk
    `factor` times (the VAE's) by its pixel unshuffle, so that feature 0 has the latents' size."""
    return T2IAdapter.from_config({"in_channels": 1, "channels": list(unet.config.block_out_channels),
                                   "num_res_blocks": 2, "downscale_factor": factor, "adapter_type": "full_adapter"})


def caption_vocabulary(data: str, num: int, seed: int) -> set[str]:
    """Every word of the first `num` captions of --data (the scenes are described, not drawn: about 1 s for 20,000)."""
    if data == "scenes":
        ds = ScenesDataset(num, seed)
        return {w for i in range(num) for w in scenes_caption(ds.scene(i)).split()}
    ds = ShapesDataset(num, seed)
    return {w for i in range(num) for w in ds.example(i).caption.split()}


def split_words(tokenizer, words) -> list[str]:
    """The words the tokenizer does not keep whole (it would split them into pieces the text encoder never saw)."""
    return sorted(w for w in words if tokenizer.tokenize(w) != [w + "</w>"])


def pick_data(data: str | None, sd: str, tokenizer) -> str:
    """`data` (--data), or when it is None, the data the pipeline `sd` was trained on: scenes when its tokenizer
    keeps every scenes caption word whole (the second tiny-sd), shapes otherwise (the first)."""
    if data is not None:
        return data
    data = "shapes" if split_words(tokenizer, caption_vocabulary("scenes", 2_000, 0)) else "scenes"
    print(f"--data {data}: the data --sd {sd} was trained on (its tokenizer "
          f"{'lacks' if data == 'shapes' else 'has'} the scenes' words)")
    return data


def check_vocabulary(args, tokenizer) -> None:
    """Refuse --data whose captions hold words the pipeline's tokenizer lacks (the first tiny-sd knows none of the
    scenes' new words: they would be split into pieces it never saw)."""
    lacking = split_words(tokenizer, caption_vocabulary(args.data, args.num_images, args.seed))
    if lacking:
        raise CommandError(f"--data {args.data}: its captions use words that --sd {args.sd}'s tokenizer lacks "
                           f"({', '.join(lacking[:8])}{', ...' if len(lacking) > 8 else ''}). Train on the data "
                           f"that pipeline was trained on (--data shapes for the first tiny-sd, scenes for the second; "
                           "without --data, the command picks it from the tokenizer).")


def new_network(kind: str, args, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder, tokenizer):
    """The network that trains: --init's, or a new one for this tiny-sd (its random weights drawn after
    torch.manual_seed(--seed)). Either must fit the pipeline it will steer, which the pipeline's own checks say
    (widths, the condition's shrinking = the VAE's factor); with --resume, so must the run's training state."""
    factor = vae_factor(vae)                                                   # f = 8 (first tiny-sd) or 4
    source = f"--init {args.init}" if args.init else f"--sd {args.sd}"
    try:
        if args.init:
            net = (ControlNetModel if kind == "controlnet" else T2IAdapter).from_pretrained(args.init)
        elif kind == "controlnet":
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_widths(factor))
        else:
            net = make_adapter(unet, factor)
        pipeline = StableDiffusionControlNetPipeline if kind == "controlnet" else StableDiffusionAdapterPipeline
        pipeline(vae, text_encoder, tokenizer, unet, net, DDPMScheduler.from_config(SCHEDULER_CONFIG))
    except (ValueError, OSError) as e:
        hint = f" Pass an --init trained for --sd {args.sd}, or drop --init." if args.init else ""
        raise CommandError(f"{source}: {e}{hint}") from e
    check_resume(args, {kind: net, "ema": net})
    return net


def load_data(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """--data's images uint8 (N, 3, 64, 64), their objects' masks float (N, 1, 64, 64) in {0, 1}, the captions."""
    if args.data == "scenes":
        start = time.time()
        images, captions, masks = render_scenes(args.num_images, args.seed, 64, args.workers, masks=True)
        print(f"drew {len(images)} scenes images and masks at 64x64 in {time.time() - start:.1f} s")
        return images.to(device), masks.float().to(device), captions
    images, captions = load_images(args, resolution=64, device=device)
    return images, shape_masks(images), captions


def predict_noise(kind: str, net, unet, z_t, t, context, condition):
    """eps_theta(z_t, t, text | condition), the UNet steered by the ControlNet's residuals or the adapter's features."""
    if kind == "controlnet":
        out = net(z_t, t, context, condition.expand(-1, 3, -1, -1))           # mask as RGB: (B, 3, 64, 64)
        return unet(z_t, t, context, down_block_additional_residuals=out.down_block_res_samples,
                    mid_block_additional_residual=out.mid_block_res_sample).sample
    features = net(condition)              # one per down block: [(B, 64, 8, 8), (B, 128, 4, 4)] for the first tiny-sd
    return unet(z_t, t, context, down_intrablock_additional_residuals=features).sample


def sample_timesteps(kind: str, B: int, T: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B,) training timesteps: uniform for ControlNet; cubic for the adapter (T2I-Adapter sec. 3.4)."""
    if kind == "controlnet":
        return torch.randint(T, (B,), generator=generator, device=device)
    u = torch.rand(B, generator=generator, device=device)
    return ((1 - u ** 3) * T).long().clamp(0, T - 1)


def train(args, kind: str, command: list[str]):
    device = pick_device(args.device)
    sd_path = args.sd if os.path.isdir(args.sd) else bundled_path(args.sd)
    if sd_path is None:
        raise CommandError(f"--sd {args.sd}: expected a tiny-sd pipeline folder or the bundled name 'tiny-sd', "
                           "found neither. Check the path.")
    check_sd_folder(args.sd, sd_path)
    if not 0 <= args.caption_dropout <= 1:
        raise CommandError(f"--caption-dropout must be in [0, 1]; found {args.caption_dropout}.")
    check_args(args, inputs={"--sd": sd_path, "--init": args.init})
    # 0. before any work: the frozen tiny-sd (on the CPU for now), the data it reads, the network that will train
    unet, vae, text_encoder, tokenizer = load_frozen_sd(sd_path, torch.device("cpu"))
    args.data = pick_data(args.data, args.sd, tokenizer)
    check_vocabulary(args, tokenizer)
    torch.manual_seed(args.seed)                                               # the new network's random weights
    net = new_network(kind, args, unet, vae, text_encoder, tokenizer)
    prepare_run_folder(args, inputs={"--sd": sd_path, "--init": args.init})
    with open(os.path.join(args.out, COMMAND_NAME), "a" if args.resume else "w") as f:    # each command of the run
        f.write("python -m minidiff.training " + " ".join([kind, *command]) + "\n")

    # 1. the data (drawn before any model is on the GPU: the drawing processes fork): latents of the VAE, the
    #    objects' masks, the captions' token ids
    images, masks, captions = load_data(args, device)                          # (N, 3, 64, 64), (N, 1, 64, 64)
    for model in (unet, vae, text_encoder):
        model.to(device)
    latent_mean, latent_std = encode_latents(vae, images)                      # (N, 4, 64/f, 64/f) each
    del images
    scaling_factor = vae.config.scaling_factor
    tokens = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                       return_tensors="pt").input_ids.to(device)               # (N, 77)
    empty = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH,
                      return_tensors="pt").input_ids.to(device)                # (1, 77)

    # 2. the network that trains (made in step 0), and its EMA
    net = net.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    noise_schedule.alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    T = noise_schedule.config.num_train_timesteps

    generator = torch.Generator(device).manual_seed(args.seed)
    modules = {kind: net, "ema": ema}
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = load_state(args.out, modules, optimizer, generator)
    # on_save: a usable checkpoint at every save, not only at the end
    keeper = StepKeeper(args, kind, modules, optimizer, generator, step, seconds, log_every=25,
                        on_save=lambda: ema.save_pretrained(args.out))
    B = args.batch_size
    for step in keeper.bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        # 3. z_0 ~ q(z | x), its mask c, its caption (half of them "")
        idx = torch.randint(len(tokens), (B,), generator=generator, device=device)
        mean, std = latent_mean[idx], latent_std[idx]                          # (B, 4, 64/f, 64/f) each
        z0 = scaling_factor * (mean + std * torch.randn(mean.shape, generator=generator, device=device))
        condition = masks[idx]                                                 # (B, 1, 64, 64)
        drop = torch.rand(B, generator=generator, device=device) < args.caption_dropout
        ids = torch.where(drop[:, None], empty, tokens[idx])                   # (B, 77)
        # 4. t, eps and z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) eps
        t = sample_timesteps(kind, B, T, generator, device)
        eps = torch.randn(z0.shape, generator=generator, device=device)
        z_t = noise_schedule.add_noise(z0, eps, t)
        # 5. || eps - eps_theta(z_t, t, text | c) ||^2; gradients reach only the ControlNet / adapter
        with autocast(device, args.bf16):
            with torch.no_grad():
                context = text_encoder(ids)[0]                                 # (B, 77, 64)
            eps_pred = predict_noise(kind, net, unet, z_t, t, context, condition)
        loss = F.mse_loss(eps_pred.float(), eps)

        optimizer_step(optimizer, loss, net.parameters())
        ema_update(ema, net, args.ema_decay)

        if keeper.end_of_step(step, loss=loss.item()):
            break

    # 6. the hub layout: config.json + diffusion_pytorch_model.safetensors (the EMA weights)
    ema.eval().save_pretrained(args.out)
    print(f"{kind}: {keeper.done} steps in {keeper.seconds():.0f} s, saved to {args.out}")
    return ema


def main(argv=None, kind: str = "controlnet") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m minidiff.training {kind}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=100_000, batch_size=32, lr=2e-4)
    parser.set_defaults(num_images=5_000, warmup=100, save_every=250, ema_decay=0.995, data=None)  # data: --sd's
    parser.add_argument("--sd", default="tiny-sd", help="the frozen text-to-image pipeline folder (default: "
                        "the bundled tiny-sd); without --data, the data it was trained on")
    parser.add_argument("--caption-dropout", type=float, default=0.5, help="share of captions replaced by ''")
    command = sys.argv[1:] if argv is None else list(argv)
    run_command(parser, lambda args: train(args, kind, command), argv)


def main_adapter(argv=None) -> None:
    main(argv, kind="adapter")


if __name__ == "__main__":
    main()
