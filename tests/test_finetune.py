"""The fine-tuning loops on tiny-sd (minidiff/training/finetune/): the loss falls, only the parameters that should
learn change (per technique), a tiny Textual Inversion run moves the judge's figure for a new word, DreamBooth
teaches tiny-sd a shape it never saw (the default concept, a heart), and the saved files load back through
minidiff's loaders (and, for Textual Inversion, in diffusers) to the same images."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fake_checkpoints import make_fake_sd, make_fake_sd2
from helpers import load_diffusers, max_pixel_diff
from minidiff.checkpoints import TINY_SD
from minidiff.training.finetune import custom_diffusion, dreambooth, textual_inversion
from minidiff.training import scenes
from minidiff.training.finetune.common import (DEFAULT_CONCEPT, Concept, add_concept_token, concept_rate,
                                               diffusion_loss, encode_images, generate, instance_images, judged,
                                               load_base, noise_schedule_of, parse_concept, token_ids)
from minidiff.training.finetune.compare import load_finetuned
from minidiff.loaders.lora import LoRALayer

pytestmark = pytest.mark.usefixtures("one_thread")
CONCEPT = Concept("<sks>", "yellow", "square")     # the random starting row draws purple and blue shapes
def token_table(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text encoder's (vocab, D) token table in a state dict: `text_model.embeddings.token_embedding.weight`
    under transformers 4, `embeddings.token_embedding.weight` under 5."""
    return next(v for k, v in state.items() if k.endswith("embeddings.token_embedding.weight"))


def run(module, tmp_path, *options):
    """Train with `module`'s command-line options into tmp_path/run; returns (pipe, result)."""
    args = module.make_parser().parse_args(["--out", str(tmp_path / "run"), "--eval-seeds", "0", *options])
    return module.train(args)


def base_state() -> dict[str, dict[str, torch.Tensor]]:
    pipe = load_base("tiny-sd", 0)
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "vae", "text_encoder")}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    """Names of `model`'s parameters that differ from `before` (LoRA wrappers read as their base layer's name)."""
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return {k for k, v in before.items() if not torch.equal(v, after[k][:len(v)])}


@pytest.fixture(scope="module")
def base():
    return base_state()


def fixed_loss(pipe) -> float:
    """The diffusion loss on the instance images with fixed noise and timesteps (64 draws): comparable across steps."""
    mean, std = encode_images(pipe, instance_images(CONCEPT, 5))
    g = torch.Generator().manual_seed(123)
    idx = torch.arange(64) % len(mean)
    with torch.no_grad():
        return diffusion_loss(pipe, noise_schedule_of(pipe), mean[idx], std[idx],
                              token_ids(pipe, [CONCEPT.prompt]).expand(64, -1), g).item()


def test_textual_inversion_learns_only_the_new_row_and_moves_the_colour(tmp_path, base):
    # Before: the same random row the loop starts from. The concept's colour appears in none of 8 images
    # (measured on the second tiny-sd: purple and blue circles and squares, 0/8 yellow).
    start = load_base("tiny-sd", 0)
    add_concept_token(start, CONCEPT, 1, seed=0)
    before_rate = concept_rate(start, [CONCEPT], 8, seed=5000)["<sks>"]
    before_loss = fixed_loss(start)

    pipe, result = run(textual_inversion, tmp_path, "--steps", "20", "--concept", "<sks>:yellow:square")
    after_rate = concept_rate(pipe, [CONCEPT], 8, seed=5000)["<sks>"]
    # measured: yellow squares in 8 of 8 images after 20 steps (and after 10). Bound: half.
    assert before_rate["color"] <= 0.125 and after_rate["both"] >= 0.5, (before_rate, after_rate)
    assert fixed_loss(pipe) < before_loss
    # Only the new row learned: UNet, VAE and every other row of the table exactly as before.
    assert not changed(base["unet"], pipe.unet) and not changed(base["vae"], pipe.vae)
    assert not changed(base["text_encoder"], pipe.text_encoder)       # the old rows included (compared up to vocab)
    table = pipe.text_encoder.get_input_embeddings().weight
    start_table = start.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == len(token_table(base["text_encoder"])) + 1 and not torch.equal(table[-1], start_table[-1])
    assert result["trained_parameters"] == 64                   # one row of width 64

    # The saved learned_embeds.safetensors loads through the loader, and in diffusers, to the same image.
    images = generate(pipe, [CONCEPT.prompt], [7])
    loaded = load_finetuned("tiny-sd", str(tmp_path / "run"))
    assert max_pixel_diff(generate(loaded, [CONCEPT.prompt], [7]), images) == 0
    theirs = load_diffusers("StableDiffusionPipeline", TINY_SD)
    theirs.load_textual_inversion(str(tmp_path / "run"))
    image = theirs(CONCEPT.prompt, num_inference_steps=25, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(7)).images
    assert max_pixel_diff(image, images) <= 2 / 255          # tiny-sd's minidiff/diffusers agreement (its README)


def test_the_drawings_are_the_concept_for_every_shape():
    """The instance images show what the concept names, as the judge reads them (also the held-out star and heart)."""
    for shape in scenes.SHAPES:
        concept = Concept("<sks>", "purple", shape)
        drawn = instance_images(concept, 5)
        assert drawn.shape == (5, 3, 64, 64) and drawn.dtype == torch.uint8
        assert [judged(x.permute(1, 2, 0).numpy()) for x in drawn] == [("purple", shape)] * 5, shape
    assert parse_concept(DEFAULT_CONCEPT) == Concept("<sks>", "purple", "heart")


def test_dreambooth_teaches_a_shape_tiny_sd_cannot_draw(tmp_path):
    # The default concept: "a <sks> heart", hearts never in tiny-sd's scenes. The same fixed row the loop adds.
    heart = parse_concept(DEFAULT_CONCEPT)
    start = load_base("tiny-sd", 0)
    add_concept_token(start, heart, 1, seed=0)
    before = concept_rate(start, [heart], 8, seed=5000)["<sks>"]
    pipe, _ = run(dreambooth, tmp_path, "--steps", "250")                 # the full UNet, lr 1e-4, batch 4
    after = concept_rate(pipe, [heart], 8, seed=5000)["<sks>"]
    # measured: no heart in 8 images before; hearts in 5 of 8 after 250 steps (4 after 200, 1 after 150). Bound: 3.
    assert before["shape"] == 0 and after["both"] >= 3 / 8, (before, after)


def test_textual_inversion_multi_vector(tmp_path, base):
    pipe, result = run(textual_inversion, tmp_path, "--steps", "2", "--num-vectors", "3")
    table = pipe.text_encoder.get_input_embeddings().weight
    old = token_table(base["text_encoder"])
    assert torch.equal(table[:len(old)], old) and table.shape[0] == len(old) + 3
    assert result["trained_parameters"] == 3 * 64
    loaded = load_finetuned("tiny-sd", str(tmp_path / "run"))
    assert sorted(t for t in loaded.tokenizer.get_added_vocab() if "sks" in t) == ["<sks>", "<sks>_1", "<sks>_2"]
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, table)


def test_dreambooth_lora_with_prior_trains_only_the_adapters(tmp_path, base):
    pipe, result = run(dreambooth, tmp_path, "--steps", "3", "--lora-rank", "2", "--prior-preservation",
                       "--num-class-images", "2", "--lr", "1e-2")
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoRALayer)]
    blocks = [name for name, _ in pipe.unet.named_modules() if name.endswith(".attn1")]
    assert len(blocks) >= 4 and len(layers) == 4 * 2 * len(blocks)   # q, k, v, out of attn1 and attn2 per block
    assert all(layer.adapters["default_0"].up.weight.abs().sum() > 0 for layer in layers)  # up started at 0
    assert not changed(base["unet"], pipe.unet) and not changed(base["vae"], pipe.vae)
    assert not changed(base["text_encoder"], pipe.text_encoder)   # the rare word is a fixed row
    assert result["trained_parameters"] == sum(p.numel() for l in layers for p in l.adapters.parameters())
    # pytorch_lora_weights.safetensors + learned_embeds.safetensors load back to the same image
    images = generate(pipe, [CONCEPT.prompt], [3])
    loaded = load_finetuned("tiny-sd", str(tmp_path / "run"))
    assert max_pixel_diff(generate(loaded, [CONCEPT.prompt], [3]), images) <= 1 / 255
    # and in diffusers (+ peft): the LoRA in diffusers' format, the word through its load_textual_inversion
    pytest.importorskip("peft")
    theirs = load_diffusers("StableDiffusionPipeline", TINY_SD)
    theirs.load_textual_inversion(str(tmp_path / "run"))
    theirs.load_lora_weights(str(tmp_path / "run"))
    image = theirs(CONCEPT.prompt, num_inference_steps=25, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(3)).images
    assert max_pixel_diff(image, images) <= 2 / 255


def test_dreambooth_full_trains_the_unet_only(tmp_path, base):
    pipe, result = run(dreambooth, tmp_path, "--steps", "2")
    assert changed(base["unet"], pipe.unet)                   # (parameters with no gradient, if any, may stay)
    assert not changed(base["vae"], pipe.vae) and not changed(base["text_encoder"], pipe.text_encoder)
    assert result["trained_parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    loaded = load_finetuned("tiny-sd", str(tmp_path / "run"))
    assert max_pixel_diff(generate(loaded, [CONCEPT.prompt], [3]), generate(pipe, [CONCEPT.prompt], [3])) == 0


def test_custom_diffusion_two_concepts_trains_only_cross_attention_kv_and_the_words(tmp_path, base):
    pipe, result = run(custom_diffusion, tmp_path, "--steps", "3", "--concept", "<new1>:purple:square",
                       "--concept", "<new2>:cyan:triangle")
    moved = changed(base["unet"], pipe.unet)
    assert moved and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in moved), sorted(moved)
    assert not changed(base["vae"], pipe.vae)
    table = pipe.text_encoder.get_input_embeddings().weight
    old = token_table(base["text_encoder"])
    assert torch.equal(table[:len(old)], old) and table.shape[0] == len(old) + 2
    assert {"<new1>.safetensors", "<new2>.safetensors"} <= set(os.listdir(tmp_path / "run"))
    loaded = load_finetuned("tiny-sd", str(tmp_path / "run"))
    prompts = ["a <new1> square", "a <new2> triangle"]
    assert max_pixel_diff(generate(loaded, prompts, [3, 4]), generate(pipe, prompts, [3, 4])) <= 1 / 255


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, reference_dir):
    return str(make_fake_sd(tmp_path_factory.mktemp("sd"), reference_dir))


def test_a_v_prediction_model_is_refused(tmp_path_factory, reference_dir, tmp_path, capsys):
    folder = make_fake_sd2(tmp_path_factory.mktemp("sd2"), reference_dir, v_prediction=True)
    with pytest.raises(SystemExit) as e:
        textual_inversion.main(["--base", str(folder), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert e.value.code == 2 and "prediction_type 'v_prediction'" in capsys.readouterr().err


@pytest.mark.parametrize("module, options", [
    (textual_inversion, ["--num-vectors", "2"]), (dreambooth, ["--lora-rank", "2", "--prior-preservation"]),
    (dreambooth, []), (custom_diffusion, ["--concept", "<new1>:purple:square"])], ids=["ti", "db-lora", "db", "cd"])
def test_every_loop_runs_on_an_sd_v1_folder(sd_folder, tmp_path, module, options):
    """SD v1-4's own tokenizer (49,408 words) and configs, small random weights: the word is added and the files
    load back to the same image."""
    folder = sd_folder
    token = "<new1>" if module is custom_diffusion else "<sks>"
    pipe, _ = run(module, tmp_path, "--base", folder, "--steps", "2", "--num-class-images", "1", *options) \
        if module is dreambooth else run(module, tmp_path, "--base", folder, "--steps", "2", *options)
    assert len(pipe.tokenizer) > 49408 and token in pipe.tokenizer.get_added_vocab()
    loaded = load_finetuned(folder, str(tmp_path / "run"))
    prompt = [f"a {token} square"]
    assert max_pixel_diff(generate(loaded, prompt, [1]), generate(pipe, prompt, [1])) <= 1 / 255


def test_resume_continues_where_training_stopped(tmp_path):
    straight, _ = textual_inversion.train(textual_inversion.make_parser().parse_args(
        ["--out", str(tmp_path / "a"), "--steps", "4", "--eval-seeds", "0"]))
    for steps, more in (("2", []), ("4", ["--resume"])):
        resumed, _ = textual_inversion.train(textual_inversion.make_parser().parse_args(
            ["--out", str(tmp_path / "b"), "--steps", steps, "--eval-seeds", "0", *more]))
    # the second run did steps 2-3 only (its log goes on from the first's), with the optimizer and noise generator
    # restored: the same row as 4 steps in one go
    steps = [int(line.split(",")[0]) for line in (tmp_path / "b" / "loss_log.csv").read_text().splitlines()[1:]]
    assert steps == [0, 1, 3]
    assert torch.equal(resumed.text_encoder.get_input_embeddings().weight,
                       straight.text_encoder.get_input_embeddings().weight)


def test_bad_options_are_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        textual_inversion.main(["--out", str(tmp_path / "a"), "--concept", "<sks>:pink:square"])
    assert e.value.code == 2 and "TOKEN:COLOUR:SHAPE" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        dreambooth.main(["--out", str(tmp_path / "b"), "--steps", "1"])
    assert "already holds files" in capsys.readouterr().err
    # --overwrite replaces an earlier run's files and keeps the user's
    pipe, _ = run(custom_diffusion, tmp_path, "--steps", "1", "--concept", "<new1>:purple:square")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(textual_inversion, tmp_path, "--steps", "1", "--overwrite")
    # --overwrite never removes the model being fine-tuned: --out = --base is refused, the folder kept (a copy)
    mine = shutil.copytree(TINY_SD, tmp_path / "my-sd")
    with pytest.raises(SystemExit):
        dreambooth.main(["--base", str(mine), "--out", str(mine), "--overwrite", "--steps", "1"])
    assert "overlaps" in capsys.readouterr().err and sorted(os.listdir(mine)) == sorted(os.listdir(TINY_SD))
    assert sorted(os.listdir(tmp_path / "run")) == ["learned_embeds.safetensors", "loss_log.csv", "notes.txt",
                                                    "result.json", "training_state.pt"]
    with pytest.raises(SystemExit):
        textual_inversion.main(["--out", str(tmp_path / "c"), "--num-vectors", "0"])
    assert "--num-vectors" in capsys.readouterr().err and not (tmp_path / "c").exists()
