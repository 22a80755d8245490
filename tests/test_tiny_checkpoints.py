"""The bundled tiny checkpoints: they load by name in minidiff and as folders in diffusers, give the same
images in both, and draw what they are asked for."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minidiff
from helpers import gen, gens, load_minidiff, max_pixel_diff, quiet, tiny_sd_sizes
from minidiff.checkpoints import TINY_DDPM, TINY_SD
from minidiff.models.modeling import rename_legacy_keys
from minidiff.training import evaluate, scenes, shapes
from minidiff.training.shapes import ShapesDataset, to_model_range
from minidiff.training.tokenizer import write_tokenizer

MB = 1024 * 1024
F, _ = tiny_sd_sizes()                                 # pixels per latent: 8 (first tiny-sd) or 4 (second)
SCENES = F == 4                                        # the second tiny-sd was trained on scenes.py's data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd():
    """minidiff's tiny-sd pipeline alone, so that the tests which need no diffusers also run where it is not
    installed (CI's dependency-floor job: diffusers 0.42 needs a newer transformers than minidiff's floor)."""
    return load_minidiff(minidiff.DiffusionPipeline)


def files_under(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def test_bundled_folders_are_small_and_safetensors():
    files = files_under(TINY_SD) + files_under(TINY_DDPM)
    total = sum(os.path.getsize(f) for f in files)
    assert total < 35 * MB, f"{total / MB:.1f} MB"                  # the second edition: about 31 MB
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".ckpt"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    for folder, parts in ((TINY_SD, ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
                          (TINY_DDPM, ("unet", "scheduler"))):
        index = json.load(open(os.path.join(folder, "model_index.json")))
        assert all(index[p][0] in ("diffusers", "transformers") for p in parts)
        assert os.path.isfile(os.path.join(folder, "README.md"))
    index = json.load(open(os.path.join(TINY_SD, "model_index.json")))
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_components_load_by_bare_name():
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = minidiff.UNet2DConditionModel.from_pretrained("tiny-sd", subfolder="unet")
    vae = minidiff.AutoencoderKL.from_pretrained("tiny-sd", subfolder="vae")
    scheduler = minidiff.PNDMScheduler.from_pretrained("tiny-sd", subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(TINY_SD, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD, subfolder="tokenizer")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert unet.config.sample_size * F == vae.config.sample_size == 64
    assert text_encoder.config.vocab_size == len(tokenizer) and tokenizer.model_max_length == 77
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
    assert scheduler.config.beta_schedule == "scaled_linear"

    ddpm_unet = minidiff.UNet2DModel.from_pretrained("tiny-ddpm", subfolder="unet")
    ddpm_scheduler = minidiff.DDPMScheduler.from_pretrained("tiny-ddpm", subfolder="scheduler")
    assert ddpm_unet.config.sample_size == 32 and ddpm_scheduler.config.num_train_timesteps == 1000


def test_tokenizer_files_are_what_the_script_writes(tmp_path):
    write_tokenizer(str(tmp_path), (scenes if SCENES else shapes).caption_words())    # its data's words
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(TINY_SD, "tokenizer", name), encoding="utf-8") as bundled:
            assert bundled.read() == (tmp_path / name).read_text(encoding="utf-8"), name


def test_vae_reconstructs_and_its_scaling_factor_was_measured():
    vae = minidiff.AutoencoderKL.from_pretrained("tiny-sd", subfolder="vae")
    if SCENES:                                                   # the data it was trained and measured on
        x = torch.stack([scenes.ScenesDataset(128, seed=2024)[i][0] for i in range(128)])   # (128, 3, 64, 64)
    else:
        x = to_model_range(ShapesDataset(128, seed=2024).tensors()[0])
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(gen(0))
        x_rec = vae.decode(posterior.mean).sample
    # SD's rule: scaling_factor = 1 / std of the latents, so the UNet sees unit variance
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.05)
    assert (x_rec - x).pow(2).mean() < 0.02  # in [-1, 1] (first edition: 0.0115 measured): the shapes come back


def test_minidiff_and_diffusers_draw_the_same_image(tiny_sd_pair):
    ours, theirs = tiny_sd_pair                  # minidiff.DiffusionPipeline and diffusers' from the folder
    assert isinstance(ours, minidiff.StableDiffusionPipeline)
    prompts = ["a red circle", "a small blue diamond at the top left on a gray background"]
    images = []
    for pipe in (ours, theirs):
        images.append(pipe(prompts, num_inference_steps=25, guidance_scale=7.5, generator=gens(0, 1),
                           output_type="np").images)
    assert images[0].shape == (2, 64, 64, 3)
    assert max_pixel_diff(images[0], images[1]) <= 2 / 255


def test_tiny_sd_draws_the_prompt(tiny_sd):
    ours = tiny_sd
    asked = [("red", "circle"), ("yellow", "square"), ("green", "triangle"), ("blue", "diamond"),
             ("cyan", "circle"), ("purple", "triangle")]
    images = ours([f"a {c} {s}" for c, s in asked], num_inference_steps=25, guidance_scale=7.5,
                  generator=gens(*range(100, 100 + len(asked)))).images
    found = [evaluate.analyse(image) for image in images]
    colors = sum(a.color == c for a, (c, _) in zip(found, asked))
    shapes = sum(a.shape == s for a, (_, s) in zip(found, asked))
    assert colors >= 5 and shapes >= 4, [(a.color, a.shape) for a in found]


def test_tiny_ddpm_minidiff_and_diffusers_agree():
    diffusers = pytest.importorskip("diffusers")
    ours = quiet(minidiff.DiffusionPipeline.from_pretrained("tiny-ddpm"))
    theirs = quiet(diffusers.DDPMPipeline.from_pretrained(TINY_DDPM))
    assert isinstance(ours, minidiff.DDPMPipeline)
    images = []
    for pipe in (ours, theirs):
        images.append(pipe(batch_size=2, num_inference_steps=20, generator=gens(0, 1), output_type="np").images)
    assert images[0].shape == (2, 32, 32, 3)
    assert max_pixel_diff(images[0], images[1]) <= 2 / 255


# --- every bundled tensor is loaded, no weight is left at its random initialisation -------------------------
# A weight that a loader does not find in the file keeps its random initial value, and the model still runs:
# transformers only logs a warning ("newly initialized"). tiny-sd's text encoder was loaded that way by
# transformers 4.x (every prompt gave the same picture) while its keys lacked SD v1-4's `text_model.` prefix.

@pytest.mark.parametrize("folder, part, cls", [(TINY_SD, "unet", minidiff.UNet2DConditionModel),
                                                (TINY_SD, "vae", minidiff.AutoencoderKL),
                                                (TINY_DDPM, "unet", minidiff.UNet2DModel)])
def test_minidiff_components_hold_every_bundled_tensor(folder, part, cls):
    model = cls.from_pretrained(folder, subfolder=part)               # load_strict: missing / unexpected raise
    stored = rename_legacy_keys(load_file(os.path.join(folder, part, "diffusion_pytorch_model.safetensors")))
    state = model.state_dict()
    assert sorted(state) == sorted(stored)                           # no key left out, none unused
    unequal = [k for k in stored if not torch.equal(state[k], stored[k])]
    assert not unequal, unequal[:5]


TEXT_ENCODER_FOLDERS = ["tiny-sd", "tiny-instruct-pix2pix", "tiny-depth2img"]   # bundled folders with a text encoder


@pytest.mark.parametrize("name", TEXT_ENCODER_FOLDERS)
def test_text_encoder_file_has_sd_v1_key_layout(name):
    """Keys as in CompVis/stable-diffusion-v1-4's text_encoder/model.safetensors (`text_model.embeddings.*`,
    `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`): every transformers version loads those.
    The file's first version, written by training under transformers 5.17, lacked the prefix: transformers 5
    reads both layouts, 4.x only the prefixed one (5.25's save_pretrained writes the prefix again)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = os.path.join(minidiff.checkpoints.CHECKPOINTS_DIR, name, "text_encoder")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata == {"format": "pt"}
    # The weights of a CLIPTextModel of this config, in SD v1's names whatever this transformers calls them.
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    expected = {"text_model." + k.removeprefix("text_model.") for k in model.state_dict()}
    assert keys == expected, (sorted(keys - expected)[:5], sorted(expected - keys)[:5])
    assert {k.split(".")[1] for k in keys} == {"embeddings", "encoder", "final_layer_norm"}


@pytest.mark.parametrize("name", TEXT_ENCODER_FOLDERS)
def test_text_encoder_loads_every_bundled_tensor(name):
    """transformers' own report of the load is empty: no missing key (it would be random), no unexpected one
    (it would be unused), no shape mismatch. No key is exempted: `position_ids` (a buffer, arange(77), that
    old checkpoints such as SD v1-4's carry) is neither expected nor listed from the floor (4.35.2) to 5.x."""
    from transformers import CLIPTextModel

    folder = os.path.join(minidiff.checkpoints.CHECKPOINTS_DIR, name, "text_encoder")
    model, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    # And the tensors are the file's, bit for bit (transformers 5 names them without the `text_model.` prefix).
    stored = {k.removeprefix("text_model."): v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    assert sorted(state) == sorted(stored)
    unequal = [k for k in stored if not torch.equal(state[k], stored[k])]
    assert not unequal, unequal[:5]
