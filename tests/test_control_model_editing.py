"""minidiff.control.model_editing (TIME): the closed-form edit equals diffusers' edit_model, keeps the weights when
there is nothing to edit, restores them, changes what the edited prompt draws, and rejects bad edits clearly."""

import copy

import pytest
import torch

from helpers import gens, load_diffusers, load_minidiff, max_pixel_diff
from minidiff.control.inversion import relative_error
from minidiff.control.model_editing import StableDiffusionModelEditingPipeline, align_tokens
from minidiff.training import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    """Its own instance: the tests edit its weights (restored after each)."""
    return load_minidiff(StableDiffusionModelEditingPipeline)


@pytest.fixture(autouse=True)
def restored(pipe):
    yield
    pipe.restore_projections()


def weights(pipe):
    return {name: p.weight.detach().clone() for name, p in pipe.projections().items()}


def generate(pipe, prompt, seeds, steps=10, output_type="np"):
    return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=3.0, output_type=output_type,
                generator=gens(*seeds)).images


def test_edit_equals_diffusers_edit_model_weights_and_images(pipe):
    theirs = load_diffusers("StableDiffusionModelEditingPipeline").to(torch.float64)
    # diffusers 0.42 looks for modules named "CrossAttention" (now "Attention") with 768 input features, so on
    # any current checkpoint it finds no layer and edit_model changes nothing. Give it the layers, as its
    # __init__ meant to: every attn2's to_v, then every attn2's to_k. Its own edit_model then runs unchanged.
    ca = [m for name, m in theirs.unet.named_modules() if name.endswith("attn2")]
    theirs.ca_clip_layers = ca
    theirs.projection_matrices = [m.to_v for m in ca] + [m.to_k for m in ca]
    theirs.og_matrices = [copy.deepcopy(p) for p in theirs.projection_matrices]
    # Its torch.eye is in the default dtype: float64, so that both solve the ill-conditioned system accurately.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs.edit_model("a triangle", "a yellow triangle")
    finally:
        torch.set_default_dtype(default)
    theirs.to(torch.float32)
    pipe.edit_model("a triangle", "a yellow triangle")

    ours = weights(pipe)
    assert len(ours) == 2 * len(ca)
    errors = [relative_error(w, theirs.unet.get_submodule(name).weight) for name, w in ours.items()]
    assert max(errors) < 1e-4, errors                                     # ~4e-6 measured

    a, b = generate(pipe, "a triangle", [0, 1]), generate(theirs, "a triangle", [0, 1])
    assert max_pixel_diff(a, b) <= 2 / 255


def test_nothing_to_edit_leaves_the_weights(pipe):
    before = weights(pipe)
    pipe.edit_model("a red circle", "a red circle")                         # v*_i = W c_i: W is the solution
    assert max(relative_error(w, before[n]) for n, w in weights(pipe).items()) < 1e-4
    pipe.edit_model("a circle", "a blue circle", lamb=1e9)                 # all weight on ||W' - W||
    assert max(relative_error(w, before[n]) for n, w in weights(pipe).items()) < 1e-4
    pipe.edit_model("a circle", "a blue circle")
    assert min(relative_error(w, before[n]) for n, w in weights(pipe).items()) > 0.1


def test_restart_params_restores_and_edits_accumulate_without_it(pipe):
    before = weights(pipe)
    pipe.edit_model("a circle", "a blue circle")
    one = weights(pipe)
    pipe.edit_model("a square", "a red square")
    pipe.edit_model("a circle", "a blue circle", restart_params=True)       # back to W, then one edit
    assert all(torch.equal(w, one[n]) for n, w in weights(pipe).items())
    pipe.edit_model("a circle", "a blue circle", restart_params=False)      # the edit of the edited weights
    assert max(relative_error(w, one[n]) for n, w in weights(pipe).items()) > 1e-3
    pipe.restore_projections()
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items())


def test_edited_concept_takes_the_new_colour(pipe):
    seeds = [0, 1, 2, 3]

    def yellow():
        return sum(evaluate.analyse(i).color == "yellow" for i in generate(pipe, "a triangle", seeds, 20, "pil"))

    before = yellow()
    pipe.edit_model("a triangle", "a yellow triangle")
    after = yellow()
    assert after >= before + 2 and after >= 3, (before, after)


def test_alignment_follows_diffusers(pipe):
    tok = pipe.tokenizer
    replace = align_tokens(tok, "a circle", "a blue circle")               # BOS a blue circle EOS
    assert replace[:4] == [0, 1, 3, 4] and replace[4:] == list(range(5, 77)) + [76]
    assert len(replace) == 77


def test_bad_edits_are_explained(pipe):
    pipe.edit_model("a circle", "a blue circle")
    edited = weights(pipe)
    with pytest.raises(ValueError, match="Cannot align .* 'red' is not there"):
        pipe.edit_model("a red circle", "a blue circle")
    assert all(torch.equal(w, edited[n]) for n, w in weights(pipe).items())    # a refused edit changes nothing
    for lamb in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="lamb must be a positive finite number"):
            pipe.edit_model("a circle", "a blue circle", lamb=lamb)
    with pytest.raises(TypeError, match="destination_prompt must be a non-empty string"):
        pipe.edit_model("a circle", ["a blue circle"])
    with pytest.raises(ValueError, match="at most 77"):
        pipe.edit_model("a circle", "a blue circle" + " very" * 80)
    pipe.fuse_qkv_projections()
    try:
        with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
            pipe.edit_model("a circle", "a blue circle")
    finally:
        pipe.unfuse_qkv_projections()
