"""Train a tiny InstructPix2Pix or a tiny Depth2Image from tiny-sd: the same UNet with extra input channels.

    python -m minidiff.training instruct-pix2pix --out runs/tiny-instruct-pix2pix --device cpu --max-minutes 15
    python -m minidiff.training depth2img --out runs/tiny-depth2img --device cpu --max-minutes 15

Both fine-tune tiny-sd's UNet (the VAE and the text encoder stay frozen) on SD's ε-loss with an image input
concatenated to the noisy latents along the channels (Rombach et al. 2022, eq. 2, with one more condition):

    InstructPix2Pix (Brooks et al. 2023, https://arxiv.org/abs/2211.09800, eq. 2):
        z_0 = scaling_factor * z, z ~ q(z | edited image);  c_I = mode of q(z | input image), unscaled
        loss = || eps - eps_theta([z_t ; c_I], t, instruction) ||^2                   8 input channels
    Depth2Image (stable-diffusion-2-depth, https://github.com/Stability-AI/stablediffusion):
        d = the depth map resized to the latents and scaled to [-1, 1] (the pipeline's `depth_channel`)
        loss = || eps - eps_theta([z_t ; d], t, caption) ||^2                           5 input channels

- The UNet starts as tiny-sd's, its conv_in widened: the weights of the new input channels are zero (Brooks et
  al. sec. 3.4), so at step 0 the model is exactly tiny-sd whatever the extra channels hold (`widen_conv_in`).
- InstructPix2Pix drops the conditions as the paper does (sec. 3.4): 5% of the examples lose the instruction,
  5% the image (c_I = 0, what the pipeline feeds as "no image"), 5% both, so that both guidance scales have an
  unconditional branch to push away from. Depth2Image drops 10% of the captions, as tiny-sd was trained.

The data: `scenes.py` scenes restricted to what tiny-sd knows: one object of the base shapes on a plain
(white, gray, black) background. InstructPix2Pix trains on `scenes.edit_pair` (a colour, a shape or a position
changed, and the instruction that asks for it). The folder gets its own tokenizer (every word of
`scenes.caption_words()` one token) and a text encoder whose token table has a row per token: the rows of tokens
tiny-sd knew are copied (by token, since the ids move). The first tiny-sd's tokenizer lacks the instructions'
words ("make", "turn", "into", "move", "to", "up", "down"): their rows are new and random, like the rest of its
frozen random encoder. The second tiny-sd was trained on scenes.py's words: every row is copied. Depth2Image
reads tiny-sd's captions and keeps its tokenizer and encoder.
Everything is encoded once up front (VAE latents, text embeddings); the loop only runs the UNet.

The output is a whole pipeline folder in the hub's layout (timbrooks/instruct-pix2pix; stable-diffusion-2-depth
with depth_estimator and feature_extractor null: pass `depth_map=`), the UNet being the EMA of the weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from ..control.depth2img import StableDiffusionDepth2ImgPipeline
from ..core.compat import save_clip_text_encoder
from ..core.hub import bundled_path
from ..models.unet_2d_condition import UNet2DConditionModel
from ..schedulers.ddpm import DDPMScheduler
from .common import (CommandError, StepKeeper, add_common_args, autocast, check_args, check_resume, ema_update,
                     load_state, optimizer_step, pick_device, prepare_run_folder, run_command, write_json)
from .scenes import caption, caption_words, edit_pair, random_scene, render
from .shapes import BACKGROUNDS as PLAIN_BACKGROUNDS
from .tokenizer import MODEL_MAX_LENGTH, write_tokenizer
from .train_control import check_sd_folder, load_frozen_sd
from .train_sd import SCHEDULER_CONFIG, encode_latents

KINDS = ("instruct-pix2pix", "depth2img")
EXTRA_CHANNELS = {"instruct-pix2pix": 4, "depth2img": 1}
PIPELINE_CLASS = {"instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
                  "depth2img": "StableDiffusionDepth2ImgPipeline"}
# timbrooks/instruct-pix2pix samples with Euler ancestral, stable-diffusion-2-depth with PNDM; both on SD's betas.
FOLDER_SCHEDULER = {"instruct-pix2pix": {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.42.1",
                                         "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                         "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                                         "trained_betas": None},
                    "depth2img": SCHEDULER_CONFIG}
DROP = 0.05                 # InstructPix2Pix: 5% no text, 5% no image, 5% neither
COMMAND_NAME = "command.txt"


# --- the models -----------------------------------------------------------------------------------
def widen_conv_in(unet: UNet2DConditionModel, extra: int) -> UNet2DConditionModel:
    """A copy of `unet` that reads `extra` more input channels; their conv_in weights are zero, so the output
    is the old UNet's on the first channels, whatever the new ones hold (Brooks et al. 2023, sec. 3.4)."""
    config = {**dataclasses.asdict(unet.config), "in_channels": unet.config.in_channels + extra}
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    weight = state["conv_in.weight"]                                       # (C_out, 4, 3, 3)
    zeros = weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])    # (C_out, extra, 3, 3)
    state["conv_in.weight"] = torch.cat([weight, zeros], dim=1)            # (C_out, 4 + extra, 3, 3)
    wide.load_state_dict(state, strict=True)
    return wide


def extend_text_encoder(text_encoder: CLIPTextModel, old_vocab: dict[str, int], new_vocab: dict[str, int],
                        seed: int = 0) -> CLIPTextModel:
    """The same encoder over `new_vocab`: a token's row is copied from `old_vocab`'s where the token was there,
    drawn like the old rows (their std) where it is new. Everything but the token table is unchanged."""
    old_table = text_encoder.get_input_embeddings().weight.detach()        # (V_old, D)
    ids = {"bos_token_id": new_vocab["<|startoftext|>"], "eos_token_id": new_vocab["<|endoftext|>"],
           "pad_token_id": new_vocab["<|endoftext|>"]}
    config = type(text_encoder.config).from_dict({**text_encoder.config.to_dict(), "vocab_size": len(new_vocab), **ids})
    new = CLIPTextModel(config)
    state = {k: v for k, v in text_encoder.state_dict().items() if "token_embedding" not in k}
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(len(new_vocab), old_table.shape[1], generator=generator) * old_table.std()   # (V_new, D)
    for token, i in new_vocab.items():
        if token in old_vocab:
            table[i] = old_table[old_vocab[token]]
    new.get_input_embeddings().weight.data.copy_(table)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any("token_embedding" not in k for k in missing):
        raise RuntimeError(f"extend_text_encoder: keys do not match ({missing}, {unexpected}).")
    return new.eval().requires_grad_(False)


# --- the data -------------------------------------------------------------------------------------
def one_object_scene(seed: int, i: int):
    """Scene i of `seed`: one object of the base shapes on a plain background (what tiny-sd was trained on),
    and the random generator that drew it (to draw its edit next)."""
    rng = random.Random(f"minidiff-edit/{seed}/{i}")
    return random_scene(rng, max_objects=1, backgrounds=tuple(PLAIN_BACKGROUNDS)), rng


def edit_examples(n: int, seed: int):
    """n edit pairs: (scene, scene after, instruction, kind) with kind "color", "shape" or "position"."""
    out = []
    for i in range(n):
        scene, rng = one_object_scene(seed, i)
        kind = ("color", "shape", "position")[i % 3]                  # as many edits of each kind
        after, instruction = edit_pair(scene, rng, kinds=(kind,))
        out.append((scene, after, instruction, kind))
    return out


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> uint8 (N, 3, H, W)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def depth_condition(depths, size: tuple[int, int]) -> torch.Tensor:
    """(N, 64, 64) depth maps -> (N, 1, h, w) in [-1, 1] at the latents' size (h, w) = 64 / the VAE's factor,
    exactly as the pipeline prepares `depth_map=`."""
    return StableDiffusionDepth2ImgPipeline.depth_channel(torch.as_tensor(np.asarray(depths)), tuple(size))


@torch.no_grad()
def embed(tokenizer, text_encoder, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """Texts -> the frozen encoder's last hidden states, (N, 77, D)."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start:start + batch_size], padding="max_length", max_length=MODEL_MAX_LENGTH,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def prepare_data(kind: str, args, vae, tokenizer, text_encoder, device) -> dict:
    """Everything the loop reads, on `device`: latent mean / std of the target images, the extra channels (the
    input image's latents, or the depth), and the text embeddings; drawn and encoded once."""
    start = time.time()
    if kind == "instruct-pix2pix":
        examples = edit_examples(args.num_images, args.seed)
        before = to_tensor([render(s)["image"] for s, _, _, _ in examples]).to(device)
        after = to_tensor([render(a)["image"] for _, a, _, _ in examples]).to(device)
        texts = [instruction for _, _, instruction, _ in examples]
        with torch.no_grad():
            mean, std = encode_latents(vae, after)                          # (N, 4, h, w) each; h = 64 / f
            extra = encode_latents(vae, before)[0]                          # c_I = the mode, unscaled: (N, 4, h, w)
    else:
        scenes = [one_object_scene(args.seed, i)[0] for i in range(args.num_images)]
        drawn = [render(s) for s in scenes]
        texts = [caption(s) for s in scenes]
        with torch.no_grad():
            mean, std = encode_latents(vae, to_tensor([d["image"] for d in drawn]).to(device))
        extra = depth_condition([d["depth"] for d in drawn], mean.shape[-2:]).to(device)  # (N, 1, h, w)
    context = embed(tokenizer, text_encoder, texts, device)                # (N, 77, D)
    print(f"drew and encoded {len(texts)} examples in {time.time() - start:.1f} s")
    return {"mean": mean, "std": std, "extra": extra, "context": context,
            "empty": embed(tokenizer, text_encoder, [""], device)}         # (1, 77, D)


def drop_conditions(kind: str, B: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) bools: drop the text, drop the image. IP2P: one draw p ~ U[0, 1): text if p < 2 DROP, image if
    DROP <= p < 3 DROP (5% text only, 5% both, 5% image only). Depth2Image: 10% of the captions."""
    p = torch.rand(B, generator=generator, device=device)
    if kind == "instruct-pix2pix":
        return p < 2 * DROP, (p >= DROP) & (p < 3 * DROP)
    return p < 2 * DROP, torch.zeros(B, dtype=torch.bool, device=device)


# --- the folder -----------------------------------------------------------------------------------
def write_pipeline(out: str, kind: str, unet, sd_path: str, tokenizer_dir: str | None, text_encoder) -> None:
    """The pipeline folder: model_index.json, unet/ (given), vae/ (tiny-sd's, copied), text_encoder/ and
    tokenizer/ (tiny-sd's or the extended ones), scheduler/."""
    unet.save_pretrained(os.path.join(out, "unet"))
    for name in ("vae",) + (("text_encoder", "tokenizer") if tokenizer_dir is None else ()):
        shutil.copytree(os.path.join(sd_path, name), os.path.join(out, name), dirs_exist_ok=True)
    if tokenizer_dir is not None:
        save_clip_text_encoder(text_encoder, os.path.join(out, "text_encoder"))     # SD's text_model.* key layout
        if os.path.abspath(tokenizer_dir) != os.path.abspath(os.path.join(out, "tokenizer")):
            shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), FOLDER_SCHEDULER[kind])
    index = {"_class_name": PIPELINE_CLASS[kind], "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", FOLDER_SCHEDULER[kind]["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if kind == "instruct-pix2pix":
        index.update(feature_extractor=[None, None], requires_safety_checker=False, safety_checker=[None, None])
    else:
        index.update(depth_estimator=[None, None], feature_extractor=[None, None])   # pass depth_map=
    write_json(os.path.join(out, "model_index.json"), dict(sorted(index.items())))


def tokenizer_and_encoder(kind: str, out: str, tokenizer, text_encoder, device):
    """InstructPix2Pix: write the extended tokenizer into out/tokenizer and extend the encoder (module doc)."""
    if kind != "instruct-pix2pix":
        return None, tokenizer, text_encoder
    folder = os.path.join(out, "tokenizer")
    new_vocab = write_tokenizer(folder, caption_words())
    vocab = tokenizer.get_vocab()
    lacking = [w for w in caption_words() if w + "</w>" not in vocab]
    print(f"tiny-sd's tokenizer {f'lacks {lacking}' if lacking else 'has every word'}: wrote a {len(new_vocab)}-token "
          f"tokenizer to {folder}")
    text_encoder = extend_text_encoder(text_encoder.cpu(), tokenizer.get_vocab(), new_vocab).to(device)
    return folder, CLIPTokenizer.from_pretrained(folder), text_encoder


# --- training -------------------------------------------------------------------------------------
def starting_unet(kind: str, args, base_unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """tiny-sd's UNet with a wider conv_in, or --init's (an earlier run's), which must be that UNet widened."""
    if not args.init:
        unet = widen_conv_in(base_unet, EXTRA_CHANNELS[kind])
        check_resume(args, {"unet": unet, "ema": unet})
        return unet
    try:
        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet")
    except (ValueError, OSError) as e:
        raise CommandError(f"--init {args.init}: expected a pipeline folder written by this command, whose unet/ "
                           f"holds a UNet2DConditionModel; {e}") from e
    if unet.config.in_channels != 4 + EXTRA_CHANNELS[kind]:
        raise CommandError(f"--init {args.init}: its UNet reads {unet.config.in_channels} channels; {kind} needs "
                           f"{4 + EXTRA_CHANNELS[kind]}. Pass a folder written by this command.")
    differ = [f"{k} {getattr(unet.config, k)!r} (--sd's: {getattr(base_unet.config, k)!r})"
              for k in ("sample_size", "block_out_channels", "down_block_types", "cross_attention_dim")
              if getattr(unet.config, k) != getattr(base_unet.config, k)]
    if differ:
        raise CommandError(f"--init {args.init}: its UNet was made from another tiny-sd than --sd {args.sd}: "
                           f"{'; '.join(differ)}. Pass the --sd it was trained from, or a folder made from this one.")
    return unet


def train(args, kind: str, command: list[str]):
    device = pick_device(args.device)
    sd_path = args.sd if os.path.isdir(args.sd) else bundled_path(args.sd)
    if sd_path is None:
        raise CommandError(f"--sd {args.sd}: expected a tiny-sd pipeline folder or the bundled name 'tiny-sd', "
                           "found neither. Check the path.")
    if args.data != "scenes":
        raise CommandError(f"--data {args.data}: {kind} trains on scenes.py's one-object scenes (their edit pairs and "
                           "depth maps), which every tiny-sd knows; drop --data or pass --data scenes.")
    check_args(args, inputs={"--sd": sd_path, "--init": args.init})
    check_sd_folder(args.sd, sd_path)
    # 0. before any work: frozen tiny-sd (VAE, text encoder) and the UNet that will train, on the CPU for now
    base_unet, vae, text_encoder, tokenizer = load_frozen_sd(sd_path, torch.device("cpu"))
    unet = starting_unet(kind, args, base_unet)
    del base_unet
    prepare_run_folder(args, inputs={"--sd": sd_path, "--init": args.init})
    with open(os.path.join(args.out, COMMAND_NAME), "a" if args.resume else "w") as f:
        f.write("python -m minidiff.training " + " ".join([kind, *command]) + "\n")
    torch.manual_seed(args.seed)

    # 1. the data encoded once
    vae, text_encoder = vae.to(device), text_encoder.to(device)
    tokenizer_dir, tokenizer, text_encoder = tokenizer_and_encoder(kind, args.out, tokenizer, text_encoder, device)
    data = prepare_data(kind, args, vae, tokenizer, text_encoder, device)
    scaling_factor = vae.config.scaling_factor

    # 2. the UNet that trains (step 0), and its EMA
    unet = unet.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    noise_schedule.alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    T = noise_schedule.config.num_train_timesteps

    generator = torch.Generator(device).manual_seed(args.seed)
    modules = {"unet": unet, "ema": ema}
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = load_state(args.out, modules, optimizer, generator)
    keeper = StepKeeper(args, kind, modules, optimizer, generator, step, seconds, log_every=25)
    B, N = args.batch_size, len(data["context"])
    for step in keeper.bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        # 3. z_0 ~ q(z | target), its extra channels, its text; some conditions dropped
        idx = torch.randint(N, (B,), generator=generator, device=device)
        mean, std = data["mean"][idx], data["std"][idx]                          # (B, 4, h, w) each (8x8 or 16x16)
        z0 = scaling_factor * (mean + std * torch.randn(mean.shape, generator=generator, device=device))
        drop_text, drop_image = drop_conditions(kind, B, generator, device)
        extra = data["extra"][idx] * ~drop_image[:, None, None, None]            # (B, 4 or 1, h, w)
        context = torch.where(drop_text[:, None, None], data["empty"], data["context"][idx])   # (B, 77, D)
        # 4. t, eps, z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) eps
        t = torch.randint(T, (B,), generator=generator, device=device)
        eps = torch.randn(z0.shape, generator=generator, device=device)
        z_t = noise_schedule.add_noise(z0, eps, t)
        # 5. || eps - eps_theta([z_t ; extra], t, text) ||^2
        model_input = torch.cat([z_t, extra], dim=1)                             # (B, 4 + extra, h, w)
        with autocast(device, args.bf16):
            eps_pred = unet(model_input, t, context).sample
        loss = F.mse_loss(eps_pred.float(), eps)

        optimizer_step(optimizer, loss, unet.parameters())
        ema_update(ema, unet, args.ema_decay)

        if keeper.end_of_step(step, loss=loss.item()):
            break

    # 6. the pipeline folder, the UNet being the EMA of the weights
    write_pipeline(args.out, kind, ema.eval(), sd_path, tokenizer_dir, text_encoder)
    print(f"{kind}: {keeper.done} steps in {keeper.seconds():.0f} s, saved to {args.out}")
    return ema


def main(argv=None, kind: str = "instruct-pix2pix") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m minidiff.training {kind}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=100_000, batch_size=32, lr=2e-4)
    parser.set_defaults(num_images=4_000, warmup=100, save_every=250, ema_decay=0.995, data="scenes")
    parser.add_argument("--sd", default="tiny-sd", help="the text-to-image pipeline folder to start from "
                        "(default: the bundled tiny-sd)")
    command = sys.argv[1:] if argv is None else list(argv)
    run_command(parser, lambda args: train(args, kind, command), argv)


def main_depth(argv=None) -> None:
    main(argv, kind="depth2img")


if __name__ == "__main__":
    main()
