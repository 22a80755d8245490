"""T2IAdapter against diffusers' with every weight random, its loading (TencentARC's pickled .bin, safetensors), the
UNet's down_intrablock_additional_residuals, and StableDiffusionAdapterPipeline against diffusers'."""

import pytest
import torch
from diffusers import MultiAdapter as RefMultiAdapter
from diffusers import T2IAdapter as RefAdapter
from diffusers import UNet2DConditionModel as RefUNet

from helpers import randomize_, rel_err
from minidiff import UNet2DConditionModel
from minidiff.models.modeling import load_strict
from minidiff.models.t2i_adapter import MultiAdapter, T2IAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

# TencentARC/t2iadapter_*_sd15v2: in_channels 1 (canny, sketch) or 3 (depth, color, keypose, openpose, seg).
SD15_FULL_ADAPTER = dict(channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8,
                         adapter_type="full_adapter")
SMALL = dict(channels=(32, 64, 64), num_res_blocks=2, downscale_factor=2)
SMALL_LIGHT = dict(channels=(32, 64, 64), num_res_blocks=3, downscale_factor=2, adapter_type="light_adapter")


def make_pair(config: dict, tmp_path, seed: int = 0, safe_serialization: bool = True):
    ref = randomize_(RefAdapter(**config), seed=seed).eval()
    ref.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    return T2IAdapter.from_pretrained(tmp_path), ref


@pytest.mark.parametrize("in_channels", [1, 3])
@torch.no_grad()
def test_parity_at_the_sd15_full_adapter_config(in_channels):
    config = dict(SD15_FULL_ADAPTER, in_channels=in_channels)
    ref = randomize_(RefAdapter(**config), seed=in_channels).eval()
    model = T2IAdapter.from_config(config)
    load_strict(model, ref.state_dict(), "diffusers' T2IAdapter at the SD v1.5 full_adapter config")
    image = torch.rand(1, in_channels, 136, 120)                         # 17 x 15 latents: odd sizes
    features, expected = model.eval()(image), ref(image)
    assert [tuple(f.shape) for f in features] == [(1, 320, 17, 15), (1, 640, 9, 8), (1, 1280, 5, 4), (1, 1280, 3, 2)]
    for f, e in zip(features, expected):
        assert e.abs().max() > 0 and rel_err(f, e) <= 1e-4
    print(f"SD v1.5 full_adapter, in_channels {in_channels}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, largest relative error {max(rel_err(f, e) for f, e in zip(features, expected)):.2e}")


@pytest.mark.parametrize("config", [SMALL, SMALL_LIGHT, dict(SMALL_LIGHT, in_channels=1)], ids=["full", "light", "light-1"])
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@torch.no_grad()
def test_parity_and_loading(config, safe_serialization, tmp_path):
    """TencentARC's repos have config.json + a pickled diffusion_pytorch_model.bin, read with weights_only=True."""
    model, ref = make_pair(config, tmp_path, safe_serialization=safe_serialization)
    name = "diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("diffusion")] == [name]
    image = torch.rand(2, config.get("in_channels", 3), 18, 22)
    features, expected = model(image), ref(image)
    levels = 4 if config.get("adapter_type") == "light_adapter" else 3     # light: one more block at the last width
    assert len(features) == len(expected) == levels
    for f, e in zip(features, expected):
        assert f.shape == e.shape and rel_err(f, e) < 1e-5


@torch.no_grad()
def test_multi_adapter_weights_the_features(tmp_path):
    (a, ref_a), (b, ref_b) = make_pair(SMALL, tmp_path / "a", seed=1), make_pair(SMALL, tmp_path / "b", seed=2)
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    for weights in (None, [0.25, 1.5]):
        ours = MultiAdapter([a, b])([x, y], weights)
        theirs = RefMultiAdapter([ref_a, ref_b])([x, y], weights)
        for f, e in zip(ours, theirs):
            assert rel_err(f, e) < 1e-6
    with pytest.raises(ValueError, match="one condition image and one weight per adapter"):
        MultiAdapter([a, b])([x], [0.5, 0.5])


UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
            attention_head_dim=(2, 4, 8), sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.mark.parametrize("down_block_types, first_size", [
    (UNET["down_block_types"], (9, 11)),                            # SD's layout: the feature before the downsampler
    (("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), (5, 6)),   # plain block first: after it, in place
])
@torch.no_grad()
def test_unet_adds_the_features_where_diffusers_does(down_block_types, first_size, tmp_path):
    config = dict(UNET, down_block_types=down_block_types)
    ref = randomize_(RefUNet(**config)).eval()
    ref.save_pretrained(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, text = torch.randn(2, 4, 9, 11), torch.randn(2, 7, 16)
    features = [torch.randn(2, 32, *first_size), torch.randn(2, 64, 5, 6), torch.randn(2, 64, 3, 3)]
    out = unet(sample, 3, text, down_intrablock_additional_residuals=features).sample
    # diffusers pops from the list and adds in place: give it copies
    expected = ref(sample, 3, text, down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, unet(sample, 3, text).sample) > 1e-3
    with pytest.raises(ValueError, match="Expected 3 down_intrablock_additional_residuals"):
        unet(sample, 3, text, down_intrablock_additional_residuals=features[:2])


@torch.no_grad()
def test_adapter_features_steer_the_unet_as_in_diffusers(tmp_path):
    """Adapter -> UNet end to end: the adapter's 3 features for a 3-block UNet (32, 64, 64), 2x unshuffle."""
    ref_unet = randomize_(RefUNet(**UNET), seed=4).eval()
    ref_unet.save_pretrained(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    adapter, ref_adapter = make_pair(dict(SMALL, downscale_factor=1), tmp_path / "adapter")
    image, sample, text = torch.rand(2, 3, 9, 11), torch.randn(2, 4, 9, 11), torch.randn(2, 7, 16)
    out = unet(sample, 9, text, down_intrablock_additional_residuals=adapter(image)).sample
    expected = ref_unet(sample, 9, text, down_intrablock_additional_residuals=ref_adapter(image)).sample
    assert rel_err(out, expected) < 1e-5


def test_bad_inputs_are_refused():
    adapter = T2IAdapter.from_config(dict(SMALL, in_channels=1))
    with pytest.raises(ValueError, match=r"shape \(B, 1, H, W\).*found \(1, 3, 16, 16\).*grayscale"):
        adapter(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        adapter(torch.rand(1, 1, 15, 16))
    with pytest.raises(ValueError, match="full_adapter_xl"):
        T2IAdapter.from_config(dict(SMALL, adapter_type="full_adapter_xl"))
    light = T2IAdapter.from_config(SMALL_LIGHT)
    with pytest.raises(ValueError, match="shrink the image the same way"):
        MultiAdapter([adapter, light])
