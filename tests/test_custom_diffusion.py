"""Custom Diffusion's files against diffusers on a small random SD model: the attention weights saved by diffusers'
own CustomDiffusionAttnProcessor (random, to_q/to_out too) and the `<new1>` token, loaded by minidiff to the same
images; files saved by minidiff loaded by diffusers; clear errors for other files."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from fake_checkpoints import make_fake_sd
from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff
from minidiff import StableDiffusionPipeline
from minidiff.loaders import load_attn_procs, save_attn_procs

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(num_inference_steps=3, output_type="np")
PROMPT = "a <new1> circle"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    return make_fake_sd(tmp_path_factory.mktemp("sd"), reference_dir)


def pair(folder):
    return load_minidiff(StableDiffusionPipeline, folder), load_diffusers("StableDiffusionPipeline", folder)


def diffusers_custom_diffusion(ref, train_q_out: bool, seed: int = 0):
    """Put diffusers' Custom Diffusion processors on `ref`'s UNet, as its training script does, with random weights."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    procs = {}
    for name in ref.unet.attn_processors:
        attn = ref.unet.get_submodule(name.removesuffix(".processor"))
        cross = name.endswith("attn2.processor")
        procs[name] = CustomDiffusionAttnProcessor(
            train_kv=cross, train_q_out=cross and train_q_out, hidden_size=attn.to_k.out_features if cross else None,
            cross_attention_dim=attn.to_k.in_features if cross else None)
    ref.unet.set_attn_processor(procs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proc in ref.unet.attn_processors.values():
            for p in proc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def write_token(folder, seed: int = 0) -> None:
    """diffusers' train_custom_diffusion.py save_new_embed: <new1>.bin = {"<new1>": (D,)}."""
    torch.save({"<new1>": torch.randn(32, generator=gen(seed)) / 32 ** 0.5}, os.path.join(folder, "<new1>.bin"))


@pytest.mark.parametrize("train_q_out", [False, True])
def test_diffusers_files_give_the_same_images(sd_folder, tmp_path, train_q_out):
    mine, ref = pair(sd_folder)
    plain = mine(PROMPT, generator=gen(0), **RUN).images
    diffusers_custom_diffusion(ref, train_q_out)
    ref.unet.save_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", safe_serialization=False)
    write_token(tmp_path)
    fresh = load_diffusers("StableDiffusionPipeline", sd_folder)
    fresh.load_textual_inversion(tmp_path, weight_name="<new1>.bin")
    # diffusers 0.42.1 sets the processors it read only when given `_pipeline=` (loaders/unet.py): without it,
    # unet.load_attn_procs(...) as its docstring shows it changes nothing.
    before = fresh(PROMPT, generator=gen(0), **RUN).images
    fresh.unet.load_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin")
    assert max_pixel_diff(fresh(PROMPT, generator=gen(0), **RUN).images, before) == 0
    fresh.unet.load_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=fresh)

    changed = mine.unet.load_attn_procs(tmp_path)          # diffusers' method name; finds pytorch_custom_diffusion_weights.bin
    assert mine.load_textual_inversion(tmp_path, weight_name="<new1>.bin") == ["<new1>"]
    per_layer = 4 if train_q_out else 2
    attn2 = [n for n, _ in mine.unet.named_modules() if n.endswith("attn2")]
    assert len(changed) == per_layer * len(attn2) + (len(attn2) if train_q_out else 0)   # + to_out.0.bias
    a = mine(PROMPT, generator=gen(0), **RUN).images
    assert max_pixel_diff(a, fresh(PROMPT, generator=gen(0), **RUN).images) <= 1 / 255
    assert max_pixel_diff(a, before) > 10 / 255 and max_pixel_diff(a, plain) > 10 / 255


@pytest.mark.parametrize("safe", [False, True])
def test_saved_by_minidiff_loads_in_diffusers(sd_folder, tmp_path, safe):
    mine, ref = pair(sd_folder)
    diffusers_custom_diffusion(ref, train_q_out=False, seed=1)
    ref.unet.save_attn_procs(tmp_path / "ref", safe_serialization=False)
    load_attn_procs(mine.unet, tmp_path / "ref" / "pytorch_custom_diffusion_weights.bin")
    path = save_attn_procs(mine.unet, tmp_path / "mine", safe_serialization=safe)
    name = "pytorch_custom_diffusion_weights." + ("safetensors" if safe else "bin")
    assert os.path.basename(path) == name
    fresh = load_diffusers("StableDiffusionPipeline", sd_folder)
    if safe:
        # diffusers' load_attn_procs needs a processor for every attention layer and safetensors cannot hold the {}
        # that mark the self-attention ones, so diffusers cannot read its own safetensors Custom Diffusion files.
        with pytest.raises(ValueError, match="number of processors"):
            fresh.unet.load_attn_procs(tmp_path / "mine", weight_name=name, _pipeline=fresh)
        again, _ = pair(sd_folder)
        load_attn_procs(again.unet, tmp_path / "mine")
        assert max_pixel_diff(again(PROMPT, generator=gen(2), **RUN).images,
                              mine(PROMPT, generator=gen(2), **RUN).images) == 0
        return
    fresh.unet.load_attn_procs(tmp_path / "mine", weight_name=name, _pipeline=fresh)
    assert max_pixel_diff(mine(PROMPT, generator=gen(2), **RUN).images,
                          fresh(PROMPT, generator=gen(2), **RUN).images) <= 1 / 255


def test_bad_inputs(sd_folder, tmp_path):
    mine, _ = pair(sd_folder)
    before = {k: v.clone() for k, v in mine.unet.state_dict().items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    with pytest.raises(ValueError, match=r"wrong shapes \(1\).*\(320, 768\), the UNet's .*attn2.to_k.weight is \(32, 32\)"):
        load_attn_procs(mine.unet, {key: torch.zeros(320, 768)})
    with pytest.raises(ValueError, match=r"keys that fit no attention layer \(2\).*lora_A.*up_blocks.9"):
        load_attn_procs(mine.unet, {key: torch.zeros(32, 32), "unet.x.lora_A.weight": torch.zeros(4, 32),
                                    key.replace("down_blocks.0", "up_blocks.9"): torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"holds no learned weights"):
        load_attn_procs(mine.unet, {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor": {}})
    assert all(torch.equal(mine.unet.state_dict()[k], v) for k, v in before.items())
    mine.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"unfuse_qkv_projections"):
        load_attn_procs(mine.unet, {key: torch.zeros(32, 32)})
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match=r"pytorch_custom_diffusion_weights.safetensors.*weight_name="):
        load_attn_procs(mine.unet, tmp_path)
