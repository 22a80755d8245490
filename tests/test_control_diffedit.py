"""DiffEdit against diffusers' StableDiffusionDiffEditPipeline on tiny-sd (DDIM, DDIMInverse; fp32 CPU): the
same mask, the same inverted latents, the same edited image for the same seeds. Then what it is for: "a red
circle" -> "a blue circle" turns the circle blue and leaves the background as it was."""

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minidiff
from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, tiny_sd_sizes, to_uint8
from minidiff.control.diffedit import StableDiffusionDiffEditPipeline
from minidiff.control.inversion import relative_error
from minidiff.training import evaluate

PIXEL = 1 / 255
SOURCE, TARGET = "a red circle", "a blue circle"
SETTINGS = dict(num_inference_steps=20, guidance_scale=3.0)

F_, H = tiny_sd_sizes()     # tiny-sd's pixels per latent and latent side (8 and 8, or 4 and 16)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes():
    """(minidiff, diffusers) DiffEdit pipelines on tiny-sd with DDIM and DDIM inversion, as the tutorial sets them."""
    ours = load_minidiff(StableDiffusionDiffEditPipeline)
    theirs = load_diffusers("StableDiffusionDiffEditPipeline")
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.inverse_scheduler = diffusers.DDIMInverseScheduler.from_config(theirs.scheduler.config)
    return ours, theirs


@pytest.fixture(scope="module")
def image(pipes):
    """A red circle that tiny-sd drew: (1, 3, 64, 64) in [0, 1]."""
    image = plain_pipeline(pipes[0])(SOURCE, generator=gen(4), output_type="pt", **SETTINGS).images
    assert evaluate.analyse(to_uint8(image)).color == "red"
    return image


@pytest.fixture(scope="module")
def edit(pipes, image):
    """Each of the three calls in both libraries: {"mask": (ours, theirs), "latents": ..., "images": ...}."""
    out = {}
    for name, pipe in zip(("ours", "theirs"), pipes):
        mask = pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=4,
                                  generator=gen(1), **SETTINGS)
        latents = pipe.invert(prompt=SOURCE, image=image, generator=gen(2), **SETTINGS).latents
        images = pipe(prompt=TARGET, mask_image=mask, image_latents=latents, output_type="np", **SETTINGS).images
        out[name] = dict(mask=np.asarray(mask, dtype=np.float32), latents=latents, images=images)
    return out["ours"], out["theirs"]


def test_mask_equals_diffusers(edit):
    ours, theirs = edit
    assert ours["mask"].shape == theirs["mask"].shape == (1, H, H)
    assert np.array_equal(ours["mask"], theirs["mask"])
    assert 0 < ours["mask"].mean() < 0.5     # some of the image, not all of it


def test_mask_without_guidance(pipes, image, edit):
    """guidance_scale=1 (diffusers 0.42.1's generate_mask raises a TypeError there): one UNet pass per prompt; the
    mask still covers the circle, and two identical prompts differ nowhere, so they mask nothing."""
    pipe = pipes[0]
    mask = pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET, num_maps_per_mask=4,
                              generator=gen(1), num_inference_steps=20, guidance_scale=1.0)
    guided = edit[0]["mask"]
    assert (mask * guided).sum() >= 0.5 * guided.sum()
    same = pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=SOURCE, num_maps_per_mask=2,
                              generator=gen(1), num_inference_steps=10, guidance_scale=1.0, output_type="pt")
    assert same.shape == (1, H, H) and same.sum() == 0


def test_invert_equals_diffusers(edit):
    ours, theirs = edit
    assert ours["latents"].shape == theirs["latents"].shape == (1, 16, 4, H, H)   # int(0.8 · 20) steps
    assert relative_error(ours["latents"], theirs["latents"]) < 1e-5


def test_full_strength_inversion_and_decoded_latents_equal_diffusers(pipes, image):
    ours, theirs = (pipe.invert(prompt=SOURCE, image=image, inpaint_strength=1.0, generator=gen(5),
                                decode_latents=True, output_type="np", num_inference_steps=6, guidance_scale=1.0)
                    for pipe in pipes)
    assert ours.latents.shape == (1, 6, 4, H, H)
    assert relative_error(ours.latents, theirs.latents) < 1e-5
    assert ours.images.shape == (6, 64, 64, 3)
    assert max_pixel_diff(ours.images, theirs.images) <= 2 * PIXEL


def test_edit_equals_diffusers(edit):
    ours, theirs = edit
    assert ours["images"].shape == (1, 64, 64, 3)
    assert max_pixel_diff(ours["images"], theirs["images"]) <= 2 * PIXEL   # measured 0


def test_an_empty_mask_gives_back_the_inverted_start(pipes, edit):
    """Mechanism: with M = 0 every step puts the inverted latents back, so the result is the least noisy of them."""
    ours = pipes[0]
    latents = edit[0]["latents"]
    out = ours(prompt=TARGET, mask_image=np.zeros((H, H)), image_latents=latents, output_type="latent",
               return_intermediates=True, **SETTINGS)
    assert torch.equal(out.images, latents[:, -1])
    assert len(out.intermediates.latents) == 16
    # diffusers also takes the latents flattened to (B·N, 4, h, w)
    flat = ours(prompt=TARGET, mask_image=np.zeros((H, H)), image_latents=latents[0], output_type="latent", **SETTINGS)
    assert torch.equal(flat.images, out.images)


def test_the_edit_changes_the_circle_and_keeps_the_background(edit, image):
    ours, _ = edit
    before, after = image, torch.from_numpy(ours["images"]).permute(0, 3, 1, 2)       # (1, 3, 64, 64)
    assert evaluate.analyse(to_uint8(after)).color == "blue"
    assert evaluate.analyse(to_uint8(after)).shape == "circle"
    mask = F.interpolate(torch.from_numpy(ours["mask"])[None], scale_factor=F_)[0, 0]  # (H, H) -> (64, 64)
    change = (after - before).abs().mean(dim=1)[0]                                     # (64, 64)
    inside = (change * mask).sum() / mask.sum()
    outside = (change * (1 - mask)).sum() / (1 - mask).sum()
    assert outside < 0.3 * inside, (outside, inside)                                  # measured 0.013 vs 0.20


def test_errors(pipes, image, edit):
    pipe = pipes[0]
    mask, latents = edit[0]["mask"], edit[0]["latents"]
    with pytest.raises(ValueError, match=f"mask_image must be {H}x{H}"):
        pipe(prompt=TARGET, mask_image=np.ones((64, 64)), image_latents=latents, **SETTINGS)
    with pytest.raises(ValueError, match=r"mask_image must hold values in \[0, 1\]"):
        pipe(prompt=TARGET, mask_image=mask * 255, image_latents=latents, **SETTINGS)
    with pytest.raises(ValueError, match="Invert with the same two settings"):
        pipe(prompt=TARGET, mask_image=mask, image_latents=latents, num_inference_steps=10, guidance_scale=3.0)
    with pytest.raises(ValueError, match="Invert with the same two settings"):
        pipe(prompt=TARGET, mask_image=mask, image_latents=latents, inpaint_strength=1.0, **SETTINGS)
    with pytest.raises(ValueError, match=r"image_latents must be \(B=1, N=16, 4, h, w\)"):
        pipe(prompt=TARGET, mask_image=mask, image_latents=latents[:, :, :3], **SETTINGS)
    for strength in (0, 1.2):
        with pytest.raises(ValueError, match=r"inpaint_strength must be a number in \(0, 1\]"):
            pipe(prompt=TARGET, mask_image=mask, image_latents=latents, inpaint_strength=strength, **SETTINGS)
        with pytest.raises(ValueError, match=r"inpaint_strength must be a number in \(0, 1\]"):
            pipe.invert(prompt=SOURCE, image=image, inpaint_strength=strength, **SETTINGS)
        with pytest.raises(ValueError, match=r"mask_encode_strength must be a number in \(0, 1\]"):
            pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET,
                               mask_encode_strength=strength, **SETTINGS)
    with pytest.raises(ValueError, match=f"multiples of {F_}"):                    # 62: a multiple of neither 8 nor 4
        pipe.generate_mask(image=image[..., :62], source_prompt=SOURCE, target_prompt=TARGET, **SETTINGS)
    with pytest.raises(ValueError, match=f"multiples of {F_}"):
        pipe.invert(prompt=SOURCE, image=image[..., :62], **SETTINGS)
    with pytest.raises(ValueError, match="2 target prompts and 1 source prompts"):
        pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=[TARGET, TARGET], **SETTINGS)
    with pytest.raises(ValueError, match="mask_thresholding_ratio must be a positive number"):
        pipe.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET, mask_thresholding_ratio=0,
                           **SETTINGS)
