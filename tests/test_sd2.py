"""Stable Diffusion 2.x (stable-diffusion-2-1, -2-1-base, -2-depth) against diffusers: the UNet at the real configs,
the pipelines on small random SD 2-like folders, and v-prediction through every scheduler with its per-step x0.

What SD 2 changes from v1, all read from the folder's config files (tests/fake_checkpoints.py spells out the
published ones): per-block head counts (attention_head_dim [5, 10, 20, 20]), linear projections in the spatial
transformers, cross-attention on 1024-wide OpenCLIP text (a CLIPTextModel with "gelu"), a tokenizer that pads
with "!" (id 0), and for 2-1 v-prediction with a DDIM scheduler and upcast_attention.
"""

import warnings

import pytest
import torch

import minidiff
from fake_checkpoints import SD2_BASE_UNET, SD2_DEPTH_UNET, SD2_UNET, make_fake_sd, make_fake_sd2
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet, randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

REAL_CONFIGS = {"2-1": SD2_UNET, "2-1-base": SD2_BASE_UNET, "2-depth": SD2_DEPTH_UNET}
PIXEL = 1 / 255


# --- the UNet at the real configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_unet_real_config_builds_diffusers_keys_and_shapes(name):
    """Built on the meta device (no memory, no time): every parameter name and shape equals diffusers' at the
    published config, and the 2-1 UNet has its 865,910,724 parameters."""
    with torch.device("meta"):
        ours = minidiff.UNet2DConditionModel.from_config(REAL_CONFIGS[name])
        theirs = diffusers.UNet2DConditionModel.from_config(REAL_CONFIGS[name])
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    # heads per block as the config says: 320 channels / 5 heads = 64 dims a head, as at every level of SD 2
    attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 5
    n = sum(v.numel() for v in ours.parameters())
    assert n == {"2-1": 865_910_724, "2-1-base": 865_910_724, "2-depth": 865_910_724 + 320 * 9}[name]


@pytest.mark.parametrize("name", ["2-1", "2-depth"])
def test_unet_narrowed_real_structure_equals_diffusers(name):
    """The real config with the channel widths divided by 2 (160, 320, 640, 640), everything else as published
    (heads [5, 10, 20, 20], linear projections, 1024-wide text, upcast_attention, in_channels): one forward, every
    weight random, relative error <= 1e-3 in float32. The full-size numbers: the slow test below."""
    config = {**REAL_CONFIGS[name], "block_out_channels": [160, 320, 640, 640]}
    ours = randomize_(minidiff.UNet2DConditionModel.from_config(config)).eval()
    theirs = diffusers.UNet2DConditionModel.from_config(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, config["in_channels"], 16, 16, generator=gen(1))
    text = torch.randn(2, 77, 1024, generator=gen(2))
    t = torch.tensor([981, 37])
    with torch.no_grad():
        err = rel_err(ours(x, t, encoder_hidden_states=text).sample, theirs(x, t, encoder_hidden_states=text).sample)
    assert err <= 1e-3, err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["2-1", "2-depth"])
def test_unet_full_size_real_config_equals_diffusers(name):
    """The full-size UNet (865 M parameters, 3.5 GB in float32) at the published config, every weight random, one
    forward on an 8x8 latent: relative error <= 1e-3. To fit the 2-core CI machine diffusers' model is built on
    the meta device and takes minidiff's tensors (assign=True): one copy of the weights, about 30 s in all."""
    config = REAL_CONFIGS[name]
    ours = randomize_(minidiff.UNet2DConditionModel.from_config(config)).eval()
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel.from_config(config)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    theirs.eval()
    x = torch.randn(1, config["in_channels"], 8, 8, generator=gen(1))
    text = torch.randn(1, 77, 1024, generator=gen(2))
    with torch.no_grad():
        err = rel_err(ours(x, 500, encoder_hidden_states=text).sample, theirs(x, 500, encoder_hidden_states=text).sample)
    assert err <= 1e-3, err


# --- loading the SD 2 layout ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_folders(reference_dir, tmp_path_factory):
    """{"2-1": v-prediction / DDIM / upcast folder, "2-1-base": epsilon / PNDM folder}, small and random."""
    root = tmp_path_factory.mktemp("sd2")
    return {"2-1": make_fake_sd2(root / "2-1", reference_dir, v_prediction=True),
            "2-1-base": make_fake_sd2(root / "2-1-base", reference_dir, v_prediction=False)}


@pytest.fixture(scope="module")
def sd2_pair(sd2_folders):
    """(minidiff, diffusers) text-to-image pipelines on the 2-1 (v-prediction) folder."""
    folder = str(sd2_folders["2-1"])
    return load_minidiff(minidiff.DiffusionPipeline, folder), load_diffusers("StableDiffusionPipeline", folder)


def test_from_pretrained_reads_the_sd2_layout(sd2_folders, reference_dir, tmp_path):
    ours = load_minidiff(minidiff.DiffusionPipeline, str(sd2_folders["2-1"]))
    base = load_minidiff(minidiff.DiffusionPipeline, str(sd2_folders["2-1-base"]))
    assert type(ours) is minidiff.StableDiffusionPipeline
    assert type(ours.scheduler) is minidiff.DDIMScheduler and ours.scheduler.config.prediction_type == "v_prediction"
    assert type(base.scheduler) is minidiff.PNDMScheduler and base.scheduler.config.prediction_type == "epsilon"
    assert ours.unet.config.upcast_attention and not base.unet.config.upcast_attention
    assert ours.unet.config.use_linear_projection and ours.unet.config.attention_head_dim == (2, 2, 4, 4)
    assert ours.text_encoder.config.hidden_act == "gelu"
    # OpenCLIP pads with "!" (id 0); SD v1's tokenizer pads with <|endoftext|> (49407)
    ids = ours.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}
    v1 = load_minidiff(minidiff.DiffusionPipeline, str(make_fake_sd(tmp_path / "v1", reference_dir)))
    assert set(v1.tokenizer("a cat", padding="max_length", max_length=77).input_ids[4:]) == {49407}


@pytest.mark.parametrize("options", [
    dict(),                                                                      # guidance 7.5
    dict(negative_prompt="blurry", guidance_scale=4.0),
    dict(guidance_scale=1.0),                                                    # one UNet pass a step
    dict(num_images_per_prompt=2, generator=gens(3, 4)),
    dict(height=48, width=80),
])
def test_text_to_image_v_prediction_equals_diffusers(sd2_pair, options):
    ours, theirs = sd2_pair
    options = {"generator": gen(0), **options}
    a = ours("a red cube", num_inference_steps=5, output_type="np", **options).images
    options["generator"] = gens(3, 4) if isinstance(options["generator"], list) else gen(0)
    b = theirs("a red cube", num_inference_steps=5, output_type="np", **options).images
    assert a.shape == b.shape and max_pixel_diff(a, b) <= PIXEL


def test_text_to_image_sd2_base_epsilon_equals_diffusers(sd2_folders):
    folder = str(sd2_folders["2-1-base"])
    ours, theirs = load_minidiff(minidiff.DiffusionPipeline, folder), load_diffusers("StableDiffusionPipeline", folder)
    a = ours("a blue ball", num_inference_steps=6, generator=gen(5), output_type="np").images
    b = theirs("a blue ball", num_inference_steps=6, generator=gen(5), output_type="np").images
    assert max_pixel_diff(a, b) <= PIXEL


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_image_to_image_v_prediction_equals_diffusers(sd2_folders, strength):
    folder = str(sd2_folders["2-1"])
    ours = load_minidiff(minidiff.StableDiffusionImg2ImgPipeline, folder)
    theirs = load_diffusers("StableDiffusionImg2ImgPipeline", folder)
    image = torch.rand(1, 3, 64, 64, generator=gen(7))
    a = ours("a cat", image=image, strength=strength, num_inference_steps=6, generator=gen(1), output_type="np").images
    b = theirs("a cat", image=image, strength=strength, num_inference_steps=6, generator=gen(1), output_type="np").images
    assert max_pixel_diff(a, b) <= PIXEL


# --- v-prediction through every scheduler ---------------------------------------------------------------------
SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_prediction_with_every_scheduler_equals_diffusers(sd2_pair, name):
    """The 2-1 folder's v-prediction config given to each scheduler, in both libraries: same images."""
    ours, theirs = sd2_pair
    ours = quiet(minidiff.StableDiffusionPipeline(**ours.components))
    ours.scheduler = getattr(minidiff, name).from_config(ours.scheduler.config)
    theirs = quiet(diffusers.StableDiffusionPipeline(**theirs.components))
    theirs.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    a = ours("a green star", num_inference_steps=6, guidance_scale=3.0, generator=gen(2), output_type="np").images
    b = theirs("a green star", num_inference_steps=6, guidance_scale=3.0, generator=gen(2), output_type="np").images
    assert max_pixel_diff(a, b) <= PIXEL


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_prediction_x0_per_step(sd2_pair, name):
    """The recorded x0 at every step is the one v gives (Salimans & Ho 2022, sec. 4 and appendix D), computed
    here independently from what the UNet saw and said: with u = the UNet's input (scaled to the variance-
    preserving x_t) and ᾱ_t its noise level, x0 = sqrt(ᾱ_t) u - sqrt(1 - ᾱ_t) v. For the Euler schedulers
    ᾱ_t = 1 / (1 + σ²), σ being the step's sigma. guidance_scale 1: one UNet call a step."""
    pipe = quiet(minidiff.StableDiffusionPipeline(**sd2_pair[0].components))
    pipe.scheduler = getattr(minidiff, name).from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.sample.clone())))
    try:
        out = pipe("a cat", num_inference_steps=5, guidance_scale=1.0, generator=gen(4), output_type="latent",
                   return_intermediates=True)
    finally:
        hook.remove()
    steps = out.intermediates
    assert len(steps.x0) == len(seen) == len(pipe.scheduler.timesteps)
    for i, ((u, v), t, x0) in enumerate(zip(seen, steps.timesteps, steps.x0)):
        if "Euler" in name:
            alpha_bar = 1 / (1 + pipe.scheduler.sigmas[i].double() ** 2)
        else:
            alpha_bar = pipe.scheduler.alphas_cumprod[int(t)].double()
        expected = alpha_bar ** 0.5 * u.double() - (1 - alpha_bar) ** 0.5 * v.double()
        assert rel_err(x0, expected) < 1e-4, (i, rel_err(x0, expected))
    # and the model is no epsilon model: read as ε, the same output would give another x0
    u, v = seen[0]
    alpha_bar = 1 / (1 + pipe.scheduler.sigmas[0] ** 2) if "Euler" in name else pipe.scheduler.alphas_cumprod[
        int(steps.timesteps[0])]
    as_eps = (u - (1 - alpha_bar) ** 0.5 * v) / alpha_bar ** 0.5
    assert rel_err(steps.x0[0], as_eps) > 0.1


def test_torch_dtype_reaches_the_sd2_text_encoder(sd2_folders):
    """torch_dtype reaches the OpenCLIP-sized text encoder too (CLIPTextModel in SD 2's folder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = minidiff.DiffusionPipeline.from_pretrained(str(sd2_folders["2-1"]), torch_dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.bfloat16


def _mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[8:40, 16:56] = 1.0                              # repaint a box, keep the rest
    return mask


# The controlled pipelines on the SD 2-1 folder (v-prediction, DDIM): each with an option that makes its control act.
CONTROLLED = {
    "StableDiffusionInpaintPipeline": dict(image=torch.rand(1, 3, 64, 64, generator=gen(3)), mask_image=_mask(),
                                           strength=0.75),
    "StableDiffusionSAGPipeline": dict(sag_scale=1.0),
    "SemanticStableDiffusionPipeline": dict(editing_prompt=["blue"], edit_guidance_scale=4.0, edit_warmup_steps=1,
                                            edit_threshold=0.5),
}


@pytest.mark.parametrize("name", CONTROLLED)
def test_controlled_pipelines_with_v_prediction_equal_diffusers(sd2_pair, name):
    """v-prediction reaches the controlled pipelines too (SAG computes its x0 from the model output itself)."""
    ours, theirs = sd2_pair
    mine = quiet(getattr(minidiff, name)(**ours.components))
    parts = {k: getattr(theirs, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    reference = quiet(getattr(diffusers, name)(**parts, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False))
    run = dict(num_inference_steps=6, guidance_scale=3.0, output_type="np", **CONTROLLED[name])
    a = mine("a red cube", generator=gen(1), **run).images
    b = reference("a red cube", generator=gen(1), **run).images
    assert max_pixel_diff(a, b) <= PIXEL
