"""Reading a single checkpoint file (`.safetensors`, `.ckpt`, `.pt`, `.pth`, `.bin`) without running any of it.

A `.safetensors` file is a JSON header plus raw tensor bytes: nothing in it can run. A `.ckpt` is a pickle,
and unpickling can call any Python function the file names (`os.system` included). minidiff reads pickles
only with PyTorch's restricted unpickler, `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers (dict, list, tuple, numbers, strings) and refuses every other global the file names.

The original Stable Diffusion `.ckpt` files are PyTorch Lightning checkpoints:

    {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
     "state_dict": {"model.diffusion_model.input_blocks.0.0.weight": tensor, ...},
     "callbacks": {<class pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint>: {...}}}

The callback class (a global) makes plain `torch.load(weights_only=True)` fail. Before loading, the file's
globals are listed without running anything (`torch.serialization.get_unsafe_globals_in_checkpoint`, which
reads the pickle's opcodes); those of training bookkeeping (Lightning, numpy scalars, omegaconf configs)
are stood in for by inert placeholder classes that store their arguments and do nothing else. Any other
global (a file asking for `os.system`, `builtins.eval`, ...) is refused with the list of what it asked for.
"""

from __future__ import annotations

import os
import zipfile

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Top-level modules whose globals appear in training checkpoints as metadata, never as weights.
BOOKKEEPING_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "numpy", "omegaconf")


class Placeholder:
    """Stands in for a class or function named by a pickle: it stores what it is given and runs nothing."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.global_name}>"


def placeholder_for(name: str) -> type:
    """A distinct inert class per global name (so two callback classes used as dict keys stay two keys)."""
    return type(f"Placeholder[{name}]", (Placeholder,), {"global_name": name})


class UnsafeCheckpointError(ValueError):
    """The pickle names globals that minidiff will not stand in for; nothing from it was run."""


def read_checkpoint_file(path: str) -> dict:
    """The top-level object of a checkpoint file: a dict (for `.safetensors`, {key: tensor})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected a checkpoint file at {path}, found none.")
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises SafetensorError for a bad header or a short file
            raise OSError(f"Could not read {path} ({size} bytes) as safetensors: {type(e).__name__}: {e}. "
                          "The file is truncated or not a safetensors file: download or save it again.") from e
    if not path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"Expected a .safetensors file or a pickled PyTorch checkpoint "
                         f"({', '.join(PICKLE_SUFFIXES)}); found {os.path.basename(path)!r}.")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6 (2020); every SD .ckpt is one.
        raise OSError(f"{path} ({size} bytes) is not a PyTorch zip checkpoint: it is truncated, or an old "
                      "pre-1.6 format that minidiff does not read. Convert it to .safetensors where it was made.")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        # torch 2.5 added the listing; 2.6 the (placeholder, "module.name") pairs of safe_globals used below.
        raise RuntimeError(f"Reading the pickle in {path} safely needs torch >= 2.6 (found {torch.__version__}): "
                           "upgrade torch, or use the .safetensors version of the checkpoint.")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)   # reads opcodes, runs nothing
    except Exception as e:
        raise OSError(f"Could not read the pickle in {path} ({size} bytes): {type(e).__name__}: {e}. "
                      "The file is truncated or corrupt: download it again.") from e
    refused = [n for n in names if n.split(".")[0] not in BOOKKEEPING_MODULES]
    if refused:
        raise UnsafeCheckpointError(
            f"{path} asks to load {refused}, which are neither tensors nor training bookkeeping. minidiff does "
            "not unpickle them (a pickle can run any function it names); nothing from the file was run. "
            "If you trust the file, convert it to .safetensors with the tool that made it."
        )
    stand_ins = [(placeholder_for(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise OSError(f"Could not load {path} ({size} bytes) with torch.load(weights_only=True): "
                      f"{type(e).__name__}: {e}") from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of a single-file checkpoint: its `state_dict` entry (Lightning) or the whole dict."""
    data = read_checkpoint_file(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"Expected {path} to hold a dict of tensors (or a 'state_dict' entry), "
                         f"found a {type(data).__name__}.")
    not_tensors = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: the entries {not_tensors[:5]} of its state dict are not tensors; "
                         "expected a state dict of tensors.")
    return data
