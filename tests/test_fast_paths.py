"""The fast-path switches of issue 7, each against the plain path and, where diffusers has it, against diffusers:
VAE tiling and slicing, fused QKV projections, channels_last, the compile switch and model CPU offload.
fp32 on the CPU, tiny random models (every weight random), a few steps: the file runs in seconds.
"""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from conftest import REFERENCE
from fake_checkpoints import TINY_SD_UNET, TINY_SD_VAE, make_fake_ddpm_cat, make_fake_sd
from helpers import randomize_, rel_err
from minidiff.blocks.layers import Attention

TOL = 1e-5  # fp32 relative error


def small_vae_config(reference_dir) -> dict:
    """The real SD v1-4 VAE config with 32 channels per level: tiles of 64 pixels = 8 latents."""
    config = json.loads((reference_dir / "stable-diffusion-v1-4" / "vae" / "config.json").read_text())
    return {**config, **TINY_SD_VAE}


def vae_pair(reference_dir, seed=0):
    theirs = randomize_(diffusers.AutoencoderKL.from_config(small_vae_config(reference_dir)), seed=seed).eval()
    ours = minidiff.AutoencoderKL.from_config(small_vae_config(reference_dir)).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# --- VAE tiling and slicing ------------------------------------------------------------------------------
@torch.no_grad()
def test_tiled_decode_and_encode_equal_diffusers(reference_dir):
    ours, theirs = vae_pair(reference_dir)
    assert ours.tile_latent_size == theirs.tile_latent_min_size == 8
    assert ours.tile_sample_size == theirs.tile_sample_min_size == 64
    for vae in (ours, theirs):
        vae.enable_tiling()
    # 20 latents: tiles at 0, 6, 12, 18 (stride 3/4 of 8), the last ones cut short by the edge
    z = torch.randn(1, 4, 20, 14)
    a, b = ours.decode(z).sample, theirs.decode(z).sample
    assert a.shape == b.shape == (1, 3, 160, 112)
    assert rel_err(a, b) < TOL
    x = torch.rand(1, 3, 160, 120) * 2 - 1                      # tiles of 64 pixels, 48 apart
    a, b = ours.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.mean
    assert a.shape == b.shape
    assert rel_err(a, b) < TOL
    # tiling and slicing together: each image of the batch in tiles
    for vae in (ours, theirs):
        vae.enable_slicing()
    z = torch.randn(2, 4, 12, 12)
    assert rel_err(ours.decode(z).sample, theirs.decode(z).sample) < TOL


@torch.no_grad()
def test_tiling_changes_nothing_up_to_one_tile_and_is_off_by_default(reference_dir):
    ours, _ = vae_pair(reference_dir)
    assert not ours.use_tiling
    z = torch.randn(1, 4, 8, 8)                                 # exactly one tile
    plain = ours.decode(z).sample
    ours.enable_tiling()
    assert torch.equal(ours.decode(z).sample, plain)
    # Larger than a tile, tiling does change the image: each tile is decoded from its own latents only (the
    # decoder's mid-block attention sees the whole input), blended at the seams. It must still be an image
    # of the same size and scale, not garbage.
    z = torch.randn(1, 4, 16, 16)
    tiled = ours.decode(z).sample
    ours.disable_tiling()
    plain = ours.decode(z).sample
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert 0.5 < tiled.std() / plain.std() < 2


@torch.no_grad()
def test_slicing_equals_the_whole_batch(reference_dir):
    ours, _ = vae_pair(reference_dir)
    z = torch.randn(3, 4, 8, 8)
    plain = ours.decode(z).sample
    ours.enable_slicing()
    assert rel_err(ours.decode(z).sample, plain) < TOL


# --- fused QKV -------------------------------------------------------------------------------------------
def small_sd_unet_pair(reference_dir):
    config = json.loads((reference_dir / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    config.update(TINY_SD_UNET)
    theirs = randomize_(diffusers.UNet2DConditionModel.from_config(config)).eval()
    ours = minidiff.UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@torch.no_grad()
def test_fused_qkv_equals_unfused_and_diffusers(reference_dir):
    ours, theirs = small_sd_unet_pair(reference_dir)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    reference = theirs(x, 500, encoder_hidden_states=text).sample
    plain = ours(x, 500, encoder_hidden_states=text).sample
    keys = list(ours.state_dict())
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.fuse_projections()
    assert all(layer.fused for layer in layers)
    assert list(ours.state_dict()) == keys                      # the checkpoint keys do not change
    fused = ours(x, 500, encoder_hidden_states=text).sample
    assert rel_err(fused, plain) < TOL
    assert rel_err(fused, reference) < TOL
    for layer in layers:
        layer.unfuse_projections()
    assert not any(layer.fused for layer in layers) and list(ours.state_dict()) == keys
    assert torch.equal(ours(x, 500, encoder_hidden_states=text).sample, plain)


@torch.no_grad()
def test_fused_qkv_with_bias_feature_map_and_cross_attention():
    # the VAE / DDPM form: bias, GroupNorm, (B, C, H, W) input; and a self-attention-sized layer used for
    # cross-attention (context width = query width), which takes the fused k, v
    layer = randomize_(Attention(16, heads=2, dim_head=8, bias=True, norm_groups=4))
    x, context = torch.randn(2, 16, 3, 5), torch.randn(2, 7, 16)
    tokens = torch.randn(2, 9, 16)
    plain_map, plain_cross = layer(x), layer(tokens, context)
    layer.fuse_projections()
    assert rel_err(layer(x), plain_map) < TOL
    assert rel_err(layer(tokens, context), plain_cross) < TOL
    layer.store_attention_probs = True                          # the explicit attention-map path also works fused
    assert rel_err(layer(tokens, context), plain_cross) < TOL
    assert layer.attention_probs.shape == (2, 2, 9, 7)


# --- the pipeline switches ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE} (set MINIDIFF_REFERENCE)")
    return make_fake_sd(tmp_path_factory.mktemp("hub") / "sd", REFERENCE)


def load_sd(folder, cls=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is not None:
            pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            pipe = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_images(pipe, prompts=("a red circle",), size=64, steps=3):
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(list(prompts), num_inference_steps=steps, generator=generators, height=size, width=size,
                output_type="np").images


def test_pipeline_vae_switches_match_diffusers(sd_folder):
    ours, theirs = load_sd(sd_folder), load_sd(sd_folder, diffusers.StableDiffusionPipeline)
    ours.enable_vae_slicing()
    ours.enable_vae_tiling()
    theirs.vae.enable_slicing()      # diffusers 0.42 has these on the VAE only
    theirs.vae.enable_tiling()
    # 96 pixels = 12 latents: larger than the tiny VAE's 8-latent tile, so the decode runs in tiles
    a = sd_images(ours, ("a red circle", "a blue square"), size=96)
    b = sd_images(theirs, ("a red circle", "a blue square"), size=96)
    assert ours.vae.use_slicing and ours.vae.use_tiling
    assert np.abs(a - b).max() <= 1 / 255
    ours.disable_vae_slicing()
    ours.disable_vae_tiling()
    assert not ours.vae.use_slicing and not ours.vae.use_tiling


def test_pipeline_fused_qkv_and_channels_last_give_the_same_image(sd_folder):
    pipe = load_sd(sd_folder)
    plain = sd_images(pipe)
    pipe.fuse_qkv_projections()
    assert np.abs(sd_images(pipe) - plain).max() <= 1 / 255
    pipe.unfuse_qkv_projections()
    pipe.enable_channels_last()
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(sd_images(pipe) - plain).max() <= 1 / 255


def test_compile_switch_traces_the_unet_whole(sd_folder):
    """fullgraph=True: the UNet's forward must trace as one graph (no graph break). The 'eager' backend checks
    that without generating kernels (the Inductor compile itself is measured in benchmarks/bench.py)."""
    torch._dynamo.reset()
    pipe = load_sd(sd_folder)
    plain = sd_images(pipe, steps=2)
    pipe.compile_unet(mode=None, backend="eager")
    assert np.abs(sd_images(pipe, steps=2) - plain).max() <= 1 / 255
    torch._dynamo.reset()


def test_model_cpu_offload(sd_folder):
    pipe = load_sd(sd_folder)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pipe.enable_model_cpu_offload()
        assert pipe.device == torch.device("cpu")               # nothing changed
    # With device="cpu" the offload hooks run but every move is a no-op: the same image, the same device.
    plain = sd_images(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu")
    assert np.abs(sd_images(pipe) - plain).max() == 0
    pipe.disable_model_cpu_offload()
    assert not pipe.unet._forward_pre_hooks and not pipe.vae.decoder._forward_pre_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_cpu_offload_on_a_gpu(sd_folder):
    pipe = load_sd(sd_folder)
    plain = sd_images(pipe)
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cuda" and pipe.unet.device.type == "cpu"
    image = sd_images(pipe)
    assert pipe.text_encoder.device.type == "cpu" and pipe.unet.device.type == "cpu"   # only the VAE ran last
    assert np.abs(image - plain).max() <= 2 / 255


def test_vae_switches_on_a_pipeline_without_vae(tmp_path):
    if not REFERENCE.is_dir():
        pytest.skip("reference configs not found")
    pipe = minidiff.DDPMPipeline.from_pretrained(make_fake_ddpm_cat(tmp_path / "ddpm", REFERENCE))
    with pytest.raises(AttributeError, match="has no VAE"):
        pipe.enable_vae_tiling()
