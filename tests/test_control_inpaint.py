"""Inpainting with tiny-sd's 4-channel UNet (minidiff/control/inpaint.py): parity with diffusers'
StableDiffusionInpaintPipeline, the blend's mechanism (the kept region's latents), and bad masks."""

import diffusers
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

import minidiff
from helpers import as_tensor, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet, tiny_sd_sizes
from minidiff.control.inpaint import StableDiffusionInpaintPipeline

PIXEL = 2 / 255

F, H = tiny_sd_sizes()          # tiny-sd's pixels per latent and latent side: 8 and 8, or 4 and 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes():
    return load_minidiff(StableDiffusionInpaintPipeline), load_diffusers("StableDiffusionInpaintPipeline")


def shapes_image(color=(220, 30, 30), background=(128, 128, 128)):
    """A red circle at the top left on gray, as tiny-sd's training data draws them: PIL, 64x64."""
    image = PIL.Image.new("RGB", (64, 64), background)
    PIL.ImageDraw.Draw(image).ellipse((8, 8, 36, 36), fill=color)
    return image


def box_mask(top=0, left=0, bottom=40, right=40, size=64):
    """White (repaint) inside the box, black elsewhere: a PIL "L" image."""
    mask = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(mask).rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


def test_parity_with_diffusers(pipes):
    ours, theirs = pipes
    image, mask = shapes_image(), box_mask()
    cases = [
        dict(prompt="a blue square at the top left", strength=1.0, generator=gens(0)),
        dict(prompt=["a green triangle", "a yellow diamond"], strength=0.75, num_images_per_prompt=2,
             generator=gens(0, 1, 2, 3), negative_prompt=["a red circle", "a blue square"]),
    ]
    for case in cases:
        kwargs = dict(image=image, mask_image=mask, num_inference_steps=12, guidance_scale=3.0, output_type="np")
        images = ours(**case, **kwargs).images
        case["generator"] = gens(*range(len(case["generator"])))
        expected = theirs(**case, **kwargs).images
        assert images.std() > 0.05
        assert max_pixel_diff(images, expected) <= PIXEL

    # tensors: an image in [0, 1] and a (1, 1, H, W) mask with soft values (both binarise at 0.5)
    soft = torch.zeros(1, 1, 64, 64)
    soft[..., 8:40, 16:56] = 0.7
    kwargs = dict(prompt="a cyan circle", image=as_tensor(image), mask_image=soft, strength=0.9,
                  num_inference_steps=10, guidance_scale=3.0, output_type="np")
    assert max_pixel_diff(ours(generator=gens(3), **kwargs).images, theirs(generator=gens(3), **kwargs).images) <= PIXEL


def test_parity_with_a_stochastic_sampler(pipes):
    """DDPM draws noise at every step from the generator: the same draws as diffusers, in the same order."""
    ours, theirs = pipes
    ours = quiet(StableDiffusionInpaintPipeline(**ours.components))
    theirs = quiet(diffusers.StableDiffusionInpaintPipeline(**theirs.components))
    ours.scheduler = minidiff.DDPMScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.DDPMScheduler.from_config(theirs.scheduler.config)
    kwargs = dict(prompt="a purple diamond", image=shapes_image(), mask_image=box_mask(), strength=0.8,
                  num_inference_steps=10, guidance_scale=3.0, output_type="np")
    images = ours(generator=gens(5), **kwargs).images
    assert max_pixel_diff(images, theirs(generator=gens(5), **kwargs).images) <= PIXEL


def test_the_kept_region_is_the_noised_image_latent_at_every_step(pipes):
    ours, _ = pipes
    image = shapes_image()
    out = ours("a blue square at the top left", image, box_mask(), strength=1.0, num_inference_steps=8,
               guidance_scale=3.0, generator=gens(0), output_type="latent", return_intermediates=True)

    g = gens(0)[0]                                        # the pipeline's draws, in its order: z_0, then ε
    with torch.no_grad():
        z0 = ours.vae.encode(ours.preprocess(image)).latent_dist.sample(g) * ours.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    timesteps = out.intermediates.timesteps
    k = 40 // F                                           # the mask's 40x40 pixels are k x k latents
    outside = torch.ones(H, H, dtype=torch.bool)
    outside[:k, :k] = False
    for i, latents in enumerate(out.intermediates.latents):
        known = z0 if i == len(timesteps) - 1 else ours.scheduler.add_noise(z0, noise, timesteps[i + 1][None])
        assert torch.allclose(latents[..., outside], known[..., outside], atol=1e-6)
        assert not torch.allclose(latents[..., :k, :k], known[..., :k, :k], atol=1e-2)   # inside: the model's
    assert torch.equal(out.images[..., outside], z0[..., outside])


def test_an_empty_mask_returns_the_image_latents(pipes):
    ours, _ = pipes
    image = shapes_image()
    latents = ours("a blue square", image, torch.zeros(64, 64), num_inference_steps=5, guidance_scale=3.0,
                   generator=gens(1), output_type="latent").images
    with torch.no_grad():
        z0 = ours.vae.encode(ours.preprocess(image)).latent_dist.sample(gens(1)[0])
    assert torch.equal(latents, z0 * ours.vae.config.scaling_factor)


def test_outside_the_mask_the_image_stays_and_inside_it_changes(pipes):
    ours, _ = pipes
    image = shapes_image()
    x = as_tensor(image)
    out = ours("a yellow diamond on a gray background", image, box_mask(), num_inference_steps=15,
               guidance_scale=3.0, generator=gens(0), output_type="pt").images[0]
    diff = (out - x).abs().mean(dim=0)                                  # (64, 64)
    far = torch.ones(64, 64, dtype=torch.bool)
    far[:48, :48] = False                                               # 8 pixels away from the mask
    with torch.no_grad():
        reconstruction = (ours.decode(ours.vae.encode(x[None] * 2 - 1).latent_dist.mean) / 2 + 0.5).clamp(0, 1)[0]
    vae_error = (reconstruction - x).abs().mean(dim=0)[far].mean()
    assert diff[far].mean() < vae_error + 0.03                          # kept, up to the VAE's own error
    assert diff[:40, :40].mean() > 0.1                                  # repainted


def test_bad_masks_are_refused(pipes):
    ours, _ = pipes
    image = shapes_image()
    run = dict(prompt="a blue square", num_inference_steps=2)
    with pytest.raises(ValueError, match="mask_image is 32x32 \\(H x W\\) but image is 64x64"):
        ours(image=image, mask_image=box_mask(size=32), **run)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        ours(image=image, mask_image=torch.full((1, 1, 64, 64), 255.0), **run)
    with pytest.raises(ValueError, match="Got 2 masks for 3 images"):
        ours(image=torch.rand(3, 3, 64, 64), mask_image=torch.zeros(2, 1, 64, 64), prompt=["a", "b", "c"],
             num_inference_steps=2)
    with pytest.raises(ValueError, match="one channel"):
        ours(image=image, mask_image=torch.zeros(1, 3, 64, 64), **run)
    with pytest.raises(TypeError, match="mask_image must be a PIL image"):
        ours(image=image, mask_image=np.zeros((64, 64)), **run)
    with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
        ours(image=image, mask_image=box_mask(), strength=0.0, **run)
