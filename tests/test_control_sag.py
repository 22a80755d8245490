"""Self-Attention Guidance (minidiff.control.sag): the same images as diffusers' StableDiffusionSAGPipeline on
tiny-sd (with and without classifier-free guidance, PNDM and DDIM), plain generation at sag_scale 0, the mask
and the blur doing what the paper says, and clear errors."""

import numpy as np
import pytest
import torch

import minidiff
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, quiet, rel_err, tiny_sd_sizes
from minidiff.control.sag import StableDiffusionSAGPipeline, gaussian_blur_2d, sag_mask

STEPS = 15
PROMPTS = ["a red circle", "a small blue square at the top left"]
SEEDS = range(len(PROMPTS))

F, _ = tiny_sd_sizes()          # tiny-sd's pixels per latent: 8 (first edition) or 4 (second)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ours():
    return load_minidiff(StableDiffusionSAGPipeline)


@pytest.fixture(scope="module")
def theirs():
    """Its own instance: the parity test sets its scheduler."""
    return load_diffusers("StableDiffusionSAGPipeline")


@pytest.mark.parametrize("guidance_scale, scheduler", [(3.0, "PNDMScheduler"), (1.0, "PNDMScheduler"),
                                                       (3.0, "DDIMScheduler")])
def test_same_images_as_diffusers(ours, theirs, guidance_scale, scheduler):
    diffusers = pytest.importorskip("diffusers")
    mine = quiet(StableDiffusionSAGPipeline(**{**ours.components, "scheduler": getattr(minidiff, scheduler).from_config(
        ours.scheduler.config)}))
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    final = {}
    out = mine(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, sag_scale=1.0,
               generator=gens(*SEEDS), output_type="np", return_intermediates=True)
    reference = theirs(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, sag_scale=1.0,
                       generator=gens(*SEEDS), output_type="np",
                       callback=lambda i, t, latents: final.update(latents=latents)).images
    assert out.images.shape == reference.shape == (2, 64, 64, 3)
    assert max_pixel_diff(out.images, reference) <= 2 / 255
    assert rel_err(out.intermediates.latents[-1], final["latents"]) < 1e-3
    # ... and SAG did something: the images are not those of sag_scale 0.
    plain = mine(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, sag_scale=0.0,
                 generator=gens(*SEEDS), output_type="np").images
    assert max_pixel_diff(out.images, plain) > 0.1


def test_sag_scale_zero_is_plain_generation(ours):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
    reference = plain_pipeline(ours)(PROMPTS, generator=gens(*SEEDS), **kwargs).images
    assert np.array_equal(ours(PROMPTS, sag_scale=0.0, generator=gens(*SEEDS), **kwargs).images, reference)


def test_mask_marks_the_positions_attended_more_than_average():
    B, heads, h, w = 2, 3, 4, 4
    N = h * w
    probs = torch.full((B, heads, N, N), 0.0)
    probs[0, :, :, [0, 5]] = 0.5                     # image 0: every query looks at keys 0 and 5 only
    probs[1] = torch.softmax(torch.randn(heads, N, N), dim=-1)
    mask = sag_mask(probs, (h, w))
    assert mask.shape == (B, 1, h, w) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[0].flatten().nonzero().flatten().tolist() == [0, 5]
    received = probs[1].mean(0).sum(0)                # what each key receives, summed over the N queries
    assert torch.equal(mask[1].flatten().bool(), received > 1)
    assert 0 < mask[1].sum() < N                      # some above the average of 1, some below


def test_blur_only_changes_the_masked_positions(ours):
    g = gen(0)
    latents, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours.scheduler.set_timesteps(STEPS)
    t = ours.scheduler.timesteps[3]
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1                            # the top-left quarter of the middle block's map
    degraded = ours.degrade(latents, eps, mask, t)
    masked = torch.zeros(2, 4, 8, 8, dtype=torch.bool)
    masked[:, :, :4, :4] = True                       # ... is the top-left 4 x 4 of the 8 x 8 latent
    # Outside the mask, blurring nothing and re-noising with the same ε gives z_t back.
    torch.testing.assert_close(degraded[~masked], latents[~masked], atol=1e-5, rtol=1e-5)
    assert (degraded[masked] - latents[masked]).abs().min() > 0
    # The Gaussian keeps a constant image as it is (its weights sum to 1) and smooths noise.
    torch.testing.assert_close(gaussian_blur_2d(torch.full((1, 4, 8, 8), 0.3)), torch.full((1, 4, 8, 8), 0.3))
    assert gaussian_blur_2d(latents).std() < 0.5 * latents.std()


def test_masks_are_recorded_per_step(ours):
    out = ours(PROMPTS[:1], num_inference_steps=5, guidance_scale=3.0, sag_scale=0.75, output_type="latent",
               generator=gens(0), return_intermediates=True)
    assert len(out.sag_masks) == len(ours.scheduler.timesteps) == len(out.intermediates.latents)
    assert out.sag_masks[0].shape == (1, 1, 4, 4)    # tiny-sd's middle block: 4 x 4 for 64 x 64 images
    assert all(0 < m.sum() < 16 for m in out.sag_masks)


@pytest.mark.parametrize("bad, error, message", [
    (dict(sag_scale=-0.5), ValueError, "sag_scale must be a number >= 0"),
    (dict(height=4 * F, width=4 * F), ValueError, f"at least {5 * F} pixels a side"),   # 4 latents: the blur needs 5
    (dict(height=62), ValueError, f"multiples of {F}"),
])
def test_bad_arguments_are_refused(ours, bad, error, message):
    with pytest.raises(error, match=message):
        ours(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np", **bad)


def test_scheduler_with_float_timesteps_is_refused(ours):
    euler = StableDiffusionSAGPipeline(**{**ours.components, "scheduler": minidiff.EulerDiscreteScheduler.from_config(
        ours.scheduler.config)})
    with pytest.raises(ValueError, match="integer timesteps"):
        euler(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
