"""minidiff.control.pix2pix_zero: the same edited image and the same inverted noise as diffusers'
StableDiffusionPix2PixZeroPipeline, plain generation when there is nothing to edit, attention guidance that pulls
the maps to the reference, and the colour change the edit direction asks for."""

import numpy as np
import pytest
import torch

import minidiff
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, tiny_sd_sizes
from minidiff.checkpoints import TINY_SD
from minidiff.control.inversion import relative_error
from minidiff.control.pix2pix_zero import StableDiffusionPix2PixZeroPipeline
from minidiff.training import evaluate

SOURCE = ["a red circle", "a red square", "a red triangle", "a red diamond"]
TARGET = [s.replace("red", "blue") for s in SOURCE]

F, H = tiny_sd_sizes()          # tiny-sd's pixels per latent and latent side: 8 and 8, or 4 and 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    # DDIM, as diffusers' example: deterministic, so both passes see the same timesteps and noise.
    scheduler = minidiff.DDIMScheduler.from_pretrained("tiny-sd", subfolder="scheduler")
    return load_minidiff(StableDiffusionPix2PixZeroPipeline, scheduler=scheduler)


@pytest.fixture(scope="module")
def embeds(pipe):
    return pipe.get_embeds(SOURCE), pipe.get_embeds(TARGET)


def reference(inverse=False):
    """diffusers' StableDiffusionPix2PixZeroPipeline on tiny-sd with DDIM, and DDIM inversion where `inverse`."""
    diffusers = pytest.importorskip("diffusers")
    schedulers = dict(scheduler=diffusers.DDIMScheduler.from_pretrained(TINY_SD, subfolder="scheduler"),
                      inverse_scheduler=None)
    if inverse:
        schedulers["inverse_scheduler"] = diffusers.DDIMInverseScheduler.from_pretrained(TINY_SD, subfolder="scheduler")
    return load_diffusers("StableDiffusionPix2PixZeroPipeline", caption_generator=None, caption_processor=None,
                          **schedulers)


def edit(pipe, src, tgt, amount, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 10, "guidance_scale": 3.0, "output_type": "np", **kwargs}
    return pipe("a red circle", src, tgt, generator=gen(seed), cross_attention_guidance_amount=amount, **kwargs)


def test_same_edit_as_diffusers(pipe, embeds):
    theirs = reference()
    src, tgt = embeds
    # 30: a step size that moves the latents on tiny-sd (0.1, diffusers' default, is tuned for SD's 64x64 maps).
    for output_type in ("np", "latent"):
        ours = edit(pipe, src, tgt, 30.0, output_type=output_type).images
        ref = theirs("a red circle", source_embeds=src, target_embeds=tgt, num_inference_steps=10, guidance_scale=3.0,
                     generator=gen(0), cross_attention_guidance_amount=30.0, output_type=output_type).images
        if output_type == "np":
            assert max_pixel_diff(ours, ref) <= 2 / 255
        else:
            assert relative_error(ours, ref) < 1e-3


def test_invert_equals_diffusers_and_its_noise_reconstructs_the_image(pipe, embeds):
    theirs = reference(inverse=True)
    image = edit(pipe, *embeds, 0.0, output_type="pil").source_images[0]          # a "real" image
    # diffusers' defaults: 5 rounds of auto-correlation (5 random rolls each) and KL steps on ε at every step
    ours = pipe.invert("a red circle", image, num_inference_steps=10, generator=gen(0))
    ref = theirs.invert("a red circle", image, num_inference_steps=10, generator=gen(0))
    assert relative_error(ours.latents, ref.latents) < 1e-4                          # ~2e-6 measured
    plain = pipe.invert("a red circle", image, num_inference_steps=10, generator=gen(0), num_reg_steps=0)
    assert not torch.allclose(plain.latents, ours.latents)                          # the regularisation acts
    # Sampling from the inverted noise gives the image back (approximately), before any edit.
    back = edit(pipe, *embeds, 0.0, latents=ours.latents).source_images[0]
    assert np.abs(back - np.asarray(image) / 255).mean() < 0.06                     # 0.027 measured


def test_no_direction_and_no_guidance_is_plain_generation(pipe, embeds):
    src, _ = embeds
    out = edit(pipe, src, src, 0.0)
    plain = plain_pipeline(pipe)("a red circle", num_inference_steps=10, guidance_scale=3.0, output_type="np",
                                 generator=gen(0)).images
    assert max_pixel_diff(out.images, plain) < 1e-4
    assert max_pixel_diff(out.source_images, plain) < 1e-4


def test_guidance_pulls_the_maps_towards_the_reference(pipe, embeds):
    src, tgt = embeds
    free = edit(pipe, src, tgt, 0.0, return_intermediates=True)
    guided = edit(pipe, src, tgt, 1.0, return_intermediates=True)
    assert len(guided.attention_loss) == len(guided.attention_loss_after) == len(guided.source_maps) == 10
    assert guided.edited_maps[0].shape == (1, 77, H, H)
    assert guided.attention_loss[0] == pytest.approx(free.attention_loss[0])   # before the first step: the same
    assert free.attention_loss_after == pytest.approx(free.attention_loss)      # no step, no change
    # Each gradient step lowers the loss it descends, at every step (measured on the second tiny-sd: by 0.2-0.8).
    # (The losses of later steps need not fall: each starts from a new x_{t-1}. At λ = 30 the first step overshoots.)
    assert all(after < before for before, after in zip(guided.attention_loss, guided.attention_loss_after))
    assert len(guided.intermediates.latents) == len(guided.source_intermediates.latents) == 10


def test_edit_direction_changes_the_colour_and_captions_work(pipe):
    out = pipe("a red circle", SOURCE, TARGET, num_inference_steps=20, guidance_scale=3.0, num_images_per_prompt=2,
               generator=gens(1, 2), cross_attention_guidance_amount=1.0)
    assert [evaluate.analyse(i).color for i in out.source_images] == ["red", "red"]
    assert [evaluate.analyse(i).color for i in out.images] == ["blue", "blue"]
    source, edited = (evaluate.analyse(i) for i in (out.source_images[0], out.images[0]))
    assert source.shape == edited.shape


def test_direction_is_the_difference_of_the_means(pipe, embeds):
    src, tgt = embeds
    many = pipe.as_embeds(SOURCE, "source_embeds")
    assert many.shape == (1, 77, 64) and torch.allclose(many, src)
    two = torch.stack([torch.zeros(77, 64), torch.ones(77, 64)])
    assert torch.equal(pipe.construct_direction(two, 3 * two), torch.ones(1, 77, 64))


def test_bad_inputs_are_explained(pipe, embeds):
    src, tgt = embeds
    with pytest.raises(ValueError, match=r"source_embeds must be CLIP embeddings of shape \(N, 77, 64\)"):
        edit(pipe, src[0], tgt, 0.1)
    with pytest.raises(ValueError, match="target_embeds must be .* found NoneType"):
        edit(pipe, src, None, 0.1)
    with pytest.raises(ValueError, match="cross_attention_guidance_amount must be a number >= 0"):
        edit(pipe, src, tgt, -1.0)
    with pytest.raises(ValueError, match=rf"latents must have shape \(1, 4, {H}, {H}\)"):
        edit(pipe, src, tgt, 0.1, latents=torch.randn(1, 4, 2 * H, 2 * H))
    with pytest.raises(TypeError, match="captions must be a string or a non-empty list"):
        pipe.get_embeds([])
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="lambda_kl must be a number >= 0"):
        pipe.invert("a red circle", image, num_inference_steps=2, lambda_kl=-1.0)
    with pytest.raises(TypeError, match="invert takes one torch.Generator"):
        pipe.invert("a red circle", image, num_inference_steps=2, generator=[torch.Generator()])
