"""StableDiffusionInstructPix2PixPipeline (Brooks et al. 2023) against diffusers' pipeline of the same name, on a
small random folder in timbrooks/instruct-pix2pix's layout (UNet in_channels 8, Euler ancestral), every weight
random; and its refusals of bad input before any work."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from fake_checkpoints import make_fake_instruct_pix2pix
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
PIXEL = 1 / 255


def photo(seed: int, size=(64, 64), mode="RGB") -> PIL.Image.Image:
    """A random but smooth RGB image (a 8x8 noise pattern scaled up), PIL, `size` = (width, height)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize(size, PIL.Image.BICUBIC).convert(mode)


@pytest.fixture(scope="module")
def folder(reference_dir, tmp_path_factory):
    return str(make_fake_instruct_pix2pix(tmp_path_factory.mktemp("ip2p") / "instruct-pix2pix", reference_dir))


@pytest.fixture(scope="module")
def pair(folder):
    return (load_minidiff(minidiff.DiffusionPipeline, folder),
            load_diffusers("StableDiffusionInstructPix2PixPipeline", folder))


def test_loads_the_instruct_pix2pix_layout(pair):
    ours, _ = pair
    assert type(ours) is minidiff.StableDiffusionInstructPix2PixPipeline
    assert ours.unet.config.in_channels == 8
    assert type(ours.scheduler) is minidiff.EulerAncestralDiscreteScheduler


@pytest.mark.parametrize("options", [
    dict(),                                                          # guidance 7.5, image guidance 1.5
    dict(guidance_scale=3.0, image_guidance_scale=1.0),              # no pull towards the image beyond c_I itself
    dict(guidance_scale=5.0, image_guidance_scale=2.5, negative_prompt="blurry"),
    dict(guidance_scale=1.0),                                        # guidance off: one plain pass a step
    dict(guidance_scale=1.0, image_guidance_scale=0.5),              # off as well (image scale unused)
    dict(num_images_per_prompt=2, generator=[0, 1]),                 # one generator per image
    dict(size=(72, 56)),                                             # a non-square image keeps its size
    dict(size=(70, 61)),                                             # shrunk to multiples of 8, as diffusers does
    dict(latents=torch.randn(1, 4, 8, 8, generator=gen(9))),          # z_T given (times σ_T in both)
])
def test_equals_diffusers(pair, options):
    ours, theirs = pair
    options = dict(options)
    size = options.pop("size", (64, 64))
    seeds = options.pop("generator", 0)

    def run(pipe):
        generator = gens(*seeds) if isinstance(seeds, list) else gen(seeds)
        return pipe("turn it blue", image=photo(1, size), num_inference_steps=5, generator=generator,
                    output_type="np", **options).images

    a, b = run(ours), run(theirs)
    assert a.shape == b.shape == (len(seeds) if isinstance(seeds, list) else 1, size[1] // 8 * 8, size[0] // 8 * 8, 3)
    assert max_pixel_diff(a, b) <= PIXEL


def test_two_prompts_two_images_and_other_schedulers_equal_diffusers(pair):
    ours, theirs = pair
    for name in ("DDIMScheduler", "EulerDiscreteScheduler"):
        o = quiet(minidiff.StableDiffusionInstructPix2PixPipeline(**ours.components))
        o.scheduler = getattr(minidiff, name).from_config(ours.scheduler.config)
        t = quiet(diffusers.StableDiffusionInstructPix2PixPipeline(**theirs.components))
        t.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config)
        images = [photo(2), photo(3)]
        # gen(4): a well-conditioned case. On this random 8-channel model DDIM's last step can amplify float
        # rounding: with gen(5), nudging one weight of diffusers' own UNet by 1e-7 (relative) moved its image by
        # 0.019, and the two libraries differed by as much; with gen(4), 1.3e-4 and 9e-5.
        a = o(["make it red", "add a ball"], image=images, num_inference_steps=4, generator=gen(4),
              output_type="np").images
        b = t(["make it red", "add a ball"], image=images, num_inference_steps=4, generator=gen(4),
              output_type="np").images
        assert max_pixel_diff(a, b) <= PIXEL, name


def test_the_image_and_its_guidance_scale_change_the_result(pair):
    """Not a no-op: another input image, or another image_guidance_scale, gives another picture."""
    ours, _ = pair
    run = dict(num_inference_steps=4, output_type="np")
    base = ours("turn it blue", image=photo(1), generator=gen(0), **run).images
    other_image = ours("turn it blue", image=photo(9), generator=gen(0), **run).images
    other_scale = ours("turn it blue", image=photo(1), image_guidance_scale=3.0, generator=gen(0), **run).images
    assert max_pixel_diff(base, other_image) > 0.01 and max_pixel_diff(base, other_scale) > 0.01


def test_every_step_is_recorded(pair):
    ours, _ = pair
    seen = []
    out = ours("turn it blue", image=photo(1), num_inference_steps=4, generator=gen(0), output_type="latent",
               callback=lambda i, t, latents, x0: seen.append((i, latents.shape, x0.shape)), return_intermediates=True)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == s[2] == (1, 4, 8, 8) for s in seen)
    steps = out.intermediates
    assert len(steps.latents) == len(steps.x0) == 4 and torch.equal(steps.latents[-1], out.images)


def test_diffusers_drops_all_guidance_when_image_guidance_scale_is_below_one(pair):
    """The behaviour minidiff refuses: with image_guidance_scale < 1, diffusers ignores guidance_scale = 7.5 and
    gives exactly its guidance_scale = 1 image. minidiff raises instead, saying so."""
    ours, theirs = pair
    run = dict(image=photo(1), num_inference_steps=3, output_type="np")
    dropped = theirs("turn it blue", guidance_scale=7.5, image_guidance_scale=0.5, generator=gen(0), **run).images
    plain = theirs("turn it blue", guidance_scale=1.0, generator=gen(0), **run).images
    assert np.array_equal(dropped, plain)
    with pytest.raises(ValueError, match="image_guidance_scale=0.5 is below 1 while guidance_scale=7.5"):
        ours("turn it blue", guidance_scale=7.5, image_guidance_scale=0.5, **run)


def counting_unet(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("bad, message", [
    (dict(image=photo(1, size=(4, 4))), "The image is 4x4 pixels; the VAE needs at least 8x8"),
    (dict(image=photo(1, mode="RGBA")), "mode 'RGBA'; expected 'RGB'"),
    (dict(image=photo(1, mode="L")), "mode 'L'; expected 'RGB'"),
    (dict(image=torch.rand(1, 4, 64, 64)), r"must be \(B, 3, H, W\)"),
    (dict(image=torch.rand(1, 3, 64, 64) * 2), r"values in \[0, 1\]"),
    (dict(image_guidance_scale=float("nan")), "image_guidance_scale must be a finite number"),
    (dict(image_guidance_scale=0.9), "is below 1 while guidance_scale"),
    (dict(image=[photo(1), photo(2), photo(3)], prompt=["a", "b"]), "Got 3 images for 2 outputs"),
    (dict(latents=torch.randn(1, 4, 4, 4)), "latents"),
])
def test_bad_inputs_refused_before_any_work(folder, bad, message):
    pipe = load_minidiff(minidiff.StableDiffusionInstructPix2PixPipeline, folder)
    calls = counting_unet(pipe)
    kwargs = {"prompt": "turn it blue", "image": photo(1), "num_inference_steps": 2, **bad}
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**kwargs)
    assert calls == []


def test_a_unet_without_8_input_channels_is_refused(tiny_sd_pair):
    """tiny-sd's text-to-image UNet (4 channels) cannot read the image latents."""
    pipe = quiet(minidiff.StableDiffusionInstructPix2PixPipeline(**tiny_sd_pair[0].components))
    with pytest.raises(ValueError, match="in_channels=8 .*this UNet has in_channels=4.*timbrooks/instruct-pix2pix"):
        pipe("turn it blue", image=photo(1), num_inference_steps=2)


@pytest.mark.parametrize("name, options, dtype", [
    ("EulerAncestralDiscreteScheduler", {}, torch.float32),
    ("DDIMScheduler", {}, torch.float32),
    ("PNDMScheduler", {"skip_prk_steps": True}, torch.float32),     # as every SD folder configures it
    # PNDM's Runge-Kutta warm-up on this random v-model amplifies float32 rounding to 7/255 between the two
    # libraries (measured); in float64 they agree exactly, so the steps are the same.
    ("PNDMScheduler", {"skip_prk_steps": False}, torch.float64),
])
def test_v_prediction_equals_diffusers(pair, name, options, dtype):
    """The same UNet read as a v-prediction model (as an SD 2-1-based edit model would be): the guidance combines
    v's as it combines ε's, and each scheduler turns v into x0 and ε; both libraries agree."""
    ours, theirs = pair
    o = quiet(minidiff.StableDiffusionInstructPix2PixPipeline(**ours.components))
    o.scheduler = getattr(minidiff, name).from_config(ours.scheduler.config, prediction_type="v_prediction", **options)
    t = quiet(diffusers.StableDiffusionInstructPix2PixPipeline(**theirs.components))
    t.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, prediction_type="v_prediction",
                                                       **options)
    if dtype != torch.float32:   # on copies: the shared pair stays in float32
        o = quiet(minidiff.StableDiffusionInstructPix2PixPipeline(
            **{**o.components, "unet": copy.deepcopy(o.unet), "vae": copy.deepcopy(o.vae),
               "text_encoder": copy.deepcopy(o.text_encoder)})).to(dtype)
        t = quiet(diffusers.StableDiffusionInstructPix2PixPipeline(
            vae=copy.deepcopy(t.vae).to(dtype), text_encoder=copy.deepcopy(t.text_encoder).to(dtype),
            tokenizer=t.tokenizer, unet=copy.deepcopy(t.unet).to(dtype), scheduler=t.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False))
    run = dict(image=photo(4), num_inference_steps=5, output_type="np")
    a = o("make it green", generator=gen(6), **run).images
    b = t("make it green", generator=gen(6), **run).images
    assert max_pixel_diff(a, b) <= PIXEL
