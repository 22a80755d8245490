"""Parity of minidiff.UNet2DConditionModel (the Stable Diffusion UNet) with diffusers, every weight random."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet

from helpers import randomize_, rel_err
from minidiff import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.core.config import config_from_dict
from minidiff.blocks.layers import Attention

SMALL = dict(  # 2 blocks, one int for the heads, 1x1-conv projections
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=4,
    sample_size=8,
)

CONFIGS = {
    "2 blocks, heads int, conv proj": SMALL,
    "3 blocks, heads list, linear proj": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=8,
    ),
    "3 blocks, DDPM-style time, padding 0, centered input": dict(
        block_out_channels=(16, 32, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 2, 1),
        norm_num_groups=8,
        norm_eps=1e-6,
        cross_attention_dim=8,
        attention_head_dim=(1, 2, 3),   # 48 channels / 3 heads = 16
        downsample_padding=0,
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        mid_block_scale_factor=1.5,
        in_channels=3,
        out_channels=5,
        sample_size=8,
    ),
}


def make_pair(config: dict, tmp_path, seed: int = 0):
    """diffusers' model with every weight random, saved by diffusers and loaded by minidiff."""
    ref = randomize_(RefUNet(**config), seed=seed).eval()
    ref.save_pretrained(tmp_path)
    return UNet2DConditionModel.from_pretrained(tmp_path), ref


def inputs(config: dict, B: int, h: int, w: int, M: int = 7):
    sample = torch.randn(B, config.get("in_channels", 4), h, w)
    context = torch.randn(B, M, config["cross_attention_dim"])
    return sample, context


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B, h, w, timestep", [
    (2, 9, 9, torch.tensor([3, 801])),     # odd latent, one timestep per sample
    (1, 13, 11, 500),                      # odd, different H and W, scalar timestep
    (2, 8, 12, torch.tensor(999.0)),       # divisible sizes, 0-d float tensor
])
@torch.no_grad()
def test_parity(name, B, h, w, timestep, tmp_path):
    config = CONFIGS[name]
    model, ref = make_pair(config, tmp_path)
    sample, context = inputs(config, B, h, w)
    out = model(sample, timestep, context).sample
    expected = ref(sample, timestep, context).sample
    assert out.shape == expected.shape == (B, config.get("out_channels", 4), h, w)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("timestep", [7, 7.5, torch.tensor(7), torch.tensor([7]), torch.tensor([7.5, 300.25]),
                                      torch.tensor([7, 300], dtype=torch.int32)])
@torch.no_grad()
def test_timestep_forms(timestep, tmp_path):
    model, ref = make_pair(SMALL, tmp_path)
    sample, context = inputs(SMALL, 2, 8, 8)
    assert rel_err(model(sample, timestep, context).sample, ref(sample, timestep, context).sample) < 1e-5


@torch.no_grad()
def test_timestep_changes_output(tmp_path):
    model, _ = make_pair(SMALL, tmp_path)
    sample, context = inputs(SMALL, 1, 8, 8)
    assert rel_err(model(sample, 10, context).sample, model(sample, 900, context).sample) > 1e-3


@torch.no_grad()
def test_text_changes_output(tmp_path):
    model, _ = make_pair(SMALL, tmp_path)
    sample, context = inputs(SMALL, 1, 8, 8)
    assert rel_err(model(sample, 10, context).sample, model(sample, 10, context.flip(1) * 2).sample) > 1e-3


@torch.no_grad()
def test_controlnet_residuals(tmp_path):
    config = CONFIGS["3 blocks, heads list, linear proj"]
    model, ref = make_pair(config, tmp_path)
    sample, context = inputs(config, 2, 9, 11)
    # The skips of a 9x11 latent: conv_in + 2 resnets at 9x11 (32 ch), downsampled to 5x6, 2 resnets (64 ch),
    # downsampled to 3x3, 2 resnets: ControlNet adds one residual to each.
    shapes = [(2, 32, 9, 11)] * 3 + [(2, 32, 5, 6)] + [(2, 64, 5, 6)] * 2 + [(2, 64, 3, 3)] * 3
    down_res = tuple(torch.randn(s) for s in shapes)
    mid_res = torch.randn(2, 64, 3, 3)
    out = model(sample, 1, context, down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res)
    expected = ref(sample, 1, context, down_block_additional_residuals=down_res,
                   mid_block_additional_residual=mid_res).sample
    assert rel_err(out.sample, expected) < 1e-5
    assert rel_err(out.sample, model(sample, 1, context).sample) > 1e-3
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        model(sample, 1, context, down_block_additional_residuals=down_res[:-1])


@torch.no_grad()
def test_bfloat16_follows_the_same_ops(tmp_path):
    """In bf16 every rounding shows (~1e-2): equal outputs mean the same ops, in the same order and memory
    layout (a channels-last tensor leaking out of a permute once made them differ)."""
    config = CONFIGS["3 blocks, heads list, linear proj"]
    model, ref = make_pair(config, tmp_path)
    model, ref = model.to(torch.bfloat16), ref.to(torch.bfloat16)
    sample, context = (t.bfloat16() for t in inputs(config, 2, 9, 9))
    out = model(sample, 5, context).sample
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref(sample, 5, context).sample) < 1e-3


@torch.no_grad()
def test_saved_by_minidiff_loads_in_diffusers(tmp_path):
    config = CONFIGS["3 blocks, heads list, linear proj"]
    model, _ = make_pair(config, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    ref = RefUNet.from_pretrained(tmp_path / "b").eval()
    sample, context = inputs(config, 1, 8, 8)
    assert rel_err(model(sample, 3, context).sample, ref(sample, 3, context).sample) < 1e-5


# --- attention maps ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_attention_probs_equal_sdpa_path():
    attn = randomize_(Attention(32, heads=4, dim_head=8, context_dim=12))
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 12)
    fast = attn(x, context)
    assert attn.attention_probs is None
    attn.store_attention_probs = True
    slow = attn(x, context)
    assert rel_err(slow, fast) < 1e-5
    assert attn.attention_probs.shape == (2, 4, 10, 7)
    torch.testing.assert_close(attn.attention_probs.sum(-1), torch.ones(2, 4, 10))


@torch.no_grad()
def test_cross_attention_maps_of_the_unet(tmp_path):
    config = CONFIGS["3 blocks, heads list, linear proj"]
    model, ref = make_pair(config, tmp_path)
    layers = model.cross_attention_layers()
    ref_names = [n for n, _ in ref.named_modules() if n.endswith(".attn2")]
    assert sorted(layers) == sorted(ref_names) and len(layers) == 2 * 2 + 1 + 3 * 2   # down, mid, up
    assert [name.split(".")[0] for name in layers] == ["down_blocks"] * 4 + ["mid_block"] + ["up_blocks"] * 6
    sample, context = inputs(config, 2, 9, 7, M=5)
    fast = model(sample, 42, context).sample
    for layer in layers.values():
        layer.store_attention_probs = True
    slow = model(sample, 42, context).sample
    assert rel_err(slow, fast) < 1e-5
    assert rel_err(slow, ref(sample, 42, context).sample) < 1e-5
    first = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert first.attention_probs.shape == (2, 2, 9 * 7, 5)                 # (B, heads, h*w, M), 2 heads
    mid = layers["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert mid.attention_probs.shape == (2, 8, 3 * 2, 5)                   # 9x7 -> 5x4 -> 3x2, 8 heads
    for layer in layers.values():
        torch.testing.assert_close(layer.attention_probs.sum(-1), torch.ones(layer.attention_probs.shape[:-1]))


def test_attention_probs_keep_the_graph():
    attn = randomize_(Attention(16, heads=2, dim_head=8, context_dim=4))
    attn.store_attention_probs = True
    x = torch.randn(1, 6, 16, requires_grad=True)
    attn(x, torch.randn(1, 3, 4))
    attn.attention_probs[..., 0].sum().backward()   # e.g. a loss that excites token 0 (Attend-and-Excite)
    assert x.grad is not None and x.grad.abs().max() > 0


# --- the real Stable Diffusion v1-4 config ----------------------------------------------------------------


@pytest.mark.slow
@torch.no_grad()
def test_real_sd_v1_4_config(reference_dir):
    """The exact SD v1-4 UNet config, 860M random weights shared between the two models (one copy in RAM)."""
    raw = json.loads((reference_dir / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    with torch.device("meta"):  # skip the random init of 860M weights: randomize_ overwrites them anyway
        model = UNet2DConditionModel.from_config(raw)
        ref = RefUNet.from_config(raw)
    model = randomize_(model.to_empty(device="cpu")).eval()
    ref.load_state_dict(model.state_dict(), strict=True, assign=True)   # same keys, same shapes, same tensors
    ref.eval()
    assert sum(p.numel() for p in model.parameters()) == 859_520_964

    # attention_head_dim: 8 means 8 heads of 320/8 = 40 dims in the first block
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 8 and attn.to_q.out_features == 320 and attn.to_k.in_features == 768
    assert len(model.cross_attention_layers()) == 16

    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    out = model(sample, 981, context).sample
    expected = ref(sample, 981, context).sample
    assert out.shape == (1, 4, 8, 8)
    assert rel_err(out, expected) < 1e-5


def test_real_sd_v1_4_config_parses(reference_dir):
    raw = json.loads((reference_dir / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    cfg = config_from_dict(UNet2DConditionConfig, raw, strict=True, source="sd-v1-4/unet/config.json")
    assert cfg.attention_head_dim == 8 and cfg.cross_attention_dim == 768
    assert cfg.block_out_channels == (320, 640, 1280, 1280)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.fixture
def small_model():
    return UNet2DConditionModel.from_config(dict(SMALL)).eval()


def test_wrong_text_width(small_model):
    with pytest.raises(ValueError, match=r"encoder_hidden_states of shape \(1, M, 24\).*found \(1, 77, 768\)"):
        small_model(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 768))


def test_text_batch_mismatch(small_model):
    with pytest.raises(ValueError, match=r"repeat it to the batch size"):
        small_model(torch.randn(2, 4, 8, 8), 1, torch.randn(1, 7, 24))


def test_wrong_sample_channels(small_model):
    with pytest.raises(ValueError, match=r"sample of shape \(B, 4, h, w\), found \(1, 3, 64, 64\)"):
        small_model(torch.randn(1, 3, 64, 64), 1, torch.randn(1, 7, 24))


def test_wrong_timestep_shape(small_model):
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(2,\).*found shape \(3,\)"):
        small_model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(2, 7, 24))


def test_unknown_key_and_bad_block_types():
    with pytest.raises(ValueError, match=r"does not implement the config key\(s\) \['not_a_key'\]"):
        UNet2DConditionModel.from_config({**SMALL, "not_a_key": 1})
    with pytest.raises(ValueError, match=r"block type\(s\) \['SimpleCrossAttnDownBlock2D'\] in down_block_types"):
        UNet2DConditionModel.from_config({**SMALL, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match=r"as many down_block_types and up_block_types as block_out_channels \(2\), found 2 and 1"):
        UNet2DConditionModel.from_config({**SMALL, "up_block_types": ["UpBlock2D"]})
    with pytest.raises(ValueError, match=r"attention_head_dim to be one int or a list of 2"):
        UNet2DConditionModel.from_config({**SMALL, "attention_head_dim": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"cross_attention_dim to be one int"):
        UNet2DConditionModel.from_config({**SMALL, "cross_attention_dim": [8, 8]})
