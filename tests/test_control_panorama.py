"""minidiff.control.panorama (MultiDiffusion) against diffusers' StableDiffusionPanoramaPipeline, and its mechanism.

diffusers' get_views is hard-wired to 64-latent windows with a stride of 8, so the parity tests use a random
look-alike of CompVis/stable-diffusion-v1-4 whose UNet has sample_size 64 (tests/fake_checkpoints.py, made
smaller still: two levels, cross-attention only at 32 x 32). The mechanism and behaviour tests use tiny-sd.
"""

import diffusers
import numpy as np
import pytest
import torch

import minidiff
from fake_checkpoints import make_fake_sd
from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, rel_err, tiny_sd_sizes
from minidiff.control.panorama import StableDiffusionPanoramaPipeline

F, H = tiny_sd_sizes()          # tiny-sd's pixels per latent and latent side (= its window): 8 and 8, or 4 and 16

PIXEL = 2 / 255  # the bound on the largest pixel difference (images in [0, 1])
# A UNet that works on 64 x 64 latents (SD v1's window), small enough for a CPU.
WIDE_UNET = dict(sample_size=64, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_pair(tmp_path_factory, reference_dir):
    folder = make_fake_sd(tmp_path_factory.mktemp("hub") / "sd-window-64", reference_dir, **WIDE_UNET)
    return (load_minidiff(StableDiffusionPanoramaPipeline, folder),
            load_diffusers("StableDiffusionPanoramaPipeline", folder))


@pytest.fixture(scope="module")
def tiny():
    return load_minidiff(StableDiffusionPanoramaPipeline)


# --- parity with diffusers ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler, view_batch_size, circular, steps", [("PNDMScheduler", 1, False, 3),
                                                                          ("DDIMScheduler", 3, True, 2)])
def test_parity_with_diffusers(fake_pair, scheduler, view_batch_size, circular, steps):
    pipe, ref = fake_pair
    pipe.scheduler = getattr(minidiff, scheduler).from_config(pipe.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    # 64 x 72 latents: two windows of 64 at stride 8 (nine around the circle with circular padding).
    kwargs = dict(height=512, width=576, num_inference_steps=steps, guidance_scale=7.5,
                  view_batch_size=view_batch_size, circular_padding=circular)
    latents = pipe("a photo of a mountain range", generator=gen(0), output_type="latent", **kwargs).images
    expected = ref("a photo of a mountain range", generator=gen(0), output_type="latent", **kwargs).images
    assert latents.shape == (1, 4, 64, 72)
    assert rel_err(latents, expected) < 1e-4
    with torch.no_grad():
        images = pipe.decode_with_padding(latents) if circular else pipe.decode(latents)
        images_ref = ref.decode_latents_with_padding(expected) if circular else ref.vae.decode(
            expected / ref.vae.config.scaling_factor).sample
    images, images_ref = ((x / 2 + 0.5).clamp(0, 1) for x in (images, images_ref))
    assert images.shape == (1, 3, 512, 576) and float(images.std()) > 0.02
    assert max_pixel_diff(images, images_ref) <= PIXEL


def test_views_match_diffusers(fake_pair):
    """The same windows as diffusers' get_views (in latents, window 64, stride 8), in the same order."""
    pipe, ref = fake_pair
    for circular in (False, True):
        ours = pipe.get_views(64, 96, window=64, stride=8, circular_padding=circular)
        theirs = ref.get_views(512, 768, circular_padding=circular)
        assert [(int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[0]) + len(c)) for r, c in ours] == theirs
    wrapped = pipe.get_views(64, 96, window=64, stride=8, circular_padding=True)[-1][1]
    assert wrapped[0] == 88 and wrapped[-1] == 55        # the last window wraps around the right edge


# --- mechanism and behaviour on tiny-sd -----------------------------------------------------------------
def test_one_window_is_plain_generation(tiny):
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, output_type="np")
    ours = tiny("a red circle", height=64, width=64, generator=gen(1), **kwargs).images
    expected = plain_pipeline(tiny)("a red circle", generator=gen(1), **kwargs).images
    assert max_pixel_diff(ours, expected) <= 1e-5


def test_wide_image_and_its_steps(tiny):
    """64 x 192 pixels from a model that only ever saw 64 x 64 images: several objects side by side, and the
    per-step latents of the whole panorama."""
    out = tiny("a blue square on a black background", height=64, width=192, num_inference_steps=12,
               guidance_scale=3.0, stride=4, view_batch_size=5, generator=gen(0), output_type="np",
               return_intermediates=True)
    image = out.images[0]                                              # (64, 192, 3)
    assert image.shape == (64, 192, 3)
    assert len(out.intermediates.latents) == len(tiny.scheduler.timesteps)
    assert out.intermediates.latents[-1].shape == (1, 4, H, 3 * H)
    # Foreground: pixels far from the background colour (the median). Objects: runs of columns with foreground.
    background = np.median(image.reshape(-1, 3), axis=0)
    foreground = np.abs(image - background).sum(axis=-1) > 0.3          # (64, 192)
    assert 0.05 < foreground.mean() < 0.8
    occupied = foreground.mean(axis=0) > 0.1                           # (192,) columns that cross an object
    starts = np.flatnonzero(occupied[1:] & ~occupied[:-1]) + 1         # where a run of occupied columns begins
    assert len(starts) + int(occupied[0]) >= 2


# --- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(width=56), "at least one window"),
    (dict(height=48, width=128), "at least one window"),
    (dict(width=102), f"multiples of {F}"),                               # of neither 8 nor 4
    (dict(width=192, stride=3), "do not tile the width"),
    (dict(width=192, stride=5, circular_padding=True), "do not tile the width"),
    (dict(stride=0), "stride must be an integer"),
    (dict(stride=H + 1), "stride must be an integer"),                    # larger than the window
    (dict(view_batch_size=0), "view_batch_size"),
])
def test_bad_input(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny("a red circle", num_inference_steps=1, **kwargs)


def test_errors_give_pixels_at_the_vaes_own_factor():
    """A factor-4 VAE (the second tiny-sd): 16 latents are 64 pixels, not 128."""
    get_views = StableDiffusionPanoramaPipeline.get_views
    with pytest.raises(ValueError, match=r"16 latents = 64 pixels"):
        get_views(16, 12, window=16, stride=4, pixels_per_latent=4)
    with pytest.raises(ValueError, match=r"Use 30 or 32 latents \(120 or 128 pixels\)"):
        get_views(16, 31, window=16, stride=2, pixels_per_latent=4)
    with pytest.raises(ValueError, match=r"\(240 or 256 pixels\)"):                 # SD's factor by default
        get_views(16, 31, window=16, stride=2)
