"""Semantic Guidance (minidiff.control.sega): the same images as diffusers' SemanticStableDiffusionPipeline on
tiny-sd, plain generation when nothing is edited, the colour moves the way the edit asks, and clear errors."""

import numpy as np
import pytest
import torch

from helpers import colour_share, gens, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, rel_err, tiny_sd_sizes
from minidiff.control.sega import SemanticStableDiffusionPipeline

STEPS, GUIDANCE = 15, 3.0
PROMPTS = ["a red circle", "a green square"]

ONE_CONCEPT = dict(editing_prompt="blue", edit_guidance_scale=4.0, edit_warmup_steps=3, edit_threshold=0.8,
                   edit_momentum_scale=0.3, edit_mom_beta=0.6)
# Different warm-ups (steps 2-4 guide with the first concept alone), a cooldown, one concept reversed, weights.
TWO_CONCEPTS = dict(editing_prompt=["blue", "red"], reverse_editing_direction=[False, True],
                    edit_guidance_scale=[4.0, 3.0], edit_warmup_steps=[2, 5], edit_cooldown_steps=[15, 12],
                    edit_threshold=[0.8, 0.7], edit_weights=[1.0, 0.5], edit_momentum_scale=0.3, edit_mom_beta=0.6)

F, H = tiny_sd_sizes()          # tiny-sd's pixels per latent and latent side: 8 and 8, or 4 and 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ours():
    return load_minidiff(SemanticStableDiffusionPipeline)


@pytest.fixture(scope="module")
def theirs():
    return load_diffusers("SemanticStableDiffusionPipeline")


def generate(pipe, prompts=PROMPTS, **kwargs):
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(*range(len(prompts))),
                output_type="np", **kwargs).images


@pytest.mark.parametrize("edit", [ONE_CONCEPT, TWO_CONCEPTS], ids=["one-concept", "two-concepts-one-reversed"])
def test_same_images_as_diffusers(ours, theirs, edit):
    final = {}
    mine = ours(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(0, 1),
                output_type="np", return_intermediates=True, **edit)
    reference = theirs(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(0, 1),
                       output_type="np", callback=lambda i, t, latents: final.update(latents=latents), **edit).images
    assert mine.images.shape == reference.shape == (2, 64, 64, 3)
    assert max_pixel_diff(mine.images, reference) <= 2 / 255
    assert rel_err(mine.intermediates.latents[-1], final["latents"]) < 1e-3
    # ... and the edit did something: the images are not those of the prompt alone.
    assert max_pixel_diff(mine.images, generate(ours)) > 0.2


def test_no_edit_or_zero_scale_is_plain_generation(ours):
    reference = generate(plain_pipeline(ours))
    assert np.array_equal(generate(ours), reference)
    zero = generate(ours, editing_prompt=["blue", "square"], edit_guidance_scale=0.0, edit_momentum_scale=0.0,
                    edit_warmup_steps=0)
    assert max_pixel_diff(zero, reference) <= 1 / 255


def test_adding_blue_raises_blue_and_removing_red_lowers_red(ours):
    prompts = ["a red circle"] * 3
    edit = dict(edit_guidance_scale=5.0, edit_warmup_steps=2, edit_threshold=0.8)
    plain = generate(ours, prompts)
    # concepts phrased as tiny-sd's captions are: its trained text encoder never saw a lone colour word
    bluer = generate(ours, prompts, editing_prompt="a blue circle", **edit)
    less_red = generate(ours, prompts, editing_prompt="a red circle", reverse_editing_direction=True, **edit)
    red, blue = 0, 240
    assert colour_share(plain, red).mean() > 0.02, "tiny-sd should draw the red circle to begin with"
    # measured on the second tiny-sd: blue 0.0 -> 0.098, red 0.115 -> 0.002
    assert colour_share(bluer, blue).mean() > colour_share(plain, blue).mean() + 0.05
    assert colour_share(less_red, red).mean() < 0.5 * colour_share(plain, red).mean()


def test_per_step_guidance_warm_up_and_threshold(ours):
    warmup, threshold = 4, 0.75
    out = ours(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(0, 1),
               output_type="latent", return_intermediates=True, editing_prompt=["blue", "circle"],
               edit_warmup_steps=warmup, edit_threshold=threshold, edit_momentum_scale=0.0)
    num_steps = len(ours.scheduler.timesteps)
    assert len(out.edit_guidance) == len(out.concept_guidance) == num_steps
    assert out.concept_guidance[0].shape == (2, 2, 4, H, H)                       # (C, B, 4, h, w)
    assert all(g.abs().max() == 0 for g in out.edit_guidance[:warmup])          # nothing during warm-up
    assert all(g.abs().max() > 0 for g in out.edit_guidance[warmup:])
    # Without momentum and with weights 1, the edit term is the sum of the concepts' terms.
    torch.testing.assert_close(out.edit_guidance[-1], out.concept_guidance[-1].sum(0))
    # Each concept edits the top (1 - λ) of the H x H values of every image and channel: 16 of 64 at 8 x 8.
    kept = (out.concept_guidance[-1] != 0).flatten(3).sum(-1)                    # (C, B, 4)
    assert (kept == round((1 - threshold) * H * H)).all(), kept


@pytest.mark.parametrize("bad, message", [
    (dict(editing_prompt=["blue", "red"], edit_guidance_scale=[4.0]), "edit_guidance_scale has 1 values for 2"),
    (dict(editing_prompt=["blue", "red"], reverse_editing_direction=[True]), "reverse_editing_direction has 1"),
    (dict(editing_prompt="blue", reverse_editing_direction="yes"), "reverse_editing_direction must be True"),
    (dict(editing_prompt="blue", edit_threshold=1.0), r"edit_threshold must be in \[0, 1\)"),
    (dict(editing_prompt="blue", edit_threshold=-0.1), r"edit_threshold must be in \[0, 1\)"),
    (dict(editing_prompt="blue", edit_guidance_scale=-2.0), "reverse_editing_direction=True"),
    (dict(editing_prompt="blue", edit_weights=[-1.0]), "edit_weights must be >= 0"),
    (dict(editing_prompt="blue", edit_warmup_steps=2.5), "edit_warmup_steps must be a step count"),
    (dict(editing_prompt="blue", edit_mom_beta=1.5), r"edit_mom_beta in \[0, 1\]"),
    (dict(editing_prompt="blue", guidance_scale=1.0), "needs guidance_scale > 1"),
    (dict(editing_prompt="blue", editing_prompt_embeddings=torch.zeros(1, 77, 64)), "not both"),
    (dict(sem_guidance=[torch.zeros(2, 4, 8, 8)]), f"list of {STEPS} tensors"),
])
def test_bad_arguments_are_refused(ours, bad, message):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np") | bad
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS, **kwargs)
