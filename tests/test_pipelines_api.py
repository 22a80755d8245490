"""Pipelines beyond parity: per-step visibility, determinism, output types, devices and dtypes, loading,
and a clear error for every bad input."""

import json
import os
import shutil
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from conftest import REFERENCE
from fake_checkpoints import make_fake_ddpm_cat, make_fake_sd
from minidiff.schedulers.base import predict_x0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE} (set MINIDIFF_REFERENCE)")
    root = tmp_path_factory.mktemp("hub")
    return {"ddpm": make_fake_ddpm_cat(root / "ddpm-cat-256", REFERENCE),
            "sd": make_fake_sd(root / "stable-diffusion-v1-4", REFERENCE)}


def load(folder, cls=minidiff.DiffusionPipeline, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(folders):
    return load(folders["sd"])


@pytest.fixture(scope="module")
def ddpm(folders):
    return load(folders["ddpm"])


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- per-step visibility ------------------------------------------------------------------------------
def test_callback_and_intermediates(sd):
    calls = []

    def callback(i, t, latents, x0):
        calls.append((i, t, latents.clone(), x0.clone()))

    out = sd("a cat", num_inference_steps=4, generator=gens(0), output_type="latent", callback=callback,
             return_intermediates=True)
    timesteps = sd.scheduler.timesteps
    steps = len(timesteps)
    assert [c[0] for c in calls] == list(range(steps))
    assert all(torch.equal(c[1], t) for c, t in zip(calls, timesteps))
    inter = out.intermediates
    assert len(inter.latents) == len(inter.x0) == len(inter.timesteps) == steps
    assert inter.initial_latents.shape == (1, 4, 8, 8)
    for c, latents, x0 in zip(calls, inter.latents, inter.x0):
        assert latents.shape == x0.shape == (1, 4, 8, 8)
        assert torch.equal(c[2], latents) and torch.equal(c[3], x0)
    # The last step's latents are the output, and the stored tensors are copies, not the loop's tensors.
    assert torch.equal(inter.latents[-1], out.images)
    out.images.add_(1.0)
    assert not torch.equal(inter.latents[-1], out.images)


def test_x0_from_eps_matches_a_scheduler_that_returns_x0():
    """predict_x0 (used for PNDM, which returns no x0) equals DDIM's own x0 on the same inputs."""
    ddim = minidiff.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False)
    ddim.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in ddim.timesteps[[0, 4, 9]]:
        expected = ddim.step(eps, t, sample).pred_original_sample
        assert torch.allclose(predict_x0(ddim, sample, eps, t), expected, atol=1e-5, rtol=1e-5)


def test_pndm_intermediates_use_the_x0_formula(sd):
    assert isinstance(sd.scheduler, minidiff.PNDMScheduler)
    out = sd("a cat", num_inference_steps=3, generator=gens(1), return_intermediates=True, output_type="latent")
    # Near the end of sampling, the x0 estimate and the latents agree far better than at the start.
    first = (out.intermediates.x0[0] - out.intermediates.latents[0]).abs().mean()
    last = (out.intermediates.x0[-1] - out.intermediates.latents[-1]).abs().mean()
    assert torch.isfinite(torch.stack(out.intermediates.x0)).all()
    assert last < first


def test_ddpm_callback_and_intermediates(ddpm):
    seen = []
    out = ddpm(batch_size=2, generator=gens(0, 1), num_inference_steps=5, output_type="pt",
               callback=lambda i, t, x, x0: seen.append(i), return_intermediates=True)
    assert seen == [0, 1, 2, 3, 4]
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.allclose(out.images, (out.intermediates.latents[-1] / 2 + 0.5).clamp(0, 1))
    # DDPM's x0 is clipped to [-1, 1] (clip_sample in ddpm-cat-256's scheduler config).
    assert out.intermediates.x0[0].abs().max() <= 1.0


# --- determinism --------------------------------------------------------------------------------------
def test_image_i_of_a_batch_equals_the_image_made_alone(sd, ddpm):
    batch = sd(["a cat", "a dog"], num_images_per_prompt=2, generator=gens(10, 11, 12, 13), num_inference_steps=3,
               output_type="np").images
    alone = sd("a dog", generator=gens(12), num_inference_steps=3, output_type="np").images
    assert np.abs(batch[2] - alone[0]).max() <= 1 / 255
    assert np.abs(batch[2] - batch[3]).max() > 1 / 255  # another seed, another image

    batch = ddpm(batch_size=3, generator=gens(4, 5, 6), num_inference_steps=4, output_type="np").images
    alone = ddpm(batch_size=1, generator=gens(5), num_inference_steps=4, output_type="np").images
    assert np.abs(batch[1] - alone[0]).max() <= 1 / 255


def test_same_seed_same_image_and_given_latents(sd):
    a = sd("a cat", generator=gens(3), num_inference_steps=3, output_type="pt").images
    b = sd("a cat", generator=gens(3), num_inference_steps=3, output_type="pt").images
    assert torch.equal(a, b)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    c = sd("a cat", latents=latents, num_inference_steps=3, output_type="pt").images
    assert torch.equal(a, c)  # the generator's first draw is exactly these latents


# --- outputs ------------------------------------------------------------------------------------------
def test_output_types(sd, ddpm):
    kwargs = dict(num_inference_steps=2, height=48, width=32)
    pil = sd("a cat", generator=gens(0), **kwargs).images
    np_ = sd("a cat", generator=gens(0), output_type="np", **kwargs).images
    pt = sd("a cat", generator=gens(0), output_type="pt", **kwargs).images
    latent = sd("a cat", generator=gens(0), output_type="latent", **kwargs).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 48)
    assert np_.shape == (1, 48, 32, 3) and np_.dtype == np.float32 and 0 <= np_.min() and np_.max() <= 1
    assert pt.shape == (1, 3, 48, 32)
    assert latent.shape == (1, 4, 6, 4)
    assert np.array_equal(np.asarray(pil[0]), (np_[0] * 255).round().astype(np.uint8))
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_)
    assert ddpm(generator=gens(0), num_inference_steps=2).images[0].size == (32, 32)


def test_guidance_off_runs_one_unet_pass(sd):
    batch_sizes = []
    handle = sd.unet.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        sd("a cat", guidance_scale=1.0, num_inference_steps=2, generator=gens(0), output_type="latent")
        sd("a cat", guidance_scale=7.5, num_inference_steps=2, generator=gens(0), output_type="latent")
    finally:
        handle.remove()
    assert batch_sizes[0] == 1 and batch_sizes[-1] == 2


def test_progress_bar_switch(sd, capsys):
    sd.set_progress_bar_config()
    sd("a cat", num_inference_steps=2, generator=gens(0), output_type="latent")
    err = capsys.readouterr().err
    assert "100%" in err and ("it/s" in err or "s/it" in err)
    sd.set_progress_bar_config(disable=True)
    sd("a cat", num_inference_steps=2, generator=gens(0), output_type="latent")
    assert capsys.readouterr().err == ""


# --- devices and dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_on_cpu(folders, sd, dtype):
    """PyTorch 2.13 has CPU kernels for every layer in half precision, so minidiff does not refuse it."""
    pipe = load(folders["sd"], torch_dtype=dtype)
    assert pipe.dtype == dtype and pipe.text_encoder.dtype == dtype and pipe.vae.dtype == dtype
    assert pipe.device == torch.device("cpu")
    if dtype == torch.float16:
        with pytest.warns(UserWarning, match="float16 on the CPU"):
            half = pipe("a cat", generator=gens(0), num_inference_steps=3, output_type="np").images
    else:
        half = pipe("a cat", generator=gens(0), num_inference_steps=3, output_type="np").images
    full = sd("a cat", generator=gens(0), num_inference_steps=3, output_type="np").images
    assert np.isfinite(half).all()
    assert np.abs(half - full).mean() < 0.02  # rounding, not a different image
    back = pipe.to(torch.float32)
    assert back is pipe and pipe.dtype == torch.float32 and pipe.vae.dtype == torch.float32


# --- loading ------------------------------------------------------------------------------------------
def test_fake_folders_have_the_hub_layout(folders):
    from safetensors import safe_open

    sd, ddpm = folders["sd"], folders["ddpm"]
    index = json.loads((sd / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    for path in ["unet/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                 "feature_extractor/preprocessor_config.json"]:
        assert (sd / path).is_file(), path
    assert sorted(os.listdir(ddpm)) == ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                                        "scheduler_config.json"]
    # Pre-2023 attention names, as in the real VAE and ddpm-cat-256 files.
    for path in (sd / "vae" / "diffusion_pytorch_model.safetensors", ddpm / "diffusion_pytorch_model.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        assert any(".attentions.0.query.weight" in k for k in keys)
        assert any(".attentions.0.proj_attn.bias" in k for k in keys)
        assert not any(".to_q." in k for k in keys)


def test_from_pretrained_picks_the_class(folders):
    with pytest.warns(UserWarning, match="minidiff does not load them"):
        pipe = minidiff.DiffusionPipeline.from_pretrained(folders["sd"])
    assert type(pipe) is minidiff.StableDiffusionPipeline
    ddpm = minidiff.DiffusionPipeline.from_pretrained(folders["ddpm"])  # flat layout, no warning
    assert type(ddpm) is minidiff.DDPMPipeline and isinstance(ddpm.scheduler, minidiff.DDPMScheduler)
    assert type(load(folders["ddpm"], minidiff.DDPMPipeline)) is minidiff.DDPMPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # safety_checker=None says "I know": no warning
        minidiff.StableDiffusionPipeline.from_pretrained(folders["sd"], safety_checker=None,
                                                         feature_extractor=None)


def test_built_from_parts_and_scheduler_swap(sd):
    pipe = minidiff.StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                            unet=sd.unet, scheduler=sd.scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = minidiff.UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    out = pipe("a cat", num_inference_steps=3, generator=gens(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_from_pretrained_with_a_given_component(folders):
    given = minidiff.DDIMScheduler.from_pretrained(folders["sd"], subfolder="scheduler")
    pipe = load(folders["sd"], minidiff.StableDiffusionPipeline, scheduler=given)
    assert pipe.scheduler is given


def test_hub_repo_id_downloads_only_what_is_loaded(folders, monkeypatch, tmp_path):
    """A hub id goes through huggingface_hub; the safety checker (1.2 GB in the real repo) is never fetched."""
    import fnmatch

    import huggingface_hub

    requested = []

    def fake_snapshot_download(repo_id, allow_patterns, cache_dir=None, local_files_only=False):
        requested.extend(allow_patterns)
        dest = tmp_path / "snapshot"
        for root, _, files in os.walk(folders["sd"]):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), folders["sd"]).replace(os.sep, "/")
                if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                    os.makedirs(dest / os.path.dirname(rel), exist_ok=True)
                    shutil.copy(os.path.join(root, f), dest / rel)
        return str(dest)

    def fake_hf_hub_download(repo_id, filename, subfolder=None, cache_dir=None, local_files_only=False):
        os.makedirs(tmp_path / "snapshot", exist_ok=True)
        return shutil.copy(folders["sd"] / filename, tmp_path / "snapshot" / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    with pytest.warns(UserWarning):
        pipe = minidiff.DiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    assert type(pipe) is minidiff.StableDiffusionPipeline
    assert not any(p.startswith(("safety_checker", "feature_extractor")) for p in requested)
    assert not (tmp_path / "snapshot" / "safety_checker").exists()
    assert "unet/diffusion_pytorch_model.safetensors" in requested


# --- bad input, clear errors --------------------------------------------------------------------------
def edited_copy(folder, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    edit(index)
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_loading_errors(folders, tmp_path):
    def unknown_scheduler(index):
        index["scheduler"] = ["diffusers", "LMSDiscreteScheduler"]

    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*minidiff has"):
        load(edited_copy(folders["sd"], tmp_path / "a", unknown_scheduler))

    def unknown_pipeline(index):
        index["_class_name"] = "StableDiffusionXLPipeline"

    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load(edited_copy(folders["sd"], tmp_path / "b", unknown_pipeline))

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load(folders["sd"] / "unet")
    with pytest.raises(ValueError, match="names no \\['vae', 'text_encoder', 'tokenizer'\\]"):
        load(folders["ddpm"], minidiff.StableDiffusionPipeline)
    with pytest.raises(TypeError, match="unknown component"):
        load(folders["ddpm"], unet_2=None)


def test_bad_call_arguments(sd, ddpm):
    kwargs = dict(num_inference_steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        sd("a cat", height=60, **kwargs)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        sd("a cat", num_images_per_prompt=3, generator=gens(0, 1), **kwargs)
    with pytest.raises(ValueError, match="4 generators for 3 images"):
        sd(["a", "b", "c"], generator=gens(0, 1, 2, 3), **kwargs)
    with pytest.raises(TypeError, match="torch.Generator"):
        sd("a cat", generator=0, **kwargs)
    with pytest.raises(ValueError, match="output_type must be one of"):
        sd("a cat", output_type="jpeg", **kwargs)
    with pytest.raises(ValueError, match="latents must have shape \\(1, 4, 8, 8\\)"):
        sd("a cat", latents=torch.randn(1, 4, 16, 16), **kwargs)
    with pytest.raises(TypeError, match="prompt must be a string"):
        sd(7, **kwargs)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        sd(["a", "b", "c"], negative_prompt=["x", "y"], **kwargs)
    with pytest.raises(ValueError, match="output_type must be one of \\['pil', 'np', 'pt'\\]"):
        ddpm(output_type="latent", **kwargs)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        ddpm(batch_size=2, generator=gens(0, 1, 2), **kwargs)


def test_bad_img2img_arguments(sd):
    pipe = minidiff.StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 64, 64)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
            pipe("a cat", image=image, strength=strength)
    with pytest.raises(ValueError, match="runs no step"):
        pipe("a cat", image=image, strength=0.1, num_inference_steps=5)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        pipe("a cat", image=image * 2 - 1, num_inference_steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a cat", image=torch.rand(1, 3, 60, 64), num_inference_steps=2)
    with pytest.raises(TypeError, match="PIL image"):
        pipe("a cat", image="photo.png", num_inference_steps=2)
    with pytest.raises(ValueError, match="2 images for 3 outputs"):
        pipe(["a", "b", "c"], image=torch.rand(2, 3, 64, 64), num_inference_steps=2)
