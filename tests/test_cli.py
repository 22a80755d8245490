"""The command line `python -m minidiff` / `minidiff`: image, latents grid and GIF, on fake hub folders; every run
in a folder of its own, nothing on disk written over, and every bad input refused in one line before any model
is loaded."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from conftest import REFERENCE, REPO
from helpers import tiny_sd_sizes
from minidiff.checkpoints import TINY_SD
from fake_checkpoints import make_fake_ddpm_cat, make_fake_sd
import minidiff.__main__ as cli
from minidiff.__main__ import SCHEDULERS, main, parse_args

F, _ = tiny_sd_sizes()          # the bundled tiny-sd's pixels per latent: 8 (first edition) or 4 (second)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE} (set MINIDIFF_REFERENCE)")
    root = tmp_path_factory.mktemp("hub")
    return {"ddpm": make_fake_ddpm_cat(root / "ddpm-cat-256", REFERENCE),
            "sd": make_fake_sd(root / "stable-diffusion-v1-4", REFERENCE)}


def run(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([*args, "--no-progress", "--device", "cpu"])


def gif_frames(path) -> int:
    with PIL.Image.open(path) as gif:
        return gif.n_frames


def test_sd_run_writes_image_grid_and_gif(folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--model", str(folders["sd"]), "--prompt", "a red circle", "--steps", "3", "--seed", "5",
               "--scheduler", "ddim", "--out", str(out)) == 0
    assert sorted(os.listdir(out)) == ["image.png", "latents.gif", "latents.png"]
    assert str(out / "image.png") in capsys.readouterr().out
    assert gif_frames(out / "latents.gif") == 3
    assert PIL.Image.open(out / "latents.png").size[0] > 64

    # The CLI's image is the pipeline's image for the same seed and scheduler.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = minidiff.DiffusionPipeline.from_pretrained(folders["sd"])
    pipe.scheduler = minidiff.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out / "image.png")), np.asarray(expected))


def test_several_images_img2img_and_ddpm(folders, tmp_path):
    out = tmp_path / "several"
    assert run("--model", str(folders["sd"]), "--steps", "2", "--num-images", "2", "--height", "32",
               "--width", "48", "--out", str(out)) == 0
    assert sorted(os.listdir(out)) == ["image_0.png", "image_1.png", "latents.gif", "latents.png"]
    assert PIL.Image.open(out / "image_1.png").size == (48, 32)

    start = tmp_path / "start.png"
    PIL.Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(start)
    out = tmp_path / "img2img"
    assert run("--model", str(folders["sd"]), "--steps", "4", "--image", str(start), "--strength", "0.5",
               "--scheduler", "euler", "--out", str(out)) == 0
    assert gif_frames(out / "latents.gif") == 2  # half of the 4 steps

    out = tmp_path / "ddpm"
    assert run("--model", str(folders["ddpm"]), "--steps", "3", "--out", str(out)) == 0
    assert PIL.Image.open(out / "image.png").size == (32, 32)
    assert gif_frames(out / "latents.gif") == 3


def test_errors_are_one_line(folders, tmp_path, capsys):
    assert run("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("minidiff: error:") and "neither an existing folder" in err
    assert run("--model", str(folders["ddpm"]), "--image", "x.png", "--out", str(tmp_path / "o")) == 2
    assert "--image given, but" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--scheduler", "lms"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("minidiff: error: argument --scheduler: invalid choice") and err.count("\n") == 1


def test_defaults():
    args = parse_args([])
    assert args.model == "tiny-sd" and args.steps == 25 and args.seed == 0 and args.scheduler is None
    # Options only Stable Diffusion takes default to None, so that a typed one can be told from a default.
    assert args.prompt is args.guidance is args.strength is args.out is None
    assert sorted(SCHEDULERS) == ["ddim", "ddpm", "dpm-solver", "euler", "euler-ancestral", "pndm", "unipc"]


def test_python_dash_m(folders, tmp_path):
    """The real entry point, in a fresh interpreter."""
    out = tmp_path / "m"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "minidiff", "--model", str(folders["ddpm"]), "--steps", "2",
                             "--device", "cpu", "--no-progress", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "image.png").is_file() and (out / "latents.gif").is_file()


# --- nothing on disk is written over -------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: bad input must be refused before it (AssertionError is not caught by main)."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr(cli.DiffusionPipeline, "from_pretrained", load)


def file_bytes(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_each_run_without_out_gets_a_new_numbered_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.png").write_bytes(b"the user's own image")
    assert run("--model", "tiny-ddpm", "--steps", "2") == 0
    first = file_bytes(tmp_path / "minidiff-out" / "run-001")
    assert sorted(first) == ["image.png", "latents.gif", "latents.png"]
    assert "minidiff: wrote 3 files to minidiff-out/run-001" in capsys.readouterr().err
    assert run("--model", "tiny-ddpm", "--steps", "2", "--seed", "1") == 0
    assert sorted(os.listdir(tmp_path / "minidiff-out")) == ["run-001", "run-002"]
    assert file_bytes(tmp_path / "minidiff-out" / "run-001") == first               # the first run is untouched
    assert (tmp_path / "image.png").read_bytes() == b"the user's own image"
    # Numbers are never reused: after run-001 is deleted, the next run is still run-003.
    for name in os.listdir(tmp_path / "minidiff-out" / "run-001"):
        os.remove(tmp_path / "minidiff-out" / "run-001" / name)
    os.rmdir(tmp_path / "minidiff-out" / "run-001")
    assert run("--model", "tiny-ddpm", "--steps", "2") == 0
    assert sorted(os.listdir(tmp_path / "minidiff-out")) == ["run-002", "run-003"]


def test_out_must_be_new_or_empty(tmp_path, capsys, no_loading):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "image.png").write_bytes(b"the user's own image")
    assert run("--model", "tiny-ddpm", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minidiff: error: --out {out} already holds 1 file(s) (image.png)") and "--overwrite" in err
    assert file_bytes(out) == {"image.png": b"the user's own image"}


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--model", "tiny-ddpm", "--steps", "2", "--num-images", "3", "--out", str(out)) == 0
    (out / "notes.txt").write_text("mine")
    earlier = file_bytes(out)
    capsys.readouterr()
    assert run("--model", "tiny-ddpm", "--steps", "3", "--out", str(out), "--overwrite") == 0
    # No stale image_0..2.png beside the new single image; the user's notes stay.
    assert sorted(os.listdir(out)) == ["image.png", "latents.gif", "latents.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "latents.gif").read_bytes() != earlier["latents.gif"]
    assert gif_frames(out / "latents.gif") == 3
    assert "removed the earlier run's image_0.png, image_1.png, image_2.png, latents.gif, latents.png" in \
        capsys.readouterr().err


def test_a_failed_run_leaves_no_folder_and_the_earlier_run_whole(tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise OSError("the hub is unreachable")
    monkeypatch.setattr(cli.DiffusionPipeline, "from_pretrained", unreachable)
    monkeypatch.chdir(tmp_path)
    assert run("--model", "tiny-ddpm") == 2
    assert "the hub is unreachable" in capsys.readouterr().err
    assert os.listdir(tmp_path / "minidiff-out") == []                          # run-001 was made, then removed
    assert run("--model", "tiny-ddpm", "--out", str(tmp_path / "new")) == 2
    assert not (tmp_path / "new").exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "image_0.png").write_bytes(b"earlier")
    assert run("--model", "tiny-ddpm", "--out", str(earlier), "--overwrite") == 2
    assert file_bytes(earlier) == {"image_0.png": b"earlier"}                  # removed only once new images exist


# --- bad input: one line, exit status 2, before any model is loaded -------------------------------------
# (arguments with {tmp} for the test's folder, a piece of the expected message). The model is read from its
# model_index.json alone: the no_loading fixture fails the test if any weights are loaded.
BAD_INPUTS = [
    (["--num-images", "0"], "--num-images must be 1 or more; found 0"),
    (["--steps", "0"], "--steps must be 1 or more"),
    (["--steps", "1001"], "tiny-sd's scheduler was trained on 1000 timesteps"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
    (["--guidance", "nan"], "--guidance must be a finite number (1 = no guidance, 7.5 is usual); found nan"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--height", "30"], f"--height must be a positive multiple of {F} (tiny-sd's VAE turns {F}x{F} pixels into one "
                         "latent); found 30. Try 32"),
    (["--model", "{tmp}/factor-4", "--height", "30"], "--height must be a positive multiple of 4 ({tmp}/factor-4's "
                                                       "VAE turns 4x4 pixels into one latent); found 30. Try 32"),
    (["--model", "{tmp}/factor-4", "--image", "{tmp}/tinier.png"], "is 2x3 pixels; image-to-image needs at least 4x4"),
    (["--width", "0"], f"--width must be a positive multiple of {F}"),
    (["--model", "tiny-ddpm", "--prompt", "a cat"], "--prompt given, but tiny-ddpm is an unconditional DDPMPipeline"),
    (["--model", "tiny-ddpm", "--prompt", "a red circle"], "--prompt given, but tiny-ddpm"),   # even the old default
    (["--model", "tiny-ddpm", "--negative-prompt", "blue", "--guidance", "3"],
     "--negative-prompt, --guidance given, but tiny-ddpm"),
    (["--model", "tiny-ddpm", "--image", "{tmp}/start.png", "--strength", "0.5"], "--image, --strength given"),
    (["--model", "tiny-ddpm", "--height", "16"], "--height given, but tiny-ddpm"),
    (["--strength", "0.5"], "--strength 0.5 given without --image"),
    (["--image", "{tmp}/start.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--image", "{tmp}/start.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--image", "{tmp}/start.png", "--strength", "0.1", "--steps", "5"], "runs int(0.1 * 5) = 0 steps"),
    (["--image", "{tmp}/start.png", "--height", "64"], "--height/--width given with --image"),
    (["--image", "{tmp}/missing.png"], "expected an image file, found nothing there"),
    (["--image", "{tmp}"], "expected an image file, found a folder there"),
    (["--image", "{tmp}/not-an-image.png"], "expected an image that PIL can open, found UnidentifiedImageError"),
    (["--image", "{tmp}/tiny.png"], f"is {F - 1}x{F - 1} pixels; image-to-image needs at least {F}x{F}"),
    (["--negative-prompt", "blurry", "--guidance", "1"], "--negative-prompt is used by classifier-free guidance only"),
    (["--device", "gpu"], "--device 'gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--model", "{tmp}/nowhere"], "is neither an existing folder"),
    (["--model", "{tmp}"], "Expected a model_index.json in {tmp}, found none: this is not a pipeline folder"),
    (["--out", "{tmp}/a-file"], "is a file; expected a folder"),
    (["--out", "{tmp}/a-file/sub"], "is a file, so no folder can be made under it"),
    (["--overwrite"], "--overwrite applies to --out DIR"),
    (["--out", "{tmp}/earlier", "--overwrite", "--image", "{tmp}/earlier/image.png"],
     "is image.png in --out {tmp}/earlier, which --overwrite would remove"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_any_loading(tmp_path, monkeypatch, capsys, no_loading, argv, message):
    monkeypatch.chdir(tmp_path)  # the default out folder would be made here
    PIL.Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(tmp_path / "start.png")
    PIL.Image.fromarray(np.zeros((F - 1, F - 1, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    PIL.Image.fromarray(np.zeros((3, 2, 3), dtype=np.uint8)).save(tmp_path / "tinier.png")
    # a pipeline folder whose VAE has 3 blocks (factor 4, the second tiny-sd's): model_index and configs only
    shutil.copytree(TINY_SD, tmp_path / "factor-4", ignore=shutil.ignore_patterns("*.safetensors", "*.png", "*.md"))
    vae_config = json.loads((tmp_path / "factor-4" / "vae" / "config.json").read_text())
    vae_config["block_out_channels"] = vae_config["block_out_channels"][:3]
    (tmp_path / "factor-4" / "vae" / "config.json").write_text(json.dumps(vae_config))
    (tmp_path / "not-an-image.png").write_text("not a PNG")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "earlier").mkdir()
    PIL.Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "earlier" / "image.png")
    before = sorted(os.listdir(tmp_path))
    if "--out" not in argv and argv != ["--overwrite"]:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(["--no-progress", "--device", "cpu", *[a.format(tmp=tmp_path) for a in argv]]) == 2  # argv last
    err = capsys.readouterr().err
    assert err.startswith("minidiff: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err, err
    assert sorted(os.listdir(tmp_path)) == before                              # no out folder made or left
    assert sorted(os.listdir(tmp_path / "earlier")) == ["image.png"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "abc"], "minidiff: error: argument --steps: invalid int value: 'abc'. See minidiff --help."),
    (["--dtype", "float64"], "minidiff: error: argument --dtype: invalid choice: 'float64'"),
    (["--colour", "red"], "minidiff: error: unrecognized arguments: --colour red"),
])
def test_parser_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_stable_diffusion_defaults_are_filled_in_only_for_it(tmp_path):
    args = parse_args(["--model", "tiny-sd", "--out", str(tmp_path / "sd")])
    run_sd = cli.check(args)
    assert (args.prompt, args.guidance, args.strength) == ("a red circle", 7.5, None) and not run_sd.unconditional
    args = parse_args(["--model", "tiny-sd", "--image", str(tmp_path / "sd" / "x.png"), "--out", str(tmp_path / "i")])
    PIL.Image.new("RGB", (16, 24)).save(tmp_path / "sd" / "x.png")
    run_i2i = cli.check(args)
    assert args.strength == 0.8 and run_i2i.start_image.size == (16, 24) and run_i2i.start_image.mode == "RGB"
    args = parse_args(["--model", "tiny-ddpm", "--out", str(tmp_path / "ddpm")])
    assert cli.check(args).unconditional and args.prompt is None and args.guidance is None


def test_python_dash_m_bad_input_has_no_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "minidiff", "--model", "tiny-ddpm", "--prompt", "a cat",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"minidiff: error: --prompt given, but tiny-ddpm is an unconditional DDPMPipeline[^\n]*\n",
                        result.stderr), result.stderr
    assert not (tmp_path / "o").exists()


def test_offline_hub_id_is_diagnosed_as_offline(tmp_path, monkeypatch, capsys, no_loading):
    """Offline, a hub id that is not in the cache is said to be that (not 'not a pipeline folder')."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["--no-progress", "--model", "someone/some-model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--model someone/some-model: There is no local folder" in err and "runs offline" in err, err
    assert "HF_HUB_OFFLINE=1" in err and err.count("\n") == 1
