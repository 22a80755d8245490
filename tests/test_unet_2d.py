"""minidiff.UNet2DModel against diffusers.UNet2DModel: every weight random, saved by diffusers, loaded by
minidiff, outputs compared (fp32 relative error < 1e-5)."""

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from helpers import randomize_, rel_err
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.blocks.layers import broadcast_timesteps
from minidiff.models.modeling import LEGACY_ATTENTION_NAMES

TOL = 1e-5

# Small configs covering every option minidiff implements. Channels are multiples of norm_num_groups.
CONFIGS = {
    # the original DDPM settings (as in ddpm-cat-256): one head per block, right/bottom padding, [sin, cos],
    # freq_shift 1; an odd number of levels with attention at the first and last level
    "ddpm_style": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, norm_eps=1e-6,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ),
    # diffusers' defaults: 8-wide heads, symmetric padding, [cos, sin], centred input, scaled mid block
    "heads_center_scale": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, downsample_padding=1, center_input_sample=True, mid_block_scale_factor=1.414,
        attn_norm_num_groups=2, time_embedding_dim=40, in_channels=2, out_channels=5,
    ),
    # a head width that does not divide the channels (heads * head_dim < C, as diffusers builds it),
    # attention only on the up path, an odd number of levels, freq_shift 1 with [cos, sin]
    "uneven_heads": dict(
        block_out_channels=(24, 24, 48), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, flip_sin_to_cos=True, freq_shift=1,
    ),
    # a single level: no downsampling or upsampling at all
    "one_level": dict(
        block_out_channels=(16,), layers_per_block=2, norm_num_groups=8,
        down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
    ),
}


def make_reference(config: dict, seed: int = 0) -> diffusers.UNet2DModel:
    return randomize_(diffusers.UNet2DModel(**config), seed=seed).eval()


def legacy_names(state: dict) -> dict:
    """The pre-2023 attention names (to_q -> query, to_out.0 -> proj_attn, ...) of a state dict."""
    legacy = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in LEGACY_ATTENTION_NAMES.items():
                key = key.replace(new, old)
        legacy[key] = value
    assert legacy.keys() != state.keys(), "the model has no attention weights to rename"
    return legacy


def save_with_legacy_names(folder, name="diffusion_pytorch_model.safetensors"):
    """Rewrite a saved checkpoint with the pre-2023 attention names (to_q -> query, ...)."""
    path = folder / name
    legacy = legacy_names(load_file(str(path)))
    save_file(legacy, str(path), metadata={"format": "pt"})
    return legacy


def input_for(config: dict, batch=2, size=16):
    return torch.randn(batch, config.get("in_channels", 3), size, size)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_parity_random_weights(name, tmp_path):
    config = CONFIGS[name]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    assert isinstance(model.config, minidiff.UNet2DConfig)
    assert not model.training

    x = input_for(config)
    for t in (0, 10, 999, 10.0, torch.tensor(500), torch.tensor([3, 900]), torch.tensor([7.0])):
        expected = ref(x, t).sample
        out = model(x, t)
        assert isinstance(out, minidiff.UNet2DOutput)
        assert out.sample.shape == (2, config.get("out_channels", 3), 16, 16)
        assert expected.abs().max() > 0.1  # a real signal, not zeros
        assert rel_err(out.sample, expected) < TOL, f"timestep {t!r}"


@torch.no_grad()
def test_non_square_input_and_batch_of_one(tmp_path):
    config = CONFIGS["ddpm_style"]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 8, 24)
    assert rel_err(model(x, 42).sample, ref(x, 42).sample) < TOL


@torch.no_grad()
def test_legacy_attention_names(tmp_path):
    config = CONFIGS["ddpm_style"]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    legacy = save_with_legacy_names(tmp_path)
    assert any(".attentions.0.query.weight" in k for k in legacy)
    assert any(".attentions.0.proj_attn.bias" in k for k in legacy)

    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    x = input_for(config)
    assert rel_err(model(x, 17).sample, ref(x, 17).sample) < TOL


@torch.no_grad()
def test_bin_weights(tmp_path):
    config = CONFIGS["heads_center_scale"]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    x = input_for(config)
    assert rel_err(model(x, 5).sample, ref(x, 5).sample) < TOL


@torch.no_grad()
def test_use_safetensors_picks_the_format(tmp_path):
    config = CONFIGS["heads_center_scale"]
    from_safetensors, from_bin = make_reference(config, seed=1), make_reference(config, seed=2)
    from_safetensors.save_pretrained(tmp_path)
    from_bin.save_pretrained(tmp_path, safe_serialization=False)
    x = input_for(config)

    for use_safetensors, ref in ((None, from_safetensors), (True, from_safetensors), (False, from_bin)):
        model = minidiff.UNet2DModel.from_pretrained(tmp_path, use_safetensors=use_safetensors)
        assert rel_err(model(x, 5).sample, ref(x, 5).sample) < TOL, use_safetensors

    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors.*set use_safetensors=None"):
        minidiff.UNet2DModel.from_pretrained(tmp_path, use_safetensors=True)


@torch.no_grad()
def test_fp16_variant_and_torch_dtype(tmp_path):
    config = CONFIGS["heads_center_scale"]
    ref = make_reference(config)
    ref.half().save_pretrained(tmp_path, variant="fp16")  # as the hub's fp16 files: fp16 weights
    ref.float()
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()

    with pytest.raises(FileNotFoundError, match="Drop variant= or|found none"):
        minidiff.UNet2DModel.from_pretrained(tmp_path)  # the plain file is absent
    model = minidiff.UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())
    ref_state = ref.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref_state[key].half()), key

    # fp16 on the CPU: the whole network runs in half precision, close to the fp32 reference
    x = input_for(config)
    out = model(x.half(), 5).sample
    assert out.dtype == torch.float16
    assert rel_err(out.float(), ref(x, 5).sample) < 1e-2

    # without torch_dtype the fp16 weights load into an fp32 model
    model32 = minidiff.UNet2DModel.from_pretrained(tmp_path, variant="fp16")
    assert model32.dtype == torch.float32


@torch.no_grad()
def test_fractional_timestep_is_not_truncated(tmp_path):
    # diffusers' UNet2DModel turns a Python float into a long tensor; minidiff keeps 10.5 as 10.5
    config = CONFIGS["uneven_heads"]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    x = input_for(config)
    out = model(x, 10.5).sample
    assert rel_err(out, ref(x, torch.tensor([10.5, 10.5])).sample) < TOL
    assert rel_err(out, model(x, 10).sample) > 1e-4


@torch.no_grad()
def test_save_pretrained_is_readable_by_diffusers(tmp_path):
    config = CONFIGS["ddpm_style"]
    model = minidiff.UNet2DModel.from_config(config)
    randomize_(model, seed=3).eval()
    model.save_pretrained(tmp_path)
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    for key in config:
        assert list(ref.config[key]) == list(config[key]) if isinstance(config[key], tuple) \
            else ref.config[key] == config[key], key
    x = input_for(config)
    assert rel_err(model(x, 3).sample, ref(x, 3).sample) < TOL
    again = minidiff.UNet2DModel.from_pretrained(tmp_path)
    assert again.config == model.config
    assert torch.equal(again(x, 3).sample, model(x, 3).sample)


def test_bad_inputs_raise_clear_errors():
    model = minidiff.UNet2DModel.from_config(CONFIGS["ddpm_style"])
    with pytest.raises(ValueError, match=r"multiples of 4 .*found 16x10"):
        model(torch.randn(1, 3, 16, 10), 1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), found \(1, 4, 16, 16\)"):
        model(torch.randn(1, 4, 16, 16), 1)
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(2,\) for a batch of 2, found shape \(3,\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


# The one timestep function of both UNets: (argument, dtype it becomes, the (B,) values it gives for B = 2).
TIMESTEP_FORMS = [
    (7, torch.int64, [7, 7]),
    (7.5, torch.float64, [7.5, 7.5]),                    # a fractional float stays fractional
    (np.float32(7.5), torch.float64, [7.5, 7.5]),
    (np.int64(7), torch.int64, [7, 7]),
    (torch.tensor(7), torch.int64, [7, 7]),              # 0-d
    (torch.tensor([7.5]), torch.float32, [7.5, 7.5]),    # (1,): a tensor keeps its dtype
    (torch.tensor([7, 300], dtype=torch.int32), torch.int32, [7, 300]),
]


@pytest.mark.parametrize("timestep, dtype, values", TIMESTEP_FORMS, ids=[repr(t) for t, _, _ in TIMESTEP_FORMS])
def test_broadcast_timesteps(timestep, dtype, values):
    t = broadcast_timesteps(timestep, 2, torch.device("cpu"))
    assert t.shape == (2,) and t.dtype == dtype
    assert t.tolist() == values
    assert broadcast_timesteps(timestep, 2, torch.device("meta")).device.type == "meta"


def test_broadcast_timesteps_refuses_what_is_not_one_or_one_per_image():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(2,\) for a batch of 2, found shape \(3,\)\. Pass one"):
        broadcast_timesteps(torch.tensor([1, 2, 3]), 2, cpu)
    with pytest.raises(ValueError, match=r"found shape \(2, 1\)"):
        broadcast_timesteps(torch.tensor([[1], [2]]), 2, cpu)
    with pytest.raises(TypeError, match=r"a number or a tensor, found a list\. For one timestep per image pass a "
                                        r"tensor of shape \(2,\)"):
        broadcast_timesteps([1, 2], 2, cpu)


@torch.no_grad()
def test_float64_timestep_gives_the_float32_result():
    """A Python float becomes float64 (as in diffusers' UNet2DConditionModel); the sinusoids are computed in
    float32 either way, so the output is bit-identical to that of a float32 timestep."""
    model = minidiff.UNet2DModel.from_config(CONFIGS["heads_center_scale"]).eval()
    x = input_for(CONFIGS["heads_center_scale"])
    assert torch.equal(model(x, 10.25).sample, model(x, torch.tensor([10.25], dtype=torch.float32)).sample)


@pytest.mark.slow
@torch.no_grad()
def test_real_ddpm_cat_256_config_in_hub_layout(reference_dir, tmp_path):
    """The exact google/ddpm-cat-256 config (diffusers 0.0.4, legacy attention names), at 32x32 pixels."""
    src = reference_dir / "ddpm-cat-256"
    config = json.loads((src / "config.json").read_text())
    with torch.device("meta"):  # skip diffusers' init: randomize_ overwrites every weight anyway
        ref = diffusers.UNet2DModel.from_config(config)
    randomize_(ref.to_empty(device="cpu")).eval()

    # the hub layout: config.json, scheduler_config.json and the weights at the repo root, old names
    shutil.copy(src / "config.json", tmp_path / "config.json")
    shutil.copy(src / "scheduler_config.json", tmp_path / "scheduler_config.json")
    save_file(legacy_names(ref.state_dict()), str(tmp_path / "diffusion_pytorch_model.safetensors"))

    model = minidiff.UNet2DModel.from_pretrained(tmp_path)
    assert model.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    assert model.config.attention_head_dim is None and model.config.downsample_padding == 0
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())

    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([250])
    assert rel_err(model(x, t).sample, ref(x, t).sample) < TOL
