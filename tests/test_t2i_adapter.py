"""T2IAdapter against diffusers' with every weight random, its loading (TencentARC's pickled .bin, safetensors), the
UNet's down_intrablock_additional_residuals, and StableDiffusionAdapterPipeline against diffusers'."""

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import MultiAdapter as RefMultiAdapter
from diffusers import T2IAdapter as RefAdapter
from diffusers import UNet2DConditionModel as RefUNet

import minidiff
from fake_checkpoints import make_fake_sd
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet, randomize_, rel_err
from minidiff import UNet2DConditionModel
from minidiff.control.t2i_adapter import StableDiffusionAdapterPipeline
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


# --- StableDiffusionAdapterPipeline against diffusers' on a small random SD model ------------------------------------
STEPS = 4
TINY_UNET_WIDTHS = [32, 32, 64, 64]   # tests/fake_checkpoints.TINY_SD_UNET


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    """A small SD v1 look-alike (64x64 pixels, every weight random) and two adapters for its UNet, saved as
    TencentARC's are (config.json + a pickled .bin): a 1-channel full adapter and a 3-channel light adapter."""
    root = tmp_path_factory.mktemp("adapter_sd")
    make_fake_sd(root / "sd", reference_dir)
    randomize_(RefAdapter(in_channels=1, channels=TINY_UNET_WIDTHS, num_res_blocks=2, downscale_factor=8),
               seed=20).save_pretrained(root / "adapter_0", safe_serialization=False)
    randomize_(RefAdapter(in_channels=3, channels=TINY_UNET_WIDTHS[:3], num_res_blocks=2, downscale_factor=8,
                          adapter_type="light_adapter"), seed=21).save_pretrained(root / "adapter_1",
                                                                                   safe_serialization=False)
    return root


def adapters(root, k):
    return T2IAdapter.from_pretrained(root / f"adapter_{k}"), RefAdapter.from_pretrained(root / f"adapter_{k}").eval()


def condition(seed, size=64, mode="L"):
    channels = 3 if mode == "RGB" else 1
    pixels = (np.random.RandomState(seed).rand(size, size, channels) * 255).astype(np.uint8)
    return Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode=mode)


@pytest.fixture(scope="module")
def pipes(sd_folder):
    ours, theirs = adapters(sd_folder, 0)
    return (load_minidiff(StableDiffusionAdapterPipeline, str(sd_folder / "sd"), adapter=ours),
            load_diffusers("StableDiffusionAdapterPipeline", str(sd_folder / "sd"), adapter=theirs))


@pytest.mark.parametrize("options", [
    dict(),
    dict(adapter_conditioning_scale=0.4),
    dict(guidance_scale=1.0),
    dict(image=torch.rand(1, 1, 64, 64)),
    dict(num_images_per_prompt=2, generator=gens(0, 1)),
    dict(negative_prompt="a green triangle", output_type="pil"),
], ids=["plain", "scale", "no-cfg", "tensor", "two-images", "negative-pil"])
def test_pipeline_parity(pipes, options):
    ours, theirs = pipes
    call = dict(prompt="a red circle", image=condition(0), num_inference_steps=STEPS, generator=gen(0),
                output_type="np")
    call.update(options)
    theirs_gen = gens(0, 1) if isinstance(call["generator"], list) else gen(0)
    a = ours(**call).images
    b = theirs(**{**call, "generator": theirs_gen}).images
    diff = max_pixel_diff(a, b)
    print(f"adapter pipeline {options}: max pixel difference {diff:.2e}")
    assert diff <= 1 / 255


def test_two_adapters_parity(sd_folder):
    (a0, r0), (a1, r1) = adapters(sd_folder, 0), adapters(sd_folder, 1)
    ours = load_minidiff(StableDiffusionAdapterPipeline, str(sd_folder / "sd"), adapter=[a0, a1])
    theirs = load_diffusers("StableDiffusionAdapterPipeline", str(sd_folder / "sd"), adapter=RefMultiAdapter([r0, r1]))
    call = dict(prompt="a red circle", image=[condition(0), condition(1, mode="RGB")], num_inference_steps=STEPS,
                output_type="np", adapter_conditioning_scale=[0.7, 1.3])
    a, b = ours(**call, generator=gen(0)).images, theirs(**call, generator=gen(0)).images
    diff = max_pixel_diff(a, b)
    print(f"two adapters: max pixel difference {diff:.2e}")
    assert diff <= 1 / 255
    alone = ours(**{**call, "adapter_conditioning_scale": [0.7, 0.0]}, generator=gen(0)).images
    assert max_pixel_diff(a, alone) > 0.01                         # the second adapter changes the image


def test_the_adapter_acts_once_and_vanishes_at_scale_zero(pipes):
    ours, _ = pipes
    runs = []
    hook = ours.adapter.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        call = dict(prompt="a red circle", image=condition(0), num_inference_steps=STEPS, output_type="np")
        steered = ours(**call, generator=gen(0)).images
        assert len(runs) == 1                                      # once per call, not once per step
        off = ours(**call, adapter_conditioning_scale=0.0, generator=gen(0)).images
    finally:
        hook.remove()
    plain = quiet(minidiff.StableDiffusionPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet,
                                                   ours.scheduler))
    assert max_pixel_diff(steered, off) > 0.01
    assert max_pixel_diff(off, plain("a red circle", num_inference_steps=STEPS, output_type="np",
                                     generator=gen(0)).images) < 1e-6


def test_intermediates_and_callback(pipes):
    ours, _ = pipes
    seen = []
    out = ours("a red circle", image=condition(0), num_inference_steps=STEPS, output_type="latent", generator=gen(0),
               return_intermediates=True, callback=lambda i, t, latents, x0: seen.append(i))
    steps = len(ours.scheduler.timesteps)
    assert seen == list(range(steps)) and torch.equal(out.intermediates.latents[-1], out.images)


@pytest.mark.parametrize("call, message", [
    (dict(image=None), "needs image="),
    (dict(image=condition(0, mode="RGB")), r"image has 3 channel\(s\), the model reads 1.*convert\('L'\)"),
    (dict(image=condition(0, size=48), height=64), r"image is 48x48 .* the images to generate are 64x48"),
    (dict(image=[condition(0)] * 2), "2 condition images for 1 prompt"),
    (dict(adapter_conditioning_scale=[0.5, 0.5]), "adapter_conditioning_scale must be one number"),
])
def test_bad_inputs_are_refused_before_any_work(pipes, call, message):
    ours, _ = pipes
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in (ours.unet, ours.text_encoder, ours.adapter)]
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            ours(**{**dict(prompt="a red circle", image=condition(0), num_inference_steps=1, output_type="latent"),
                    **call})
        assert not calls, "the error came after the pipeline had started working"
    finally:
        for hook in hooks:
            hook.remove()


def test_mismatched_adapters_are_refused(sd_folder, pipes):
    ours, _ = pipes
    (a0, _), (a1, _) = adapters(sd_folder, 0), adapters(sd_folder, 1)
    pipe = StableDiffusionAdapterPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet, [a0, a1],
                                          ours.scheduler)
    with pytest.raises(ValueError, match="With 2 adapters, image must be a list of 2 conditions"):
        pipe("a red circle", image=condition(0), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"one number per adapter \(2\)"):
        pipe("a red circle", image=[condition(0), condition(1, mode="RGB")], num_inference_steps=1,
             adapter_conditioning_scale=[1.0])
    sd21_widths = T2IAdapter.from_config(dict(SD15_FULL_ADAPTER, in_channels=1))
    with pytest.raises(ValueError, match="adapter was built for another UNet"):
        StableDiffusionAdapterPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet, sd21_widths,
                                       ours.scheduler)


def test_loads_an_adapter_pipeline_folder(pipes, tmp_path):
    """A folder saved by diffusers' StableDiffusionAdapterPipeline names adapter = T2IAdapter."""
    _, theirs = pipes
    theirs.save_pretrained(tmp_path)
    pipe = load_minidiff(minidiff.DiffusionPipeline, str(tmp_path))
    assert type(pipe).__name__ == "StableDiffusionAdapterPipeline" and isinstance(pipe.adapter, T2IAdapter)
