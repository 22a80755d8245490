"""Bad inputs a new user or a careless student gives the pipelines (issue 13): each one either raises one clear
exception before any work starts, or warns, and never yields a black image or a silently ignored request.

Families: 1. NaN / inf where it first appears; 2. numbers and tensors checked up front; 3. requests that would
do nothing; 4. loading mistakes (wrong pipeline class, dtype names, scheduler classes, offline, typos, broken
files); 5. diffusers' constructor arguments."""

import copy
import json
import shutil
import warnings

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
import minidiff.pipelines.base
from helpers import gen, load_minidiff, quiet, tiny_sd_sizes
from huggingface_hub.errors import LocalEntryNotFoundError
from minidiff.checkpoints import TINY_SD
from minidiff.pipelines.checks import FiniteWatch

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = dict(num_inference_steps=2)
NAN, INF = float("nan"), float("inf")
F, H = tiny_sd_sizes()          # tiny-sd's pixels per latent and latent side: 8 and 8 (first edition), 4 and 16


@pytest.fixture(scope="module")
def sd():
    return load_minidiff(minidiff.DiffusionPipeline)                   # tiny-sd: 64x64 images, (1, 4, H, H) latents


@pytest.fixture(scope="module")
def img2img(sd):
    return quiet(minidiff.StableDiffusionImg2ImgPipeline(**sd.components))


@pytest.fixture(scope="module")
def ddpm():
    return load_minidiff(minidiff.DiffusionPipeline, "tiny-ddpm")


@pytest.fixture
def model_calls(sd):
    """How many times the text encoder and the UNet ran: a check made 'up front' leaves both at 0."""
    calls = {"text_encoder": 0, "unet": 0}
    hooks = [getattr(sd, name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name in calls]
    yield calls
    for hook in hooks:
        hook.remove()


def with_part(pipe, name, edit):
    """A copy of `pipe` whose component `name` is a deep copy changed by `edit(module)`."""
    part = copy.deepcopy(getattr(pipe, name))
    with torch.no_grad():
        edit(part)
    return quiet(type(pipe)(**{**pipe.components, name: part}))


# --- 1. NaN / inf: caught where it first appears, with the step and the likely cause --------------------------
def test_nan_weight_in_the_unet_names_step_0_and_the_causes(sd):
    pipe = with_part(sd, "unet", lambda unet: unet.conv_in.weight.view(-1)[0].fill_(NAN))
    with pytest.raises(FloatingPointError, match=r"Step i=0 \(t=\d+\): non-finite values .* UNet's noise estimate"
                                                 r".*NaN or inf weight in the UNet.*float16 overflow.*bfloat16"):
        pipe("a cat", output_type="np", **STEPS)


def test_nan_from_the_scheduler_at_step_1(sd):
    pipe = quiet(minidiff.StableDiffusionPipeline(**sd.components))
    pipe.scheduler = minidiff.DDIMScheduler.from_config(sd.scheduler.config)
    step, calls = pipe.scheduler.step, []

    def step_nan_at_second_call(model_output, t, sample, **kwargs):
        out = step(model_output, t, sample, **kwargs)
        calls.append(int(t))
        if len(calls) == 2:
            out.prev_sample = out.prev_sample * NAN
        return out

    pipe.scheduler.step = step_nan_at_second_call
    with pytest.raises(FloatingPointError, match=r"Step i=1 \(t=\d+\): .*scheduler's output.*divides by zero") as info:
        pipe("a cat", output_type="latent", num_inference_steps=3)
    assert len(calls) == 2 and f"(t={calls[1]})" in str(info.value)    # stopped at once (CPU), the right t


def test_nan_weight_in_the_vae_and_in_the_text_encoder(sd):
    vae = with_part(sd, "vae", lambda vae: vae.decoder.conv_out.bias.fill_(NAN))
    assert vae("a cat", output_type="latent", **STEPS).images.isfinite().all()     # the latents are fine ...
    with pytest.raises(FloatingPointError, match="VAE decoder turned finite latents into non-finite pixels"):
        vae("a cat", output_type="np", **STEPS)                                      # ... the decoder is not
    text = with_part(sd, "text_encoder", lambda te: te.get_input_embeddings().weight.fill_(NAN))
    with pytest.raises(FloatingPointError, match="text encoder's output .* non-finite.*NaN or inf weight in the text"):
        text("a cat", output_type="np", **STEPS)


def test_a_gpu_checks_the_steps_once_after_the_loop(sd, monkeypatch):
    """Where a host sync per step would stall the GPU, the flags wait on the device: the loop runs to its end,
    then the first bad step is named. Simulated on the CPU by a watch that defers like the GPU one."""
    class DeferredWatch(FiniteWatch):
        def __init__(self, device):
            super().__init__(device)
            self.immediate = False

    monkeypatch.setattr(minidiff.pipelines.base, "FiniteWatch", DeferredWatch)
    pipe = with_part(sd, "unet", lambda unet: unet.conv_in.weight.view(-1)[0].fill_(NAN))
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    try:
        with pytest.raises(FloatingPointError, match=r"Step i=0 .*UNet's noise estimate"):
            pipe("a cat", output_type="latent", num_inference_steps=3)
    finally:
        hook.remove()
    assert len(unet_calls) == len(pipe.scheduler.timesteps)  # all steps ran (PNDM: 4 for 3), then step 0 was named

    watch = DeferredWatch(torch.device("cpu"))
    for i in range(4):
        watch.check(torch.ones(2) if i < 2 else torch.tensor([1.0, INF]), i, 900 - 100 * i, "scheduler")
    assert len(watch.flags) == 4
    with pytest.raises(FloatingPointError, match=r"Step i=2 \(t=700\)"):
        watch.raise_if_any()


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_inputs_are_refused_before_any_work(sd, img2img, model_calls, value):
    latents = torch.randn(1, 4, H, H)
    latents[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=f"latents holds 1 non-finite values .* out of {4 * H * H}"):
        sd("a cat", latents=latents, **STEPS)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sd("a cat", guidance_scale=value, **STEPS)
    image = torch.rand(3, 64, 64)
    image[0, 5, 5] = value
    with pytest.raises(ValueError, match="image tensor holds 1 non-finite values"):
        img2img("a cat", image=image, **STEPS)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        img2img("a cat", image=torch.rand(3, 64, 64), guidance_scale=value, **STEPS)
    assert model_calls == {"text_encoder": 0, "unet": 0}


def test_non_finite_inputs_to_the_controlled_pipelines(sd):
    weighting = quiet(minidiff.StableDiffusionPromptWeightingPipeline(**sd.components))
    embeds = torch.zeros(1, 77, sd.unet.config.cross_attention_dim)
    embeds[0, 3, 0] = NAN
    with pytest.raises(ValueError, match="prompt_embeds holds 1 non-finite"):
        weighting(prompt_embeds=embeds, **STEPS)
    inpaint = quiet(minidiff.StableDiffusionInpaintPipeline(**sd.components))
    mask = torch.ones(1, 64, 64)
    mask[0, 0, 0] = NAN
    with pytest.raises(ValueError, match="mask tensor holds 1 non-finite"):
        inpaint("a cat", image=torch.rand(3, 64, 64), mask_image=mask, **STEPS)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        inpaint("a cat", image=torch.rand(3, 64, 64), mask_image=torch.ones(1, 64, 64), guidance_scale=INF, **STEPS)
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        inpaint("a cat", image=torch.rand(3, 64, 64), mask_image=torch.ones(1, 64, 64), num_images_per_prompt=0,
                **STEPS)
    diffedit = quiet(minidiff.StableDiffusionDiffEditPipeline(**sd.components))
    inverted = torch.randn(1, 1, 4, H, H)
    inverted[0, 0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match="image_latents holds 1 non-finite"):
        diffedit("a cat", mask_image=torch.ones(H, H), image_latents=inverted, inpaint_strength=0.5, **STEPS)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        diffedit("a cat", mask_image=torch.ones(H, H), image_latents=inverted.nan_to_num(), inpaint_strength=0.5,
                 guidance_scale=NAN, **STEPS)
    for cls in (minidiff.StableDiffusionSAGPipeline, minidiff.SemanticStableDiffusionPipeline,
                minidiff.StableDiffusionPanoramaPipeline):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            quiet(cls(**sd.components))("a cat", guidance_scale=NAN, **STEPS)
    with pytest.raises(ValueError, match=f"positive multiples of {F}.*height=0"):        # 0 was taken as "default"
        quiet(minidiff.StableDiffusionPanoramaPipeline(**sd.components))("a cat", height=0, **STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        quiet(minidiff.StableDiffusionAttendAndExcitePipeline(**sd.components))("a cat", token_indices=[2],
                                                                                num_inference_steps=0)


# --- 2. numbers and tensors, up front ---------------------------------------------------------------------------
SD_BAD_NUMBERS = [
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1"),
    (dict(num_inference_steps=-3), ValueError, "num_inference_steps must be an int >= 1"),
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps must be an int >= 1.*found 2.5"),
    (dict(num_inference_steps=True), ValueError, "num_inference_steps must be an int >= 1.*found True"),
    (dict(num_inference_steps=1001), ValueError, "num_inference_steps must be at most num_train_timesteps=1000"),
    (dict(num_inference_steps=np.int64(2)), ValueError, r"int >= 1 .*found np.int64\(2\). Pass int\(num_inference"),
    (dict(callback="print"), TypeError, "callback must be a function callback\\(i, t, latents, x0\\).*found str"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt .* must be an int >= 1.*found 0"),
    (dict(num_images_per_prompt=-1), ValueError, "num_images_per_prompt .* must be an int >= 1.*found -1"),
    (dict(num_images_per_prompt=1.5), ValueError, "num_images_per_prompt .* must be an int >= 1"),
    (dict(guidance_scale="7.5"), TypeError, "guidance_scale must be a number.*found str"),
    (dict(guidance_scale=None), TypeError, "guidance_scale must be a number.*found NoneType"),
    (dict(height=0), ValueError, f"height and width must be positive multiples of {F}.*height=0"),
    (dict(width=-64), ValueError, f"height and width must be positive multiples of {F}.*width=-64"),
    (dict(height=62), ValueError, f"multiples of {F}.*height=62"),
    (dict(width=64.0), ValueError, f"multiples of {F}.*width=64.0"),
    (dict(latents=torch.randn(1, 4, 2 * H, 2 * H)), ValueError,
     rf"latents must have shape \(1, 4, {H}, {H}\) for 1 images of 64x64; found \(1, 4, {2 * H}, {2 * H}\)"),
    (dict(latents=torch.ones(1, 4, H, H, dtype=torch.int64)), TypeError, "floating-point tensor.*torch.int64"),
    (dict(latents=np.zeros((1, 4, H, H), np.float32)), TypeError, "latents must be a torch.Tensor.*found ndarray"),
]


def case_id(bad: dict) -> str:
    """A short, stable test id: tensors and arrays by their shape (their values differ between xdist workers)."""
    def show(v):
        return f"{type(v).__name__}{tuple(v.shape)}" if hasattr(v, "shape") else repr(v)
    return ",".join(f"{k}={show(v)}" for k, v in bad.items())


@pytest.mark.parametrize("bad, error, message", SD_BAD_NUMBERS, ids=[case_id(b) for b, *_ in SD_BAD_NUMBERS])
def test_bad_numbers_are_refused_before_any_work(sd, model_calls, bad, error, message):
    kwargs = STEPS | bad
    with pytest.raises(error, match=message):
        sd("a cat", output_type="np", **kwargs)
    assert model_calls == {"text_encoder": 0, "unet": 0}


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, NAN, "0.5", True])
def test_img2img_strength_in_0_1(img2img, model_calls, strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        img2img("a cat", image=torch.rand(3, 64, 64), strength=strength, **STEPS)
    assert model_calls == {"text_encoder": 0, "unet": 0}


def test_img2img_counts(img2img, model_calls):
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match=f"The image is {F - 1}x{F - 3} pixels; the VAE needs at least {F}x{F}"):
        img2img("a cat", image=PIL.Image.new("RGB", (F - 1, F - 3)), **STEPS)
    with pytest.raises(TypeError, match="callback must be a function"):
        img2img("a cat", image=image, callback=0, **STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        img2img("a cat", image=image, num_inference_steps=0)
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        img2img("a cat", image=image, num_images_per_prompt=0, **STEPS)
    assert model_calls == {"text_encoder": 0, "unet": 0}


def test_a_one_element_tensor_guidance_scale_still_works(sd):
    as_tensor = sd("a cat", guidance_scale=torch.tensor(3.0), generator=gen(0), output_type="np", **STEPS).images
    as_float = sd("a cat", guidance_scale=3.0, generator=gen(0), output_type="np", **STEPS).images
    np.testing.assert_array_equal(as_tensor, as_float)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sd("a cat", guidance_scale=torch.tensor(NAN), **STEPS)


def test_float64_latents_are_cast_not_a_crash(sd):
    """float64 latents (from numpy) crashed deep in torch; they are cast to the pipeline's dtype, so the image
    equals the one made from the same latents in float32."""
    latents = torch.randn(1, 4, H, H, generator=gen(0), dtype=torch.float64)
    from64 = sd("a cat", latents=latents, output_type="np", **STEPS).images
    from32 = sd("a cat", latents=latents.float(), output_type="np", **STEPS).images
    np.testing.assert_array_equal(from64, from32)


def test_ddpm_bad_calls(ddpm):
    with pytest.raises(TypeError, match="DDPMPipeline is unconditional: it takes no prompt.*'a cat'.*"
                                        "StableDiffusionPipeline"):
        ddpm("a cat", **STEPS)
    for batch_size in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"batch_size must be an int >= 1.*found {batch_size}"):
            ddpm(batch_size=batch_size, **STEPS)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1.*found 0"):
        ddpm(num_inference_steps=0)
    with pytest.raises(TypeError, match="callback must be a function"):
        ddpm(callback=[], **STEPS)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt'"):
        ddpm(prompt="a cat", **STEPS)
    nan_unet = copy.deepcopy(ddpm.unet)
    with torch.no_grad():
        nan_unet.conv_in.bias.fill_(NAN)
    with pytest.raises(FloatingPointError, match=r"Step i=0 .*UNet's noise estimate"):
        quiet(minidiff.DDPMPipeline(unet=nan_unet, scheduler=ddpm.scheduler))(output_type="np", **STEPS)


# --- 3. requests that would do nothing: warn or raise ---------------------------------------------------------
def test_negative_prompt_without_guidance_warns(sd, img2img):
    with pytest.warns(UserWarning, match="negative_prompt='blurry' is not used: guidance_scale <= 1"):
        sd("a cat", negative_prompt="blurry", guidance_scale=1.0, output_type="latent", **STEPS)
    with pytest.warns(UserWarning, match="negative_prompt=.* is not used"):
        img2img("a cat", image=torch.rand(3, 64, 64), negative_prompt=["blurry"], guidance_scale=0.5,
                output_type="latent", **STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # with guidance it is used: no warning
        sd("a cat", negative_prompt="blurry", guidance_scale=3.0, output_type="latent", **STEPS)
        sd("a cat", guidance_scale=1.0, output_type="latent", **STEPS)


@pytest.mark.parametrize("edit, message", [
    (dict(edit_warmup_steps=10), r"Concept 0 would never be applied: edit_warmup_steps=10 .* until step 4 "
                                 r"\(num_inference_steps=4"),
    (dict(edit_warmup_steps=[1, 4]), "Concept 1 would never be applied: edit_warmup_steps=4"),
    (dict(edit_warmup_steps=2, edit_cooldown_steps=2), "Concept 0 would never be applied.*edit_cooldown_steps=2"),
])
def test_sega_edit_that_never_applies_is_refused(sd, model_calls, edit, message):
    sega = quiet(minidiff.SemanticStableDiffusionPipeline(**sd.components))
    editing_prompt = ["blue"] if isinstance(edit["edit_warmup_steps"], int) else ["blue", "red"]
    with pytest.raises(ValueError, match=message):
        sega("a cat", editing_prompt=editing_prompt, num_inference_steps=4, guidance_scale=3.0, **edit)
    assert model_calls == {"text_encoder": 0, "unet": 0}
    # the last step at which the edit can still start is accepted
    sega("a cat", editing_prompt=["blue"], edit_warmup_steps=3, num_inference_steps=4, guidance_scale=3.0,
         output_type="latent")


# --- 4. loading ---------------------------------------------------------------------------------------------
def test_pipeline_class_that_does_not_fit_the_folder():
    with pytest.raises(ValueError, match=r"tiny-sd/model_index.json is a StableDiffusionPipeline folder: its unet is a "
                                         r"UNet2DConditionModel, but DDPMPipeline needs a UNet2DModel. Load it with "
                                         r"minidiff.StableDiffusionPipeline.from_pretrained"):
        minidiff.DDPMPipeline.from_pretrained("tiny-sd")
    with pytest.raises(ValueError, match=r"names no \['vae', 'text_encoder', 'tokenizer'\]"):
        minidiff.StableDiffusionPipeline.from_pretrained("tiny-ddpm")
    # image-to-image from a text-to-image folder: same parts, accepted
    assert isinstance(load_minidiff(minidiff.StableDiffusionImg2ImgPipeline), minidiff.StableDiffusionImg2ImgPipeline)


def test_torch_dtype_by_name():
    pipe = load_minidiff(minidiff.StableDiffusionPipeline, torch_dtype="bfloat16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    unet = minidiff.UNet2DModel.from_pretrained("tiny-ddpm", subfolder="unet", torch_dtype="torch.float16")
    assert unet.dtype == torch.float16
    for bad in ("half", "fp16", torch.int8, 16):
        with pytest.raises(TypeError, match=r"torch_dtype must be a floating torch.dtype .* \['float32', 'float16', "
                                            r"'bfloat16', 'float64'\]; found"):
            minidiff.DiffusionPipeline.from_pretrained("tiny-sd", torch_dtype=bad)
        with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype"):
            minidiff.UNet2DModel.from_pretrained("tiny-ddpm", subfolder="unet", torch_dtype=bad)
    ddpm = load_minidiff(minidiff.DiffusionPipeline, "tiny-ddpm")
    assert ddpm.to("bfloat16").dtype == torch.bfloat16             # was "Invalid device string: 'bfloat16'"
    assert ddpm.to("float64").dtype == torch.float64
    assert ddpm.to("cpu", "float32").dtype == torch.float32
    with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype.*found 'half'"):
        ddpm.to("cpu", "half")


def test_components_of_the_wrong_kind(sd, ddpm):
    with pytest.raises(TypeError, match=r"DDPMPipeline's unet must be an instance of UNet2DModel; found "
                                        r"UNet2DConditionModel. Check the order .* \(unet=..., scheduler=...\)"):
        minidiff.DDPMPipeline(unet=sd.unet, scheduler=ddpm.scheduler)
    with pytest.raises(TypeError, match="StableDiffusionPipeline's vae must be an instance of AutoencoderKL; found "
                                        "UNet2DConditionModel"):
        minidiff.StableDiffusionPipeline(sd.unet, sd.text_encoder, sd.tokenizer, sd.vae, sd.scheduler)   # swapped
    with pytest.raises(TypeError, match="unet must be a loaded UNet2DModel; found the class UNet2DModel itself"):
        minidiff.DDPMPipeline(unet=minidiff.UNet2DModel, scheduler=ddpm.scheduler)
    with pytest.raises(TypeError, match=r"unet= got the class UNet2DConditionModel itself; pass a loaded component, "
                                        r"e.g. UNet2DConditionModel.from_pretrained\('tiny-sd', subfolder='unet'\)"):
        minidiff.StableDiffusionPipeline.from_pretrained("tiny-sd", unet=minidiff.UNet2DConditionModel)
    with pytest.raises(TypeError, match=r"unknown component revision=; its components are \['vae', .*\], and its "
                                        r"options torch_dtype=, variant="):
        minidiff.DiffusionPipeline.from_pretrained("tiny-sd", revision="main")
    with pytest.raises(TypeError, match=r"dtype= is diffusers' newer name for torch_dtype="):
        minidiff.DiffusionPipeline.from_pretrained("tiny-sd", dtype=torch.float16)
    for name in (None, 3):
        with pytest.raises(TypeError, match="Expected a folder path, a bundled checkpoint name .* found"):
            minidiff.DiffusionPipeline.from_pretrained(name)


def test_scheduler_class_instead_of_an_instance(sd):
    hint = r"found the class DDIMScheduler itself. Pass an instance, e.g. DDIMScheduler.from_config\(pipe.scheduler"
    with pytest.raises(TypeError, match=hint):
        minidiff.StableDiffusionPipeline.from_pretrained("tiny-sd", scheduler=minidiff.DDIMScheduler)
    pipe = quiet(minidiff.StableDiffusionPipeline(**sd.components))
    with pytest.raises(TypeError, match=hint):
        pipe.scheduler = minidiff.DDIMScheduler
    with pytest.raises(TypeError, match="scheduler with set_timesteps\\(\\) and step\\(\\).*found str"):
        pipe.scheduler = "ddim"
    assert pipe.scheduler is sd.scheduler                       # the refused assignments changed nothing
    pipe.scheduler = minidiff.DDIMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe("a cat", output_type="latent", **STEPS).images, torch.Tensor)


def test_offline_hub_id_is_diagnosed_as_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"looked up as a hub repo id, but this runs offline \(HF_HUB_OFFLINE=1 or "
                                      r"local_files_only=True\) and the cache .* holds no model_index.json of "
                                      r"someone/some-pipeline.*set HF_HUB_OFFLINE=1 to use the cached copy"):
        minidiff.DiffusionPipeline.from_pretrained("someone/some-pipeline", cache_dir=str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(OSError, match="this runs offline"):
        minidiff.DiffusionPipeline.from_pretrained("someone/some-pipeline", cache_dir=str(tmp_path / "cache"),
                                                   local_files_only=True)


LOCAL_LOOKING = {
    "./my-modle": r"'./my-modle' is neither an existing folder.*looks like a local path, so it was not looked up on "
                  r"the hub. There is no .*my-modle; its closest existing parent .* holds \[.*outputs",
    "../my-modle": "looks like a local path",
    "~/no-such-minidiff-model": "looks like a local path",
    "runs/unet/final": r"looks like a local path.*There is no .*runs/unet/final",
    "outputs/my-unet": r"looks like a local path.*closest existing parent .*outputs holds \[checkpoint-100\]",
    "tiny_sd": "Did you mean the bundled checkpoint 'tiny-sd'",
    "tiny-sd2": "Did you mean the bundled checkpoint 'tiny-sd'",
    "Tiny-DDPM": "Did you mean the bundled checkpoint 'tiny-ddpm'",
    "my-model": "neither an existing folder.*Check the spelling",
}


@pytest.mark.parametrize("name", LOCAL_LOOKING)
def test_local_looking_paths_never_reach_the_hub(name, tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "checkpoint-100").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=LOCAL_LOOKING[name]):
        minidiff.DiffusionPipeline.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        minidiff.UNet2DConditionModel.from_pretrained(name, subfolder="unet")


def test_a_weight_file_instead_of_its_folder(tmp_path):
    unet = minidiff.UNet2DModel.from_pretrained("tiny-ddpm", subfolder="unet")
    unet.save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match="is a file, but from_pretrained reads a folder .* pass the folder"):
        minidiff.UNet2DModel.from_pretrained(str(weights))
    with pytest.raises(FileNotFoundError, match="is a file.*StableDiffusionPipeline.from_single_file"):
        minidiff.DiffusionPipeline.from_pretrained(weights)


def test_a_repo_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    asked = []

    def fake_hub(repo_id, filename, **kwargs):
        asked.append(f"{repo_id}/{filename}")
        raise LocalEntryNotFoundError("not cached and unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="the hub could not be reached"):
        minidiff.DiffusionPipeline.from_pretrained("google/ddpm-cat-256")
    assert asked == ["google/ddpm-cat-256/model_index.json"]


@pytest.fixture
def sd_copy(tmp_path):
    folder = tmp_path / "tiny-sd-copy"
    shutil.copytree(TINY_SD, folder, ignore=shutil.ignore_patterns("training_logs", "*.png"))
    return folder


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_broken_files_are_named(sd_copy):
    truncate(sd_copy / "text_encoder" / "model.safetensors")
    with pytest.raises(OSError, match=r"Could not load the text_encoder \(CLIPTextModel\) from .*tiny-sd-copy/"
                                      r"text_encoder \(files: \['config.json', 'model.safetensors'\]\).*truncated"):
        load_minidiff(minidiff.DiffusionPipeline, sd_copy)
    truncate(sd_copy / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(OSError, match=r"Could not read the weight file .*tiny-sd-copy/unet/diffusion_pytorch_model"):
        load_minidiff(minidiff.DiffusionPipeline, sd_copy, text_encoder=None)
    (sd_copy / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tiny-sd-copy/vae/config.json is not valid JSON"):
        minidiff.AutoencoderKL.from_pretrained(sd_copy, subfolder="vae")
    (sd_copy / "tokenizer" / "vocab.json").write_text("{not json")
    with pytest.raises(OSError, match=r"Could not load the tokenizer \(CLIPTokenizer\) from .*tiny-sd-copy/tokenizer"):
        load_minidiff(minidiff.DiffusionPipeline, sd_copy, text_encoder=None, unet=None, vae=None)
    index = json.loads((sd_copy / "model_index.json").read_text())
    (sd_copy / "model_index.json").write_text(json.dumps({**index, "unet": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match=r"model_index.json gives unet = 'UNet2DConditionModel'; expected a pair"):
        load_minidiff(minidiff.DiffusionPipeline, sd_copy, vae=None, text_encoder=None, tokenizer=None)
    (sd_copy / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tiny-sd-copy/model_index.json is not valid JSON"):
        load_minidiff(minidiff.DiffusionPipeline, sd_copy)


# --- 5. diffusers' constructor arguments ----------------------------------------------------------------------
def test_safety_checker_arguments_are_accepted(sd):
    parts = sd.components
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = minidiff.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
        img = minidiff.StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=True, image_encoder=None)
    assert pipe.components == img.components == parts
    for cls in (minidiff.StableDiffusionDiffEditPipeline, minidiff.StableDiffusionModelEditingPipeline,
                minidiff.StableDiffusionSAGPipeline, minidiff.StableDiffusionInpaintPipeline):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        assert all(other.components[name] is part for name, part in parts.items())
    plain = quiet(minidiff.StableDiffusionPipeline(**parts))("a cat", generator=gen(0), output_type="np", **STEPS)
    same = quiet(pipe)("a cat", generator=gen(0), output_type="np", **STEPS)
    np.testing.assert_array_equal(plain.images, same.images)
    with pytest.warns(UserWarning, match="got a safety_checker: minidiff does not run it .*no NSFW filter"):
        minidiff.StableDiffusionPipeline(**parts, safety_checker=object())


def test_from_pretrained_takes_diffusers_safety_checker_keywords():
    """`from_pretrained(..., safety_checker=None, requires_safety_checker=False)`, as the diffusers tutorials
    write it, loads (the constructor accepted it already); a real image encoder is refused, None accepted."""
    pipe = load_minidiff(minidiff.StableDiffusionPipeline, "tiny-sd", safety_checker=None,
                         requires_safety_checker=False, image_encoder=None)
    assert isinstance(pipe, minidiff.StableDiffusionPipeline)
    with pytest.raises(TypeError, match="no image encoder.*image_encoder=None is accepted"):
        load_minidiff(minidiff.StableDiffusionPipeline, "tiny-sd", image_encoder=object())
    with pytest.raises(TypeError, match="unknown component revision="):
        load_minidiff(minidiff.StableDiffusionPipeline, "tiny-sd", revision="main")
