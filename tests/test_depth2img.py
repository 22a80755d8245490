"""StableDiffusionDepth2ImgPipeline against diffusers' pipeline of the same name, on a small random folder in
stable-diffusion-2-depth's layout: SD 2 UNet with in_channels 5, PNDM, and a small random DPT depth estimator.
The DPT is a non-hybrid DPTConfig (a ViT backbone; the real Intel/dpt-hybrid-midas puts a BiT-ResNet stem in
front of it): the pipeline only calls `depth_estimator(pixel_values).predicted_depth`, the same for both."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from fake_checkpoints import make_fake_sd2_depth
from helpers import gen, gens, load_minidiff, max_pixel_diff, quiet, rel_err

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
PIXEL = 1 / 255


def photo(seed: int, size=(64, 64), mode="RGB") -> PIL.Image.Image:
    """A random but smooth image (an 8x8 noise pattern scaled up), `size` = (width, height)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize(size, PIL.Image.BICUBIC).convert(mode)


def ramp(n: int = 1, size=(48, 40)) -> torch.Tensor:
    """(n, H, W) depth maps: a left-to-right ramp plus a near square, different per map."""
    d = torch.linspace(0, 1, size[1]).expand(size[0], -1).clone()
    maps = []
    for i in range(n):
        m = d.clone()
        m[8 + 4 * i: 24 + 4 * i, 10:30] += 2.0
        maps.append(m)
    return torch.stack(maps)


@pytest.fixture(scope="module")
def folder(reference_dir, tmp_path_factory):
    return str(make_fake_sd2_depth(tmp_path_factory.mktemp("depth") / "stable-diffusion-2-depth", reference_dir))


@pytest.fixture(scope="module")
def pair(folder):
    """minidiff from the folder as published; diffusers 0.42 refuses that folder under transformers 5 (its
    model_index.json names DPTFeatureExtractor, see the test below), so diffusers' pipeline is built from its own
    UNet, VAE and scheduler read from the folder and the same text encoder, tokenizer, DPT and processor."""
    ours = load_minidiff(minidiff.DiffusionPipeline, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionDepth2ImgPipeline(
            vae=diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
            unet=diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            scheduler=diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler"),
            depth_estimator=ours.depth_estimator, feature_extractor=ours.feature_extractor)
    return ours, quiet(theirs)


def test_diffusers_cannot_read_the_published_feature_extractor_entry(folder):
    """Why minidiff's loader maps DPTFeatureExtractor to DPTImageProcessor (techniques.md, "Depth2Image")."""
    if hasattr(transformers, "DPTFeatureExtractor"):
        pytest.skip("this transformers still has DPTFeatureExtractor")
    with warnings.catch_warnings(), pytest.raises((AttributeError, ValueError), match="DPTFeatureExtractor"):
        warnings.simplefilter("ignore")
        diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)


def test_loads_the_depth_layout(pair):
    ours, _ = pair
    assert type(ours) is minidiff.StableDiffusionDepth2ImgPipeline
    assert ours.unet.config.in_channels == 5 and ours.unet.config.use_linear_projection
    assert type(ours.depth_estimator).__name__ == "DPTForDepthEstimation"
    # the published DPTFeatureExtractor entry, read as its transformers 5 successor
    assert "DPTImageProcessor" in type(ours.feature_extractor).__name__
    assert type(ours.scheduler) is minidiff.PNDMScheduler


def test_depth_channel_equals_diffusers(pair):
    """DPT's estimate, resized and scaled to [-1, 1], is diffusers' depth mask (also for a given depth_map)."""
    ours, theirs = pair
    image = photo(1, (72, 56))
    ours_depth = ours.depth_channel(ours.estimate_depth(image, torch.float32), (7, 9))
    theirs_depth = theirs.prepare_depth_map(image, None, 1, False, torch.float32, torch.device("cpu"))
    assert ours_depth.shape == theirs_depth.shape == (1, 1, 7, 9)
    assert rel_err(ours_depth, theirs_depth) < 1e-5
    assert ours_depth.amin() == -1 and ours_depth.amax() == 1
    given = ramp(2)
    assert rel_err(ours.depth_channel(given, (7, 9)),
                   theirs.prepare_depth_map(image, given, 2, False, torch.float32, torch.device("cpu"))) < 1e-6


@pytest.mark.parametrize("options", [
    dict(),                                                          # DPT's depth, strength 0.8, guidance 7.5
    dict(depth_map="ramp"),
    dict(depth_map="ramp", strength=0.5),
    dict(strength=1.0, guidance_scale=3.0, negative_prompt="blurry"),
    dict(guidance_scale=1.0),
    dict(num_images_per_prompt=2, generator=[0, 1]),
    dict(size=(72, 56)),
    dict(size=(70, 61), depth_map="ramp"),                           # shrunk to multiples of 8, as diffusers does
])
def test_equals_diffusers(pair, options):
    ours, theirs = pair
    options = dict(options)
    size = options.pop("size", (64, 64))
    seeds = options.pop("generator", 0)
    if options.get("depth_map") == "ramp":
        options["depth_map"] = ramp(1)

    def run(pipe):
        generator = gens(*seeds) if isinstance(seeds, list) else gen(seeds)
        return pipe("a wooden house", image=photo(1, size), num_inference_steps=6, generator=generator,
                    output_type="np", **options).images

    a, b = run(ours), run(theirs)
    assert a.shape == b.shape and a.shape[1:3] == (size[1] // 8 * 8, size[0] // 8 * 8)
    assert max_pixel_diff(a, b) <= PIXEL


def test_two_prompts_two_images_equal_diffusers(pair):
    ours, theirs = pair
    kwargs = dict(image=[photo(2), photo(3)], num_inference_steps=5, generator=gen(4), output_type="np")
    a = ours(["a red car", "a stone wall"], **kwargs).images
    kwargs["generator"] = gen(4)
    b = theirs(["a red car", "a stone wall"], **kwargs).images
    assert max_pixel_diff(a, b) <= PIXEL


def test_the_depth_changes_the_result(pair):
    """Not a no-op: another depth map gives another picture from the same image, noise and prompt."""
    ours, _ = pair
    run = dict(image=photo(1), num_inference_steps=4, output_type="np")
    a = ours("a house", depth_map=ramp(1), generator=gen(0), **run).images
    b = ours("a house", depth_map=ramp(1).flip(-1), generator=gen(0), **run).images
    assert max_pixel_diff(a, b) > 0.01


def test_every_step_is_recorded(pair):
    ours, _ = pair
    seen = []
    out = ours("a house", image=photo(1), strength=0.5, num_inference_steps=6, generator=gen(0), output_type="latent",
               callback=lambda i, t, latents, x0: seen.append(i), return_intermediates=True)
    assert seen == [0, 1, 2, 3]   # the last int(0.5 · 6) = 3 steps, PNDM's repeated first timestep included
    assert len(out.intermediates.x0) == 4 and torch.equal(out.intermediates.latents[-1], out.images)


def counting_unet(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("bad, message", [
    (dict(depth_map=ramp(1)[0]), r"found shape \(48, 40\). For one \(H, W\) map pass depth_map\[None\]"),
    (dict(depth_map=ramp(1)[:, None]), r"For a \(M, 1, H, W\) map pass depth_map\[:, 0\]"),
    (dict(depth_map=ramp(3)), r"M = 1 or 1 \(one map per image\); found shape \(3, 48, 40\)"),
    (dict(depth_map=ramp(1).long()), "depth_map must be a float tensor"),
    (dict(depth_map=ramp(1) * float("nan")), "depth_map"),
    (dict(depth_map=np.zeros((1, 8, 8))), "depth_map must be a torch tensor"),
    (dict(depth_map=torch.ones(1, 40, 48)), "constant"),
    (dict(image=photo(1, mode="RGBA")), "mode 'RGBA'; expected 'RGB'"),
    (dict(image=photo(1, size=(4, 4))), "at least 8x8"),
    (dict(strength=0.0), "strength must be a number in"),
])
def test_bad_inputs_refused_before_the_unet_runs(folder, bad, message):
    pipe = load_minidiff(minidiff.StableDiffusionDepth2ImgPipeline, folder)
    calls = counting_unet(pipe)
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**{"prompt": "a house", "image": photo(1), "num_inference_steps": 2, **bad})
    assert calls == []


def test_a_unet_without_5_input_channels_is_refused(tiny_sd_pair):
    parts = tiny_sd_pair[0].components
    pipe = quiet(minidiff.StableDiffusionDepth2ImgPipeline(**parts))
    with pytest.raises(ValueError, match="in_channels=5 .*this UNet has in_channels=4.*stable-diffusion-2-depth"):
        pipe("a house", image=photo(1), depth_map=ramp(1), num_inference_steps=2)


def test_without_a_depth_estimator_depth_map_is_needed(pair):
    ours, _ = pair
    parts = {**ours.components, "depth_estimator": None, "feature_extractor": None}
    pipe = quiet(minidiff.StableDiffusionDepth2ImgPipeline(**parts))
    with pytest.raises(ValueError, match="no depth_estimator .*pass depth_map="):
        pipe("a house", image=photo(1), num_inference_steps=2)
    assert pipe("a house", image=photo(1), depth_map=ramp(1), num_inference_steps=2, output_type="np").images.shape \
        == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="depth_estimator and feature_extractor go together"):
        minidiff.StableDiffusionDepth2ImgPipeline(**{**ours.components, "feature_extractor": None})
    with pytest.raises(TypeError, match="depth_estimator must be an instance of DPTForDepthEstimation"):
        minidiff.StableDiffusionDepth2ImgPipeline(**{**ours.components, "depth_estimator": ours.vae})


def test_from_pretrained_keeps_a_given_feature_extractor_and_does_not_warn(folder, pair):
    ours, _ = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = minidiff.DiffusionPipeline.from_pretrained(folder, feature_extractor=ours.feature_extractor)
    assert pipe.feature_extractor is ours.feature_extractor
    assert not [w for w in caught if "does not load" in str(w.message)]


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_v_prediction_and_other_schedulers_equal_diffusers(pair, name):
    """The depth UNet read as a v-prediction model with three other schedulers: both libraries agree."""
    ours, theirs = pair
    o = quiet(minidiff.StableDiffusionDepth2ImgPipeline(**ours.components))
    o.scheduler = getattr(minidiff, name).from_config(ours.scheduler.config, prediction_type="v_prediction")
    t = quiet(diffusers.StableDiffusionDepth2ImgPipeline(**theirs.components))
    t.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config, prediction_type="v_prediction")
    run = dict(image=photo(5), depth_map=ramp(1), strength=0.9, num_inference_steps=6, output_type="np")
    a = o("a house", generator=gen(8), **run).images
    b = t("a house", generator=gen(8), **run).images
    assert max_pixel_diff(a, b) <= PIXEL


def test_bfloat16_reaches_the_depth_estimator_and_runs(folder):
    """torch_dtype loads the DPT in it too; its estimate runs under autocast (as diffusers, for DPT-Hybrid's batch
    norms) and the whole call gives a finite image."""
    pipe = load_minidiff(minidiff.DiffusionPipeline, folder, torch_dtype=torch.bfloat16)
    assert pipe.depth_estimator.dtype == pipe.unet.dtype == torch.bfloat16
    depth = pipe.depth_channel(pipe.estimate_depth(photo(1), torch.bfloat16), (8, 8))
    assert depth.dtype == torch.bfloat16 and depth.amin() == -1 and depth.amax() == 1
    images = pipe("a house", image=photo(1), num_inference_steps=3, generator=gen(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
