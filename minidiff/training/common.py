"""What the three training scripts share: command-line options, device and precision, the run folder, the
data on the device, the EMA of the weights, the loss log, and saving / resuming a training state.

The training loops themselves are written out in `train_vae.py`, `train_ddpm.py`, `train_sd.py`,
`train_control.py` and `train_edit.py`; what every loop does after computing its loss (the optimizer step, then
logging, saving and the time limit) is `optimizer_step` and `StepKeeper` here.

Nothing a user made is lost: a run folder (--out) that holds files is refused unless --resume (continue the
run there) or --overwrite (remove the earlier run's files, named below, and keep every other file). A saved
training state is read with `torch.load(weights_only=True)`: tensors and plain Python values only, so a
crafted file cannot run code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.utils import parse_device
from .scenes import render_scenes
from .shapes import render_all

STATE_NAME = "training_state.pt"
LOG_NAME = "loss_log.csv"
# What a training command writes into its run folder: --overwrite removes these, and nothing else.
RUN_OUTPUTS = (STATE_NAME, STATE_NAME + ".tmp", LOG_NAME, "model_index.json", "unet", "vae", "text_encoder",
               "tokenizer", "scheduler")


class CommandError(ValueError):
    """Bad input to a training command (an argument, the run folder, a state file): `run_command` prints it as
    one line and exits with status 2; raised before any work starts."""


def add_common_args(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--out", required=True, help="folder for the trained model, loss log and training state: "
                        "new or empty, unless --resume or --overwrite")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="AdamW learning rate after the warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    parser.add_argument("--num-images", type=int, default=100_000, help="size of the data set")
    parser.add_argument("--data", choices=("shapes", "scenes"), default="shapes",
                        help="'shapes' (one shape on a plain background: shapes.py, the first edition) or 'scenes' "
                             "(one or two shapes, relations, textured backgrounds: scenes.py, the second edition)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data set, the weights and the noise")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cpu', 'cuda', ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU); the weights stay float32")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="the saved model is this EMA of the weights")
    parser.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {STATE_NAME}")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"train into an --out that holds an earlier run: removes its {', '.join(RUN_OUTPUTS)} "
                             "first (other files are kept)")
    parser.add_argument("--init", default=None, help="start from the weights of this pipeline folder (with a "
                        "fresh optimizer and EMA): to train on when the training state is gone")
    parser.add_argument("--save-every", type=int, default=2000, help="save the training state every N steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument("--workers", type=int, default=1, help="processes that draw the data set")


def run_command(parser: argparse.ArgumentParser, train, argv=None) -> None:
    """Parse `argv` and `train(args)`; a CommandError ends the command with one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        train(args)
    except CommandError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")


def check_args(args, inputs: dict[str, str | None]) -> None:
    """The common options' values, and the input folders `inputs` ({"--vae": path or None, ...}) exist."""
    rules = [("--steps", args.steps, args.steps >= 0, ">= 0"),  # 0: save the untrained model
             ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
             ("--num-images", args.num_images, args.num_images >= 1, ">= 1"),
             ("--lr", args.lr, math.isfinite(args.lr) and args.lr >= 0, "a finite number >= 0"),
             ("--warmup", args.warmup, args.warmup >= 0, ">= 0"),
             ("--ema-decay", args.ema_decay, 0 <= args.ema_decay <= 1, "in [0, 1]"),
             ("--save-every", args.save_every, args.save_every >= 1, ">= 1"),
             ("--max-minutes", args.max_minutes, args.max_minutes is None or args.max_minutes > 0, "> 0"),
             ("--workers", args.workers, args.workers >= 1, ">= 1")]
    for option, value, ok, expected in rules:
        if not ok:
            raise CommandError(f"{option} must be {expected}; found {value}.")
    for option, path in inputs.items():
        if path is not None and not os.path.isdir(path):
            found = "a file" if os.path.exists(path) else "nothing"
            raise CommandError(f"{option} {path}: expected a folder, found {found} there. Check the path.")
    if args.resume and (args.overwrite or args.init):
        other = "--overwrite" if args.overwrite else "--init"
        raise CommandError(f"--resume continues the run in --out with its own weights and optimizer; {other} cannot "
                           f"go with it. Drop one of them.")


def prepare_run_folder(args, inputs: dict[str, str | None], is_output: Callable[[str], bool] | None = None) -> None:
    """Check the arguments and --out before any work, then make --out (or, with --overwrite, empty it of the
    earlier run's files: the names for which `is_output(name)` is true, by default those in RUN_OUTPUTS). A
    folder that holds files is refused unless --resume or --overwrite."""
    check_args(args, inputs)
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out} is a file; expected a run folder. Pass a folder path.")
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if args.resume:
        if STATE_NAME not in present:
            found = "no folder" if not os.path.isdir(out) else f"only {present}" if present else "an empty folder"
            raise CommandError(f"--resume: expected a training state at {os.path.join(out, STATE_NAME)}, found "
                               f"{found}. Train without --resume first, or check --out.")
        return
    if present and not args.overwrite:
        shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
        raise CommandError(f"--out {out} already holds files ({shown}), which training would write over. Pass "
                           "--resume to continue the run there, --overwrite to replace it, or a new --out.")
    if is_output is None:
        is_output = RUN_OUTPUTS.__contains__
    earlier = [name for name in present if is_output(name)]
    for option, path in inputs.items():  # e.g. --vae runs/x/vae with --out runs/x: keep what this run reads
        for name in earlier:
            target = os.path.join(out, name)
            if path is not None and (is_inside(path, target) or is_inside(target, path)):
                raise CommandError(f"{option} {path} overlaps {target}, which --overwrite would remove. Move it "
                                   "out of --out first, or pass another --out.")
    for name in earlier:
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.remove(target)
    if earlier:
        kept = [name for name in present if name not in earlier]
        print(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {out}"
              + (f" (kept {', '.join(kept)})" if kept else ""))
    os.makedirs(out, exist_ok=True)


def is_inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def pick_device(name: str) -> torch.device:
    """--device (core/utils.parse_device), with cuDNN's autotuner and TF32 on for a GPU."""
    try:
        device = parse_device(name)
    except ValueError as e:
        raise CommandError(str(e)) from e
    if device.type == "cuda":
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
    """The whole data set (--data shapes or scenes), uint8 (N, 3, R, R), kept on `device`; and the captions."""
    start = time.time()
    data = getattr(args, "data", "shapes")
    draw = render_scenes if data == "scenes" else render_all
    images, captions = draw(args.num_images, args.seed, resolution, args.workers)
    print(f"drew {len(images)} {data} images at {resolution}x{resolution} in {time.time() - start:.1f} s")
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


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_norm: float = 1.0) -> None:
    """One gradient step: clear the old gradients, backpropagate `loss`, clip the gradients' global norm to
    `max_norm` (a rare huge batch cannot throw the weights away), and update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


class StepKeeper:
    """The steps of a training loop, and the bookkeeping at the end of each, the same in every training command:

    - every `log_every` steps (and at the last): the values on the progress bar and a line in loss_log.csv;
    - every --save-every steps (and at the last): the training state (`save_state`), then `on_save()`, if given
      (e.g. a usable checkpoint at every save);
    - once --max-minutes have passed: save, and tell the loop to stop.

    `first_step` and `seconds` come from `load_state` (0 and 0.0 for a new run), so the log and the time limit
    count the whole run across --resume. Use:

        keeper = StepKeeper(args, "ddpm", modules, optimizer, generator, step, seconds)
        for step in keeper.bar:                      # first_step, ..., args.steps - 1, with a progress bar
            ...
            if keeper.end_of_step(step, loss=loss.item()):
                break
        print(f"{keeper.done} steps in {keeper.seconds():.0f} s")
    """

    def __init__(self, args, name: str, modules: dict[str, nn.Module], optimizer, generator: torch.Generator,
                 first_step: int, seconds: float, columns: tuple[str, ...] = ("loss",), log_every: int = 50,
                 on_save=None):
        self.args, self.log_every, self.on_save = args, log_every, on_save
        self.modules, self.optimizer, self.generator = modules, optimizer, generator
        self.log = LossLog(args.out, args.resume, columns)
        self.bar = tqdm(range(first_step, args.steps), initial=first_step, total=args.steps, desc=name)
        self.start = time.time() - seconds
        self.done = first_step                                     # steps finished so far

    def seconds(self) -> float:
        """Seconds trained, earlier runs included."""
        return time.time() - self.start

    def end_of_step(self, step: int, **values: float) -> bool:
        """Log, save, check the time; returns True when the loop should stop (--max-minutes reached)."""
        args = self.args
        self.done = step + 1
        last = self.done == args.steps
        out_of_time = args.max_minutes is not None and self.seconds() > 60 * args.max_minutes
        if step % self.log_every == 0 or last or out_of_time:
            self.bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
            self.log.write(step, self.seconds(), **values)
        if self.done % args.save_every == 0 or last or out_of_time:
            save_state(args.out, self.done, self.modules, self.optimizer, self.generator, self.seconds())
            if self.on_save is not None:
                self.on_save()
        if out_of_time:
            print(f"stopping after {self.done} steps: --max-minutes {args.max_minutes} reached")
        return out_of_time


def save_state(folder: str, step: int, modules: dict[str, nn.Module], optimizer, generator: torch.Generator,
               seconds: float) -> None:
    """Everything needed to continue exactly where training stopped."""
    state = {"step": step, "seconds": seconds, "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
             **{name: m.state_dict() for name, m in modules.items()}}
    path = os.path.join(folder, STATE_NAME)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # never leave a half-written state behind


def check_fits(path: str, name: str, saved: dict, module: nn.Module) -> None:
    """A saved state_dict must have exactly the module's tensors and shapes (the run that wrote it was made from the
    same inputs); otherwise a CommandError that says where they differ."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved.items()} if isinstance(saved, dict) else {}
    differ = [f"{k}: {found.get(k, 'missing')} saved, {own.get(k, 'none')} here" for k in sorted(own.keys() | found.keys())
              if own.get(k) != found.get(k)]
    if differ:
        raise CommandError(f"{path} holds a {name} of another shape than this command builds ({len(differ)} tensors "
                           f"differ, e.g. {differ[0]}). Resume with the options of the run that wrote it (the same "
                           "--sd / --vae / --init), or train anew in another --out.")


def check_resume(args, modules: dict[str, nn.Module]) -> None:
    """With --resume: the training state in --out must fit `modules` (read now, before any work; the weights are
    loaded later by `load_state`)."""
    if not args.resume:
        return
    path = os.path.join(args.out, STATE_NAME)
    if os.path.isfile(path):                                           # a missing state: load_state says so
        state = read_state(path)
        for name, module in modules.items():
            if isinstance(state, dict) and name in state:              # a missing entry: load_state says so
                check_fits(path, name, state[name], module)


def read_state(path: str) -> dict:
    """The training state file at `path`, read with weights_only=True (tensors and plain values only)."""
    try:
        # weights_only=True: tensors, dicts, lists, numbers and strings only. A full unpickler would call any
        # function the file names (pickle's __reduce__), i.e. run its code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # what a full unpickler would have called
        if unsafe:
            raise CommandError(f"{path} is not a training state written by minidiff: it names {unsafe.group(1)}, "
                               "beyond tensors and plain values, which could run code, so it was not loaded. Delete "
                               "it, or train anew (--overwrite).") from e
        raise CommandError(f"{path} is not a readable training state ({type(e).__name__}: {e}). Delete it, or "
                           "train anew (--overwrite).") from e  # a truncated or foreign file


def load_state(folder: str, modules: dict[str, nn.Module], optimizer, generator: torch.Generator) -> tuple[int, float]:
    """Restore a training state written by `save_state`; returns (step, seconds trained so far)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        raise CommandError(f"--resume: expected a training state at {path}, found none. "
                           "Train without --resume first, or check --out.")
    state = read_state(path)
    expected = ["step", "seconds", "optimizer", "generator", "cpu_rng", *modules]
    missing = [key for key in expected if not isinstance(state, dict) or key not in state]
    if missing:
        raise CommandError(f"{path} lacks {missing} of a training state for {list(modules)}; found "
                           f"{sorted(state) if isinstance(state, dict) else type(state).__name__}. Was it written by "
                           "another training command? Pass the right --out, or train anew (--overwrite).")
    for name, m in modules.items():
        check_fits(path, name, state[name], m)
        m.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    return state["step"], state["seconds"]


def write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
