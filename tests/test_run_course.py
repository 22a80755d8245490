"""notebooks/run_course.py: the fake hub folders (the real configs' structure, random weights, loadable) and
run_notebook (an executed copy written elsewhere, the notebook untouched)."""

import importlib.util
import json
from pathlib import Path

import torch

import minidiff

REPO = Path(__file__).resolve().parents[1]


def load_run_course():
    spec = importlib.util.spec_from_file_location("run_course", REPO / "notebooks" / "run_course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_fake_hub_keeps_the_real_structure_and_generates(tmp_path, reference_dir):
    fakes = load_run_course().make_fake_hub(tmp_path, reference_dir, small=True)
    real_unet = json.loads((reference_dir / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    unet = minidiff.UNet2DConditionModel.from_pretrained(str(fakes["sd"]), subfolder="unet")
    assert unet.config.down_block_types == tuple(real_unet["down_block_types"])    # the same blocks, narrower
    assert unet.config.block_out_channels == (32, 32, 64, 64)
    sd = minidiff.StableDiffusionPipeline.from_pretrained(str(fakes["sd"]))
    sd.set_progress_bar_config(disable=True)
    image = sd("a photo of a cat", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 256, 256, 3) and image.std() > 0
    ddpm = minidiff.DiffusionPipeline.from_pretrained(str(fakes["ddpm"]))
    ddpm.set_progress_bar_config(disable=True)
    assert ddpm(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_run_notebook_writes_the_executed_copy_and_leaves_the_notebook(tmp_path):
    import nbformat

    path, out = tmp_path / "01_x.ipynb", tmp_path / "runs" / "01_x.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)", id="a")]), path)
    text = path.read_text()
    result = load_run_course().run_notebook(path, out_path=out)
    assert result["error"] is None and result["seconds"] > 0 and result["peak_allocated_gib"] == 0
    assert path.read_text() == text                                       # the committed notebook is not modified
    executed = nbformat.read(out, as_version=4)
    assert [c.id for c in executed.cells] == ["a"]                        # the memory-reading cell is gone again
    assert executed.cells[0].outputs[0].text == "42\n" and "execution" not in executed.cells[0].metadata
