"""The command line `python -m minidiff` / `minidiff`: image, latents grid and GIF, on fake hub folders."""

import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import minidiff
from conftest import REFERENCE, REPO
from fake_checkpoints import make_fake_ddpm_cat, make_fake_sd
from minidiff.__main__ import SCHEDULERS, main, parse_args


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
    assert "--image needs a Stable Diffusion model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--scheduler", "lms"])


def test_defaults():
    args = parse_args([])
    assert args.model == "tiny-sd" and args.steps == 25 and args.seed == 0 and args.scheduler is None
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
