"""minidiff.AutoencoderKL against diffusers.AutoencoderKL: every weight random, saved by diffusers, loaded
by minidiff; encode (mean, std, samples), decode and forward compared (fp32 relative error < 1e-5)."""

import json
import shutil

import diffusers
import pytest
import torch
from helpers import randomize_, rel_err
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.models.modeling import LEGACY_ATTENTION_NAMES

TOL = 1e-5

CONFIGS = {
    # Stable Diffusion's layout, narrower: 2 ResNets per encoder level, 3 per decoder level
    "sd_style": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    # other channel counts everywhere, one ResNet per level
    "odd_channels": dict(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=3,
        in_channels=1, out_channels=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    # diffusers' defaults: a single level, no down- or upsampling
    "one_level": dict(block_out_channels=(32,), norm_num_groups=8),
}


def make_reference(config: dict, seed: int = 0) -> diffusers.AutoencoderKL:
    return randomize_(diffusers.AutoencoderKL(**config), seed=seed).eval()


def load_pair(config, folder, **save_kwargs):
    ref = make_reference(config)
    ref.save_pretrained(folder, **save_kwargs)
    return ref, minidiff.AutoencoderKL.from_pretrained(folder)


def images_for(config, batch=2, size=16):
    return torch.randn(batch, config.get("in_channels", 3), size, size)


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
    """Rewrite a saved checkpoint with the pre-2023 attention names (to_q -> query, ...), as SD v1's VAE."""
    path = folder / name
    legacy = legacy_names(load_file(str(path)))
    save_file(legacy, str(path), metadata={"format": "pt"})
    return legacy


def assert_same_posterior(mine, ref):
    for name in ("mean", "std", "var", "logvar"):
        assert rel_err(getattr(mine, name), getattr(ref, name)) < TOL, name
    assert rel_err(mine.mode(), ref.mode()) < TOL
    assert rel_err(mine.kl(), ref.kl()) < TOL


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_encode_parity(name, tmp_path):
    config = CONFIGS[name]
    ref, model = load_pair(config, tmp_path)
    assert isinstance(model.config, minidiff.AutoencoderKLConfig)
    x = images_for(config)

    out = model.encode(x)
    assert isinstance(out, minidiff.AutoencoderKLOutput)
    posterior, expected = out.latent_dist, ref.encode(x).latent_dist
    assert isinstance(posterior, minidiff.DiagonalGaussianDistribution)
    assert posterior.mean.shape == expected.mean.shape
    assert expected.mean.abs().max() > 0.1 and (expected.std - 1).abs().max() > 0.01  # real signals
    assert_same_posterior(posterior, expected)
    # KL(q || other) for another posterior, and KL(q || q) = 0
    x2 = images_for(config)
    other, other_ref = model.encode(x2).latent_dist, ref.encode(x2).latent_dist
    assert rel_err(posterior.kl(other), expected.kl(other_ref)) < TOL
    assert posterior.kl(posterior).abs().max() < 1e-5

    # the same generator gives the same sample, whether one generator or one per image
    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert rel_err(sample, expected.sample(torch.Generator().manual_seed(7))) < TOL
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    sample_list = posterior.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
    assert rel_err(sample_list, expected.sample(gens)) < TOL
    # with a list, image 1 is drawn from generator 1 alone: the same as encoding image 1 by itself
    alone = model.encode(x[1:]).latent_dist.sample(torch.Generator().manual_seed(2))
    assert rel_err(sample_list[1:], alone) < TOL
    assert rel_err(sample, sample_list) > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_decode_and_forward_parity(name, tmp_path):
    config = CONFIGS[name]
    ref, model = load_pair(config, tmp_path)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    z = torch.randn(2, config.get("latent_channels", 4), 16 // factor, 16 // factor)

    out = model.decode(z)
    assert isinstance(out, minidiff.DecoderOutput)
    expected = ref.decode(z).sample
    assert out.sample.shape == (2, config.get("out_channels", 3), 16, 16)
    assert expected.abs().max() > 0.1
    assert rel_err(out.sample, expected) < TOL

    x = images_for(config)
    assert rel_err(model(x).sample, ref(x).sample) < TOL
    mine = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    theirs = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    assert rel_err(mine, theirs) < TOL


@torch.no_grad()
def test_slicing_gives_the_same_result(tmp_path):
    config = CONFIGS["sd_style"]
    ref, model = load_pair(config, tmp_path)
    x, z = images_for(config, batch=3), torch.randn(3, 4, 4, 4)
    whole_mean, whole_images = model.encode(x).latent_dist.mean, model.decode(z).sample

    model.enable_slicing()
    assert model.use_slicing
    sliced_mean, sliced_images = model.encode(x).latent_dist.mean, model.decode(z).sample
    assert rel_err(sliced_mean, whole_mean) < TOL
    assert rel_err(sliced_images, whole_images) < TOL
    assert rel_err(sliced_images, ref.decode(z).sample) < TOL
    model.disable_slicing()
    assert not model.use_slicing


@torch.no_grad()
def test_legacy_attention_names(tmp_path):
    config = CONFIGS["sd_style"]
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    legacy = save_with_legacy_names(tmp_path)
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in legacy
    model = minidiff.AutoencoderKL.from_pretrained(tmp_path)
    x = images_for(config)
    assert_same_posterior(model.encode(x).latent_dist, ref.encode(x).latent_dist)
    assert rel_err(model(x).sample, ref(x).sample) < TOL


@torch.no_grad()
def test_bin_variant_dtype_and_use_safetensors(tmp_path):
    config = CONFIGS["odd_channels"]
    x = images_for(config)

    bin_dir = tmp_path / "bin"
    ref, model = load_pair(config, bin_dir, safe_serialization=False)
    assert (bin_dir / "diffusion_pytorch_model.bin").exists()
    assert rel_err(model(x).sample, ref(x).sample) < TOL
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        minidiff.AutoencoderKL.from_pretrained(bin_dir, use_safetensors=True)
    assert rel_err(minidiff.AutoencoderKL.from_pretrained(bin_dir, use_safetensors=False)(x).sample,
                   ref(x).sample) < TOL

    fp16_dir = tmp_path / "fp16"
    ref.half().save_pretrained(fp16_dir, variant="fp16")
    ref.float()
    model = minidiff.AutoencoderKL.from_pretrained(fp16_dir, variant="fp16", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    ref_state = ref.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref_state[key].half()), key
    out = model(x.half()).sample
    assert out.dtype == torch.float16
    assert rel_err(out.float(), ref(x).sample) < 1e-2


def test_config_defaults_and_newer_keys(tmp_path):
    # a config written before diffusers 0.13 has no scaling_factor: SD v1's 0.18215 applies
    old = dict(CONFIGS["odd_channels"], _class_name="AutoencoderKL", _diffusers_version="0.2.2")
    (tmp_path / "config.json").write_text(json.dumps(old))
    state = minidiff.AutoencoderKL.from_config(CONFIGS["odd_channels"]).state_dict()
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = minidiff.AutoencoderKL.from_pretrained(tmp_path)
    assert model.config.scaling_factor == 0.18215
    assert model.config.force_upcast is True

    # what diffusers 0.42 writes, with force_upcast off (a pipeline-only switch)
    ref = diffusers.AutoencoderKL(**CONFIGS["odd_channels"], force_upcast=False, scaling_factor=0.13025)
    ref.save_pretrained(tmp_path / "new")
    written = json.loads((tmp_path / "new" / "config.json").read_text())
    assert {"latents_mean", "shift_factor", "use_quant_conv", "mid_block_add_attention"} <= written.keys()
    model = minidiff.AutoencoderKL.from_pretrained(tmp_path / "new")
    assert model.config.scaling_factor == 0.13025 and model.config.force_upcast is False


def test_bad_inputs_raise_clear_errors():
    model = minidiff.AutoencoderKL.from_config(CONFIGS["sd_style"])
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, H, W\), found \(1, 4, 8, 8\)"):
        model.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, H, W\), found \(1, 3, 8, 8\)"):
        model.decode(torch.randn(1, 3, 8, 8))


@pytest.mark.slow
@torch.no_grad()
def test_real_sd_v1_4_vae_config_in_hub_layout(reference_dir, tmp_path):
    """The exact CompVis/stable-diffusion-v1-4 vae/ config (diffusers 0.2.2, legacy attention names),
    in the repo's folder layout, at 16x16 pixels (2x2 latents)."""
    src = reference_dir / "stable-diffusion-v1-4"
    config = json.loads((src / "vae" / "config.json").read_text())
    with torch.device("meta"):  # skip diffusers' init: randomize_ overwrites every weight anyway
        ref = diffusers.AutoencoderKL.from_config(config)
    randomize_(ref.to_empty(device="cpu")).eval()

    (tmp_path / "vae").mkdir()
    shutil.copy(src / "model_index.json", tmp_path / "model_index.json")
    shutil.copy(src / "vae" / "config.json", tmp_path / "vae" / "config.json")
    save_file(legacy_names(ref.state_dict()), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))

    model = minidiff.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    assert model.config.block_out_channels == (128, 256, 512, 512)
    assert model.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())

    x = torch.randn(1, 3, 16, 16)
    posterior, expected = model.encode(x).latent_dist, ref.encode(x).latent_dist
    assert posterior.mean.shape == (1, 4, 2, 2)
    assert_same_posterior(posterior, expected)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert rel_err(z, expected.sample(torch.Generator().manual_seed(0))) < TOL
    assert rel_err(model.decode(z).sample, ref.decode(z).sample) < TOL
