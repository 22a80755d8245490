"""Loading and saving model weights in the diffusers checkpoint layout.

A checkpoint folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or the older
`diffusion_pytorch_model.bin`; `variant="fp16"` picks `diffusion_pytorch_model.fp16.safetensors`).
minidiff's module attribute names equal the checkpoint keys, so loading is
`load_state_dict(strict=True)` after one short table of legacy renames.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..core.config import config_from_dict, config_to_dict, read_json
from ..core.hub import resolve_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"

# Checkpoints written before diffusers 0.13 (2023), among them google/ddpm-cat-256 and the
# Stable Diffusion v1 VAE, name the four attention weights of `Attention` the old way.
LEGACY_ATTENTION_NAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


# torch_dtype may also be given by name, as transformers accepts it. (diffusers 0.42 warns on a string and loads
# float32 instead, a silent fallback that minidiff does not copy.)
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def as_torch_dtype(torch_dtype) -> torch.dtype | None:
    """None, a floating torch.dtype, or its name ("float16", "torch.float16") -> None or the torch.dtype."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point:
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype.removeprefix("torch.")]
    raise TypeError(f"torch_dtype must be a floating torch.dtype (torch.float16) or one of the names "
                    f"{list(DTYPE_NAMES)}; found {torch_dtype!r}.")


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map pre-2023 attention names (`attentions.0.query.weight`) to today's (`attentions.0.to_q.weight`)."""
    renamed = {}
    for key, value in state_dict.items():
        new_key = key
        for old, new in LEGACY_ATTENTION_NAMES.items():
            if old in new_key and ".attentions." in new_key:
                new_key = new_key.replace(old, new)
        renamed[new_key] = value
    return renamed


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` or `.bin` weight file onto the CPU, with an error that names the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors raises its own SafetensorError, torch a pickle/zip error
        size = os.path.getsize(path)
        raise OSError(
            f"Could not read the weight file {path} ({size} bytes): {type(e).__name__}: {e}. "
            "The file is truncated or corrupt: delete it and download or save it again."
        ) from e


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(strict=True)` with one readable error listing every mismatch."""
    state_dict = rename_legacy_keys(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}"
                   for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"The weights in {source} do not match the model built from its config.json:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
        if wrong_shape:
            lines.append(f"  wrong shape ({len(wrong_shape)}): {show(wrong_shape)}")
        lines.append("Check that config.json and the weight file belong to the same checkpoint.")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


class PretrainedModel(nn.Module):
    """Base class of minidiff's models: `from_pretrained`, `save_pretrained`, `.config`, `.dtype`, `.device`.

    Subclasses set `config_class` (a frozen dataclass) and build their layers from `self.config`.
    """

    config_class: type = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_config(cls, config: dict | object):
        """A model with random weights from a config dict (as in `config.json`) or a config dataclass."""
        if isinstance(config, dict):
            config = config_from_dict(cls.config_class, config, strict=True, source=f"{cls.__name__} config")
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__}.from_config expected a dict of config values or a "
                            f"{cls.config_class.__name__}, found {type(config).__name__}. Pass the dict of a "
                            f"config.json, or the .config of a {cls.__name__}.")
        return cls(config)                                   # the config dataclass checked itself when made

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
    ):
        """Load a checkpoint folder / bundled name / hub repo id, strictly, in eval mode."""
        torch_dtype = as_torch_dtype(torch_dtype)   # before any file is read
        find = dict(subfolder=subfolder, cache_dir=cache_dir, local_files_only=local_files_only)
        config_path = resolve_file(path_or_repo_id, CONFIG_NAME, **find)
        raw = read_json(config_path)
        class_name = raw.get("_class_name")
        if class_name is not None and class_name != cls.__name__:
            raise ValueError(
                f"{config_path} is the config of a {class_name}, not of a {cls.__name__}. "
                f"Load it with minidiff.{class_name}.from_pretrained, or check subfolder=."
            )
        config = config_from_dict(cls.config_class, raw, strict=True, source=config_path)

        weights_path = cls._find_weights(path_or_repo_id, variant, use_safetensors, find)
        with torch.device("meta"):  # build without allocating random weights; load_state_dict fills them
            model = cls(config)
        model = model.to_empty(device="cpu")
        load_strict(model, read_weights(weights_path), weights_path)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

    @staticmethod
    def _find_weights(path_or_repo_id, variant, use_safetensors, find) -> str:
        suffix = f".{variant}" if variant else ""
        names = []
        if use_safetensors is not False:
            names.append(f"{WEIGHTS_NAME}{suffix}.safetensors")
        if use_safetensors is not True:
            names.append(f"{WEIGHTS_NAME}{suffix}.bin")
        for name in names:
            path = resolve_file(path_or_repo_id, name, required=False, **find)
            if path is not None:
                return path
        where = f"{path_or_repo_id}{'/' + find['subfolder'] if find['subfolder'] else ''}"
        raise FileNotFoundError(
            f"Expected a weight file {' or '.join(names)} in {where}, found none. "
            + ("Drop variant= or " if variant else "")
            + ("set use_safetensors=None to accept either format." if use_safetensors is not None
               else "check the folder.")
        )

    def save_pretrained(self, folder: str, safe_serialization: bool = True) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors`, as diffusers does."""
        import json

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config_to_dict(self.config, type(self).__name__), f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, os.path.join(folder, f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(folder, f"{WEIGHTS_NAME}.bin"))
