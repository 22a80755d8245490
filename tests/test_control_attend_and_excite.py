"""minidiff.control.attend_and_excite against diffusers' StableDiffusionAttendAndExcitePipeline on tiny-sd, and its
mechanism: no update is plain generation, the updates lower the loss, the pieces equal diffusers' own."""

import pytest
import torch
from transformers import CLIPTokenizer
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
    pipeline_stable_diffusion_attend_and_excite as reference)

from helpers import gen, load_diffusers, load_minidiff, max_pixel_diff, plain_pipeline, tiny_sd_sizes
from minidiff.checkpoints import TINY_SD
from minidiff.control.attend_and_excite import (StableDiffusionAttendAndExcitePipeline, attend_and_excite_loss,
                                                gaussian_kernel, max_attention_per_token)
from minidiff.pipelines.text import encode_text

PIXEL = 2 / 255  # the bound on the largest pixel difference (images in [0, 1])
PROMPT = "a red circle and a blue square"
# The subjects' token indices (0 is the start token): 3 and 8 for the first tiny-sd, whose tokenizer splits "and"
# into two pieces; 3 and 7 for the second. END: the end token's index. H: the largest attention maps' side.
WORDS = CLIPTokenizer.from_pretrained(TINY_SD, subfolder="tokenizer").tokenize(PROMPT)
SUBJECTS = [1 + WORDS.index("circle</w>"), 1 + WORDS.index("square</w>")]
END = 1 + len(WORDS)
_, H = tiny_sd_sizes()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_minidiff(StableDiffusionAttendAndExcitePipeline)


@pytest.fixture(scope="module")
def ref():
    return load_diffusers("StableDiffusionAttendAndExcitePipeline")


# --- parity with diffusers ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_factor, thresholds", [(20, None), (20, {0: 0.3, 3: 0.5})])
def test_parity_with_diffusers(pipe, ref, scale_factor, thresholds):
    """tiny-sd's largest cross-attention maps are H x H (the latent's side), so attn_res=(H, H). Refinement runs at
    every threshold step (L stays near 0.9, above both thresholds). At scale 200 the refinement's 20 steps amplify
    the two libraries' rounding differences (0.66 apart on the second tiny-sd), so both cases use 20."""
    kwargs = dict(token_indices=SUBJECTS, num_inference_steps=8, guidance_scale=3.0, max_iter_to_alter=5,
                  scale_factor=scale_factor, attn_res=(H, H), output_type="np")
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    out = pipe(PROMPT, generator=gen(0), **kwargs)
    expected = ref(PROMPT, generator=gen(0), **kwargs).images
    assert out.images.shape == (1, 64, 64, 3) and out.images.std() > 0.02
    assert max_pixel_diff(out.images, expected) <= PIXEL
    assert len(out.losses) == 5 and all(0 < loss[0] <= 1 for loss in out.losses)
    # The updates matter: the image is not the plain one.
    plain_image = plain_pipeline(pipe)(PROMPT, generator=gen(0), num_inference_steps=8, guidance_scale=3.0,
                                       output_type="np").images
    assert max_pixel_diff(out.images, plain_image) > 10 / 255


def test_get_indices_as_diffusers(pipe, ref):
    assert pipe.get_indices(PROMPT) == ref.get_indices(PROMPT)
    indices = pipe.get_indices(PROMPT)
    assert indices[SUBJECTS[0]] == "circle</w>" and indices[SUBJECTS[1]] == "square</w>"
    assert indices[0] == "<|startoftext|>" and indices[END] == "<|endoftext|>" and len(WORDS) >= 7


def test_smoothing_and_max_attention_as_diffusers():
    smoothing = reference.GaussianSmoothing()
    assert torch.allclose(gaussian_kernel(), smoothing.weight, atol=1e-7)
    maps = torch.rand(77, 8, 8).softmax(dim=0)                         # (77, h, w): tokens sum to 1 per patch
    ours = max_attention_per_token(maps, SUBJECTS)
    theirs = reference.StableDiffusionAttendAndExcitePipeline._compute_max_attention_per_index(
        maps.permute(1, 2, 0).clone(), SUBJECTS)                        # diffusers' maps are (h, w, 77)
    assert torch.allclose(ours, torch.stack(theirs), atol=1e-6)
    loss = attend_and_excite_loss(ours)
    assert torch.allclose(loss, reference.StableDiffusionAttendAndExcitePipeline._compute_loss(theirs))


# --- mechanism ------------------------------------------------------------------------------------------
def test_no_update_is_plain_generation(pipe):
    kwargs = dict(num_inference_steps=8, guidance_scale=3.0, output_type="np")
    ours = pipe(PROMPT, token_indices=SUBJECTS, max_iter_to_alter=0, thresholds={}, attn_res=(H, H), generator=gen(2),
                **kwargs)
    assert ours.losses == []
    expected = plain_pipeline(pipe)(PROMPT, generator=gen(2), **kwargs).images
    assert max_pixel_diff(ours.images, expected) <= 1e-5


def test_updates_lower_the_loss(pipe):
    """Gradient steps z <- z - α ∇L on one noisy latent: the subjects' loss goes down at every step."""
    text = encode_text(pipe.tokenizer, pipe.text_encoder, [PROMPT], "cpu")
    pipe.scheduler.set_timesteps(20)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, H, H, generator=gen(0))
    losses = []
    with torch.enable_grad():
        for _ in range(5):
            loss, z = pipe.excite(z, t, text, SUBJECTS, (H, H))
            losses.append(float(loss.detach()))
            z = z - 50 * torch.autograd.grad(loss, z)[0]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # a real gain, small on the first tiny-sd (its random text encoder's attention is nearly uniform over the
    # tokens: 1.1e-4 measured), larger on the second (0.047 measured at step 3,200 of its training)
    assert losses[0] - losses[-1] > {8: 5e-5, 16: 5e-3}[H]


# --- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(token_indices=[0, 3]), ValueError, r"not words of the prompt.*'circle</w>'"),
    (dict(token_indices=[3, END]), ValueError, rf"choose among 1 to {END - 1} \(0 is the start token, {END} the end token\)"),
    (dict(token_indices=[[3], [END - 1]]), ValueError, "2 lists of token indices for 1 prompts"),
    (dict(token_indices="circle"), TypeError, "token_indices must be"),
    (dict(token_indices=SUBJECTS, attn_res=(2 * H, 2 * H)), ValueError, rf"its layers have \[\({H}, {H}\), "),
    (dict(token_indices=SUBJECTS, thresholds={0: 1.5}), ValueError, "thresholds must be a dict"),
    (dict(token_indices=SUBJECTS, max_iter_to_alter=-1), ValueError, "max_iter_to_alter"),
    (dict(token_indices=SUBJECTS, scale_factor=-1), ValueError, "scale_factor"),
])
def test_bad_input(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, **kwargs)
