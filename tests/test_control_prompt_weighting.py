"""Prompt weighting and blending (minidiff/control/prompt_weighting.py): the "(word:w)" parser, token positions,
the row scaling and A1111's mean rescale, blends, and parity with diffusers' StableDiffusionPipeline called with
the same `prompt_embeds` / `negative_prompt_embeds` on tiny-sd."""

import numpy as np
import pytest
import torch

from helpers import gens, max_pixel_diff, quiet
from minidiff.control.prompt_weighting import (StableDiffusionPromptWeightingPipeline, apply_token_weights,
                                               blend_prompt_embeddings, parse_prompt_weights, prompt_token_weights,
                                               weighted_prompt_embeddings)
from minidiff.pipelines.text import encode_text

PIXEL = 2 / 255

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tiny_sd_pair):
    """(minidiff's StableDiffusionPipeline, the prompt-weighting pipeline on its components, diffusers')."""
    base, theirs = tiny_sd_pair
    return base, quiet(StableDiffusionPromptWeightingPipeline(**base.components)), theirs


def plain(pipe, prompt):
    with torch.no_grad():
        return encode_text(pipe.tokenizer, pipe.text_encoder, [prompt], pipe.device)     # (1, 77, D)


# --- parsing and token positions ----------------------------------------------------------------------
def test_parse_the_a1111_syntax():
    assert parse_prompt_weights("a red circle") == [("a red circle", 1.0)]
    assert parse_prompt_weights("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    pieces = dict(parse_prompt_weights("((red)) [circle] ((blue:1.5)) (green:0)"))
    assert pieces["red"] == pytest.approx(1.21) and pieces["circle"] == pytest.approx(1 / 1.1)
    assert pieces["blue"] == pytest.approx(1.65) and pieces["green"] == 0
    assert parse_prompt_weights("time: 5pm") == [("time", 1.0), (":", 1.0), (" 5pm", 1.0)]  # ':' outside () is text


def test_token_positions_and_weights(pipes):
    tokenizer = pipes[1].tokenizer
    plain_ids = tokenizer("a red circles", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    ids, weights = prompt_token_weights(tokenizer, "a red (circles:1.5)")
    assert torch.equal(ids, plain_ids)                       # the brackets change the weights, not the tokens
    n = len(tokenizer("circles", add_special_tokens=False).input_ids)
    assert n > 1                                             # not in tiny-sd's vocabulary: split into several tokens
    expected = torch.ones(77)
    expected[3:3 + n] = 1.5                                  # <start>, a, red, then every token of "circles"
    assert torch.equal(weights, expected)

    ids2, weights2 = prompt_token_weights(tokenizer, "a red circle", weights=[1.0, 2.0, 0.5])   # explicit, per token
    assert ids2.tolist() == tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert weights2[:5].tolist() == [1.0, 1.0, 2.0, 0.5, 1.0] and torch.all(weights2[5:] == 1)


# --- the embeddings ----------------------------------------------------------------------------------
def test_weights_of_one_give_the_plain_embeddings_exactly(pipes):
    _, ours, _ = pipes
    expected = plain(ours, "a red circle on a black background")
    for prompt, weights in [("a red circle on a black background", None),
                            ("(a red circle:1) on a (black:1.0) background", None),
                            ("a red circle on a black background", [1.0] * 7)]:
        assert torch.equal(weighted_prompt_embeddings(ours, prompt, weights), expected)


def test_a_weight_scales_its_row_then_the_mean_is_restored(pipes):
    _, ours, _ = pipes
    E = plain(ours, "a red circle")                                  # red is position 2
    weighted = weighted_prompt_embeddings(ours, "a (red:1.8) circle", renormalize=False)
    assert torch.allclose(weighted[0, 2], 1.8 * E[0, 2]) and torch.equal(weighted[0, 3:], E[0, 3:])

    # A1111's rescale, on embeddings whose mean is not 0 (a real CLIP's last LayerNorm has a bias)
    E = E + 0.3
    w = torch.ones(77)
    w[2] = 1.8
    out = apply_token_weights(E, w)
    scale = E.mean() / (E * w[None, :, None]).mean()
    assert torch.allclose(out[0, 2], 1.8 * scale * E[0, 2]) and torch.allclose(out[0, 5], scale * E[0, 5])
    assert torch.allclose(out.mean(), E.mean())
    # renormalize=True (the default) is that rescale of the encoder's own embeddings
    renormalised = weighted_prompt_embeddings(ours, "a (red:1.8) circle")
    plain_rows = plain(ours, "a red circle")
    torch.testing.assert_close(renormalised, apply_token_weights(plain_rows, w))
    final_bias = next(p for n, p in ours.text_encoder.named_parameters() if n.endswith("final_layer_norm.bias"))
    if final_bias.abs().max() == 0:
        # the first tiny-sd's random text encoder ends in a LayerNorm without bias: every row has mean 0, nothing
        # to restore
        assert torch.equal(renormalised, weighted)
    else:                                                            # a trained one: the mean is restored
        torch.testing.assert_close(renormalised.mean(), plain_rows.mean())
        ratio = renormalised[0, 2] / plain_rows[0, 2]                # 1.8 x the rescale, the same in every column
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
        assert not torch.allclose(ratio, torch.full_like(ratio, 1.8))


def test_blends(pipes):
    _, ours, _ = pipes
    red, blue = plain(ours, "a red circle"), plain(ours, "a blue circle")
    assert torch.equal(blend_prompt_embeddings(ours, ["a red circle", "a blue circle"], [1, 0]), red)
    half = blend_prompt_embeddings(ours, ["a red circle", "a blue circle"], [2.0, 2.0])   # normalised to 0.5, 0.5
    assert torch.allclose(half, (red + blue) / 2, atol=1e-6)
    extrapolated = blend_prompt_embeddings(ours, ["a red circle", "a blue circle"], [1.5, -0.5])
    assert torch.allclose(extrapolated, 1.5 * red - 0.5 * blue, atol=1e-5)


# --- the pipeline --------------------------------------------------------------------------------------
def test_parity_with_diffusers_prompt_embeds(pipes):
    _, ours, theirs = pipes
    weighted = weighted_prompt_embeddings(ours, "a (red:1.4) circle on a (black:0.8) background")
    blend = blend_prompt_embeddings(ours, ["a yellow square", "a green square"], [0.3, 0.7])
    prompt_embeds = torch.cat([weighted, blend])                             # (2, 77, D)
    negative = weighted_prompt_embeddings(ours, "a (blue:1.2) diamond").repeat(2, 1, 1)
    for negative_prompt_embeds in (None, negative):
        kwargs = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      num_inference_steps=12, guidance_scale=3.0, output_type="np")
        images = ours(generator=gens(0, 1), **kwargs).images
        expected = theirs(generator=gens(0, 1), **kwargs).images
        assert images.shape == (2, 64, 64, 3) and images.std() > 0.05
        assert max_pixel_diff(images, expected) <= PIXEL


def test_plain_prompts_give_the_base_pipelines_images(pipes):
    base, ours, _ = pipes
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, output_type="np", negative_prompt="a blue square",
                  num_images_per_prompt=2)
    images = ours(["a red circle", "a green triangle"], generator=gens(0, 1, 2, 3), **kwargs).images
    expected = base(["a red circle", "a green triangle"], generator=gens(0, 1, 2, 3), **kwargs).images
    assert np.array_equal(images, expected)


def test_weights_change_the_image(pipes):
    _, ours, _ = pipes
    kwargs = dict(num_inference_steps=12, guidance_scale=3.0, output_type="np")
    # the second object up-weighted (the causal text encoder carries "red" into "circle" and the end token, so one
    # colour word's weight alone moves the second tiny-sd little: 0.019 for "a (red:1.8) circle")
    one = ours("a red circle and a blue square", generator=gens(0, 1, 2, 3), num_images_per_prompt=4, **kwargs).images
    up = ours("a red circle and (a blue square:2.0)", generator=gens(0, 1, 2, 3), num_images_per_prompt=4,
              **kwargs).images
    assert np.abs(up - one).mean() > 0.04                                        # measured: 0.072
    # a blend slides the colour from red to blue
    red_minus_blue = []
    for b in (0.0, 0.5, 1.0):
        embeds = blend_prompt_embeddings(ours, ["a red circle on a black background",
                                                "a blue circle on a black background"], [1 - b, b])
        images = ours(prompt_embeds=embeds, generator=gens(0, 1, 2), num_images_per_prompt=3, **kwargs).images
        red_minus_blue.append(float((images[..., 0] - images[..., 2]).mean()))
    assert red_minus_blue[0] > red_minus_blue[1] > red_minus_blue[2], red_minus_blue


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, message", [
    ("a (red circle", "never closed"),
    ("a red) circle", "closes a '\\('"),
    ("a (red] circle", "closes a '\\['"),
    ("a (red:abc) circle", "not a number"),
    ("a (red:-0.5) circle", "negative weight flips"),
    ("a (red:12) circle", "far above 1"),
    ("a (((red:9))) circle", "nested groups multiply"),
])
def test_bad_prompts_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_weights(prompt)


def test_bad_weights_and_blends_are_refused(pipes):
    _, ours, _ = pipes
    with pytest.raises(ValueError, match="2 weights for the 3 tokens"):
        weighted_prompt_embeddings(ours, "a red circle", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        weighted_prompt_embeddings(ours, "a red circle", weights=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        blend_prompt_embeddings(ours, ["a red circle", "a blue circle"], [0.5, -0.5])
    with pytest.raises(ValueError, match="one blend weight per prompt"):
        blend_prompt_embeddings(ours, ["a red circle", "a blue circle"], [1.0])
    E = plain(ours, "a red circle")
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        ours("a red circle", prompt_embeds=E)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        ours()
    with pytest.raises(ValueError, match="must be a \\(P, 77, 64\\) tensor"):
        ours(prompt_embeds=E[0])
    with pytest.raises(ValueError, match="one negative embedding per prompt"):
        ours(prompt_embeds=E, negative_prompt_embeds=E.repeat(2, 1, 1), num_inference_steps=2)
