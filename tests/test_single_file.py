"""Single-file checkpoints (CompVis / LDM layout): the key map against diffusers' converter at the real SD v1-4
and v2 configs, files saved by minidiff loaded by diffusers tensor for tensor and back, `.ckpt` pickles read
without running anything, and clear errors for files of other kinds."""

from __future__ import annotations

import json
import sys
import types
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from fake_checkpoints import make_fake_sd
from helpers import gen, max_pixel_diff, quiet, randomize_
from minidiff import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from minidiff.core.checkpoint_file import UnsafeCheckpointError, read_checkpoint_file, read_state_dict
from minidiff.models.ldm_layout import (OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_name, ldm_name,
                                        open_clip_from_ldm, open_clip_to_ldm, to_ldm, unet_blocks, vae_blocks)
from minidiff.models.single_file import UNET_V2
from minidiff.pipelines.single_file import load_single_file, save_single_file

pytestmark = pytest.mark.usefixtures("one_thread")


def numbered(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor replaced by a tiny one holding its index (same number of dims): a rename shows as a moved number."""
    return {k: torch.full((1,) * v.ndim, float(i)) for i, (k, v) in enumerate(weights.items())}


# --- the key map at the real configs, every key -----------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_unet_key_map_equals_diffusers_converter(reference_dir, version):
    convert_ldm_unet_checkpoint = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint

    config = json.loads((reference_dir / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    if version == "v2":
        config = {**config, **UNET_V2, "attention_head_dim": list(UNET_V2["attention_head_dim"]), "sample_size": 96}
    with torch.device("meta"):                       # 860M parameters, no memory: only the names and dims count
        unet = UNet2DConditionModel.from_config(config)
    ldm = numbered(to_ldm(unet, unet_blocks(unet.config), UNET_PREFIX))
    theirs = convert_ldm_unet_checkpoint(ldm, config)
    ours = {k: ldm[UNET_PREFIX + ldm_name(k, unet_blocks(unet.config))] for k in unet.state_dict()}
    assert len(ours) == len(unet.state_dict()) == len(ldm) == 686
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_vae_key_map_equals_diffusers_converter(reference_dir):
    convert_ldm_vae_checkpoint = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint

    config = json.loads((reference_dir / "stable-diffusion-v1-4" / "vae" / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    ldm = to_ldm(vae, vae_blocks(vae.config), VAE_PREFIX)
    assert ldm[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)   # 1x1 convs in the file
    ldm = numbered(ldm)
    theirs = convert_ldm_vae_checkpoint(ldm, config)
    ours = {k: ldm[VAE_PREFIX + ldm_name(k, vae_blocks(vae.config))] for k in vae.state_dict()}
    assert set(theirs) == set(ours) and len(ours) == 248
    assert all(torch.equal(theirs[k].flatten(), ours[k].flatten()) for k in ours)


def test_open_clip_map_equals_diffusers_converter():
    """SD 2's text tower: in_proj split into q, k, v; the 24th block, text_projection and logit_scale dropped."""
    convert_open_clip_checkpoint = pytest.importorskip("diffusers.loaders.single_file_utils").convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    D, layers = 16, 3
    g = torch.Generator().manual_seed(0)
    p = OPEN_CLIP_PREFIX
    weights = {p + "token_embedding.weight": torch.randn(50, D, generator=g),
               p + "positional_embedding": torch.randn(77, D, generator=g),
               p + "ln_final.weight": torch.randn(D, generator=g), p + "ln_final.bias": torch.randn(D, generator=g),
               p + "text_projection": torch.randn(D, D, generator=g), p + "logit_scale": torch.tensor(4.6)}
    for i in range(layers + 1):                      # the file has one block more than SD 2 uses
        b = f"{p}transformer.resblocks.{i}."
        for name, shape in [("ln_1", (D,)), ("ln_2", (D,)), ("attn.out_proj", (D, D)), ("mlp.c_fc", (4 * D, D)),
                            ("mlp.c_proj", (D, 4 * D))]:
            weights[f"{b}{name}.weight"] = torch.randn(shape, generator=g)
            weights[f"{b}{name}.bias"] = torch.randn(shape[0], generator=g)
        weights[f"{b}attn.in_proj_weight"] = torch.randn(3 * D, D, generator=g)
        weights[f"{b}attn.in_proj_bias"] = torch.randn(3 * D, generator=g)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=layers,
                                         num_attention_heads=2, vocab_size=50))
    ours = open_clip_from_ldm(weights, layers)
    theirs = convert_open_clip_checkpoint(model, {k: v for k, v in weights.items() if ".resblocks.3." not in k})
    theirs = {k: v for k, v in theirs.items() if not k.endswith(("position_ids", "text_projection.weight"))}
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    back = open_clip_to_ldm(ours, layers)            # and back: every tensor SD 2 uses, unchanged
    assert all(torch.equal(back[k], weights[k]) for k in back)


# --- whole files: minidiff <-> diffusers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sd(reference_dir, tmp_path_factory):
    """A small random SD v1 folder (published configs, made narrow), its pipeline, and its single file."""
    folder = make_fake_sd(tmp_path_factory.mktemp("sd") / "sd", reference_dir)
    pipe = quiet(StableDiffusionPipeline.from_pretrained(str(folder)))
    path = folder.parent / "model.safetensors"
    save_single_file(pipe, str(path))
    return folder, pipe, path


def test_saved_file_loads_back_tensor_for_tensor(small_sd):
    folder, pipe, path = small_sd
    back = load_single_file(StableDiffusionPipeline, str(path), config=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    kwargs = dict(num_inference_steps=3, output_type="np")
    assert max_pixel_diff(pipe("a cat", generator=gen(0), **kwargs).images,
                          quiet(back)("a cat", generator=gen(0), **kwargs).images) == 0


def test_diffusers_reads_minidiff_files_and_minidiff_reads_the_same(small_sd):
    """diffusers' from_single_file on a file minidiff saved gives minidiff's tensors: the two maps agree."""
    diffusers = pytest.importorskip("diffusers")

    folder, pipe, path = small_sd
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                                safety_checker=None)
    ours = StableDiffusionPipeline.from_single_file(str(path), config=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ema_weights_on_request(small_sd, tmp_path):
    folder, pipe, path = small_sd
    weights = load_file(str(path))
    ema = {ema_name(k): v + 1 for k, v in weights.items() if k.startswith(UNET_PREFIX)}
    save_file({**weights, **ema}, str(tmp_path / "ema.safetensors"))
    plain = load_single_file(StableDiffusionPipeline, str(tmp_path / "ema.safetensors"), config=str(folder))
    with_ema = load_single_file(StableDiffusionPipeline, str(tmp_path / "ema.safetensors"), config=str(folder),
                                extract_ema=True)
    w = pipe.unet.conv_in.weight
    assert torch.equal(plain.unet.conv_in.weight, w) and torch.equal(with_ema.unet.conv_in.weight, w + 1)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_single_file(StableDiffusionPipeline, str(path), config=str(folder), extract_ema=True)


# --- .ckpt pickles -----------------------------------------------------------------------------------------

@pytest.fixture
def lightning_module(monkeypatch):
    """A stand-in for pytorch_lightning's callback class, importable while the test writes its pickle."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint


def test_lightning_ckpt_loads_with_its_callback_as_a_placeholder(small_sd, tmp_path, lightning_module):
    folder, pipe, path = small_sd
    callback = lightning_module()
    callback.best_model_score = torch.tensor(0.5)
    torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "state_dict": load_file(str(path)), "callbacks": {lightning_module: {"monitor": None}},
                "checkpoint_callback": callback}, tmp_path / "sd.ckpt")
    with pytest.raises(Exception, match="ModelCheckpoint"):        # plain weights_only refuses it
        torch.load(tmp_path / "sd.ckpt", weights_only=True)
    data = read_checkpoint_file(str(tmp_path / "sd.ckpt"))
    assert repr(data["checkpoint_callback"]) == ("<placeholder for "
                                                 "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint>")
    ours = StableDiffusionPipeline.from_single_file(str(tmp_path / "sd.ckpt"), config=str(folder))
    assert all(torch.equal(a, b) for a, b in zip(ours.unet.state_dict().values(), pipe.unet.state_dict().values()))



def leave_a_marker(path):
    """What a booby-trapped pickle would call while being unpickled."""
    open(path, "w").write("ran")
    return {}


class Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_a_marker, (self.marker,)


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"x": Trap(str(marker)), "state_dict": {"w": torch.zeros(1)}}, tmp_path / "trap.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"test_single_file\.leave_a_marker.*nothing from the file was run"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "trap.ckpt"))
    assert not marker.exists()
    import pickle                                   # the trap is real: plain unpickling runs it
    with zipfile.ZipFile(tmp_path / "trap.ckpt") as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        raw = z.read(name)
    with pytest.raises(Exception):
        pickle.loads(raw)                           # (stops at torch's first tensor, after calling the trap)
    assert marker.exists()


# --- files of other kinds: clear errors naming the file ------------------------------------------------------

def test_truncated_files_name_the_file(small_sd, tmp_path):
    folder, pipe, path = small_sd
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError, match=r"cut\.safetensors.*truncated"):
        StableDiffusionPipeline.from_single_file(str(cut))
    torch.save({"state_dict": {"w": torch.zeros(4)}}, tmp_path / "ok.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "ok.ckpt").read_bytes()[:200])
    with pytest.raises(OSError, match=r"cut\.ckpt"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "cut.ckpt"))
    (tmp_path / "model.pkl").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.pkl"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "model.pkl"))


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.transformer.text_model.x": (1,), UNET_PREFIX + "input_blocks.0.0.weight": (8, 4, 3, 3)},
     "SDXL"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "LoRA"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "a VAE or a text encoder alone"),
    ({UNET_PREFIX + "input_blocks.0.0.weight": (8, 9, 3, 3)}, "inpainting"),
    ({UNET_PREFIX + "input_blocks.0.0.weight": (8, 4, 3, 3)}, "one text encoder"),
])
def test_files_of_other_kinds_are_refused(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(ValueError, match=message) as info:
        StableDiffusionPipeline.from_single_file(str(path))
    assert "other.safetensors" in str(info.value)


def test_missing_or_extra_keys_are_listed(small_sd, tmp_path):
    folder, pipe, path = small_sd
    weights = load_file(str(path))
    del weights[UNET_PREFIX + "out.2.weight"]
    weights[UNET_PREFIX + "something_else.weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.diffusion_model.out.2.weight'\].*"
                                         r"unused \['model.diffusion_model.something_else.weight'\]"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "bad.safetensors"), config=str(folder))


def test_v2_file_asks_what_it_predicts(tmp_path):
    p = OPEN_CLIP_PREFIX
    save_file({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
               p + "token_embedding.weight": torch.zeros(2, 4)}, str(tmp_path / "v2.safetensors"))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*'epsilon'"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "v2.safetensors"))


def test_published_width_is_checked(small_sd):
    folder, pipe, path = small_sd                    # a 32-wide model is not SD v1-4: say so, suggest config=
    with pytest.raises(ValueError, match="768 wide; found 32.*config="):
        StableDiffusionPipeline.from_single_file(str(path))


def test_save_never_overwrites_and_writes_no_pickle(small_sd, tmp_path):
    folder, pipe, path = small_sd
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_single_file(pipe, str(path))
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, str(tmp_path / "model.ckpt"))


def test_read_state_dict_needs_tensors(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1), "step": 3}}, tmp_path / "mixed.ckpt")
    with pytest.raises(ValueError, match=r"\['step'\].*not tensors"):
        read_state_dict(str(tmp_path / "mixed.ckpt"))



class BookkeepingTrap:
    """A pickle naming a numpy function that writes a file: numpy is bookkeeping, so it becomes a placeholder."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import numpy

        return numpy.savetxt, (self.marker, [1.0])


def test_bookkeeping_globals_are_inert_placeholders(tmp_path):
    marker = tmp_path / "marker.txt"
    torch.save({"meta": BookkeepingTrap(str(marker)), "state_dict": {"w": torch.ones(2)}}, tmp_path / "np.ckpt")
    data = read_checkpoint_file(str(tmp_path / "np.ckpt"))
    assert repr(data["meta"]) == "<placeholder for numpy.savetxt>" and data["meta"].args[0] == str(marker)
    assert torch.equal(read_state_dict(str(tmp_path / "np.ckpt"))["w"], torch.ones(2))
    assert not marker.exists()


def test_sd2_layout_round_trip_and_diffusers(reference_dir, tmp_path):
    """A small SD 2-like model (linear projections, a GELU text encoder written as OpenCLIP): minidiff's file has
    OpenCLIP's names (in_proj fused), loads back tensor for tensor, and diffusers reads it to the same tensors."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = make_fake_sd(tmp_path / "sd2", reference_dir, use_linear_projection=True)
    text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    text_config.hidden_act = "gelu"
    randomize_(CLIPTextModel(text_config), seed=5).save_pretrained(folder / "text_encoder")
    pipe = quiet(StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None))
    path = tmp_path / "sd2.safetensors"
    save_single_file(pipe, str(path), text_encoder_format="open_clip")
    names = set(load_file(str(path)))
    assert OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in names
    assert not any(k.startswith("cond_stage_model.transformer.") for k in names)
    back = load_single_file(StableDiffusionPipeline, str(path), config=str(folder))
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                                safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        c = {k: v for k, v in getattr(theirs, name).state_dict().items() if not k.endswith("position_ids")}
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), name
    weights = load_file(str(path))
    weights[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"fit no part of the SD 2 text encoder.*resblocks\.0\.attn\.extra"):
        load_single_file(StableDiffusionPipeline, str(tmp_path / "extra.safetensors"), config=str(folder))


# --- one model from a single file (diffusers' model-level from_single_file) ---------------------------------

def test_unet_and_vae_from_single_file_equal_the_pipeline_and_diffusers(small_sd, tmp_path):
    diffusers = pytest.importorskip("diffusers")

    folder, pipe, path = small_sd
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(folder / "unet"))
    vae = AutoencoderKL.from_single_file(str(path), config=str(folder / "vae"))
    theirs_unet = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                                  local_files_only=True)
    for ours, reference in ((unet, pipe.unet), (vae, pipe.vae), (unet, theirs_unet)):
        a, b = ours.state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a VAE-only file (keys without first_stage_model., plus the GAN loss's discriminator a training file keeps)
    alone = {k.removeprefix(VAE_PREFIX): v for k, v in load_file(str(path)).items() if k.startswith(VAE_PREFIX)}
    save_file({**alone, "loss.discriminator.main.0.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    again = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(folder / "vae"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pipe.vae.state_dict().values()))


def test_model_level_errors(small_sd, tmp_path):
    folder, pipe, path = small_sd
    with pytest.raises(ValueError, match="768 \\(v1\\) or 1024 \\(v2\\) wide; found 32.*config="):
        UNet2DConditionModel.from_single_file(str(path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DConditionModel.from_single_file(str(path), config=str(folder))      # the pipeline folder, not unet/
    save_file({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024)},
              str(tmp_path / "v2.safetensors"))
    with pytest.raises(ValueError, match="prediction_type="):
        UNet2DConditionModel.from_single_file(str(tmp_path / "v2.safetensors"))
    with pytest.raises(ValueError, match="holds no VAE"):
        AutoencoderKL.from_single_file(str(tmp_path / "v2.safetensors"))


def test_torch_dtype_is_checked_before_the_file_is_read(tmp_path):
    for load in (StableDiffusionPipeline.from_single_file, UNet2DConditionModel.from_single_file,
                 AutoencoderKL.from_single_file):
        with pytest.raises(TypeError, match="torch_dtype must be a floating torch.dtype"):
            load(str(tmp_path / "not-there.safetensors"), torch_dtype=torch.int8)     # no FileNotFoundError first
