"""The training code of the bundled tiny checkpoints: data set, tokenizer, classifier, training loops.

Everything runs on the CPU with tiny model configs, a few steps each.
"""

import argparse
import builtins
import json
import os

import numpy as np
import pytest
import torch

from minidiff.training import evaluate, shapes, train_ddpm, train_sd, train_vae
from minidiff.training.common import STATE_NAME, CommandError, add_common_args
from minidiff.training.shapes import HELD_OUT, POSITIONS, SIZES, ShapesDataset
from minidiff.training.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, build_vocab, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the data set ------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_seeded():
    a, cap_a = ShapesDataset(12, seed=3).tensors()
    b, cap_b = ShapesDataset(12, seed=3).tensors()
    c, cap_c = ShapesDataset(12, seed=4).tensors()
    assert a.dtype == torch.uint8 and a.shape == (12, 3, 64, 64)
    assert torch.equal(a, b) and cap_a == cap_b
    assert not torch.equal(a, c) and cap_a != cap_c
    # example i does not depend on which other examples were drawn (parallel drawing relies on it)
    img5, cap5 = ShapesDataset(12, seed=3)[5]
    assert torch.equal(img5, a[5]) and cap5 == cap_a[5]
    x, _ = shapes.render_all(12, seed=3, workers=2)
    assert torch.equal(x, a)


def test_captions_describe_the_drawn_image():
    ds = ShapesDataset(300, seed=7)
    seen_sizes, seen_positions, seen_backgrounds = set(), set(), set()
    for i in range(300):
        ex = ds.example(i)
        image, caption = ds[i]
        words = caption.split()
        assert caption == ex.caption and words[0] == "a"
        assert ex.color in words and ex.shape in words
        assert (ex.color, ex.shape) not in HELD_OUT
        # size: the box side is in the named range
        side = ex.box[2] - ex.box[0]
        if ex.size:
            assert ex.size in words and SIZES[ex.size][0] <= side <= SIZES[ex.size][1]
            seen_sizes.add(ex.size)
        # position: the centre of the shape's bounding box lies on the named side of the canvas
        pixels = image.permute(1, 2, 0).numpy().astype(float)
        chroma = pixels.max(-1) - pixels.min(-1)
        ys, xs = np.nonzero(chroma > 100)
        assert len(ys) > 20, caption
        if ex.position:
            assert caption.index(ex.position) > caption.index(ex.shape)
            col, row = POSITIONS[ex.position]
            for centre, third in (((xs.min() + xs.max()) / 2, col), ((ys.min() + ys.max()) / 2, row)):
                assert {0: centre < 32, 1: 14 < centre < 50, 2: centre > 32}[third], (caption, centre)
            seen_positions.add(ex.position)
        # background: the corners have the named colour (white when the caption says nothing)
        said = caption.endswith("background")
        assert said == (f"on a {ex.background} background" in caption)
        expected = shapes.BACKGROUNDS[ex.background] if said else shapes.BACKGROUNDS["white"]
        assert tuple(image[:, 0, 0].tolist()) == expected, caption
        seen_backgrounds.add(ex.background if said else None)
    assert seen_sizes == set(SIZES) and len(seen_positions) == len(POSITIONS)
    assert seen_backgrounds == {None, "white", "gray", "black"}


def test_held_out_pairs_never_appear_in_training_data():
    ds = ShapesDataset(3000, seed=0)
    pairs = {(ds.example(i).color, ds.example(i).shape) for i in range(3000)}
    assert not pairs & set(HELD_OUT)
    assert len(pairs) == len(shapes.COLORS) * len(shapes.SHAPES) - len(HELD_OUT)
    ds_all = ShapesDataset(3000, seed=0, held_out=())
    assert set(HELD_OUT) <= {(ds_all.example(i).color, ds_all.example(i).shape) for i in range(3000)}


def test_dataset_errors():
    with pytest.raises(ValueError, match="num_images"):
        ShapesDataset(0)
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(3).example(3)


# --- the tokenizer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(str(folder))
    return folder


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tokenizer_makes_one_token_per_caption_word(tokenizer_dir, class_name):
    import transformers

    tok = getattr(transformers, class_name).from_pretrained(str(tokenizer_dir))
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert len(tok) == len(vocab)
    assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS] == tok.pad_token_id
    assert tok.model_max_length == MODEL_MAX_LENGTH
    for word in shapes.caption_words():
        assert tok.tokenize(word) == [word + "</w>"], word
    caption = "a small blue square at the top left on a gray background"
    ids = tok(caption, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True).input_ids
    words = caption.split()
    assert len(ids) == MODEL_MAX_LENGTH
    assert ids[0] == tok.bos_token_id and ids[len(words) + 1] == tok.eos_token_id
    assert ids[1:len(words) + 1] == [vocab[w + "</w>"] for w in words]
    assert set(ids[len(words) + 1:]) == {tok.pad_token_id}
    # any other text still tokenizes (into single bytes), and case is folded as CLIP does
    assert tok.tokenize("Redd") == ["r", "e", "d", "d</w>"]


def test_tokenizer_files_are_in_clip_format():
    vocab, merges = build_vocab(["red", "round"])
    assert len(vocab) == 512 + len(merges) + 2 and list(vocab)[-2:] == [BOS, EOS]
    assert merges == [("e", "d</w>"), ("r", "ed</w>"), ("n", "d</w>"), ("u", "nd</w>"), ("o", "und</w>"),
                      ("r", "ound</w>")]
    with pytest.raises(ValueError, match="lowercase ASCII"):
        build_vocab(["Red"])


# --- the classifier ------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [64, 32])
def test_classifier_is_accurate_on_dataset_images(resolution):
    result = evaluate.validate_classifier(num_images=150, seed=99, resolution=resolution)
    assert result["color_accuracy"] >= 0.99, result
    assert result["shape_accuracy"] >= 0.98, result
    assert result["clean_share"] >= 0.95, result


def test_classifier_rejects_what_is_not_one_clean_shape():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert evaluate.analyse(blank).shape is None and not evaluate.analyse(blank).clean
    image, _ = ShapesDataset(1, seed=1)[0]
    good = image.permute(1, 2, 0).numpy()
    assert evaluate.analyse(good).clean
    tinted = good.copy()  # the same shape on a coloured background
    tinted[(good == 255).all(-1)] = (120, 200, 120)
    assert not evaluate.analyse(tinted).clean
    two = np.concatenate([good[:, :32], good[:, :32]], axis=1)  # two blobs side by side (or half shapes)
    assert not evaluate.analyse(two).clean or evaluate.analyse(good[:, :32]).clean
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not evaluate.analyse(noise).clean


# --- the training loops --------------------------------------------------------------------------------
def parse(module, *argv):
    parser = argparse.ArgumentParser()
    add_common_args(parser, steps=1, batch_size=1, lr=1e-3)
    if module is train_vae:
        parser.add_argument("--kl-weight", type=float, default=1e-5)
        parser.add_argument("--rec-loss", default="mse")
    if module is train_ddpm:
        parser.add_argument("--prediction-type", default="epsilon")
    if module is train_sd:
        parser.add_argument("--vae")
        parser.add_argument("--caption-dropout", type=float, default=0.1)
        parser.add_argument("--freeze-text-encoder", action="store_true")
    return parser.parse_args(["--device", "cpu", "--num-images", "64", "--warmup", "1", *argv])  # argv overrides


TINY_VAE = {**train_vae.VAE_CONFIG, "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}
TINY_DDPM = {**train_ddpm.UNET_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 4,
             "attention_head_dim": 4}
TINY_UNET = {**train_sd.UNET_CONFIG, "block_out_channels": [16, 16], "norm_num_groups": 4,
             "attention_head_dim": 2, "cross_attention_dim": 16}
TINY_TEXT = {**train_sd.TEXT_ENCODER_CONFIG, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2}


def losses(folder, column="loss"):
    lines = (folder / "loss_log.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [float(line.split(",")[header.index(column)]) for line in lines[1:]]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    vae = train_vae.train(parse(train_vae, "--out", str(out), "--steps", "30", "--batch-size", "8",
                                "--lr", "3e-3", "--ema-decay", "0.5"), TINY_VAE)
    return out, vae


def test_vae_loop_learns_and_measures_its_scaling_factor(trained_vae):
    out, vae = trained_vae
    rec = losses(out, "rec")
    assert rec[-1] < 0.7 * rec[0], rec
    config = json.loads((out / "vae" / "config.json").read_text())
    images, _ = ShapesDataset(64, seed=0).tensors()  # the training images
    with torch.no_grad():
        z = vae.encode(shapes.to_model_range(images)).latent_dist.sample(torch.Generator().manual_seed(1))
    # 1 / std of latents z ~ q(z | x): another draw of the noise gives nearly the same number
    assert config["scaling_factor"] == pytest.approx(1 / z.std().item(), rel=0.05)
    assert config["scaling_factor"] != train_vae.VAE_CONFIG["scaling_factor"]
    assert set(torch.load(out / STATE_NAME, weights_only=True)) >= {"vae", "ema", "optimizer", "generator"}


@pytest.mark.parametrize("rec_loss", ["mse", "l1"])
def test_vae_rec_loss_picks_the_reconstruction_term(tmp_path, monkeypatch, rec_loss):
    """--rec-loss l1 trains on LDM's absolute error, mse on the squared error; the log's rec column is that term."""
    import torch.nn.functional as F

    seen = {}
    for name in ("l1_loss", "mse_loss"):
        real = getattr(F, name)
        monkeypatch.setattr(train_vae.F, name, lambda a, b, real=real, name=name: seen.setdefault(name, real(a, b)))
    train_vae.train(parse(train_vae, "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--rec-loss",
                          rec_loss), TINY_VAE)
    assert list(seen) == [{"l1": "l1_loss", "mse": "mse_loss"}[rec_loss]]
    with open(tmp_path / "loss_log.csv") as f:
        rec = float(f.readlines()[1].split(",")[2])
    assert rec == pytest.approx(next(iter(seen.values())).item(), abs=1e-6)


def test_ddpm_loop_learns_and_writes_a_pipeline_folder(tmp_path):
    train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path), "--steps", "30", "--batch-size", "16",
                           "--lr", "3e-3"), TINY_DDPM)
    loss = losses(tmp_path)
    assert loss[-1] < 0.7 * loss[0], loss
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    from minidiff.pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_evaluate_ddpm_measures_each_sampler_on_the_models_schedule(tmp_path, capsys, monkeypatch):
    """`evaluate ddpm --sampler all`: one line per sampler of notebook 03, each built from the model's own
    scheduler config (here v-prediction, which every sampler must then use)."""
    train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path), "--steps", "1", "--batch-size", "2",
                           "--prediction-type", "v_prediction"), TINY_DDPM)
    used = []
    real = evaluate.evaluate_ddpm
    monkeypatch.setattr(evaluate, "evaluate_ddpm", lambda pipe, *a: used.append(pipe.scheduler) or real(pipe, *a))
    evaluate.main(["ddpm", "--model", str(tmp_path), "--sampler", "all", "--images", "2", "--steps", "4",
                   "--grid", str(tmp_path / "grid.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "'clean'" in line]
    assert [line.split(":")[0] for line in lines] == list(evaluate.SAMPLERS)
    assert [type(s) for s in used] == list(evaluate.SAMPLERS.values())
    assert all(s.config.prediction_type == "v_prediction" for s in used)
    assert all((tmp_path / f"grid-{name}.png").is_file() for name in evaluate.SAMPLERS)


def test_evaluate_ddpm_counts_clean_shapes_and_single_objects():
    """Of a data set image (one clean shape), a blank canvas (nothing) and the same shape on a tinted background
    (one object, not clean), `evaluate_ddpm` counts 1/3 clean and 2/3 with one object."""
    from PIL import Image

    image, _ = ShapesDataset(1, seed=1, resolution=32)[0]
    shape = image.permute(1, 2, 0).numpy()                                      # (32, 32, 3) uint8, white background
    tinted = shape.copy()
    tinted[(shape == 255).all(-1)] = (120, 200, 120)
    images = [Image.fromarray(shape), Image.fromarray(np.full_like(shape, 255)), Image.fromarray(tinted)]

    class Pipe:
        def __call__(self, batch_size, num_inference_steps, generator):
            return type("Out", (), {"images": images[:batch_size]})()

    result, _ = evaluate.evaluate_ddpm(Pipe(), num_images=3, steps=1)
    assert result["clean"] == pytest.approx(1 / 3) and result["one_object"] == pytest.approx(2 / 3), result


def test_ddpm_v_prediction_trains_on_v_and_the_scheduler_knows(tmp_path):
    """--prediction-type v_prediction: the loss falls, the saved scheduler samples with v, and the first loss
    is the v-target's (at the start, |v|^2 averages below |eps|^2 = 1 for images with mean 0.6)."""
    common = ("--steps", "30", "--batch-size", "16", "--lr", "3e-3")
    train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "v"), "--prediction-type", "v_prediction", *common),
                     TINY_DDPM)
    train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "eps"), *common), TINY_DDPM)
    v_loss, eps_loss = losses(tmp_path / "v"), losses(tmp_path / "eps")
    assert v_loss[-1] < 0.7 * v_loss[0], v_loss
    assert v_loss[0] != eps_loss[0]                              # same seed and data: only the target differs
    from minidiff.pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "v"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(SystemExit):                              # the command line offers the two it trains
        train_ddpm.main(["--out", str(tmp_path / "x0"), "--prediction-type", "x0"])


def test_sd_loop_learns_and_writes_a_pipeline_folder(tmp_path, trained_vae):
    vae_dir, _ = trained_vae
    train_sd.train(parse(train_sd, "--out", str(tmp_path), "--vae", str(vae_dir / "vae"), "--steps", "30",
                         "--batch-size", "16", "--lr", "3e-3"), TINY_UNET, TINY_TEXT)
    loss = losses(tmp_path)
    assert loss[-1] < 0.7 * loss[0], loss
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / sub).is_dir(), sub
    # The state holds only what weights_only=True reads (--resume reads it so): tensors and plain values.
    state = torch.load(tmp_path / STATE_NAME, weights_only=True)
    assert set(state) == {"step", "seconds", "optimizer", "generator", "cpu_rng", "unet", "text_encoder", "ema_unet",
                          "ema_text"}
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    from minidiff.pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_text_encoder_keeps_its_random_weights(tmp_path, trained_vae, frozen):
    vae_dir, _ = trained_vae
    models = {}
    for steps in ("0", "3"):
        argv = ["--out", str(tmp_path / steps), "--vae", str(vae_dir / "vae"), "--steps", steps, "--batch-size", "4",
                "--ema-decay", "0"] + (["--freeze-text-encoder"] if frozen else [])
        models[steps] = train_sd.train(parse(train_sd, *argv), TINY_UNET, TINY_TEXT)
    (unet_0, text_0), (unet_3, text_3) = models["0"], models["3"]
    assert not torch.equal(unet_0.conv_in.weight, unet_3.conv_in.weight)
    same = [torch.equal(a, b) for a, b in zip(text_0.state_dict().values(), text_3.state_dict().values())]
    assert all(same) if frozen else not all(same)


def test_resume_continues_exactly(tmp_path):
    common = ["--batch-size", "4", "--lr", "3e-3", "--save-every", "2"]
    straight = train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "a"), "--steps", "4", *common), TINY_DDPM)
    train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "b"), "--steps", "2", *common), TINY_DDPM)
    resumed = train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "b"), "--steps", "4", "--resume", *common),
                               TINY_DDPM)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")  # b also logged its last step before the break
    assert a[0] == b[0] and a[-1] == b[-1] and len(b) == len(a) + 1
    with pytest.raises(CommandError, match="expected a training state at .*, found no folder"):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "c"), "--resume", *common), TINY_DDPM)


def test_step_keeper_logs_saves_and_stops_on_time(tmp_path, monkeypatch):
    """The end of every training loop's step: a log line every `log_every` steps and at the last, the state
    every --save-every steps (then `on_save`), and a stop once --max-minutes of the whole run have passed."""
    from minidiff.training import common

    clock = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    generator = torch.Generator().manual_seed(0)
    args = argparse.Namespace(out=str(tmp_path), resume=False, steps=10, save_every=4, max_minutes=1.0)
    saves = []
    keeper = common.StepKeeper(args, "test", {"net": net}, optimizer, generator, 0, 0.0, log_every=3,
                               on_save=lambda: saves.append(keeper.done))
    stopped = [step for step in keeper.bar if keeper.end_of_step(step, loss=float(step))]
    assert stopped == [] and keeper.done == 10
    assert saves == [4, 8, 10]                                                  # every 4th step and the last
    assert [row[0] for row in losses_table(tmp_path)] == [0, 3, 6, 9]           # every 3rd step (9 is the last)

    # resumed with 50 s already trained: the 1-minute limit falls 10 s into this run
    args = argparse.Namespace(out=str(tmp_path), resume=True, steps=100, save_every=1000, max_minutes=1.0)
    step, seconds = common.load_state(str(tmp_path), {"net": net}, optimizer, generator)
    assert step == 10
    keeper = common.StepKeeper(args, "test", {"net": net}, optimizer, generator, step, 50.0, log_every=1000)
    for step in keeper.bar:
        clock[0] += 4.0                                                         # each step takes 4 s
        if keeper.end_of_step(step, loss=0.5):
            break
    assert keeper.done == 13 and keeper.seconds() == 62.0                       # 50 + 3 x 4 > 60 s
    assert common.load_state(str(tmp_path), {"net": net}, optimizer, generator)[0] == 13   # saved at the stop
    assert losses_table(tmp_path)[-1] == [12, 0.5, 62.0]                        # and logged


def losses_table(folder):
    with open(os.path.join(folder, "loss_log.csv")) as f:
        return [[float(x) if "." in x else int(x) for x in line.strip().split(",")] for line in f.readlines()[1:]]


def test_init_starts_from_saved_weights(tmp_path):
    first = train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "a"), "--steps", "2", "--batch-size", "4"),
                             TINY_DDPM)
    again = train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"),
                                   "--steps", "1", "--batch-size", "4", "--lr", "0"), TINY_DDPM)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_command_line_names_its_commands(capsys):
    from minidiff.training.__main__ import main

    with pytest.raises(SystemExit, match="expected a COMMAND, found 'train'"):
        main(["train"])


# --- nothing a user made is lost, no pickle executed ----------------------------------------------------
def tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def test_rerunning_without_resume_keeps_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    train_ddpm.train(parse(train_ddpm, "--out", str(out), "--steps", "2", "--batch-size", "2"), TINY_DDPM)
    earlier = tree(out)
    assert {STATE_NAME, "loss_log.csv", "model_index.json", "unet/config.json"} <= set(earlier)
    with pytest.raises(CommandError, match=r"already holds files \(loss_log.csv, model_index.json, scheduler, "
                                           r"training_state.pt, unet\).*--resume.*--overwrite"):
        train_ddpm.train(parse(train_ddpm, "--out", str(out), "--steps", "2", "--batch-size", "2"), TINY_DDPM)
    # The command: one line, exit status 2, before the 100,000 default images are drawn.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(["--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"python -m minidiff.training ddpm: error: --out {out} already holds files")
    assert tree(out) == earlier
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")           # any file, not only a run's
    with pytest.raises(CommandError, match=r"already holds files \(notes.txt\)"):
        train_vae.train(parse(train_vae, "--out", str(tmp_path / "mine")), TINY_VAE)


def test_overwrite_replaces_only_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    train_ddpm.train(parse(train_ddpm, "--out", str(out), "--steps", "3", "--batch-size", "2"), TINY_DDPM)
    (out / "notes.txt").write_text("a user's file")
    (out / "vae").mkdir()                                                  # a stale part of another command's run
    (out / "vae" / "config.json").write_text("{}")
    capsys.readouterr()
    train_ddpm.train(parse(train_ddpm, "--out", str(out), "--steps", "1", "--batch-size", "2", "--overwrite"),
                     TINY_DDPM)
    said = capsys.readouterr().out
    assert f"--overwrite: removed the earlier run's loss_log.csv, model_index.json, scheduler, {STATE_NAME}, unet, " \
           f"vae from {out} (kept notes.txt)" in said
    assert sorted(os.listdir(out)) == ["loss_log.csv", "model_index.json", "notes.txt", "scheduler", STATE_NAME,
                                       "unet"]
    assert (out / "notes.txt").read_text() == "a user's file"
    assert len(losses(out)) == 1                                           # a fresh log: only the new run's step
    assert torch.load(out / STATE_NAME, weights_only=True)["step"] == 1


def test_resume_and_overwrite_need_the_right_folder(tmp_path, trained_vae):
    common = ("--steps", "1", "--batch-size", "2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="found an empty folder"):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "empty"), "--resume", *common), TINY_DDPM)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CommandError, match="is a file; expected a run folder"):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "a-file"), *common), TINY_DDPM)
    with pytest.raises(CommandError, match="--overwrite cannot go with it"):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "x"), "--resume", "--overwrite", *common),
                         TINY_DDPM)
    with pytest.raises(CommandError, match="--init cannot go with it"):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "x"), "--resume", "--init", str(tmp_path), *common),
                         TINY_DDPM)
    # --overwrite never removes what the run reads: here the VAE in --out's vae/.
    vae_dir, _ = trained_vae
    with pytest.raises(CommandError, match=r"--vae .* overlaps .*vae, which --overwrite would remove"):
        train_sd.train(parse(train_sd, "--out", str(vae_dir), "--vae", str(vae_dir / "vae"), "--overwrite", *common),
                       TINY_UNET, TINY_TEXT)
    assert (vae_dir / "vae" / "config.json").is_file() and (vae_dir / STATE_NAME).is_file()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1; found 0"),
    (["--save-every", "0"], "--save-every must be >= 1; found 0"),
    (["--ema-decay", "1.5"], r"--ema-decay must be in \[0, 1\]; found 1.5"),
    (["--lr", "nan"], "--lr must be a finite number >= 0; found nan"),
    (["--steps", "-1"], "--steps must be >= 0; found -1"),
    (["--init", "nowhere"], "--init nowhere: expected a folder, found nothing there"),
    (["--device", "gpu"], "--device 'gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, argv, message):
    with pytest.raises(CommandError, match=message):
        train_ddpm.train(parse(train_ddpm, "--out", str(tmp_path / "out"), *argv), TINY_DDPM)
    assert not (tmp_path / "out").exists()


class RunsCode:
    """Pickled, this calls open(marker, "w") when a full unpickler reads it: code run by loading a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_resume_never_runs_code_from_a_crafted_state(tmp_path):
    # The crafted file is real: a full unpickler (weights_only=False) runs its code.
    control = tmp_path / "control.pt"
    torch.save({"step": 1, "payload": RunsCode(tmp_path / "control-marker")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-marker").exists()

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "seconds": 0.0, "payload": RunsCode(tmp_path / "marker")}, out / STATE_NAME)
    with pytest.raises(CommandError, match=rf"{out / STATE_NAME} is not a training state written by minidiff: it "
                                           r"names io.open, beyond tensors and plain values, which could run code"):
        train_ddpm.train(parse(train_ddpm, "--out", str(out), "--resume", "--steps", "2", "--batch-size", "2"),
                         TINY_DDPM)
    assert not (tmp_path / "marker").exists()

    (out / STATE_NAME).write_bytes(b"not a state")                              # a broken file: named too
    with pytest.raises(CommandError, match=rf"{out / STATE_NAME} is not a readable training state"):
        train_ddpm.train(parse(train_ddpm, "--out", str(out), "--resume", "--steps", "2", "--batch-size", "2"),
                         TINY_DDPM)
    torch.save({"step": 1, "seconds": 0.0}, out / STATE_NAME)                    # safe, but not a whole state
    with pytest.raises(CommandError, match=r"lacks \['optimizer', 'generator', 'cpu_rng', 'unet', 'ema'\]"):
        train_ddpm.train(parse(train_ddpm, "--out", str(out), "--resume", "--steps", "2", "--batch-size", "2"),
                         TINY_DDPM)
