"""ControlNetModel against diffusers' with every weight random (the zero convolutions too), its loading, from_unet,
its errors, and StableDiffusionControlNetPipeline against diffusers' on a small random SD model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import ControlNetModel as RefControlNet
from diffusers import UNet2DConditionModel as RefUNet
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel as RefMulti

import minidiff
from fake_checkpoints import make_fake_sd
from helpers import gen, gens, load_diffusers, load_minidiff, max_pixel_diff, quiet, randomize_, rel_err
from minidiff import UNet2DConditionModel
from minidiff.control.controlnet import StableDiffusionControlNetPipeline
from minidiff.models.controlnet import ControlNetModel, MultiControlNetModel, check_controlnet_fits_unet
from minidiff.models.modeling import load_strict

pytestmark = pytest.mark.usefixtures("one_thread")

# lllyasviel/sd-controlnet-canny's config.json (values from ../shared/reference/techniques.md; the keys it leaves
# out take the defaults conditioning_channels 3 and global_pool_conditions false).
CANNY_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.14.0.dev0",
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}

SMALL = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
             conditioning_embedding_out_channels=(8, 16))
SMALL_UNET = dict(SMALL, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
del SMALL_UNET["conditioning_embedding_out_channels"]


def make_pair(config: dict, tmp_path, seed: int = 0, safe_serialization: bool = True):
    """diffusers' ControlNet with every weight random (zero convs included), saved by diffusers, loaded by minidiff."""
    ref = randomize_(RefControlNet(**config), seed=seed).eval()
    ref.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    return ControlNetModel.from_pretrained(tmp_path), ref


def inputs(B, h, w, text_dim, f=2, M=7, channels=3):
    return torch.randn(B, 4, h, w), torch.randn(B, M, text_dim), torch.rand(B, channels, f * h, f * w)


def assert_residuals_equal(out, ref_out, bound):
    down, ref_down = out.down_block_res_samples, ref_out.down_block_res_samples
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert a.shape == b.shape and b.abs().max() > 0
        assert rel_err(a, b) <= bound
    assert rel_err(out.mid_block_res_sample, ref_out.mid_block_res_sample) <= bound
    return max([rel_err(a, b) for a, b in zip(down, ref_down)]
               + [rel_err(out.mid_block_res_sample, ref_out.mid_block_res_sample)])


@pytest.mark.parametrize("options", [
    dict(),
    dict(conditioning_scale=0.6),
    dict(conditioning_scale=0.6, guess_mode=True),
    dict(config=dict(controlnet_conditioning_channel_order="bgr")),
    dict(config=dict(global_pool_conditions=True), conditioning_scale=0.5),
    dict(config=dict(layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))),
])
@pytest.mark.parametrize("B, h, w, timestep", [(2, 9, 11, torch.tensor([3, 801])), (1, 8, 8, 500)])
@torch.no_grad()
def test_parity_small(options, B, h, w, timestep, tmp_path):
    options = dict(options)
    config = {**SMALL, **options.pop("config", {})}
    model, ref = make_pair(config, tmp_path)
    sample, text, cond = inputs(B, h, w, config["cross_attention_dim"])
    out = model(sample, timestep, text, cond, **options)
    expected = ref(sample, timestep, text, cond, **options)
    assert_residuals_equal(out, expected, 1e-5)
    down, mid = model(sample, timestep, text, cond, return_dict=False, **options)
    assert torch.equal(mid, out.mid_block_res_sample) and len(down) == len(out.down_block_res_samples)


@pytest.mark.slow
@torch.no_grad()
def test_parity_at_the_real_canny_config():
    """The sd-controlnet-canny architecture (361 M parameters), fp32 on the CPU, every weight random."""
    ref = randomize_(RefControlNet.from_config(CANNY_CONFIG), seed=1).eval()
    model = ControlNetModel.from_config(CANNY_CONFIG)
    load_strict(model, ref.state_dict(), "diffusers' ControlNetModel at the sd-controlnet-canny config")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert len(model.controlnet_down_blocks) == 12
    sample, text, cond = inputs(1, 8, 8, 768, f=8, M=77)
    out = model.eval()(sample, 700, text, cond, conditioning_scale=0.8)
    expected = ref(sample, 700, text, cond, conditioning_scale=0.8)
    worst = assert_residuals_equal(out, expected, 1e-4)
    print(f"sd-controlnet-canny config: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"largest relative error over the 13 residuals {worst:.2e}")


def test_from_pretrained_reads_bin_files_with_weights_only(tmp_path):
    """The v1.1 repos ship pickled .bin files: they are read with torch.load(weights_only=True)."""
    model, ref = make_pair(SMALL, tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


class NotATensor:
    """A pickle that would run code if it were unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("pickle executed",))


def test_a_pickle_with_code_is_refused(tmp_path):
    ref = RefControlNet(**SMALL)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    torch.save({"weight": NotATensor()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="Could not read the weight file"):
        ControlNetModel.from_pretrained(tmp_path)


def test_strict_loading_names_the_mismatch(tmp_path):
    ref = RefControlNet(**SMALL)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["conditioning_embedding_out_channels"] = [8, 16, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \(4\): controlnet_cond_embedding.blocks.2.bias"):
        ControlNetModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("addition_embed_type", "text_time", "addition_embed_type='text_time'"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleDownBlock2D"], "SimpleDownBlock2D"),
    ("layers_per_block", [1, 2], "one int"),
    ("dropout", 0.1, "does not implement the config key"),
])
def test_unsupported_configs_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        ControlNetModel.from_config({**SMALL, key: value})


@torch.no_grad()
def test_from_unet_copies_the_encoder_and_starts_at_zero(tmp_path):
    """Training starts from the UNet's encoder and zero convolutions: every residual is 0, the UNet unchanged."""
    ref_unet = randomize_(RefUNet(**SMALL_UNET)).eval()
    ref_unet.save_pretrained(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    ref_controlnet = RefControlNet.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16))
    ours, theirs = controlnet.state_dict(), ref_controlnet.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            assert not ours[key].any(), key                               # the zero convolutions
        elif not key.startswith("controlnet_cond_embedding"):
            assert torch.equal(ours[key], theirs[key]), key               # the copy of the UNet's encoder
            assert torch.equal(ours[key], unet.state_dict()[key]), key

    sample, text, cond = inputs(2, 8, 8, 24)
    out = controlnet(sample, 10, text, cond)
    assert all(not r.any() for r in out.down_block_res_samples) and not out.mid_block_res_sample.any()
    plain = unet(sample, 10, text).sample
    steered = unet(sample, 10, text, down_block_additional_residuals=out.down_block_res_samples,
                   mid_block_additional_residual=out.mid_block_res_sample).sample
    assert torch.equal(plain, steered)
    check_controlnet_fits_unet(controlnet, unet)


@torch.no_grad()
def test_unet_with_controlnet_residuals_equals_diffusers(tmp_path):
    ref_unet = randomize_(RefUNet(**SMALL_UNET), seed=3).eval()
    ref_unet.save_pretrained(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    controlnet, ref_controlnet = make_pair(SMALL, tmp_path / "controlnet")
    sample, text, cond = inputs(2, 9, 11, 24)
    out = controlnet(sample, 42, text, cond)
    ref_down, ref_mid = ref_controlnet(sample, 42, text, cond, return_dict=False)
    eps = unet(sample, 42, text, down_block_additional_residuals=out.down_block_res_samples,
               mid_block_additional_residual=out.mid_block_res_sample).sample
    ref_eps = ref_unet(sample, 42, text, down_block_additional_residuals=ref_down,
                       mid_block_additional_residual=ref_mid).sample
    assert rel_err(eps, ref_eps) < 1e-5
    assert rel_err(eps, unet(sample, 42, text).sample) > 1e-3


@torch.no_grad()
def test_multi_controlnet_sums_the_residuals(tmp_path):
    (a, ref_a), (b, ref_b) = make_pair(SMALL, tmp_path / "a", seed=1), make_pair(SMALL, tmp_path / "b", seed=2)
    sample, text, cond = inputs(1, 8, 8, 24)
    cond_b = torch.rand_like(cond)
    multi = MultiControlNetModel([a, b])
    out = multi(sample, 5, text, [cond, cond_b], [0.3, 1.2])
    ref_down, ref_mid = RefMulti([ref_a, ref_b])(sample, 5, text, [cond, cond_b], [0.3, 1.2], return_dict=False)
    for x, y in zip(out.down_block_res_samples, ref_down):
        assert rel_err(x, y) < 1e-5
    assert rel_err(out.mid_block_res_sample, ref_mid) < 1e-5
    with pytest.raises(ValueError, match="one condition image and one scale per ControlNet"):
        multi(sample, 5, text, [cond], [0.3, 1.2])


def test_wrong_condition_image_is_refused(tmp_path):
    model, _ = make_pair(SMALL, tmp_path)
    sample, text, cond = inputs(1, 8, 8, 24)
    with pytest.raises(ValueError, match=r"controlnet_cond of shape \(1, 3, 16, 16\).*Found \(1, 1, 16, 16\)"):
        model(sample, 5, text, cond[:, :1])
    with pytest.raises(ValueError, match=r"Resize the condition image to 16x16"):
        model(sample, 5, text, cond[..., :12, :12])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(sample, 5, text[..., :8], cond)


def test_a_controlnet_for_another_unet_is_refused(tmp_path):
    unet = UNet2DConditionModel.from_config(SMALL_UNET)
    for change in (dict(cross_attention_dim=32), dict(block_out_channels=(32, 32))):
        controlnet = ControlNetModel.from_config({**SMALL, **change})
        with pytest.raises(ValueError, match=f"built for another UNet: {next(iter(change))}"):
            check_controlnet_fits_unet(controlnet, unet)


# --- StableDiffusionControlNetPipeline against diffusers' on a small random SD model --------------------------------
STEPS = 4


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    """A small CompVis/stable-diffusion-v1-4 look-alike (64x64 pixels, every weight random) and two ControlNets for
    its UNet (diffusers' from_unet, then every weight random, zero convolutions included)."""
    root = tmp_path_factory.mktemp("controlnet_sd")
    make_fake_sd(root / "sd", reference_dir)
    unet = RefUNet.from_pretrained(root / "sd" / "unet")
    for k in range(2):
        randomize_(RefControlNet.from_unet(unet), seed=10 + k).save_pretrained(root / f"controlnet_{k}")
    return root


def controlnets(root, k=None):
    """(minidiff's, diffusers') ControlNet k, or lists of both when k is None."""
    if k is None:
        pairs = [controlnets(root, k) for k in range(2)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return (ControlNetModel.from_pretrained(root / f"controlnet_{k}"),
            RefControlNet.from_pretrained(root / f"controlnet_{k}").eval())


def condition(seed, size=64, mode="RGB"):
    """A random condition image: every pixel matters to the ControlNet, which a flat one would hide."""
    channels = 3 if mode == "RGB" else 1
    pixels = (np.random.RandomState(seed).rand(size, size, channels) * 255).astype(np.uint8)
    return Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode=mode)


@pytest.fixture(scope="module")
def pipes(sd_folder):
    ours, theirs = controlnets(sd_folder, 0)
    return (load_minidiff(StableDiffusionControlNetPipeline, str(sd_folder / "sd"), controlnet=ours),
            load_diffusers("StableDiffusionControlNetPipeline", str(sd_folder / "sd"), controlnet=theirs))


@pytest.mark.parametrize("options", [
    dict(),
    dict(controlnet_conditioning_scale=0.5),
    dict(guess_mode=True, guidance_scale=5.0),
    dict(guess_mode=True, guidance_scale=1.0),
    dict(control_guidance_start=0.25, control_guidance_end=0.75),
    dict(control_guidance_start=0.5),
    dict(prompt=["a red circle", "a blue square"], image=[condition(1), condition(2)], num_images_per_prompt=2,
         generator=gens(0, 1, 2, 3)),
    dict(negative_prompt="a green triangle", output_type="pil"),
], ids=["plain", "scale", "guess-mode", "guess-mode-no-cfg", "start-end", "start", "batch", "negative-pil"])
def test_pipeline_parity(pipes, options):
    ours, theirs = pipes
    call = dict(prompt="a red circle", image=condition(0), num_inference_steps=STEPS, generator=gen(0),
                output_type="np")
    call.update(options)
    if isinstance(call["generator"], list):
        theirs_gen = gens(*range(len(call["generator"])))
    else:
        theirs_gen = gen(0)
    a = ours(**call).images
    b = theirs(**{**call, "generator": theirs_gen}).images
    diff = max_pixel_diff(a, b)
    print(f"ControlNet pipeline {options}: max pixel difference {diff:.2e}")
    assert diff <= 1 / 255


def test_multi_controlnet_pipeline_parity(sd_folder):
    ours_nets, their_nets = controlnets(sd_folder)
    ours = load_minidiff(StableDiffusionControlNetPipeline, str(sd_folder / "sd"), controlnet=ours_nets)
    theirs = load_diffusers("StableDiffusionControlNetPipeline", str(sd_folder / "sd"), controlnet=their_nets)
    call = dict(prompt="a red circle", image=[condition(0), condition(1)], num_inference_steps=STEPS,
                output_type="np", controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.5],
                control_guidance_end=[0.75, 1.0])
    a, b = ours(**call, generator=gen(0)).images, theirs(**call, generator=gen(0)).images
    diff = max_pixel_diff(a, b)
    print(f"two ControlNets: max pixel difference {diff:.2e}")
    assert diff <= 1 / 255
    # the second net, which acts from step 2 on, changes the image
    alone = ours(**{**call, "controlnet_conditioning_scale": [0.7, 0.0]}, generator=gen(0)).images
    assert max_pixel_diff(a, alone) > 0.01


def test_global_pool_controlnet_runs_in_guess_mode_as_in_diffusers(sd_folder, tmp_path):
    """v1.1 "shuffle" (global_pool_conditions): residuals averaged over H and W, the pipeline in guess mode."""
    config = json.loads((sd_folder / "controlnet_0" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (sd_folder / "controlnet_0" / "diffusion_pytorch_model.safetensors").read_bytes())
    ours = load_minidiff(StableDiffusionControlNetPipeline, str(sd_folder / "sd"),
                         controlnet=ControlNetModel.from_pretrained(tmp_path))
    theirs = load_diffusers("StableDiffusionControlNetPipeline", str(sd_folder / "sd"),
                            controlnet=RefControlNet.from_pretrained(tmp_path))
    call = dict(prompt="a red circle", image=condition(0), num_inference_steps=STEPS, output_type="np")
    a, b = ours(**call, generator=gen(0)).images, theirs(**call, generator=gen(0)).images
    assert max_pixel_diff(a, b) <= 1 / 255
    assert max_pixel_diff(a, ours(**call, guess_mode=True, generator=gen(0)).images) == 0


def test_the_control_acts_and_vanishes_at_scale_zero(pipes):
    ours, _ = pipes
    call = dict(prompt="a red circle", image=condition(0), num_inference_steps=STEPS, output_type="np")
    controlled = ours(**call, generator=gen(0)).images
    off = ours(**call, controlnet_conditioning_scale=0.0, generator=gen(0)).images
    plain = quiet(minidiff.StableDiffusionPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet,
                                                   ours.scheduler))
    assert max_pixel_diff(controlled, off) > 0.01
    assert max_pixel_diff(off, plain("a red circle", num_inference_steps=STEPS, output_type="np",
                                     generator=gen(0)).images) < 1e-6


def test_intermediates_and_callback(pipes):
    ours, _ = pipes
    seen = []
    out = ours("a red circle", image=condition(0), num_inference_steps=STEPS, output_type="latent", generator=gen(0),
               return_intermediates=True, callback=lambda i, t, latents, x0: seen.append(i))
    steps = len(ours.scheduler.timesteps)                 # PNDM: one more than num_inference_steps
    assert seen == list(range(steps)) and len(out.intermediates.latents) == steps >= STEPS
    assert torch.equal(out.intermediates.latents[-1], out.images)


def test_loads_a_controlnet_pipeline_folder(pipes, tmp_path):
    """A folder saved by diffusers' StableDiffusionControlNetPipeline names controlnet = ControlNetModel."""
    _, theirs = pipes
    theirs.save_pretrained(tmp_path)
    pipe = load_minidiff(minidiff.DiffusionPipeline, str(tmp_path))
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert isinstance(pipe.controlnet, ControlNetModel)


@pytest.mark.parametrize("call, message", [
    (dict(image=None), "needs image="),
    (dict(image=condition(0, mode="L")), None),                                      # PIL "L" is converted to RGB
    (dict(image=torch.rand(1, 64, 64)), r"image has 1 channel\(s\), the model reads 3"),
    (dict(image=condition(0, size=48), height=64), r"image is 48x48 .* the images to generate are 64x48"),
    (dict(image=condition(0, size=60)), r"multiples of 8"),
    (dict(image=condition(0, size=48), height=64, width=64), r"Resize the condition image to 64x64"),
    (dict(image=torch.rand(1, 3, 64, 64) * 255), r"read in \[0, 1\]"),
    (dict(image=[condition(0), condition(1), condition(2)]), "3 condition images for 1 prompt"),
    (dict(control_guidance_start=0.6, control_guidance_end=0.6), "control_guidance_start must be < control_guidance_end"),
    (dict(control_guidance_end=1.5), "control_guidance_start must be < control_guidance_end"),
    (dict(controlnet_conditioning_scale=[0.5, 0.5]), "controlnet_conditioning_scale has 2 values for 1 ControlNet"),
    (dict(control_guidance_start=[0.0, 0.1]), "control_guidance_start has 2 values for 1 ControlNet"),
])
def test_bad_inputs_are_refused_before_any_work(pipes, call, message):
    ours, _ = pipes
    calls = []
    hook = ours.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    hook_text = ours.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        arguments = {**dict(prompt="a red circle", image=condition(0), num_inference_steps=1, output_type="latent"),
                     **call}
        if message is None:
            ours(**arguments)
            assert calls
        else:
            with pytest.raises((ValueError, TypeError), match=message):
                ours(**arguments)
            assert not calls, "the error came after the pipeline had started working"
    finally:
        hook.remove()
        hook_text.remove()


def test_mismatched_lists_of_controlnets_are_refused(sd_folder):
    ours_nets, _ = controlnets(sd_folder)
    pipe = load_minidiff(StableDiffusionControlNetPipeline, str(sd_folder / "sd"), controlnet=ours_nets)
    base = dict(prompt="a red circle", num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="With 2 ControlNets, image must be a list of 2 conditions"):
        pipe(**base, image=condition(0))
    with pytest.raises(ValueError, match="found a list of 3"):
        pipe(**base, image=[condition(0)] * 3)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 values for 2 ControlNet"):
        pipe(**base, image=[condition(0)] * 2, controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="control_guidance_end has 1 values for 2 ControlNet"):
        pipe(**base, image=[condition(0)] * 2, control_guidance_end=[0.5])


def test_a_controlnet_for_another_unet_is_refused_by_the_pipeline(pipes):
    ours, _ = pipes
    other = ControlNetModel.from_config(dict(CANNY_CONFIG, block_out_channels=[32, 32, 64, 64], norm_num_groups=32,
                                             cross_attention_dim=48))
    with pytest.raises(ValueError, match="controlnet was built for another UNet: cross_attention_dim"):
        StableDiffusionControlNetPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet, other, ours.scheduler)
    with pytest.raises(ValueError, match=r"controlnet\[1\] was built for another UNet"):
        StableDiffusionControlNetPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet,
                                          [ours.controlnet, other], ours.scheduler)
    narrow = ControlNetModel.from_unet(ours.unet, conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(ValueError, match="shrinks its condition image 2x, the VAE 8x"):
        StableDiffusionControlNetPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet, narrow, ours.scheduler)
