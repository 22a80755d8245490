"""Run the whole course from the command line, with the models and device chosen by MINIDIFF_* variables,
timing each notebook and reading its peak GPU memory. The committed notebooks are not modified.

    MINIDIFF_MODELS=tiny python notebooks/run_course.py                    # the CI setting, on this machine
    MINIDIFF_MODELS=tiny MINIDIFF_DEVICE=cuda python notebooks/run_course.py --out runs/course-tiny-cuda
    python notebooks/run_course.py --fake-hub /tmp/fakes --reference ../shared/reference --out runs/course-fake

`--fake-hub DIR` first writes full-size look-alikes of CompVis/stable-diffusion-v1-4 and google/ddpm-cat-256
into DIR (the real configs and tokenizer from `--reference`, random weights in float16; about 2.2 GB),
then runs the course on them with MINIDIFF_MODELS=hub: a rehearsal of a GPU run with the real
checkpoints (same shapes, dtype and memory), for machines that cannot reach the hub. The pictures are noise.
With `--small` the folders keep the real configs' block structure but narrow layers (float32, ~30 MB), so
the notebooks' hub settings (prompts, step counts, 512x2048 panoramas, ...) run on a CPU in minutes:

    python notebooks/run_course.py --fake-hub /tmp/fakes-small --small 01 02 03 04 05 06 07 08 09 11 12 13 14 15 16

For nbval's comparison of the marked outputs use `python -m pytest -q notebooks/` instead (tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# The last cell appended to each notebook before it runs: its peak GPU memory, read back by the runner.
PEAK_CELL = """
import json as _json, torch as _torch
print("MINIDIFF_PEAK_MEMORY", _json.dumps({"allocated": _torch.cuda.max_memory_allocated() if _torch.cuda.is_available() else 0,
                                           "reserved": _torch.cuda.max_memory_reserved() if _torch.cuda.is_available() else 0}))
"""


def run_cells(nb: nbformat.NotebookNode, timeout: int = 1200) -> dict:
    """Execute a notebook held in memory in a fresh `python3` kernel, in the notebooks folder, filling in its
    outputs and execution counts (its sources are not touched); stops at the first failing cell.
    Returns seconds, peak GPU memory (GiB) and the error, if any."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb.cells.append(nbformat.v4.new_code_cell(PEAK_CELL.strip()))
    error = None
    start = time.perf_counter()
    try:
        # no timing metadata and no widget state in the notebook: both change at every run (see execute.py)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=False,
                       resources={"metadata": {"path": str(HERE)}}).execute()
    except CellExecutionError as e:
        error = str(e).strip().splitlines()[-1][:300]
    seconds = time.perf_counter() - start
    peak = {"allocated": 0, "reserved": 0}
    for output in nb.cells.pop().get("outputs", []):
        text = output.get("text", "")
        if "MINIDIFF_PEAK_MEMORY" in text:
            peak = json.loads(text.split("MINIDIFF_PEAK_MEMORY", 1)[1])
    return {"seconds": round(seconds, 1), "peak_allocated_gib": round(peak["allocated"] / 2**30, 2),
            "peak_reserved_gib": round(peak["reserved"] / 2**30, 2), "error": error}


def run_notebook(path: Path, out_path: Path | None = None, timeout: int = 1200) -> dict:
    """Execute one notebook in a fresh kernel, writing the executed copy to `out_path` if given; returns what
    `run_cells` returns. (To execute a committed notebook in place, use execute.py: it also normalises it.)"""
    nb = nbformat.read(path, as_version=4)
    result = run_cells(nb, timeout)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_path)
    return result


# --small: the same configs with narrow layers, so that the hub settings of every notebook run on a CPU in minutes.
# SD: 256x256 images (32x32 latents: attention over 1,024 positions, not 4,096); ddpm-cat: 64x64 pixels.
SMALL = {
    "unet": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32, sample_size=32),
    "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=256),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "ddpm": dict(block_out_channels=[16, 16, 32, 32, 32, 32], norm_num_groups=8, layers_per_block=1, sample_size=64),
}


def make_fake_hub(folder: Path, reference: Path, small: bool = False) -> dict[str, Path]:
    """CompVis/stable-diffusion-v1-4 and google/ddpm-cat-256 folders with random weights: full size in float16,
    or with `small` the same block structure with narrow layers (SMALL) in float32, for a rehearsal on a CPU."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from minidiff import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"   # random init of 1 B parameters is quick on a GPU
    sd_ref, cat_ref = reference / "stable-diffusion-v1-4", reference / "ddpm-cat-256"
    sd, cat = folder / "stable-diffusion-v1-4", folder / "ddpm-cat-256"
    start = time.perf_counter()

    sd.mkdir(parents=True, exist_ok=True)
    shutil.copy(sd_ref / "model_index.json", sd / "model_index.json")
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(sd_ref / sub, sd / sub, dirs_exist_ok=True)
    dtype = torch.float32 if small else torch.float16

    def config(path: Path, part: str) -> dict:
        return {**json.loads(path.read_text()), **(SMALL[part] if small else {})}

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device(device):
            model = cls.from_config(config(sd_ref / sub / "config.json", sub))
        model.to(dtype).save_pretrained(str(sd / sub))
        del model
    text_config = CLIPTextConfig.from_dict(config(sd_ref / "text_encoder" / "config.json", "text_encoder"))
    with torch.device(device):
        text_encoder = CLIPTextModel(text_config)
    text_encoder.to(dtype).save_pretrained(sd / "text_encoder")
    del text_encoder

    cat.mkdir(parents=True, exist_ok=True)
    (cat / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    shutil.copy(cat_ref / "scheduler_config.json", cat / "scheduler_config.json")
    with torch.device(device):
        unet = UNet2DModel.from_config(config(cat_ref / "config.json", "ddpm"))
    unet.to(dtype).save_pretrained(str(cat))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"fake hub folders in {folder}: {size / 2**30:.2f} GiB written in {time.perf_counter() - start:.0f} s", flush=True)
    return {"sd": sd, "ddpm": cat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the executed notebooks and times.json here")
    parser.add_argument("--times", help="write only the times (JSON) to this file")
    parser.add_argument("--fake-hub", help="build full-size random-weight hub folders here and run on them")
    parser.add_argument("--small", action="store_true",
                        help="with --fake-hub: narrow layers, float32 (the hub settings on a CPU in minutes)")
    parser.add_argument("--reference", default=str(HERE.parent.parent / "shared" / "reference"),
                        help="folder of the real configs (stable-diffusion-v1-4/, ddpm-cat-256/)")
    parser.add_argument("only", nargs="*", help="prefixes of the notebooks to run (default: all)")
    args = parser.parse_args()

    if args.fake_hub:
        fakes = make_fake_hub(Path(args.fake_hub), Path(args.reference), small=args.small)
        os.environ.update(MINIDIFF_MODELS="hub", MINIDIFF_SD=str(fakes["sd"]), MINIDIFF_DDPM=str(fakes["ddpm"]))

    out = Path(args.out) if args.out else None
    paths = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    paths = [p for p in paths if not args.only or any(p.name.startswith(o) for o in args.only)]
    results = {}
    for path in paths:
        results[path.name] = r = run_notebook(path, out / path.name if out else None)
        print(f"{path.name:42s} {r['seconds']:6.1f} s  peak GPU {r['peak_allocated_gib']:5.2f} GiB"
              + (f"  FAILED: {r['error']}" if r["error"] else ""), flush=True)
        # after every notebook, so a run cut short still leaves its times
        if out:
            (out / "times.json").write_text(json.dumps(results, indent=1))
        if args.times:
            Path(args.times).write_text(json.dumps(results, indent=1))
    total = sum(r["seconds"] for r in results.values())
    print(f"{'total':42s} {total:6.1f} s")
    sys.exit(1 if any(r["error"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
