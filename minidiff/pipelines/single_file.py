"""Stable Diffusion v1 / v2 from one original checkpoint file, offline, with no pickle executed; and back.

    pipe = StableDiffusionPipeline.from_single_file("v1-5-pruned-emaonly.safetensors")
    pipe = StableDiffusionPipeline.from_single_file("sd-v1-4.ckpt", tokenizer=CLIPTokenizer.from_pretrained(...))
    save_single_file(pipe, "my-model.safetensors")          # the layout other tools read

1. read the file: safetensors, or a pickle through `torch.load(weights_only=True)` (core/checkpoint_file.py);
2. tell the architecture from the weights: v2 has cross-attention keys 1024 wide (v1: 768) and an OpenCLIP
   text encoder; files of other families (SDXL, an inpainting UNet, a LoRA, a VAE alone) are refused;
3. build the models from the configs below (the published SD v1-4 / v2-1 configs: no network) and copy every
   weight in under its diffusers name (models/ldm_layout.py), strictly: every key used, every key found;
4. the tokenizer: passed in, or found in the local Hugging Face cache (it is a vocabulary, not in the file).

A v2 file cannot tell whether it predicts ε (2-1-base, 512 px) or v (2-1, 768 px): pass `prediction_type`.
"""

from __future__ import annotations

import os

import torch

from ..core.checkpoint_file import read_state_dict
from ..core.config import read_json
from ..models.ldm_layout import (CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_from_ldm,
                                 clip_to_ldm, from_ldm, open_clip_from_ldm, open_clip_to_ldm, open_clip_unused, to_ldm,
                                 unet_blocks, vae_blocks)
from ..models.modeling import as_torch_dtype
from ..models.single_file import check_prediction_type, unet_config, use_ema_weights, vae_config
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers.ddim import DDIMScheduler
from ..schedulers.pndm import PNDMScheduler
from .loading import SCHEDULER_CLASSES

# The published text encoder and scheduler configs (the UNet's and VAE's are in models/single_file.py).
CLIP_V1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
               num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_V2 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
               num_hidden_layers=23, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1)
# Where a tokenizer may already be in the local cache (diffusers reads the same repos).
TOKENIZER_REPOS = {"v1": ("openai/clip-vit-large-patch14", None),
                   "v2": ("stabilityai/stable-diffusion-2-1", "tokenizer")}


def detect_version(weights: dict[str, torch.Tensor], path: str) -> str:
    """"v1" or "v2", or a clear error for a file that is not a whole SD v1 / v2 checkpoint."""
    keys = list(weights)
    if any(k.startswith(("conditioner.embedders", "model.diffusion_model.label_emb")) for k in keys):
        raise ValueError(f"{path} is an SDXL checkpoint (conditioner.embedders.* / label_emb keys); "
                         "minidiff loads Stable Diffusion v1 and v2 single files.")
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
        raise ValueError(f"{path} is a LoRA (lora_unet_* keys), not a whole model: load a base model and apply "
                         "the LoRA to it.")
    conv_in = weights.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        found = sorted({k.split(".")[0] for k in keys})[:6]
        raise ValueError(f"{path} has no {UNET_PREFIX}* weights (its top-level names: {found}): it is not a whole "
                         "Stable Diffusion checkpoint (a VAE or a text encoder alone?).")
    if conv_in.shape[1] != 4:
        raise ValueError(f"{path}: the UNet takes {conv_in.shape[1]} input channels (9: an inpainting model, "
                         "5: depth-to-image); minidiff's single-file loader builds the 4-channel text-to-image UNet.")
    has_clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
    if has_clip == has_open_clip:
        raise ValueError(f"{path}: expected the weights of one text encoder, {CLIP_PREFIX}* (SD 1) or "
                         f"{OPEN_CLIP_PREFIX}* (SD 2); found {'both' if has_clip else 'neither'}.")
    return "v1" if has_clip else "v2"


def check_published_width(weights: dict[str, torch.Tensor], version: str, path: str) -> None:
    """The published configs are used: the file's cross-attention must be 768 wide (v1) or 1024 (v2)."""
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    width, expected = (weights[key].shape[1] if key in weights else None), {"v1": 768, "v2": 1024}[version]
    if width != expected:
        raise ValueError(f"{path}: a Stable Diffusion {version} file has cross-attention {expected} wide; found "
                         f"{width}. For a model of other sizes pass config=<its diffusers folder>.")


def find_tokenizer(version: str, local_files_only: bool):
    from transformers import CLIPTokenizer

    repo, subfolder = TOKENIZER_REPOS[version]
    try:
        return CLIPTokenizer.from_pretrained(repo, subfolder=subfolder, local_files_only=local_files_only)
    except OSError as e:
        raise OSError(
            f"A single file holds no tokenizer (a vocabulary), and {repo} is not in the local Hugging Face cache. "
            "Pass tokenizer=CLIPTokenizer.from_pretrained(folder) with the tokenizer/ folder of a Stable Diffusion "
            f"{version} repository (vocab.json, merges.txt), or allow a download with local_files_only=False."
        ) from e


def load_single_file(pipeline_cls, path: str, prediction_type: str | None = None, extract_ema: bool = False,
                     tokenizer=None, scheduler=None, torch_dtype: torch.dtype | None = None, config: str | None = None,
                     local_files_only: bool = True):
    """`pipeline_cls` (StableDiffusionPipeline or one built on it) from one LDM-layout file; see the docstring.

    `config`: a pipeline folder in the diffusers layout whose unet/, vae/, text_encoder/ (and scheduler/,
    tokenizer/) configs to use instead of the published ones, as diffusers' `config=` (no weights are read there).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch_dtype = as_torch_dtype(torch_dtype)                 # before a multi-GB file is read
    weights = read_state_dict(path)
    version = detect_version(weights, path)
    if config is None:
        check_published_width(weights, version, path)
    prediction_type = check_prediction_type(prediction_type, version, path, needed=scheduler is None and config is None)
    weights = use_ema_weights(weights, extract_ema, path)

    # 3. the models, each from its config, every weight copied in under its diffusers name
    v_pred = prediction_type == "v_prediction"
    if config is not None:
        unet_settings = read_json(os.path.join(config, "unet", "config.json"))
        vae_settings = read_json(os.path.join(config, "vae", "config.json"))
        text_config = CLIPTextConfig.from_pretrained(os.path.join(config, "text_encoder"))
    else:
        unet_settings, vae_settings = unet_config(version, prediction_type), vae_config(prediction_type)
        text_config = CLIPTextConfig(**(CLIP_V1 if version == "v1" else CLIP_V2))
    unet = UNet2DConditionModel.from_config(unet_settings)
    unet.load_state_dict(from_ldm(unet, unet_blocks(unet.config), weights, UNET_PREFIX, path), strict=True)
    vae = AutoencoderKL.from_config(vae_settings)
    vae.load_state_dict(from_ldm(vae, vae_blocks(vae.config), weights, VAE_PREFIX, path), strict=True)
    text_encoder = CLIPTextModel(text_config).eval()
    if version == "v1":
        text_weights = clip_from_ldm(weights)
    else:
        text_weights = open_clip_from_ldm(weights, text_config.num_hidden_layers)
        unused = open_clip_unused(weights, text_config.num_hidden_layers)
        if unused:
            raise ValueError(f"{path}: {len(unused)} {OPEN_CLIP_PREFIX}* weights fit no part of the SD 2 text "
                             f"encoder: {unused[:5]}. Is it an OpenCLIP ViT-H text tower?")
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        # transformers 5 keeps CLIPTextModel's layers at the top (`embeddings.`, `encoder.`); earlier versions and
        # every SD checkpoint put them under `text_model.`
        text_weights = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
    missing, unexpected = text_encoder.load_state_dict(text_weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]   # a constant buffer, not a weight
    if missing or unexpected:
        raise ValueError(f"{path}: the text encoder's weights do not fit CLIPTextModel ({version}): "
                         f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}).")

    # 4. the scheduler and the tokenizer
    if scheduler is None and config is not None and os.path.isdir(os.path.join(config, "scheduler")):
        name = read_json(os.path.join(config, "scheduler", "scheduler_config.json"))["_class_name"]
        scheduler = SCHEDULER_CLASSES[name].from_pretrained(config, subfolder="scheduler")
    if scheduler is None:
        scheduler = (DDIMScheduler(**SCHEDULER, clip_sample=False, prediction_type="v_prediction") if v_pred
                     else PNDMScheduler(**SCHEDULER, skip_prk_steps=True, prediction_type=prediction_type))
    if tokenizer is None and config is not None and os.path.isdir(os.path.join(config, "tokenizer")):
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(config, "tokenizer"))
    tokenizer = tokenizer or find_tokenizer(version, local_files_only)
    if version == "v2" and config is None and tokenizer.pad_token != "!":
        tokenizer.pad_token = "!"      # SD 2's OpenCLIP tokenizer pads with "!" (SD 1 pads with <|endoftext|>)
    pipe = pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    return pipe.to(torch_dtype) if torch_dtype is not None else pipe


def save_single_file(pipe, path: str, overwrite: bool = False, text_encoder_format: str | None = None) -> None:
    """Write the pipeline's UNet, VAE and text encoder as one LDM-layout `.safetensors` file.

    `text_encoder_format`: "clip" (SD 1) or "open_clip" (SD 2); by default SD 2's when the UNet's cross-attention
    is 1024 wide."""
    from safetensors.torch import save_file

    if not path.endswith(".safetensors"):
        raise ValueError(f"save_single_file writes .safetensors (no pickle); found {os.path.basename(path)!r}.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    text = {(k if k.startswith("text_model.") else "text_model." + k): v      # the SD layout, whatever transformers'
            for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if text_encoder_format not in (None, "clip", "open_clip"):
        raise ValueError(f"text_encoder_format must be 'clip' or 'open_clip'; found {text_encoder_format!r}.")
    is_v2 = (text_encoder_format or ("open_clip" if pipe.unet.config.cross_attention_dim == 1024 else "clip")) == "open_clip"
    weights = {**to_ldm(pipe.unet, unet_blocks(pipe.unet.config), UNET_PREFIX),
               **to_ldm(pipe.vae, vae_blocks(pipe.vae.config), VAE_PREFIX),
               **(open_clip_to_ldm(text, pipe.text_encoder.config.num_hidden_layers) if is_v2 else clip_to_ldm(text))}
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, path)
