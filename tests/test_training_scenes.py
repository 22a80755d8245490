"""The second edition of the tiny world's training: scenes data (--data scenes), the factor-4 VAE and the
16x16-latent UNet it selects, and the evaluator of the second edition's targets (evaluate_scenes.py)."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import minidiff

from minidiff.training import evaluate_scenes, scenes, train_sd, train_vae
from minidiff.training.common import CommandError, load_images
from test_training import TINY_TEXT, TINY_VAE, parse

TINY_VAE_16 = {**train_vae.VAE_CONFIG_16, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}


def test_scenes_data_is_the_scenes_data_set_whatever_the_workers():
    images, captions = scenes.render_scenes(6, seed=3, size=64, workers=1)
    again, captions2 = scenes.render_scenes(6, seed=3, size=64, workers=2)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, again) and captions == captions2
    ds = scenes.ScenesDataset(6, seed=3)
    assert captions == [scenes.caption(ds.scene(i)) for i in range(6)]
    image, _ = ds[4]                                                      # [-1, 1]
    assert torch.allclose(images[4].float() / 127.5 - 1, image, atol=1e-6)
    # the training commands read it with --data scenes
    loaded, loaded_captions = load_images(parse(train_vae, "--out", "x", "--data", "scenes", "--num-images", "6",
                                                "--seed", "3"), 64, torch.device("cpu"))
    assert torch.equal(loaded, images) and loaded_captions == captions


def test_latent_size_16_makes_16x16_latents():
    from minidiff.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_config({**TINY_VAE_16})
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16)
    assert train_vae.VAE_CONFIGS[16]["down_block_types"] == ["DownEncoderBlock2D"] * 3


def train_pipeline(tmp_path_factory, data: str, vae_config: dict):
    """A VAE of `vae_config` and the sd command's own UNet config for its latents, 2 steps each on --data: a
    loadable folder. Returns the pipeline folder and the VAE's run folder."""
    vae_dir = tmp_path_factory.mktemp(f"vae-{data}")
    train_vae.train(parse(train_vae, "--out", str(vae_dir), "--data", data, "--steps", "2", "--batch-size", "2",
                          "--num-images", "8"), vae_config)
    out = tmp_path_factory.mktemp(f"sd-{data}")
    train_sd.train(parse(train_sd, "--out", str(out), "--vae", str(vae_dir / "vae"), "--data", data,
                         "--steps", "2", "--batch-size", "2", "--num-images", "8"), None)
    return out, vae_dir


@pytest.fixture(scope="module")
def scenes_pipeline(tmp_path_factory):
    """A factor-4 VAE and the sd command's own 16x16 UNet config, 2 steps each on scenes: a loadable folder."""
    out, vae_dir = train_pipeline(tmp_path_factory, "scenes", TINY_VAE_16)
    from minidiff.pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    return out, vae_dir, pipe


def test_sd_command_picks_the_16x16_unet_and_the_scenes_vocabulary(scenes_pipeline):
    out, _, pipe = scenes_pipeline
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["sample_size"] == 16 and config["block_out_channels"] == train_sd.UNET_CONFIG_16["block_out_channels"]
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    for word in ("star", "heart", "striped", "gradient", "left", "above", "make", "into"):
        assert f"{word}</w>" in vocab, word
    caption = "a red circle left of a blue star on a striped background"
    assert pipe.tokenizer.tokenize(caption) == [f"{w}</w>" for w in caption.split()]     # one token per word
    # the text encoder in SD v1-4's key layout (text_model.*), which older transformers also read
    from safetensors import safe_open

    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    image = pipe("a red circle above a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_sd_command_refuses_a_vae_it_has_no_unet_for(tmp_path, scenes_pipeline):
    _, vae_dir, _ = scenes_pipeline
    config = json.loads((vae_dir / "vae" / "config.json").read_text())
    odd = tmp_path / "vae2"
    odd.mkdir()
    config.update(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  block_out_channels=[8, 8])
    from minidiff.models.vae import AutoencoderKL

    AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(str(odd))
    with pytest.raises(CommandError, match=r"32x32 latents.*--latent-size 8 or 16"):
        train_sd.train(parse(train_sd, "--out", str(tmp_path / "sd"), "--vae", str(odd), "--steps", "1"), None, TINY_TEXT)
    assert not (tmp_path / "sd" / "unet").exists()


def test_word_position_is_the_words_token():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(__import__("minidiff").checkpoints.TINY_SD), subfolder="tokenizer")
    prompt = "a small red circle"
    k = evaluate_scenes.word_position(tokenizer, prompt, "circle")
    assert k == 4 and tokenizer(prompt).input_ids[k] == tokenizer.convert_tokens_to_ids("circle</w>")
    with pytest.raises(ValueError, match="not one token"):
        evaluate_scenes.word_position(tokenizer, prompt, "square")


def test_peak_inside_reads_the_judged_object():
    scene = scenes.random_scene(random.Random(0), pairs=[("red", "circle")], max_objects=1)
    drawn = scenes.render(scene, 64)
    mask = torch.from_numpy(drawn["masks"][0]).float()                   # (64, 64)
    on_object = torch.nn.functional.avg_pool2d(mask[None, None], 4)[0, 0]  # (16, 16): peaks on the object
    assert evaluate_scenes.peak_inside(on_object, drawn["image"]) == (True, pytest.approx(mask.mean().item(), abs=0.02))
    assert evaluate_scenes.peak_inside(1 - on_object, drawn["image"])[0] is False
    assert evaluate_scenes.peak_inside(on_object, np.full((64, 64, 3), 255, np.uint8)) == (False, 0.0)


def test_two_object_prompts_are_seen_pairs_and_repeatable():
    prompts = evaluate_scenes.two_object_prompts(30, seed=1)
    assert prompts == evaluate_scenes.two_object_prompts(30, seed=1) != evaluate_scenes.two_object_prompts(30, seed=2)
    for p in prompts:
        (a, b), _ = __import__("minidiff").training.judge.parse_caption(p)
        assert (a.color, a.shape) != (b.color, b.shape)
        assert {(a.color, a.shape), (b.color, b.shape)}.isdisjoint(scenes.HELD_OUT_PAIRS)
        assert a.shape in scenes.BASE_SHAPES and b.shape in scenes.BASE_SHAPES


def _drawn(prompt: str, seed: int, wrong: bool):
    """An image of what `prompt` asks for (or, wrong=True, every colour swapped), and a map on its first object."""
    from minidiff.training.judge import parse_caption

    wanted, _ = parse_caption(prompt)
    colours = list(scenes.COLORS)
    pairs = [(colours[(colours.index(w.color) + 3) % 6] if wrong else w.color, w.shape) for w in wanted]
    scene = scenes.random_scene(random.Random(seed), pairs=pairs)
    drawn = scenes.render(scene, 64)
    largest = max(drawn["masks"], key=lambda m: m.sum())
    return Image.fromarray(drawn["image"]), torch.nn.functional.avg_pool2d(torch.from_numpy(largest).float()[None, None], 4)[0, 0]


@pytest.mark.parametrize("wrong", [False, True])
def test_evaluate_counts_what_the_judge_sees(monkeypatch, wrong):
    """With images drawn from the prompts themselves every share is 100%; with every colour swapped the colour,
    two-object and held-out shares are 0 while shapes and attention peaks stay right."""
    def generate(pipe, prompts, seed, steps, guidance, words=None):
        drawn = [_drawn(p, seed + i, wrong) for i, p in enumerate(prompts)]
        return [d[0] for d in drawn], (torch.stack([d[1] for d in drawn]) if words else None)

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            pass

    monkeypatch.setattr(evaluate_scenes, "generate", generate)
    monkeypatch.setattr(evaluate_scenes, "seconds_per_image", lambda pipe, steps: 0.5)
    result = evaluate_scenes.evaluate(Pipe(), seeds=1, num_two=6)
    expected = 0.0 if wrong else 1.0
    assert result["color"] == result["two_objects"] == result["held_out"] == expected
    assert result["shape"] == result["attention_peak"] == 1.0
    assert 0.05 < result["attention_chance"] < 0.3
    assert result["images"] == len(evaluate_scenes.single_prompts()) + 6 + 2
    table = evaluate_scenes.table(result)
    assert f"| color | {100 * expected:.1f}% | >= 95% |" in table


def test_generate_returns_the_words_attention_averaged_over_steps(scenes_pipeline):
    _, _, pipe = scenes_pipeline
    prompts = ["a red circle", "a large blue square at the top left"]
    images, maps = evaluate_scenes.generate(pipe, prompts, 0, 2, 7.5, words=["circle", "square"])
    assert len(images) == 2 and maps.shape == (2, 16, 16)
    # a softmax over 77 tokens averaged: each cell's weight on one token is in (0, 1)
    assert torch.isfinite(maps).all() and (maps > 0).all() and (maps < 1).all()
    again, none = evaluate_scenes.generate(pipe, prompts, 0, 2, 7.5)
    assert none is None
    # capturing maps (an explicit softmax instead of the fused kernel) changes no image beyond rounding
    assert np.abs(np.asarray(images[0], np.int16) - np.asarray(again[0], np.int16)).max() <= 2


class _RoundTrip(torch.nn.Module):
    """A stand-in VAE whose round trip is `change(x)`: encode keeps x, decode applies `change`."""

    def __init__(self, change):
        super().__init__()
        self.change = change

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})()})()

    def decode(self, z):
        return type("Out", (), {"sample": self.change(z)})()


def test_evaluate_vae_judges_each_round_trip_against_its_scene():
    perfect = evaluate_scenes.evaluate_vae(_RoundTrip(lambda x: x), num_scenes=20, batch_size=8)
    assert perfect["mse"] < 1e-4                                          # only the uint8 rounding
    assert all(perfect[key] == 1.0 for key in ("color", "shape", "size", "position", "count", "all")), perfect
    assert all(kept == seen > 0 for kept, seen in perfect["shape_kept"].values()), perfect["shape_kept"]
    flipped = evaluate_scenes.evaluate_vae(_RoundTrip(lambda x: x.flip(-1)), num_scenes=20, batch_size=8)
    assert flipped["color"] == 1.0 and flipped["position"] < 1.0          # a mirror keeps colours, moves objects
    blank = evaluate_scenes.evaluate_vae(_RoundTrip(torch.ones_like), num_scenes=20, batch_size=8)
    assert blank["color"] == blank["shape"] == blank["count"] == 0.0 and blank["mse"] > 0.1
    assert all(kept == 0 for kept, _ in blank["shape_kept"].values())


def test_evaluate_vae_command_needs_a_model(capsys):
    from minidiff.training.evaluate import main

    with pytest.raises(SystemExit, match="evaluate vae: give --model"):
        main(["vae"])


# --- the later lessons' networks, trained for the second edition's factor-4 pipeline --------------------------
def test_render_scenes_gives_the_objects_masks_with_the_images():
    images, captions = scenes.render_scenes(6, seed=3, size=64, workers=1)
    again, captions2, masks = scenes.render_scenes(6, seed=3, size=64, workers=2, masks=True)
    assert torch.equal(images, again) and captions == captions2
    assert masks.shape == (6, 1, 64, 64) and masks.dtype == torch.bool
    ds = scenes.ScenesDataset(6, seed=3)
    for i in range(6):
        drawn = ds.render(i)["masks"]                                     # (objects, 64, 64)
        assert torch.equal(masks[i, 0], torch.from_numpy(drawn.any(axis=0)))
        # and the mask is where the objects are: inside their boxes, filling at least 40% of each (a diamond: 50%)
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for obj in ds.scene(i).objects:
            x0, y0, x1, y1 = obj.box
            box = (slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1))))
            inside[box] = True
            assert masks[i, 0][box].float().mean() > 0.4, (i, obj)
        assert not (masks[i, 0] & ~inside).any(), i
    assert any(len(ds.scene(i).objects) == 2 for i in range(6))          # the union of two masks is exercised


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_control_commands_shrink_the_mask_by_the_vaes_factor(kind, scenes_pipeline, tmp_path):
    from minidiff.training import evaluate_control, train_control

    sd, _, base = scenes_pipeline
    run = tmp_path / kind
    (train_control.main if kind == "controlnet" else train_control.main_adapter)(
        ["--sd", str(sd), "--out", str(run), "--steps", "2", "--num-images", "8", "--batch-size", "2",
         "--device", "cpu"])
    pipe = evaluate_control.load_pipeline(str(run), str(sd))
    pipe.set_progress_bar_config(disable=True)
    net = pipe.controlnet if kind == "controlnet" else pipe.adapter
    factor = net.condition_scale_factor if kind == "controlnet" else net.config.downscale_factor
    assert factor == base.vae_scale_factor == 4                           # 64 px masks meet 16x16 latents
    prompts, masks = evaluate_control.eval_set(2, data="scenes")
    images = evaluate_control.generate(pipe, prompts, masks, scale=1.0, steps=2)
    assert [image.size for image in images] == [(64, 64)] * 2


@pytest.fixture
def shapes_tokenizer_sd(tmp_path):
    """The bundled tiny-sd's folder with the first edition's tokenizer (shapes.py's 26 words, none of the scenes'
    new ones): what the command must read as a pipeline trained on shapes.py."""
    import os

    from minidiff.checkpoints import TINY_SD
    from minidiff.training import shapes
    from minidiff.training.tokenizer import write_tokenizer

    folder = tmp_path / "shapes-sd"
    folder.mkdir()
    for part in ("model_index.json", "scheduler", "text_encoder", "unet", "vae"):
        os.symlink(os.path.join(TINY_SD, part), folder / part)
    write_tokenizer(str(folder / "tokenizer"), shapes.caption_words())
    return folder


def test_control_command_picks_the_data_its_pipeline_was_trained_on(scenes_pipeline, shapes_tokenizer_sd,
                                                                      tmp_path, capsys):
    from minidiff.training import train_control

    sd, _, _ = scenes_pipeline
    train_control.main(["--sd", str(sd), "--out", str(tmp_path / "a"), "--steps", "0", "--num-images", "4",
                        "--device", "cpu"])
    assert f"--data scenes: the data --sd {sd} was trained on" in capsys.readouterr().out
    train_control.main(["--out", str(tmp_path / "b"), "--steps", "0", "--num-images", "4", "--device", "cpu"])
    assert "--data scenes: the data --sd tiny-sd was trained on" in capsys.readouterr().out     # the bundled one
    train_control.main(["--sd", str(shapes_tokenizer_sd), "--out", str(tmp_path / "c"), "--steps", "0",
                        "--num-images", "4", "--device", "cpu"])
    assert f"--data shapes: the data --sd {shapes_tokenizer_sd} was trained on" in capsys.readouterr().out


def test_control_command_seeds_the_new_network_and_continues_a_run_of_its_own(scenes_pipeline, tmp_path):
    from minidiff.training import train_control

    sd, _, _ = scenes_pipeline
    common = ["--sd", str(sd), "--num-images", "4", "--batch-size", "2", "--device", "cpu"]
    weights = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):                 # --steps 0: the starting weights
        train_control.main_adapter([*common, "--out", str(tmp_path / name), "--steps", "0", "--seed", seed])
        weights[name] = minidiff.T2IAdapter.from_pretrained(str(tmp_path / name)).state_dict()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    # --init from a run made for this tiny-sd is taken, and so is --resume of it
    train_control.main_adapter([*common, "--out", str(tmp_path / "d"), "--steps", "1", "--init", str(tmp_path / "a")])
    train_control.main_adapter([*common, "--out", str(tmp_path / "d"), "--steps", "2", "--resume"])
    assert (tmp_path / "d" / "config.json").is_file()


@pytest.fixture(scope="module")
def factor8_pipeline(tmp_path_factory):
    """A pipeline of the first tiny-sd's shape (factor-8 VAE, the 2-level 8x8 UNet), 2 steps each on shapes.py, and a
    ControlNet, a T2I-Adapter and an InstructPix2Pix UNet made for it (untrained): what the second tiny-sd's commands
    must refuse."""
    from minidiff.training.train_control import conditioning_widths, make_adapter
    from minidiff.training.train_edit import widen_conv_in

    out, _ = train_pipeline(tmp_path_factory, "shapes", TINY_VAE)                  # factor 8: the 8x8 UNet
    unet = minidiff.UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    nets = tmp_path_factory.mktemp("nets8")
    minidiff.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_widths(8)).save_pretrained(
        str(nets / "controlnet"))
    make_adapter(unet, 8).save_pretrained(str(nets / "adapter"))
    widen_conv_in(unet, 4).save_pretrained(str(nets / "instruct-pix2pix" / "unet"))    # an InstructPix2Pix UNet of it
    return out, nets / "controlnet", nets / "adapter", nets / "instruct-pix2pix"


def test_control_command_refuses_a_network_made_for_another_tiny_sd(scenes_pipeline, factor8_pipeline, tmp_path, capsys):
    from minidiff.training import train_control

    sd, _, _ = scenes_pipeline
    sd8, controlnet8, adapter8, _ = factor8_pipeline
    with pytest.raises(SystemExit) as refused:                            # a ControlNet of the first tiny-sd's shape: 8x, 2 levels
        train_control.main(["--sd", str(sd), "--init", str(controlnet8), "--out", str(tmp_path / "run"),
                            "--device", "cpu"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and f"--init {controlnet8}: controlnet was built for another UNet" in err
    assert f"Pass an --init trained for --sd {sd}, or drop --init." in err and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as refused:                            # an adapter of that shape: 2 features, 8x
        train_control.main_adapter(["--sd", str(sd), "--init", str(adapter8), "--out", str(tmp_path / "run"),
                                    "--device", "cpu"])
    assert refused.value.code == 2 and "adapter was built for another UNet" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a run of this tiny-sd's ControlNet, resumed against a tiny-sd of the first shape: refused before any data is drawn
    run = tmp_path / "v2-run"
    train_control.main(["--sd", str(sd), "--out", str(run), "--steps", "1", "--num-images", "4", "--batch-size", "2",
                        "--device", "cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train_control.main(["--sd", str(sd8), "--out", str(run), "--steps", "2", "--num-images", "4", "--device", "cpu",
                            "--resume"])
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and "holds a controlnet of another shape than this command builds" in err
    assert "drew" not in out
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(SystemExit) as refused:
        train_control.main(["--sd", str(empty), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert refused.value.code == 2 and "has no unet/, vae/, text_encoder/, tokenizer/" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_control_command_refuses_data_its_pipelines_tokenizer_cannot_read(shapes_tokenizer_sd, tmp_path, capsys):
    from minidiff.training import train_control

    sd = str(shapes_tokenizer_sd)
    with pytest.raises(SystemExit) as refused:                            # the first tokenizer knows no scenes words
        train_control.main(["--sd", sd, "--data", "scenes", "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    # exactly the words of the scenes' captions that the first tokenizer splits (not the edit instructions' words)
    assert refused.value.code == 2 and (f"--data scenes: its captions use words that --sd {sd}'s tokenizer lacks "
                                        "(above, and, below, gradient, of, striped)") in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["instruct-pix2pix", "depth2img"])
def test_edit_commands_train_for_the_factor_4_pipeline(kind, scenes_pipeline, tmp_path):
    import warnings

    from minidiff.training import evaluate_edit, train_edit

    sd, _, _ = scenes_pipeline
    run = tmp_path / kind
    train_edit.main(["--sd", str(sd), "--out", str(run), "--steps", "2", "--num-images", "6", "--batch-size", "2",
                     "--device", "cpu"], kind=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = evaluate_edit.load(str(run), None if kind == "instruct-pix2pix" else minidiff.StableDiffusionDepth2ImgPipeline)
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 4
    before, _, instruction, _ = train_edit.edit_examples(1, 5)[0]
    image = evaluate_edit.images_as_tensor([before])                      # (1, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    if kind == "instruct-pix2pix":
        out = pipe([instruction], image=image, num_inference_steps=2, generator=g, output_type="pt").images
    else:                                                                 # the depth channel at the latents' 16x16
        depth = torch.from_numpy(scenes.render(before)["depth"])[None]     # (1, 64, 64)
        out = pipe(["a red circle"], image=image, depth_map=depth, strength=1.0, num_inference_steps=2, generator=g,
                   output_type="pt").images
    assert out.shape == (1, 3, 64, 64)


def test_edit_commands_refuse_a_unet_made_from_another_tiny_sd(scenes_pipeline, factor8_pipeline, tmp_path, capsys):
    from minidiff.training import train_edit

    sd, _, _ = scenes_pipeline
    init = factor8_pipeline[3]                                            # made from a first-shape tiny-sd: 8x8, 2 levels
    with pytest.raises(SystemExit) as refused:
        train_edit.main(["--sd", str(sd), "--init", str(init), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "its UNet was made from another tiny-sd" in err and "sample_size 8 (--sd's: 16)" in err
    assert not (tmp_path / "run").exists()


def test_panorama_messages_count_pixels_at_the_pipelines_factor(scenes_pipeline):
    from minidiff.control.panorama import StableDiffusionPanoramaPipeline

    _, _, base = scenes_pipeline
    pipe = StableDiffusionPanoramaPipeline(**base.components)
    with pytest.raises(ValueError, match=r"at least one window \(16 latents = 64 pixels"):   # not 128: f = 4
        pipe("a red circle", num_inference_steps=1, width=32)


def test_edit_commands_refuse_data_they_do_not_train_on(tmp_path, capsys):
    from minidiff.training import train_edit

    with pytest.raises(SystemExit) as refused:
        train_edit.main(["--data", "shapes", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert refused.value.code == 2 and "--data shapes: instruct-pix2pix trains on scenes.py" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
