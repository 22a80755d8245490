"""DDIM inversion: DDIMInverseScheduler against diffusers' (timesteps and steps, rel err 0), the exact undoing of
a DDIM step, and `ddim_invert` on tiny-sd: invert, sample DDIM back from the inverted noise with the same
prompt, and land close to the start (relative latent error 0.086 measured at 20 steps, guidance 1; 1.23
from fresh noise)."""

import diffusers
import PIL.Image
import pytest
import torch

import minidiff
from helpers import gen, load_minidiff, tiny_sd_sizes, to_uint8
from minidiff.checkpoints import TINY_SD
from minidiff.control.inversion import ddim_invert, relative_error
from minidiff.schedulers.ddim_inverse import DDIMInverseScheduler
from scheduler_harness import (SD_PNDM_CONFIG, assert_same_schedule, build_pair, compare_sampling,
                               load_sd_scheduler_config)

TINY_SD_CONFIG = minidiff.DDIMScheduler.from_pretrained(TINY_SD, subfolder="scheduler").config
CONFIGS = {
    "tiny-sd": dict(minidiff.schedulers.base.given_values(TINY_SD_CONFIG)),
    "sd-v1-4 (dict)": SD_PNDM_CONFIG,
    "trailing": dict(SD_PNDM_CONFIG, timestep_spacing="trailing", steps_offset=0),
    "defaults, clipped x0": {},
    "v_prediction": dict(SD_PNDM_CONFIG, prediction_type="v_prediction"),
    "set_alpha_to_one": dict(SD_PNDM_CONFIG, set_alpha_to_one=True),
}

F, _ = tiny_sd_sizes()          # tiny-sd's pixels per latent: 8 (first edition) or 4 (second)
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the scheduler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_inference_steps", [1, 7, 20, 50, 999])
def test_inverse_scheduler_equals_diffusers(name, num_inference_steps):
    ours, theirs = build_pair(DDIMInverseScheduler, diffusers.DDIMInverseScheduler, CONFIGS[name])
    assert_same_schedule(ours, theirs, num_inference_steps)
    assert bool((ours.timesteps[1:] > ours.timesteps[:-1]).all()), "inverse timesteps must ascend"
    errs = compare_sampling(ours, theirs, num_inference_steps)
    assert errs["final"] < 1e-6 and errs["x0"] < 1e-6, errs


def test_inverse_scheduler_with_the_real_sd_config(reference_dir):
    config = load_sd_scheduler_config(reference_dir)
    ours, theirs = build_pair(DDIMInverseScheduler, diffusers.DDIMInverseScheduler, config)
    assert_same_schedule(ours, theirs, 50)
    errs = compare_sampling(ours, theirs, 50)
    assert errs["final"] < 1e-6 and errs["x0"] < 1e-6, errs
    # from_config(pipe.scheduler.config) of minidiff's own scheduler, as the tutorials write it
    pndm = minidiff.PNDMScheduler.from_config(config)
    assert DDIMInverseScheduler.from_config(pndm.config).config == ours.config


def test_inverse_step_undoes_a_ddim_step():
    """With the same ε at both ends, DDIM inversion from t to t' and DDIM sampling from t' to t are exact inverses
    (x̂_0 and ε are the same on both sides of eq. 12)."""
    ddim = minidiff.DDIMScheduler.from_config(SD_PNDM_CONFIG)
    inverse = DDIMInverseScheduler.from_config(SD_PNDM_CONFIG)
    ddim.set_timesteps(10)
    inverse.set_timesteps(10)
    assert torch.equal(inverse.timesteps, ddim.timesteps.flip(0))
    g = gen(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x = x0
    for t in inverse.timesteps:
        x = inverse.step(eps, t, x).prev_sample
    assert relative_error(x, x0) > 0.5        # it did move towards the noise
    for t in ddim.timesteps:
        x = ddim.step(eps, t, x).prev_sample
    assert relative_error(x, x0) < 1e-5


def test_inverse_scheduler_errors():
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMInverseScheduler(timestep_spacing="linspace")
    inverse = DDIMInverseScheduler.from_config(SD_PNDM_CONFIG)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        inverse.step(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 4, 8, 8))
    inverse.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this scheduler's schedule"):
        inverse.step(torch.zeros(1, 4, 8, 8), 7, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="outside the trained range"):
        inverse.set_timesteps(1000)   # leading spacing with steps_offset=1 would reach t = 1000


# --- ddim_invert on tiny-sd ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    pipe = load_minidiff(minidiff.StableDiffusionPipeline)
    pipe.scheduler = minidiff.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


PROMPT = "a red circle"


@pytest.fixture(scope="module")
@torch.no_grad()
def generated(pipe):
    """z_0 of an image tiny-sd drew, and the image: (1, 4, h, w), (1, 3, 64, 64) in [0, 1]."""
    z0 = pipe(PROMPT, num_inference_steps=20, guidance_scale=3.0, generator=gen(4), output_type="latent").images
    return z0, (pipe.decode(z0) / 2 + 0.5).clamp(0, 1)


def test_round_trip_returns_to_the_start(pipe, generated):
    z0, _ = generated
    steps = []
    inverted = ddim_invert(pipe, PROMPT, latents=z0, num_inference_steps=20,
                           callback=lambda i, t, latents, x0: steps.append(int(t)))
    timesteps = [int(t) for t in inverted.intermediates.timesteps]
    assert steps == timesteps and len(timesteps) == 20 and timesteps == sorted(timesteps)
    assert torch.equal(inverted.intermediates.latents[-1], inverted.latents)
    assert 0.6 < inverted.latents.std().item() < 1.3    # it looks like noise: unit variance, not z_0's
    back = pipe(PROMPT, latents=inverted.latents, num_inference_steps=20, guidance_scale=1.0,
                output_type="latent").images
    fresh = pipe(PROMPT, num_inference_steps=20, guidance_scale=1.0, generator=gen(1), output_type="latent").images
    error, baseline = relative_error(back, z0), relative_error(fresh, z0)
    assert error < 0.15, error                    # measured 0.118 on the second tiny-sd (0.086 on the first)
    assert error < 0.3 * baseline, (error, baseline)   # another seed's latents: 0.534 away


def test_more_steps_invert_better(pipe, generated):
    z0, _ = generated
    errors = []
    for n in (5, 40):
        zT = ddim_invert(pipe, PROMPT, latents=z0, num_inference_steps=n).latents
        back = pipe(PROMPT, latents=zT, num_inference_steps=n, guidance_scale=1.0, output_type="latent").images
        errors.append(relative_error(back, z0))
    assert errors[1] < 0.7 * errors[0], errors     # measured 0.22 and 0.049


def test_invert_an_image(pipe, generated):
    """From pixels: the VAE's encoding adds its own error, but the round trip still lands near the image."""
    _, image = generated
    inverted = ddim_invert(pipe, PROMPT, image=image, num_inference_steps=20, generator=gen(0))
    z0 = inverted.intermediates.initial_latents
    back = pipe(PROMPT, latents=inverted.latents, num_inference_steps=20, guidance_scale=1.0, output_type="pt")
    assert relative_error(back.images, image) < 0.1     # measured 0.036; from fresh noise 0.34
    pil = PIL.Image.fromarray(to_uint8(image))
    again = ddim_invert(pipe, PROMPT, image=pil, num_inference_steps=20, generator=gen(0))
    assert relative_error(again.intermediates.initial_latents, z0) < 0.02   # the same image, 8-bit rounded


def test_ddim_invert_errors(pipe, generated):
    z0, image = generated
    with pytest.raises(ValueError, match="exactly one of image= .* and latents="):
        ddim_invert(pipe, PROMPT, image=image, latents=z0)
    with pytest.raises(ValueError, match="exactly one"):
        ddim_invert(pipe, PROMPT)
    for strength in (0, 1.5, -0.1, "1"):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            ddim_invert(pipe, PROMPT, latents=z0, strength=strength)
    with pytest.raises(ValueError, match="runs no step"):
        ddim_invert(pipe, PROMPT, latents=z0, num_inference_steps=4, strength=0.2)
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, h, w\)"):
        ddim_invert(pipe, PROMPT, latents=z0[0])
    odd = PIL.Image.new("RGB", (62, 64))                                        # 62: a multiple of neither 8 nor 4
    with pytest.raises(ValueError, match=f"62x64 pixels.*multiples of {F}"):
        ddim_invert(pipe, PROMPT, image=odd)
    with pytest.raises(ValueError, match=f"multiples of {F}"):
        ddim_invert(pipe, PROMPT, image=torch.rand(1, 3, 62, 64))
