"""The tiny InstructPix2Pix and Depth2Image: the widened UNet starts as tiny-sd, the extended text encoder keeps
tiny-sd's words, the training command runs and writes a pipeline folder, the evaluator is right on ground truth,
and the bundled folders load in minidiff and diffusers to the same images and have the measured effect."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

import minidiff
from minidiff.checkpoints import TINY_DEPTH2IMG, TINY_INSTRUCT_PIX2PIX, TINY_SD
from minidiff.training import evaluate_edit as ee
from minidiff.training.common import LOG_NAME
from minidiff.training.scenes import caption_words, render
from minidiff.training.train_edit import (COMMAND_NAME, drop_conditions, edit_examples, embed, extend_text_encoder,
                                          load_frozen_sd, main, main_depth, one_object_scene, widen_conv_in)

pytestmark = pytest.mark.usefixtures("one_thread")
MB = 1024 * 1024
FOLDERS = {"instruct-pix2pix": TINY_INSTRUCT_PIX2PIX, "depth2img": TINY_DEPTH2IMG}
MAINS = {"instruct-pix2pix": main, "depth2img": main_depth}


@pytest.fixture(scope="module")
def frozen_sd():
    return load_frozen_sd(TINY_SD, torch.device("cpu"))


# --- the models at step 0 -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [4, 1])
def test_widened_unet_is_tiny_sd_whatever_the_extra_channels_hold(frozen_sd, extra):
    unet = frozen_sd[0]
    wide = widen_conv_in(unet, extra)
    assert wide.config.in_channels == 4 + extra
    assert torch.equal(wide.conv_in.weight[:, 4:], torch.zeros_like(wide.conv_in.weight[:, 4:]))
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        old = unet(z, t, text).sample
        new = wide(torch.cat([z, 5 * torch.randn(2, extra, 8, 8)], 1), t, text).sample
    assert torch.allclose(new, old, atol=1e-6), (new - old).abs().max()


def test_extended_text_encoder_keeps_the_old_words(tmp_path):
    # a tokenizer of the first edition's words (shapes.py: no instruction words) and a random encoder over it
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidiff.training import shapes
    from minidiff.training.tokenizer import write_tokenizer

    old_vocab = write_tokenizer(str(tmp_path / "old"), shapes.caption_words())
    vocab = write_tokenizer(str(tmp_path / "tok"), caption_words())
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "old"))
    new_tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    config = CLIPTextConfig.from_pretrained(os.path.join(TINY_SD, "text_encoder")).to_dict()
    config.update(vocab_size=len(old_vocab), bos_token_id=old_vocab["<|startoftext|>"],
                  eos_token_id=old_vocab["<|endoftext|>"], pad_token_id=old_vocab["<|endoftext|>"])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    lacking = [w for w in ("make", "turn", "into", "move", "to", "up", "down") if w + "</w>" not in old_vocab]
    assert lacking == ["make", "turn", "into", "move", "to", "up", "down"]        # what the extension adds
    extended = extend_text_encoder(text_encoder, old_vocab, vocab)
    assert extended.config.vocab_size == len(vocab) > text_encoder.config.vocab_size
    captions = ["a red circle", "a small blue square at the top left on a gray background", ""]
    old = embed(tokenizer, text_encoder, captions, "cpu")
    new = embed(new_tokenizer, extended, captions, "cpu")
    assert torch.allclose(old, new, atol=1e-5)                                     # the same vectors for old words
    assert len(new_tokenizer.tokenize("make the circle blue")) == 4               # one token a word
    assert not torch.allclose(embed(new_tokenizer, extended, ["make the circle blue"], "cpu"),
                              embed(new_tokenizer, extended, ["turn the circle blue"], "cpu"))


def test_extending_the_bundled_tiny_sds_encoder_changes_nothing(frozen_sd, tmp_path):
    _, _, text_encoder, tokenizer = frozen_sd                   # the second edition's tokenizer has every word
    from minidiff.training.tokenizer import write_tokenizer

    vocab = write_tokenizer(str(tmp_path / "tok"), caption_words())
    assert vocab == tokenizer.get_vocab()
    extended = extend_text_encoder(text_encoder, tokenizer.get_vocab(), vocab)
    assert extended.config.vocab_size == text_encoder.config.vocab_size
    assert torch.equal(extended.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight)


def test_condition_dropout_shares():
    g = torch.Generator().manual_seed(0)
    text, image = drop_conditions("instruct-pix2pix", 200_000, g, "cpu")
    shares = [(text & ~image).float().mean(), (text & image).float().mean(), (~text & image).float().mean()]
    assert all(abs(s - 0.05) < 0.003 for s in shares), shares                      # 5% / 5% / 5%
    text, image = drop_conditions("depth2img", 200_000, g, "cpu")
    assert abs(text.float().mean() - 0.10) < 0.003 and not image.any()


def test_training_scenes_are_what_tiny_sd_knows():
    for i in range(30):
        scene, _ = one_object_scene(0, i)
        assert len(scene.objects) == 1 and scene.background in ("white", "gray", "black")
        assert scene.objects[0].shape in ("circle", "square", "triangle", "diamond")
    kinds = [kind for _, _, _, kind in edit_examples(30, 0)]
    assert kinds.count("color") == kinds.count("shape") == kinds.count("position") == 10


# --- the command ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["instruct-pix2pix", "depth2img"])
def test_the_command_runs_and_writes_a_pipeline_folder(kind, tmp_path):
    out = tmp_path / kind
    args = ["--out", str(out), "--steps", "3", "--num-images", "12", "--batch-size", "4", "--device", "cpu"]
    MAINS[kind](args)
    rows = open(out / LOG_NAME).read().splitlines()[1:]
    assert rows and all(math.isfinite(float(row.split(",")[1])) for row in rows)
    assert open(out / COMMAND_NAME).read().split() == ["python", "-m", "minidiff.training", kind, *args]
    index = json.load(open(out / "model_index.json"))
    extra = {"instruct-pix2pix": 4, "depth2img": 1}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = ee.load(str(out), None if kind == "instruct-pix2pix" else minidiff.StableDiffusionDepth2ImgPipeline)
    assert type(pipe).__name__ == index["_class_name"] and pipe.unet.config.in_channels == 4 + extra
    # the UNet moved, the VAE is tiny-sd's
    base = minidiff.UNet2DConditionModel.from_pretrained(TINY_SD, subfolder="unet")
    assert not torch.equal(pipe.unet.conv_in.weight[:, :4], base.conv_in.weight)
    with pytest.raises(SystemExit) as refused:                                    # a used --out is refused
        MAINS[kind](args)
    assert refused.value.code == 2


def test_init_with_the_wrong_channels_is_refused(tmp_path, capsys):
    MAINS["depth2img"](["--out", str(tmp_path / "d"), "--steps", "0", "--num-images", "3", "--device", "cpu"])
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path / "e"), "--steps", "1", "--num-images", "3", "--device", "cpu",
              "--init", str(tmp_path / "d")])
    assert refused.value.code == 2 and "reads 5 channels; instruct-pix2pix needs 8" in capsys.readouterr().err


# --- the evaluator on ground truth ----------------------------------------------------------------------
def test_edit_scores_are_right_on_ground_truth_pairs():
    for before, after, _, kind in edit_examples(30, ee.EVAL_SEED):
        assert ee.edit_scores(render(after)["image"], after, kind) == {"applied": True, "kept": True}
        assert ee.edit_scores(render(before)["image"], after, kind) == {"applied": False, "kept": True}
    with pytest.raises(ValueError, match="kind must be one of"):
        ee.edit_scores(render(after)["image"], after, "size")


def test_depth_iou_is_one_on_the_scene_itself_and_low_elsewhere():
    scenes = [one_object_scene(ee.EVAL_SEED, i)[0] for i in range(10)]
    for scene in scenes:
        assert ee.depth_iou(render(scene)["image"], scene) > 0.95
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert ee.depth_iou(blank, scenes[0]) == 0.0                                   # no object found


# --- the bundled checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["instruct-pix2pix", "depth2img"])
def test_bundled_folders_are_small_in_the_hub_layout(kind):
    folder = FOLDERS[kind]
    sizes = {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(folder) for f in files}
    assert sum(sizes.values()) < 32 * MB, sizes                               # tiny-sd's 27.8 MB, one UNet widened
    assert not [n for n in sizes if n.endswith((".pt", ".bin", ".ckpt"))], sizes
    for name in ("model_index.json", "README.md", LOG_NAME, COMMAND_NAME, "unet/config.json", "vae/config.json",
                 "text_encoder/config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert name in sizes, name
    readme = open(os.path.join(folder, "README.md")).read()
    assert "python -m minidiff.training" in readme and "evaluate-edit" in readme


def _both(kind):
    diffusers = pytest.importorskip("diffusers")
    kwargs = {"depth_estimator": None, "feature_extractor": None} if kind == "depth2img" else {"safety_checker": None}
    cls = "StableDiffusionDepth2ImgPipeline" if kind == "depth2img" else "StableDiffusionInstructPix2PixPipeline"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minidiff.DiffusionPipeline.from_pretrained(f"tiny-{kind}", **kwargs)
        theirs = getattr(diffusers, cls).from_pretrained(FOLDERS[kind], **kwargs)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def test_bundled_instruct_pix2pix_equals_diffusers():
    ours, theirs = _both("instruct-pix2pix")
    assert type(ours) is minidiff.StableDiffusionInstructPix2PixPipeline
    image = ee.images_as_tensor([one_object_scene(ee.EVAL_SEED, 0)[0]])
    run = dict(image=image, num_inference_steps=10, output_type="np")
    a = ours("make the circle blue", generator=torch.Generator().manual_seed(0), **run).images
    b = theirs("make the circle blue", generator=torch.Generator().manual_seed(0), **run).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2 / 255


def test_bundled_depth2img_equals_diffusers():
    ours, theirs = _both("depth2img")
    assert type(ours) is minidiff.StableDiffusionDepth2ImgPipeline and ours.depth_estimator is None
    scene = one_object_scene(ee.EVAL_SEED, 1)[0]
    run = dict(image=torch.ones(1, 3, 64, 64), depth_map=torch.from_numpy(render(scene)["depth"])[None],
               strength=1.0, num_inference_steps=10, output_type="np")
    a = ours("a red circle", generator=torch.Generator().manual_seed(0), **run).images
    b = theirs("a red circle", generator=torch.Generator().manual_seed(0), **run).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 2 / 255


# --- the measured effect (the model cards' numbers, on fewer scenes) -------------------------------------
def test_bundled_instruct_pix2pix_applies_edits_where_doing_nothing_applies_none():
    pipe = ee.load("tiny-instruct-pix2pix")
    table = ee.edit_table(pipe, num=12, seeds=(0,))
    applied = np.mean([table["instruct-pix2pix"][f"{k} applied"] for k in ee.ATTRIBUTES])
    assert all(table["input"][f"{k} applied"] == 0 for k in ee.ATTRIBUTES)
    assert applied >= 0.25, table            # the card, 48 edits x 2 seeds: colour / shape / position 100% / 94% / 9%


def test_bundled_depth2img_puts_the_object_where_the_depth_says():
    pipe = ee.load("tiny-depth2img", minidiff.StableDiffusionDepth2ImgPipeline)
    rows = ee.depth_table(pipe, num=12, seeds=(0,))
    assert rows["depth"]["iou"] - rows["depth zeroed"]["iou"] > 0.25, rows         # the card (48 x 2): 0.794 - 0.057
    assert sum(a > b for a, b in zip(rows["depth"]["ious"], rows["depth zeroed"]["ious"])) >= 8
