"""Finding and reading the small weight files that people download for a fine-tuned concept.

A concept comes as a file (`learned_embeds.safetensors`, `pytorch_lora_weights.safetensors`, an A1111 `.pt`),
as a folder or hub repo holding one under diffusers' file name, or already in memory as a dict. Files are read
with `core.checkpoint_file.read_checkpoint_file`: safetensors as they are, pickles only with
`torch.load(weights_only=True)`, so a file that asks to run code is refused and nothing from it runs.
"""

from __future__ import annotations

import os

import torch

from ..core.checkpoint_file import read_checkpoint_file
from ..core.hub import resolve_file


def find_weight_file(path_or_repo, default_names: tuple[str, ...], weight_name: str | None = None,
                     subfolder: str | None = None, what: str = "weights") -> str:
    """The local path of a weight file: `path_or_repo` itself when it is a file, else `weight_name` (or the first
    of `default_names` that exists, safetensors first as diffusers looks) in that folder or hub repo."""
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise TypeError(f"Expected a file, a folder, a hub repo id or a dict of tensors for the {what}; "
                        f"found {type(path_or_repo).__name__}.")
    path_or_repo = os.fspath(path_or_repo)
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if weight_name is not None:
        return resolve_file(path_or_repo, weight_name, subfolder)
    for name in default_names:
        found = resolve_file(path_or_repo, name, subfolder, required=False)
        if found is not None:
            return found
    where = os.path.join(path_or_repo, subfolder or "")
    present = sorted(os.listdir(where)) if os.path.isdir(where) else "(not a local folder)"
    raise FileNotFoundError(f"Expected the {what} in {where} under one of the names {list(default_names)}; found "
                            f"{present}. Pass weight_name= with the file's name.")


def read_weight_file(path: str) -> dict:
    """The top-level dict of a `.safetensors` file or of a pickle read with weights_only=True."""
    data = read_checkpoint_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"Expected {path} to hold a dict, found a {type(data).__name__}.")
    return data


def safetensors_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors header ({} for a pickle): diffusers keeps LoRA ranks there."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def save_weight_file(state_dict: dict, save_directory: str, weight_name: str, safe_serialization: bool) -> str:
    """Write `state_dict` to save_directory/weight_name (created if needed) as safetensors or a plain torch pickle.

    Returns the path. safetensors holds tensors only; the pickle may hold the empty dicts Custom Diffusion writes."""
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"Expected a folder to save {weight_name} into; {save_directory} is a file. "
                                 "Pass the folder that should hold it.")
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, weight_name)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata={"format": "pt"})
    else:
        torch.save(state_dict, path)
    return path
