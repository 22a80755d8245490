"""What differs between the dependency versions that pyproject.toml allows (its floors up to today's), written once.

The floors are run in CI (`.ci/run`, second job) and checked by tests/test_dependency_floors.py.
"""

from __future__ import annotations

from importlib.metadata import version

import torch

# transformers 4.56 renamed from_pretrained's `torch_dtype=` to `dtype=`. 4.55 and older do not know `dtype=`:
# it ends up in the model's config, and the load fails writing that config as JSON; 4.56 and later (5.x
# included) still take `torch_dtype=`, but warn that it is deprecated in every notebook that loads SD.
DTYPE_KEYWORD_SINCE = (4, 56)


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict:
    """transformers' `from_pretrained` dtype keyword for the installed version: {"dtype": d} or {"torch_dtype": d}."""
    major, minor = (int(part) for part in version("transformers").split(".")[:2])  # "4.56.0.dev0" -> 4, 56
    return {"dtype": dtype} if (major, minor) >= DTYPE_KEYWORD_SINCE else {"torch_dtype": dtype}


def resize_token_embeddings(text_encoder, num_tokens: int) -> None:
    """Grow the text encoder's token table to `num_tokens` rows. transformers 4.46 added `mean_resizing` (new rows
    drawn around the old rows' mean, which costs a covariance of the whole table); minidiff writes the new rows
    itself, so it is turned off where it exists and not passed to the versions before."""
    import inspect

    takes = "mean_resizing" in inspect.signature(text_encoder.resize_token_embeddings).parameters
    text_encoder.resize_token_embeddings(num_tokens, **({"mean_resizing": False} if takes else {}))


def save_clip_text_encoder(text_encoder, folder: str) -> None:
    """Save a `transformers.CLIPTextModel` as SD v1-4's `text_encoder/` is saved: config.json and model.safetensors
    with every key under `text_model.`. transformers 5 saves the keys without that prefix, which transformers 4
    (the floor) reads as a checkpoint for another class and loads as random weights."""
    import os

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    text_encoder.config.save_pretrained(folder)
    weights = {(k if k.startswith("text_model.") else "text_model." + k): v.detach().contiguous().cpu()
               for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
