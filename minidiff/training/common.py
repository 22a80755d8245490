"""What the three training scripts share: command-line options, device and precision, the data on the
device, the EMA of the weights, the loss log, and saving / resuming a training state.

The training loops themselves are written out in `train_vae.py`, `train_ddpm.py` and `train_sd.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
from torch import nn

from .shapes import render_all

STATE_NAME = "training_state.pt"
LOG_NAME = "loss_log.csv"


def add_common_args(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--out", required=True, help="folder for the trained model, loss log and training state")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="AdamW learning rate after the warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--num-images", type=int, default=100_000, help="size of the shapes data set")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data set, the weights and the noise")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cpu', 'cuda', ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU); the weights stay float32")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="the saved model is this EMA of the weights")
    parser.add_argument("--resume", action="store_true", help=f"continue from {STATE_NAME} in --out")
    parser.add_argument("--init", default=None, help="start from the weights of this pipeline folder (with a "
                        "fresh optimizer and EMA): to train on when the training state is gone")
    parser.add_argument("--save-every", type=int, default=2000, help="save the training state every N steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument("--workers", type=int, default=1, help="processes that draw the data set")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
        torch.backends.cudnn.benchmark = True           # pick the fastest conv kernels for our fixed shapes
        torch.backends.cuda.matmul.allow_tf32 = True    # TF32 for what runs outside bf16 autocast
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on a GPU when asked for (matmuls and convs in bf16, weights and losses in fp32)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_images(args, resolution: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """The whole shapes data set, uint8 (N, 3, R, R), kept on `device`; and the captions."""
    start = time.time()
    images, captions = render_all(args.num_images, args.seed, resolution, args.workers)
    print(f"drew {len(images)} shape images at {resolution}x{resolution} in {time.time() - start:.1f} s")
    return images.to(device), captions


def warmup_lr(step: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up from 0 to 1 over `warmup` steps, then constant (the EMA of the
    weights does the averaging that a decaying learning rate would)."""
    return min(1.0, (step + 1) / max(1, warmup))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema <- decay θ_ema + (1 - decay) θ: an exponential moving average of the weights, which
    samples better than the last noisy iterate."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


class LossLog:
    """Appends `step,<columns>,seconds` lines to loss_log.csv in the output folder."""

    def __init__(self, folder: str, resume: bool, columns: tuple[str, ...] = ("loss",)):
        self.path, self.columns = os.path.join(folder, LOG_NAME), columns
        if not resume or not os.path.exists(self.path):
            with open(self.path, "w") as f:
                f.write(",".join(("step", *columns, "seconds")) + "\n")

    def write(self, step: int, seconds: float, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(",".join([str(step), *(f"{values[c]:.6f}" for c in self.columns), f"{seconds:.1f}"]) + "\n")


def save_state(folder: str, step: int, modules: dict[str, nn.Module], optimizer, generator: torch.Generator,
               seconds: float) -> None:
    """Everything needed to continue exactly where training stopped."""
    state = {"step": step, "seconds": seconds, "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
             **{name: m.state_dict() for name, m in modules.items()}}
    path = os.path.join(folder, STATE_NAME)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # never leave a half-written state behind


def load_state(folder: str, modules: dict[str, nn.Module], optimizer, generator: torch.Generator) -> tuple[int, float]:
    """Restore a training state written by `save_state`; returns (step, seconds trained so far)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: expected a training state at {path}, found none. "
                                "Train without --resume first, or check --out.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, m in modules.items():
        m.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    return state["step"], state["seconds"]


def write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
