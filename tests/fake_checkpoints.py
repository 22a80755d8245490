"""Fake checkpoint folders in the exact hub layout of google/ddpm-cat-256 and CompVis/stable-diffusion-v1-4.

The configs are the real ones (read from the reference folder, see tests/conftest.py) with smaller
channel widths, fewer layers and smaller sample sizes, so that a whole pipeline runs in well under a
second on a CPU. Every weight is random (tests/helpers.randomize_), and the files are written the way
the hub has them:

    ddpm-cat-256/  (flat: the UNet and the scheduler at the root)
        model_index.json  config.json  diffusion_pytorch_model.safetensors  scheduler_config.json
    stable-diffusion-v1-4/
        model_index.json  (as published: it names a safety_checker and a feature_extractor)
        unet/  vae/  text_encoder/  tokenizer/ (the real CLIP tokenizer files)  scheduler/
        feature_extractor/preprocessor_config.json   safety_checker/config.json (no weights: nobody loads it)

The ddpm-cat UNet and the VAE weight files use the pre-2023 attention names (query/key/value/proj_attn),
as the real files do.

Use: `make_fake_sd(tmp_path / "sd", reference_dir)`; both minidiff and diffusers load the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from helpers import randomize_

# The published model_index.json of google/ddpm-cat-256 (not in the reference folder).
DDPM_CAT_MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}

# Smaller versions of the real configs: the keys stay those of the published files.
TINY_DDPM_UNET = dict(block_out_channels=[16, 16, 32, 32, 32, 32], norm_num_groups=8, layers_per_block=1,
                      sample_size=32)
TINY_SD_UNET = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32,
                    sample_size=8)  # 8 latents = 64 pixels
TINY_SD_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# Today's attention names -> the names in weight files written before diffusers 0.13.
TO_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _save_model(model_cls, config: dict, folder: Path, seed: int, legacy_names: bool) -> None:
    """config.json exactly as given (real keys), and random weights as diffusion_pytorch_model.safetensors."""
    model = randomize_(model_cls.from_config(config), seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if legacy_names:
        renamed = {}
        for key, value in state.items():
            if ".attentions." in key:
                for new, old in TO_LEGACY.items():
                    key = key.replace(new, old)
            renamed[key] = value
        state = renamed
    _write_json(folder / "config.json", config)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def make_fake_ddpm_cat(folder, reference_dir, seed: int = 0, **unet_overrides) -> Path:
    """A google/ddpm-cat-256 look-alike (32x32 pixels) at `folder`; returns the folder."""
    from minidiff import UNet2DModel

    folder, ref = Path(folder), Path(reference_dir) / "ddpm-cat-256"
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", DDPM_CAT_MODEL_INDEX)
    config = {**_read(ref / "config.json"), **TINY_DDPM_UNET, **unet_overrides}
    _save_model(UNet2DModel, config, folder, seed, legacy_names=True)
    shutil.copy(ref / "scheduler_config.json", folder / "scheduler_config.json")
    return folder


def make_fake_sd(folder, reference_dir, seed: int = 0, **unet_overrides) -> Path:
    """A CompVis/stable-diffusion-v1-4 look-alike (64x64 pixels, 8x8 latents) at `folder`; returns the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidiff import AutoencoderKL, UNet2DConditionModel

    folder, ref = Path(folder), Path(reference_dir) / "stable-diffusion-v1-4"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ref / "model_index.json", folder / "model_index.json")
    for sub in ("tokenizer", "scheduler", "feature_extractor"):
        shutil.copytree(ref / sub, folder / sub, dirs_exist_ok=True)

    unet = {**_read(ref / "unet" / "config.json"), **TINY_SD_UNET, **unet_overrides}
    _save_model(UNet2DConditionModel, unet, folder / "unet", seed, legacy_names=False)
    vae = {**_read(ref / "vae" / "config.json"), **TINY_SD_VAE}
    _save_model(AutoencoderKL, vae, folder / "vae", seed + 1, legacy_names=True)

    # The text encoder's config as published (stale bos/eos/pad ids included), made small; the real
    # tokenizer's 49,408 ids still index its embedding table.
    text = {**_read(ref / "text_encoder" / "config.json"), **TINY_CLIP_TEXT}
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig.from_dict(text)), seed=seed + 2)
    text_encoder.save_pretrained(folder / "text_encoder")

    # The safety checker is a CLIP image model in the real repo; minidiff never loads it, so only its
    # config is written, to keep the layout.
    _write_json(folder / "safety_checker" / "config.json",
                {"_name_or_path": "CompVis/stable-diffusion-safety-checker",
                 "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip"})
    return folder
