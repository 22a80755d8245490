"""One model (the UNet or the VAE) from an original single checkpoint file, as diffusers' model-level
`UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file`; the whole pipeline is
`StableDiffusionPipeline.from_single_file` (pipelines/single_file.py), which uses the configs below too.

    unet = UNet2DConditionModel.from_single_file("v1-5-pruned-emaonly.safetensors")
    vae = AutoencoderKL.from_single_file("vae-ft-mse-840000-ema-pruned.safetensors")   # a VAE-only file

The weights are read without running any pickle (core/checkpoint_file.py) and copied in under their
diffusers names by the key map of ldm_layout.py, strictly. The model classes are passed in (`cls`), so this
file imports none of them and they can offer `from_single_file` on top of it.
"""

from __future__ import annotations

import os

import torch

from ..core.checkpoint_file import read_state_dict
from ..core.config import read_json
from .modeling import as_torch_dtype
from .ldm_layout import EMA_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_name, from_ldm, unet_blocks, vae_blocks

# The published configs (CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-2-1[-base]), as the fields
# that differ from the config classes' defaults.
UNET_V1 = dict(cross_attention_dim=768, sample_size=64)
UNET_V2 = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CROSS_ATTENTION_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
PREDICTION_TYPES = ("epsilon", "v_prediction")


def unet_config(version: str, prediction_type: str) -> dict:
    """SD v1's UNet, or SD 2's at 768 px (v-prediction, stable-diffusion-2-1) or 512 px (epsilon, 2-1-base)."""
    if version == "v1":
        return UNET_V1
    v_pred = prediction_type == "v_prediction"
    return dict(UNET_V2, sample_size=96 if v_pred else 64, upcast_attention=v_pred)


def vae_config(prediction_type: str = "epsilon") -> dict:
    return dict(VAE, sample_size=768 if prediction_type == "v_prediction" else 512)


def check_prediction_type(prediction_type, version: str, path: str, needed: bool) -> str:
    """The prediction type a v2 file cannot tell; `needed` where no other config says it."""
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; found {prediction_type!r}.")
    if version == "v2" and prediction_type is None and needed:
        raise ValueError(f"{path} is a Stable Diffusion 2 file, which cannot tell what its UNet predicts: pass "
                         "prediction_type='v_prediction' (stable-diffusion-2-1, 768 px) or 'epsilon' "
                         "(stable-diffusion-2-1-base, 512 px).")
    return prediction_type or "epsilon"


def use_ema_weights(weights: dict[str, torch.Tensor], extract_ema: bool, path: str) -> dict[str, torch.Tensor]:
    """With `extract_ema`, the UNet's weights are replaced by their EMA copy (`model_ema.*`), as diffusers'
    `extract_ema=True` does; by default the file's `model.diffusion_model.*` weights are used as they are."""
    ema = {k: v for k, v in weights.items() if k.startswith(EMA_PREFIX)}
    weights = {k: v for k, v in weights.items() if not k.startswith(EMA_PREFIX)}
    if not extract_ema:
        return weights
    if not ema:
        raise ValueError(f"extract_ema=True, but {path} holds no EMA weights (model_ema.*): it was saved "
                         "with one set only (e.g. a '-emaonly' file). Leave extract_ema off.")
    for key in [k for k in weights if k.startswith(UNET_PREFIX)]:
        weights[key] = ema[ema_name(key)]
    return weights


def _config(config, source: str):
    """`config`: a dict, or a folder holding the model's config.json (e.g. a pipeline's unet/ folder)."""
    if config is None or isinstance(config, dict):
        return config
    path = os.path.join(config, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config={config!r}: expected a folder with config.json (e.g. the unet/ or vae/ "
                                f"folder of a diffusers pipeline) for {source}, or a dict; found no {path}.")
    return read_json(path)


def unet_from_single_file(cls, path: str, config=None, prediction_type: str | None = None, extract_ema: bool = False,
                          torch_dtype: torch.dtype | None = None):
    """`cls` (UNet2DConditionModel) from a whole SD checkpoint (`model.diffusion_model.*`) or a UNet-only file."""
    torch_dtype = as_torch_dtype(torch_dtype)                 # before a multi-GB file is read
    weights = use_ema_weights(read_state_dict(path), extract_ema, path)
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in weights) else ""
    if prefix + "input_blocks.0.0.weight" not in weights:
        raise ValueError(f"{path} holds no UNet in the LDM layout ({UNET_PREFIX}input_blocks.0.0.weight or "
                         "input_blocks.0.0.weight).")
    config = _config(config, path)
    if config is None:
        width = weights[prefix + CROSS_ATTENTION_KEY].shape[1] if prefix + CROSS_ATTENTION_KEY in weights else None
        if width not in (768, 1024):
            raise ValueError(f"{path}: a Stable Diffusion UNet has cross-attention 768 (v1) or 1024 (v2) wide; found "
                             f"{width}. For a model of other sizes pass config=<its unet/ folder or a dict>.")
        version = "v1" if width == 768 else "v2"
        config = unet_config(version, check_prediction_type(prediction_type, version, path, needed=True))
    unet = cls.from_config(config)
    unet.load_state_dict(from_ldm(unet, unet_blocks(unet.config), weights, prefix, path), strict=True)
    return unet.to(torch_dtype) if torch_dtype is not None else unet


def vae_from_single_file(cls, path: str, config=None, torch_dtype: torch.dtype | None = None):
    """`cls` (AutoencoderKL) from a whole SD checkpoint (`first_stage_model.*`) or a VAE-only file (its keys
    `encoder.*`, `decoder.*`; the `loss.*` weights that training checkpoints keep, the discriminator of the
    VAE's GAN loss, are not part of the model and are left out)."""
    torch_dtype = as_torch_dtype(torch_dtype)
    weights = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in weights):
        prefix = VAE_PREFIX
    else:
        prefix, weights = "", {k: v for k, v in weights.items() if not k.startswith("loss.")}
    if prefix + "encoder.conv_in.weight" not in weights:
        raise ValueError(f"{path} holds no VAE in the LDM layout ({VAE_PREFIX}encoder.* or encoder.*).")
    vae = cls.from_config(_config(config, path) or vae_config())
    vae.load_state_dict(from_ldm(vae, vae_blocks(vae.config), weights, prefix, path), strict=True)
    return vae.to(torch_dtype) if torch_dtype is not None else vae
