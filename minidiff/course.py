"""Choosing the models and the device for the notebook course, from environment variables.

Every notebook starts with `setup = minidiff.course.setup()`, which PRINTS what it chose and why, so a
reader always knows whether the pictures below come from the real checkpoints or the tiny ones.

| variable          | values                     | default | meaning                                             |
|-------------------|----------------------------|---------|-----------------------------------------------------|
| `MINIDIFF_MODELS` | `tiny`, `hub`, `auto`      | `auto`  | the bundled tiny checkpoints or the real hub ones    |
| `MINIDIFF_DEVICE` | `cpu`, `cuda`, `auto`      | `auto`  | where the models run (`auto`: cuda when there is one)|
| `MINIDIFF_DTYPE`  | `float32`, `float16`, `auto` | `auto`| `auto`: float16 for hub models on cuda, else float32 |
| `MINIDIFF_DDPM`   | a folder or hub repo id    |         | replaces the DDPM checkpoint (e.g. a local copy)     |
| `MINIDIFF_SD`     | a folder or hub repo id    |         | replaces the Stable Diffusion checkpoint             |

`auto` models means: the hub checkpoints (google/ddpm-cat-256, CompVis/stable-diffusion-v1-4) when a
GPU exists and the hub answers within a second (or `MINIDIFF_DDPM` and `MINIDIFF_SD` both name local
copies), the tiny bundled ones otherwise. Without a GPU the network is never touched, so CI on a CPU
picks the tiny models at once.

Run the whole course from the command line, e.g. on a GPU with local full-size folders:
    MINIDIFF_MODELS=hub MINIDIFF_SD=/data/sd-v1-4 MINIDIFF_DDPM=/data/ddpm-cat-256 \\
        python -m pytest -q --nbval-lax notebooks/
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

HUB_DDPM = "google/ddpm-cat-256"
HUB_SD = "CompVis/stable-diffusion-v1-4"
TINY_DDPM = "tiny-ddpm"
TINY_SD = "tiny-sd"

MODEL_CHOICES = ("tiny", "hub", "auto")
DEVICE_CHOICES = ("cpu", "cuda", "auto")
DTYPE_CHOICES = {"float32": torch.float32, "float16": torch.float16, "auto": None}


@dataclass(frozen=True)
class CourseSetup:
    """What the notebooks run on. `models` is "tiny" or "hub"; `ddpm` / `sd` are what `from_pretrained` takes."""

    models: str
    device: torch.device
    dtype: torch.dtype
    ddpm: str
    sd: str
    reasons: tuple[str, ...]

    @property
    def tiny(self) -> bool:
        return self.models == "tiny"

    def pick(self, tiny, hub):
        """`tiny` with the tiny checkpoints, `hub` with the full-size ones (step counts, batch sizes)."""
        return tiny if self.tiny else hub

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator: the same seed draws the same noise on every device (see `minidiff.core.utils.randn_tensor`)."""
        return torch.Generator("cpu").manual_seed(seed)

    def describe(self) -> str:
        lines = [
            "minidiff course setup",
            f"  models : {self.models}",
            f"  DDPM   : {self.ddpm}",
            f"  SD     : {self.sd}",
            f"  device : {self.device}",
            f"  dtype  : {str(self.dtype).replace('torch.', '')}",
            "why:",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _read_choice(name: str, choices, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not understood; expected one of {list(choices)}. "
                         f"Set {name} to one of them, or unset it for {default!r}.")
    return value


def hub_reachable(timeout: float = 1.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds, and a reason."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, f"{host} answered"
    except OSError as e:
        return False, f"{host} did not answer within {timeout:.0f} s ({type(e).__name__})"


def choose() -> CourseSetup:
    """Read the MINIDIFF_* variables and decide, without printing (see `setup`)."""
    models = _read_choice("MINIDIFF_MODELS", MODEL_CHOICES)
    device_name = _read_choice("MINIDIFF_DEVICE", DEVICE_CHOICES)
    dtype_name = _read_choice("MINIDIFF_DTYPE", DTYPE_CHOICES)
    ddpm_override = os.environ.get("MINIDIFF_DDPM") or None
    sd_override = os.environ.get("MINIDIFF_SD") or None
    reasons = []

    # 1. the device
    has_cuda = torch.cuda.is_available()
    if device_name == "cuda" and not has_cuda:
        raise RuntimeError("MINIDIFF_DEVICE=cuda but torch finds no CUDA GPU (torch.cuda.is_available() is "
                           "False). Install a CUDA build of torch on a GPU machine, or set MINIDIFF_DEVICE=cpu.")
    if device_name == "auto":
        device_name = "cuda" if has_cuda else "cpu"
        reasons.append(f"MINIDIFF_DEVICE=auto: {'a CUDA GPU is present' if has_cuda else 'no CUDA GPU found'}, "
                       f"so {device_name}")
    else:
        reasons.append(f"MINIDIFF_DEVICE={device_name}")
    device = torch.device(device_name)

    # 2. the models: never the network without a GPU, since full-size models take minutes per image on a CPU
    if models == "auto":
        if device.type != "cuda":
            models = "tiny"
            reasons.append("MINIDIFF_MODELS=auto: no GPU in use, so the bundled tiny checkpoints "
                           "(the real ones would take minutes per image on a CPU)")
        elif ddpm_override and sd_override:
            models = "hub"
            reasons.append("MINIDIFF_MODELS=auto: a GPU, and MINIDIFF_DDPM / MINIDIFF_SD name both "
                           "full-size checkpoints, so those")
        else:
            ok, why = hub_reachable()
            models = "hub" if ok else "tiny"
            reasons.append(f"MINIDIFF_MODELS=auto: a GPU, and the hub {'is' if ok else 'is not'} reachable "
                           f"({why}), so the {'hub' if ok else 'bundled tiny'} checkpoints")
    else:
        reasons.append(f"MINIDIFF_MODELS={models}")

    ddpm = ddpm_override or (HUB_DDPM if models == "hub" else TINY_DDPM)
    sd = sd_override or (HUB_SD if models == "hub" else TINY_SD)
    if ddpm_override:
        reasons.append(f"MINIDIFF_DDPM={ddpm_override} replaces the DDPM checkpoint")
    if sd_override:
        reasons.append(f"MINIDIFF_SD={sd_override} replaces the Stable Diffusion checkpoint")

    # 3. the dtype: half precision halves the memory of the full-size models on a GPU
    if dtype_name == "auto":
        dtype = torch.float16 if (device.type == "cuda" and models == "hub") else torch.float32
        reasons.append(f"MINIDIFF_DTYPE=auto: {str(dtype).replace('torch.', '')}"
                       + (" (full-size models on a GPU)" if dtype == torch.float16 else ""))
    else:
        dtype = DTYPE_CHOICES[dtype_name]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("MINIDIFF_DTYPE=float16 on the CPU: many CPU kernels lack float16 and it is slow. "
                             "Use MINIDIFF_DTYPE=float32 (or auto) on the CPU.")
        reasons.append(f"MINIDIFF_DTYPE={dtype_name}")
    return CourseSetup(models=models, device=device, dtype=dtype, ddpm=ddpm, sd=sd, reasons=tuple(reasons))


def quiet_weight_loading_bars() -> None:
    """Hide transformers' "Loading weights" bar (one per text-encoder load, a widget in every notebook);
    download progress bars stay. Needs transformers' `set_tqdm_hook` (5.x); a no-op without it."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_hook is None:
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    set_hook(hook)


def setup() -> CourseSetup:
    """Choose models, device and dtype from the environment, print the choice and the reasons, return it.

    Also hides transformers' per-load progress bar (`quiet_weight_loading_bars`), to keep notebooks short.
    """
    chosen = choose()
    print(chosen.describe())
    quiet_weight_loading_bars()
    return chosen
