"""The one validation of the model configs (core/config.ModelConfig), on every path a config takes.

A config reaches a model four ways: a dict given to `from_config`, a config.json read by `from_pretrained`, a
dataclass written by hand (`UNet2DConfig(...)`), and `dataclasses.replace` of a loaded one. Every unsupported
value of every model is refused on each of them with the same message; the real configs (SD v1-4's unet and
vae, google/ddpm-cat-256) pass on each of them and build the module tree diffusers builds.
"""

from __future__ import annotations

import dataclasses
import json
import re

import diffusers
import pytest
import torch

import minidiff
from minidiff.core.config import ModelConfig, config_from_dict

# Small valid configs, one per model; each case below changes one key of it.
BASES = {
    "UNet2DModel": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "UNet2DConditionModel": dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                                 cross_attention_dim=8, attention_head_dim=2,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "AutoencoderKL": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
}

# A value found in real checkpoints (or the format) for every key of `_supported_values`, which minidiff refuses.
UNSUPPORTED = {
    "UNet2DModel": {
        "time_embedding_type": "fourier", "mid_block_type": None, "downsample_type": "resnet",
        "upsample_type": "resnet", "act_fn": "gelu", "resnet_time_scale_shift": "scale_shift",
        "add_attention": False, "class_embed_type": "timestep", "num_class_embeds": 10,
    },
    "UNet2DConditionModel": {
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "only_cross_attention": True,
        "transformer_layers_per_block": 2, "reverse_transformer_layers_per_block": [[1], [1]],
        "encoder_hid_dim": 1024, "encoder_hid_dim_type": "text_proj", "num_attention_heads": 8,
        "dual_cross_attention": True, "class_embed_type": "timestep", "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "num_class_embeds": 10, "resnet_time_scale_shift": "scale_shift",
        "resnet_skip_time_act": True, "resnet_out_scale_factor": 2.0, "time_embedding_type": "fourier",
        "time_embedding_dim": 512, "time_embedding_act_fn": "silu", "timestep_post_act": "silu",
        "time_cond_proj_dim": 256, "conv_in_kernel": 7, "conv_out_kernel": 7,
        "projection_class_embeddings_input_dim": 2816, "attention_type": "gated", "class_embeddings_concat": True,
        "mid_block_only_cross_attention": True, "cross_attention_norm": "group_norm", "act_fn": "gelu",
    },
    "AutoencoderKL": {
        "act_fn": "gelu", "shift_factor": 0.1159, "latents_mean": [0.0, 0.1, 0.2, 0.3], "latents_std": [1.0] * 4,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
    },
}

# Structural mistakes that `_supported_values` cannot express, per model: (change, message).
MALFORMED = {
    "UNet2DModel": [
        (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")),
         r"block type\(s\) \['SkipDownBlock2D'\] in down_block_types; minidiff supports \['DownBlock2D', "
         r"'AttnDownBlock2D'\]"),
        (dict(up_block_types=("UpBlock2D",)), r"as many down_block_types and up_block_types as block_out_channels "
                                              r"\(2\), found 2 and 1"),
        (dict(norm_num_groups=3), r"block_out_channels \[8, 16\] are not divisible by norm_num_groups=3"),
        (dict(norm_num_groups=None), r"expected norm_num_groups to be a positive integer, found None"),
        (dict(attention_head_dim=32), r"attention_head_dim=32 is wider than the \[16\] channels"),
    ],
    "UNet2DConditionModel": [
        (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
         r"block type\(s\) \['SimpleCrossAttnDownBlock2D'\] in down_block_types; minidiff supports "
         r"\['CrossAttnDownBlock2D', 'DownBlock2D'\]"),
        (dict(up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D")),
         r"as many down_block_types and up_block_types as block_out_channels \(2\), found 2 and 3"),
        (dict(norm_num_groups=5), r"block_out_channels \[16, 32\] are not divisible by norm_num_groups=5"),
        (dict(attention_head_dim=(1, 2, 3)), r"expected attention_head_dim to be one int or a list of 2"),
        (dict(layers_per_block=(1, 2, 3)), r"expected layers_per_block to be one int or a list of 2"),
        (dict(cross_attention_dim=(8, 8)), r"expected cross_attention_dim to be one int"),
    ],
    "AutoencoderKL": [
        (dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")),
         r"block type\(s\) \['AttnDownEncoderBlock2D'\] in down_block_types; minidiff supports "
         r"\['DownEncoderBlock2D'\]"),
        (dict(up_block_types=("UpDecoderBlock2D",)), r"as many down_block_types and up_block_types"),
        (dict(norm_num_groups=16), r"block_out_channels \[8\] are not divisible by norm_num_groups=16"),
        (dict(norm_num_groups=0), r"expected norm_num_groups to be a positive integer, found 0"),
    ],
}


def model_class(name: str) -> type:
    return getattr(minidiff, name)


def as_json(value):
    """What config.json holds: tuples are lists."""
    return [as_json(v) for v in value] if isinstance(value, tuple) else value


def frozen(value):
    """What the config dataclass holds: lists are tuples."""
    return tuple(frozen(v) for v in value) if isinstance(value, list) else value


def write_config(folder, name: str, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"_class_name": name, "_diffusers_version": "0.42.1", **{k: as_json(v) for k, v in config.items()}}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def refuse_on_every_path(name: str, config: dict, message: str, tmp_path) -> None:
    """`config` is refused with `message` as a dict, as a config.json, as a dataclass and through replace()."""
    cls = model_class(name)
    with pytest.raises(ValueError, match=message):                          # 1. from_config(dict)
        cls.from_config(config)
    folder = write_config(tmp_path / name, name, config)
    with pytest.raises(ValueError, match=message) as info:                  # 2. config.json
        cls.from_pretrained(folder)
    assert str(info.value).startswith(str(folder / "config.json")), "the message names the file"
    with pytest.raises(ValueError, match=message):                          # 3. a dataclass written by hand
        cls(cls.config_class(**config))
    valid = cls.config_class(**BASES[name])
    with pytest.raises(ValueError, match=message):                          # 4. replace() of a valid config
        dataclasses.replace(valid, **config)


UNSUPPORTED_CASES = [(name, key, value) for name, values in UNSUPPORTED.items() for key, value in values.items()]


@pytest.mark.parametrize("name, key, value", UNSUPPORTED_CASES,
                         ids=[f"{name}-{key}" for name, key, _ in UNSUPPORTED_CASES])
def test_every_unsupported_value_is_refused_on_every_path(name, key, value, tmp_path):
    allowed = model_class(name).config_class._supported_values[key]
    assert frozen(value) not in allowed
    message = (rf"{model_class(name).config_class.__name__} does not implement {re.escape(f'{key}={frozen(value)!r}')} "
               rf"\(minidiff supports {re.escape(str(list(allowed)))}\)\. Set each to a supported value, or use "
               rf"diffusers")
    refuse_on_every_path(name, {**BASES[name], key: value}, message, tmp_path)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_every_supported_values_key_has_a_case(name):
    """A key added to `_supported_values` without a case above fails here, so no option goes untested."""
    assert set(UNSUPPORTED[name]) == set(model_class(name).config_class._supported_values)


MALFORMED_CASES = [(name, change, message) for name, cases in MALFORMED.items() for change, message in cases]


@pytest.mark.parametrize("name, change, message", MALFORMED_CASES,
                         ids=[f"{name}-{next(iter(change))}-{i}" for i, (name, change, _) in enumerate(MALFORMED_CASES)])
def test_malformed_config_is_refused_on_every_path(name, change, message, tmp_path):
    refuse_on_every_path(name, {**BASES[name], **change}, message, tmp_path)


def test_two_unsupported_values_are_named_together():
    with pytest.raises(ValueError, match=r"conv_in_kernel=7 \(minidiff supports \[3\]\); "
                                         r"act_fn='gelu' \(minidiff supports \['silu', 'swish'\]\)\."):
        minidiff.UNet2DConditionConfig(act_fn="gelu", conv_in_kernel=7)


def test_from_config_of_another_models_config_is_refused():
    with pytest.raises(TypeError, match=r"UNet2DModel.from_config expected a dict of config values or a UNet2DConfig, "
                                        r"found AutoencoderKLConfig\. Pass the dict of a config.json"):
        minidiff.UNet2DModel.from_config(minidiff.AutoencoderKLConfig(**BASES["AutoencoderKL"]))
    config = minidiff.UNet2DConfig(**BASES["UNet2DModel"])
    assert minidiff.UNet2DModel.from_config(config).config is config      # a config dataclass is used as it is


def test_unknown_key_is_refused_from_a_dict():
    for name, config in BASES.items():
        with pytest.raises(ValueError, match=r"does not implement the config key\(s\) \['not_a_key'\]"):
            model_class(name).from_config({**config, "not_a_key": 1})


@pytest.mark.parametrize("name", BASES)
def test_the_paths_give_equal_configs(name, tmp_path):
    """Lists become tuples on every path, so a config written by hand with lists equals the one from JSON."""
    cls = model_class(name)
    as_lists = {k: as_json(v) for k, v in BASES[name].items()}
    by_hand = cls.config_class(**as_lists)
    from_dict = cls.from_config(as_lists).config
    from_json = config_from_dict(cls.config_class, json.loads(
        (write_config(tmp_path, name, as_lists) / "config.json").read_text()), strict=True)
    assert by_hand == from_dict == from_json
    assert isinstance(by_hand.block_out_channels, tuple)
    assert hash(by_hand) == hash(from_json)
    assert isinstance(by_hand, ModelConfig)


REAL = {  # the reference folder's config files, and the model they belong to
    "ddpm-cat-256/config.json": "UNet2DModel",
    "stable-diffusion-v1-4/unet/config.json": "UNet2DConditionModel",
    "stable-diffusion-v1-4/vae/config.json": "AutoencoderKL",
}


@pytest.mark.parametrize("path", REAL)
def test_real_configs_pass_every_path_and_build_diffusers_module_tree(path, reference_dir, tmp_path):
    name = REAL[path]
    cls = model_class(name)
    raw = json.loads((reference_dir / path).read_text())
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}

    from_json = config_from_dict(cls.config_class, raw, strict=True, source=path)
    assert cls.config_class(**fields) == from_json
    assert dataclasses.replace(from_json) == from_json

    # Built on the meta device (no memory): the same parameter names and shapes as diffusers' model.
    with torch.device("meta"):
        ours = cls.from_config(raw)
        theirs = getattr(diffusers, name).from_config(raw)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    assert ours.config == from_json

    # The blocks' class names are the config's block types, as in diffusers, in both UNets and the VAE.
    down, up = (ours.encoder, ours.decoder) if name == "AutoencoderKL" else (ours, ours)
    assert [type(b).__name__ for b in down.down_blocks] == list(from_json.down_block_types)
    assert [type(b).__name__ for b in up.up_blocks] == list(from_json.up_block_types)
    mid_block_type = getattr(from_json, "mid_block_type", "UNetMidBlock2D")   # the VAE's config has no key
    assert type(down.mid_block).__name__ == type(up.mid_block).__name__ == mid_block_type


def test_blocks_shared_by_the_models_are_one_class():
    """The DDPM UNet and the VAE use the same mid block class; both UNets the same plain down and up blocks."""
    with torch.device("meta"):
        ddpm = minidiff.UNet2DModel.from_config(BASES["UNet2DModel"])
        sd = minidiff.UNet2DConditionModel.from_config(BASES["UNet2DConditionModel"])
        vae = minidiff.AutoencoderKL.from_config(BASES["AutoencoderKL"])
    assert type(ddpm.mid_block) is type(vae.encoder.mid_block) is type(vae.decoder.mid_block)
    assert type(ddpm.down_blocks[0]) is type(sd.down_blocks[1])           # DownBlock2D
    assert type(ddpm.up_blocks[1]) is type(sd.up_blocks[0])               # UpBlock2D
