"""Pipelines against diffusers: the tutorial excerpts of issue 4 run with `from minidiff import` and give the
same images as diffusers on the same checkpoint folder and seeds (fp32 CPU: max pixel difference <= 1/255).

The folders are tiny random look-alikes of google/ddpm-cat-256 and CompVis/stable-diffusion-v1-4 in the
exact hub layout (tests/fake_checkpoints.py), 32x32 and 64x64 pixels, with a few steps, so the whole
file runs in seconds.
"""

import diffusers
import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

import minidiff
from fake_checkpoints import make_fake_ddpm_cat, make_fake_sd
from helpers import as_tensor, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet

PIXEL = 1 / 255  # the bound on the largest pixel difference (images in [0, 1])
SCHEDULER_NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
# The samplers diffusers' DDPMPipeline can serve as a reference for: it passes generator= to step(), which
# its PNDM and UniPC reject, and it neither multiplies the start noise by init_noise_sigma nor calls
# scale_model_input, which Euler-type samplers need (minidiff's DDPMPipeline does both).
DDPM_PIPELINE_SCHEDULER_NAMES = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]


def scheduler_pair(name):
    """(minidiff class, diffusers class) of one scheduler name; skips while minidiff's has not landed."""
    ours = getattr(minidiff.schedulers, name, None)
    if ours is None:
        pytest.skip(f"minidiff.schedulers.{name} has not landed yet")
    return ours, getattr(diffusers, name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, reference_dir):
    root = tmp_path_factory.mktemp("hub")
    return {"ddpm": make_fake_ddpm_cat(root / "ddpm-cat-256", reference_dir),
            "sd": make_fake_sd(root / "stable-diffusion-v1-4", reference_dir)}


@pytest.fixture(scope="module")
def sd_pair(folders):
    """(minidiff, diffusers) text-to-image pipelines on the fake SD folder."""
    return (load_minidiff(minidiff.StableDiffusionPipeline, folders["sd"]),
            load_diffusers("StableDiffusionPipeline", folders["sd"]))


def assert_not_flat(images):
    """Random weights can saturate an image; a comparison of two flat images proves little."""
    assert float(np.asarray(images).std()) > 0.02


# --- the tutorial excerpts ----------------------------------------------------------------------------
def ddpm_tutorial(lib, folder):
    """README of diffusers: build your own diffusion system from a UNet and a scheduler."""
    scheduler = lib.DDPMScheduler.from_pretrained(folder)
    model = lib.UNet2DModel.from_pretrained(folder).to("cpu")
    scheduler.set_timesteps(50)
    torch.manual_seed(0)
    noise = torch.randn((1, 3, model.config.sample_size, model.config.sample_size), device="cpu")
    input = noise
    for t in scheduler.timesteps:
        with torch.no_grad():
            noisy_residual = model(input, t).sample
        previous_noisy_sample = scheduler.step(noisy_residual, t, input).prev_sample
        input = previous_noisy_sample
    return (input / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_tutorial_ddpm_loop(folders):
    ours, theirs = ddpm_tutorial(minidiff, folders["ddpm"]), ddpm_tutorial(diffusers, folders["ddpm"])
    assert_not_flat(ours)
    assert max_pixel_diff(ours, theirs) <= PIXEL


def sd_tutorial(lib, folder, scheduler_name="UniPCMultistepScheduler"):
    """diffusers' "Deconstruct the Stable Diffusion pipeline" tutorial, on a 64x64 image with 5 steps."""
    vae = lib.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    unet = lib.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = getattr(lib, scheduler_name).from_pretrained(folder, subfolder="scheduler")
    torch_device = "cpu"

    prompt = ["a photograph of an astronaut riding a horse"]
    height, width = 64, 64
    num_inference_steps = 5
    guidance_scale = 7.5
    generator = torch.manual_seed(0)
    batch_size = len(prompt)

    text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        text_embeddings = text_encoder(text_input.input_ids.to(torch_device))[0]
    max_length = text_input.input_ids.shape[-1]
    uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
    uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]
    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

    latents = torch.randn((batch_size, unet.config.in_channels, height // 8, width // 8), generator=generator,
                          device=torch_device)
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep=t)
        with torch.no_grad():
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    with torch.no_grad():
        image = vae.decode(latents / 0.18215).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_tutorial_sd_manual_loop(folders):
    scheduler_pair("UniPCMultistepScheduler")
    ours, theirs = sd_tutorial(minidiff, folders["sd"]), sd_tutorial(diffusers, folders["sd"])
    assert_not_flat(ours)
    assert max_pixel_diff(ours, theirs) <= PIXEL


def test_tutorial_pipeline_generator_lists(folders):
    """diffusers' "Effective and efficient diffusion" tutorial: four seeds, then four prompts with one seed."""
    with pytest.warns(UserWarning, match="safety_checker and a feature_extractor"):
        pipe = minidiff.DiffusionPipeline.from_pretrained(folders["sd"], torch_dtype=torch.float32).to("cpu")
    ref = diffusers.DiffusionPipeline.from_pretrained(folders["sd"], torch_dtype=torch.float32, safety_checker=None,
                                                      feature_extractor=None, requires_safety_checker=False).to("cpu")
    assert type(pipe) is minidiff.StableDiffusionPipeline
    assert isinstance(pipe.scheduler, minidiff.PNDMScheduler)
    quiet(pipe), quiet(ref)
    kwargs = dict(height=64, width=64, num_inference_steps=4)

    prompt = "Labrador in the style of Vermeer"
    images = pipe(prompt, generator=gens(0, 1, 2, 3), num_images_per_prompt=4, **kwargs).images
    expected = ref(prompt, generator=gens(0, 1, 2, 3), num_images_per_prompt=4, **kwargs).images
    assert len(images) == 4 and images[0].size == (64, 64)
    assert max_pixel_diff(images, expected) <= PIXEL

    prompts = [prompt + t for t in [", highly realistic", ", artsy", ", trending", ", colorful"]]
    out = pipe(prompts, generator=gens(0, 0, 0, 0), return_intermediates=True, **kwargs)
    expected = ref(prompts, generator=gens(0, 0, 0, 0), **kwargs).images
    assert max_pixel_diff(out.images, expected) <= PIXEL
    # Four variations of one image: the same start noise, four different prompts.
    start = out.intermediates.initial_latents
    assert all(torch.equal(start[i], start[0]) for i in range(4))
    pixels = [np.asarray(im, dtype=np.float32) for im in out.images]
    assert all(np.abs(pixels[i] - pixels[0]).max() > 0 for i in range(1, 4))


# --- every scheduler in the pipelines ----------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_sd_pipeline_with_each_scheduler(sd_pair, name):
    ours_cls, theirs_cls = scheduler_pair(name)
    pipe, ref = sd_pair
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    ref.scheduler = theirs_cls.from_config(ref.scheduler.config)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=6, output_type="np")
    images = pipe("a red circle", generator=gens(3), **kwargs).images
    expected = ref("a red circle", generator=gens(3), **kwargs).images
    assert images.shape == (1, 64, 64, 3)
    assert_not_flat(images)
    assert max_pixel_diff(images, expected) <= PIXEL


@pytest.mark.parametrize("name", DDPM_PIPELINE_SCHEDULER_NAMES)
def test_ddpm_pipeline_with_each_scheduler(folders, name):
    ours_cls, theirs_cls = scheduler_pair(name)
    pipe = quiet(minidiff.DDPMPipeline.from_pretrained(folders["ddpm"]))
    ref = quiet(diffusers.DDPMPipeline.from_pretrained(folders["ddpm"]))
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    ref.scheduler = theirs_cls.from_config(ref.scheduler.config)
    images = pipe(batch_size=2, generator=gens(5, 6), num_inference_steps=8, output_type="np").images
    expected = ref(batch_size=2, generator=gens(5, 6), num_inference_steps=8, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    assert_not_flat(images)
    assert max_pixel_diff(images, expected) <= PIXEL


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_ddpm_pipeline_starts_an_euler_sampler_at_the_sigma_of_its_steps(folders, name):
    """x_T ~ N(0, sigma_max^2 I), sigma_max of the steps this call runs (not of the config's default timesteps):
    the first call on a fresh scheduler and a second call give the same start and the same image."""
    cls = getattr(minidiff, name)
    pipe = quiet(minidiff.DDPMPipeline.from_pretrained(folders["ddpm"]))
    # "leading" spacing (tiny-ddpm's): 8 steps start at t = 875, whose sigma is far below t = 999's
    config = {**json.loads((folders["ddpm"] / "scheduler_config.json").read_text()),
              "timestep_spacing": "leading"}
    pipe.scheduler = cls.from_config(config)
    fresh_sigma = float(pipe.scheduler.init_noise_sigma)
    reference = cls.from_config(config)
    reference.set_timesteps(8)                                  # (a fresh scheduler each time: nothing carried over)
    sigma = float(reference.init_noise_sigma)
    assert abs(sigma - fresh_sigma) > 1.0                       # the two differ: the test can tell them apart
    first = pipe(generator=gens(3), num_inference_steps=8, output_type="np", return_intermediates=True)
    second = pipe(generator=gens(3), num_inference_steps=8, output_type="np", return_intermediates=True)
    noise = torch.randn((1, 3, 32, 32), generator=gens(3)[0])
    assert torch.allclose(first.intermediates.initial_latents, noise * sigma, rtol=1e-5, atol=1e-5)
    assert np.array_equal(first.images, second.images)


# --- image-to-image -----------------------------------------------------------------------------------
def start_image(size=64):
    """A smooth colour gradient with a square on it (not a multiple of 8 wide: the pipeline shrinks it)."""
    y, x = np.mgrid[0:size, 0:size + 5] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x)], axis=-1)
    rgb[16:40, 20:44] = [0.9, 0.1, 0.2]
    return PIL.Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_parity(folders, sd_pair, name):
    ours_cls, theirs_cls = scheduler_pair(name)
    pipe = quiet(minidiff.StableDiffusionImg2ImgPipeline(**sd_pair[0].components))
    ref = quiet(diffusers.StableDiffusionImg2ImgPipeline(**sd_pair[1].components))
    pipe.scheduler = ours_cls.from_config(pipe.scheduler.config)
    ref.scheduler = theirs_cls.from_config(ref.scheduler.config)
    image = start_image()

    # A list of generators: each output is encoded and noised with its own generator.
    kwargs = dict(image=image, strength=0.6, num_inference_steps=5, num_images_per_prompt=2, output_type="np")
    images = pipe(["a cat", "a dog"], generator=gens(0, 1, 2, 3), **kwargs).images
    expected = ref(["a cat", "a dog"], generator=gens(0, 1, 2, 3), **kwargs).images
    assert images.shape == (4, 64, 64, 3)
    assert max_pixel_diff(images, expected) <= PIXEL

    # One generator and a tensor image in [0, 1].
    kwargs = dict(image=as_tensor(image.crop((0, 0, 64, 64))), strength=0.75, num_inference_steps=4, output_type="np")
    images = pipe("a cat", generator=gens(7), **kwargs).images
    expected = ref("a cat", generator=gens(7), **kwargs).images
    assert_not_flat(images)
    assert max_pixel_diff(images, expected) <= PIXEL


def test_img2img_loads_from_a_text_to_image_folder(folders):
    pipe = load_minidiff(minidiff.StableDiffusionImg2ImgPipeline, folders["sd"])
    assert type(pipe) is minidiff.StableDiffusionImg2ImgPipeline
    out = pipe("a cat", image=start_image(), strength=0.5, num_inference_steps=4, generator=gens(0),
               return_intermediates=True)
    # strength 0.5 of 4 steps starts at step 2 (PNDM's schedule repeats one timestep: 5 entries, 3 run).
    assert len(out.intermediates.latents) == len(pipe.scheduler.timesteps) - 2
    assert torch.equal(torch.stack(out.intermediates.timesteps), pipe.scheduler.timesteps[2:])
